"""Deprecated: Image encoders moved to :mod:`stackcat.features.image_encoders`; this path goes in the next release."""

from stackcat._deprecated import moved_names

__getattr__, __dir__ = moved_names(__name__, "stackcat.features.image_encoders")
