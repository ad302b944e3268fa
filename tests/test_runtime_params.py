"""Estimators declare their runtime params; they stay out of the job keys, learning params do not."""

from __future__ import annotations

import pytest
from sklearn.base import BaseEstimator

from stackcat.meta import AverageBlend, EnsembleSelection, MulticlassMeta, RerankMeta
from stackcat.models.bert import BertClassifier
from stackcat.models.fasttext import FastTextClassifier
from stackcat.models.fusion import FusionClassifier
from stackcat.models.heads import TorchHeadClassifier
from stackcat.models.image import ImageEmbeddingClassifier
from stackcat.models.lexical import TfidfClassifier
from stackcat.models.neighbours import NeighboursClassifier
from stackcat.presets import MODEL_NAMES, ModelOptions, build_models
from stackcat.runs import RUNTIME_PARAMS, model_fingerprint, runtime_params

ESTIMATORS = [BertClassifier, FastTextClassifier, FusionClassifier, ImageEmbeddingClassifier, TfidfClassifier,
              NeighboursClassifier, TorchHeadClassifier, AverageBlend, EnsembleSelection, MulticlassMeta, RerankMeta]


@pytest.mark.parametrize("cls", ESTIMATORS, ids=lambda cls: cls.__name__)
def test_declared_runtime_params_are_params_and_keep_the_old_ones(cls):
    params = set(cls().get_params(deep=False))
    declared = runtime_params(cls())
    assert declared <= params, f"{cls.__name__} declares params it does not have: {declared - params}"
    # what the shared list left out before stays out: the job keys of those params do not move
    assert params & RUNTIME_PARAMS <= declared


@pytest.mark.parametrize(("cls", "changes"), [
    (ImageEmbeddingClassifier, {"encode_batch_size": 7, "n_threads": 2, "image_cache_dir": "/x", "progress": False}),
    (FusionClassifier, {"encode_batch_size": 7, "device": "cpu", "n_threads": 2, "text_cache_dir": "/x"}),
    (BertClassifier, {"encode_batch_size": 7, "n_threads": 2, "text_cache_dir": "/x", "progress": False}),
    (NeighboursClassifier, {"text_cache_dir": "/x", "image_cache_dir": "/y", "encode_batch_size": 9,
                            "progress": False}),
    (RerankMeta, {"n_threads": 2, "verbose": 1}),
    (MulticlassMeta, {"n_threads": 2}),
])
def test_runtime_params_leave_the_fingerprint_alone(cls, changes):
    assert model_fingerprint(cls().set_params(**changes)) == model_fingerprint(cls())


@pytest.mark.parametrize(("cls", "param", "value"), [
    (ImageEmbeddingClassifier, "C", 3.0),
    (FusionClassifier, "image_epochs", 9),
    (FastTextClassifier, "n_threads", 3),  # lock-free threads change what FastText learns
    (BertClassifier, "device", "cpu"),  # CUDA trains in bf16 / fp16
    (TfidfClassifier, "max_iter", 7),
])
def test_learning_params_change_the_fingerprint(cls, param, value):
    assert model_fingerprint(cls().set_params(**{param: value})) != model_fingerprint(cls())


class Undeclared(BaseEstimator):
    def __init__(self, alpha=1.0, verbose=0, batch_size=8):
        self.alpha = alpha
        self.verbose = verbose
        self.batch_size = batch_size


def test_an_estimator_that_declares_nothing_gets_the_shared_list():
    assert runtime_params(Undeclared()) == RUNTIME_PARAMS
    assert model_fingerprint(Undeclared(verbose=3)) == model_fingerprint(Undeclared())
    assert model_fingerprint(Undeclared(batch_size=3)) != model_fingerprint(Undeclared())


def test_the_image_head_has_one_name():
    assert "image" in MODEL_NAMES and "clip" not in MODEL_NAMES
    assert type(build_models(["image"], ModelOptions(cache_dir="/cache"))[0][1]) is ImageEmbeddingClassifier
    with pytest.raises(ValueError, match=r"unknown model\(s\) \['clip'\]"):
        build_models(["clip"])


@pytest.mark.slow
def test_a_run_fitted_with_models_image_resumes_and_predicts(tmp_path, capsys):
    from stackcat.cli import EXIT_OK, main

    from tiny_images import tiny_open_clip_dir, write_image
    from toy_models import toy_table

    X, y = toy_table(n_per_class=6)
    colours = {label: (60 * i, 200 - 40 * i, 90) for i, label in enumerate(sorted(set(y)))}
    X["image"] = [write_image(tmp_path / "images" / f"{i}.png", colour=colours[label]).name
                  for i, label in enumerate(y)]
    X["label"] = y
    X.to_csv(tmp_path / "train.csv", index=False)
    encoder = f"local-dir:{tiny_open_clip_dir(tmp_path / 'vit')}"
    fit = ["fit", str(tmp_path / "train.csv"), "--run-dir", str(tmp_path / "run"), "--text-columns", "text",
           "--target", "label", "--id-column", "id", "--image-column", "image", "--image-dir", "images",
           "--models", "image", "--image-encoder", encoder, "--device", "cpu", "--folds", "3",
           "--meta", "average", "--no-progress"]
    assert main(fit) == EXIT_OK
    capsys.readouterr()
    assert main([*fit, "--resume"]) == EXIT_OK
    assert "3 of 3 jobs already done" in capsys.readouterr().out
    out = tmp_path / "predictions.csv"
    assert main(["predict", str(tmp_path / "run"), str(tmp_path / "train.csv"), "--out", str(out)]) == EXIT_OK
    assert len(out.read_text().splitlines()) == len(X) + 1
