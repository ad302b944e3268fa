"""Top-k probability matrices: the helpers, and a stack that keeps its OOF as top-k."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse

from stackcat.meta import AverageBlend, EnsembleSelection, RerankMeta
from stackcat.metrics import comparison_table
from stackcat.stacking import StackingCategorizer
from stackcat.topk import dense_rows, put_rows, rank_of, row_argmax, row_max, top_k_rows, values_at

from toy_models import NaiveBayesText, toy_table


@pytest.fixture
def proba():
    rng = np.random.default_rng(0)
    p = rng.random((60, 9))
    return p / p.sum(axis=1, keepdims=True)


def test_top_k_rows_keep_the_largest_entries(proba):
    top = top_k_rows(proba, 3)
    assert sparse.issparse(top) and (np.diff(top.indptr) == 3).all()
    expected = np.sort(proba, axis=1)[:, ::-1][:, :3]
    np.testing.assert_allclose(np.sort(top.toarray(), axis=1)[:, ::-1][:, :3], expected, rtol=1e-6)
    np.testing.assert_array_equal(row_argmax(top), proba.argmax(axis=1))
    np.testing.assert_allclose(row_max(top), proba.max(axis=1), rtol=1e-6)


def test_dense_rows_spread_the_missing_mass(proba):
    dense = dense_rows(top_k_rows(proba, 3), slice(None))
    np.testing.assert_allclose(dense.sum(axis=1), 1.0, rtol=1e-5)
    assert dense.argmax(axis=1).tolist() == proba.argmax(axis=1).tolist()


def test_rank_of_matches_the_dense_rank_inside_the_top_k(proba):
    y = np.random.default_rng(1).integers(0, 9, 60)
    dense_rank = rank_of(proba, y)
    top_rank = rank_of(top_k_rows(proba, 4), y)
    inside = dense_rank < 4
    np.testing.assert_array_equal(top_rank[inside], dense_rank[inside])
    assert (top_rank[~inside] == 4).all()  # unstored: after every stored entry
    np.testing.assert_allclose(values_at(top_k_rows(proba, 9), y), proba[np.arange(60), y], rtol=1e-6)


def test_put_rows_reassembles_blocks_in_row_order(proba):
    top = top_k_rows(proba, 2)
    parts = [(np.arange(1, 60, 2), top[1::2]), (np.arange(0, 60, 2), top[0::2])]
    np.testing.assert_allclose(put_rows(parts, 60, 9).toarray(), top.toarray())


def test_full_top_k_scores_like_dense(proba):
    y = np.random.default_rng(2).integers(0, 9, 60)
    dense = comparison_table({"m": proba}, y)
    full = comparison_table({"m": top_k_rows(proba, 9)}, y)
    np.testing.assert_allclose(full.to_numpy(dtype=float), dense.to_numpy(dtype=float), rtol=1e-6)


@pytest.mark.parametrize("meta", [AverageBlend(), EnsembleSelection(n_iterations=5),
                                  RerankMeta(iterations=20, n_threads=1, early_stopping_rounds=None)])
def test_meta_learners_take_and_give_top_k(proba, meta):
    y = proba.argmax(axis=1)
    probas = {"a": top_k_rows(proba, 3), "b": top_k_rows(proba[::-1].copy(), 3)}
    out = meta.fit(probas, y).predict_proba(probas)
    assert sparse.issparse(out) and out.shape == (60, 9)
    np.testing.assert_allclose(np.asarray(out.sum(axis=1)).ravel(), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_a_stack_keeps_top_k_oof_resumes_and_predicts(tmp_path):
    X, y = toy_table(n_per_class=12, n_classes=6)
    params = dict(meta="auto", n_splits=3, progress=False, verbose=0, oof_top_k=2, run_dir=tmp_path / "run")
    members = [("nb", NaiveBayesText()), ("nb5", NaiveBayesText(alpha=5.0))]
    stack = StackingCategorizer(members, **params).fit(X, y)
    assert stack.oof_top_k_ == 2
    for matrix in stack.oof_.values():
        assert sparse.issparse(matrix) and np.diff(matrix.indptr).max() <= 2
    proba = stack.predict_proba(X.iloc[:7])
    assert proba.shape == (7, 6)
    assert np.asarray(proba.sum(axis=1)).ravel() == pytest.approx(1.0, rel=1e-5)
    assert list(stack.oof_scores_.index)[:3] == ["nb", "nb5", "average"]
    again = StackingCategorizer(members, **params).fit(X, y)  # every job from the run folder
    assert again.jobs_["from_run_folder"].all()
    np.testing.assert_allclose(again.oof_["nb"].toarray(), stack.oof_["nb"].toarray())


def test_auto_keeps_dense_oof_for_few_classes():
    X, y = toy_table(n_per_class=8, n_classes=3)
    stack = StackingCategorizer([("nb", NaiveBayesText())], meta="average", n_splits=2, progress=False,
                                verbose=0).fit(X, y)
    assert stack.oof_top_k_ is None and isinstance(stack.oof_["nb"], np.ndarray)


@pytest.mark.slow
def test_cli_fit_predict_evaluate_on_top_k(tmp_path):
    """The whole CLI path (report, review queue, top-5 columns) on top-k probabilities."""
    import shutil
    from pathlib import Path

    import pandas as pd

    from stackcat.cli import EXIT_OK, EXIT_USAGE, main

    train = tmp_path / "ke.csv"
    shutil.copy(Path(__file__).parent / "data" / "ke_products.csv", train)
    run_dir = tmp_path / "run"
    fast = ["--models", "fasttext", "--folds", "3", "--no-progress", "--param", "fasttext__n_threads=1",
            "--param", "fasttext__dim=16"]
    assert main(["fit", str(train), "--run-dir", str(run_dir), "--oof-top-k", "2", *fast]) == EXIT_OK
    assert (run_dir / "report.md").exists()
    out = tmp_path / "preds.csv"
    test = tmp_path / "test.csv"
    pd.read_csv(train, dtype=str).drop(columns="category_id").to_csv(test, index=False)
    assert main(["predict", str(run_dir), str(test), "--out", str(out)]) == EXIT_OK
    predictions = pd.read_csv(out)
    assert len(predictions) > 0 and "review" in predictions.columns
    assert main(["evaluate", str(run_dir), str(train)]) == EXIT_OK
    assert main(["fit", str(train), "--run-dir", str(tmp_path / "bad"), "--oof-top-k", "0", *fast]) == EXIT_USAGE
