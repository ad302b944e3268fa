"""Cached token states of frozen text encoders, and the frozen BertClassifier / FusionClassifier."""

from __future__ import annotations

import io
import shutil

import joblib
import numpy as np
import pandas as pd
import pytest
import torch

from stackcat.features import text_states
from stackcat.features.hub import PretrainedModelNotFoundError, load_text_encoder
from stackcat.features.store import EmbeddingStore, MemoryCache, content_key, count_entries
from stackcat.features.text_states import (
    clear_memory_cache,
    mean_pooled,
    text_model_identity,
    token_states,
)
from stackcat.models.batching import mean_pool, pad_batch
from stackcat.models.bert import BertClassifier
from stackcat.models.fusion import DualAttentionFusion, FusionClassifier

from tiny_bert import CountingLoader, build_tiny_bert
from tiny_images import write_colour_pngs

KINDS = {"shirt": "red cotton shirt", "jeans": "blue denim jeans",
         "wallet": "black leather wallet", "shoes": "white running shoes"}
FILLER = ["", "men", "summer casual", "light dark kids women", "winter formal silk wool scarf bag"]
COLOURS = {"shirt": (220, 30, 30), "jeans": (30, 40, 220), "wallet": (30, 200, 40), "shoes": (250, 250, 250)}


def toy_frame(image_paths=None, repeat: int = 3) -> pd.DataFrame:
    rows = []
    for i in range(repeat):
        for filler in FILLER:
            for label, words in KINDS.items():
                rows.append({"text": f"{words} {filler} {i}".strip(), "label": label,
                             "image_path": image_paths[label] if image_paths else None})
    return pd.DataFrame(rows)


class MeanColour:
    """Test image encoder: the mean RGB colour (3 dims)."""

    name = "test-mean-colour-3"

    def encode(self, images):
        return np.array([np.asarray(im, np.float32).mean((0, 1)) / 255 - 0.5 for im in images],
                        dtype=np.float32).reshape(len(images), 3)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), toy_frame()["text"]))


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory):
    return write_colour_pngs(tmp_path_factory.mktemp("images"), COLOURS)


@pytest.fixture
def counting(monkeypatch):
    # The counts are taken in torch's forward pass: run the frozen encoder through torch
    # (the onnxruntime backend is tested in test_encoders_onnx.py).
    monkeypatch.setenv("STACKCAT_ENCODER_BACKEND", "torch")
    loader = CountingLoader(load_text_encoder)
    monkeypatch.setattr(text_states, "load_text_encoder", loader)
    return loader


def frozen_bert(model_name, **params) -> BertClassifier:
    defaults = dict(model_name=model_name, freeze_encoder=True, epochs=20, batch_size=8, lr=3e-2,
                    max_length=32, warmup_ratio=0.0, dropout=0.0, progress=False, random_state=0,
                    n_threads=1)
    return BertClassifier(**{**defaults, **params})


def frozen_fusion(model_name, **params) -> FusionClassifier:
    defaults = dict(model_name=model_name, image_encoder=MeanColour(), max_length=32, fusion_dim=16,
                    image_dim=8, image_tokens=2, batch_size=8, head_lr=1e-2, image_epochs=1,
                    frozen_epochs=2, freeze_encoder=True, warmup_ratio=0.0, dropout=0.0, progress=False,
                    random_state=0, n_threads=1)
    return FusionClassifier(**{**defaults, **params})


def pickled_size_and_copy(estimator):
    buffer = io.BytesIO()
    joblib.dump(estimator, buffer)
    size = buffer.tell()
    buffer.seek(0)
    return size, joblib.load(buffer)


# --- token states ---------------------------------------------------------------------------


def test_token_states_are_the_encoders_own_and_pool_to_mean_pooling(tiny_model):
    texts = toy_frame()["text"].tolist()[:12] + ["", "unknownword " * 50]
    states = token_states(texts, tiny_model, 16, progress=False)

    encoder, tokenizer = load_text_encoder(tiny_model)
    ids = tokenizer(texts, truncation=True, max_length=16)["input_ids"]
    input_ids, attention_mask = pad_batch(ids, tokenizer.pad_token_id)
    with torch.no_grad():
        hidden = encoder.eval()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    assert [s.shape for s in states] == [(len(i), 32) for i in ids]
    assert states[-1].shape[0] == 16, "truncated to max_length"
    assert all(s.dtype == np.float16 for s in states)
    for row, rows_of_text in enumerate(states):
        np.testing.assert_allclose(rows_of_text, hidden[row, : len(ids[row])].numpy(), atol=5e-3, rtol=2e-3)
    np.testing.assert_allclose(mean_pooled(states), mean_pool(hidden, attention_mask).numpy(),
                               atol=5e-3, rtol=2e-3)


