from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import BaseEstimator, clone

from stackcat.runs import RunFolder, RunFolderError
from stackcat.stacking import StackingCategorizer, make_folds

from toy_models import NaiveBayesText, toy_table

TESTS_DIR = Path(__file__).parent


def stack_of(estimators, **params):
    defaults = dict(meta="average", n_splits=3, random_state=0, progress=False, verbose=0)
    return StackingCategorizer(estimators, **{**defaults, **params})


def fits_in(calls_dir):
    return len(list(Path(calls_dir).glob("fit-*")))


def test_no_oof_row_is_predicted_by_a_model_that_trained_on_it():
    X, y = toy_table(n_per_class=10, rare=(1, 2))
    stack = stack_of([("nb", NaiveBayesText(check_no_leak=True))], n_splits=4).fit(X, y)
    assert set(np.unique(stack.fold_of_row_)) == {0, 1, 2, 3}
    jobs = stack.jobs_
    assert (jobs["train_rows"] + jobs["oof_rows"] == len(X)).all()
    assert jobs["oof_rows"].sum() == len(X)


def test_rare_classes_are_kept_and_reported():
    X, y = toy_table(n_per_class=10, rare=(1, 2))
    stack = stack_of([("nb", NaiveBayesText())], n_splits=4).fit(X, y)
    assert set(stack.rare_classes_) == {"class 4", "class 5"}
    assert {"class 4", "class 5"} <= set(stack.classes_)
    singleton = np.flatnonzero(y == "class 4")[0]
    column = list(stack.classes_).index("class 4")
    assert stack.oof_["nb"][singleton, column] == 0  # its OOF model never saw the class
    pair_folds = stack.fold_of_row_[y == "class 5"]
    assert len(set(pair_folds)) == 2  # one member per fold
    test_proba = stack.predict_base_proba(X.iloc[[singleton]])["nb"]
    assert test_proba[0, column] > 0  # 3 of 4 fold models trained on it


def test_fit_predict_contract_and_scores():
    X, y = toy_table()
    stack = stack_of([("nb", NaiveBayesText()), ("nb_smooth", NaiveBayesText(alpha=5.0))]).fit(X, y)
    proba = stack.predict_proba(X)
    assert proba.shape == (len(X), len(stack.classes_))
    np.testing.assert_allclose(proba.sum(axis=1), 1, atol=1e-5)
    assert set(stack.predict(X)) <= set(stack.classes_)
    assert {"nb", "nb_smooth", "meta:AverageBlend"} <= set(stack.oof_scores_.index)
    for matrix in stack.oof_.values():
        np.testing.assert_allclose(matrix.sum(axis=1), 1, atol=1e-3)


class FirstMember(BaseEstimator):
    """A meta-learner that passes the first member's probabilities on."""

    def fit(self, probas, y):
        return self

    def predict_proba(self, probas):
        return np.asarray(next(iter(probas.values())))


class ShiftedAverage(BaseEstimator):
    """A meta-learner worse than the plain average: its answer moved one class over."""

    def fit(self, probas, y):
        return self

    def predict_proba(self, probas):
        return np.roll(np.mean(list(probas.values()), axis=0), 1, axis=1)


@pytest.mark.parametrize(("meta", "chosen"), [
    ("average", "AverageBlend"),
    (["average", ShiftedAverage()], "AverageBlend"),
    ([FirstMember(), "average"], "FirstMember"),  # ties go to the first: the plain average is not chosen
])
def test_the_plain_average_is_one_row_of_the_results(meta, chosen):
    X, y = toy_table(n_per_class=10)
    stack = stack_of([("nb", NaiveBayesText()), ("nb_smooth", NaiveBayesText(alpha=5.0))], meta=meta).fit(X, y)
    assert type(stack.meta_).__name__ == chosen
    results = stack.oof_results()
    mean = np.mean([stack.oof_["nb"], stack.oof_["nb_smooth"]], axis=0)
    plain = [name for name, proba in results.items() if np.allclose(proba, mean, atol=1e-5)]
    assert plain == (["meta:AverageBlend"] if chosen == "AverageBlend" else ["average"])
    assert list(results)[-1] == f"meta:{chosen}" and list(stack.oof_scores_.index) == list(results)
    assert ("average" in stack.predict_results(X)) == (chosen != "AverageBlend")


def test_folds_match_sklearn_stratified_kfold():
    from sklearn.model_selection import StratifiedKFold

    _, y = toy_table(n_per_class=20)
    labels, y_index = np.unique(y, return_inverse=True)
    folds = make_folds(y_index, 5, 42)
    for fold, (_, test) in enumerate(StratifiedKFold(5, shuffle=True, random_state=42).split(y, y)):
        assert (folds[test] == fold).all()


def test_nested_params_route_to_estimators():
    stack = stack_of([("nb", NaiveBayesText())])
    stack.set_params(nb__alpha=0.3)
    assert stack.get_params()["nb__alpha"] == 0.3
    assert clone(stack).named_estimators["nb"].alpha == 0.3


