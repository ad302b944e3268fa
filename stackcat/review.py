"""The review queue: accept confident predictions, send the rest to people.

A marketplace team names the precision it needs from predictions that nobody
checks (say 99 %). The run's out-of-fold (OOF) predictions, which no model saw
in training, tell which top-1 probability reaches that precision: products
predicted at least that confidently are accepted automatically, the others go
to review. The OOF probabilities are those of the stack's meta-learner (its
honest, fold-by-fold refitted ``meta_oof_``), or of the average blend of the
base models when the run has no meta OOF.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from stackcat.metrics import coverage_at_precision, precision_coverage_curve
from stackcat.topk import row_argmax, row_max

AUTO, REVIEW = "auto", "review"


@dataclass(frozen=True)
class ReviewThreshold:
    """The top-1 probability from which predictions are accepted, and what it gave out of fold.

    Attributes
    ----------
    precision : float
        The precision asked for.
    threshold : float
        Accept a prediction whose top-1 probability is at least this
        (``inf`` when no threshold reaches ``precision``: all go to review).
    oof_coverage, oof_precision : float
        Share of the OOF rows accepted at ``threshold``, and their precision
        (for an unreachable target: the best precision any threshold gives, and
        the share accepted there).
    source : str
        Which OOF probabilities: ``"meta:<class>"``, ``"average"`` or a model name.
    n_rows : int
        OOF rows the threshold was estimated on.
    """

    precision: float
    threshold: float
    oof_coverage: float
    oof_precision: float
    source: str
    n_rows: int

    @property
    def reachable(self) -> bool:
        return math.isfinite(self.threshold)

    def describe(self) -> str:
        """One sentence: the threshold and what it gave out of fold, or why every row goes to review."""
        if self.reachable:
            return (f"review threshold: probability >= {self.threshold:.4f} gave precision "
                    f"{self.oof_precision:.4f} on {self.oof_coverage:.1%} of the run's {self.n_rows:,} "
                    f"out-of-fold predictions ({self.source}); target precision {self.precision:g}")
        return (f"precision {self.precision:g} cannot be reached: no threshold on the run's {self.n_rows:,} "
                f"out-of-fold predictions ({self.source}) gives it (the best is {self.oof_precision:.4f}, "
                f"on {self.oof_coverage:.1%} of them), so every row is marked for review; "
                "ask for a lower --precision")


def oof_for_review(stack: Any) -> tuple[np.ndarray, str]:
    """The OOF probabilities the threshold is read from, and their name.

    The meta-learner's own OOF when the stack has it (``evaluate_meta=True``),
    else the average of the base models' OOF (the single model's with one).
    """
    if getattr(stack, "meta_oof_", None) is not None:
        return np.asarray(stack.meta_oof_, dtype=np.float64), f"meta:{type(stack.meta_).__name__}"
    oof = {name: np.asarray(p, dtype=np.float64) for name, p in stack.oof_.items()}
    if len(oof) == 1:
        return next(iter(oof.items()))[::-1]
    return np.mean(list(oof.values()), axis=0), "average"


def review_threshold(stack: Any, precision: float = 0.99) -> ReviewThreshold:
    """The probability threshold that gave ``precision`` on the stack's OOF predictions.

    The lowest threshold (the most rows accepted) whose accepted OOF rows have
    at least ``precision``.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> oof = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    >>> stack = SimpleNamespace(meta_oof_=None, oof_={"ft": oof}, oof_target_=np.array([0, 0, 1, 1]))
    >>> found = review_threshold(stack, precision=0.99)
    >>> found.threshold, found.oof_coverage
    (0.7, 0.75)
    """
    confidence, correct, source = oof_confidence(stack)
    return threshold_for_precision(confidence, correct, precision, source)


def oof_confidence(stack: Any) -> tuple[np.ndarray, np.ndarray, str]:
    """What the review rule reads of a stack's OOF: each row's top-1 probability, whether that class was
    right, and which OOF probabilities they are (:func:`oof_for_review`)."""
    proba, source = oof_for_review(stack)
    return row_max(proba), row_argmax(proba) == np.asarray(stack.oof_target_), source


def threshold_for_precision(confidence: np.ndarray, correct: np.ndarray, precision: float,
                            source: str) -> ReviewThreshold:
    """The lowest top-1 probability whose accepted OOF rows reach ``precision``.

    ``confidence``: each OOF row's top-1 probability; ``correct``: whether its
    top-1 class was right. All a model bundle keeps of the OOF for review.

    Examples
    --------
    >>> found = threshold_for_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 1, 1, 0], bool), 0.99, "ft")
    >>> found.threshold, found.oof_coverage
    (0.7, 0.75)
    """
    if not 0 < precision <= 1:
        raise ValueError(f"precision must be in (0, 1], got {precision}")
    confidence = np.asarray(confidence, dtype=np.float64)
    curve = precision_coverage_curve(confidence, np.asarray(correct, dtype=bool))
    coverage, threshold = coverage_at_precision(curve, precision)
    if math.isfinite(threshold):
        at = int(np.flatnonzero(curve["threshold"] == threshold)[0])
    else:
        at = int(np.argmax(curve["precision"]))
    return ReviewThreshold(precision=precision, threshold=threshold, oof_coverage=float(curve["coverage"][at]),
                           oof_precision=float(curve["precision"][at]), source=source, n_rows=len(confidence))


def review_marks(probability: np.ndarray, threshold: float) -> np.ndarray:
    """``"auto"`` where the top-1 probability reaches ``threshold``, else ``"review"``.

    Examples
    --------
    >>> review_marks(np.array([0.95, 0.5]), 0.9).tolist()
    ['auto', 'review']
    """
    return np.where(np.asarray(probability) >= threshold, AUTO, REVIEW).astype(object)
