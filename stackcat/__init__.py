"""stackcat: put every product of a catalogue into the right category.

Strong, different base models (FastText, a fine-tuned BERT, an image-embedding head,
a BERT+CLIP fusion net) produce out-of-fold probabilities; a CatBoost
meta-learner combines them. Every base model is a scikit-learn classifier.

Public names are imported lazily so that ``import stackcat`` (and the CLI's
``--help``) does not pay for torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "read_table": "stackcat.data",
    "prepare_table": "stackcat.data",
    "TableSpec": "stackcat.data",
    "PreparedTable": "stackcat.data",
    "DataError": "stackcat.data",
    "read_table_chunks": "stackcat.data",
    "infer_spec": "stackcat.columns",
    "review_threshold": "stackcat.review",
    "FastTextClassifier": "stackcat.models.fasttext",
    "BertClassifier": "stackcat.models.bert",
    "ImageEmbeddingClassifier": "stackcat.models.image",
    "ClipImageClassifier": "stackcat.models.clip",  # deprecated alias
    "FusionClassifier": "stackcat.models.fusion",
    "TfidfClassifier": "stackcat.models.lexical",
    "NeighboursClassifier": "stackcat.models.neighbours",
    "StackingCategorizer": "stackcat.stacking",
    "RerankMeta": "stackcat.meta",
    "MulticlassMeta": "stackcat.meta",
    "AverageBlend": "stackcat.meta",
    "make_meta": "stackcat.meta",
    "score": "stackcat.metrics",
    "comparison_table": "stackcat.metrics",
    "per_class_report": "stackcat.metrics",
    "write_report": "stackcat.report",
    "build_models": "stackcat.presets",
    "register_model": "stackcat.presets",
    "load_demo": "stackcat.demo",
    "load": "stackcat.predictor",
    "Predictor": "stackcat.predictor",
}

_DEPRECATED = {"ClipImageClassifier"}  # still importable, with a DeprecationWarning

__all__ = sorted(set(_EXPORTS) - _DEPRECATED) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'stackcat' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
