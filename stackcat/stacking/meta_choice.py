"""Choosing the meta-learner: each candidate's honest (nested) out-of-fold probabilities, the fewest errors wins."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import clone

from stackcat import topk


def nested_meta_oof(meta: Any, oof: dict[str, np.ndarray], y_index: np.ndarray,
                    fold_of_row: np.ndarray, signals: dict[str, np.ndarray] | None = None,
                    ancestors: np.ndarray | None = None) -> np.ndarray:
    """A meta-learner's honest OOF: refit on the OOF rows of the other folds, fold by fold.

    ``oof`` maps model names to ``(n_rows, n_classes)`` out-of-fold probabilities;
    ``fold_of_row`` gives each row's fold (the folds that produced ``oof``).
    ``signals`` (retrieval scores, computed out of fold on the same folds) are
    split the same way; ``ancestors`` (the category tree) is passed whole.
    """
    n_classes = next(iter(oof.values())).shape[1]
    parts = []
    for fold in np.unique(fold_of_row):
        held_out = np.flatnonzero(fold_of_row == fold)
        inner_rows = np.flatnonzero(fold_of_row != fold)
        inner = clone(meta)
        inner.fit({k: topk.take_rows(v, inner_rows) for k, v in oof.items()}, y_index[inner_rows],
                  **accepted(inner.fit, meta_context(signals, ancestors, inner_rows)))
        proba = inner.predict_proba({k: topk.take_rows(v, held_out) for k, v in oof.items()},
                                    **accepted(inner.predict_proba, meta_context(signals, None, held_out)))
        parts.append((held_out, proba))
    return topk.put_rows(parts, len(y_index), n_classes)


def accepted(method: Any, context: dict[str, Any]) -> dict[str, Any]:
    """The part of ``context`` that ``method`` takes (a user's own meta-learner may take none of it)."""
    parameters = inspect.signature(method).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return context
    return {k: v for k, v in context.items() if k in parameters}


def meta_context(signals: dict[str, np.ndarray] | None, ancestors: np.ndarray | None,
             rows: np.ndarray | slice = slice(None)) -> dict[str, Any]:
    """Keyword arguments of a meta-learner's fit/predict_proba: only those there are."""
    context: dict[str, Any] = {}
    if signals:
        context["signals"] = {k: topk.take_rows(v, rows) for k, v in signals.items()}
    if ancestors is not None:
        context["ancestors"] = ancestors
    return context


def choose_meta(nested: dict[str, np.ndarray], y_index: np.ndarray) -> tuple[str, pd.DataFrame]:
    """The meta-learner with the fewest nested-OOF errors (ties: the earlier, simpler one), and the table.

    ``nested`` maps candidate names, simplest first, to their nested OOF probabilities.
    """
    from stackcat.metrics import score

    rows = {name: score(y_index, proba) for name, proba in nested.items()}
    table = pd.DataFrame(rows).T[["accuracy", "weighted_f1", "macro_f1", "ece"]]
    errors = {name: int((proba.argmax(axis=1) != y_index).sum()) for name, proba in nested.items()}
    choice = min(nested, key=lambda name: errors[name])  # min keeps the first of equals
    table.insert(0, "errors", pd.Series(errors))
    table["chosen"] = table.index == choice
    return choice, table
