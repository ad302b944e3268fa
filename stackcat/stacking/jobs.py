"""The job engine: folds, one job per (model, fold), and the files a job leaves in a run folder.

Every (model, fold) job fits a clone on the other folds and predicts the
held-out fold, aligned to the global class list (:func:`run_job`). With a run
folder the result is written atomically under a key made of the model's
params, the data and the fold's rows, and read back on resume
(:func:`load_job`), so a stopped or crashed fit resumes where it stopped.

Rare classes: a class with fewer members than ``n_splits`` is spread over as
many folds as it has members (one member per fold, :func:`make_folds`).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse
from sklearn.base import clone
from sklearn.model_selection import StratifiedKFold

from stackcat.core import proba_for_classes
from stackcat.runs import (
    RunFolder,
    RunFolderError,
    load_pickle,
    scratch_files_in,
    signature_problem,
    write_joblib,
    write_npz,
)
from stackcat.topk import is_top_k, top_k_rows

PREDICT_BLOCK_CELLS = 20_000_000  # top-k prediction: rows per block x classes stays under this


@dataclass(frozen=True)
class Job:
    """One unit of work: fit ``model`` on ``train`` rows, predict ``test`` rows."""

    model: str
    name: str  # "fold-0" ... or "full" (refit on all rows)
    train: np.ndarray
    test: np.ndarray
    key: str


@dataclass
class JobResult:
    model: str
    name: str
    key: str
    test: np.ndarray
    oof: np.ndarray
    fit_seconds: float
    predict_seconds: float
    n_train: int
    estimator: Any = None  # the fitted model when it is not kept on disk
    cached: bool = False
    # retrieval signals of the held-out rows in a learned member's space (see has_learned_space)
    signals: dict[str, Any] = field(default_factory=dict)



# --------------------------------------------------------------------------- folds


def make_folds(y_index: np.ndarray, n_splits: int, random_state: int | None) -> np.ndarray:
    """Fold number of each row: ``StratifiedKFold(n_splits, shuffle=True, random_state)``.

    Classes with fewer than ``n_splits`` members are spread one member per fold
    (scikit-learn's warning about them is replaced by ``rare_classes_``).
    """
    counts = np.bincount(y_index)
    if n_splits > len(y_index):
        raise ValueError(f"n_splits={n_splits} is more than the {len(y_index)} rows")
    if counts.max() < n_splits:
        raise ValueError(
            f"n_splits={n_splits} but the largest class has only {counts.max()} rows; "
            "use fewer folds or more data"
        )
    splitter = StratifiedKFold(n_splits, shuffle=True, random_state=random_state)
    folds = np.empty(len(y_index), dtype=np.int32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")
        for fold, (_, test) in enumerate(splitter.split(np.zeros(len(y_index)), y_index)):
            folds[test] = fold
    return folds

def take_rows(X: Any, rows: np.ndarray) -> Any:
    """Rows of a DataFrame (index reset), Series, array or list."""
    if isinstance(X, pd.DataFrame):
        return X.iloc[rows].reset_index(drop=True)
    if isinstance(X, pd.Series):
        return X.iloc[rows].reset_index(drop=True)
    if isinstance(X, np.ndarray):
        return X[rows]
    return [X[i] for i in rows]


def has_learned_space(estimator: Any) -> bool:
    """Whether a member learns its own retrieval space (``project(X)``, e.g. ``MetricSpaceClassifier``).

    Its signals depend on the labels it was fitted on, so they are computed by each
    fold job for its held-out rows (:func:`stackcat.meta.retrieval.learned_space_signals`).
    """
    return callable(getattr(estimator, "project", None))


def run_job(job: Job, estimator: Any, X: Any, y: np.ndarray, classes: np.ndarray,
            run_path: str | None, oof_dtype: str, top_k: int | None = None) -> JobResult:
    """Fit one clone and predict its held-out rows; with ``run_path`` the result is written there.

    The model file is written before the OOF file: a job is complete exactly
    when its ``.oof.npz`` exists. The model file is written unsigned: the
    process that planned the jobs signs it when the result comes back (a dask
    worker needs no signing key). Temporary files of the model go to the run
    folder's ``tmp/``. With ``top_k`` the held-out probabilities are kept as
    top-k rows (:mod:`stackcat.topk`), predicted in blocks of rows.
    """
    with scratch_files_in(RunFolder(run_path).temp_folder if run_path is not None else None):
        return _run_job(job, estimator, X, y, classes, run_path, oof_dtype, top_k)


def predict_aligned(model: Any, X: Any, classes: np.ndarray, dtype: str = "float32",
                    top_k: int | None = None) -> Any:
    """``model``'s probabilities of X in the columns of ``classes`` (0 for classes it never saw);
    with ``top_k``, a top-k CSR matrix predicted in blocks of rows, so no dense ``rows x classes``
    matrix is ever whole."""
    if top_k is None:
        return proba_for_classes(np.asarray(model.predict_proba(X)), model.classes_, classes).astype(dtype)
    block_rows = max(PREDICT_BLOCK_CELLS // max(len(classes), 1), 256)
    blocks = []
    for start in range(0, len(X), block_rows):
        rows = np.arange(start, min(start + block_rows, len(X)))
        proba = np.asarray(model.predict_proba(take_rows(X, rows)))
        blocks.append(top_k_rows(proba_for_classes(proba, model.classes_, classes), top_k, dtype))
    return sparse.vstack(blocks, format="csr") if blocks else sparse.csr_matrix((0, len(classes)), dtype=dtype)


def _run_job(job: Job, estimator: Any, X: Any, y: np.ndarray, classes: np.ndarray,
             run_path: str | None, oof_dtype: str, top_k: int | None) -> JobResult:
    model = clone(estimator)
    start = time.perf_counter()
    model.fit(take_rows(X, job.train), y[job.train])
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    if len(job.test):
        oof = predict_aligned(model, take_rows(X, job.test), classes, oof_dtype, top_k)
    else:
        oof = np.zeros((0, len(classes)), dtype=oof_dtype)
    predict_seconds = time.perf_counter() - start
    signals = {}
    if has_learned_space(model) and len(job.test):
        from stackcat.meta.retrieval import learned_space_signals

        signals = learned_space_signals(model, take_rows(X, job.test), classes, top_k)
    result = JobResult(job.model, job.name, job.key, job.test, oof, fit_seconds, predict_seconds,
                       len(job.train), estimator=model, signals=signals)
    if run_path is not None:
        run = RunFolder(run_path)
        write_joblib(model, run.model_path(job.model, job.name, job.key), sign=False)
        write_npz(run.oof_path(job.model, job.name, job.key), test=job.test, **_oof_arrays(oof),
                  **_signal_arrays(signals), timings=np.array([fit_seconds, predict_seconds]),
                  n_train=np.array(len(job.train)))
        result.estimator = None
    return result


def load_job(run: RunFolder, job: Job, learned_space: bool = False) -> JobResult | None:
    """The stored result of ``job``, or None when it has not finished.

    A job whose files were damaged or deleted since (disk errors, a hand-edited
    folder) is not trusted: it is recomputed, with a warning. Its model file
    must carry this user's signature (see :mod:`stackcat.runs`), which also
    catches a truncated or overwritten model without unpickling it. With
    ``learned_space`` (the member has one) a fold job's file must hold its
    held-out rows' signals too.
    """
    path = run.oof_path(job.model, job.name, job.key)
    if not path.exists():
        return None
    model_path = run.model_path(job.model, job.name, job.key)
    if not model_path.exists():
        warnings.warn(f"{path}: its fitted model file is gone; the job is computed again", stacklevel=3)
        return None
    problem = signature_problem(model_path)
    if problem is not None:
        warnings.warn(f"{model_path}: {problem}; the job is computed again", stacklevel=3)
        return None
    try:
        with np.load(path) as stored:
            if not np.array_equal(stored["test"], job.test):
                return None
            fit_seconds, predict_seconds = stored["timings"].tolist()
            signals = _stored_signals(stored)
            if learned_space and len(job.test) and not signals:
                return None
            return JobResult(job.model, job.name, job.key, stored["test"], _stored_oof(stored), fit_seconds,
                             predict_seconds, int(stored["n_train"]), cached=True, signals=signals)
    except Exception as exc:  # a damaged zip raises BadZipFile, ValueError, KeyError, EOFError...
        warnings.warn(f"{path}: unreadable ({type(exc).__name__}: {exc}); the job is computed again",
                      stacklevel=3)
        return None


def _oof_arrays(oof: Any) -> dict[str, np.ndarray]:
    """The arrays that store an OOF block in a ``.oof.npz``: dense, or the parts of a top-k CSR."""
    if not is_top_k(oof):
        return {"oof": oof}
    return {"oof_data": oof.data, "oof_indices": oof.indices, "oof_indptr": oof.indptr,
            "oof_shape": np.array(oof.shape)}


def _stored_oof(stored: Any, prefix: str = "oof") -> Any:
    if prefix in stored:
        return stored[prefix]
    return sparse.csr_matrix((stored[f"{prefix}_data"], stored[f"{prefix}_indices"], stored[f"{prefix}_indptr"]),
                             shape=tuple(stored[f"{prefix}_shape"]))


_TOP_K_PARTS = ("_data", "_indices", "_indptr", "_shape")  # a top-k CSR matrix stored as its parts


def _signal_arrays(signals: dict[str, Any]) -> dict[str, np.ndarray]:
    """The arrays that store a job's learned-space signals in its ``.oof.npz`` (``signal.<kind>...``)."""
    arrays = {}
    for kind, matrix in signals.items():
        arrays.update({f"signal.{kind}{name[3:]}": values for name, values in _oof_arrays(matrix).items()})
    return arrays


def _stored_signals(stored: Any) -> dict[str, Any]:
    kinds = set()
    for name in stored.files:
        if name.startswith("signal."):
            kind = name[len("signal."):]
            kinds.add(kind.rsplit("_", 1)[0] if kind.endswith(_TOP_K_PARTS) else kind)
    return {kind: _stored_oof(stored, f"signal.{kind}") for kind in kinds}


# --------------------------------------------------------------------------- the estimator


def read_cached(path: Path) -> Any:
    """A cached, signed result, or None when absent, unsigned or damaged (then it is computed again)."""
    if not path.exists():
        return None
    problem = signature_problem(path)
    if problem is not None:
        warnings.warn(f"{path}: {problem}; computed again", stacklevel=3)
        return None
    try:
        return load_pickle(path, trusted=True, what="cached result")  # its signature was just checked
    except (RunFolderError, OSError) as exc:
        warnings.warn(f"{exc}; computed again", stacklevel=3)
        return None