def test_each_distinct_text_is_encoded_once(tiny_model, counting, tmp_path):
    texts = toy_frame()["text"].tolist()
    first = token_states(texts + texts[:5], tiny_model, 32, cache_dir=tmp_path, progress=False)
    again = token_states(texts[::-1], tiny_model, 32, cache_dir=tmp_path, progress=False)
    assert counting.loads == 1 and len(counting.encoded) == len(set(texts))
    assert counting.max_encodings_per_text == 1
    for a, b in zip(first[: len(texts)], again[::-1]):
        np.testing.assert_array_equal(a, b)
    token_states(texts[:3], tiny_model, 16, cache_dir=tmp_path, progress=False)
    assert sum(counting.encoded.values()) == len(set(texts)) + 3, "another max_length, other entries"


def test_disk_cache_is_reused_by_a_fresh_process_state(tiny_model, monkeypatch, tmp_path):
    monkeypatch.setenv("STACKCAT_ENCODER_BACKEND", "torch")  # the torch loader is the one watched
    texts = toy_frame()["text"].tolist()
    expected = token_states(texts, tiny_model, 32, cache_dir=tmp_path, progress=False)
    assert count_entries(tmp_path) == len(set(texts))
    clear_memory_cache()

    def no_encoder(model_name):
        raise AssertionError("the encoder must not be loaded: every text is cached")

    monkeypatch.setattr(text_states, "load_text_encoder", no_encoder)
    got = token_states(texts, tiny_model, 32, cache_dir=tmp_path, progress=False)
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(AssertionError, match="must not be loaded"):
        token_states(["a text never seen"], tiny_model, 32, cache_dir=tmp_path, progress=False)


def test_identity_follows_the_files_not_the_folder(tiny_model, tmp_path):
    copy = shutil.copytree(tiny_model, tmp_path / "copy")
    assert text_model_identity(copy) == text_model_identity(tiny_model)
    build_tiny_bert(copy, toy_frame()["text"], seed=1)  # same config and tokenizer, new weights
    assert text_model_identity(copy) != text_model_identity(tiny_model)
    with pytest.raises(PretrainedModelNotFoundError, match="no-such-model"):
        text_model_identity(tmp_path / "no-such-model")


def test_changed_weights_get_new_states_not_stale_ones(tiny_model, counting, tmp_path):
    folder = shutil.copytree(tiny_model, tmp_path / "model")
    texts = toy_frame()["text"].tolist()[:6]
    before = token_states(texts, folder, 32, cache_dir=tmp_path / "cache", progress=False)
    build_tiny_bert(folder, toy_frame()["text"], seed=1)
    after = token_states(texts, folder, 32, cache_dir=tmp_path / "cache", progress=False)
    assert counting.loads == 2 and sum(counting.encoded.values()) == 2 * len(texts)
    assert not np.allclose(before[0], after[0])


def test_offline_hub_name_says_how_to_use_a_local_folder():
    name = "stackcat-tests/surely-not-cached-model-7c1e"
    with pytest.raises(PretrainedModelNotFoundError, match='model_name="/path/to/folder"'):
        token_states(["a shirt"], name, 16, progress=False)


def test_store_keeps_arrays_of_any_shape_and_drops_bad_entries(tmp_path):
    store = EmbeddingStore("toy", tmp_path, dtype=np.float16, ndim=2, memory=MemoryCache())
    keys = [content_key(str(i)) for i in range(3)]
    for i, key in enumerate(keys):
        stored = store.put(key, np.full((i + 1, 4), i, dtype=np.float64))
        assert stored.dtype == np.float16 and not stored.flags.writeable
    with pytest.raises(ValueError, match="2 dimension"):
        store.put(keys[0], np.zeros(4))
    with open(next(tmp_path.rglob("shard-*.bin")), "r+b") as shard:  # damage entries 1 and 2
        shard.seek(8)
        shard.write(b"\xff" * 24)
    fresh = EmbeddingStore("toy", tmp_path, dtype=np.float16, ndim=2, memory=MemoryCache())
    assert list(fresh.get_many(keys)) == [keys[0]]
    assert fresh.get_many(keys)[keys[0]].shape == (1, 4)
    assert EmbeddingStore("other", tmp_path, dtype=np.float16).get(keys[0]) is None


