"""Meta-learners: combine the base models' out-of-fold probabilities into one prediction.

Every meta-learner takes ``probas``, a mapping ``model name -> (n_samples,
n_classes) probability matrix`` (columns = the global class list; float16,
float32 or float64, or top-k CSR), and ``y``, class indices in ``[0, n_classes)``:

* :class:`AverageBlend` -- the (weighted) mean of the base probabilities, the
  baseline every learned meta must beat;
* :class:`EnsembleSelection` -- greedy, temperature-calibrated model weights;
* :class:`MulticlassMeta` -- CatBoost MultiClass on the concatenated
  log-probabilities; for tasks with few classes;
* :class:`RerankMeta` -- a CatBoost candidate re-ranker; the default above 50
  classes, where a MultiClass booster on ``n_models * n_classes`` features does
  not scale (one iteration of an 840-class MultiClass on 20k rows takes minutes).

:func:`make_meta` picks one by name (``"auto"`` chooses by the number of classes).

Modules: :mod:`~stackcat.meta.base` (input checks, the shared bases),
:mod:`~stackcat.meta.learners` (the first three, :func:`make_meta`),
:mod:`~stackcat.meta.rerank` (:class:`RerankMeta`),
:mod:`~stackcat.meta.candidates` (the re-ranker's candidates and features),
:mod:`~stackcat.meta.retrieval` (retrieval and category-name signals).
Every public name is importable from ``stackcat.meta``.
"""

from __future__ import annotations

from stackcat.meta.base import (
    LOG_FLOOR,
    check_probas,
    check_signals,
    check_targets,
    inner_eval_mask,
    signal_group,
)
from stackcat.meta.candidates import (
    ITERATIVE_TOP_MAX_DEPTH,
    ROW_CHUNK,
    CandidateSet,
    build_candidates,
    candidate_feature_names,
    rank_in_group,
)
from stackcat.meta.learners import (
    AUTO_RERANK_ABOVE,
    META_LEARNERS,
    AverageBlend,
    EnsembleSelection,
    MulticlassMeta,
    blend,
    log_features,
    make_meta,
    member_temperature,
    scale_temperature,
    true_class_proba,
)
from stackcat.meta.rerank import (
    RARE_CLASS_COUNT,
    RERANK_LOSSES,
    RerankMeta,
    fit_temperature,
    group_argmax,
    group_softmax,
)

__all__ = [
    "AUTO_RERANK_ABOVE", "AverageBlend", "CandidateSet", "EnsembleSelection", "ITERATIVE_TOP_MAX_DEPTH",
    "LOG_FLOOR", "META_LEARNERS", "MulticlassMeta", "RARE_CLASS_COUNT", "RERANK_LOSSES", "ROW_CHUNK",
    "RerankMeta", "blend", "build_candidates", "candidate_feature_names", "check_probas", "check_signals",
    "check_targets", "fit_temperature", "group_argmax", "group_softmax", "inner_eval_mask", "log_features",
    "make_meta", "member_temperature", "rank_in_group", "scale_temperature", "signal_group",
    "true_class_proba",
]
