from __future__ import annotations

import joblib
import numpy as np
import pytest
from sklearn.base import clone

from stackcat.meta import (
    AverageBlend,
    MulticlassMeta,
    RerankMeta,
    build_candidates,
    candidate_feature_names,
    fit_temperature,
    group_softmax,
    inner_eval_mask,
    make_meta,
    rank_in_group,
)

from contract import check_sklearn_contract

FAST = {"iterations": 30, "n_threads": 1}


def softmax(logits):
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def noisy_models(y, n_classes, noises=(0.8, 1.3, 2.2), seed=0, dtype=np.float32):
    """One probability matrix per noise level: the true class boosted, Gaussian logit noise.

    A shared noise term makes the models err together, as real ones do.
    """
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(len(y), n_classes))
    probas = {}
    for i, noise in enumerate(noises):
        logits = 3.0 * np.eye(n_classes)[y] + noise * (0.5 * shared + rng.normal(size=(len(y), n_classes)))
        probas[f"model{i}"] = softmax(logits).astype(dtype)
    return probas


def split(probas, y, n_train):
    train = {k: v[:n_train] for k, v in probas.items()}
    test = {k: v[n_train:] for k, v in probas.items()}
    return train, y[:n_train], test, y[n_train:]


def accuracy(proba, y):
    return float(np.mean(np.asarray(proba).argmax(axis=1) == y))


@pytest.fixture(scope="module")
def many_classes():
    rng = np.random.default_rng(1)
    n_classes = 80
    y = rng.integers(0, n_classes, 500)
    return noisy_models(y, n_classes, noises=(0.9, 1.4, 2.5, 3.0), seed=1), y, n_classes


@pytest.fixture(scope="module")
def few_classes():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 5, 300)
    return noisy_models(y, 5, noises=(1.5, 2.5), seed=2), y, 5


# -- shared behaviour --------------------------------------------------------

@pytest.mark.parametrize("meta", [AverageBlend(), MulticlassMeta(), RerankMeta()])
def test_sklearn_checks_that_apply(meta):
    check_sklearn_contract(meta)


@pytest.mark.parametrize(("make", "data"), [
    (lambda: AverageBlend(), "many_classes"),
    (lambda: MulticlassMeta(**FAST), "few_classes"),
    (lambda: RerankMeta(**FAST), "many_classes"),
])
def test_fit_predict_shapes_and_sums(make, data, request):
    probas, y, n_classes = request.getfixturevalue(data)
    meta = make()
    assert meta.fit(probas, y) is meta
    proba = meta.predict_proba(probas)
    assert proba.shape == (len(y), n_classes)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    assert (proba >= 0).all()
    np.testing.assert_array_equal(meta.predict(probas), proba.argmax(axis=1))
    assert meta.model_names_ == list(probas)
    assert meta.predict_proba({k: v[:0] for k, v in probas.items()}).shape == (0, n_classes)


@pytest.mark.parametrize("make", [lambda: AverageBlend(), lambda: MulticlassMeta(**FAST), lambda: RerankMeta(**FAST)])
def test_model_name_and_shape_mismatch_are_named(make, few_classes):
    probas, y, _ = few_classes
    meta = make().fit(probas, y)
    renamed = {"model0": probas["model0"], "other": probas["model1"]}
    with pytest.raises(ValueError, match=r"missing: \['model1'\], unexpected: \['other'\]"):
        meta.predict_proba(renamed)
    with pytest.raises(ValueError, match="disagree in shape"):
        meta.predict_proba({"model0": probas["model0"], "model1": probas["model1"][:10]})
    with pytest.raises(ValueError, match="fitted with 5 classes"):
        meta.predict_proba({k: v[:, :4] for k, v in probas.items()})


def test_bad_inputs_are_named():
    probas = {"a": np.full((4, 3), 1 / 3), "b": np.full((4, 3), 1 / 3)}
    with pytest.raises(ValueError, match=r"outside \[0, 3\) at rows \[2\]"):
        AverageBlend().fit(probas, [0, 1, 3, 0])
    broken = {"a": probas["a"].copy(), "b": probas["b"]}
    broken["a"][1, 2] = np.nan
    with pytest.raises(ValueError, match=r"probas\['a'\] has NaN .* rows \[1\]"):
        RerankMeta(**FAST).fit(broken, [0, 1, 2, 0])
    with pytest.raises(ValueError, match="has 4 rows but y has 3|4 rows but y has 3"):
        MulticlassMeta(**FAST).fit(probas, [0, 1, 2])
    with pytest.raises(ValueError, match="empty"):
        AverageBlend().fit({}, [])


