"""Meta-learners: combine the base models' out-of-fold probabilities into one prediction.

Every meta-learner takes ``probas``, a mapping ``model name -> (n_samples,
n_classes) probability matrix`` (columns = the global class list; float16,
float32 or float64), and ``y``, class indices in ``[0, n_classes)``:

* :class:`AverageBlend` -- the (weighted) mean of the base probabilities, the
  baseline every learned meta must beat.
* :class:`MulticlassMeta` -- CatBoost MultiClass on the concatenated
  log-probabilities; for tasks with few classes.
* :class:`RerankMeta` -- a CatBoost candidate re-ranker; the default above 50
  classes, where a MultiClass booster on ``n_models * n_classes`` features does
  not scale (one iteration of an 840-class MultiClass on 20k rows takes minutes).

:func:`make_meta` picks one by name (``"auto"`` chooses by the number of classes).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import numpy as np
from scipy import sparse
from scipy.optimize import minimize_scalar
from scipy.special import entr
from sklearn.base import BaseEstimator, _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from stackcat.models._base import normalize_rows
from stackcat.progress import progress_bar
from stackcat.topk import (
    dense_rows,
    is_top_k,
    normalized_rows,
    row_argmax,
    take_rows,
    values_at,
    weighted_sum,
)

AUTO_RERANK_ABOVE = 50
RERANK_LOSSES = ("Logloss", "YetiRank", "YetiRankPairwise", "PairLogit",
                 "PairLogitPairwise", "QuerySoftMax", "QueryRMSE")
LOG_FLOOR = 1e-7  # float16 probabilities underflow below ~6e-8
ROW_CHUNK = 4096  # products per feature-building step: bounds the float32 temporaries
ITERATIVE_TOP_MAX_DEPTH = 32
RARE_CLASS_COUNT = 3  # class counts below this look alike to the re-ranker (see RerankMeta._candidates)


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
    """Validate ``signal name -> (n_samples, n_classes)`` scores (see :mod:`stackcat.retrieval`).

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


def _catboost_common(estimator: Any) -> dict[str, Any]:
    params = {
        "iterations": estimator.iterations,
        "depth": estimator.depth,
        "thread_count": estimator.thread_count,
        "random_seed": estimator.random_state,
        "verbose": estimator.verbose,
        "allow_writing_files": False,  # no catboost_info/ in the caller's directory
    }
    if estimator.learning_rate is not None:
        params["learning_rate"] = estimator.learning_rate
    return params


class _MetaBase(BaseEstimator):
    """Shared fitted-state checks and ``predict`` (argmax of ``predict_proba``)."""

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


# ---------------------------------------------------------------------------
# AverageBlend
# ---------------------------------------------------------------------------

class AverageBlend(_MetaBase):
    """The plain (or weighted) mean of the base models' probabilities.

    The baseline that every learned meta-learner is reported against: with
    strong, well-calibrated base models it is hard to beat.

    Parameters
    ----------
    weights : mapping name -> float, sequence of float, or None, default=None
        One non-negative weight per model (a sequence follows the order of the
        ``probas`` mapping given to ``fit``); None weighs models equally.
    calibrate : bool, default=False
        Temperature-scale each model's probabilities first
        (:func:`member_temperature`, fitted on ``y``): a model that is
        over-confident out of fold stops drowning the others.

    Attributes
    ----------
    model_names_ : list of str
    weights_ : ndarray of shape (n_models,)
        Normalized weights (sum to 1), in ``model_names_`` order.
    n_classes_ : int

    Examples
    --------
    >>> import numpy as np
    >>> probas = {"text": np.array([[0.8, 0.2], [0.4, 0.6]]),
    ...           "image": np.array([[0.6, 0.4], [0.8, 0.2]])}
    >>> AverageBlend().fit(probas, [0, 1]).predict_proba(probas).round(2).tolist()
    [[0.7, 0.3], [0.6, 0.4]]
    """

    _parameter_constraints: dict = {"weights": [Mapping, "array-like", None], "calibrate": ["boolean"]}

    def __init__(self, weights: Mapping[str, float] | Sequence[float] | None = None,
                 calibrate: bool = False) -> None:
        self.weights = weights
        self.calibrate = calibrate

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, probas: Mapping[str, np.ndarray], y: Any, **context: Any) -> AverageBlend:
        """Record the model names, normalize the weights and (``calibrate``) fit each model's temperature.

        ``context`` (signals, ancestors) is accepted for a common interface and ignored.
        """
        matrices, y = self._fit_inputs(probas, y)
        self.weights_ = self._normalized_weights()
        self.temperatures_ = (np.array([member_temperature(m, y) for m in matrices]) if self.calibrate
                              else np.ones(len(matrices)))
        return self

    def predict_proba(self, probas: Mapping[str, np.ndarray], **context: Any) -> np.ndarray:
        """The weighted mean probabilities ``(n_samples, n_classes)``; rows sum to 1."""
        matrices = self._predict_inputs(probas)
        return blend(matrices, self.weights_, getattr(self, "temperatures_", np.ones(len(matrices))))

    def _normalized_weights(self) -> np.ndarray:
        names = self.model_names_
        if self.weights is None:
            weights = np.ones(len(names))
        elif isinstance(self.weights, Mapping):
            unknown = sorted(set(map(str, self.weights)) - set(names))
            missing = [n for n in names if n not in self.weights]
            if unknown or missing:
                raise ValueError(f"weights must name the models {names} (missing: {missing}, unknown: {unknown})")
            weights = np.array([self.weights[n] for n in names], dtype=np.float64)
        else:
            weights = np.asarray(self.weights, dtype=np.float64).ravel()
            if len(weights) != len(names):
                raise ValueError(f"got {len(weights)} weights for {len(names)} models {names}")
        if np.any(weights < 0) or not np.isfinite(weights).all() or weights.sum() <= 0:
            raise ValueError(f"weights must be finite, non-negative and not all 0; got {weights.tolist()}")
        return weights / weights.sum()


