from __future__ import annotations

import io

import joblib
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from sklearn.metrics import log_loss

from stackcat.features.hub import PretrainedModelNotFoundError
from stackcat.models.batching import LengthBucketBatchSampler, pad_batch
from stackcat.models.bert import BertClassifier

from contract import check_fitted_contract, check_sklearn_contract
from tiny_bert import build_tiny_bert

GROUPS = {
    "shirt": "red cotton shirt",
    "jeans": "blue denim jeans",
    "wallet": "black leather wallet",
    "shoes": "white running shoes",
}
FILLER = ["", "men", "summer casual", "light dark kids women", "winter formal silk wool scarf bag"]


def toy_data(labels=None, repeat: int = 4):
    """Texts of 4 separable kinds with varied lengths; ``labels`` renames the 4 classes."""
    names = list(GROUPS)
    labels = labels or names
    texts, y = [], []
    for i in range(repeat):
        for filler in FILLER:
            for k, name in enumerate(names):
                texts.append(f"{GROUPS[name]} {filler} {i}".strip())
                y.append(labels[k])
    return texts, y


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    texts, _ = toy_data()
    return str(build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), texts))


def tiny_clf(model_name, **params) -> BertClassifier:
    defaults = dict(model_name=model_name, epochs=3, batch_size=8, lr=3e-3, max_length=32,
                    warmup_ratio=0.0, dropout=0.0, progress=False, random_state=0, n_threads=1)
    return BertClassifier(**{**defaults, **params})


def encoder_state(clf):
    return {k: v.clone() for k, v in clf.module_.encoder.state_dict().items()
            if not k.startswith("pooler.")}


def test_sklearn_checks_that_apply():
    check_sklearn_contract(BertClassifier())


@pytest.mark.parametrize("labels", [
    ["a shirt", "jeans & co", "wallet", "running shoes"],  # strings with spaces
    [10, 20, 30, 40],                                      # ints
])
def test_contract_any_label_type(tiny_model, labels):
    X, y = toy_data(labels)
    clf = tiny_clf(tiny_model)
    proba = check_fitted_contract(clf, X, y, ["red cotton shirt", "denim", "new\nline text", ""])
    assert clf.classes_[proba[0].argmax()] == labels[0]


def test_learns_separable_task(tiny_model):
    X, y = toy_data()
    clf = tiny_clf(tiny_model, epochs=4).fit(X, y)
    unseen = ["cotton shirt red 99", "jeans denim blue women", "wallet black leather", "shoes running"]
    assert clf.predict(unseen).tolist() == list(GROUPS)
    assert clf.history_[-1]["train_loss"] < clf.history_[0]["train_loss"]


def test_reads_named_column_and_names_missing_one(tiny_model):
    X, y = toy_data()
    frame = pd.DataFrame({"desc": pd.array(X, dtype="string"), "other": 1})
    clf = tiny_clf(tiny_model, text_column="desc", epochs=1).fit(frame, y)
    np.testing.assert_allclose(clf.predict_proba(frame), clf.predict_proba(X), atol=1e-6)
    with pytest.raises(KeyError, match="'body'"):
        tiny_clf(tiny_model, text_column="body").fit(frame, y)


def test_same_seed_same_probabilities(tiny_model):
    X, y = toy_data()
    a = tiny_clf(tiny_model, dropout=0.2).fit(X, y).predict_proba(X)
    b = tiny_clf(tiny_model, dropout=0.2).fit(X, y).predict_proba(X)
    c = tiny_clf(tiny_model, dropout=0.2, random_state=1).fit(X, y).predict_proba(X)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_save_load_folder_round_trip(tiny_model, tmp_path):
    X, y = toy_data(["a shirt", "jeans", "wallet", "shoes"])
    clf = tiny_clf(tiny_model, epochs=1).fit(X, y)
    folder = clf.save(tmp_path / "model")
    assert {"encoder", "tokenizer", "head.pt", "estimator.json"} <= {p.name for p in folder.iterdir()}
    loaded = BertClassifier.load(folder, device="cpu")
    assert loaded.get_params() == {**clf.get_params(), "device": "cpu"}
    np.testing.assert_array_equal(loaded.classes_, clf.classes_)
    np.testing.assert_allclose(loaded.predict_proba(X), clf.predict_proba(X), rtol=0, atol=1e-6)
    assert loaded.history_ == clf.history_
    with pytest.raises(FileExistsError):
        clf.save(folder)