def test_joblib_round_trip_predicts_identically(tmp_path, many_classes, few_classes):
    for meta, (probas, y, _) in ((AverageBlend(), many_classes), (MulticlassMeta(**FAST), few_classes),
                                 (RerankMeta(**FAST), many_classes)):
        meta.fit(probas, y)
        path = tmp_path / f"{type(meta).__name__}.joblib"
        joblib.dump(meta, path)
        np.testing.assert_array_equal(joblib.load(path).predict_proba(probas), meta.predict_proba(probas))


@pytest.mark.parametrize(("make", "data"), [(lambda: MulticlassMeta(**FAST), "few_classes"),
                                            (lambda: RerankMeta(**FAST), "many_classes")])
def test_random_state_makes_fits_repeatable(make, data, request):
    probas, y, _ = request.getfixturevalue(data)
    first = make().fit(probas, y).predict_proba(probas)
    np.testing.assert_array_equal(make().fit(probas, y).predict_proba(probas), first)


def test_no_catboost_info_written(tmp_path, monkeypatch, many_classes):
    probas, y, _ = many_classes
    monkeypatch.chdir(tmp_path)
    MulticlassMeta(**FAST, verbose=10).fit({k: v[:100, :5] for k, v in probas.items()}, y[:100] % 5)
    RerankMeta(**FAST, verbose=10).fit(probas, y)
    RerankMeta(**FAST, loss="YetiRank").fit(probas, y)
    assert list(tmp_path.iterdir()) == []


def test_invalid_params_rejected_at_fit(few_classes):
    probas, y, _ = few_classes
    with pytest.raises(ValueError, match="loss"):
        RerankMeta(loss="MultiClass").fit(probas, y)
    with pytest.raises(ValueError, match="eval_fraction"):
        MulticlassMeta(eval_fraction=1.5).fit(probas, y)


@pytest.mark.parametrize(("cls", "data"), [(MulticlassMeta, "few_classes"), (RerankMeta, "many_classes")])
def test_n_threads_reaches_catboost_and_none_is_every_core(cls, data, request):
    probas, y, _ = request.getfixturevalue(data)
    assert cls(iterations=5, n_threads=2).fit(probas, y).model_.get_params()["thread_count"] == 2
    assert cls()._catboost_params(5)["thread_count"] == cls(n_threads=-1)._catboost_params(5)["thread_count"] == -1


# -- AverageBlend ---------------------------------------------------------------

def test_average_blend_is_the_weighted_mean():
    a = np.array([[0.8, 0.2], [0.1, 0.9]])
    b = np.array([[0.4, 0.6], [0.5, 0.5]])
    probas = {"a": a, "b": b}
    np.testing.assert_allclose(AverageBlend().fit(probas, [0, 1]).predict_proba(probas), (a + b) / 2)
    by_name = AverageBlend(weights={"a": 3, "b": 1}).fit(probas, [0, 1])
    np.testing.assert_allclose(by_name.predict_proba(probas), 0.75 * a + 0.25 * b)
    np.testing.assert_allclose(AverageBlend(weights=[3, 1]).fit(probas, [0, 1]).predict_proba(probas),
                               0.75 * a + 0.25 * b)
    with pytest.raises(ValueError, match="missing: \\['b'\\]"):
        AverageBlend(weights={"a": 1}).fit(probas, [0, 1])
    with pytest.raises(ValueError, match="non-negative"):
        AverageBlend(weights=[1, -1]).fit(probas, [0, 1])


# -- MulticlassMeta --------------------------------------------------------------

def test_multiclass_absent_and_single_member_classes(few_classes):
    probas, y, n_classes = few_classes
    y = y.copy()
    y[y == 3] = 0          # class 3 absent
    y[np.flatnonzero(y == 4)[1:]] = 1  # class 4 has one member
    meta = MulticlassMeta(**FAST).fit(probas, y)
    proba = meta.predict_proba(probas)
    assert (proba[:, 3] == 0).all()
    assert proba[:, 4].max() > 0
    np.testing.assert_array_equal(meta.present_classes_, [0, 1, 2, 4])
    assert meta.inner_scores_["n_products"] > 0


def test_multiclass_one_class_in_y_predicts_it():
    probas = {"a": np.tile([0.2, 0.5, 0.3], (6, 1))}
    meta = MulticlassMeta(**FAST).fit(probas, [2] * 6)
    np.testing.assert_array_equal(meta.predict(probas), [2] * 6)


