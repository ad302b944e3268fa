"""The re-ranker's candidates and their features.

For each product the candidates are the union of every base model's top-k
classes, the top-k of their mean and the top of the candidate signals
(:mod:`stackcat.meta.retrieval`); each (product, candidate) becomes one row of
float32 features (:func:`candidate_feature_names` lists them). Built in blocks
of :data:`ROW_CHUNK` products so the working set stays small.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import entr

from stackcat.meta.base import LOG_FLOOR
from stackcat.progress import progress_bar
from stackcat.topk import dense_rows

ROW_CHUNK = 4096  # products per feature-building step: bounds the float32 temporaries
ITERATIVE_TOP_MAX_DEPTH = 32


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

    ``signals`` (retrieval and category-name scores, :mod:`stackcat.meta.retrieval`)
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