def scale_temperature(matrix: Any, temperature: float) -> Any:
    """``p ** (1 / T)`` renormalized: T > 1 softens a model's probabilities, T < 1 sharpens them.

    A top-k matrix is scaled over its stored entries (the unstored rest is left out).
    """
    if is_top_k(matrix):
        scaled = matrix.astype(np.float64)
        scaled.data = np.power(np.maximum(scaled.data, 0.0), 1.0 / temperature)
        return normalized_rows(scaled)
    matrix = np.asarray(matrix, dtype=np.float64)
    if temperature == 1.0:
        return normalize_rows(matrix.copy())
    return normalize_rows(np.power(np.maximum(matrix, 0.0), 1.0 / temperature))


def true_class_proba(matrix: Any, y: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Each row's temperature-scaled probability of its true class ``y`` (all a log loss needs)."""
    scaled = scale_temperature(matrix, temperature)
    return values_at(scaled, y)


def member_temperature(matrix: Any, y: np.ndarray, max_cells: int = 20_000_000) -> float:
    """The temperature that minimizes a model's log loss on its OOF rows (a sample of at most
    ``max_cells`` probabilities)."""
    rows = np.arange(len(y))
    max_rows = max(max_cells // max(matrix.shape[1], 1), 1000)
    if len(rows) > max_rows:
        rows = np.sort(np.random.default_rng(0).choice(rows, max_rows, replace=False))
    log_p = np.log(np.maximum(dense_rows(matrix, rows).astype(np.float64), LOG_FLOOR))
    truth = y[rows]

    def loss(log_t: float) -> float:
        scaled = log_p / np.exp(log_t)
        scaled -= scaled.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(scaled).sum(axis=1))
        return float(np.mean(log_norm - scaled[np.arange(len(truth)), truth]))

    result = minimize_scalar(loss, bounds=(-3.0, 3.0), method="bounded", options={"xatol": 1e-3})
    return float(np.exp(result.x))


def blend(matrices: Sequence[Any], weights: np.ndarray, temperatures: np.ndarray) -> Any:
    """Weighted mean of temperature-scaled probability matrices; rows sum to 1 (top-k in, top-k out)."""
    scaled = [scale_temperature(m, t) if w else m for m, w, t in zip(matrices, weights, temperatures, strict=True)]
    return normalized_rows(weighted_sum(scaled, weights))


class EnsembleSelection(_MetaBase):
    """Greedy ensemble selection (Caruana et al., 2004) over the base models' OOF probabilities.

    Starting from the best single model, each step adds (with replacement)
    the model whose inclusion most lowers the blend's log loss on ``y``; a
    model's weight is how often it was picked. Each model is temperature-scaled
    first (``calibrate``). The blend never ranks worse than the best single
    model on the rows it was fitted on, and it learns to drop a model that only
    adds noise, which the plain average cannot.

    Parameters
    ----------
    n_iterations : int, default=50
        Selection steps (the total weight).
    calibrate : bool, default=True
        Temperature-scale each model before blending (:func:`member_temperature`).

    Attributes
    ----------
    weights_ : ndarray of shape (n_models,)
        Share of the steps that picked each model (sums to 1).
    temperatures_ : ndarray of shape (n_models,)
    trajectory_ : list of float
        The blend's log loss after each step.
    model_names_, n_classes_, class_counts_

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 4, 300)
    >>> good = np.eye(4)[y] * 2 + rng.random((300, 4))
    >>> noise = rng.random((300, 4))
    >>> probas = {"good": good / good.sum(1, keepdims=True), "noise": noise / noise.sum(1, keepdims=True)}
    >>> selection = EnsembleSelection(n_iterations=10).fit(probas, y)
    >>> dict(zip(selection.model_names_, selection.weights_.round(1).tolist()))
    {'good': 1.0, 'noise': 0.0}
    """

    _parameter_constraints: dict = {
        "n_iterations": [Interval(Integral, 1, None, closed="left")],
        "calibrate": ["boolean"],
    }

    def __init__(self, n_iterations: int = 50, calibrate: bool = True) -> None:
        self.n_iterations = n_iterations
        self.calibrate = calibrate

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, probas: Mapping[str, np.ndarray], y: Any, **context: Any) -> EnsembleSelection:
        """Select the models' weights on out-of-fold ``probas`` and class indices ``y``."""
        matrices, y = self._fit_inputs(probas, y)
        self.temperatures_ = (np.array([member_temperature(m, y) for m in matrices]) if self.calibrate
                              else np.ones(len(matrices)))
        # every scaled row sums to 1, so the blend's log loss needs only the true class's probability
        truth = [true_class_proba(m, y, t) for m, t in zip(matrices, self.temperatures_, strict=True)]
        counts = np.zeros(len(truth))
        total = np.zeros(len(y))
        self.trajectory_ = []
        for step in range(self.n_iterations):
            losses = [float(-np.mean(np.log(np.maximum((total + t) / (step + 1), 1e-15)))) for t in truth]
            best = int(np.argmin(losses))
            counts[best] += 1
            total += truth[best]
            self.trajectory_.append(losses[best])
        self.weights_ = counts / counts.sum()
        return self

    def predict_proba(self, probas: Mapping[str, np.ndarray], **context: Any) -> np.ndarray:
        """The selected blend ``(n_samples, n_classes)``; rows sum to 1."""
        matrices = self._predict_inputs(probas)
        return blend(matrices, self.weights_, self.temperatures_)


# ---------------------------------------------------------------------------
# MulticlassMeta
# ---------------------------------------------------------------------------

