"""Deprecated: The embedding store moved to :mod:`stackcat.features.store`; this path goes in the next release."""

from stackcat._deprecated import moved_names

__getattr__, __dir__ = moved_names(__name__, "stackcat.features.store")
