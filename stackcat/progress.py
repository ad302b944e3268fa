"""One policy for progress output: bars on a terminal only, one log line per finished stage.

A fit can run for hours, often with its output captured in a file. So:

- **Bars** (:func:`progress_bar`) are drawn only when stderr is a terminal
  (tqdm's ``disable=None``) and ``enabled``; nested ones (an epoch inside a
  fold) vanish when done (``leave=False``) instead of stacking up.
- **Stage lines** (:func:`log_stage`, :func:`rate`) say what each stage did,
  with counts and rates: texts encoded, images encoded, each job, each epoch.
  They go to the ``"stackcat"`` logger at INFO, whether bars are shown or not.
  The command line prints them (:func:`print_stage_lines`); a library user
  sees them after ``logging.basicConfig(level=logging.INFO)``.

Examples
--------
>>> with progress_bar(total=3, desc="jobs", unit="job", enabled=False) as bar:
...     bar.update(3)
>>> rate(1200, "texts encoded", 2.0)
'1,200 texts encoded in 2.0 s (600/s)'
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

logger = logging.getLogger("stackcat")


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", enabled: bool = True, initial: int = 0, leave: bool = False) -> Any:
    """A tqdm bar shown only when ``enabled`` and stderr is a terminal (a no-op object otherwise)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, leave=leave,
                disable=None if enabled else True, dynamic_ncols=True)


def rate(count: int, what: str, seconds: float) -> str:
    """``"1,200 texts encoded in 2.0 s (600/s)"``."""
    per_second = f"{count / seconds:,.0f}/s" if seconds > 0 else "instant"
    return f"{count:,} {what} in {seconds:.1f} s ({per_second})"


def log_stage(message: str, *args: Any, level: int = logging.INFO) -> None:
    """One line for a finished stage (INFO on the ``"stackcat"`` logger; sub-stages such as
    training epochs use DEBUG, so a captured log keeps one line per stage)."""
    logger.log(level, message, *args)


class _TqdmSafeHandler(logging.Handler):
    """Writes each record with ``tqdm.write`` (a bar on screen is redrawn below it) to stdout."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never stop the run
            self.handleError(record)


@contextlib.contextmanager
def print_stage_lines(level: int = logging.INFO) -> Iterator[None]:
    """Print the ``"stackcat"`` logger's lines on stdout, time-stamped, within this block (the CLI)."""
    handler = _TqdmSafeHandler(level)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(min(level, old_level) if old_level else level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)

