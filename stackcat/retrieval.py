"""Deprecated location: the retrieval signals live in :mod:`stackcat.meta.retrieval`.

``from stackcat.retrieval import X`` keeps working for one release, with a
DeprecationWarning.
"""

from __future__ import annotations

import warnings
from typing import Any

from stackcat.meta import retrieval as _retrieval


def __getattr__(name: str) -> Any:
    value = getattr(_retrieval, name)
    warnings.warn(f"stackcat.retrieval.{name} moved to stackcat.meta.retrieval.{name}",
                  DeprecationWarning, stacklevel=2)
    return value
