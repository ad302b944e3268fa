"""Base estimators: each one a scikit-learn classifier reading named DataFrame columns."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FastTextClassifier": "stackcat.models.fasttext",
    "BertClassifier": "stackcat.models.bert",
    "ImageEmbeddingClassifier": "stackcat.models.image",
    "FusionClassifier": "stackcat.models.fusion",
    "TfidfClassifier": "stackcat.models.lexical",
    "NeighboursClassifier": "stackcat.models.neighbours",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'stackcat.models' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
