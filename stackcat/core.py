"""The ground floor: labels, probability columns, devices and file modes.

Every other module of stackcat may import this one; it imports nothing of
stackcat and nothing heavy (torch is imported inside the device helpers, when
they run), so ``import stackcat`` stays light.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import torch

__all__ = [
    "Precision",
    "current_umask",
    "limit_threads",
    "set_threads",
    "encode_labels",
    "label_positions",
    "normalize_rows",
    "proba_for_classes",
    "resolve_device",
]

# ---------------------------------------------------------------- labels


def encode_labels(y: Any, n_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """``(classes_, y_indices)``: sorted distinct labels and each row's index into them.

    Examples
    --------
    >>> classes, indices = encode_labels(["shoes", "hats", "shoes"], 3)
    >>> classes.tolist(), indices.tolist()
    (['hats', 'shoes'], [1, 0, 1])
    """
    labels = np.asarray(y.to_numpy(dtype=object) if isinstance(y, pd.Series) else y)
    if labels.ndim != 1:
        raise ValueError(f"y must be 1-D (one category per row); got shape {labels.shape}")
    if len(labels) != n_samples:
        raise ValueError(f"X has {n_samples} rows but y has {len(labels)}")
    if len(labels) == 0:
        raise ValueError("cannot fit on 0 rows")
    if labels.dtype.kind == "f" and np.isnan(labels).any():
        raise ValueError(f"y has missing labels (NaN) at rows {np.flatnonzero(np.isnan(labels))[:10].tolist()}")
    try:
        classes, indices = np.unique(labels, return_inverse=True)
    except TypeError as exc:
        kinds = sorted({type(v).__name__ for v in labels})
        raise TypeError(f"y mixes label types {kinds}; convert them to one type") from exc
    return classes, indices


# ---------------------------------------------------------------- probability columns


def label_positions(classes: Sequence[Any], labels: Any, *, what: str = "labels",
                    missing: int | None = None) -> np.ndarray:
    """Index of each of ``labels`` in ``classes``: the one label-to-index mapper of stackcat.

    A label absent from ``classes`` is an error naming ``what`` (e.g. ``"eval_set"``),
    or gets the index ``missing`` when one is given (e.g. -1 for "unseen").

    Examples
    --------
    >>> label_positions(np.array(["hats", "shoes"]), ["shoes", "hats"]).tolist()
    [1, 0]
    >>> label_positions(np.array(["hats", "shoes"]), ["shoes", "caps"], missing=-1).tolist()
    [1, -1]
    """
    values = labels.to_numpy(dtype=object) if hasattr(labels, "to_numpy") else labels
    values = np.asarray(values, dtype=object)
    position = {c: i for i, c in enumerate(np.asarray(classes).tolist())}
    if missing is not None:
        return np.array([position.get(v, missing) for v in values], dtype=np.int64)
    unknown = sorted({repr(v) for v in values if v not in position})
    if unknown:
        raise ValueError(f"{what} has labels absent from the training labels: {', '.join(unknown[:10])}")
    return np.array([position[v] for v in values], dtype=np.int64)


def proba_for_classes(proba: np.ndarray, model_classes: Sequence[Any], classes: Sequence[Any]) -> np.ndarray:
    """Re-order/pad the columns of ``proba`` (``model_classes`` order) into ``classes`` order.

    A class the model never saw gets probability 0.

    Examples
    --------
    >>> proba_for_classes(np.array([[0.25, 0.75]]), ["b", "c"], ["a", "b", "c"]).tolist()
    [[0.0, 0.25, 0.75]]
    """
    out = np.zeros((proba.shape[0], len(classes)), dtype=proba.dtype)
    out[:, label_positions(classes, list(model_classes), what="model_classes")] = proba
    return out


def normalize_rows(proba: np.ndarray) -> np.ndarray:
    """Rows that sum to 1 (a row of zeros becomes uniform).

    Examples
    --------
    >>> normalize_rows(np.array([[1.0, 3.0], [0.0, 0.0]])).tolist()
    [[0.25, 0.75], [0.5, 0.5]]
    """
    proba = np.asarray(proba, dtype=np.float64)
    totals = proba.sum(axis=1, keepdims=True)
    empty = totals[:, 0] <= 0
    if empty.any():
        proba[empty] = 1.0
        totals[empty] = proba.shape[1]
    return proba / totals


def plain_value(value: Any) -> Any:
    """A NumPy scalar as the Python value it holds (for JSON and CSV); anything else as it is.

    Examples
    --------
    >>> plain_value(np.int64(7)), plain_value("shirt")
    (7, 'shirt')
    """
    return value.item() if hasattr(value, "item") else value


# ---------------------------------------------------------------- devices


def resolve_device(device: str = "auto") -> Any:
    """``"auto"`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``.

    Examples
    --------
    >>> resolve_device("cpu")  # doctest: +SKIP
    device(type='cpu')
    """
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} asked for CUDA, but torch sees no GPU; use device='cpu'")
    return resolved


class Precision:
    """Mixed precision on CUDA (bf16 when supported, else fp16 with a GradScaler); fp32 on CPU.

    ``precision`` other than ``"auto"`` fixes the autocast dtype (``"fp32"``: none,
    ``"fp16"``, ``"bf16"``) on any device, as the image encoders' ``precision`` option asks.

    Examples
    --------
    >>> precision = Precision(resolve_device("cpu"))  # doctest: +SKIP
    >>> with precision.autocast():  # doctest: +SKIP
    ...     logits = module(batch)
    """

    OPTIONS = ("auto", "fp32", "fp16", "bf16")

    def __init__(self, device: torch.device, precision: str = "auto"):
        import torch

        if precision not in self.OPTIONS:
            raise ValueError(f"precision must be one of {self.OPTIONS}, got {precision!r}")
        self.device = device
        self.dtype: torch.dtype | None = None
        if precision == "auto" and device.type == "cuda":
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif precision != "auto":
            self.dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        use_scaler = self.dtype == torch.float16 and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    def autocast(self) -> contextlib.AbstractContextManager:
        import torch

        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Backward pass and optimizer step (through the GradScaler for fp16)."""
        if self.scaler is None:
            loss.backward()
            optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()


@contextlib.contextmanager
def limit_threads(n_threads: int | None) -> Iterator[None]:
    """Cap torch's and the BLAS libraries' threads at ``n_threads`` for the block, then restore them.

    None leaves both alone; a negative number means one per CPU core. The one
    thread limiter of stackcat: every estimator's ``n_threads`` goes through it.

    Examples
    --------
    >>> with limit_threads(1):  # doctest: +SKIP
    ...     model.fit(X, y)
    """
    if n_threads is None:
        yield
        return
    import torch

    threads = (os.cpu_count() or 1) if n_threads < 0 else max(1, int(n_threads))
    if _thread_budget is not None and threads >= _thread_budget:
        yield  # the process already runs on no more threads (set_threads)
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with _threadpool_controller().limit(limits=threads):
            yield
    finally:
        torch.set_num_threads(before)


# Threads the whole process computes on, once set_threads said so (None: the libraries' defaults).
_thread_budget: int | None = None


def set_threads(n_threads: int) -> None:
    """From now on, run torch, the BLAS / OpenMP libraries and new onnxruntime sessions on ``n_threads``.

    For a service answering one product at a time: on a few cores, libraries
    that split a tiny matrix product over every core spend more time waking and
    spinning threads than computing (one demo product took half the CPU time on
    one thread). OpenMP's setting belongs to the calling thread: call this in
    every thread that predicts. :func:`limit_threads` never raises a limit set here.

    Examples
    --------
    >>> set_threads(1)  # doctest: +SKIP
    """
    global _thread_budget
    import torch

    threads = max(1, int(n_threads))
    torch.set_num_threads(threads)
    _threadpool_controller().limit(limits=threads)  # kept: not left as a context manager would
    _thread_budget = threads


_controller: tuple[int, Any] | None = None


def _threadpool_controller() -> Any:
    """threadpoolctl's view of the loaded BLAS / OpenMP libraries, found again only after new imports.

    Finding them scans every loaded shared library (about 10 ms); a served model
    limits threads on every request.
    """
    global _controller
    from threadpoolctl import ThreadpoolController

    loaded = len(sys.modules)
    if _controller is None or _controller[0] != loaded:
        _controller = (loaded, ThreadpoolController())
    return _controller[1]


# ---------------------------------------------------------------- files


def current_umask() -> int:
    """The process's umask, read without changing it (Linux), else set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
