"""What every meta-learner shares: input checks, the fitted-state base, the boosted base.

:class:`MetaLearner` gives ``predict`` and the checks of ``fit``/``predict_proba``
inputs; :class:`BoostedMeta` adds what the two CatBoost meta-learners
(:class:`~stackcat.meta.MulticlassMeta`, :class:`~stackcat.meta.RerankMeta`)
share: their common parameters and constraints, the switch for the inner
early-stopping split, the CatBoost parameters, and the baseline accuracies
reported on that split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils._param_validation import Interval, Options
from sklearn.utils.validation import check_is_fitted

from stackcat.topk import is_top_k, row_argmax, take_rows, weighted_sum

LOG_FLOOR = 1e-7  # float16 probabilities underflow below ~6e-8


# ---------------------------------------------------------------------------
# input checks shared by every meta-learner
# ---------------------------------------------------------------------------

def check_probas(
    probas: Mapping[str, np.ndarray],
    model_names: Sequence[str] | None = None,
    n_classes: int | None = None,
) -> tuple[list[str], list[np.ndarray]]:
    """Validate a ``name -> probability matrix`` mapping; return names and matrices.

    With ``model_names`` (the models seen in ``fit``) the mapping must hold
    exactly those models; the matrices come back in that order. Matrices keep
    their dtype (no float16 -> float64 copy of a large OOF).
    """
    if not isinstance(probas, Mapping):
        raise TypeError(f"probas must be a mapping model name -> probability matrix, not {type(probas).__name__}")
    if not probas:
        raise ValueError("probas is empty: give at least one model's probability matrix")
    names = [str(name) for name in probas]
    if model_names is not None:
        missing = [n for n in model_names if n not in names]
        extra = [n for n in names if n not in model_names]
        if missing or extra:
            raise ValueError(
                f"the meta-learner was fitted on models {list(model_names)}; got {names} "
                f"(missing: {missing}, unexpected: {extra})"
            )
        names = list(model_names)
    matrices = [_check_matrix(name, probas[name]) for name in names]
    shapes = {name: m.shape for name, m in zip(names, matrices, strict=True)}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"probability matrices disagree in shape: {shapes}")
    if n_classes is not None and matrices[0].shape[1] != n_classes:
        raise ValueError(
            f"probability matrices have {matrices[0].shape[1]} columns; the meta-learner was "
            f"fitted with {n_classes} classes"
        )
    return names, matrices


def _check_matrix(name: str, matrix: Any) -> Any:
    if is_top_k(matrix):  # top-k CSR (stackcat.topk): check the stored values
        matrix = matrix.tocsr()
        if matrix.dtype.kind != "f":
            matrix = matrix.astype(np.float32)
        bad = np.unique(np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))[~np.isfinite(matrix.data)])
        if bad.size:
            raise ValueError(f"probas[{name!r}] has NaN or infinite values in rows {bad[:10].tolist()}")
        return matrix
    matrix = np.asarray(matrix)
    if matrix.ndim != 2:
        raise ValueError(f"probas[{name!r}] must be 2-D (n_samples, n_classes); got shape {matrix.shape}")
    if matrix.dtype.kind not in "fiub":
        raise TypeError(f"probas[{name!r}] must hold numbers; got dtype {matrix.dtype}")
    if matrix.dtype.kind != "f":
        matrix = matrix.astype(np.float32)
    row_sums = matrix.sum(axis=1, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(row_sums))
    if bad.size:
        raise ValueError(f"probas[{name!r}] has NaN or infinite values in rows {bad[:10].tolist()}")
    return matrix


def check_targets(y: Any, n_samples: int, n_classes: int) -> np.ndarray:
    """``y`` as an int64 array of class indices in ``[0, n_classes)``."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be 1-D class indices; got shape {y.shape}")
    if len(y) != n_samples:
        raise ValueError(f"the probability matrices have {n_samples} rows but y has {len(y)}")
    if y.dtype.kind not in "iu":
        if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise TypeError(f"y must hold integer class indices (the engine maps labels); got dtype {y.dtype}")
    bad = np.flatnonzero((y < 0) | (y >= n_classes))
    if bad.size:
        raise ValueError(
            f"y has class indices outside [0, {n_classes}) at rows {bad[:10].tolist()} "
            f"(values {y[bad[:10]].tolist()})"
        )
    return y.astype(np.int64)