# --- BertClassifier(freeze_encoder=True) ----------------------------------------------------


def test_frozen_bert_learns_and_matches_a_head_on_directly_pooled_states(tiny_model):
    frame = toy_frame()
    clf = frozen_bert(tiny_model).fit(frame, frame["label"])
    assert clf.predict(frame).tolist() == frame["label"].tolist()
    assert {h["stage"] for h in clf.history_} == {"head"}
    assert clf.history_[-1]["train_loss"] < clf.history_[0]["train_loss"]
    assert not hasattr(clf.module_, "encoder") and not hasattr(clf, "tokenizer_")

    encoder, tokenizer = load_text_encoder(tiny_model)
    ids = tokenizer(frame["text"].tolist(), truncation=True, max_length=32)["input_ids"]
    input_ids, attention_mask = pad_batch(ids, tokenizer.pad_token_id)
    with torch.no_grad():
        pooled = mean_pool(encoder.eval()(input_ids=input_ids, attention_mask=attention_mask)
                           .last_hidden_state, attention_mask)
        direct = torch.softmax(clf.module_.eval()(pooled).double(), dim=-1).numpy()
    np.testing.assert_allclose(clf.predict_proba(frame), direct, atol=2e-3)


def test_folds_and_models_share_one_encoding_per_text(tiny_model, image_paths, counting, tmp_path):
    frame = toy_frame(image_paths)
    half = len(frame) // 2
    folds = [(frame.iloc[:half], frame.iloc[half:]), (frame.iloc[half:], frame.iloc[:half])]
    for train, test in folds:
        clf = frozen_bert(tiny_model, epochs=2, text_cache_dir=tmp_path).fit(train, train["label"])
        clf.predict_proba(test)
    fusion = frozen_fusion(tiny_model, text_cache_dir=tmp_path).fit(frame, frame["label"])
    fusion.predict_proba(frame)
    assert counting.max_encodings_per_text == 1
    assert len(counting.encoded) == frame["text"].nunique()
    assert counting.loads == 1, "the encoder is loaded once per process, only while texts are missing"


def test_frozen_bert_pickles_without_the_encoder(tiny_model, tmp_path):
    frame = toy_frame()
    frozen = frozen_bert(tiny_model, epochs=2).fit(frame, frame["label"])
    tuned = frozen_bert(tiny_model, freeze_encoder=False, epochs=1).fit(frame, frame["label"])
    frozen_size, restored = pickled_size_and_copy(frozen)
    tuned_size, _ = pickled_size_and_copy(tuned)
    assert frozen_size < 1_000_000 and frozen_size * 10 < tuned_size, (frozen_size, tuned_size)
    proba = frozen.predict_proba(frame)
    np.testing.assert_array_equal(restored.predict_proba(frame), proba)

    folder = frozen.save(tmp_path / "saved")
    assert {p.name for p in folder.iterdir()} == {"head.pt", "estimator.json"}
    loaded = BertClassifier.load(folder)
    assert loaded.text_model_identity_ == frozen.text_model_identity_
    clear_memory_cache()  # the loaded model encodes the texts again, from the same checkpoint
    np.testing.assert_allclose(loaded.predict_proba(frame), proba, atol=1e-6)
    assert loaded.predict_proba([]).shape == (0, 4)


def test_frozen_model_refuses_a_changed_or_missing_checkpoint(tiny_model, tmp_path):
    folder = shutil.copytree(tiny_model, tmp_path / "model")
    frame = toy_frame()
    clf = frozen_bert(str(folder), epochs=1).fit(frame, frame["label"])
    _, restored = pickled_size_and_copy(clf)
    build_tiny_bert(folder, frame["text"], seed=1)
    for model in (clf, restored):
        with pytest.raises(ValueError, match="has changed since this model was fitted"):
            model.predict_proba(frame)
    shutil.rmtree(folder)
    with pytest.raises(PretrainedModelNotFoundError, match="does not exist"):
        restored.predict_proba(frame)