def test_multiclass_learns_beyond_the_worst_model(few_classes):
    probas, y, _ = few_classes
    train, y_train, test, y_test = split(probas, y, 220)
    meta = MulticlassMeta(iterations=60, n_threads=1).fit(train, y_train)
    worst = min(accuracy(p, y_test) for p in test.values())
    assert accuracy(meta.predict_proba(test), y_test) > worst


def test_inner_eval_mask_keeps_every_class_in_training():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(6), [1, 2, 3, 10, 50, 200])
    mask = inner_eval_mask(y, 0.15, rng)
    assert not mask[y == 0].any()                      # 1 member: always training
    for c in range(6):
        assert (~mask[y == c]).sum() >= 1
    assert 0.08 < mask[y == 5].mean() < 0.25
    np.testing.assert_array_equal(mask, inner_eval_mask(y, 0.15, np.random.default_rng(0)))


# -- RerankMeta ------------------------------------------------------------------

def brute_force_candidates(probas, top_k):
    """Per product, the set of classes in any model's or the mean's top-k (plain Python)."""
    matrices = list(probas.values())
    mean = sum(m.astype(np.float32) for m in matrices) / len(matrices)
    candidates = []
    for row in range(len(mean)):
        classes = set()
        for matrix in [*matrices, mean]:
            order = sorted(range(matrix.shape[1]), key=lambda c: -matrix[row, c])
            classes.update(order[:top_k])
        candidates.append(classes)
    return candidates


def test_rerank_probabilities_live_on_candidates_and_recall_is_exact():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 30, 120)
    probas = noisy_models(y, 30, noises=(1.5, 2.5, 3.5), seed=3)
    meta = RerankMeta(top_k=3, **FAST).fit(probas, y)
    expected = brute_force_candidates(probas, 3)
    assert meta.candidate_recall_ == pytest.approx(np.mean([y[i] in c for i, c in enumerate(expected)]))
    assert meta.candidate_recall_ < 1.0  # the noisy models do miss some true classes
    assert meta.n_candidates_ == pytest.approx(np.mean([len(c) for c in expected]))
    proba = meta.predict_proba(probas)
    for row, classes in enumerate(expected):
        assert set(np.flatnonzero(proba[row])) == classes
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)


def test_rerank_beats_the_worst_model_and_reports_inner_scores(many_classes):
    probas, y, _ = many_classes
    train, y_train, test, y_test = split(probas, y, 380)
    meta = RerankMeta(iterations=80, n_threads=1).fit(train, y_train)
    worst = min(accuracy(p, y_test) for p in test.values())
    assert accuracy(meta.predict_proba(test), y_test) > worst
    scores = meta.inner_scores_
    assert set(scores) == {"n_products", "accuracy", "average_accuracy", "best_model_accuracy",
                           "candidate_recall", "logloss"}
    assert 0 < scores["n_products"] < len(y_train)
    assert 0 <= scores["accuracy"] <= scores["candidate_recall"] <= 1
    assert meta.temperature_ > 0 and meta.best_iteration_ >= 1
    assert len(meta.feature_importances_) == len(meta.feature_names_)


@pytest.mark.parametrize("loss", ["YetiRank", pytest.param("QuerySoftMax", marks=pytest.mark.slow)])
def test_rerank_ranking_losses_use_groups(loss, many_classes):
    probas, y, _ = many_classes
    meta = RerankMeta(loss=loss, **FAST).fit(probas, y)
    proba = meta.predict_proba(probas)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    assert accuracy(proba, y) > min(accuracy(p, y) for p in probas.values())


def test_rerank_absent_and_single_member_classes_and_float16(many_classes):
    probas, y, n_classes = many_classes
    y = y.copy()
    y[y == 7] = 8                     # class 7 absent
    y[np.flatnonzero(y == 9)[1:]] = 10  # class 9 has one member
    half = {k: v.astype(np.float16) for k, v in probas.items()}
    meta = RerankMeta(**FAST, class_feature=True).fit(half, y)
    assert meta.class_counts_[7] == 0 and meta.class_counts_[9] == 1
    proba = meta.predict_proba(half)
    assert proba.shape == (len(y), n_classes)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    # the class-frequency feature pools the rarest classes (absent, 1 member) with the 3-member ones
    candidates = meta._candidates(list(half.values()))
    log_count = candidates.features[:, meta.feature_names_.index("class_log_count")]
    np.testing.assert_allclose(log_count, np.log1p(np.maximum(meta.class_counts_[candidates.label], 3)))


