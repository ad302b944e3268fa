"""Deprecated: ``ClipImageClassifier`` is :class:`stackcat.models.image.ImageEmbeddingClassifier`.

The old name (and this module) keep working for one release, with a
DeprecationWarning; estimators pickled under the old name load as the new class.
"""

from __future__ import annotations

import warnings
from typing import Any

from stackcat.models.image import ImageEmbeddingClassifier


def __getattr__(name: str) -> Any:
    if name != "ClipImageClassifier":
        raise AttributeError(f"module 'stackcat.models.clip' has no attribute {name!r}")
    warnings.warn("ClipImageClassifier is now ImageEmbeddingClassifier (stackcat.models.image); "
                  "the old name goes away in the next release", DeprecationWarning, stacklevel=2)
    return ImageEmbeddingClassifier
