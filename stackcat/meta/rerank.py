"""The CatBoost candidate re-ranker: the meta-learner for many classes."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from numbers import Integral
from typing import Any

import numpy as np
from scipy import sparse
from scipy.optimize import minimize_scalar
from sklearn.base import _fit_context
from sklearn.utils._param_validation import Interval, StrOptions

from stackcat.meta.base import LOG_FLOOR, _BoostedMeta, check_signals, signal_group
from stackcat.meta.candidates import CandidateSet, build_candidates, candidate_feature_names
from stackcat.topk import is_top_k, take_rows

RERANK_LOSSES = ("Logloss", "YetiRank", "YetiRankPairwise", "PairLogit",
                 "PairLogitPairwise", "QuerySoftMax", "QueryRMSE")
RARE_CLASS_COUNT = 3  # class counts below this look alike to the re-ranker (see RerankMeta._candidates)


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


class RerankMeta(_BoostedMeta):
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
    max_train_products : int or None, default=20000
        The booster learns from at most this many products (a random sample);
        None uses all. Prediction always scores every product. With
        ``meta="auto"`` the meta is fitted six times (five nested folds and the
        final fit), so this bounds most of the meta stage's time at scale
        (experiments/RESULTS.md, "Fit time at scale").
    early_stopping_rounds : int or None, default=50
        None (or ``eval_fraction=0``) trains ``iterations`` trees on all
        products, with temperature 1.
    eval_fraction : float, default=0.15
        Share of products in the inner early-stopping split.
    refit : bool, default=False
        Retrain on all products with the early-stopped number of iterations
        (about doubles the fit time).
    n_threads : int or None, default=None
        CatBoost threads; None or -1 uses every core.
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
    >>> meta = RerankMeta(iterations=50, n_threads=1).fit(probas, y)
    >>> proba = meta.predict_proba(probas)
    >>> proba.shape, bool(np.allclose(proba.sum(1), 1)), bool((proba > 0).sum(1).max() <= 15)
    ((600, 60), True, True)
    """

    _parameter_constraints: dict = {
        **_BoostedMeta._parameter_constraints,
        "top_k": [Interval(Integral, 1, None, closed="left")],
        "loss": [StrOptions(set(RERANK_LOSSES))],
        "boost_from_average": ["boolean"],
        "class_feature": ["boolean"],
        "signal_groups": [tuple, list],
        "candidate_signals": [tuple, list],
        "hierarchy_levels": [Interval(Integral, 0, None, closed="left")],
        "max_train_products": [Interval(Integral, 1, None, closed="left"), None],
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
        max_train_products: int | None = 20_000,
        early_stopping_rounds: int | None = 50,
        eval_fraction: float = 0.15,
        refit: bool = False,
        n_threads: int | None = None,
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
        self.n_threads = n_threads
        self.random_state = random_state
        self.verbose = verbose

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, probas: Mapping[str, np.ndarray], y: Any, *, signals: Mapping[str, np.ndarray] | None = None,
            ancestors: np.ndarray | None = None) -> RerankMeta:
        """Build candidates from out-of-fold ``probas`` and train the scorer on ``y``.

        ``signals``: retrieval and category-name scores per (product, class),
        computed out of fold (:func:`stackcat.meta.retrieval.oof_signals`); those of
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
        if not self._early_stopping():
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

        model = CatBoost(self._catboost_params(iterations) | {"loss_function": self.loss})
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
        logloss = -np.mean(np.log(np.maximum(proba[positive], 1e-15))) if positive.any() else np.nan
        self.inner_scores_ = self._inner_split_scores(
            chosen_right, logloss, matrices, eval_products, y[eval_products],
            candidate_recall=np.add.reduceat(positive, starts).astype(bool).mean(),
        )
