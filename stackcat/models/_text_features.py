"""Deprecated: cached text-encoder states moved to :mod:`stackcat.features.text_states`.

``FrozenTextMixin`` moved to :mod:`stackcat.models._frozen_text`. This path goes in the next release.
"""

from stackcat._deprecated import moved_names

__getattr__, __dir__ = moved_names(__name__, "stackcat.features.text_states",
                                   elsewhere={"FrozenTextMixin": "stackcat.models._frozen_text"})
