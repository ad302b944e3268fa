"""Retrieval and category-name signals for the re-ranker.

The base models' probabilities are not the only evidence about a product's
class: its nearest labelled products and its similarity to each category's
name are others, and they fail differently. Each *signal* here is a
``(n_products, n_classes)`` float32 matrix of scores, one column per class;
:class:`stackcat.meta.RerankMeta` reads its value and rank at each candidate
and draws extra candidates from its top entries.

Per embedding view (e.g. ``"text"``, ``"image"``; rows L2-normalized):

* ``<view>:centroid`` -- cosine to the mean embedding of the class's reference rows;
* ``<view>:nearest`` -- the best cosine to any reference row of the class;
* ``<view>:knn_share`` -- the class's share of the ``k`` nearest reference rows
  (distance-weighted: ``exp(cos / temperature)``).

``name:<view>`` -- cosine between the product and the category's name (or its
path in a tree), through the same encoder.

A member with a *learned* space (``project(X)`` and its projected training rows
``index_`` / ``index_labels_``, e.g.
:class:`~stackcat.models.metric.MetricSpaceClassifier`) gives the same three
kinds in that space (:func:`learned_space_signals`; ``centroid`` is then the
cosine to its class prototypes). The space was trained on labels, so each fold's
model scores its own held-out rows against its own training rows: the stack
computes them inside the fold jobs, never with a model that saw the row.

Honesty: the reference rows of a training product are the rows of the
*other* folds (:func:`oof_signals`), the same folds that made the base
models' OOF, so no product ever meets itself or its fold; the nested meta
OOF refits the meta on other folds' rows, whose signals never saw the held-out
fold either. At test time the reference is every training row
(:class:`NeighbourIndex`).

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> emb = rng.normal(size=(40, 8)).astype(np.float32)
>>> y = np.arange(40) % 4
>>> folds = np.arange(40) % 5
>>> signals = oof_signals({"text": emb}, y, 4, folds, k=5)
>>> sorted(signals), signals["text:centroid"].shape
(['text:centroid', 'text:knn_share', 'text:nearest'], (40, 4))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import sparse

from stackcat.core import label_positions
from stackcat.topk import is_top_k, put_rows, top_k_rows

QUERY_CHUNK = 2048  # query rows per similarity block: bounds the (chunk x reference) float32 matrix
RETRIEVAL_KINDS = ("centroid", "nearest", "knn_share")


def l2_normalized(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows, e.g. products with no image, stay zero)."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return np.divide(embeddings, norms, out=np.zeros_like(embeddings), where=norms > 0)


class NeighbourIndex:
    """Reference rows of one embedding view, grouped by class, for exact cosine search.

    Keeps the unit-length reference rows sorted by class (not the input array),
    the class centroids and where each class starts: what a fitted stack saves.

    Parameters
    ----------
    embeddings : ndarray (n_reference, dim)
        Rows of zeros (no image, say) vote for nothing.
    y : ndarray (n_reference,)
        Class index of each reference row.
    n_classes : int
    k : int, default=10
        Neighbours for ``knn_share``.
    temperature : float, default=0.05
        Softmax temperature of the neighbours' votes.
    """

    def __init__(self, embeddings: np.ndarray, y: np.ndarray, n_classes: int, k: int = 10,
                 temperature: float = 0.05) -> None:
        self.n_classes = n_classes
        self.k = k
        self.temperature = temperature
        usable = np.linalg.norm(embeddings, axis=1) > 0
        order = np.argsort(y[usable], kind="stable")
        self._reference = l2_normalized(embeddings[usable][order])
        self._labels = np.asarray(y)[usable][order].astype(np.int64)
        counts = np.bincount(self._labels, minlength=n_classes)
        self._present = np.flatnonzero(counts)
        self._starts = (np.cumsum(counts) - counts)[self._present]
        centroids = np.zeros((n_classes, self._reference.shape[1]), dtype=np.float32)
        np.add.at(centroids, self._labels, self._reference)
        self._centroids = l2_normalized(centroids)

    def signals(self, queries: np.ndarray) -> dict[str, np.ndarray]:
        """``{"centroid", "nearest", "knn_share"} -> (n_queries, n_classes)`` float32 scores."""
        queries = l2_normalized(queries)
        n = len(queries)
        out = {kind: np.zeros((n, self.n_classes), dtype=np.float32) for kind in RETRIEVAL_KINDS}
        if n == 0 or len(self._reference) == 0:
            return out
        k = min(self.k, len(self._reference))
        for start in range(0, n, QUERY_CHUNK):
            block = queries[start:start + QUERY_CHUNK]
            rows = slice(start, start + len(block))
            out["centroid"][rows] = block @ self._centroids.T
            similarity = block @ self._reference.T
            nearest = np.full((len(block), self.n_classes), -1.0, dtype=np.float32)
            nearest[:, self._present] = np.maximum.reduceat(similarity, self._starts, axis=1)
            out["nearest"][rows] = nearest
            top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
            top_similarity = np.take_along_axis(similarity, top, axis=1)
            weight = np.exp((top_similarity - top_similarity.max(axis=1, keepdims=True)) / self.temperature)
            share = np.zeros((len(block), self.n_classes), dtype=np.float32)
            np.add.at(share, (np.repeat(np.arange(len(block)), k), self._labels[top].ravel()), weight.ravel())
            out["knn_share"][rows] = share / share.sum(axis=1, keepdims=True)
        missing = np.linalg.norm(queries, axis=1) == 0  # a product without the view gets no evidence
        for matrix in out.values():
            matrix[missing] = 0.0
        return out


def index_signals(index: NeighbourIndex, queries: np.ndarray, top_k: int | None = None) -> dict[str, Any]:
    """``index.signals`` in blocks of :data:`QUERY_CHUNK` queries; with ``top_k``, each signal is kept
    as a top-k CSR matrix (:mod:`stackcat.topk`), so memory stays linear in the number of products."""
    blocks: dict[str, list] = {kind: [] for kind in RETRIEVAL_KINDS}
    for start in range(0, max(len(queries), 1), QUERY_CHUNK):
        for kind, values in index.signals(queries[start:start + QUERY_CHUNK]).items():
            blocks[kind].append(values if top_k is None else top_k_rows(values, top_k))
    return {kind: _stacked(parts) for kind, parts in blocks.items()}


def view_signals(embeddings: Mapping[str, np.ndarray], reference_rows: np.ndarray, y: np.ndarray,
                 n_classes: int, query_rows: np.ndarray, *, k: int = 10, temperature: float = 0.05,
                 top_k: int | None = None) -> dict[str, Any]:
    """Retrieval signals of ``query_rows`` against ``reference_rows``, for every view."""
    out = {}
    for view, matrix in embeddings.items():
        index = NeighbourIndex(matrix[reference_rows], y[reference_rows], n_classes, k, temperature)
        for kind, values in index_signals(index, matrix[query_rows], top_k).items():
            out[f"{view}:{kind}"] = values
    return out


def oof_signals(embeddings: Mapping[str, np.ndarray], y: np.ndarray, n_classes: int,
                fold_of_row: np.ndarray, *, k: int = 10, temperature: float = 0.05,
                top_k: int | None = None) -> dict[str, Any]:
    """Out-of-fold retrieval signals: each fold's rows searched among the other folds' rows."""
    parts: dict[str, list] = {}
    for fold in np.unique(fold_of_row):
        held_out = np.flatnonzero(fold_of_row == fold)
        reference = np.flatnonzero(fold_of_row != fold)
        for name, values in view_signals(embeddings, reference, y, n_classes, held_out,
                                         k=k, temperature=temperature, top_k=top_k).items():
            parts.setdefault(name, []).append((held_out, values))
    return {name: put_rows(blocks, len(y), n_classes) for name, blocks in parts.items()}


def learned_space_signals(model: Any, X: Any, classes: np.ndarray, top_k: int | None = None) -> dict[str, Any]:
    """Retrieval signals of the rows of ``X`` in a fitted member's learned space, in ``classes`` columns.

    The reference rows are the member's own projected training rows
    (``model.index_``, classes ``model.index_labels_`` into ``model.classes_``);
    the queries are ``model.project(X)``. A class the member never saw scores 0.
    With ``top_k`` each signal is a top-k CSR matrix.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> member = SimpleNamespace(index_=np.eye(2, dtype=np.float16), index_labels_=np.array([0, 1]),
    ...                          classes_=np.array(["a", "b"]), project=lambda X: np.asarray(X, np.float32))
    >>> signals = learned_space_signals(member, [[1.0, 0.0]], np.array(["a", "b", "c"]))
    >>> signals["centroid"].tolist()
    [[1.0, 0.0, 0.0]]
    """
    index = NeighbourIndex(np.asarray(model.index_, dtype=np.float32), np.asarray(model.index_labels_),
                           len(model.classes_))
    known = label_positions(classes, list(model.classes_), what="the member's classes_")
    out = {}
    for kind, values in index_signals(index, model.project(X)).items():
        aligned = np.zeros((len(values), len(classes)), dtype=np.float32)
        aligned[:, known] = values
        out[kind] = aligned if top_k is None else top_k_rows(aligned, top_k)
    return out


def name_signal(product_embeddings: np.ndarray, name_embeddings: np.ndarray, top_k: int | None = None) -> Any:
    """Cosine between each product and each category name: ``(n_products, n_classes)`` float32
    (top-k CSR with ``top_k``)."""
    products = l2_normalized(product_embeddings)
    names = l2_normalized(name_embeddings)
    blocks = []
    for start in range(0, max(len(products), 1), QUERY_CHUNK):
        block = products[start:start + QUERY_CHUNK] @ names.T
        blocks.append(block if top_k is None else top_k_rows(block, top_k))
    return _stacked(blocks)


def _stacked(blocks: list) -> Any:
    if blocks and is_top_k(blocks[0]):
        return sparse.vstack(blocks, format="csr")
    return np.concatenate(blocks, axis=0).astype(np.float32, copy=False)
