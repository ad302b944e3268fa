"""Estimators declare their runtime params; the image head's new name keeps old runs' job keys."""

from __future__ import annotations

import importlib

import pytest
from sklearn.base import BaseEstimator

from stackcat.meta import AverageBlend, EnsembleSelection, MulticlassMeta, RerankMeta
from stackcat.models.bert import BertClassifier
from stackcat.models.fasttext import FastTextClassifier
from stackcat.models.fusion import FusionClassifier
from stackcat.models.image import ImageEmbeddingClassifier
from stackcat.models.lexical import TfidfClassifier
from stackcat.models.neighbours import NeighboursClassifier
from stackcat.presets import MODEL_NAMES, ModelOptions, build_models
from stackcat.runs import RUNTIME_PARAMS, digest, model_fingerprint, runtime_params

ESTIMATORS = [BertClassifier, FastTextClassifier, FusionClassifier, ImageEmbeddingClassifier, TfidfClassifier,
              NeighboursClassifier, AverageBlend, EnsembleSelection, MulticlassMeta, RerankMeta]


@pytest.mark.parametrize("cls", ESTIMATORS, ids=lambda cls: cls.__name__)
def test_declared_runtime_params_are_params_and_keep_the_old_ones(cls):
    params = set(cls().get_params(deep=False))
    declared = runtime_params(cls())
    assert declared <= params, f"{cls.__name__} declares params it does not have: {declared - params}"
    # what the shared list left out before stays out: the job keys of those params do not move
    assert params & RUNTIME_PARAMS <= declared


@pytest.mark.parametrize(("cls", "changes"), [
    (ImageEmbeddingClassifier, {"batch_size": 7, "device": "cpu", "n_jobs": 2, "cache_dir": "/x", "progress": False}),
    (FusionClassifier, {"image_batch_size": 7, "device": "cpu", "num_threads": 2, "predict_batch_size": 9}),
    (NeighboursClassifier, {"batch_size": 7, "device": "cpu", "cache_dir": "/x"}),
    (RerankMeta, {"thread_count": 2, "verbose": 1}),
])
def test_runtime_params_leave_the_fingerprint_alone(cls, changes):
    assert model_fingerprint(cls().set_params(**changes)) == model_fingerprint(cls())


@pytest.mark.parametrize(("cls", "param", "value"), [
    (ImageEmbeddingClassifier, "C", 3.0),
    (FusionClassifier, "image_epochs", 9),
    (FastTextClassifier, "thread", 3),  # lock-free threads change what FastText learns
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


def test_the_image_head_keeps_the_job_keys_of_its_old_name():
    model = ImageEmbeddingClassifier(C=2.0)
    kept = {k: v for k, v in model.get_params(deep=True).items() if k not in runtime_params(model)}
    assert model_fingerprint(model) == digest("stackcat.models.clip", "ClipImageClassifier",
                                              sorted(kept.items(), key=str))

    class Subclass(ImageEmbeddingClassifier):
        pass

    assert model_fingerprint(Subclass(C=2.0)) != model_fingerprint(model)  # another model, another key


def test_clip_is_an_alias_of_image_under_its_own_name():
    assert "image" in MODEL_NAMES
    models = build_models(["clip", "image"], ModelOptions(cache_dir="/cache"))
    assert [name for name, _ in models] == ["clip", "image"]
    assert all(type(model) is ImageEmbeddingClassifier for _, model in models)
    assert model_fingerprint(models[0][1]) == model_fingerprint(models[1][1])


@pytest.mark.parametrize("module", ["stackcat", "stackcat.models", "stackcat.models.clip"])
def test_the_old_class_name_warns_and_is_the_new_class(module):
    with pytest.warns(DeprecationWarning, match="ImageEmbeddingClassifier"):
        old = importlib.import_module(module).ClipImageClassifier
    assert old is ImageEmbeddingClassifier
