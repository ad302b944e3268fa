"""Look-alike categories: pairs the stack confuses both ways out of fold, whose names or places say why.

A catalogue grown by hand holds one category under two names (``Towel`` and
``Towels`` under one parent) and look-alikes in two branches of the tree (a
"towels" leaf under baby care and one under home furnishing). The stack's
out-of-fold predictions find them: a pair of categories confused in both
directions is a pair the products themselves do not tell apart. Such a pair
is listed (:func:`lookalike_categories`) when at least one of these holds:

* ``same name``: the leaf names are equal once case, accents and spacing are ignored;
* ``singular/plural``: equal once each word's English plural ending is removed;
* ``similar names``: normalized edit-distance similarity >= :data:`SIMILAR_NAME`;
* ``nearest names``: each is the other's nearest category name under the
  stack's text encoder (cosine of the name embeddings, when the stack has them);
* ``other branch``: the two leaves sit under different parents of the tree.

Each pair gets an ``action``: ``merge`` for one name twice under one parent
(same name or singular/plural, same parent), ``clarify`` for the others
(describe the boundary, or move the products). :func:`name_twins` lists the
same-name and singular/plural twins of a tree whether or not they are confused.

Examples
--------
>>> singular_key("Baby Towels") == singular_key("baby towel"), singular_key("Dresses")
(True, 'dress')
>>> round(name_similarity("Kurtas", "Kurtis"), 3), name_similarity("Tshirts", "T-shirts")
(0.833, 1.0)
"""

from __future__ import annotations

import json
import os
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from stackcat.core import plain_value
from stackcat.files import write_text_atomic
from stackcat.topk import row_argmax, values_at

if TYPE_CHECKING:
    from stackcat.data import PreparedTable
    from stackcat.stacking import StackingCategorizer
    from stackcat.taxonomy import CategoryTree

LOOKALIKES = "lookalike_categories.csv"
LOOKALIKE_COLUMNS = ("category_a", "category_b", "a_as_b", "b_as_a", "total", "reasons", "action",
                     "name_similarity", "name_cosine", "examples_a_as_b", "examples_b_as_a")
SIMILAR_NAME = 0.8
EXAMPLES_PER_DIRECTION = 3
REPORT_PAIRS = 15
MERGE_REASONS = {"same name", "singular/plural"}


def normal_name(name: Any) -> str:
    """Case-folded, accent-free, single-spaced text of a name, with ``-``, ``_`` and ``&`` as spaces."""
    text = unicodedata.normalize("NFKD", str(name).casefold())
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    for mark in "-_&/,.":
        text = text.replace(mark, " ")
    return " ".join(text.split())


