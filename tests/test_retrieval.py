"""Retrieval signals, the meta-learners that use them, and choosing the meta-learner."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.base import BaseEstimator

from stackcat.meta import (
    AverageBlend,
    EnsembleSelection,
    RerankMeta,
    build_candidates,
    candidate_feature_names,
)
from stackcat.meta.retrieval import NeighbourIndex, name_signal, oof_signals
from stackcat.stacking import StackingCategorizer, choose_meta
from stackcat.taxonomy import CategoryTree

from toy_models import BagOfWordsEmbedder, LookupProba, NaiveBayesText, toy_table

FAST_RERANK = dict(iterations=40, n_threads=1, early_stopping_rounds=None)


def test_neighbour_index_matches_brute_force():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(50, 6)).astype(np.float32)
    y = rng.integers(0, 5, 50)
    queries = rng.normal(size=(7, 6)).astype(np.float32)
    signals = NeighbourIndex(reference, y, 6, k=4, temperature=0.1).signals(queries)
    unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)  # noqa: E731
    cos = unit(queries) @ unit(reference).T
    for c in range(5):
        np.testing.assert_allclose(signals["nearest"][:, c], cos[:, y == c].max(axis=1), rtol=1e-5)
        centroid = unit(reference)[y == c].mean(axis=0)
        np.testing.assert_allclose(signals["centroid"][:, c], unit(queries) @ (centroid / np.linalg.norm(centroid)),
                                   rtol=1e-4, atol=1e-6)
    assert (signals["nearest"][:, 5] == -1).all()  # a class with no reference row
    top = np.argsort(-cos, axis=1)[:, :4]
    weights = np.exp((np.take_along_axis(cos, top, 1) - cos.max(1, keepdims=True)) / 0.1)
    expected = np.zeros((7, 6))
    for row in range(7):
        np.add.at(expected[row], y[top[row]], weights[row])
    np.testing.assert_allclose(signals["knn_share"], expected / expected.sum(1, keepdims=True), rtol=1e-4)


def test_oof_signals_never_see_the_rows_own_fold():
    # every row is its own class's only member in its fold: with its own fold visible it would find itself
    emb = np.eye(10, dtype=np.float32)
    y = np.arange(10) % 5
    folds = np.arange(10) // 5  # class c has one row in each fold
    signals = oof_signals({"v": emb}, y, 5, folds, k=1)
    assert (signals["v:nearest"] < 0.5).all()  # identity rows: only self-matches would score 1


def test_products_without_the_view_get_no_evidence():
    emb = np.array([[1, 0], [0, 1], [0, 0]], dtype=np.float32)
    signals = NeighbourIndex(emb[:2], np.array([0, 1]), 2).signals(emb)
    assert all((matrix[2] == 0).all() for matrix in signals.values())


def test_name_signal_is_cosine():
    products = np.array([[1, 0], [0, 2]], dtype=np.float32)
    names = np.array([[1, 1], [0, 1]], dtype=np.float32)
    np.testing.assert_allclose(name_signal(products, names), [[2 ** -0.5, 0], [2 ** -0.5, 1]], rtol=1e-6)


def test_signal_candidates_let_a_class_no_model_ranks_be_chosen():
    matrices = [np.array([[0.7, 0.3, 0.0, 0.0]], dtype=np.float32)]
    knn = np.array([[0.0, 0.0, 0.0, 1.0]], dtype=np.float32)
    without = build_candidates(matrices, 1, np.zeros(4, np.float32))
    assert without.label.tolist() == [0]
    with_signal = build_candidates(matrices, 1, np.zeros(4, np.float32), signals=[knn], candidate_signals=[0])
    assert with_signal.label.tolist() == [0, 3]
    names = candidate_feature_names(["m"], ["knn:knn_share"])
    assert with_signal.features.shape[1] == len(names)
    assert with_signal.features[1, names.index("knn:knn_share:value")] == 1.0


def test_hierarchy_features_sum_the_parents_mass():
    tree = CategoryTree.from_paths(["A > x", "A > y", "B > z"])
    matrices = [np.array([[0.4, 0.35, 0.25]], dtype=np.float32)]
    candidates = build_candidates(matrices, 3, np.zeros(3, np.float32), ancestors=tree.ancestors,
                                  hierarchy_levels=1)
    names = candidate_feature_names(["m"], [], 1)
    mass = candidates.features[:, names.index("m:mass_up1")]
    np.testing.assert_allclose(mass, [0.75, 0.75, 0.25], rtol=1e-6)
    np.testing.assert_array_equal(candidates.features[:, names.index("under_top_up1")], [1, 1, 0])


def test_ensemble_selection_drops_a_useless_model_and_calibrates():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 400)
    good = np.eye(5)[y] * 300 + rng.random((400, 5))  # right and over-confident
    good[:60] = np.eye(5)[(y[:60] + 1) % 5] * 300 + rng.random((60, 5))
    noise = rng.random((400, 5))
    probas = {"good": good / good.sum(1, keepdims=True), "noise": noise / noise.sum(1, keepdims=True)}
    selection = EnsembleSelection(n_iterations=20).fit(probas, y)
    assert selection.weights_[0] > 0.9
    assert selection.temperatures_[0] > 1.5  # over-confident: softened
    assert selection.trajectory_[-1] <= selection.trajectory_[0]
    uncalibrated = EnsembleSelection(n_iterations=20, calibrate=False).fit(probas, y)
    assert selection.trajectory_[-1] < uncalibrated.trajectory_[-1]


def disagreeing_members(n_per_class=30, n_classes=8):
    """Two members, each right on half the classes and confidently wrong (a sibling) on the other half.

    The plain average ties between the two answers; a learned meta can learn which member to trust
    for which class.
    """
    half = n_classes // 2
    y = np.repeat(np.arange(n_classes), n_per_class)
    ids = np.arange(len(y))
    rng = np.random.default_rng(0)
    a, b = {}, {}
    for i, c in zip(ids, y, strict=True):
        wrong = (c + 1) % half + (c // half) * half
        row_a, row_b = np.full(n_classes, 0.01), np.full(n_classes, 0.01)
        row_a[c if c < half else wrong] = 0.9 + 0.05 * rng.random()
        row_b[c if c >= half else wrong] = 0.9 + 0.05 * rng.random()
        a[i], b[i] = row_a / row_a.sum(), row_b / row_b.sum()
    classes = [f"c{k}" for k in range(n_classes)]
    frame = pd.DataFrame({"id": ids})
    members = [("a", LookupProba(a, classes)), ("b", LookupProba(b, classes))]
    return frame, np.array(classes, dtype=object)[y], members


def test_auto_ships_the_learned_meta_when_it_is_better():
    X, y, members = disagreeing_members()
    stack = StackingCategorizer(members, meta=["average", "ensemble", RerankMeta(**FAST_RERANK)], n_splits=3,
                                progress=False, verbose=0).fit(X, y)
    table = stack.meta_selection_
    assert table.loc["RerankMeta", "chosen"]
    assert table.loc["RerankMeta", "accuracy"] > table.loc["AverageBlend", "accuracy"] + 0.3
    assert isinstance(stack.meta_, RerankMeta)
    assert list(stack.oof_results())[-1] == "meta:RerankMeta"  # the headline of the report


class ShiftedMeta(BaseEstimator):
    """A deliberately bad meta-learner: the average blend's answer moved one class over."""

    def fit(self, probas, y):
        self.n_classes_ = next(iter(probas.values())).shape[1]
        return self

    def predict_proba(self, probas):
        return np.roll(np.mean(list(probas.values()), axis=0), 1, axis=1)


