"""MetricSpaceClassifier: contract, a space where classes cluster, its signals in the stack, shared caches."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
from sklearn.utils._param_validation import InvalidParameterError

from stackcat.meta import RerankMeta
from stackcat.meta.retrieval import learned_space_signals
from stackcat.models.metric import MetricSpaceClassifier, class_prototypes
from stackcat.models.neighbours import NeighboursClassifier, l2_normalized
from stackcat.presets import ModelOptions, build_models
from stackcat.stacking import StackingCategorizer

from contract import check_fitted_contract, check_sklearn_contract
from tiny_bert import build_tiny_bert
from tiny_images import (
    CLASS_COLOURS,
    CountingEncoder,
    FailingEncoder,
    toy_image_dataset,
    write_noisy_jpeg,
)
from toy_models import NaiveBayesText

FAST = dict(dim=8, max_epochs=30, patience=5, learning_rate=1e-2, batch_size=16, progress=False, n_threads=1)
FAST_RERANK = dict(iterations=40, n_threads=1, early_stopping_rounds=None)


class NuisanceEncoder:
    """Image vectors where the class (the photo's colour) is a faint part of the cosine: 3 small
    mean-colour dimensions beside ``noise_dim`` loud ones drawn from a hash of the pixels."""

    name = "nuisance-stub/v1"

    def __init__(self, noise_dim: int = 16, signal_scale: float = 0.05) -> None:
        self.noise_dim = noise_dim
        self.signal_scale = signal_scale

    def encode(self, images):
        rows = []
        for image in images:
            seed = int.from_bytes(hashlib.sha256(image.tobytes()).digest()[:8], "little")
            noise = np.random.default_rng(seed).normal(size=self.noise_dim)
            colour = np.asarray(image, dtype=np.float32).mean(axis=(0, 1)) / 255.0
            rows.append(np.concatenate([self.signal_scale * colour, noise]))
        return np.asarray(rows, dtype=np.float32)


def coloured_photos(folder, per_class: int, seed: int = 0) -> tuple[list[str], list[str]]:
    paths, labels = [], []
    for k in range(per_class):
        for j, (label, colour) in enumerate(CLASS_COLOURS.items()):
            paths.append(str(write_noisy_jpeg(folder / f"{label}_{seed}_{k}.jpg", colour, seed=1000 * seed + 10 * k + j)))
            labels.append(label)
    return paths, labels


def cluster_gap(vectors: np.ndarray, labels) -> float:
    """Mean cosine of two products of one class minus that of two products of different classes."""
    unit = l2_normalized(vectors)
    cosines = unit @ unit.T
    same = np.equal.outer(np.asarray(labels), np.asarray(labels))
    off_diagonal = ~np.eye(len(unit), dtype=bool)
    return float(cosines[same & off_diagonal].mean() - cosines[~same].mean())


def image_space(**params) -> MetricSpaceClassifier:
    return MetricSpaceClassifier(**{"source": "image", "encoder": CountingEncoder(), **FAST, **params})


@pytest.fixture
def toy_images(tmp_path):
    return toy_image_dataset(tmp_path / "images", per_class=8)


# --- the estimator --------------------------------------------------------------------------


def test_sklearn_checks_that_apply():
    check_sklearn_contract(MetricSpaceClassifier())


@pytest.mark.parametrize("labels", [None, [10, 20, 30]])
def test_contract_on_images(toy_images, tmp_path, labels):
    paths, y = toy_images
    if labels is not None:
        y = [labels[sorted(set(y)).index(v)] for v in y]
    space = image_space(image_column="photo")
    new = pd.DataFrame({"photo": paths[:4] + [None, str(tmp_path / "gone.jpg")]})
    proba = check_fitted_contract(space, pd.DataFrame({"photo": paths}), y, new)
    np.testing.assert_allclose(proba[4:], np.tile(space.class_prior_, (2, 1)))  # no photo: the prior
    assert (space.predict(pd.DataFrame({"photo": paths})) == np.asarray(y)).mean() > 0.9
    projected = space.project(new)
    np.testing.assert_allclose(np.linalg.norm(projected[:4], axis=1), 1.0, atol=1e-5)
    assert not projected[4:].any()


def test_products_of_one_class_are_closer_after_training(tmp_path):
    encoder = NuisanceEncoder()
    train_paths, train_y = coloured_photos(tmp_path / "train", per_class=20)
    new_paths, new_y = coloured_photos(tmp_path / "new", per_class=10, seed=1)
    frozen = NeighboursClassifier(source="image", encoder=encoder, progress=False).embed(new_paths)
    space = MetricSpaceClassifier(source="image", encoder=encoder, **FAST).fit(train_paths, train_y)
    before, after = cluster_gap(frozen, new_y), cluster_gap(space.project(new_paths), new_y)
    assert before < 0.05, "the frozen space hides the classes in its noise"
    assert after > before + 0.5
    assert (space.predict(new_paths) == np.asarray(new_y)).mean() > 0.9


def test_prototypes_and_temperature_are_learned(toy_images):
    paths, y = toy_images
    space = image_space(neighbour_weight=0.0).fit(paths, y)
    n_classes = len(space.classes_)
    assert space.prototypes_.shape == (n_classes, space.dim)
    np.testing.assert_allclose(np.linalg.norm(space.prototypes_, axis=1), 1.0, atol=1e-5)
    expected = class_prototypes(space.project(paths), np.searchsorted(space.classes_, y), n_classes)
    np.testing.assert_allclose(space.prototypes_, expected, atol=2e-3)  # index_ is float16
    assert 0.0 < space.temperature_ < 10.0 and space.neighbour_weight_ == 0.0
    cosines = space.project(paths[:3]) @ space.prototypes_.T
    logits = cosines / space.temperature_
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    expected_proba = (1 - space.smoothing) * softmax / softmax.sum(1, keepdims=True) + space.smoothing * space.class_prior_
    np.testing.assert_allclose(space.predict_proba(paths[:3]), expected_proba, atol=1e-5)
    assert 1 <= space.best_epoch_ <= space.n_epochs_ <= space.max_epochs
    assert space.index_.dtype == np.float16 and len(space.index_) == len(paths)


def test_neighbour_weight_auto_picks_one_of_the_blends(toy_images):
    paths, y = toy_images
    space = image_space().fit(paths, y)
    assert space.neighbour_weight_ in (0.0, 0.25, 0.5, 0.75)


def test_same_seed_same_space(toy_images):
    paths, y = toy_images
    first, second = image_space().fit(paths, y), image_space().fit(paths, y)
    np.testing.assert_array_equal(first.project(paths), second.project(paths))


@pytest.mark.parametrize("params, match", [
    ({"source": "audio"}, "source"), ({"dim": 1}, "dim"), ({"margin": 1.0}, "margin"),
    ({"neighbour_weight": 1.5}, "neighbour_weight"), ({"validation_fraction": 1.0}, "validation_fraction"),
    ({"scale": 0}, "scale"), ({"max_epochs": 0}, "max_epochs"),
])
def test_bad_params_are_refused_in_fit_before_any_encoding(toy_images, params, match):
    paths, y = toy_images
    space = MetricSpaceClassifier(**{"source": "image", "encoder": FailingEncoder(), "progress": False, **params})
    with pytest.raises(InvalidParameterError, match=match):
        space.fit(paths, y)


def test_no_usable_photo_is_a_clear_error(tmp_path):
    space = image_space(image_column="photo")
    with pytest.raises(ValueError, match="none of the 4 training rows has a usable image in column 'photo'"):
        space.fit(pd.DataFrame({"photo": [None, str(tmp_path / "gone.jpg")] * 2}), ["a", "b"] * 2)


@pytest.mark.slow  # builds a tiny BERT checkpoint
def test_text_and_image_side_by_side_with_a_has_image_flag(toy_images, tmp_path):
    paths, y = toy_images
    texts = [f"{label} item {i}" for i, label in enumerate(y)]
    tiny = str(build_tiny_bert(tmp_path / "tiny-bert", texts))
    frame = pd.DataFrame({"text": texts, "image_path": [p if i % 4 else None for i, p in enumerate(paths)]})
    space = MetricSpaceClassifier(source="both", model_name=tiny, max_length=16, encoder=CountingEncoder(), **FAST)
    check_fitted_contract(space, frame, y, frame.head(6))
    text_dim = NeighboursClassifier(model_name=tiny, max_length=16, progress=False).embed(texts[:1]).shape[1]
    assert space.n_input_features_ == text_dim + CountingEncoder().dim + 1
    assert len(space.index_) == len(frame), "a product without a photo still has a place in the space"
    assert space.file_columns() == ["image_path"]


def test_presets_build_it_on_the_shared_caches(tmp_path):
    options = ModelOptions(cache_dir=str(tmp_path), text_prefix="passage: ", max_length=48)
    models = dict(build_models(["metric", "knn_text", "knn_image"], options))
    metric = models["metric"]
    assert isinstance(metric, MetricSpaceClassifier) and metric.source == "both"
    assert metric.text_cache_dir == models["knn_text"].text_cache_dir == str(tmp_path)
    assert metric.image_cache_dir == models["knn_image"].image_cache_dir == str(tmp_path)
    assert (metric.model_name, metric.text_prefix, metric.max_length) == (
        models["knn_text"].model_name, "passage: ", 48)
    assert metric.encoder == models["knn_image"].encoder


# --- in the stack ---------------------------------------------------------------------------


def test_photos_are_encoded_once_for_the_knn_and_metric_members(toy_images, tmp_path):
    paths, y = toy_images
    encoder = CountingEncoder()
    cache = str(tmp_path / "cache")
    members = [("knn_image", NeighboursClassifier(source="image", encoder=encoder, image_cache_dir=cache,
                                                  progress=False)),
               ("metric", image_space(encoder=encoder, image_cache_dir=cache))]
    stack = StackingCategorizer(members, meta="average", n_splits=3, progress=False, verbose=0)
    X = pd.DataFrame({"text": ["-"] * len(paths), "image_path": paths})  # knn_image's preflight wants a text column
    stack.fit(X, y)
    stack.predict_proba(X.head(5))
    assert encoder.max_encodings_per_image == 1
    assert len(encoder.encoded) == len(set(paths))


def unique_photos(folder, n_rows: int) -> list[str]:
    """A distinct photo per row (all the same colour): only a leak could tie one to its label."""
    return [str(write_noisy_jpeg(folder / f"{i}.jpg", (120, 120, 120), seed=i, size=(8, 8))) for i in range(n_rows)]


def test_leakage_guard_shuffled_labels_stay_at_chance_with_the_learned_space(tmp_path):
    """Labels that mean nothing, and a space that can memorize every row (a unique random vector per
    photo): signals from a projection that saw the row's label would find it; the OOF ones must not."""
    n_classes, n_rows = 6, 180
    rng = np.random.default_rng(1)
    X = pd.DataFrame({"text": [" ".join(f"n{rng.integers(40)}" for _ in range(3)) for _ in range(n_rows)],
                      "image_path": unique_photos(tmp_path / "photos", n_rows)})
    y = np.array([f"c{k}" for k in rng.permutation(np.arange(n_rows) % n_classes)], dtype=object)
    space = MetricSpaceClassifier(source="image", encoder=NuisanceEncoder(noise_dim=32), dim=16, max_epochs=60,
                                  patience=60, learning_rate=3e-2, batch_size=32, validation_fraction=0.1,
                                  progress=False, n_threads=1)
    stack = StackingCategorizer([("nb", NaiveBayesText()), ("metric", space)], meta=RerankMeta(**FAST_RERANK),
                                n_splits=3, progress=False, verbose=0, category_names=None).fit(X, y)
    learned = [name for name in stack.meta_.signal_names_ if name.startswith("metric:")]
    assert learned == ["metric:centroid", "metric:knn_share", "metric:nearest"]
    chance = 1 / n_classes
    assert (stack.meta_oof_.argmax(1) == stack.oof_target_).mean() < chance + 0.1
    for name in learned:
        assert (np.asarray(stack.meta_inputs_["signals"][name]).argmax(1) == stack.oof_target_).mean() < chance + 0.1
    # the same signals from a model that saw the rows' labels find them: the guard above can fail
    fold_model = stack._model(stack.fold_models_["metric"][0])
    seen = np.flatnonzero(stack.fold_of_row_ != 0)
    in_sample = learned_space_signals(fold_model, X.iloc[seen], stack.classes_)
    assert (in_sample["nearest"].argmax(1) == stack.oof_target_[seen]).mean() > 0.9


def test_learned_signals_come_back_from_the_run_folder_and_predict(toy_images, tmp_path):
    paths, y = toy_images
    X = pd.DataFrame({"text": [f"item {label}" for label in y], "image_path": paths})
    encoder = CountingEncoder()  # one encoder: its identity is part of the job keys

    def fit():
        return StackingCategorizer([("nb", NaiveBayesText()), ("metric", image_space(encoder=encoder))],
                                   meta=RerankMeta(**FAST_RERANK), n_splits=3, run_dir=tmp_path / "run",
                                   progress=False, verbose=0, category_names=None).fit(X, y)

    first = fit()
    second = fit()
    assert second.jobs_["from_run_folder"].all()
    for name in ("metric:centroid", "metric:knn_share", "metric:nearest"):
        np.testing.assert_array_equal(first.meta_inputs_["signals"][name], second.meta_inputs_["signals"][name])
    np.testing.assert_allclose(second.predict_proba(X.head(4)), first.predict_proba(X.head(4)), atol=1e-6)
    without = StackingCategorizer([("nb", NaiveBayesText()), ("metric", image_space())], meta=RerankMeta(**FAST_RERANK),
                                  n_splits=3, retrieval=False, progress=False, verbose=0).fit(X, y)
    assert not without.meta_.signal_names_


@pytest.mark.slow
def test_bundle_round_trip(tmp_path):
    from test_bundle import fit_predictor

    from stackcat.bundle import load_bundle
    from stackcat.models.lexical import TfidfClassifier

    from toy_models import toy_table

    tiny = str(build_tiny_bert(tmp_path / "tiny-bert", toy_table()[0]["text"]))
    space = MetricSpaceClassifier(source="text", model_name=tiny, max_length=16, **FAST)
    lexical = TfidfClassifier(max_iter=50)  # a bundle holds stackcat's own members only
    predictor, X = fit_predictor([("lexical", lexical), ("metric", space)], meta=RerankMeta(**FAST_RERANK))
    loaded = load_bundle(predictor.save(tmp_path / "model"))
    assert isinstance(loaded.stack.fold_models_["metric"][0], MetricSpaceClassifier)
    assert any(name.startswith("metric:") for name in loaded.stack.meta_.signal_names_)
    before, after = predictor.stack.predict_results(X), loaded.stack.predict_results(X)
    for name in before:
        assert np.abs(np.asarray(before[name]) - np.asarray(after[name])).max() <= 1e-6, name
