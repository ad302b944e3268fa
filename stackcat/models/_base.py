"""What every base estimator shares: reading its column(s) from X, label encoding, devices."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.utils.validation import check_is_fitted


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


def encode_labels(y: Any, n_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """``(classes_, y_indices)``: sorted distinct labels and each row's index into them."""
    labels = np.asarray(y.to_numpy(dtype=object) if isinstance(y, pd.Series) else y)
    if labels.ndim != 1:
        raise ValueError(f"y must be 1-D (one category per row); got shape {labels.shape}")
    if len(labels) != n_samples:
        raise ValueError(f"X has {n_samples} rows but y has {len(labels)}")
    if len(labels) == 0:
        raise ValueError("cannot fit on 0 rows")
    if labels.dtype.kind == "f" and np.isnan(labels).any():
        raise ValueError(f"y has missing labels (NaN) at rows {np.flatnonzero(np.isnan(labels))[:10].tolist()}")
    try:
        classes, indices = np.unique(labels, return_inverse=True)
    except TypeError as exc:
        kinds = sorted({type(v).__name__ for v in labels})
        raise TypeError(f"y mixes label types {kinds}; convert them to one type") from exc
    return classes, indices


def proba_for_classes(proba: np.ndarray, model_classes: Sequence[Any], classes: Sequence[Any]) -> np.ndarray:
    """Re-order/pad the columns of ``proba`` (``model_classes`` order) into ``classes`` order.

    A class the model never saw gets probability 0.
    """
    position = {c: i for i, c in enumerate(classes)}
    out = np.zeros((proba.shape[0], len(classes)), dtype=proba.dtype)
    for j, c in enumerate(model_classes):
        out[:, position[c]] = proba[:, j]
    return out


def normalize_rows(proba: np.ndarray) -> np.ndarray:
    """Rows that sum to 1 (a row of zeros becomes uniform)."""
    proba = np.asarray(proba, dtype=np.float64)
    totals = proba.sum(axis=1, keepdims=True)
    empty = totals[:, 0] <= 0
    if empty.any():
        proba[empty] = 1.0
        totals[empty] = proba.shape[1]
    return proba / totals


class ProbaClassifierMixin:
    """``predict`` as the argmax of ``predict_proba``, in ``classes_`` terms."""

    def predict(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "classes_")
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


def resolve_device(device: str = "auto") -> Any:
    """``"auto"`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} asked for CUDA, but torch sees no GPU; use device='cpu'")
    return resolved


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