def test_joblib_keeps_the_weights_not_the_checkpoint(tiny_model, tmp_path):
    """A pickled model predicts the same even when its original checkpoint folder is gone."""
    X, y = toy_data()
    folder = build_tiny_bert(tmp_path / "model", X)
    clf = tiny_clf(str(folder), epochs=1).fit(X, y)
    buffer = io.BytesIO()
    joblib.dump(clf, buffer)
    for path in sorted(folder.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    buffer.seek(0)
    np.testing.assert_allclose(joblib.load(buffer).predict_proba(X), clf.predict_proba(X), atol=1e-6)


def test_frozen_encoder_trains_a_head_on_cached_features(tiny_model):
    X, y = toy_data()
    frozen = tiny_clf(tiny_model, freeze_encoder=True, epochs=2).fit(X, y)
    assert not hasattr(frozen.module_, "encoder"), "no encoder is trained, or kept"
    assert [h["stage"] for h in frozen.history_] == ["head", "head"]
    assert frozen.history_[1]["train_loss"] < frozen.history_[0]["train_loss"]


def test_contract_frozen_encoder(tiny_model, tmp_path):
    X, y = toy_data(["a shirt", "jeans & co", "wallet", "running shoes"])
    clf = tiny_clf(tiny_model, freeze_encoder=True, epochs=10, lr=3e-2, text_cache_dir=str(tmp_path))
    proba = check_fitted_contract(clf, X, y, ["red cotton shirt", "denim", "new\nline text", ""])
    assert clf.classes_[proba[0].argmax()] == "a shirt"


def test_staged_training_unfreezes_after_n_epochs(tiny_model):
    from transformers import AutoModel

    X, y = toy_data()
    original = AutoModel.from_pretrained(tiny_model).state_dict()["embeddings.word_embeddings.weight"]
    head_only = tiny_clf(tiny_model, epochs=1, train_encoder_after=1).fit(X, y)
    both = tiny_clf(tiny_model, epochs=3, train_encoder_after=1).fit(X, y)
    assert torch.equal(encoder_state(head_only)["embeddings.word_embeddings.weight"], original)
    assert not torch.equal(encoder_state(both)["embeddings.word_embeddings.weight"], original)
    assert [h["stage"] for h in both.history_] == ["head", "full", "full"]
    # the head-only stage is the same computation in both runs
    assert both.history_[0]["train_loss"] == head_only.history_[0]["train_loss"]


def test_head_lr_sets_the_heads_rate_apart_from_the_encoders(tiny_model):
    from transformers import AutoModel

    X, y = toy_data()
    query = "encoder.layer.0.attention.self.query.weight"
    original = AutoModel.from_pretrained(tiny_model).state_dict()[query]
    clf = tiny_clf(tiny_model, epochs=4, lr=1e-9, head_lr=0.1).fit(X, y)
    torch.testing.assert_close(encoder_state(clf)[query], original, atol=1e-6, rtol=0)  # encoder at 1e-9
    assert [g["lr"] for g in clf._stages()[-1].param_groups] == [1e-9, 0.1]
    frozen_in_place = tiny_clf(tiny_model, epochs=4, lr=1e-9).fit(X, y)                   # head at 1e-9 too
    assert [g["lr"] for g in frozen_in_place._stages()[-1].param_groups] == [1e-9, 1e-9]
    assert clf.history_[-1]["train_loss"] < 0.8 * frozen_in_place.history_[-1]["train_loss"]


def test_freeze_embeddings_trains_the_rest_of_the_encoder(tiny_model):
    from transformers import AutoModel

    X, y = toy_data()
    original = AutoModel.from_pretrained(tiny_model).state_dict()
    trained = encoder_state(tiny_clf(tiny_model, epochs=2, freeze_embeddings=True).fit(X, y))
    assert torch.equal(trained["embeddings.word_embeddings.weight"], original["embeddings.word_embeddings.weight"])
    assert not torch.equal(trained["encoder.layer.0.attention.self.query.weight"],
                           original["encoder.layer.0.attention.self.query.weight"])


def test_early_stopping_stops_and_keeps_best(tiny_model):
    X, y = toy_data()
    names = list(GROUPS)
    wrong = [names[(names.index(label) + 1) % 4] for label in y]  # eval loss rises as it learns
    X_val, y_val = X[::3], wrong[::3]
    clf = tiny_clf(tiny_model, epochs=8, early_stopping_patience=2).fit(X, y, eval_set=(X_val, y_val))
    losses = [h["valid_loss"] for h in clf.history_]
    assert len(losses) < 8, "should have stopped early"
    best = int(np.argmin(losses))
    assert len(losses) == best + 1 + 2  # stopped after `patience` epochs without improvement
    assert clf.best_epoch_["epoch"] == best + 1
    kept = log_loss(y_val, clf.predict_proba(X_val), labels=clf.classes_)
    assert kept == pytest.approx(losses[best], abs=1e-5)


def test_eval_set_with_unknown_label_is_named(tiny_model):
    X, y = toy_data()
    with pytest.raises(ValueError, match="'sandals'"):
        tiny_clf(tiny_model, epochs=1).fit(X, y, eval_set=(X[:2], ["shirt", "sandals"]))


def test_batches_are_padded_to_their_own_longest_text_and_order_is_restored(tiny_model):
    X, y = toy_data()
    clf = tiny_clf(tiny_model, epochs=1, encode_batch_size=4).fit(X, y)
    widths = []
    forward = clf.module_.forward

    def spy(input_ids, attention_mask):
        assert attention_mask[:, -1].any(), "a batch is wider than its longest text"
        widths.append(input_ids.shape[1])
        return forward(input_ids, attention_mask)

    clf.module_.forward = spy
    proba = clf.predict_proba(X)
    assert len(set(widths)) > 2, "texts of different lengths should give batches of different widths"
    np.testing.assert_allclose(clf.predict_proba(X[::-1]), proba[::-1], atol=1e-6)
    one_by_one = np.vstack([clf.predict_proba([text]) for text in X[:8]])
    np.testing.assert_allclose(one_by_one, proba[:8], atol=1e-5)
    assert clf.predict_proba([]).shape == (0, 4)


def test_length_buckets_cover_every_row_once_and_group_similar_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 120, size=1000)
    sampler = LengthBucketBatchSampler(lengths, batch_size=32, seed=1, bucket_batches=10)
    first, second = list(sampler), list(sampler)
    assert sorted(i for b in first for i in b) == list(range(1000))
    assert first != second, "each pass reshuffles"
    padding = sum(len(b) * lengths[b].max() - lengths[b].sum() for b in first)
    random_padding = sum(32 * lengths[b].max() - lengths[b].sum()
                         for b in np.array_split(rng.permutation(1000)[:992], 31))
    assert padding < 0.2 * random_padding