def _singular(word: str) -> str:
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("es") and word[:-2].endswith(("s", "x", "z", "ch", "sh")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def singular_key(name: Any) -> str:
    """The name with each word's English plural ending removed: twins share it."""
    return " ".join(_singular(word) for word in normal_name(name).split())


def name_similarity(a: Any, b: Any) -> float:
    """1 - Levenshtein distance / longer length, on :func:`normal_name` without spaces (1.0: equal)."""
    return _similarity(normal_name(a).replace(" ", ""), normal_name(b).replace(" ", ""))


def _similarity(a: str, b: str) -> float:
    if not a and not b:
        return 1.0
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return 1.0 - previous[-1] / max(len(a), len(b))


def leaf_names(classes: Sequence[Any], tree: CategoryTree | None = None) -> list[str]:
    """Each class's own name: its tree title, or the label itself."""
    if tree is None:
        return [str(c) for c in classes]
    return [tree.titles.get(path[-1], path[-1]) for path in tree.paths]


def name_twins(classes: Sequence[Any], tree: CategoryTree | None = None) -> pd.DataFrame:
    """Pairs of categories with the same name or a singular/plural of it, confused or not.

    Returns
    -------
    DataFrame
        ``category_a, category_b, reason`` (``same name`` or ``singular/plural``),
        ``same_parent`` (None without a tree).

    Examples
    --------
    >>> from stackcat.taxonomy import CategoryTree
    >>> tree = CategoryTree.from_paths(["Home > Towel", "Home > Towels", "Baby > Towels", "Home > Rugs"])
    >>> name_twins(tree.classes, tree)[["category_a", "category_b", "reason", "same_parent"]].values.tolist()
    [['Baby > Towels', 'Home > Towel', 'singular/plural', False], ['Baby > Towels', 'Home > Towels', 'same name', False], ['Home > Towel', 'Home > Towels', 'singular/plural', True]]
    """
    names = leaf_names(classes, tree)
    groups: dict[str, list[int]] = {}
    for position, name in enumerate(names):
        groups.setdefault(singular_key(name), []).append(position)
    rows = []
    for members in groups.values():
        for i, a in enumerate(members):
            for b in members[i + 1:]:
                rows.append({"category_a": str(classes[a]), "category_b": str(classes[b]),
                             "reason": "same name" if normal_name(names[a]) == normal_name(names[b])
                             else "singular/plural", "same_parent": _same_parent(tree, a, b)})
    twins = pd.DataFrame(rows, columns=["category_a", "category_b", "reason", "same_parent"])
    return twins.sort_values(["category_a", "category_b"], ignore_index=True)


def _same_parent(tree: CategoryTree | None, a: int, b: int) -> bool | None:
    return None if tree is None else tree.paths[a][:-1] == tree.paths[b][:-1]


def lookalike_categories(proba: Any, y_index: np.ndarray, classes: Sequence[Any], *,
                         tree: CategoryTree | None = None, name_embeddings: np.ndarray | None = None,
                         ids: Sequence[Any] | None = None, min_each_way: int = 1) -> pd.DataFrame:
    """Pairs of categories confused in both directions out of fold, with a reason to look at them.

    Parameters
    ----------
    proba : ndarray or sparse matrix of shape (n_samples, n_classes)
        Out-of-fold probabilities (dense or top-k).
    y_index : ndarray of int
        Each row's given class.
    classes : sequence
        The label of each column.
    tree : CategoryTree, optional
        Aligned to ``classes``: leaf names and parents.
    name_embeddings : ndarray of shape (n_classes, dim), optional
        The categories' names embedded by a text encoder.
    ids : sequence, optional
        Row ids for the examples (default: row positions).
    min_each_way : int, default=1
        Products confused in each direction for a pair to count.

    Returns
    -------
    DataFrame
        Columns :data:`LOOKALIKE_COLUMNS`, most confused pair first; the
        examples are JSON lists of ids, the most confidently confused first.

    Examples
    --------
    >>> proba = np.array([[0.9, 0.1, 0.0], [0.4, 0.6, 0.0], [0.7, 0.3, 0.0], [0.1, 0.9, 0.0], [0.0, 0.1, 0.9]])
    >>> pairs = lookalike_categories(proba, np.array([0, 0, 1, 1, 2]), ["Towel", "Towels", "Rugs"])
    >>> pairs[["category_a", "category_b", "a_as_b", "b_as_a", "reasons", "action"]].values.tolist()
    [['Towel', 'Towels', 1, 1, 'singular/plural', 'merge']]
    """
    y_index = np.asarray(y_index, dtype=np.int64)
    classes = list(classes)
    ids = np.arange(len(y_index)) if ids is None else np.asarray(ids, dtype=object)
    predicted = row_argmax(proba)
    wrong = np.flatnonzero(predicted != y_index)
    codes, code_counts = np.unique(y_index[wrong] * len(classes) + predicted[wrong], return_counts=True)
    counts = {divmod(int(code), len(classes)): int(n) for code, n in zip(codes, code_counts, strict=True)}
    names = [_Name(name) for name in leaf_names(classes, tree)]
    nearest = _nearest_names(name_embeddings)
    examples = _examples_by_pair(wrong, y_index, predicted, values_at(proba, predicted), ids)
    rows = []
    for (a, b), a_as_b in counts.items():
        b_as_a = counts.get((b, a), 0)
        if a > b or a_as_b < min_each_way or b_as_a < min_each_way:
            continue
        similarity = _similarity(names[a].flat, names[b].flat)
        reasons = _reasons(names[a], names[b], similarity, _same_parent(tree, a, b), nearest, a, b)
        if not reasons:
            continue
        merge = bool(MERGE_REASONS & set(reasons)) and _same_parent(tree, a, b) is not False
        rows.append({
            "category_a": str(classes[a]), "category_b": str(classes[b]), "a_as_b": int(a_as_b), "b_as_a": b_as_a,
            "total": int(a_as_b) + b_as_a, "reasons": "; ".join(reasons), "action": "merge" if merge else "clarify",
            "name_similarity": round(similarity, 4),
            "name_cosine": (round(float(_cosine(name_embeddings, a, b)), 4) if name_embeddings is not None
                            else float("nan")),
            "examples_a_as_b": examples.get((a, b), "[]"), "examples_b_as_a": examples.get((b, a), "[]")})
    pairs = pd.DataFrame(rows, columns=list(LOOKALIKE_COLUMNS))
    return pairs.sort_values(["total", "category_a", "category_b"], ascending=[False, True, True], ignore_index=True)


class _Name:
    """A category name's normal forms, computed once."""

    def __init__(self, name: str) -> None:
        self.normal = normal_name(name)
        self.singular = " ".join(_singular(word) for word in self.normal.split())
        self.flat = self.normal.replace(" ", "")


def _reasons(name_a: _Name, name_b: _Name, similarity: float, same_parent: bool | None,
             nearest: np.ndarray | None, a: int, b: int) -> list[str]:
    reasons = []
    if name_a.normal == name_b.normal:
        reasons.append("same name")
    elif name_a.singular == name_b.singular:
        reasons.append("singular/plural")
    elif similarity >= SIMILAR_NAME:
        reasons.append("similar names")
    if nearest is not None and nearest[a] == b and nearest[b] == a:
        reasons.append("nearest names")
    if same_parent is False:
        reasons.append("other branch")
    return reasons


def _nearest_names(embeddings: np.ndarray | None) -> np.ndarray | None:
    """Each category's nearest other category name by cosine; None without embeddings."""
    if embeddings is None or len(embeddings) < 2:
        return None
    unit = _unit(embeddings)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity.argmax(axis=1)


def _unit(embeddings: np.ndarray) -> np.ndarray:
    embeddings = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.where(norms > 0, norms, 1.0)


def _cosine(embeddings: np.ndarray, a: int, b: int) -> float:
    unit = _unit(embeddings[[a, b]])
    return float(unit[0] @ unit[1])


def _examples_by_pair(wrong: np.ndarray, y_index: np.ndarray, predicted: np.ndarray, confidence: np.ndarray,
                      ids: np.ndarray) -> dict[tuple[int, int], str]:
    """(true, predicted) -> JSON list of the ids of its most confidently confused rows."""
    rows = wrong[np.argsort(-confidence[wrong], kind="stable")]
    chosen: dict[tuple[int, int], list[Any]] = {}
    for row in rows:
        listed = chosen.setdefault((int(y_index[row]), int(predicted[row])), [])
        if len(listed) < EXAMPLES_PER_DIRECTION:
            listed.append(_plain(ids[row]))
    return {pair: json.dumps(listed, ensure_ascii=False) for pair, listed in chosen.items()}


def _plain(value: Any) -> Any:
    value = plain_value(value)
    return value if isinstance(value, (int, str)) else str(value)


def read_lookalikes(path: str | os.PathLike) -> pd.DataFrame:
    """``lookalike_categories.csv`` as written (categories as exact strings)."""
    text = {"category_a": str, "category_b": str, "reasons": str, "action": str,
            "examples_a_as_b": str, "examples_b_as_a": str}
    table = pd.read_csv(path, dtype=text, keep_default_na=False, na_values={"name_cosine": [""]},
                        encoding="utf-8")
    missing = [c for c in LOOKALIKE_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: not a look-alike categories file, columns {missing} are missing")
    for column in text:
        table[column] = table[column].to_numpy(dtype=object)
    return table


def write_lookalikes(stack: StackingCategorizer, prepared: PreparedTable, run_dir: str | os.PathLike,
                     proba: Any, source: str) -> tuple[pd.DataFrame, list[str]]:
    """Write ``lookalike_categories.csv`` for a fitted stack; return the pairs and the report's section.

    ``proba``: the out-of-fold probabilities to read confusions from (named ``source``).

    Examples
    --------
    >>> pairs, lines = write_lookalikes(stack, prepared, "artifacts/run", stack.meta_oof_, "meta")  # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    frame = prepared.frame
    tree = getattr(stack, "tree_", None)
    embeddings = next(iter(getattr(stack, "name_embeddings_", {}).values()), None)
    pairs = lookalike_categories(proba, stack.oof_target_, stack.classes_, tree=tree, name_embeddings=embeddings,
                                 ids=frame["id"].to_numpy(dtype=object))
    write_text_atomic(run_dir / LOOKALIKES, pairs.to_csv(index=False))
    return pairs, lookalikes_markdown(pairs, name_twins(stack.classes_, tree), frame, source)


def lookalikes_markdown(pairs: pd.DataFrame, twins: pd.DataFrame, frame: pd.DataFrame, source: str) -> list[str]:
    """The report's section: the merge-or-clarify list, and name twins the stack does not confuse."""
    from stackcat.report import markdown_table

    lines = ["## Look-alike categories", "",
             f"{len(pairs)} pairs of categories are confused in both directions out of fold ({source}) and have "
             "near-duplicate names, each other's nearest name, or sit in different branches of the tree: "
             f"[{LOOKALIKES}]({LOOKALIKES}). `merge`: one name twice under one parent; `clarify`: describe "
             "the boundary or move the products.", ""]
    if not pairs.empty:
        text_of = dict(zip(frame["id"].map(str), frame["text"], strict=False))
        shown = pairs.head(REPORT_PAIRS)
        table = pd.DataFrame({
            "category a": shown["category_a"], "category b": shown["category_b"],
            "a as b": shown["a_as_b"], "b as a": shown["b_as_a"], "why": shown["reasons"], "action": shown["action"],
            "example a as b": [_example_text(e, text_of) for e in shown["examples_a_as_b"]],
            "example b as a": [_example_text(e, text_of) for e in shown["examples_b_as_a"]]})
        lines += [markdown_table(table, index=False), ""]
    confused = set(zip(pairs["category_a"], pairs["category_b"], strict=True))
    quiet = twins[[(a, b) not in confused and (b, a) not in confused
                   for a, b in zip(twins["category_a"], twins["category_b"], strict=True)]]
    if not quiet.empty:
        listed = "; ".join(f"{a} / {b}" for a, b in zip(quiet["category_a"].head(10), quiet["category_b"].head(10),
                                                         strict=True))
        lines += [f"Name twins not confused both ways ({len(quiet)}): {listed}" + (" ..." if len(quiet) > 10 else ""),
                  ""]
    return lines


def _example_text(examples: str, text_of: dict[str, Any]) -> str:
    ids = json.loads(examples)
    if not ids:
        return ""
    text = " ".join(str(text_of.get(str(ids[0]), "")).split())
    return f"{ids[0]}: {text[:60]}" + ("…" if len(text) > 60 else "")
