"""Top-k probability matrices: what keeps out-of-fold storage linear in the number of products.

A dense out-of-fold matrix holds ``n_products x n_classes`` floats per model:
1M products x 5,000 classes is 20 GB in float32. Above a class-count
threshold the stack keeps each model's probabilities as a
``scipy.sparse.csr_matrix`` with the ``k`` largest entries of every row
(:func:`top_k_rows`); the rest of a row's mass (``1 - row sum``) is implied,
and spread evenly over the other classes wherever a dense row is needed
(:func:`dense_rows`). The meta-learners, blends and metrics accept either kind
through the helpers here, and work in blocks of rows.

Examples
--------
>>> import numpy as np
>>> proba = np.array([[0.6, 0.3, 0.1, 0.0], [0.1, 0.1, 0.2, 0.6]], dtype=np.float32)
>>> top = top_k_rows(proba, 2)
>>> top.nnz, row_argmax(top).tolist(), row_max(top).round(2).tolist()
(4, [0, 3], [0.6, 0.6])
>>> dense_rows(top, slice(0, 1)).round(2).tolist()
[[0.6, 0.3, 0.05, 0.05]]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import sparse

#: Above this many classes, ``StackingCategorizer(oof_top_k="auto")`` keeps top-k matrices.
TOP_K_ABOVE_CLASSES = 1000
#: Entries kept per row in that case.
DEFAULT_TOP_K = 32
BLOCK_ROWS = 4096


def is_top_k(matrix: Any) -> bool:
    """Whether ``matrix`` is a sparse (top-k) probability matrix."""
    return sparse.issparse(matrix)


def top_k_rows(proba: np.ndarray, k: int, dtype: Any = np.float32) -> sparse.csr_matrix:
    """The ``k`` largest entries of each row of a dense matrix, as CSR (columns sorted in each row)."""
    proba = np.asarray(proba)
    n_rows, n_classes = proba.shape
    k = min(k, n_classes)
    if n_rows == 0:
        return sparse.csr_matrix((0, n_classes), dtype=dtype)
    top = np.argpartition(-proba, k - 1, axis=1)[:, :k] if k < n_classes else np.tile(np.arange(n_classes),
                                                                                        (n_rows, 1))
    top.sort(axis=1)
    values = np.take_along_axis(proba, top, axis=1).astype(dtype)
    indptr = np.arange(0, n_rows * k + 1, k)
    matrix = sparse.csr_matrix((values.ravel(), top.ravel().astype(np.int32), indptr), shape=(n_rows, n_classes))
    matrix.eliminate_zeros()
    return matrix


def as_top_k(matrix: Any, k: int) -> sparse.csr_matrix:
    """``matrix`` (dense or sparse) cut to its top-k entries per row, in blocks of rows."""
    if is_top_k(matrix) and np.diff(matrix.indptr).max(initial=0) <= k:
        return matrix.tocsr()
    blocks = [top_k_rows(dense_rows(matrix, slice(start, start + BLOCK_ROWS), spread=False), k)
              for start in range(0, matrix.shape[0], BLOCK_ROWS)]
    return sparse.vstack(blocks, format="csr") if blocks else sparse.csr_matrix(matrix.shape, dtype=np.float32)


def dense_rows(matrix: Any, rows: slice | np.ndarray, *, spread: bool = True) -> np.ndarray:
    """Rows of ``matrix`` as a dense float32 array; a top-k row's missing mass is spread evenly
    over its unstored classes (``spread``), so every row sums to 1 again."""
    if not is_top_k(matrix):
        return np.asarray(matrix[rows], dtype=np.float32)
    block = matrix[rows]
    dense = block.toarray().astype(np.float32, copy=False)
    if spread and dense.shape[1]:
        stored = np.diff(block.indptr)
        rest = np.clip(1.0 - dense.sum(axis=1), 0.0, None)
        unstored = dense.shape[1] - stored
        fill = np.divide(rest, unstored, out=np.zeros_like(rest), where=unstored > 0)
        dense += np.where(dense == 0, fill[:, None], 0.0).astype(np.float32)
    return dense


def row_argmax(matrix: Any) -> np.ndarray:
    """Column of each row's largest entry."""
    if is_top_k(matrix):
        return np.asarray(matrix.argmax(axis=1)).ravel()
    return np.asarray(matrix).argmax(axis=1)


