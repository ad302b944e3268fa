"""TorchClassifier's shared skeleton: input strategies, renamed params, old saved folders and pickles."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from stackcat.core import Precision, label_positions, proba_for_classes
from stackcat.models.bert import BertClassifier
from stackcat.models.fusion import FusionClassifier
from stackcat.models.torch_base import CachedStateInputs, TokenInputs

from tiny_bert import build_tiny_bert
from tiny_images import write_colour_pngs

KINDS = {"shirt": "red cotton shirt", "jeans": "blue denim jeans", "wallet": "black leather wallet"}
COLOURS = {"shirt": (220, 30, 30), "jeans": (30, 40, 220), "wallet": (30, 200, 40)}


class MeanColour:
    name = "test-mean-colour-3"

    def encode(self, images):
        return np.array([np.asarray(im, np.float32).mean((0, 1)) / 255 - 0.5 for im in images],
                        dtype=np.float32).reshape(len(images), 3)


def toy_frame(image_paths=None) -> pd.DataFrame:
    rows = [{"text": f"{words} {i}", "label": label, "image_path": image_paths[label] if image_paths else None}
            for i in range(4) for label, words in KINDS.items()]
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), toy_frame()["text"]))


@pytest.fixture(scope="module")
def frame(tmp_path_factory):
    return toy_frame(write_colour_pngs(tmp_path_factory.mktemp("images"), COLOURS))


def bert(model_name, **params) -> BertClassifier:
    defaults = dict(model_name=model_name, epochs=2, batch_size=4, lr=3e-2, max_length=16, warmup_ratio=0.0,
                    progress=False, random_state=0, n_threads=1)
    return BertClassifier(**{**defaults, **params})


def fusion(model_name, **params) -> FusionClassifier:
    defaults = dict(model_name=model_name, image_encoder=MeanColour(), max_length=16, fusion_dim=8, image_dim=4,
                    image_tokens=2, batch_size=4, image_epochs=1, frozen_epochs=1, epochs=1, warmup_ratio=0.0,
                    progress=False, random_state=0, n_threads=1)
    return FusionClassifier(**{**defaults, **params})


# --- the input strategy follows freeze_encoder ------------------------------------------------------


def test_the_strategy_follows_freeze_encoder_then_what_the_fit_recorded(tiny_model, frame):
    frozen = bert(tiny_model, freeze_encoder=True)
    assert isinstance(frozen._text_inputs(fitting=True), CachedStateInputs)
    frozen.fit(frame, frame["label"])
    assert isinstance(frozen._text_inputs(fitting=False), CachedStateInputs)
    assert frozen._torch_attributes == ("module_",)
    frozen.set_params(freeze_encoder=False)  # a param change alone does not change the fitted model's inputs
    assert isinstance(frozen._text_inputs(fitting=False), CachedStateInputs)
    frozen.fit(frame, frame["label"])
    assert isinstance(frozen._text_inputs(fitting=False), TokenInputs)
    assert frozen._torch_attributes == ("module_", "tokenizer_")


def test_fusion_freeze_encoder_trains_without_bert(tiny_model, frame):
    clf = fusion(tiny_model, freeze_encoder=True).fit(frame, frame["label"])
    assert clf.module_.encoder is None and clf.text_model_identity_
    assert [h["stage"] for h in clf.history_] == ["image", "frozen"]


@pytest.mark.parametrize(("n_threads", "valid"), [(None, True), (2, True), (-1, True), (0, False), (-2, False)])
def test_n_threads_accepts_none_a_count_or_all_cores(n_threads, valid):
    from sklearn.utils._param_validation import InvalidParameterError

    for clf in (BertClassifier(n_threads=n_threads), FusionClassifier(n_threads=n_threads)):
        if valid:
            clf._validate_params()
        else:
            with pytest.raises(InvalidParameterError, match="n_threads"):
                clf._validate_params()


# --- 0.2's clean break: the old ways are refused, with what to do instead ---------------------------------


def test_fusion_epochs_0_without_freeze_encoder_is_refused(tiny_model, frame):
    with pytest.raises(ValueError, match=r"epochs=0 with freeze_encoder=False .* set freeze_encoder=True"):
        fusion(tiny_model, epochs=0).fit(frame, frame["label"])
    assert fusion(tiny_model, epochs=0, freeze_encoder=True).fit(frame, frame["label"]).module_.encoder is None


def test_a_folder_saved_with_old_param_names_is_refused_naming_them(tiny_model, frame, tmp_path):
    clf = bert(tiny_model, freeze_encoder=True).fit(frame, frame["label"])
    folder = clf.save(tmp_path / "model")
    np.testing.assert_array_equal(BertClassifier.load(folder).predict_proba(frame), clf.predict_proba(frame))
    record = json.loads((folder / "estimator.json").read_text())
    record["params"]["num_threads"] = record["params"].pop("n_threads")  # as stackcat 0.1 saved it
    (folder / "estimator.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"saved with params \['num_threads'\] that BertClassifier no longer has"):
        BertClassifier.load(folder)


# --- the ground floor's label mapper and precision --------------------------------------------------


def test_label_positions_maps_and_names_unknown_labels():
    classes = np.array(["hats", "shoes"])
    assert label_positions(classes, pd.Series(["shoes", "hats", "shoes"])).tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="eval_set has labels absent.*'socks'"):
        label_positions(classes, ["socks", "hats"], what="eval_set")


def test_proba_for_classes_pads_and_rejects_an_unknown_class():
    assert proba_for_classes(np.array([[0.25, 0.75]]), ["c", "a"], ["a", "b", "c"]).tolist() == [[0.75, 0.0, 0.25]]
    with pytest.raises(ValueError, match="'z'"):
        proba_for_classes(np.array([[1.0]]), ["z"], ["a"])


def test_precision_options():
    cpu = torch.device("cpu")
    assert Precision(cpu).dtype is None and Precision(cpu, "fp32").dtype is None
    assert Precision(cpu, "bf16").dtype == torch.bfloat16 and Precision(cpu, "fp16").scaler is None
    with Precision(cpu, "bf16").autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision must be one of"):
        Precision(cpu, "fp8")
