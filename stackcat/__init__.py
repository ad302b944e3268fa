"""stackcat: put every product of a catalogue into the right category.

Strong, different base models (FastText, a fine-tuned BERT, an image-embedding head,
a BERT+CLIP fusion net) produce out-of-fold probabilities; a CatBoost
meta-learner combines them. Every base model is a scikit-learn classifier.

Public names are imported lazily so that ``import stackcat`` (and the CLI's
``--help``) does not pay for torch and transformers.
"""

from __future__ import annotations

from stackcat._lazy import lazy_exports

__version__ = "0.2.0"

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
    "FusionClassifier": "stackcat.models.fusion",
    "TfidfClassifier": "stackcat.models.lexical",
    "NeighboursClassifier": "stackcat.models.neighbours",
    "MetricSpaceClassifier": "stackcat.models.metric",
    "TorchHeadClassifier": "stackcat.models.heads",
    "StackingCategorizer": "stackcat.stacking",
    "RerankMeta": "stackcat.meta",
    "MulticlassMeta": "stackcat.meta",
    "AverageBlend": "stackcat.meta",
    "make_meta": "stackcat.meta",
    "score": "stackcat.metrics",
    "comparison_table": "stackcat.metrics",
    "per_class_report": "stackcat.metrics",
    "write_report": "stackcat.report",
    "rank_label_issues": "stackcat.label_issues",
    "read_label_issues": "stackcat.label_issues",
    "lookalike_categories": "stackcat.lookalikes",
    "build_models": "stackcat.presets",
    "register_model": "stackcat.presets",
    "load_demo": "stackcat.demo",
    "load": "stackcat.predictor",
    "Predictor": "stackcat.predictor",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
