"""The meta-learners that score the base models' probabilities directly, and choosing one.

* :class:`AverageBlend` -- the (weighted) mean, the baseline every learned meta must beat;
* :class:`EnsembleSelection` -- greedy, calibrated model weights (Caruana et al., 2004);
* :class:`MulticlassMeta` -- CatBoost MultiClass on the concatenated log-probabilities;
* :func:`make_meta` -- one of them (or :class:`~stackcat.meta.RerankMeta`) by name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Integral
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.base import _fit_context
from sklearn.utils._param_validation import Interval

from stackcat.core import normalize_rows
from stackcat.meta.base import LOG_FLOOR, _BoostedMeta, _MetaBase, inner_eval_mask
from stackcat.meta.rerank import RerankMeta
from stackcat.topk import dense_rows, is_top_k, normalized_rows, values_at, weighted_sum

AUTO_RERANK_ABOVE = 50


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


class MulticlassMeta(_BoostedMeta):
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
    n_threads : int or None, default=None
        CatBoost threads; None or -1 uses every core.
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
    >>> meta = MulticlassMeta(iterations=30, n_threads=1).fit(probas, y)
    >>> meta.predict_proba(probas).shape
    (200, 3)
    """

    _parameter_constraints: dict = {**_BoostedMeta._parameter_constraints}

    def __init__(
        self,
        iterations: int = 500,
        learning_rate: float | None = None,
        depth: int = 4,
        l2_leaf_reg: float = 3.0,
        early_stopping_rounds: int | None = 50,
        eval_fraction: float = 0.15,
        refit: bool = True,
        n_threads: int | None = None,
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
        self.n_threads = n_threads
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
        if not self._early_stopping():
            return np.zeros(len(y), dtype=bool)
        mask = inner_eval_mask(y, self.eval_fraction, np.random.default_rng(self.random_state))
        if len(np.unique(y[~mask])) < 2:  # the training side needs two classes
            return np.zeros(len(y), dtype=bool)
        return mask

    def _booster(self, iterations: int) -> Any:
        from catboost import CatBoostClassifier

        return CatBoostClassifier(loss_function="MultiClass", **self._catboost_params(iterations))

    def _inner_scores(self, model: Any, features: np.ndarray, y: np.ndarray,
                      matrices: Sequence[np.ndarray], eval_mask: np.ndarray) -> dict[str, float]:
        proba = np.zeros((len(y), self.n_classes_))
        proba[:, model.classes_.astype(np.int64)] = model.predict_proba(features)
        logloss = -np.mean(np.log(np.maximum(proba[np.arange(len(y)), y], 1e-15)))
        return self._inner_split_scores(proba.argmax(1) == y, logloss, matrices, eval_mask, y)


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