def inner_eval_mask(y: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Rows for an inner early-stopping split, stratified where a class allows it.

    Each class sends ``fraction`` of its rows to the eval side (stochastic
    rounding, so small classes contribute in expectation), but always keeps at
    least one row on the training side: a 1-member class never leaves training.
    """
    order = np.lexsort((rng.random(len(y)), y))  # rows grouped by class, shuffled inside
    counts = np.bincount(y)
    starts = np.cumsum(counts) - counts
    rank_in_class = np.arange(len(y)) - np.repeat(starts, counts)
    n_eval = np.floor(counts * fraction + rng.random(len(counts))).astype(np.int64)
    n_eval = np.minimum(n_eval, np.maximum(counts - 1, 0))
    mask = np.zeros(len(y), dtype=bool)
    mask[order] = rank_in_class < np.repeat(n_eval, counts)
    return mask


def check_signals(signals: Mapping[str, np.ndarray] | None, n_samples: int, n_classes: int,
                  names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Validate ``signal name -> (n_samples, n_classes)`` scores (see :mod:`stackcat.meta.retrieval`).

    With ``names`` (the signals seen in ``fit``) exactly those must be given.
    """
    signals = dict(signals or {})
    if names is not None:
        missing = [n for n in names if n not in signals]
        if missing:
            raise ValueError(f"the meta-learner was fitted with signals {list(names)}; missing: {missing}")
        signals = {n: signals[n] for n in names}
    for name, matrix in signals.items():
        shape = np.shape(matrix)
        if shape != (n_samples, n_classes):
            raise ValueError(f"signals[{name!r}] has shape {shape}; expected ({n_samples}, {n_classes})")
    return signals


def signal_group(name: str) -> str:
    """``"names"`` for category-name signals (``name:...``), else ``"retrieval"``."""
    return "names" if name.startswith("name:") else "retrieval"


class _MetaBase(BaseEstimator):
    """Shared fitted-state checks and ``predict`` (argmax of ``predict_proba``)."""

    _runtime_params: tuple[str, ...] = ()  # see stackcat.runs.runtime_params

    def predict(self, probas: Mapping[str, np.ndarray], **context: Any) -> np.ndarray:
        """Class indices: the argmax of :meth:`predict_proba`."""
        return np.argmax(self.predict_proba(probas, **context), axis=1)

    def _fit_inputs(self, probas: Mapping[str, np.ndarray], y: Any) -> tuple[list[np.ndarray], np.ndarray]:
        names, matrices = check_probas(probas)
        n_samples, n_classes = matrices[0].shape
        y = check_targets(y, n_samples, n_classes)
        if n_samples == 0:
            raise ValueError("cannot fit a meta-learner on 0 rows")
        self.model_names_ = names
        self.n_classes_ = n_classes
        self.classes_ = np.arange(n_classes)
        self.class_counts_ = np.bincount(y, minlength=n_classes)
        return matrices, y

    def _predict_inputs(self, probas: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        check_is_fitted(self, "model_names_")
        return check_probas(probas, self.model_names_, self.n_classes_)[1]


class _BoostedMeta(_MetaBase):
    """What the CatBoost meta-learners share.

    Subclasses define ``__init__`` with (at least) the parameters constrained
    here and extend ``_parameter_constraints``; they hold out an inner split
    for early stopping when :meth:`_early_stopping` says so, build their
    booster from :meth:`_catboost_params`, and report that split with
    :meth:`_inner_split_scores`.
    """

    _runtime_params = ("n_threads", "verbose")
    _parameter_constraints: dict = {
        "iterations": [Interval(Integral, 1, None, closed="left")],
        "learning_rate": [Interval(Real, 0, None, closed="neither"), None],
        "depth": [Interval(Integral, 1, 16, closed="both")],
        "l2_leaf_reg": [Interval(Real, 0, None, closed="left")],
        "early_stopping_rounds": [Interval(Integral, 1, None, closed="left"), None],
        "eval_fraction": [Interval(Real, 0, 1, closed="left")],
        "refit": ["boolean"],
        "n_threads": [Interval(Integral, 1, None, closed="left"), Options(Integral, {-1}), None],
        "random_state": [Interval(Integral, 0, None, closed="left")],
        "verbose": ["boolean", Interval(Integral, 0, None, closed="left")],
    }

    def _early_stopping(self) -> bool:
        """Whether ``fit`` holds out an inner split (off with no rounds or a 0 fraction)."""
        return self.early_stopping_rounds is not None and self.eval_fraction != 0

    def _catboost_params(self, iterations: int) -> dict[str, Any]:
        """CatBoost parameters common to both boosters, for ``iterations`` trees."""
        params = {
            "iterations": iterations,
            "depth": self.depth,
            "l2_leaf_reg": self.l2_leaf_reg,
            "thread_count": self._thread_count(),
            "random_seed": self.random_state,
            "verbose": self.verbose,
            "allow_writing_files": False,  # no catboost_info/ in the caller's directory
        }
        if self.learning_rate is not None:
            params["learning_rate"] = self.learning_rate
        return params

    def _thread_count(self) -> int:
        """CatBoost's ``thread_count`` for ``n_threads``: None (and -1) is every core."""
        return -1 if self.n_threads is None else self.n_threads

    @staticmethod
    def _inner_split_scores(chosen_right: np.ndarray, logloss: float, matrices: Sequence[Any],
                            rows: np.ndarray, y_eval: np.ndarray, **extra: float) -> dict[str, float]:
        """``inner_scores_``: the meta's accuracy and log loss on the inner split ``rows``, next to
        the plain average's and the best single model's accuracy on the same rows (``extra`` before
        the log loss)."""
        return {
            "n_products": int(len(y_eval)),
            "accuracy": float(np.mean(chosen_right)),
            "average_accuracy": float(np.mean(_argmax_of_mean(matrices, rows) == y_eval)),
            "best_model_accuracy": float(max(np.mean(row_argmax(take_rows(m, rows)) == y_eval)
                                             for m in matrices)),
            **{name: float(value) for name, value in extra.items()},
            "logloss": float(logloss),
        }


def _argmax_of_mean(matrices: Sequence[Any], rows: np.ndarray) -> np.ndarray:
    return row_argmax(weighted_sum([take_rows(m, rows) for m in matrices], [1.0] * len(matrices)))
