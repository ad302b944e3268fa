"""Batch prediction of a table, chunk by chunk, here or on a dask.distributed cluster.

On a cluster each chunk of rows goes to a worker, which loads the model (a
bundle or a run folder, at a path every worker can read) once and keeps it;
the chunks come back in the table's order, so ids and order are kept and one
output is written by the caller. At most ``2 x workers`` chunks are in flight:
memory stays bounded whatever the table's size.

Examples
--------
>>> predictor = Predictor.load("model")                                               # doctest: +SKIP
>>> for errors, predictions, images in predicted_chunks(predictor, "model", Path("big.csv"),
...                                             scheduler="tcp://10.0.0.5:8786"):     # doctest: +SKIP
...     predictions.to_csv(...)
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["predicted_chunks"]

_IN_FLIGHT_PER_WORKER = 2
# what each chunk gives: its row problems, its predictions, its rows' image statuses (None: no image member)
Chunk = tuple[list[str], pd.DataFrame, Any]
_loaded: dict[tuple[str, bool, float], Any] = {}  # a worker's models, loaded once
_loading = threading.Lock()


def predicted_chunks(predictor: Any, model: str | Path, table: Path, *, chunk_rows: int = 10_000,
                     image_dir: str | None = None, scheduler: str | None = None,
                     trusted: bool = False, allow_missing_images: bool = False) -> Iterator[Chunk]:
    """``(row problems, predictions, image statuses)`` of each chunk of ``table``, in the table's order.

    Parameters
    ----------
    predictor : Predictor
        The model, loaded here (predicts the chunks when there is no ``scheduler``).
    model : str or Path
        Where ``predictor`` was loaded from: each worker loads it from there.
    table : Path
        The table to predict; relative image paths are read beside it.
    chunk_rows : int, default=10_000
        Rows per chunk (a task on the cluster).
    image_dir : str, optional
        Image folder of this table (absolute).
    scheduler : str, optional
        Address of a dask.distributed scheduler (``tcp://host:8786``).
    trusted : bool, default=False
        Run folders only: load pickles not signed by this user.
    allow_missing_images : bool, default=False
        Predict even when no row of the first chunk has a usable image
        (:meth:`Predictor.check_images`); later chunks are always predicted.
    """
    from stackcat.data import read_table_chunks

    base_dir = str(table.resolve().parent)
    chunks = read_table_chunks(table, chunk_rows)
    if scheduler is None:
        for number, chunk in enumerate(chunks):
            yield _predict_chunk(predictor, chunk, base_dir, image_dir, allow_missing_images or number > 0)
        return
    yield from _on_cluster(scheduler, str(Path(model).resolve()), trusted, predictor.review.precision, chunks,
                           base_dir, image_dir, allow_missing_images)


def _on_cluster(scheduler: str, model: str, trusted: bool, precision: float, chunks: Iterator[pd.DataFrame],
                base_dir: str, image_dir: str | None, allow_missing_images: bool) -> Iterator[Chunk]:
    from distributed import Client

    with Client(scheduler) as client:
        window = _IN_FLIGHT_PER_WORKER * max(len(client.scheduler_info().get("workers", {})), 1)
        pending: deque = deque()
        for number, chunk in enumerate(chunks):
            pending.append(client.submit(_predict_on_worker, model, trusted, precision, chunk, base_dir,
                                         image_dir, allow_missing_images or number > 0, pure=False))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _predict_on_worker(model: str, trusted: bool, precision: float, chunk: pd.DataFrame, base_dir: str,
                       image_dir: str | None, allow_missing_images: bool) -> Chunk:
    from stackcat.predictor import Predictor

    key = (model, trusted, precision)
    with _loading:
        if key not in _loaded:
            _loaded[key] = Predictor.load(model, trusted=trusted, precision=precision)
    return _predict_chunk(_loaded[key], chunk, base_dir, image_dir, allow_missing_images)


def _predict_chunk(predictor: Any, chunk: pd.DataFrame, base_dir: str, image_dir: str | None,
                   allow_missing_images: bool) -> Chunk:
    prepared = predictor.prepare(chunk, base_dir=base_dir, image_dir=image_dir)
    images = predictor.check_images(prepared, allow_missing=allow_missing_images)
    return ([str(error) for error in prepared.errors], predictor.predict_prepared(prepared.frame, images=images),
            images)