def test_pad_batch():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_offline_hub_name_fails_with_how_to(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "stackcat-tests/surely-not-cached-model-0d9f"
    clf = BertClassifier(model_name=name, progress=False)
    with pytest.raises(PretrainedModelNotFoundError) as info:
        clf.fit(["a", "b"], ["x", "y"])
    message = str(info.value)
    assert name in message and 'model_name="/path/to/folder"' in message
    assert f"huggingface-cli download {name} --local-dir DIR" in message
    assert isinstance(info.value, OSError)


def test_missing_local_folder_is_named(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(PretrainedModelNotFoundError, match="no-such-model"):
        BertClassifier(model_name=missing, progress=False).fit(["a"], ["x"])


def test_n_threads_restored_and_progress_shown(tiny_model, caplog):
    X, y = toy_data()
    before = torch.get_num_threads()
    with caplog.at_level("DEBUG", logger="stackcat"):  # bars need a terminal; the epoch line is logged
        clf = tiny_clf(tiny_model, epochs=1, n_threads=1, progress=True).fit(X, y)
    clf.predict_proba(X[:3])
    assert torch.get_num_threads() == before
    assert any("full epoch 1/1: " in m and "batches in" in m and "loss " in m for m in caplog.messages)


def test_invalid_param_rejected_at_fit_not_init():
    clf = BertClassifier(lr=-1.0)
    with pytest.raises(ValueError, match="lr"):
        clf.fit(["a"], ["x"])


def test_clone_of_fitted_is_unfitted(tiny_model):
    X, y = toy_data()
    clf = tiny_clf(tiny_model, epochs=1).fit(X, y)
    assert not hasattr(clone(clf), "module_")
