"""Deprecated: what the torch estimators share moved to modules with one job each.

- :mod:`stackcat.models.batching`: samplers, padding, collators, ``batch_loader``, ``mean_pool``;
- :mod:`stackcat.models.training`: ``Stage``, ``TrainingLoop``, the callbacks, ``predict_probabilities``;
- :mod:`stackcat.models.persistence`: ``SavableTorchMixin``, saving a text module, tar pickling;
- :mod:`stackcat.models.torch_base`: ``TorchClassifier`` and its input strategies (fit, predict, eval set);
- :mod:`stackcat.features.hub`: loading Hugging Face models.

The old names keep working, with a DeprecationWarning, for one release. ``torch_threads``
is gone (use :func:`stackcat.core.limit_threads`), as are ``label_indices``
(:func:`stackcat.core.label_positions`) and ``fit_stages`` / ``start_fit``
(:class:`stackcat.models.torch_base.TorchClassifier` trains its module).
"""

from stackcat._deprecated import moved_names

_MOVED = {
    "stackcat.models.batching": ("ArrayCollator", "Collator", "LengthBucketBatchSampler", "SortedBatchSampler",
                                 "StateCollator", "batch_loader", "mean_pool", "pad_batch", "pad_states",
                                 "shuffled_batches"),
    "stackcat.models.training": ("BestWeights", "Callback", "EarlyStopping", "EpochLog", "ProgressBar", "Stage",
                                 "TrainingLoop", "encoder_parameters", "history_records", "predict_probabilities",
                                 "training_callbacks", "warmup_linear_decay"),
    "stackcat.models.persistence": ("SavableTorchMixin", "bytes_to_folder", "folder_to_bytes",
                                    "load_non_encoder_state", "load_saved_encoder", "non_encoder_state",
                                    "save_text_module"),
    "stackcat.features.hub": ("PretrainedModelNotFoundError", "hub_offline", "load_text_encoder",
                              "quiet_transformers", "tokenize", "usable_max_length"),
}

__getattr__, __dir__ = moved_names(__name__, None, elsewhere={
    name: module for module, names in _MOVED.items() for name in names})
