"""Micro-batching of concurrent requests: ``MicroBatcher``.

Requests that arrive within a short window (a few ms) are predicted together
in one call of the model, in one worker thread, and the result is split back
per request: under load the service approaches batch prediction's rows per
second, while a lone request waits at most the window.

Examples
--------
>>> import asyncio
>>> def double(frame):
...     return frame.assign(y=frame["x"] * 2)
>>> async def main():
...     batcher = MicroBatcher(double, window_s=0.01)
...     await batcher.start()
...     parts = await asyncio.gather(*(batcher.predict(pd.DataFrame({"x": [i]})) for i in range(3)))
...     await batcher.stop()
...     return [int(p["y"].iloc[0]) for p in parts], batcher.batches
>>> asyncio.run(main())
([0, 2, 4], 1)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pandas as pd

DEFAULT_WINDOW_S = 0.004
DEFAULT_MAX_ROWS = 512
LOG = logging.getLogger("stackcat.serve")


class MicroBatcher:
    """Collects concurrent frames for ``window_s`` (or up to ``max_rows``) and predicts them at once.

    Parameters
    ----------
    predict : callable
        Frame in, frame out, one output row per input row, in order.
    window_s : float, default=0.004
        How long the first request of a batch waits for others.
    max_rows : int, default=512
        A batch is predicted as soon as it holds this many rows.
    on_batch : callable, optional
        Called with each batch's row count (metrics).
    worker_setup : callable, optional
        Called once in the worker thread before its first batch (its thread settings).
    """

    def __init__(self, predict: Callable[[pd.DataFrame], pd.DataFrame], *, window_s: float = DEFAULT_WINDOW_S,
                 max_rows: int = DEFAULT_MAX_ROWS, on_batch: Callable[[int], None] | None = None,
                 worker_setup: Callable[[], None] | None = None) -> None:
        self.predict_frame = predict
        self.window_s = window_s
        self.max_rows = max_rows
        self.on_batch = on_batch
        self.batches = 0
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stackcat-predict",
                                          initializer=worker_setup)

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._worker.shutdown(wait=True)

    async def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """``frame``'s predictions, computed together with the frames of concurrent calls."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.predict before start()")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((frame, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        running: asyncio.Future | None = None  # the batch being predicted
        while True:
            batch = [await self._queue.get()]
            rows = len(batch[0][0])
            deadline = loop.time() + self.window_s
            # Collect for the window, and for as long as the worker is still busy with the last batch:
            # under load a batch holds every request that arrived meanwhile.
            while rows < self.max_rows:
                busy = running is not None and not running.done()
                remaining = deadline - loop.time()
                if remaining <= 0 and not busy:
                    break
                item = await self._next_item(running if busy else None, None if busy else remaining)
                if item is not None:
                    batch.append(item)
                    rows += len(item[0])
                elif busy:
                    # The worker just finished. While it held the GIL, requests may have waited unread:
                    # one more window lets the event loop read them into this batch.
                    deadline = loop.time() + self.window_s
            if running is not None:
                await running
            running = asyncio.ensure_future(self._predict_batch(loop, batch))

    async def _next_item(self, running: asyncio.Future | None, timeout: float | None) -> tuple | None:
        """The next queued request, or None when ``running`` finished or ``timeout`` passed first."""
        getter = asyncio.ensure_future(self._queue.get())
        waits = {getter} if running is None else {getter, running}
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            return getter.result()
        getter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await getter
        return None

    async def _predict_batch(self, loop: asyncio.AbstractEventLoop, batch: list) -> None:
        live = [(frame, future) for frame, future in batch if not future.done()]  # a client that left
        if not live:
            return
        frames = [frame for frame, _ in live]
        try:
            out = await loop.run_in_executor(self._worker, self._predict_all, frames)
        except Exception as exc:  # noqa: BLE001 - each request gets the error, the loop goes on
            LOG.exception("prediction failed for a batch of %d request(s)", len(live))
            for _, future in live:
                if not future.done():
                    future.set_exception(exc)
            return
        start = 0
        for frame, future in live:
            if not future.done():
                future.set_result(out.iloc[start:start + len(frame)].reset_index(drop=True))
            start += len(frame)

    def _predict_all(self, frames: list[pd.DataFrame]) -> pd.DataFrame:
        joined = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0].reset_index(drop=True)
        out = self.predict_frame(joined)
        if len(out) != len(joined):
            raise RuntimeError(f"the model returned {len(out)} rows for {len(joined)} products")
        self.batches += 1
        if self.on_batch is not None:
            self.on_batch(len(joined))
        return out


__all__ = ["DEFAULT_MAX_ROWS", "DEFAULT_WINDOW_S", "MicroBatcher"]