def log_features(matrices: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenated log-probabilities ``(n_samples, n_models * n_classes)`` in float32."""
    columns = [np.log(np.maximum(dense_rows(m, slice(None)), LOG_FLOOR)) for m in matrices]
    return np.concatenate(columns, axis=1)


class MulticlassMeta(_MetaBase):
    """CatBoost MultiClass on the concatenated out-of-fold log-probabilities.

    For tasks with few classes: the booster sees ``n_models * n_classes``
    features and grows one tree per iteration over all classes, which does not
    scale to hundreds of classes (use :class:`RerankMeta` there).

    Classes absent from ``y`` get probability 0. Early stopping uses an inner
    split stratified where a class has at least 2 rows (a 1-member class stays
    on the training side); with ``refit=True`` the booster is then retrained on
    every row for the number of iterations found.

    Parameters
    ----------
    iterations : int, default=500
        Maximum boosting iterations.
    learning_rate : float or None, default=None
        None lets CatBoost choose it.
    depth : int, default=4
    l2_leaf_reg : float, default=3.0
    early_stopping_rounds : int or None, default=50
        None (or ``eval_fraction=0``) trains ``iterations`` trees on all rows.
    eval_fraction : float, default=0.15
        Share of rows in the inner early-stopping split.
    refit : bool, default=True
        Retrain on all rows with the early-stopped number of iterations.
    thread_count : int, default=-1
        CatBoost threads; -1 uses every core.
    random_state : int, default=0
    verbose : bool or int, default=False
        CatBoost's progress output (an int logs every that many iterations).

    Attributes
    ----------
    model_ : catboost.CatBoostClassifier or None
        None when ``y`` holds a single class (that class then gets probability 1).
    present_classes_ : ndarray
        Class indices seen in ``y``; the others get probability 0.
    best_iteration_ : int
        Number of trees in the final model.
    inner_scores_ : dict
        On the inner split: ``n_products``, ``accuracy`` (meta),
        ``average_accuracy`` and ``best_model_accuracy`` (the baselines on
        the same rows), ``logloss``. Empty without early stopping.
    model_names_, n_classes_, class_counts_

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 3, 200)
    >>> noisy = lambda s: np.eye(3)[y] * s + rng.random((200, 3))
    >>> probas = {"a": noisy(1.0), "b": noisy(0.5)}
    >>> probas = {k: v / v.sum(1, keepdims=True) for k, v in probas.items()}
    >>> meta = MulticlassMeta(iterations=30, thread_count=1).fit(probas, y)
    >>> meta.predict_proba(probas).shape
    (200, 3)
    """

    _parameter_constraints: dict = {
        "iterations": [Interval(Integral, 1, None, closed="left")],
        "learning_rate": [Interval(Real, 0, None, closed="neither"), None],
        "depth": [Interval(Integral, 1, 16, closed="both")],
        "l2_leaf_reg": [Interval(Real, 0, None, closed="left")],
        "early_stopping_rounds": [Interval(Integral, 1, None, closed="left"), None],
        "eval_fraction": [Interval(Real, 0, 1, closed="left")],
        "refit": ["boolean"],
        "thread_count": [Interval(Integral, -1, None, closed="left")],
        "random_state": [Interval(Integral, 0, None, closed="left")],
        "verbose": ["boolean", Interval(Integral, 0, None, closed="left")],
    }

    def __init__(
        self,
        iterations: int = 500,
        learning_rate: float | None = None,
        depth: int = 4,
        l2_leaf_reg: float = 3.0,
        early_stopping_rounds: int | None = 50,
        eval_fraction: float = 0.15,
        refit: bool = True,
        thread_count: int = -1,
        random_state: int = 0,
        verbose: bool | int = False,
    ) -> None:
        self.iterations = iterations
        self.learning_rate = learning_rate
        self.depth = depth
        self.l2_leaf_reg = l2_leaf_reg
        self.early_stopping_rounds = early_stopping_rounds
        self.eval_fraction = eval_fraction
        self.refit = refit
        self.thread_count = thread_count
        self.random_state = random_state
        self.verbose = verbose

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, probas: Mapping[str, np.ndarray], y: Any, **context: Any) -> MulticlassMeta:
        """Train the booster on out-of-fold ``probas`` and class indices ``y`` (``context`` is ignored)."""
        matrices, y = self._fit_inputs(probas, y)
        self.present_classes_ = np.flatnonzero(self.class_counts_)
        self.inner_scores_ = {}
        if len(self.present_classes_) < 2:
            self.model_, self.best_iteration_ = None, 0
            return self
        features = log_features(matrices)
        eval_mask = self._eval_mask(y)
        if eval_mask.any():
            model = self._booster(self.iterations).fit(
                features[~eval_mask], y[~eval_mask],
                eval_set=(features[eval_mask], y[eval_mask]),
                early_stopping_rounds=self.early_stopping_rounds, use_best_model=True,
            )
            self.best_iteration_ = model.get_best_iteration() + 1
            self.inner_scores_ = self._inner_scores(model, features[eval_mask], y[eval_mask], matrices, eval_mask)
            if self.refit:
                model = self._booster(self.best_iteration_).fit(features, y)
        else:
            model = self._booster(self.iterations).fit(features, y)
            self.best_iteration_ = model.tree_count_
        self.model_ = model
        return self

    def predict_proba(self, probas: Mapping[str, np.ndarray], **context: Any) -> np.ndarray:
        """Probabilities ``(n_samples, n_classes)``; classes absent from training get 0."""
        matrices = self._predict_inputs(probas)
        proba = np.zeros(matrices[0].shape, dtype=np.float64)
        if self.model_ is None or len(proba) == 0:
            proba[:, self.present_classes_] = 1.0  # a single class seen in y: it gets 1
            return proba
        proba[:, self.model_.classes_.astype(np.int64)] = self.model_.predict_proba(log_features(matrices))
        return normalize_rows(proba)

    def _eval_mask(self, y: np.ndarray) -> np.ndarray:
        if self.early_stopping_rounds is None or self.eval_fraction == 0:
            return np.zeros(len(y), dtype=bool)
        mask = inner_eval_mask(y, self.eval_fraction, np.random.default_rng(self.random_state))
        if len(np.unique(y[~mask])) < 2:  # the training side needs two classes
            return np.zeros(len(y), dtype=bool)
        return mask

    def _booster(self, iterations: int) -> Any:
        from catboost import CatBoostClassifier

        params = _catboost_common(self) | {"iterations": iterations, "l2_leaf_reg": self.l2_leaf_reg}
        return CatBoostClassifier(loss_function="MultiClass", **params)

    def _inner_scores(self, model: Any, features: np.ndarray, y: np.ndarray,
                      matrices: Sequence[np.ndarray], eval_mask: np.ndarray) -> dict[str, float]:
        proba = np.zeros((len(y), self.n_classes_))
        proba[:, model.classes_.astype(np.int64)] = model.predict_proba(features)
        return {
            "n_products": int(len(y)),
            "accuracy": float(np.mean(proba.argmax(1) == y)),
            "average_accuracy": float(np.mean(_argmax_of_mean(matrices, eval_mask) == y)),
            "best_model_accuracy": float(max(np.mean(row_argmax(take_rows(m, eval_mask)) == y) for m in matrices)),
            "logloss": float(-np.mean(np.log(np.maximum(proba[np.arange(len(y)), y], 1e-15)))),
        }


# ---------------------------------------------------------------------------
# RerankMeta: candidate generation and features
# ---------------------------------------------------------------------------

@dataclass
class CandidateSet:
    """One row per (product, candidate class), rows grouped by product."""

    product: np.ndarray   # (n_rows,) int64, non-decreasing
    label: np.ndarray     # (n_rows,) int64 candidate class index
    features: np.ndarray  # (n_rows, n_features) float32
    n_products: int

    @property
    def starts(self) -> np.ndarray:
        """Offset of each product's first row (every product has at least one)."""
        return np.searchsorted(self.product, np.arange(self.n_products))