def test_rerank_without_early_stopping_trains_all_iterations(many_classes):
    probas, y, _ = many_classes
    meta = RerankMeta(iterations=15, n_threads=1, early_stopping_rounds=None).fit(probas, y)
    assert meta.best_iteration_ == 15
    assert meta.inner_scores_ == {} and meta.temperature_ == 1.0


def test_rerank_refit_uses_the_early_stopped_iterations(many_classes):
    probas, y, _ = many_classes
    meta = RerankMeta(**FAST, refit=True).fit(probas, y)
    assert meta.model_.tree_count_ == meta.best_iteration_
    assert "refit" in meta.fit_times_


@pytest.mark.parametrize("loss", ["Logloss", "YetiRank"])
def test_rerank_boosting_starts_from_the_average_blend(loss, many_classes):
    probas, y, _ = many_classes
    # one tree with a negligible learning rate: the scores are the starting point
    barely = {"iterations": 1, "learning_rate": 1e-6, "early_stopping_rounds": None, "n_threads": 1}
    mean = np.mean(list(probas.values()), axis=0)
    from_average = RerankMeta(loss=loss, **barely).fit(probas, y).predict_proba(probas)
    np.testing.assert_array_equal(from_average.argmax(axis=1), mean.argmax(axis=1))
    from_zero = RerankMeta(loss=loss, boost_from_average=False, **barely).fit(probas, y).predict_proba(probas)
    assert (from_zero.argmax(axis=1) != mean.argmax(axis=1)).mean() > 0.2  # its one tree decides


def test_rerank_perfect_models_need_no_booster():
    y = np.arange(60) % 55
    probas = {"a": np.eye(55)[y], "b": np.eye(55)[y]}
    meta = RerankMeta(**FAST).fit(probas, y)
    assert meta.model_ is None
    np.testing.assert_array_equal(meta.predict(probas), y)


def test_candidate_features_are_finite_and_named(many_classes):
    probas, y, _ = many_classes
    matrices = [m.astype(np.float16) for m in probas.values()]
    candidates = build_candidates(matrices, 5, np.log1p(np.bincount(y, minlength=80)).astype(np.float32))
    names = candidate_feature_names(list(probas))
    assert candidates.features.shape == (len(candidates.label), len(names))
    assert candidates.features.dtype == np.float32
    assert np.isfinite(candidates.features).all()
    assert (np.diff(candidates.product) >= 0).all()
    first_p = candidates.features[:, names.index("model0:p")]
    np.testing.assert_allclose(first_p, matrices[0][candidates.product, candidates.label].astype(np.float32))
    rank = candidates.features[:, names.index("mean:rank")]
    assert (rank[candidates.starts] >= 0).all() and (rank == 0).sum() == len(y)  # one mean top-1 per product


def test_rank_in_group_by_hand():
    values = np.array([0.2, 0.5, 0.1, 0.3, 0.3, 0.9])
    group = np.array([0, 0, 0, 1, 1, 2])
    np.testing.assert_array_equal(rank_in_group(values, group, np.array([3, 2, 1])), [1, 0, 2, 0, 1, 0])


def test_group_softmax_and_temperature():
    rng = np.random.default_rng(0)
    n_groups, size = 3000, 4
    logits = rng.normal(0, 2, (n_groups, size))
    chosen = np.array([rng.choice(size, p=p) for p in softmax(logits)])
    positive = (np.arange(size)[None, :] == chosen[:, None]).ravel()
    starts = np.arange(0, n_groups * size, size)
    proba = group_softmax(3.0 * logits.ravel(), starts)
    np.testing.assert_allclose(np.add.reduceat(proba, starts), 1.0)
    np.testing.assert_allclose(proba.reshape(n_groups, size), softmax(3.0 * logits))
    assert fit_temperature(3.0 * logits.ravel(), starts, positive) == pytest.approx(3.0, rel=0.1)


# -- make_meta -------------------------------------------------------------------

def test_make_meta_choices():
    assert isinstance(make_meta("auto", n_classes=51), RerankMeta)
    assert isinstance(make_meta("auto", n_classes=50), MulticlassMeta)
    assert isinstance(make_meta("average", n_classes=3), AverageBlend)
    meta = make_meta("rerank", n_classes=900, top_k=7, iterations=10)
    assert (meta.top_k, meta.iterations) == (7, 10)
    assert clone(meta).get_params()["top_k"] == 7
    with pytest.raises(ValueError, match=r"'auto', 'rerank', 'multiclass', 'average'"):
        make_meta("xgboost", n_classes=3)
    with pytest.raises(ValueError, match="n_classes"):
        make_meta("auto")
