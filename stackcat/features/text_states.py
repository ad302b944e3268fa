"""Token states of a frozen text encoder, computed once per text and cached.

A frozen encoder gives every text the same last hidden states in every epoch,
fold and model, so :func:`token_states` computes them once: each distinct text is
encoded once per (model, ``max_length``) and cache folder, and the states of its
real tokens (``(T_i, H)``, no padding) are stored as float16 in an
:class:`stackcat.features.store.EmbeddingStore` (on disk with ``cache_dir``, and in a
process-wide memory LRU). ``BertClassifier(freeze_encoder=True)`` trains its head
on their mean (= mean pooling over the attention mask), ``FusionClassifier(freeze_encoder=True)``
on the states themselves; both read the same entries.

**Below the top layers.** With ``below_top_layers=k`` the states are those that
enter the encoder's top ``k`` transformer layers (the last hidden states of the
encoder without them, :func:`stackcat.features.hub.without_top_layers`):
``BertClassifier(freeze_encoder=True, tune_top_layers=k)`` trains copies of those
``k`` layers on them. They are keyed apart by ``k`` (``k=0``: the last hidden states).

Keys: a BLAKE2b hash of (model identity, ``max_length``, text); ``k > 0`` adds
``+below-top-k`` to the identity. The identity of a
model (:func:`text_model_identity`) is a content hash of its checkpoint folder
(weights, config and tokenizer files), so a folder whose weights change gets new
keys and never meets stale states; copied to another folder or machine, it keeps
them. The hash (:func:`stackcat.files.folder_digest`) is computed once per process
(remembered per file size and mtime):
0.8 s for the 487 MB multilingual-e5-small folder on the development box.

Parallel jobs (processes) that start together may each encode a text that
none of them has cached yet; to encode every text exactly once, fill the cache
first with one :func:`token_states` call on all the texts.

The encoder itself is loaded only when some text is not cached, and kept
(one model at a time) for the next call of the process, so predicting right after
fitting does not load it again; :func:`clear_memory_cache` lets it go.

Backends (``backend=``): on CPU the encoder runs by default through onnxruntime
(exported once into ``<checkpoint>/.onnx/``, see :mod:`stackcat.features.onnx_backend`), several
times faster than PyTorch and equal to it within float rounding (states are
stored as float16 anyway), so both share the cache entries. ``"onnx-int8"``
states are keyed apart. Batches hold texts of similar length (sorted by token
count), each padded to its own longest text.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from stackcat.core import Precision, resolve_device
from stackcat.features import onnx_backend
from stackcat.features.hub import (
    PretrainedModelNotFoundError,
    load_text_encoder,
    quiet_transformers,
    tokenize,
    usable_max_length,
    without_top_layers,
)
from stackcat.features.store import EmbeddingStore, MemoryCache, content_key
from stackcat.files import folder_digest, forget_digests
from stackcat.progress import log_stage, progress_bar, rate

__all__ = [
    "TOKEN_STATES_MEMORY_BYTES",
    "check_text_model",
    "clear_memory_cache",
    "mean_pooled",
    "states_identity_of",
    "text_model_identity",
    "token_states",
]

#: Budget of the in-process cache of token states (least recently used entries are dropped).
TOKEN_STATES_MEMORY_BYTES = 512 * 2**20

_memory = MemoryCache(TOKEN_STATES_MEMORY_BYTES)
# The last encoder loaded: {(identity, device, backend): _Runner}; one model at a time.
_loaded: dict[tuple[str, str, str], _Runner] = {}
_INT8_TAG = "+onnx-int8"
_BELOW_TOP_TAG = "+below-top-{}"
_lock = threading.RLock()


def token_states(
    texts: Sequence[str],
    model_name: str | os.PathLike,
    max_length: int,
    *,
    cache_dir: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int = 64,
    progress: bool = True,
    backend: str = "auto",
    below_top_layers: int = 0,
) -> list[np.ndarray]:
    """Last hidden states of each text's real tokens under a frozen encoder, each text encoded once.

    Parameters
    ----------
    texts : sequence of str
    model_name : str or path-like
        Hugging Face hub name (cached, when offline) or local checkpoint folder.
    max_length : int
        Tokens kept per text (special tokens included; capped by the model's own limit).
    cache_dir : str, path-like or None, default=None
        On-disk cache folder shared by folds, processes and models (created when
        needed); None caches in this process's memory only.
    device : str, default="auto"
        Where the encoder runs when some text is not cached.
    batch_size : int, default=64
        Texts per encoder forward pass.
    progress : bool, default=True
        Show a bar (on a terminal) while encoding texts that are not cached; a line
        with the count and rate goes to the ``"stackcat"`` logger either way.
    backend : {"auto", "torch", "onnx", "onnx-int8"}, default="auto"
        What runs the encoder: ``"auto"`` = onnxruntime on CPU when installed, else
        PyTorch (see :func:`stackcat.features.onnx_backend.resolve_backend`). ``"onnx-int8"``
        (int8 weights) gives slightly different states, cached apart.
    below_top_layers : int, default=0
        Return the hidden states below the encoder's top ``below_top_layers``
        transformer layers instead of the last ones (cached apart per value; the
        encoder runs without those layers).

    Returns
    -------
    list of ndarray
        One ``(T_i, hidden_size)`` float16 array per text (read-only; shared with the
        cache): ``T_i`` is the text's token count, special tokens included.

    Examples
    --------
    >>> states = token_states(["red cotton shirt", "jeans"], "/models/rubert-tiny2", 32,
    ...                       cache_dir="artifacts/text-cache")  # doctest: +SKIP
    >>> [s.shape for s in states]  # doctest: +SKIP
    [(5, 312), (3, 312)]
    """
    texts = list(texts)
    if not texts:
        return []
    identity = text_model_identity(model_name)
    torch_device = resolve_device(device)
    resolved = onnx_backend.resolve_backend(backend, torch_device)
    states_identity = states_identity_of(identity, resolved, below_top_layers)
    store = _store(model_name, states_identity, max_length, cache_dir)
    keys = [content_key(states_identity, str(max_length), text) for text in texts]
    distinct = dict(zip(keys, texts))
    found = store.get_many(distinct)
    missing = [(key, text) for key, text in distinct.items() if key not in found]
    if missing:
        runner = _runner_for(model_name, identity, torch_device, resolved, below_top_layers,
                             fallback=backend == "auto")
        bar = progress_bar(total=len(missing), unit="text", enabled=progress,
                           desc=f"encoding texts [{Path(str(model_name)).name}]")
        start = time.perf_counter()
        with bar:
            for key, states in _encode(missing, runner, max_length, batch_size):
                found[key] = store.put(key, states)
                bar.update()
        log_stage(f"[{Path(str(model_name)).name}] "
                  + rate(len(missing), "texts encoded", time.perf_counter() - start))
    return [found[key] for key in keys]


def states_identity_of(identity: str, backend: str, below_top_layers: int = 0) -> str:
    """What keys the cached states: the checkpoint's ``identity``, int8 weights and the layer cut.

    Examples
    --------
    >>> states_identity_of("abc", "onnx", below_top_layers=2)
    'abc+below-top-2'
    """
    tags = (_INT8_TAG if backend == "onnx-int8" else "") + (
        _BELOW_TOP_TAG.format(int(below_top_layers)) if below_top_layers else "")
    return identity + tags


def mean_pooled(states: Sequence[np.ndarray]) -> np.ndarray:
    """``(n, hidden_size)`` float32: the mean of each text's token states (zeros for no token)."""
    if not states:
        return np.zeros((0, 0), dtype=np.float32)
    pooled = np.zeros((len(states), states[0].shape[1]), dtype=np.float32)
    for row, rows_of_text in enumerate(states):
        if len(rows_of_text):
            pooled[row] = rows_of_text.mean(axis=0, dtype=np.float32)
    return pooled


def text_model_identity(model_name: str | os.PathLike) -> str:
    """Content hash of a text model's checkpoint (weights, config and tokenizer files).

    Changes when any file of the folder changes; stays when the folder is copied.
    A hub name is resolved to its snapshot in the local Hugging Face cache
    (downloaded first when online and not cached yet).

    Raises
    ------
    PretrainedModelNotFoundError
        If the folder does not exist, or the hub name is not cached and cannot be downloaded.
    """
    return _folder_digest(_checkpoint_folder(model_name))


def check_text_model(model_name: str | os.PathLike, expected_identity: str) -> None:
    """Raise ValueError when ``model_name`` is no longer the checkpoint a model was trained with."""
    identity = text_model_identity(model_name)
    if identity != expected_identity:
        raise ValueError(
            f"the text encoder {str(model_name)!r} has changed since this model was fitted (its "
            f"files hash to {identity[:12]}..., the model was trained on features of "
            f"{expected_identity[:12]}...): its frozen-encoder features would not match the "
            "trained head. Point model_name at the original checkpoint, or fit again."
        )


def clear_memory_cache() -> None:
    """Forget the token states, checkpoint hashes and loaded encoder remembered by this process."""
    _memory.clear()
    forget_digests()
    with _lock:
        _loaded.clear()


def _store(model_name: str | os.PathLike, identity: str, max_length: int,
           cache_dir: str | os.PathLike | None) -> EmbeddingStore:
    namespace = f"text-{Path(str(model_name)).name}-max_length{max_length}-{identity}"
    return EmbeddingStore(namespace, cache_dir, dtype=np.float16, ndim=2, memory=_memory,
                          what="text token states")


class _Runner:
    """A frozen text encoder ready to run: ``run(input_ids, attention_mask) -> (B, T, H)`` float32."""

    def __init__(self, run: Callable[[np.ndarray, np.ndarray], np.ndarray], tokenizer: Any,
                 max_positions: int | None) -> None:
        self.run = run
        self.tokenizer = tokenizer
        self.max_positions = max_positions

    def usable_max_length(self, max_length: int) -> int:
        config = SimpleNamespace(max_position_embeddings=self.max_positions)
        return usable_max_length(max_length, self.tokenizer, SimpleNamespace(config=config))


def _encode(items: list[tuple[str, str]], runner: _Runner, max_length: int, batch_size: int):
    """Yield ``(key, float16 states of the real tokens)`` per item, batch by batch (shortest first).

    Texts are sorted by token count and each batch is padded to its own longest
    text, so little work goes into padding.
    """
    tokenizer = runner.tokenizer
    token_ids = tokenize(tokenizer, [text for _, text in items], runner.usable_max_length(max_length))
    order = np.argsort([len(ids) for ids in token_ids], kind="stable")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        input_ids, attention_mask = _padded([token_ids[i] for i in rows], pad_id)
        states = runner.run(input_ids, attention_mask)
        for batch_row, row in enumerate(rows):
            yield items[row][0], states[batch_row, :len(token_ids[row])].astype(np.float16)


def _padded(sequences: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` int64, padded on the right to the longest sequence."""
    width = max(len(sequence) for sequence in sequences)
    input_ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(sequences), width), dtype=np.int64)
    for row, sequence in enumerate(sequences):
        input_ids[row, :len(sequence)] = sequence
        attention_mask[row, :len(sequence)] = 1
    return input_ids, attention_mask


def _runner_for(model_name: str | os.PathLike, identity: str, device: torch.device, backend: str,
                below_top_layers: int = 0, *, fallback: bool = False) -> _Runner:
    """The frozen encoder of ``identity`` on ``device`` through ``backend``; loaded once (one at a time).

    Without its top ``below_top_layers`` layers, when that is not 0.

    With ``fallback`` (backend chosen by ``"auto"``), a model that cannot be exported to
    ONNX runs on PyTorch instead (fp32 both: the same states, the same cache keys).
    """
    slot = (identity, str(device), backend, below_top_layers)
    with _lock:
        if slot not in _loaded:
            _loaded.clear()  # one model at a time: the previous one's memory goes back
            try:
                build = _torch_runner if backend == "torch" else _onnx_runner
                _loaded[slot] = build(model_name, identity, device, backend, below_top_layers)
            except onnx_backend.ExportError as exc:
                if not fallback:
                    raise
                warnings.warn(f"{Path(str(model_name)).name}: running on PyTorch, the ONNX export failed "
                              f"({exc})", stacklevel=3)
                _loaded[slot] = _torch_runner(model_name, identity, device, "torch", below_top_layers)
        return _loaded[slot]


def _torch_runner(model_name: str | os.PathLike, identity: str, device: torch.device, backend: str,
                  below_top_layers: int) -> _Runner:
    encoder, tokenizer = load_text_encoder(model_name)
    without_top_layers(encoder, below_top_layers)
    encoder.to(device).eval().requires_grad_(False)
    precision = Precision(device)

    @torch.no_grad()
    def run(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with precision.autocast():
            states = encoder(input_ids=torch.from_numpy(input_ids).to(device),
                             attention_mask=torch.from_numpy(attention_mask).to(device)).last_hidden_state
        return states.float().cpu().numpy()

    return _Runner(run, tokenizer, getattr(encoder.config, "max_position_embeddings", None))


def _onnx_runner(model_name: str | os.PathLike, identity: str, device: torch.device, backend: str,
                 below_top_layers: int) -> _Runner:
    folder = _checkpoint_folder(model_name)
    export_identity = f"text\0{identity}" + (f"\0below-top-{below_top_layers}" if below_top_layers else "")
    path, metadata = onnx_backend.exported_model(
        onnx_backend.onnx_folder(folder), export_identity,
        lambda target: _export_text_encoder(model_name, target, below_top_layers),
        int8=backend == "onnx-int8")
    session = onnx_backend.inference_session(path, onnx_backend.torch_thread_budget())
    with quiet_transformers():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)

    # an encoder cut below all its layers (only embeddings left) has no attention_mask input
    input_names = {node.name for node in session.get_inputs()}

    def run(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        return session.run(None, {name: value for name, value in feed.items() if name in input_names})[0]

    return _Runner(run, tokenizer, metadata.get("max_positions"))


class _LastHiddenState(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _export_text_encoder(model_name: str | os.PathLike, path: str, below_top_layers: int = 0) -> dict:
    """Write the encoder's ``last_hidden_state`` (without its top layers) as an fp32 ONNX model.

    Returns its metadata.
    """
    encoder, tokenizer = load_text_encoder(model_name)  # a private copy: the export traces it
    without_top_layers(encoder, below_top_layers)
    if hasattr(encoder, "set_attn_implementation"):
        encoder.set_attn_implementation("eager")  # plain matrix products trace into ONNX as they are
    example = tokenizer(["a red cotton shirt for men", "jeans"], padding=True, return_tensors="pt")
    onnx_backend.torch_export(_LastHiddenState(encoder), (example["input_ids"], example["attention_mask"]), path,
                       input_names=["input_ids", "attention_mask"],
                       dynamic_axes={"input_ids": {0: "batch", 1: "tokens"},
                                     "attention_mask": {0: "batch", 1: "tokens"},
                                     "output": {0: "batch", 1: "tokens"}})
    return {"max_positions": getattr(encoder.config, "max_position_embeddings", None)}


def _checkpoint_folder(model_name: str | os.PathLike) -> Path:
    name = str(model_name)
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    snapshot = _cached_snapshot(name)
    if snapshot is None:
        load_text_encoder(name)  # downloads it when online; else raises the error that says how to fix it
        snapshot = _cached_snapshot(name)
    if snapshot is None:
        raise PretrainedModelNotFoundError(f"cannot find the files of {name!r} in the Hugging Face cache")
    return snapshot


def _cached_snapshot(name: str) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, or not a valid repo id: both mean "no snapshot"
        return None


def _folder_digest(folder: Path) -> str:
    try:
        return folder_digest(folder)
    except FileNotFoundError as exc:
        raise PretrainedModelNotFoundError(f"the text model folder {str(folder)!r} holds no files") from exc
