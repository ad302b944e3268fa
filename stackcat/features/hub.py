"""Hugging Face text encoders: turn a hub name or a local folder into an encoder and its tokenizer.

:func:`load_text_encoder` loads ``(AutoModel, AutoTokenizer)`` from a local
checkpoint folder or the local Hugging Face cache (downloading only when the hub
is reachable and ``HF_HUB_OFFLINE`` is unset), and says how to fix a name it
cannot find (:class:`PretrainedModelNotFoundError`). :func:`tokenize` and
:func:`usable_max_length` turn texts into token ids within the model's limits.
Nothing here imports torch or transformers until it runs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "DEFAULT_TEXT_MODEL",
    "PretrainedModelNotFoundError",
    "hub_offline",
    "load_text_encoder",
    "quiet_transformers",
    "tokenize",
    "transformer_layers",
    "usable_max_length",
    "without_top_layers",
]

# The text encoder of the reference work: the default of every text member.
DEFAULT_TEXT_MODEL = "cointegrated/rubert-tiny2"


class PretrainedModelNotFoundError(OSError):
    """A pretrained model name that is neither a local folder nor in the local cache."""


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for no network."""
    return any(os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
               for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and weight-loading bars for the block."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _not_found_message(name: str) -> str:
    looks_like_path = os.sep in name and (name.startswith((os.sep, ".", "~")) or name.count("/") > 1)
    if looks_like_path or Path(name).expanduser().exists():
        return (f"Could not load the pretrained model from the folder {name!r}: it does not exist "
                "or is not a Hugging Face checkpoint (config.json, weights and tokenizer files, "
                "as written by save_pretrained).")
    return (f"Could not load the pretrained model {name!r}: it is not a local folder and is not "
            "in the local Hugging Face cache (this machine may have no access to the model hub). "
            "Point model_name at a local copy: model_name=\"/path/to/folder\" (a folder written by "
            f"save_pretrained), or download it once on a connected machine with "
            f"`huggingface-cli download {name} --local-dir DIR` and pass model_name=\"DIR\".")


def load_text_encoder(model_name: str | os.PathLike) -> tuple[nn.Module, Any]:
    """``(AutoModel, AutoTokenizer)`` from a hub name or a local folder, with a clear offline error.

    Raises
    ------
    PretrainedModelNotFoundError
        If the name is neither a local folder nor cached (offline), with how to fix it.
    """
    from transformers import AutoModel, AutoTokenizer

    name = str(model_name)
    local = Path(name).expanduser()
    source = str(local) if local.is_dir() else name
    options = {"local_files_only": True} if hub_offline() else {}
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source, **options)
            encoder = AutoModel.from_pretrained(source, **options)
    except (OSError, ValueError) as err:
        if isinstance(err, ValueError) and local.is_dir():
            raise
        raise PretrainedModelNotFoundError(_not_found_message(name)) from err
    return encoder, tokenizer


def usable_max_length(max_length: int, tokenizer: Any, encoder: nn.Module) -> int:
    """``max_length`` capped by what the tokenizer and the position embeddings allow."""
    limits = [max_length]
    if 0 < getattr(tokenizer, "model_max_length", 0) < 100_000:
        limits.append(tokenizer.model_max_length)
    positions = getattr(encoder.config, "max_position_embeddings", None)
    if positions:
        limits.append(positions)
    return int(min(limits))


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text (special tokens added, truncated to ``max_length``, unpadded)."""
    if not texts:
        return []
    return tokenizer(list(texts), truncation=True, max_length=max_length,
                     add_special_tokens=True)["input_ids"]


def transformer_layers(encoder: nn.Module) -> nn.ModuleList:
    """The encoder's stack of transformer layers, bottom first (BERT-like models: ``encoder.layer``).

    Raises
    ------
    ValueError
        If the model keeps its layers elsewhere (top-layer tuning supports BERT, RoBERTa,
        XLM-R, e5 and other models built the same way).

    Examples
    --------
    >>> encoder, _ = load_text_encoder("/models/e5-small")  # doctest: +SKIP
    >>> len(transformer_layers(encoder))  # doctest: +SKIP
    12
    """
    from torch import nn

    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"cannot find the transformer layers of a {type(encoder).__name__} "
                         "(expected a BERT-like model with encoder.layer): tune_top_layers supports "
                         "BERT, RoBERTa, XLM-R and e5 models; use tune_top_layers=0 with this one")
    return layers


def without_top_layers(encoder: nn.Module, n_layers: int) -> nn.Module:
    """``encoder`` with its top ``n_layers`` transformer layers removed (in place; returned).

    Its ``last_hidden_state`` is then the input of the removed layers: the hidden
    states below them.

    Raises
    ------
    ValueError
        If the encoder has fewer than ``n_layers`` layers, or no layers :func:`transformer_layers` finds.
    """
    layers = transformer_layers(encoder)
    if n_layers > len(layers):
        raise ValueError(f"cannot tune the top {n_layers} layers of an encoder that has {len(layers)}")
    if n_layers:
        encoder.encoder.layer = layers[:len(layers) - n_layers]
        encoder.config.num_hidden_layers = len(layers) - n_layers
    return encoder
