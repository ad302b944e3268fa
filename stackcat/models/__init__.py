"""Base estimators: each one a scikit-learn classifier reading named DataFrame columns."""

from __future__ import annotations

from stackcat import _EXPORTS as _PACKAGE_EXPORTS
from stackcat._lazy import lazy_exports

# the estimators among stackcat's public names, each loaded on first use
_EXPORTS = {name: module for name, module in _PACKAGE_EXPORTS.items() if module.startswith(f"{__name__}.")}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
