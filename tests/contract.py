"""The estimator contract every stackcat base model must pass (see DESIGN.md)."""

from __future__ import annotations

import io
from typing import Any

import joblib
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils import estimator_checks as checks

# Checks of sklearn.utils.estimator_checks that need no numeric input.
ESTIMATOR_ONLY_CHECKS = (
    checks.check_no_attributes_set_in_init,
    checks.check_get_params_invariance,
    checks.check_set_params,
    checks.check_estimator_cloneable,
    checks.check_estimator_repr,
    checks.check_mixin_order,
    checks.check_do_not_raise_errors_in_init_or_set_params,
    checks.check_estimator_tags_renamed,
    checks.check_valid_tag_types,
)


def check_sklearn_contract(estimator: Any) -> None:
    name = type(estimator).__name__
    checks.check_parameters_default_constructible(name, clone(estimator))
    for check in ESTIMATOR_ONLY_CHECKS:
        check(name, clone(estimator))


def check_fitted_contract(estimator: Any, X: Any, y: Any, X_new: Any) -> Any:
    """fit returns self, classes_, proba shape/sum/order, predict = argmax, pickling, unfitted error."""
    unfitted = clone(estimator)
    with pytest.raises(NotFittedError):
        unfitted.predict_proba(X_new)
    params_before = estimator.get_params()
    fitted = estimator.fit(X, y)
    assert fitted is estimator
    assert estimator.get_params() == params_before, "fit must not change params"
    np.testing.assert_array_equal(estimator.classes_, np.unique(np.asarray(y, dtype=object)))
    proba = estimator.predict_proba(X_new)
    assert proba.shape == (len(X_new), len(estimator.classes_))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    assert (proba >= 0).all()
    np.testing.assert_array_equal(estimator.predict(X_new), estimator.classes_[proba.argmax(axis=1)])
    buffer = io.BytesIO()
    joblib.dump(estimator, buffer)
    buffer.seek(0)
    restored = joblib.load(buffer)
    np.testing.assert_allclose(restored.predict_proba(X_new), proba, rtol=0, atol=1e-6)
    return proba