def test_refit_switches_between_frozen_and_fine_tuned(tiny_model):
    frame = toy_frame()
    clf = frozen_bert(tiny_model, epochs=1).fit(frame, frame["label"])
    clf.set_params(freeze_encoder=False).fit(frame, frame["label"])
    assert not hasattr(clf, "text_model_identity_") and hasattr(clf.module_, "encoder")
    _, restored = pickled_size_and_copy(clf)
    np.testing.assert_allclose(restored.predict_proba(frame), clf.predict_proba(frame), atol=1e-6)
    clf.set_params(freeze_encoder=True).fit(frame, frame["label"])
    assert not hasattr(clf, "tokenizer_") and clf.text_model_identity_


# --- FusionClassifier(freeze_encoder=True) ---------------------------------------------------------


def test_fusion_without_bert_matches_the_module_running_bert(tiny_model, image_paths, tmp_path):
    frame = toy_frame(image_paths)
    frame.loc[::4, "image_path"] = None
    clf = frozen_fusion(tiny_model, text_cache_dir=tmp_path).fit(frame, frame["label"])
    assert clf.module_.encoder is None and not hasattr(clf, "tokenizer_")
    assert [h["stage"] for h in clf.history_] == ["image", "frozen", "frozen"]
    proba = clf.predict_proba(frame)

    encoder, tokenizer = load_text_encoder(tiny_model)
    with_bert = DualAttentionFusion(encoder.eval(), clf.image_embedding_dim_, 4, image_dim=8,
                                    fusion_dim=16, image_tokens=2)
    with_bert.load_state_dict(clf.module_.state_dict(), strict=False)
    ids = tokenizer(frame["text"].tolist(), truncation=True, max_length=32)["input_ids"]
    input_ids, attention_mask = pad_batch(ids, tokenizer.pad_token_id)
    images, ok = clf._image_inputs(frame, len(frame))
    with torch.no_grad():
        logits = with_bert.eval()(attention_mask=attention_mask, image=torch.from_numpy(images),
                                  image_ok=torch.from_numpy(ok), input_ids=input_ids)
    np.testing.assert_allclose(proba, torch.softmax(logits.double(), -1).numpy(), atol=2e-3)


def test_fusion_without_bert_pickles_small_and_saves(tiny_model, image_paths, tmp_path):
    frame = toy_frame(image_paths)
    clf = frozen_fusion(tiny_model).fit(frame, frame["label"])
    size, restored = pickled_size_and_copy(clf)
    assert size < 1_000_000
    proba = clf.predict_proba(frame)
    np.testing.assert_array_equal(restored.predict_proba(frame), proba)
    folder = clf.save(tmp_path / "saved")
    assert not (folder / "encoder").exists()
    np.testing.assert_allclose(FusionClassifier.load(folder).predict_proba(frame), proba, atol=1e-6)


def test_warm_cache_encodes_texts_and_images_before_the_folds(tiny_model, image_paths, counting, tmp_path):
    from stackcat.features.images import clear_memory_cache as clear_image_memory_cache

    clear_image_memory_cache()  # earlier tests encoded these images in this process
    frame = toy_frame(image_paths)
    frozen_bert(tiny_model, text_cache_dir=tmp_path).warm_cache(frame)
    assert len(counting.encoded) == frame["text"].nunique()
    image_encoder = MeanColour()
    fusion = frozen_fusion(tiny_model, text_cache_dir=tmp_path, image_encoder=image_encoder,
                           image_cache_dir=tmp_path / "images")
    fusion.warm_cache(frame)
    assert count_entries(tmp_path / "images"), "images were not cached"
    clear_memory_cache()
    loads = counting.loads
    fusion.fit(frame, frame["label"]).predict_proba(frame)
    frozen_bert(tiny_model, text_cache_dir=tmp_path, epochs=2).fit(frame, frame["label"])
    assert counting.loads == loads and counting.max_encodings_per_text == 1


def test_fine_tuned_bert_has_nothing_to_warm(tiny_model, counting, tmp_path):
    frozen_bert(tiny_model, freeze_encoder=False, text_cache_dir=tmp_path).warm_cache(toy_frame())
    assert counting.loads == 0
