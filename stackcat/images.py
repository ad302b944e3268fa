"""Deprecated: Image decoding and the image-embedding cache moved to :mod:`stackcat.features.images`; this path goes in the next release."""

from stackcat._deprecated import moved_names

__getattr__, __dir__ = moved_names(__name__, "stackcat.features.images")
