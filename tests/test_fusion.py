from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from stackcat.models import training
from stackcat.models.fusion import FusionClassifier
from stackcat.models.training import Callback

from contract import check_fitted_contract, check_sklearn_contract
from tiny_bert import build_tiny_bert
from tiny_images import write_colour_pngs

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "white": (250, 250, 250)}
WORDS = {"red": "cotton shirt", "green": "denim jeans", "blue": "leather wallet", "white": "running shoes"}


class MeanColourEncoder:
    """Test image encoder: mean RGB colour of the image through a fixed random projection (16 dims)."""

    name = "test-mean-colour-16"

    def __init__(self):
        self.projection = np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32)

    def encode(self, images):
        colours = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32).mean(axis=(0, 1)) / 255
                            for im in images]) if images else np.zeros((0, 3), np.float32)
        return (colours - 0.5) @ self.projection


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = write_colour_pngs(folder, COLOURS)
    paths["broken"] = str(folder / "broken.jpg")
    with open(paths["broken"], "wb") as handle:
        handle.write(b"not an image")
    return paths


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    texts = [f"{w} {c}" for c, w in WORDS.items()]
    return str(build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), texts))


def products(image_files, *, text_says_class=True, repeat=6, labels=None):
    """Rows of 4 classes; the image colour always tells the class, the text only if asked."""
    names = list(COLOURS)
    labels = labels or names
    rows = []
    for i in range(repeat):
        for k, name in enumerate(names):
            text = f"{WORDS[name]} {i}" if text_says_class else f"product {i}"
            rows.append({"text": text, "image_path": image_files[name], "label": labels[k]})
    return pd.DataFrame(rows)


def tiny_fusion(model_name, **params) -> FusionClassifier:
    defaults = dict(model_name=model_name, image_encoder=MeanColourEncoder(), max_length=16,
                    fusion_dim=16, image_dim=8, image_tokens=2, batch_size=8, lr=3e-3, head_lr=1e-2,
                    image_epochs=1, frozen_epochs=1, epochs=1, warmup_ratio=0.0, dropout=0.0,
                    progress=False, random_state=0, n_threads=1)
    return FusionClassifier(**{**defaults, **params})


def test_sklearn_checks_that_apply():
    check_sklearn_contract(FusionClassifier())


def test_contract(tiny_model, image_files):
    frame = products(image_files, labels=["a shirt", "jeans & co", "wallet", "running shoes"])
    new = pd.DataFrame({"text": ["cotton shirt", "", "new\nline"],
                        "image_path": [image_files["red"], None, image_files["broken"]]})
    check_fitted_contract(tiny_fusion(tiny_model), frame, frame["label"], new)


def test_contract_without_bert(tiny_model, image_files, tmp_path):
    """freeze_encoder=True: BERT never trains, the fusion layers learn from cached token states."""
    frame = products(image_files, labels=["a shirt", "jeans & co", "wallet", "running shoes"])
    new = pd.DataFrame({"text": ["cotton shirt", "", "new\nline"],
                        "image_path": [image_files["red"], None, image_files["broken"]]})
    clf = tiny_fusion(tiny_model, freeze_encoder=True, frozen_epochs=2, text_cache_dir=str(tmp_path))
    check_fitted_contract(clf, frame, frame["label"], new)
    assert clf.module_.encoder is None


def test_int_labels_and_image_only_signal_is_learned(tiny_model, image_files):
    """The text says nothing: the model must learn the class from the image."""
    frame = products(image_files, text_says_class=False, labels=[10, 20, 30, 40], repeat=10)
    clf = tiny_fusion(tiny_model, image_epochs=4, frozen_epochs=2, freeze_encoder=True, head_lr=3e-2)
    clf.fit(frame, frame["label"])
    assert (clf.predict(frame) == frame["label"].to_numpy()).mean() == 1.0
    assert clf.classes_.tolist() == [10, 20, 30, 40]


def test_rows_without_a_usable_image(tiny_model, image_files):
    frame = products(image_files)
    frame.loc[::3, "image_path"] = None
    frame.loc[1::6, "image_path"] = image_files["broken"]
    frame.loc[2::6, "image_path"] = image_files["red"] + ".missing.png"
    clf = tiny_fusion(tiny_model, epochs=2).fit(frame, frame["label"])
    assert clf.n_missing_images_ == int(frame["image_path"].isna().sum()) + 4 + 4
    assert torch.count_nonzero(clf.module_.missing_image) > 0, "the missing-image code was learned"
    proba = clf.predict_proba(frame)
    assert np.isfinite(proba).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)