def test_auto_ships_the_average_when_the_learned_meta_is_worse():
    X, y = toy_table(n_per_class=15)
    stack = StackingCategorizer([("nb", NaiveBayesText()), ("nb5", NaiveBayesText(alpha=5.0))],
                                meta=["average", ShiftedMeta()], n_splits=3, progress=False, verbose=0).fit(X, y)
    assert stack.meta_selection_["chosen"].tolist() == [True, False]
    assert isinstance(stack.meta_, AverageBlend)
    np.testing.assert_allclose(stack.predict_proba(X), np.mean(list(stack.predict_base_proba(X).values()), 0),
                               rtol=1e-5)


def test_choose_meta_prefers_the_simpler_on_ties():
    y = np.array([0, 1, 1])
    proba = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    choice, table = choose_meta({"AverageBlend": proba, "RerankMeta": proba}, y)
    assert choice == "AverageBlend" and table["errors"].tolist() == [1, 1]


def test_leakage_guard_shuffled_labels_stay_at_chance(tmp_path):
    """With labels that mean nothing, a retrieval feature that saw its own row would find it (every
    text is unique to its row) and the stack would score far above chance."""
    n_classes, n_rows = 6, 180
    rng = np.random.default_rng(1)
    X = pd.DataFrame({"id": np.arange(n_rows),
                      "text": [f"u{i} u{i}x {' '.join(f'n{rng.integers(40)}' for _ in range(3))}"
                               for i in range(n_rows)]})
    y = np.array([f"c{k}" for k in rng.permutation(np.arange(n_rows) % n_classes)], dtype=object)
    stack = StackingCategorizer([("nb", NaiveBayesText()), ("emb", BagOfWordsEmbedder(dim=512))],
                                meta=RerankMeta(**FAST_RERANK), n_splits=3, progress=False, verbose=0,
                                category_names=None).fit(X, y)
    assert any(name.startswith("emb:") for name in stack.meta_.signal_names_)
    accuracy = (stack.meta_oof_.argmax(1) == stack.oof_target_).mean()
    assert accuracy < 1 / n_classes + 0.1
    # signals that see the row itself (scoring the training rows) lift the same meta far above chance:
    # the guard above can fail
    in_sample = (stack.meta_.predict_proba(stack.oof_, signals={
        k: v for k, v in stack._predict_signals(X).items()}).argmax(1) == stack.oof_target_).mean()
    assert in_sample > 1 / n_classes + 0.3


