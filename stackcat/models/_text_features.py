"""Deprecated: cached text-encoder states moved to :mod:`stackcat.features.text_states`.

This path goes in the next release. (``FrozenTextMixin`` is gone: a frozen encoder is
:class:`stackcat.models.torch_base.CachedStateInputs`.)
"""

from stackcat._deprecated import moved_names

__getattr__, __dir__ = moved_names(__name__, "stackcat.features.text_states")