class StageChanges(Callback):
    """Records, per stage, which parameters changed and each parameter's weight decay."""

    def __init__(self):
        self.changed, self.weight_decay = {}, {}

    def on_stage_begin(self, loop, stage):
        self.before = {k: v.detach().clone() for k, v in loop.module.named_parameters()}
        names = {id(p): k for k, p in loop.module.named_parameters()}
        self.weight_decay[stage.name] = {names[id(p)]: group["weight_decay"]
                                         for group in stage.param_groups for p in group["params"]}

    def on_stage_end(self, loop, stage):
        self.changed[stage.name] = {k for k, v in loop.module.named_parameters()
                                    if not torch.equal(self.before[k], v.detach())}


def test_each_stage_trains_its_own_parameters(tiny_model, image_files, monkeypatch):
    recorder = StageChanges()
    monkeypatch.setattr(training, "training_callbacks", lambda *args: [recorder])
    frame = products(image_files)
    clf = tiny_fusion(tiny_model, image_epochs=1, frozen_epochs=1, epochs=1).fit(frame, frame["label"])
    assert [h["stage"] for h in clf.history_] == ["image", "frozen", "full"]

    def changed(stage, prefix):
        return {k for k in recorder.changed[stage] if k.startswith(prefix)}

    image_branch = ("image_projection.", "image_tokens.", "missing_image")
    assert changed("image", image_branch) and "head.weight" in recorder.changed["image"]
    assert not changed("image", ("encoder.", "text_projection."))
    assert recorder.weight_decay["image"]["image_projection.weight"] == clf.image_weight_decay
    assert recorder.weight_decay["image"]["head.weight"] == clf.weight_decay

    assert not changed("frozen", "encoder.")
    assert {"text_projection.weight", "head.weight"} <= recorder.changed["frozen"]
    assert changed("frozen", image_branch)

    assert "encoder.embeddings.word_embeddings.weight" in recorder.changed["full"]
    assert {"text_projection.weight", "head.weight"} <= recorder.changed["full"]


def test_save_load_round_trip(tiny_model, image_files, tmp_path):
    frame = products(image_files)
    frame.loc[::5, "image_path"] = None
    clf = tiny_fusion(tiny_model).fit(frame, frame["label"])
    folder = clf.save(tmp_path / "fusion")
    assert (folder / "params.joblib").is_file(), "the encoder object is saved with the params"
    loaded = FusionClassifier.load(folder)
    assert loaded.image_encoder_name_ == MeanColourEncoder.name
    np.testing.assert_allclose(loaded.predict_proba(frame), clf.predict_proba(frame), rtol=0, atol=1e-6)


def test_predict_refuses_another_image_encoder(tiny_model, image_files):
    frame = products(image_files)
    clf = tiny_fusion(tiny_model, image_epochs=0, frozen_epochs=1, freeze_encoder=True).fit(frame, frame["label"])
    other = MeanColourEncoder()
    other.name = "another-encoder"
    clf.set_params(image_encoder=other)
    with pytest.raises(ValueError, match="another-encoder"):
        clf.predict(frame)


def test_no_stage_at_all_is_an_error(tiny_model, image_files):
    frame = products(image_files)
    with pytest.raises(ValueError, match="nothing to train"):
        tiny_fusion(tiny_model, image_epochs=0, frozen_epochs=0, freeze_encoder=True).fit(frame, frame["label"])


def test_early_stopping_keeps_best_of_monitored_stages(tiny_model, image_files):
    frame = products(image_files)
    names = list(COLOURS)
    wrong = [names[(names.index(label) + 1) % 4] for label in frame["label"]]
    clf = tiny_fusion(tiny_model, image_epochs=1, frozen_epochs=3, epochs=3, early_stopping_patience=1)
    clf.fit(frame, frame["label"], eval_set=(frame.iloc[::2], wrong[::2]))
    assert clf.history_[0]["stage"] == "image" and clf.history_[0]["valid_loss"] is None
    monitored = [h for h in clf.history_ if h["valid_loss"] is not None]
    assert clf.best_epoch_["valid_loss"] == min(h["valid_loss"] for h in monitored)
    assert len(clf.history_) < 7


def test_plain_list_is_refused_with_the_columns_named(tiny_model):
    with pytest.raises(TypeError, match="'text' and 'image_path'"):
        tiny_fusion(tiny_model).fit(["a shirt", "a wallet"], ["shirt", "wallet"])