def test_bad_estimator_lists_are_refused():
    X, y = toy_table()
    with pytest.raises(ValueError, match="repeated: \\['a'\\]"):
        stack_of([("a", NaiveBayesText()), ("a", NaiveBayesText())]).fit(X, y)
    with pytest.raises(ValueError, match="estimators is empty"):
        stack_of([]).fit(X, y)


def test_resume_after_a_crash_recomputes_only_missing_jobs(tmp_path):
    X, y = toy_table()
    calls, crash = tmp_path / "calls", tmp_path / "crash-now"
    calls.mkdir()
    model = NaiveBayesText(calls_dir=str(calls), fail_if_exists=str(crash))
    run_dir = tmp_path / "run"
    # fold jobs run in order; the crash flag appears after the first fit
    crash_after_first = stack_of([("nb", model)], run_dir=run_dir)
    original_fit = NaiveBayesText.fit

    def fit_then_arm(self, X_, y_):
        result = original_fit(self, X_, y_)
        crash.touch()
        return result

    NaiveBayesText.fit = fit_then_arm
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            crash_after_first.fit(X, y)
    finally:
        NaiveBayesText.fit = original_fit
    assert fits_in(calls) == 1
    crash.unlink()
    resumed = stack_of([("nb", model)], run_dir=run_dir).fit(X, y)
    assert fits_in(calls) == 3  # 1 before the crash + the 2 missing folds
    assert resumed.jobs_["from_run_folder"].sum() == 1
    clean = stack_of([("nb", model)]).fit(X, y)
    np.testing.assert_array_equal(resumed.oof_["nb"], clean.oof_["nb"])


def test_a_finished_fit_reruns_from_the_folder(tmp_path):
    X, y = toy_table()
    calls = tmp_path / "calls"
    calls.mkdir()
    estimators = [("nb", NaiveBayesText(calls_dir=str(calls)))]
    first = stack_of(estimators, run_dir=tmp_path / "run").fit(X, y)
    second = stack_of(estimators, run_dir=tmp_path / "run").fit(X, y)
    assert fits_in(calls) == 3 and second.jobs_["from_run_folder"].all()
    np.testing.assert_array_equal(first.oof_["nb"], second.oof_["nb"])
    np.testing.assert_array_equal(first.predict_proba(X), second.predict_proba(X))


def test_changing_one_model_recomputes_only_that_model(tmp_path):
    X, y = toy_table()
    run_dir = tmp_path / "run"
    stack_of([("a", NaiveBayesText()), ("b", NaiveBayesText(alpha=2.0))], run_dir=run_dir).fit(X, y)
    changed = stack_of([("a", NaiveBayesText()), ("b", NaiveBayesText(alpha=3.0))], run_dir=run_dir).fit(X, y)
    cached = changed.jobs_.groupby("model")["from_run_folder"].all()
    assert cached["a"] and not changed.jobs_.query("model == 'b'")["from_run_folder"].any()
    assert len(list((run_dir / "jobs" / "b").glob("*.oof.npz"))) == 3  # stale files of alpha=2 removed


def test_changed_data_recomputes(tmp_path):
    X, y = toy_table()
    run_dir = tmp_path / "run"
    stack_of([("a", NaiveBayesText())], run_dir=run_dir).fit(X, y)
    X2 = X.copy()
    X2.loc[0, "text"] = "something else"
    again = stack_of([("a", NaiveBayesText())], run_dir=run_dir).fit(X2, y)
    assert not again.jobs_["from_run_folder"].any()


def test_second_process_is_refused_by_the_lock(tmp_path):
    X, y = toy_table()
    with RunFolder(tmp_path / "run").locked():
        with pytest.raises(RunFolderError, match=f"in use by pid {os.getpid()}"):
            stack_of([("a", NaiveBayesText())], run_dir=tmp_path / "run").fit(X, y)


def test_stack_reloads_from_a_moved_folder(tmp_path):
    X, y = toy_table()
    stack = stack_of([("a", NaiveBayesText())], run_dir=tmp_path / "run").fit(X, y)
    expected = stack.predict_proba(X)
    (tmp_path / "run").rename(tmp_path / "moved")
    loaded = StackingCategorizer.load(tmp_path / "moved")
    np.testing.assert_array_equal(loaded.predict_proba(X), expected)


def test_refit_uses_one_model_on_all_rows():
    X, y = toy_table()
    stack = stack_of([("a", NaiveBayesText())], refit=True).fit(X, y)
    assert len(stack.fold_models_["a"]) == 1
    assert stack.jobs_.query("job == 'full'")["train_rows"].item() == len(X)
    full = NaiveBayesText().fit(X, y)
    np.testing.assert_allclose(stack.predict_base_proba(X)["a"], full.predict_proba(X), atol=1e-6)