def row_max(matrix: Any) -> np.ndarray:
    """Each row's largest entry (float64)."""
    if is_top_k(matrix):
        return np.asarray(matrix.max(axis=1).toarray()).ravel().astype(np.float64)
    return np.asarray(matrix).max(axis=1).astype(np.float64)


def values_at(matrix: Any, columns: np.ndarray) -> np.ndarray:
    """``matrix[i, columns[i]]`` for every row i (0 where a top-k row does not store it)."""
    rows = np.arange(matrix.shape[0])
    if is_top_k(matrix):
        return np.asarray(matrix[rows, columns]).ravel().astype(np.float64)
    return np.asarray(matrix)[rows, columns].astype(np.float64)


def rank_of(matrix: Any, columns: np.ndarray) -> np.ndarray:
    """0-based rank of ``columns[i]`` in row i (ties count against it); a class a top-k row does not
    store ranks after every stored entry."""
    if not is_top_k(matrix):
        dense = np.asarray(matrix)
        target = dense[np.arange(len(dense)), columns][:, None]
        return (dense >= target).sum(axis=1) - 1
    matrix = matrix.tocsr()
    target = values_at(matrix, columns)
    row_of_entry = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    stored = np.zeros(matrix.shape[0], dtype=bool)
    hit = matrix.indices == columns[row_of_entry]
    stored[row_of_entry[hit]] = True
    above = np.bincount(row_of_entry, weights=(matrix.data >= target[row_of_entry]) & ~hit,
                        minlength=matrix.shape[0]).astype(np.int64)
    return np.where(stored, above, np.diff(matrix.indptr))


def weighted_sum(matrices: Sequence[Any], weights: Sequence[float]) -> Any:
    """``sum(w * m)``: dense when every matrix is dense, else CSR."""
    if not any(is_top_k(m) for m in matrices):
        total = np.zeros(matrices[0].shape, dtype=np.float64)
        for weight, matrix in zip(weights, matrices, strict=True):
            if weight:
                total += weight * np.asarray(matrix, dtype=np.float64)
        return total
    total = sparse.csr_matrix(matrices[0].shape, dtype=np.float64)
    for weight, matrix in zip(weights, matrices, strict=True):
        if weight:
            total = total + sparse.csr_matrix(matrix, dtype=np.float64) * weight
    return total.tocsr()


def normalized_rows(matrix: Any) -> Any:
    """Rows scaled to sum to 1 (dense: an all-zero row becomes uniform; top-k: it stays empty)."""
    if not is_top_k(matrix):
        from stackcat.core import normalize_rows

        return normalize_rows(matrix)
    matrix = sparse.csr_matrix(matrix, dtype=np.float64)
    totals = np.asarray(matrix.sum(axis=1)).ravel()
    scale = np.divide(1.0, totals, out=np.zeros_like(totals), where=totals > 0)
    return sparse.diags(scale) @ matrix


def take_rows(matrix: Any, rows: np.ndarray | slice) -> Any:
    """Rows of a dense or top-k matrix (boolean mask, indices or a slice)."""
    if isinstance(rows, slice):
        return matrix[rows]
    rows = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows)
    return matrix[rows]


def put_rows(parts: Sequence[tuple[np.ndarray, Any]], n_rows: int, n_classes: int, dtype: Any = np.float32) -> Any:
    """One matrix from ``(row indices, block)`` parts that cover ``n_rows`` rows once each."""
    if not any(is_top_k(block) for _, block in parts):
        out = np.zeros((n_rows, n_classes), dtype=dtype)
        for rows, block in parts:
            out[rows] = block
        return out
    order = np.concatenate([rows for rows, _ in parts])
    stacked = sparse.vstack([sparse.csr_matrix(block, dtype=dtype) for _, block in parts], format="csr")
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return stacked[inverse]
