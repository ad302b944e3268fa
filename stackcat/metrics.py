"""Scores: the evaluation numbers of probability matrices (the report is :mod:`stackcat.report`).

Everything works on a probability matrix ``proba`` of shape ``(n_samples,
n_classes)`` and true class indices ``y_true`` (or labels, with ``classes``)
and is vectorized: a 90k x 900 matrix scores in about a second.

* :func:`score` -- weighted F1 (the headline), macro F1, accuracy, top-5,
  expected calibration error, and the share of products that can be
  auto-categorized at 95% / 99% precision (the rest goes to human review).
* :func:`per_class_report`, :func:`comparison_table`, :func:`confused_pairs`.
* curves: :func:`precision_coverage_curve`, :func:`reliability_bins`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from stackcat.topk import is_top_k, rank_of, row_argmax, row_max

ECE_BINS = 15
COVERAGE_TARGETS = (0.95, 0.99)
TOP_K = 5
RANK_CHUNK = 8192
Y_KINDS = ("indices", "labels")

# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------

def as_indices(y_true: Any, n_classes: int, classes: Sequence[Any] | None = None) -> np.ndarray:
    """``y_true`` as int class indices: labels are mapped through ``classes`` when given."""
    y = np.asarray(y_true.to_numpy(dtype=object) if isinstance(y_true, pd.Series) else y_true)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D; got shape {y.shape}")
    if classes is not None:
        index = pd.Index(list(classes))
        if not index.is_unique:
            raise ValueError("classes has duplicate labels")
        positions = index.get_indexer(y)
        if (positions < 0).any():
            raise ValueError(f"y_true has labels not in classes: {list(dict.fromkeys(y[positions < 0].tolist()))[:10]}")
        return positions.astype(np.int64)
    if y.dtype.kind not in "iu":
        raise TypeError(f"y_true must be class indices (dtype {y.dtype}); pass classes=... to give labels")
    bad = np.flatnonzero((y < 0) | (y >= n_classes))
    if bad.size:
        raise ValueError(f"y_true has indices outside [0, {n_classes}) at rows {bad[:10].tolist()}")
    return y.astype(np.int64)


def _check_proba(proba: Any, n_samples: int) -> Any:
    """A 2-D probability matrix: dense, or top-k sparse (:mod:`stackcat.topk`)."""
    proba = proba if is_top_k(proba) else np.asarray(proba)
    if proba.ndim != 2 or proba.shape[0] != n_samples:
        raise ValueError(f"proba must be (n_samples={n_samples}, n_classes); got shape {proba.shape}")
    return proba


# ---------------------------------------------------------------------------
# scores
# ---------------------------------------------------------------------------

def class_counts(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> tuple[np.ndarray, ...]:
    """Per class: true positives, predicted count, true count (support)."""
    tp = np.bincount(y_true[y_true == y_pred], minlength=n_classes)
    return tp, np.bincount(y_pred, minlength=n_classes), np.bincount(y_true, minlength=n_classes)


def f1_per_class(tp: np.ndarray, predicted: np.ndarray, support: np.ndarray) -> np.ndarray:
    """F1 = 2 TP / (predicted + support); 0 where a class is neither true nor predicted."""
    denominator = predicted + support
    return np.divide(2.0 * tp, denominator, out=np.zeros(len(tp)), where=denominator > 0)


def true_class_rank(y_true: np.ndarray, proba: Any) -> np.ndarray:
    """How many classes score at least as high as the true one (ties count against it).

    A top-k matrix ranks a true class it does not store after every stored one.
    """
    if is_top_k(proba):
        return rank_of(proba, y_true)
    ranks = np.empty(len(y_true), dtype=np.int64)
    for start in range(0, len(y_true), RANK_CHUNK):
        block = proba[start:start + RANK_CHUNK]
        true_p = block[np.arange(len(block)), y_true[start:start + RANK_CHUNK]]
        ranks[start:start + RANK_CHUNK] = (block >= true_p[:, None]).sum(axis=1) - 1
    return ranks


def top_k_accuracy(y_true: np.ndarray, proba: Any, k: int = TOP_K) -> float:
    """Share of rows whose true class ranks among the ``k`` first (ties count against it).

    NaN when a top-k matrix keeps fewer than ``k`` classes of a row whose
    true class it does not store: whether that class was in the first ``k``
    is not known (``--oof-top-k 2`` cannot give a top-5 accuracy).

    Examples
    --------
    >>> from stackcat.topk import top_k_rows
    >>> proba = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    >>> top_k_accuracy(np.array([2, 0]), proba, 2), top_k_accuracy(np.array([2, 0]), top_k_rows(proba, 1), 2)
    (0.0, nan)
    """
    if not len(y_true):
        return 0.0
    ranks = true_class_rank(y_true, proba)
    if is_top_k(proba):
        stored = np.diff(proba.tocsr().indptr)
        if ((ranks >= stored) & (stored < min(k, proba.shape[1]))).any():
            return float("nan")
    return float(np.mean(ranks < k))


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE over ``n_bins`` equal-width bins of the top-1 probability, bins (lo, hi]."""
    bins = reliability_bins(confidence, correct, n_bins)
    weights = bins["count"] / max(len(confidence), 1)
    return float(np.sum(weights * np.abs(bins["accuracy"] - bins["confidence"])))


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Per bin: count, mean confidence and accuracy (0 for empty bins)."""
    index = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    safe = np.maximum(count, 1)
    return {
        "count": count,
        "confidence": np.bincount(index, weights=confidence, minlength=n_bins) / safe,
        "accuracy": np.bincount(index, weights=correct.astype(np.float64), minlength=n_bins) / safe,
        "edges": np.linspace(0.0, 1.0, n_bins + 1),
    }


def precision_coverage_curve(confidence: np.ndarray, correct: np.ndarray) -> dict[str, np.ndarray]:
    """Accepting every product with top-1 probability >= t, for each distinct t (highest first).

    Returns the thresholds, the share accepted (coverage) and the precision of
    the accepted products. Ties are accepted or rejected together.
    """
    order = np.argsort(-confidence, kind="stable")
    sorted_confidence = confidence[order]
    hits = np.cumsum(correct[order])
    accepted = np.arange(1, len(order) + 1)
    block_end = np.flatnonzero(np.r_[sorted_confidence[1:] != sorted_confidence[:-1], True])
    return {
        "threshold": sorted_confidence[block_end],
        "coverage": accepted[block_end] / max(len(order), 1),
        "precision": hits[block_end] / accepted[block_end],
    }


def coverage_at_precision(curve: Mapping[str, np.ndarray], target: float) -> tuple[float, float]:
    """(largest coverage whose precision >= target, its threshold); (0.0, inf) if none."""
    ok = np.flatnonzero(curve["precision"] >= target)
    if ok.size == 0:
        return 0.0, float("inf")
    best = ok[np.argmax(curve["coverage"][ok])]
    return float(curve["coverage"][best]), float(curve["threshold"][best])


def _target_key(target: float) -> str:
    return f"{round(target * 100):d}"


def score(y_true: Any, proba: Any, classes: Sequence[Any] | None = None) -> dict[str, float]:
    """The evaluation numbers of one probability matrix.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        Class indices into the columns of ``proba``, or labels when ``classes`` is given.
    proba : array-like of shape (n_samples, n_classes)
    classes : sequence, optional
        The label of each column of ``proba``.

    Returns
    -------
    dict
        ``weighted_f1`` (headline), ``macro_f1`` (over classes that are true
        or predicted, as scikit-learn), ``accuracy``, ``top5_accuracy`` (ties
        count against the true class), ``ece`` (15 bins of the top-1
        probability), and for auto-categorization: ``coverage_at_95`` /
        ``coverage_at_99`` -- the largest share of products whose top-1 can be
        accepted with precision >= 95% / 99% when accepting by decreasing top-1
        probability -- with ``threshold_at_95`` / ``threshold_at_99``, the
        lowest accepted probability (inf when no share reaches the target);
        and ``n_samples``.

    Examples
    --------
    >>> proba = [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]]
    >>> result = score([0, 1, 1, 1], proba)
    >>> result["accuracy"], result["coverage_at_95"], result["threshold_at_95"]
    (0.75, 0.75, 0.7)
    """
    proba = proba if is_top_k(proba) else np.asarray(proba)
    if proba.ndim != 2:
        raise ValueError(f"proba must be 2-D (n_samples, n_classes); got shape {proba.shape}")
    y = as_indices(y_true, proba.shape[1], classes)
    proba = _check_proba(proba, len(y))
    n_classes = proba.shape[1]
    y_pred = row_argmax(proba)
    tp, predicted, support = class_counts(y, y_pred, n_classes)
    f1 = f1_per_class(tp, predicted, support)
    seen = (predicted + support) > 0
    confidence = row_max(proba)
    correct = y_pred == y
    result = {
        "weighted_f1": float(np.sum(f1 * support) / max(support.sum(), 1)),
        "macro_f1": float(f1[seen].mean()) if seen.any() else 0.0,
        "accuracy": float(correct.mean()) if len(y) else 0.0,
        f"top{TOP_K}_accuracy": top_k_accuracy(y, proba, TOP_K),
        "ece": expected_calibration_error(confidence, correct),
    }
    curve = precision_coverage_curve(confidence, correct)
    for target in COVERAGE_TARGETS:
        coverage, threshold = coverage_at_precision(curve, target)
        result[f"coverage_at_{_target_key(target)}"] = coverage
        result[f"threshold_at_{_target_key(target)}"] = threshold
    result["n_samples"] = len(y)
    return result


def per_class_report(y_true: Any, proba: Any, classes: Sequence[Any],
                     train_counts: Sequence[int] | Mapping[Any, int] | None = None,
                     y_kind: str | None = None) -> pd.DataFrame:
    """One row per class: support, predicted count, precision, recall, F1, training frequency.

    ``y_true`` holds labels of ``classes`` or class indices (``y_kind``, see
    :func:`y_as_indices`); ``train_counts`` (per class, in ``classes`` order, or a mapping
    label -> count) fills the ``train_count`` column (NaN without it). Sorted
    by support, largest first (ties keep the ``classes`` order).

    Examples
    --------
    >>> table = per_class_report([0, 1, 1], [[0.9, 0.1], [0.4, 0.6], [0.7, 0.3]], ["a", "b"])
    >>> table[["class", "support", "precision", "recall"]].values.tolist()
    [['b', 2, 1.0, 0.5], ['a', 1, 0.5, 1.0]]
    """
    proba = proba if is_top_k(proba) else np.asarray(proba)
    classes = list(classes)
    if proba.ndim != 2 or proba.shape[1] != len(classes):
        raise ValueError(f"proba has shape {proba.shape} but {len(classes)} classes were given")
    y = y_as_indices(y_true, classes, y_kind)
    proba = _check_proba(proba, len(y))
    tp, predicted, support = class_counts(y, row_argmax(proba), len(classes))
    table = pd.DataFrame({
        "class": pd.Series(classes, dtype=object),
        "support": support,
        "predicted": predicted,
        "precision": np.divide(tp, predicted, out=np.zeros(len(tp)), where=predicted > 0),
        "recall": np.divide(tp, support, out=np.zeros(len(tp)), where=support > 0),
        "f1": f1_per_class(tp, predicted, support),
        "train_count": _train_count_column(train_counts, classes),
    })
    return table.sort_values("support", ascending=False, kind="stable").reset_index(drop=True)


def y_as_indices(y_true: Any, classes: Sequence[Any], y_kind: str | None = None) -> np.ndarray:
    """``y_true`` as int64 indices into ``classes``.

    ``y_kind="labels"``: values of ``classes``; ``"indices"``: positions in
    ``classes``; None: labels when every value is one of ``classes``, else
    indices -- and a ValueError when both readings fit and disagree (integer
    classes ``[0, 2, 3]`` with ``y_true=[0, 2]``), where guessing would
    mislabel silently.

    Examples
    --------
    >>> y_as_indices(["b", "a"], ["a", "b"]).tolist()
    [1, 0]
    >>> y_as_indices([0, 2], [0, 2, 3], y_kind="labels").tolist()
    [0, 1]
    >>> y_as_indices([0, 2], [0, 2, 3], y_kind="indices").tolist()
    [0, 2]
    """
    if y_kind not in (None, *Y_KINDS):
        raise ValueError(f"y_kind must be one of {Y_KINDS} or None; got {y_kind!r}")
    classes = list(classes)
    if y_kind == "labels":
        return as_indices(y_true, len(classes), classes)
    if y_kind == "indices":
        return as_indices(y_true, len(classes))
    y = np.asarray(y_true.to_numpy(dtype=object) if isinstance(y_true, pd.Series) else y_true)
    if y.ndim != 1 or not (pd.Index(classes).get_indexer(y) >= 0).all():
        return as_indices(y, len(classes))
    as_labels = as_indices(y, len(classes), classes)
    readable_as_indices = y.dtype.kind in "iu" and bool(np.all((y >= 0) & (y < len(classes))))
    if readable_as_indices and not np.array_equal(as_labels, y):
        raise ValueError(
            f"y_true {y[:5].tolist()}... reads both as labels of classes {classes[:5]}... and as indices "
            "into them, with different meanings; pass y_kind='labels' or y_kind='indices'"
        )
    return as_labels


def _train_count_column(train_counts: Any, classes: Sequence[Any]) -> np.ndarray:
    if train_counts is None:
        return np.full(len(classes), np.nan)
    if isinstance(train_counts, Mapping):
        return np.array([train_counts.get(c, 0) for c in classes], dtype=np.float64)
    counts = np.asarray(train_counts, dtype=np.float64)
    if counts.shape != (len(classes),):
        raise ValueError(f"train_counts has shape {counts.shape}; expected one count per class ({len(classes)})")
    return counts


def comparison_table(results: Mapping[str, Any], y_true: Any, classes: Sequence[Any] | None = None) -> pd.DataFrame:
    """One row per model / blend / meta (in ``results`` order) with the :func:`score` columns.

    Examples
    --------
    >>> table = comparison_table({"a": [[0.9, 0.1], [0.6, 0.4]], "b": [[0.2, 0.8], [0.3, 0.7]]}, [0, 1])
    >>> table["accuracy"].tolist()
    [0.5, 0.5]
    """
    if not results:
        raise ValueError("results is empty: give at least one model's probabilities")
    rows = {str(name): score(y_true, proba, classes) for name, proba in results.items()}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "model"
    return table


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------

def confused_pairs(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, top: int = 15) -> pd.DataFrame:
    """The ``top`` most frequent (true, predicted) error pairs, counted with one bincount."""
    wrong = y_true != y_pred
    pair_counts = np.bincount(y_true[wrong] * n_classes + y_pred[wrong])
    pairs = np.flatnonzero(pair_counts)
    pairs = pairs[np.argsort(-pair_counts[pairs], kind="stable")][:top]
    return pd.DataFrame({"true": pairs // n_classes, "predicted": pairs % n_classes,
                         "count": pair_counts[pairs]})


def error_reduction(error_reference: float, error_model: float) -> float:
    """Relative error reduction ``(ref - model) / ref``; NaN when the reference makes no error."""
    return (error_reference - error_model) / error_reference if error_reference > 0 else float("nan")

