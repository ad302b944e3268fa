"""TorchHeadClassifier: estimator contract, learning, early stopping, class weights, seeding, bad input."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from stackcat.models.heads import TorchHeadClassifier

from contract import check_fitted_contract, check_sklearn_contract


def blobs(n_per_class: int = 40, n_classes: int = 4, dim: int = 16, spread: float = 1.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(n_classes, dim))
    y = np.repeat(np.arange(n_classes), n_per_class)
    X = centres[y] + rng.normal(0, spread, size=(len(y), dim))
    labels = np.array([f"class {i}" for i in range(n_classes)], dtype=object)[y]
    return X.astype(np.float32), labels


def test_sklearn_checks_that_apply():
    check_sklearn_contract(TorchHeadClassifier())


@pytest.mark.parametrize("hidden_units", [0, 16])
def test_contract_and_learns_separable_classes(hidden_units):
    X, y = blobs()
    head = TorchHeadClassifier(hidden_units=hidden_units, max_epochs=40, learning_rate=1e-2, n_threads=1)
    check_fitted_contract(head, X, y, X[::7])
    assert head.score(X, y) > 0.95
    assert [w.shape for w in head.coefs_] == ([(16, 4)] if not hidden_units else [(16, 16), (16, 4)])


def test_matches_logistic_regression_on_noisy_classes():
    X, y = blobs(n_per_class=150, n_classes=5, spread=4.0)
    X_test, y_test = blobs(n_per_class=150, n_classes=5, spread=4.0, seed=0)[0], y
    rng = np.random.default_rng(1)
    X_test = X_test + rng.normal(0, 1.0, size=X_test.shape).astype(np.float32)
    reference = LogisticRegression(max_iter=1000).fit(X, y).score(X_test, y_test)
    head = TorchHeadClassifier(learning_rate=1e-2, max_epochs=40, n_threads=1)  # 750 rows: few steps per epoch
    assert head.fit(X, y).score(X_test, y_test) >= reference - 0.03


def test_early_stopping_keeps_the_best_epoch_and_refits_on_all_rows():
    X, y = blobs(n_per_class=60, spread=6.0)  # heavy overlap: the held-out loss turns up early
    head = TorchHeadClassifier(learning_rate=3e-2, max_epochs=200, patience=3, n_threads=1).fit(X, y)
    assert head.n_epochs_ < 200
    assert head.best_epoch_ == head.n_epochs_ - 3
    assert head.best_valid_loss_ > 0
    held_out_only = TorchHeadClassifier(learning_rate=3e-2, max_epochs=200, patience=3, refit=False,
                                        n_threads=1).fit(X, y)
    assert held_out_only.best_epoch_ == head.best_epoch_  # the same search; refit only retrains after it
    assert not np.allclose(held_out_only.coefs_[0], head.coefs_[0])


def test_without_room_for_a_held_out_split_it_trains_all_epochs():
    X, y = blobs(n_per_class=2, n_classes=4)  # 10% of 8 rows cannot hold one row of each class
    head = TorchHeadClassifier(max_epochs=7, n_threads=1).fit(X, y)
    assert head.n_epochs_ == 7 and head.best_valid_loss_ is None


def test_a_class_with_one_row_stays_in_training():
    X, y = blobs(n_per_class=30, n_classes=3)
    X, y = np.vstack([X, X[:1] + 10]), np.append(y, "lonely")
    head = TorchHeadClassifier(max_epochs=30, learning_rate=1e-2, n_threads=1).fit(X, y)
    assert "lonely" in head.classes_ and head.predict(X[-1:])[0] == "lonely"


def test_balanced_class_weight_favours_the_rare_class():
    X, y = blobs(n_per_class=200, n_classes=2, spread=5.0)
    keep = np.r_[0:200, 200:220]  # 200 vs 20 rows
    X, y = X[keep], y[keep]
    plain = TorchHeadClassifier(max_epochs=10, n_threads=1).fit(X, y)
    balanced = TorchHeadClassifier(max_epochs=10, class_weight="balanced", n_threads=1).fit(X, y)
    rare = list(plain.classes_).index("class 1")
    assert balanced.predict_proba(X)[:, rare].mean() > plain.predict_proba(X)[:, rare].mean()
    by_label = TorchHeadClassifier(max_epochs=10, class_weight={"class 1": 10.0}, n_threads=1).fit(X, y)
    assert by_label.predict_proba(X)[:, rare].mean() > plain.predict_proba(X)[:, rare].mean()


def test_same_seed_same_model_other_seed_other_model():
    X, y = blobs()
    first, second = (TorchHeadClassifier(max_epochs=5, n_threads=1).fit(X, y) for _ in range(2))
    np.testing.assert_array_equal(first.predict_proba(X), second.predict_proba(X))
    other = TorchHeadClassifier(max_epochs=5, random_state=1, n_threads=1).fit(X, y)
    assert not np.allclose(other.predict_proba(X), first.predict_proba(X))


def test_fitted_head_holds_only_numpy_weights():
    """So that it predicts and unpickles without torch, and a bundle stores it as arrays."""
    X, y = blobs()
    head = TorchHeadClassifier(max_epochs=3, n_threads=1).fit(X, y)
    state = pickle.loads(pickle.dumps(head)).__dict__
    assert not any(type(value).__module__.startswith("torch") for value in state.values())
    assert all(isinstance(w, np.ndarray) for w in head.coefs_ + head.intercepts_)


def test_constant_feature_does_not_break_standardization():
    X, y = blobs()
    X[:, 3] = 5.0
    head = TorchHeadClassifier(max_epochs=10, n_threads=1).fit(X, y)
    assert head.scale_[3] == 1.0 and np.isfinite(head.predict_proba(X)).all()


def test_bad_input_is_named():
    X, y = blobs()
    with pytest.raises(ValueError, match="single class"):
        TorchHeadClassifier().fit(X, ["a"] * len(X))
    bad = X.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        TorchHeadClassifier().fit(bad, y)
    with pytest.raises(ValueError, match="learning_rate"):
        TorchHeadClassifier(learning_rate=0).fit(X, y)
    head = TorchHeadClassifier(max_epochs=2, n_threads=1).fit(X, y)
    with pytest.raises(ValueError, match="16 features"):
        head.predict_proba(X[:, :5])
    with pytest.raises(ValueError, match="y must be 1-D"):
        TorchHeadClassifier().fit(X, np.zeros((len(X), 2)))
