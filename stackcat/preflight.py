"""Checks of a fit that need only the table, the params and the environment: run before any job.

A (model, fold) job can take hours; a column a param names, the category
tree, the signing key and the cluster address can all be checked in the
first second. :func:`check_before_jobs` runs them at the start of
:meth:`stackcat.stacking.StackingCategorizer.fit` and in ``stackcat fit``
before the run folder is written.

Examples
--------
>>> import pandas as pd
>>> from sklearn.dummy import DummyClassifier
>>> X = pd.DataFrame({"text": ["a", "b"]})
>>> missing_columns_of([("dummy", DummyClassifier())], X)
[]
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pandas as pd

from stackcat.runs import FILE_COLUMN_PARAMS, file_columns_of, signing_key
from stackcat.taxonomy import CategoryTree, category_tree

COLUMN_PARAM_SUFFIX = "_column"
SCHEDULER_TIMEOUT_S = 10.0


class PreflightError(ValueError):
    """A fit that would fail (or mean something else than asked) once its jobs have run."""


def check_before_jobs(stack: Any, X: Any, classes: Sequence[Any]) -> CategoryTree | None:
    """Everything a fit of ``stack`` on ``X`` can check before its first job; returns its category tree.

    Parameters
    ----------
    stack : StackingCategorizer
        The stack about to be fitted (its params validated).
    X : DataFrame or sequence
        Its input rows.
    classes : sequence
        The distinct labels (``classes_``).

    Raises
    ------
    PreflightError
        A param naming a column that ``X`` lacks.
    TreeError
        A tree file that cannot be read or holds a cycle, a label not in the
        tree; path labels with an empty separator, one that never occurs,
        or one category under two paths.
    RunFolderError
        A signing key that cannot be created (with a run folder).
    ConnectionError
        A ``scheduler`` address where no dask scheduler answers.
    """
    missing = missing_columns_of(stack.estimators, X)
    if missing:
        raise PreflightError("; ".join(missing))
    tree = category_tree(stack.tree, stack.label_separator, classes)
    if stack.run_dir is not None:
        signing_key()  # created now, not after the first fold
    if stack.scheduler is not None:
        check_scheduler(stack.scheduler)
    return tree


def missing_columns_of(estimators: Sequence[tuple[str, Any]], X: Any) -> list[str]:
    """One line per ``*_column`` param of an estimator that names a column ``X`` does not have."""
    if not isinstance(X, pd.DataFrame):
        return []
    columns = [str(c) for c in X.columns]
    return [f"estimator {name!r}: {param}={column!r} names no column of the input (it has {columns})"
            for name, estimator in estimators for param, column in _columns_read(estimator)
            if column not in X.columns]


def _columns_read(estimator: Any) -> Iterator[tuple[str, str]]:
    """The (param, column) pairs of ``estimator``'s column params; an image column only if it reads images.

    A column the estimator reads only when present (its ``optional_columns``,
    e.g. FastText's ``title_column``) is not required.
    """
    if not hasattr(estimator, "get_params"):
        return
    files = set(file_columns_of(estimator))
    optional = set(getattr(estimator, "optional_columns", ()))
    for name, value in estimator.get_params(deep=True).items():
        leaf = name.split("__")[-1]
        if isinstance(value, str) and leaf.endswith(COLUMN_PARAM_SUFFIX) and leaf not in optional and (
                leaf not in FILE_COLUMN_PARAMS or value in files):
            yield name, value


def check_scheduler(address: str, timeout: float | None = None) -> None:
    """Ask ``address`` who it is, as dask does, within ``timeout`` seconds (:data:`SCHEDULER_TIMEOUT_S`).

    Any other server (a dashboard's HTTP port...) makes a dask Client wait
    forever or read its reply as a frame of exabytes.

    Raises
    ------
    ConnectionError
        Naming the address and what happened.
    """
    try:
        import distributed  # noqa: F401
    except ImportError as exc:
        raise ImportError("--scheduler needs dask.distributed: pip install 'stackcat[dask]'") from exc
    timeout = SCHEDULER_TIMEOUT_S if timeout is None else timeout
    try:
        # a thread of its own: the caller may be inside an event loop (a notebook)
        with ThreadPoolExecutor(1) as pool:
            reply = pool.submit(asyncio.run, _identity(address, timeout)).result()
    except (TimeoutError, asyncio.TimeoutError):
        raise ConnectionError(f"--scheduler {address}: no dask scheduler answered within {timeout:.0f} s (is it "
                              "a dashboard or another server's port? a scheduler's address looks like "
                              "tcp://HOST:8786)") from None
    except Exception as exc:  # refused, unknown host, a reply that is not dask's protocol
        raise ConnectionError(f"--scheduler {address}: cannot reach a dask scheduler there "
                              f"({type(exc).__name__}: {str(exc).strip() or 'no message'})") from None
    if not isinstance(reply, dict) or reply.get("type") != "Scheduler":
        kind = reply.get("type") if isinstance(reply, dict) else type(reply).__name__
        raise ConnectionError(f"--scheduler {address}: the server there is not a dask scheduler "
                              f"(it says it is a {kind!r})")


async def _identity(address: str, timeout: float) -> Any:
    from distributed.comm import connect

    comm = await asyncio.wait_for(connect(address, timeout=timeout), timeout)
    try:
        await asyncio.wait_for(comm.write({"op": "identity", "reply": True}), timeout)
        return await asyncio.wait_for(comm.read(), timeout)
    finally:
        comm.abort()


__all__ = ["PreflightError", "SCHEDULER_TIMEOUT_S", "check_before_jobs", "check_scheduler", "missing_columns_of"]