def test_retrieval_and_name_signals_reach_the_meta_and_predict(tmp_path):
    X, y = toy_table(n_per_class=12, n_classes=4)
    calls = tmp_path / "calls"
    calls.mkdir()
    stack = StackingCategorizer([("nb", NaiveBayesText()), ("emb", BagOfWordsEmbedder(calls_dir=str(calls)))],
                                meta=RerankMeta(**FAST_RERANK), n_splits=3, progress=False, verbose=0).fit(X, y)
    assert stack.meta_.signal_names_ == ["emb:centroid", "emb:knn_share", "emb:nearest", "name:emb"]
    proba = stack.predict_proba(X.iloc[:5])
    assert proba.shape == (5, 4)
    np.testing.assert_allclose(proba.sum(1), 1, atol=1e-6)
    with pytest.raises(ValueError, match="missing"):
        stack.meta_.predict_proba({k: v[:5] for k, v in stack.oof_.items()})


def test_tree_from_path_labels_gives_hierarchy_features():
    X, y = toy_table(n_per_class=12, n_classes=4)
    paths = np.array([f"{'A' if label < 'class 2' else 'B'} > {label}" for label in y], dtype=object)
    stack = StackingCategorizer([("nb", NaiveBayesText()), ("nb5", NaiveBayesText(alpha=5.0))],
                                meta=RerankMeta(**FAST_RERANK), n_splits=3, progress=False, verbose=0,
                                label_separator=" > ").fit(X, paths)
    assert stack.tree_.depth == 2
    assert "nb:mass_up1" in stack.meta_.feature_names_
    assert stack.predict_proba(X.iloc[:3]).shape == (3, 4)