@pytest.mark.slow
def test_parallel_jobs_equal_sequential():
    X, y = toy_table()
    estimators = [("a", NaiveBayesText()), ("b", NaiveBayesText(alpha=0.2))]
    sequential = stack_of(estimators).fit(X, y)
    parallel = stack_of(estimators, n_jobs=2).fit(X, y)
    for name in ("a", "b"):
        np.testing.assert_array_equal(sequential.oof_[name], parallel.oof_[name])


@pytest.mark.dask
def test_dask_local_cluster_equals_joblib():
    distributed = pytest.importorskip("distributed")
    X, y = toy_table()
    estimators = [("a", NaiveBayesText()), ("b", NaiveBayesText(alpha=0.2))]
    local = stack_of(estimators).fit(X, y)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1",
                                  dashboard_address=None, processes=True) as cluster:
        on_cluster = stack_of(estimators, scheduler=cluster.scheduler_address, n_jobs=-1).fit(X, y)
    for name in ("a", "b"):
        np.testing.assert_array_equal(local.oof_[name], on_cluster.oof_[name])
    np.testing.assert_array_equal(local.predict_proba(X), on_cluster.predict_proba(X))


@pytest.mark.slow
def test_resume_after_kill_9_gives_the_same_oof(tmp_path):
    calls = tmp_path / "calls"
    calls.mkdir()
    run_dir = tmp_path / "run"
    setup = f"""
        import sys
        sys.path.insert(0, {str(TESTS_DIR)!r})
        from toy_models import NaiveBayesText, toy_table
        from stackcat.stacking import StackingCategorizer
        X, y = toy_table()
        estimators = [("a", NaiveBayesText(sleep=0.4, calls_dir={str(calls)!r})),
                      ("b", NaiveBayesText(alpha=0.5, sleep=0.4, calls_dir={str(calls)!r}))]
        stack = StackingCategorizer(estimators, meta="average", n_splits=3, random_state=0,
                                    progress=False, verbose=0, run_dir={str(run_dir)!r})
    """
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(setup) + "\nstack.fit(X, y)\n"])
    deadline = time.time() + 60
    while len(list(run_dir.glob("jobs/*/*.oof.npz"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    done_at_kill = len(list(run_dir.glob("jobs/*/*.oof.npz")))
    assert 2 <= done_at_kill < 6
    fits_before = fits_in(calls)
    namespace: dict = {}
    exec(textwrap.dedent(setup), namespace)
    resumed = namespace["stack"].fit(namespace["X"], namespace["y"])
    assert resumed.jobs_["from_run_folder"].sum() == done_at_kill
    assert fits_in(calls) - fits_before == 6 - done_at_kill
    clean = clone(namespace["stack"]).set_params(run_dir=None).fit(namespace["X"], namespace["y"])
    for name in ("a", "b"):
        np.testing.assert_array_equal(resumed.oof_[name], clean.oof_[name])


class WarmedNaiveBayes(NaiveBayesText):
    warmed: list = []

    def warm_cache(self, X):
        WarmedNaiveBayes.warmed.append(len(X))


def test_frozen_encoder_caches_are_warmed_once_before_pending_jobs(tmp_path):
    X, y = toy_table()
    WarmedNaiveBayes.warmed.clear()
    estimators = [("warm", WarmedNaiveBayes())]
    stack_of(estimators, run_dir=tmp_path / "run").fit(X, y)
    assert WarmedNaiveBayes.warmed == [len(X)]
    stack_of(estimators, run_dir=tmp_path / "run").fit(X, y)  # nothing pending: no warm-up
    assert WarmedNaiveBayes.warmed == [len(X)]


@pytest.mark.dask
def test_frozen_encoder_caches_are_filled_on_the_cluster_workers(tmp_path):
    """With a scheduler, encoding is sharded over the workers (not done by the driver), every row
    once, and the results equal a local run's."""
    distributed = pytest.importorskip("distributed")
    from toy_models import CacheWarmingText

    X, y = toy_table(n_per_class=10)
    local_dir, cluster_dir = tmp_path / "local", tmp_path / "cluster"
    local_dir.mkdir()
    cluster_dir.mkdir()
    local = stack_of([("a", CacheWarmingText(warm_dir=str(local_dir)))]).fit(X, y)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1",
                                  dashboard_address=None, processes=True) as cluster:
        on_cluster = stack_of([("a", CacheWarmingText(warm_dir=str(cluster_dir)))],
                              scheduler=cluster.scheduler_address, n_jobs=-1).fit(X, y)
    assert len(list(local_dir.iterdir())) == 1  # locally: one call on every row
    calls = list(cluster_dir.iterdir())
    assert len(calls) >= 2
    assert str(os.getpid()) not in {call.name.split("-")[1] for call in calls}
    warmed = sorted(int(i) for call in calls for i in call.read_text().split())
    assert warmed == sorted(X["id"])  # every row once
    np.testing.assert_array_equal(local.oof_["a"], on_cluster.oof_["a"])