def candidate_feature_names(model_names: Sequence[str], signal_names: Sequence[str] = (),
                            hierarchy_levels: int = 0) -> list[str]:
    """Names of the columns built by :func:`build_candidates`, in order."""
    per_source = ["p", "rank", "p_rel_top1", "gap_best_other", "top1", "margin", "entropy"]
    sources = [*model_names, "mean"]
    names = [f"{source}:{feature}" for source in sources for feature in per_source]
    names += ["max_p", "min_p", "std_p", "mean_log_p", "mean_log_p_rank", "n_models_first",
              "n_models_topk", "class_log_count", "n_candidates"]
    names += [f"{signal}:{feature}" for signal in signal_names for feature in ("value", "rank", "gap_top1")]
    for level in range(1, hierarchy_levels + 1):
        names += [f"{source}:mass_up{level}" for source in sources]
        names += [f"under_top_up{level}"]
    return names


def _sorted_top(matrix: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Column indices and values of each row's ``depth`` largest entries, largest first.

    Repeated row-wise argmax: float16 OOF rows are mostly exact zeros, and
    ``np.argpartition`` slows down more than tenfold on such ties. Ties go to
    the lowest column.
    """
    if depth > ITERATIVE_TOP_MAX_DEPTH:
        top = np.argpartition(-matrix, depth - 1, axis=1)[:, :depth]
        order = np.argsort(-np.take_along_axis(matrix, top, axis=1), axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        return top, np.take_along_axis(matrix, top, axis=1)
    work = matrix.copy()
    rows = np.arange(len(matrix))
    top = np.empty((len(matrix), depth), dtype=np.int64)
    values = np.empty((len(matrix), depth), dtype=matrix.dtype)
    for j in range(depth):
        top[:, j] = work.argmax(axis=1)
        values[:, j] = work[rows, top[:, j]]
        work[rows, top[:, j]] = -np.inf
    return top, values


def _source_features(matrix: np.ndarray, top_index: np.ndarray, top_value: np.ndarray,
                     product: np.ndarray, label: np.ndarray) -> list[np.ndarray]:
    """The seven per-source columns (see :func:`candidate_feature_names`) for one model."""
    p = matrix[product, label]
    depth = top_index.shape[1]
    hit = top_index[product] == label[:, None]
    rank = np.where(hit.any(axis=1), hit.argmax(axis=1), depth)
    top1 = top_value[:, 0]
    top2 = top_value[:, 1] if depth > 1 else np.zeros_like(top1)
    best_other = np.where(rank == 0, top2[product], top1[product])
    entropy = entr(matrix).sum(axis=1)
    return [p, rank, p / np.maximum(top1[product], LOG_FLOOR), p - best_other,
            top1[product], (top1 - top2)[product], entropy[product]]


def rank_in_group(values: np.ndarray, group: np.ndarray, group_sizes: np.ndarray) -> np.ndarray:
    """0-based rank of each row's value (largest first) among the rows of its group.

    Rows must be grouped (``group`` non-decreasing); ties go to the earlier row.
    """
    order = np.lexsort((-values, group))
    starts = np.cumsum(group_sizes) - group_sizes
    rank = np.empty(len(values), dtype=np.int64)
    rank[order] = np.arange(len(values)) - np.repeat(starts, group_sizes)
    return rank


def _signal_features(signal: np.ndarray, top_index: np.ndarray, top_value: np.ndarray,
                     product: np.ndarray, label: np.ndarray) -> list[np.ndarray]:
    """A signal's value at the candidate, the candidate's rank in it, and its gap to the row's best."""
    value = signal[product, label]
    hit = top_index[product] == label[:, None]
    rank = np.where(hit.any(axis=1), hit.argmax(axis=1), top_index.shape[1])
    return [value, rank, value - top_value[product, 0]]


def _hierarchy_features(sources: Sequence[np.ndarray], ancestors: np.ndarray, levels: int,
                        product: np.ndarray, label: np.ndarray) -> list[np.ndarray]:
    """Each source's probability mass on the candidate's ancestor ``level`` steps up, and whether
    that ancestor is the one the mean of the models puts most mass on."""
    columns = []
    for level in range(levels):
        # compact node numbers of this level; classes above the top (-1) share one
        _, node = np.unique(ancestors[:, level], return_inverse=True)
        incidence = np.zeros((len(node), int(node.max()) + 1), dtype=np.float32)
        incidence[np.arange(len(node)), node] = 1.0
        masses = [matrix @ incidence for matrix in sources]
        columns += [mass[product, node[label]] for mass in masses]
        columns.append((masses[-1].argmax(axis=1)[product] == node[label]).astype(np.float32))
    return columns


def _candidate_chunk(chunk: list[np.ndarray], top_k: int, depth: int, class_log_count: np.ndarray,
                     signal_chunk: Sequence[np.ndarray] = (), candidate_signals: Sequence[int] = (),
                     ancestors: np.ndarray | None = None,
                     hierarchy_levels: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidates and their features for one block of products (all models' rows)."""
    mean = np.zeros(chunk[0].shape, dtype=np.float32)
    for matrix in chunk:
        mean += matrix
    mean /= len(chunk)
    sources = [*chunk, mean]
    tops = [_sorted_top(matrix, depth) for matrix in sources]
    signal_tops = [_sorted_top(signal, depth) for signal in signal_chunk]

    from_models = np.concatenate([index[:, :top_k] for index, _ in tops], axis=1)
    # A class no model gives any probability is noise, except the mean's own top-1
    # (every product keeps at least one candidate) and the top of a retrieval signal.
    useful = (np.take_along_axis(mean, from_models, axis=1) > 0) | (from_models == tops[-1][0][:, :1])
    from_signals = [signal_tops[i][0][:, :top_k] for i in candidate_signals]
    pooled = np.sort(np.concatenate([np.where(useful, from_models, -1), *from_signals], axis=1), axis=1)
    keep = pooled >= 0
    keep[:, 1:] &= pooled[:, 1:] != pooled[:, :-1]
    product, slot = np.nonzero(keep)
    label = pooled[product, slot]

    columns: list[np.ndarray] = []
    for matrix, (top_index, top_value) in zip(sources, tops, strict=True):
        columns += _source_features(matrix, top_index, top_value, product, label)
    model_p = np.stack(columns[0:7 * len(chunk):7], axis=1)
    model_rank = np.stack(columns[1:7 * len(chunk):7], axis=1)
    n_candidates = np.bincount(product, minlength=len(mean))
    # The product of experts: log of the geometric mean, and the candidate's rank by it.
    mean_log_p = np.log(np.maximum(model_p, LOG_FLOOR)).mean(axis=1)
    columns += [model_p.max(axis=1), model_p.min(axis=1), model_p.std(axis=1),
                mean_log_p, rank_in_group(mean_log_p, product, n_candidates),
                (model_rank == 0).sum(axis=1), (model_rank < top_k).sum(axis=1),
                class_log_count[label], n_candidates[product]]
    for signal, (top_index, top_value) in zip(signal_chunk, signal_tops, strict=True):
        columns += _signal_features(signal, top_index, top_value, product, label)
    if hierarchy_levels:
        columns += _hierarchy_features(sources, ancestors, hierarchy_levels, product, label)
    features = np.column_stack([np.asarray(c, dtype=np.float32) for c in columns])
    return product, label, features


def build_candidates(matrices: Sequence[np.ndarray], top_k: int, class_log_count: np.ndarray,
                     *, signals: Sequence[np.ndarray] = (), candidate_signals: Sequence[int] = (),
                     ancestors: np.ndarray | None = None, hierarchy_levels: int = 0,
                     rank_depth: int | None = None, progress: bool = False) -> CandidateSet:
    """Candidate rows for every product: the union of each model's and the mean's top-k.

    ``signals`` (retrieval and category-name scores, :mod:`stackcat.retrieval`)
    add three features each; the signals at positions ``candidate_signals``
    also add their top-k classes as candidates, so a class that no model ranks
    (1-2 training products) can still be chosen. ``ancestors``
    (:attr:`stackcat.taxonomy.CategoryTree.ancestors`) adds each source's
    probability mass on the candidate's parent, grandparent ... up to
    ``hierarchy_levels``.

    Ranks are exact inside each source's top ``rank_depth`` (default
    ``max(2 * top_k, 10)``) and equal ``rank_depth`` beyond it. Products are
    processed in blocks of :data:`ROW_CHUNK` rows, so the float32 working set
    stays small whatever the number of products.
    """
    n_products, n_classes = matrices[0].shape
    top_k = min(top_k, n_classes)
    depth = min(rank_depth or max(2 * top_k, 10), n_classes)
    products, labels, features = [], [], []
    starts = range(0, n_products, ROW_CHUNK)
    for start in progress_bar(starts, desc="rerank candidates", unit="block", enabled=progress):
        rows = slice(start, start + ROW_CHUNK)
        chunk = [dense_rows(m, rows, spread=False) for m in matrices]
        signal_chunk = [dense_rows(s, rows, spread=False) for s in signals]
        product, label, block = _candidate_chunk(chunk, top_k, depth, class_log_count, signal_chunk,
                                                 candidate_signals, ancestors, hierarchy_levels)
        products.append(product + start)
        labels.append(label)
        features.append(block)
    return CandidateSet(np.concatenate(products).astype(np.int64), np.concatenate(labels).astype(np.int64),
                        np.concatenate(features), n_products)


def group_softmax(scores: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Softmax of ``scores`` inside each group of consecutive rows starting at ``starts``."""
    sizes = np.diff(np.append(starts, len(scores)))
    shifted = scores - np.repeat(np.maximum.reduceat(scores, starts), sizes)
    exp = np.exp(shifted)
    return exp / np.repeat(np.add.reduceat(exp, starts), sizes)


def group_argmax(scores: np.ndarray, groups: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Row index of the best score in each group (ties: the first row, i.e. the lowest class)."""
    return np.lexsort((-scores, groups))[starts]


def fit_temperature(scores: np.ndarray, starts: np.ndarray, positive: np.ndarray) -> float:
    """Temperature T minimizing the log loss of ``softmax(scores / T)`` on the positive rows.

    Groups without a positive row (true class not among the candidates) are
    ignored: no temperature can help them.
    """
    if not positive.any():
        return 1.0

    def loss(log_t: float) -> float:
        proba = group_softmax(scores / np.exp(log_t), starts)
        return float(-np.mean(np.log(np.maximum(proba[positive], 1e-15))))

    result = minimize_scalar(loss, bounds=(-4.0, 4.0), method="bounded", options={"xatol": 1e-3})
    return float(np.exp(result.x))


# ---------------------------------------------------------------------------
# RerankMeta
# ---------------------------------------------------------------------------

class RerankMeta(_MetaBase):
    """CatBoost candidate re-ranker: the meta-learner for many classes.

    For each product the candidates are the union of every base model's top-k
    classes and the top-k of their mean probability. Each (product, candidate)
    becomes one row; CatBoost learns to score it (binary ``Logloss``: is this
    the true class; or a ranking loss over the product's candidates, with the
    product as ``group_id``). The prediction is the best-scored candidate.

    Probabilities are ``softmax(score / T)`` over the product's candidates (0
    for every other class): ranking losses give scores on an arbitrary scale,
    so the temperature T is fitted on the inner held-out products (the log
    loss of the true candidate); a softmax keeps every candidate's
    probability positive and each row summing to 1.

    Features per candidate (float32; ``candidate_feature_names`` lists them):
    for each model and for the mean of the models, the candidate's probability,
    its rank (exact in the top ``max(2k, 10)``), its probability relative to
    that source's top-1, its gap to the best other class (top1 - top2 for the
    source's own top-1, negative for the others), and the source's top-1
    probability, margin (top1 - top2) and entropy; then the max, min and
    standard deviation of the candidate's probability over models, its mean
    log-probability over models (a product of experts) and its rank by it
    among the product's candidates, how many models rank it first and in
    their top-k, the class's log training count (from ``y``, floored at
    ``RARE_CLASS_COUNT``), and the product's number of candidates. Per-model log-probabilities are left out:
    trees split on thresholds, so a monotone transform of one feature adds
    nothing (the mean log-probability combines models, so it stays).

    With ``boost_from_average`` the booster starts from the average blend:
    each candidate's initial score is the logit of its mean probability
    (CatBoost's ``baseline``), so the trees learn corrections to the blend,
    and an early-stopped booster with few trees stays close to the blend
    instead of below it on small data.

    Training keeps only products whose true class is among the candidates
    (the others cannot be ranked right); :attr:`candidate_recall_` reports
    their share, an upper bound of the meta's accuracy. Early stopping uses an
    inner split of products (all rows of a product on the same side).

    Parameters
    ----------
    top_k : int, default=5
        Candidates per source: each model's and the mean's top-k classes.
    loss : str, default="Logloss"
        "Logloss", "YetiRank", "YetiRankPairwise", "PairLogit",
        "PairLogitPairwise", "QuerySoftMax" or "QueryRMSE".
    iterations : int, default=500
        Maximum boosting iterations. At the reference scale (91k products,
        874 classes, 4 models: ~810k candidate rows) one iteration takes about
        0.5 s on 2 cores with ``class_feature=True`` (0.1 s without), so 500
        bounds the fit to about 4-5 minutes.
    learning_rate : float or None, default=0.1
        None lets CatBoost choose it. On the synthetic reference-scale
        benchmark (``experiments/meta_scale.py``) 0.1 matched the accuracy of
        CatBoost's automatic rate with a third of the iterations.
    depth : int, default=6
    l2_leaf_reg : float, default=3.0
    boost_from_average : bool, default=True
        Start boosting from the logit of the candidate's mean probability
        over models. On the demo's nested OOF (random_state 0 / 1) it gave
        accuracy 0.9606 / 0.9616 against 0.9606 / 0.9606 without it (average
        blend 0.9591): a small gain, and a safer start on small data.
    class_feature : bool, default=True
        Also give the candidate's class index as a CatBoost categorical
        feature (ordered target statistics: how often this class is right
        when it is a candidate, alone and combined with other splits): lets the
        meta learn which model to trust for which class. About 2x slower
        boosting; on the synthetic reference-scale benchmark it added
        +0.2 to +0.3 weighted F1 points (see ``experiments/results/meta.md``).
    signal_groups : tuple of {"retrieval", "names"}, default=("retrieval", "names")
        Which of the ``signals`` given to ``fit`` become features: retrieval
        (cosine to the class centroid and nearest product, the class's share
        of the neighbours) and category names. ``()`` switches both off.
    candidate_signals : tuple of str, default=("knn_share", "name:")
        Signals (by a part of their name) whose top-k classes join the
        candidates: a class with 1-2 products that no model ranks can still win.
    hierarchy_levels : int, default=2
        With ``ancestors`` in ``fit``: each model's probability mass on the
        candidate's parent (1), grandparent (2) ...; 0 switches it off.
    max_train_products : int or None, default=300000
        The booster learns from at most this many products (a random sample);
        None uses all. Prediction always scores every product.
    early_stopping_rounds : int or None, default=50
        None (or ``eval_fraction=0``) trains ``iterations`` trees on all
        products, with temperature 1.
    eval_fraction : float, default=0.15
        Share of products in the inner early-stopping split.
    refit : bool, default=False
        Retrain on all products with the early-stopped number of iterations
        (about doubles the fit time).
    thread_count : int, default=-1
    random_state : int, default=0
    verbose : bool or int, default=False
        CatBoost's log and a progress bar over candidate building.

    Attributes
    ----------
    model_ : catboost.CatBoost or None
        None when training rows give nothing to learn (every kept candidate
        is right); scores are then the mean log-probability.
    feature_names_ : list of str
    feature_importances_ : ndarray of shape (n_features,)
    candidate_recall_ : float
        Share of training products whose true class is among their candidates.
    n_candidates_ : float
        Mean number of candidates per training product.
    temperature_ : float
    best_iteration_ : int
        Number of trees in the final model.
    inner_scores_ : dict
        On the inner held-out products: ``n_products``, ``accuracy`` (meta),
        ``average_accuracy`` and ``best_model_accuracy`` (the baselines on the
        same products), ``candidate_recall``, ``logloss`` (over products whose
        true class is a candidate). Empty without early stopping.
    fit_times_ : dict
        Seconds spent building candidates, boosting and refitting.
    model_names_, n_classes_, class_counts_

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 60, 600)
    >>> def model(noise):
    ...     logits = 3 * np.eye(60)[y] + noise * rng.normal(size=(600, 60))
    ...     p = np.exp(logits)
    ...     return p / p.sum(1, keepdims=True)
    >>> probas = {"text": model(1.0), "image": model(1.5)}
    >>> meta = RerankMeta(iterations=50, thread_count=1).fit(probas, y)
    >>> proba = meta.predict_proba(probas)
    >>> proba.shape, bool(np.allclose(proba.sum(1), 1)), bool((proba > 0).sum(1).max() <= 15)
    ((600, 60), True, True)
    """

    _parameter_constraints: dict = {
        "top_k": [Interval(Integral, 1, None, closed="left")],
        "loss": [StrOptions(set(RERANK_LOSSES))],
        "iterations": [Interval(Integral, 1, None, closed="left")],
        "learning_rate": [Interval(Real, 0, None, closed="neither"), None],
        "depth": [Interval(Integral, 1, 16, closed="both")],
        "l2_leaf_reg": [Interval(Real, 0, None, closed="left")],
        "boost_from_average": ["boolean"],
        "class_feature": ["boolean"],
        "signal_groups": [tuple, list],
        "candidate_signals": [tuple, list],
        "hierarchy_levels": [Interval(Integral, 0, None, closed="left")],
        "max_train_products": [Interval(Integral, 1, None, closed="left"), None],
        "early_stopping_rounds": [Interval(Integral, 1, None, closed="left"), None],
        "eval_fraction": [Interval(Real, 0, 1, closed="left")],
        "refit": ["boolean"],
        "thread_count": [Interval(Integral, -1, None, closed="left")],
        "random_state": [Interval(Integral, 0, None, closed="left")],
        "verbose": ["boolean", Interval(Integral, 0, None, closed="left")],
    }

    def __init__(
        self,
        top_k: int = 5,
        loss: str = "Logloss",
        iterations: int = 500,
        learning_rate: float | None = 0.1,
        depth: int = 6,
        l2_leaf_reg: float = 3.0,
        boost_from_average: bool = True,
        class_feature: bool = True,
        signal_groups: Sequence[str] = ("retrieval", "names"),
        candidate_signals: Sequence[str] = ("knn_share", "name:"),
        hierarchy_levels: int = 2,
        max_train_products: int | None = 300_000,
        early_stopping_rounds: int | None = 50,
        eval_fraction: float = 0.15,
        refit: bool = False,
        thread_count: int = -1,
        random_state: int = 0,
        verbose: bool | int = False,
    ) -> None:
        self.top_k = top_k
        self.loss = loss
        self.iterations = iterations
        self.learning_rate = learning_rate
        self.depth = depth
        self.l2_leaf_reg = l2_leaf_reg
        self.boost_from_average = boost_from_average
        self.class_feature = class_feature
        self.signal_groups = signal_groups
        self.candidate_signals = candidate_signals
        self.hierarchy_levels = hierarchy_levels
        self.max_train_products = max_train_products
        self.early_stopping_rounds = early_stopping_rounds
        self.eval_fraction = eval_fraction
        self.refit = refit
        self.thread_count = thread_count
        self.random_state = random_state
        self.verbose = verbose

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, probas: Mapping[str, np.ndarray], y: Any, *, signals: Mapping[str, np.ndarray] | None = None,
            ancestors: np.ndarray | None = None) -> RerankMeta:
        """Build candidates from out-of-fold ``probas`` and train the scorer on ``y``.

        ``signals``: retrieval and category-name scores per (product, class),
        computed out of fold (:func:`stackcat.retrieval.oof_signals`); those of
        the groups in ``signal_groups`` become features. ``ancestors``: each
        class's parent, grandparent ... (:attr:`stackcat.taxonomy.CategoryTree.ancestors`).
        """
        matrices, y = self._fit_inputs(probas, y)
        signals = check_signals(signals, *matrices[0].shape)
        self.signal_names_ = [n for n in sorted(signals) if signal_group(n) in self.signal_groups]
        self.ancestors_ = None if ancestors is None else np.asarray(ancestors, dtype=np.int64)
        if self.ancestors_ is not None and self.ancestors_.shape[0] != self.n_classes_:
            raise ValueError(f"ancestors has {self.ancestors_.shape[0]} rows for {self.n_classes_} classes")
        self.hierarchy_levels_ = (0 if self.ancestors_ is None
                                  else min(self.hierarchy_levels, self.ancestors_.shape[1]))
        self.feature_names_ = candidate_feature_names(self.model_names_, self.signal_names_, self.hierarchy_levels_)
        self.fit_times_ = {}
        started = time.perf_counter()
        if self.max_train_products is not None and len(y) > self.max_train_products:
            # the booster learns from a random sample; class counts stay those of every row
            keep = np.sort(np.random.default_rng(self.random_state).choice(len(y), self.max_train_products,
                                                                           replace=False))
            matrices = [take_rows(m, keep) for m in matrices]
            signals = {name: take_rows(m, keep) for name, m in signals.items()}
            y = y[keep]
        candidates = self._candidates(matrices, signals)
        target = candidates.label == y[candidates.product]
        self._record_recall(candidates, target)
        self.fit_times_["candidates"] = time.perf_counter() - started

        eval_products = self._eval_products(candidates.n_products)
        trainable = np.zeros(candidates.n_products, dtype=bool)
        trainable[candidates.product[target]] = True
        train_rows = (trainable & ~eval_products)[candidates.product]
        eval_rows = (trainable & eval_products)[candidates.product]
        self.inner_scores_, self.temperature_ = {}, 1.0
        self.feature_importances_ = np.zeros(len(self.feature_names_))
        if target[train_rows].all() or not target[train_rows].any():
            self.model_, self.best_iteration_ = None, 0
            return self

        started = time.perf_counter()
        if eval_rows.any():
            model = self._train(candidates, target, train_rows, eval_rows, self.iterations)
            self.best_iteration_ = model.get_best_iteration() + 1
            self._score_inner_split(model, candidates, target, matrices, y, eval_products)
        else:
            model = self._train(candidates, target, train_rows, None, self.iterations)
            self.best_iteration_ = model.tree_count_
        self.fit_times_["boosting"] = time.perf_counter() - started
        if self.refit and eval_rows.any():
            started = time.perf_counter()
            model = self._train(candidates, target, train_rows | eval_rows, None, self.best_iteration_)
            self.fit_times_["refit"] = time.perf_counter() - started
        self.model_ = model
        self.feature_importances_ = model.get_feature_importance(type="PredictionValuesChange")[: len(self.feature_names_)]
        return self

    def predict_proba(self, probas: Mapping[str, np.ndarray], *,
                      signals: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Probabilities ``(n_samples, n_classes)``: softmax over each product's candidates, 0 elsewhere."""
        matrices = self._predict_inputs(probas)
        signals = check_signals(signals, *matrices[0].shape, names=self.signal_names_)
        shape = matrices[0].shape
        if shape[0] == 0:
            return np.zeros(shape, dtype=np.float64)
        candidates = self._candidates(matrices, signals)
        candidate_proba = group_softmax(self._scores(self.model_, candidates) / self.temperature_,
                                        candidates.starts)
        if any(is_top_k(m) for m in matrices):  # top-k in, top-k out: the candidates are the stored entries
            return sparse.csr_matrix((candidate_proba, (candidates.product, candidates.label)), shape=shape)
        proba = np.zeros(shape, dtype=np.float64)
        proba[candidates.product, candidates.label] = candidate_proba
        return proba

    # -- pieces of fit --------------------------------------------------------

    def _candidates(self, matrices: Sequence[np.ndarray],
                    signals: Mapping[str, np.ndarray] | None = None) -> CandidateSet:
        # Counts are floored: in OOF a 1-member class is never right (its one row was
        # predicted by a fold model that never saw it), while at test time it can be.
        # Flooring pools it with the 2-3 member classes, which OOF rows can get right.
        class_log_count = np.log1p(np.maximum(self.class_counts_, RARE_CLASS_COUNT)).astype(np.float32)
        used = [signals[name] for name in self.signal_names_] if signals else []
        sources = [i for i, name in enumerate(self.signal_names_)
                   if any(part in name for part in self.candidate_signals)]
        return build_candidates(matrices, self.top_k, class_log_count, signals=used, candidate_signals=sources,
                                ancestors=self.ancestors_, hierarchy_levels=self.hierarchy_levels_,
                                progress=bool(self.verbose))

    def _record_recall(self, candidates: CandidateSet, target: np.ndarray) -> None:
        self.candidate_recall_ = float(np.bincount(candidates.product[target], minlength=candidates.n_products)
                                       .astype(bool).mean())
        self.n_candidates_ = len(candidates.label) / candidates.n_products

    def _eval_products(self, n_products: int) -> np.ndarray:
        if self.early_stopping_rounds is None or self.eval_fraction == 0:
            return np.zeros(n_products, dtype=bool)
        rng = np.random.default_rng(self.random_state)
        return rng.random(n_products) < self.eval_fraction

    def _pool(self, candidates: CandidateSet, target: np.ndarray | None, rows: np.ndarray | None) -> Any:
        from catboost import FeaturesData, Pool

        select = slice(None) if rows is None else rows
        numeric = np.ascontiguousarray(candidates.features[select])
        if self.class_feature:
            labels = candidates.label[select].astype("S").astype(object).reshape(-1, 1)
            data = FeaturesData(num_feature_data=numeric, cat_feature_data=labels,
                                num_feature_names=self.feature_names_, cat_feature_names=["class"])
        else:
            data = FeaturesData(num_feature_data=numeric, num_feature_names=self.feature_names_)
        label = None if target is None else target[select].astype(np.float32)
        return Pool(data, label=label, group_id=candidates.product[select],
                    baseline=self._baseline(candidates, rows))

    def _baseline(self, candidates: CandidateSet, rows: np.ndarray | None) -> np.ndarray | None:
        """Initial scores: the logit of the mean probability (None without ``boost_from_average``)."""
        if not self.boost_from_average:
            return None
        select = slice(None) if rows is None else rows
        mean_p = candidates.features[select, self.feature_names_.index("mean:p")].astype(np.float64)
        mean_p = np.clip(mean_p, LOG_FLOOR, 1 - LOG_FLOOR)
        return np.log(mean_p) - np.log1p(-mean_p)

    def _train(self, candidates: CandidateSet, target: np.ndarray, train_rows: np.ndarray,
               eval_rows: np.ndarray | None, iterations: int) -> Any:
        from catboost import CatBoost

        params = _catboost_common(self) | {
            "iterations": iterations, "loss_function": self.loss, "l2_leaf_reg": self.l2_leaf_reg,
        }
        model = CatBoost(params)
        train_pool = self._pool(candidates, target, train_rows)
        if eval_rows is None:
            return model.fit(train_pool)
        return model.fit(train_pool, eval_set=self._pool(candidates, target, eval_rows),
                         early_stopping_rounds=self.early_stopping_rounds, use_best_model=True)

    def _scores(self, model: Any, candidates: CandidateSet, rows: np.ndarray | None = None) -> np.ndarray:
        if model is None:
            mean_p = candidates.features[:, self.feature_names_.index("mean:p")]
            scores = np.log(np.maximum(mean_p, LOG_FLOOR))
            return scores if rows is None else scores[rows]
        # the pool carries the baseline, and CatBoost adds it to the raw scores
        return model.predict(self._pool(candidates, None, rows), prediction_type="RawFormulaVal")

    def _score_inner_split(self, model: Any, candidates: CandidateSet, target: np.ndarray,
                           matrices: Sequence[np.ndarray], y: np.ndarray, eval_products: np.ndarray) -> None:
        rows = eval_products[candidates.product]
        scores = self._scores(model, candidates, rows)
        product, positive = candidates.product[rows], target[rows]
        starts = np.flatnonzero(np.r_[True, product[1:] != product[:-1]])
        self.temperature_ = fit_temperature(scores, starts, positive)
        proba = group_softmax(scores / self.temperature_, starts)
        chosen_right = positive[group_argmax(scores, product, starts)]
        eval_y = y[eval_products]
        self.inner_scores_ = {
            "n_products": int(eval_products.sum()),
            "accuracy": float(chosen_right.mean()),
            "average_accuracy": float(np.mean(_argmax_of_mean(matrices, eval_products) == eval_y)),
            "best_model_accuracy": float(max(np.mean(row_argmax(take_rows(m, eval_products)) == eval_y)
                                             for m in matrices)),
            "candidate_recall": float(np.add.reduceat(positive, starts).astype(bool).mean()),
            "logloss": float(-np.mean(np.log(np.maximum(proba[positive], 1e-15)))) if positive.any() else np.nan,
        }


def _argmax_of_mean(matrices: Sequence[Any], rows: np.ndarray) -> np.ndarray:
    return row_argmax(weighted_sum([take_rows(m, rows) for m in matrices], [1.0] * len(matrices)))


# ---------------------------------------------------------------------------
# choosing a meta-learner
# ---------------------------------------------------------------------------

META_LEARNERS = {"rerank": RerankMeta, "multiclass": MulticlassMeta, "average": AverageBlend,
                 "ensemble": EnsembleSelection}


def make_meta(name: str = "auto", n_classes: int | None = None, **params: Any) -> _MetaBase:
    """A meta-learner by name: "auto", "rerank", "multiclass" or "average".

    ``"auto"`` picks :class:`RerankMeta` above 50 classes, else
    :class:`MulticlassMeta`. ``params`` go to the chosen class.

    Examples
    --------
    >>> type(make_meta("auto", n_classes=840)).__name__
    'RerankMeta'
    >>> make_meta("multiclass", n_classes=5, iterations=100).iterations
    100
    """
    choices = ["auto", *META_LEARNERS]
    if name not in choices:
        raise ValueError(f"unknown meta-learner {name!r}; choose one of {choices}")
    if name == "auto":
        if n_classes is None:
            raise ValueError("make_meta('auto') needs n_classes to choose between rerank and multiclass")
        name = "rerank" if n_classes > AUTO_RERANK_ABOVE else "multiclass"
    return META_LEARNERS[name](**params)
