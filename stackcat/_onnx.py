"""Deprecated: The onnxruntime backend of the frozen encoders moved to :mod:`stackcat.features.onnx_backend`; this path goes in the next release."""

from stackcat._deprecated import moved_names

__getattr__, __dir__ = moved_names(__name__, "stackcat.features.onnx_backend")
