"""Old import paths that keep working, with a DeprecationWarning, for one release after a move.

A module that moved leaves a shim at its old path::

    __getattr__, __dir__ = moved_names(__name__, "stackcat.features.images")

Every name read from the shim (``from stackcat.images import load_image``,
``stackcat.images.load_image``, unpickling an object saved under the old path)
is looked up in the new module, with a DeprecationWarning that names the new
path. Setting an attribute on the shim (``monkeypatch.setattr``) does not reach
the new module: patch the new path.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def moved_names(old: str, new: str | None, *, elsewhere: Mapping[str, str] | None = None
                ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for the module ``old``, forwarding to ``new``.

    Parameters
    ----------
    old : str
        The deprecated module path (the shim's ``__name__``).
    new : str or None
        The module that now holds the names; None when only the ``elsewhere`` names moved
        (``old`` still exists and holds the others).
    elsewhere : mapping of str to str, optional
        Names that moved to another module than ``new``: ``{name: module}``.

    Examples
    --------
    >>> __getattr__, __dir__ = moved_names("stackcat.cache", "stackcat.features.store")  # doctest: +SKIP
    """
    elsewhere = dict(elsewhere or {})

    def __getattr__(name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        target = elsewhere.get(name, new)
        if target is None:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(target), name)  # AttributeError names the new module
        warnings.warn(f"{old}.{name} has moved to {target}.{name}; import it from {target} "
                      f"(the old path goes in the next release)", DeprecationWarning, stacklevel=2)
        return value

    def __dir__() -> list[str]:
        names = set(dir(importlib.import_module(new))) if new is not None else set()
        names |= set(elsewhere)
        return sorted(name for name in names if not (name.startswith("__") and name.endswith("__")))

    return __getattr__, __dir__


# ---------------------------------------------------------------- renamed estimator parameters

DEPRECATED = "deprecated"
"""Default of a renamed parameter's old name: "not given" (scikit-learn's convention)."""


def renamed_param(estimator: Any, old: str, new: str) -> Any:
    """The value of ``estimator``'s parameter ``new``, or of its old name ``old`` when that was set.

    A renamed parameter keeps its old name in ``__init__`` for one release, with
    the default :data:`DEPRECATED`; setting it warns (DeprecationWarning) and wins
    over the new name, so old code keeps its behaviour.

    Examples
    --------
    >>> class Model:
    ...     n_threads, num_threads = None, 4
    >>> import warnings
    >>> with warnings.catch_warnings(record=True):
    ...     renamed_param(Model(), "num_threads", "n_threads")
    4
    """
    value = getattr(estimator, old)
    if isinstance(value, str) and value == DEPRECATED:
        return getattr(estimator, new)
    warnings.warn(f"{type(estimator).__name__}({old}=...) is deprecated: use {new}=... "
                  f"(the old name goes in the next release)", DeprecationWarning, stacklevel=3)
    return value


def renamed_constraint(new_constraint: list[Any]) -> list[Any]:
    """``_parameter_constraints`` entry of a renamed parameter's old name: the new one's, or unset."""
    from sklearn.utils._param_validation import Hidden, StrOptions

    return [Hidden(StrOptions({DEPRECATED})), *new_constraint]


def upgrade_renamed(params: dict[str, Any], renamed: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """``params`` saved before a rename, with each old name's value moved to its new name.

    Only where the new name is absent (saved by an older release); the old name is
    then set to :data:`DEPRECATED`, so the loaded model raises no warning. When two
    old names map to one new name, the first one's value is kept.

    Examples
    --------
    >>> upgrade_renamed({"num_threads": 2}, [("num_threads", "n_threads")])
    {'num_threads': 'deprecated', 'n_threads': 2}
    """
    absent = {new for _, new in renamed if new not in params}
    for old, new in renamed:
        if new in absent and old in params:
            params.setdefault(new, params[old])
            params[old] = DEPRECATED
    return params


class RenamedParamsMixin:
    """For estimators with renamed params: one list of ``(old, new)`` pairs serves reading and loading.

    ``_renamed("new")`` reads a param (its old name's value, with a warning, when
    that was set), and a pickle (or saved folder) from before the rename loads
    under the new names. List the pairs in ``_renamed_params``, or override
    ``_renamed_pairs`` where they depend on other params; put the mixin before
    ``BaseEstimator`` in the bases.
    """

    _renamed_params: tuple[tuple[str, str], ...] = ()

    @classmethod
    def _renamed_pairs(cls, params: Mapping[str, Any]) -> Sequence[tuple[str, str]]:
        """The ``(old, new)`` pairs of an estimator with these ``params``."""
        return cls._renamed_params

    @classmethod
    def _upgrade_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Params (or a pickled state) saved before a rename, under the new names."""
        return upgrade_renamed(dict(params), cls._renamed_pairs(params))

    def _renamed(self, new: str) -> Any:
        """``new``'s value, or its (first) old name's, with a DeprecationWarning, when that was set."""
        old = next((old for old, name in self._renamed_pairs(vars(self)) if name == new), None)
        return getattr(self, new) if old is None else renamed_param(self, old, new)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(self._upgrade_params(state))
