"""What every base estimator shares: reading its column(s) from X, predict from predict_proba, seeding.

Labels, probability columns and devices live on the ground floor (:mod:`stackcat.core`);
they are imported here too, so that ``from stackcat.models._base import encode_labels`` keeps working.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import pandas as pd
from sklearn.utils.validation import check_is_fitted

from stackcat.core import encode_labels, normalize_rows, proba_for_classes, resolve_device

__all__ = [
    "ProbaClassifierMixin",
    "as_texts",
    "column_values",
    "encode_labels",
    "normalize_rows",
    "optional_column",
    "proba_for_classes",
    "resolve_device",
    "seed_everything",
]


def column_values(X: Any, column: str | None, *, what: str = "text") -> np.ndarray:
    """The values of ``column`` as a 1-D object array.

    ``X`` is a DataFrame (``column`` is read from it), or a plain sequence of
    values (a list of texts or image paths) used as it is.
    """
    if isinstance(X, pd.DataFrame):
        if column not in X.columns:
            raise KeyError(
                f"X has no {what} column {column!r}; it has {[str(c) for c in X.columns]}. "
                f"Pass {what}_column=... to name the column holding the {what}."
            )
        return X[column].to_numpy(dtype=object)
    if isinstance(X, pd.Series):
        return X.to_numpy(dtype=object)
    if isinstance(X, (str, bytes)):
        raise TypeError(f"X must be a list of {what} values or a DataFrame, not a single string")
    values = np.asarray(X, dtype=object)
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1:
        raise ValueError(
            f"X must be a DataFrame or a 1-D list of {what} values; got an array of shape {values.shape}"
        )
    return values


def optional_column(X: Any, column: str | None) -> np.ndarray | None:
    """``X[column]`` as an object array when X is a DataFrame that has it, else ``None``."""
    if column and isinstance(X, pd.DataFrame) and column in X.columns:
        return X[column].to_numpy(dtype=object)
    return None


def as_texts(values: np.ndarray) -> list[str]:
    """Missing values -> ``""``; everything else -> ``str``."""
    return ["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in values]


class ProbaClassifierMixin:
    """``predict`` as the argmax of ``predict_proba``, in ``classes_`` terms."""

    def predict(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "classes_")
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


def seed_everything(seed: int | None) -> None:
    """Seed Python, NumPy and torch (when imported) for repeatable CPU runs."""
    if seed is None:
        return
    random.seed(seed)
    np.random.seed(seed % (2**32))
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    import sys

    if "torch" in sys.modules:
        import torch

        torch.manual_seed(seed)
