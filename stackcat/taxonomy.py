"""The category tree: which class lies under which parent.

Most errors of a catalogue classifier are siblings (two leaves under one
parent), so the re-ranker gets hierarchy features and the report gets
per-level scores. A tree comes from one of two sources:

* labels that are paths, ``"Men > Topwear > Tshirts"`` (:meth:`CategoryTree.from_paths`);
* a tree file with one row per node, ``id, parent_id, title`` (the
  KazanExpress shape; :meth:`CategoryTree.from_frame` / :meth:`CategoryTree.read`),
  whose leaves are the labels.

Either way the tree answers, for each class of the stack, its ancestors
(:attr:`CategoryTree.ancestors`: parent, grandparent, ...) and a readable
path (:attr:`CategoryTree.names`) for category-name features.

Examples
--------
>>> tree = CategoryTree.from_paths(["A > B > x", "A > B > y", "A > C > z"])
>>> tree.classes.tolist()
['A > B > x', 'A > B > y', 'A > C > z']
>>> tree.level_labels(1).tolist()
['A > B', 'A > B', 'A > C']
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

DEFAULT_SEPARATOR = " > "
_OTHER_SEPARATORS = (" > ", ">", " / ", "/", " | ", "|", " -> ", "\\")


class TreeError(ValueError):
    """A category tree that cannot be used: a cycle, an unknown parent, a label not in the tree."""


class CategoryTree:
    """Ancestors of each class, from the root's child (level 0) down to the class itself.

    Parameters
    ----------
    classes : sequence
        The classes, in the order of the stack's ``classes_``.
    paths : sequence of sequence of str
        For each class, the node keys from the top level down to the class
        (the class's own key last). Classes may sit at different depths.
    titles : mapping node key -> str, optional
        Readable node names (default: the keys themselves).

    Attributes
    ----------
    classes : ndarray
    depth : int
        Length of the longest path.
    ancestors : ndarray of shape (n_classes, depth - 1)
        ``ancestors[c, 0]`` is the index (into :attr:`nodes`) of class c's parent,
        ``[c, 1]`` its grandparent, ...; -1 above the top.
    nodes : list of str
        Keys of the inner nodes that appear in :attr:`ancestors`.
    names : list of str
        Each class's readable path, titles joined by ``" > "``.
    """

    def __init__(self, classes: Sequence[Any], paths: Sequence[Sequence[str]],
                 titles: Mapping[str, str] | None = None) -> None:
        if len(classes) != len(paths):
            raise ValueError(f"{len(classes)} classes but {len(paths)} paths")
        self.classes = np.asarray(classes, dtype=object)
        self.paths = [tuple(path) for path in paths]
        for label, path in zip(self.classes, self.paths, strict=True):
            if not path:
                raise TreeError(f"category {label!r} has an empty path")
        self.titles = dict(titles or {})
        self.depth = max(len(path) for path in self.paths)
        inner = sorted({key for path in self.paths for key in path[:-1]})
        self.nodes = inner
        position = {key: i for i, key in enumerate(inner)}
        self.ancestors = np.full((len(self.classes), max(self.depth - 1, 0)), -1, dtype=np.int64)
        for c, path in enumerate(self.paths):
            for level, key in enumerate(reversed(path[:-1])):
                self.ancestors[c, level] = position[key]
        self.names = [" > ".join(self.titles.get(key, key) for key in path) for path in self.paths]

    # -- constructors ----------------------------------------------------------

    @classmethod
    def from_paths(cls, labels: Sequence[Any], separator: str = DEFAULT_SEPARATOR) -> CategoryTree:
        """A tree from labels that are paths (``"A > B > C"``).

        Separators are matched after stripping the spaces around each part;
        a label written with another common separator than ``separator``
        (e.g. ``"A/B"`` beside ``"A > B"``) is an error naming it.
        """
        classes = sorted({str(label) for label in labels})
        if not separator:
            raise TreeError("the label separator is empty: give the text between the levels of the paths, "
                            "e.g. ' > ' (--label-separator ' > ')")
        sep = separator.strip() or separator
        if classes and not any(sep in label for label in classes):
            raise TreeError(f"the label separator {separator!r} occurs in none of the {len(classes)} categories "
                            f"(e.g. {classes[:3]}): are the labels paths, and is that their separator?")
        paths = []
        for label in classes:
            parts = [_normal(part) for part in label.split(sep)]
            if any(not part for part in parts):
                raise TreeError(f"category {label!r}: an empty level between separators {separator!r}")
            paths.append(["\x1f".join(parts[: i + 1]) for i in range(len(parts))])
        _refuse_shortened_paths(classes, paths, separator)
        single = [label for label, path in zip(classes, paths, strict=True) if len(path) == 1]
        if single and len(single) < len(classes):
            others = [s for s in _OTHER_SEPARATORS if s.strip() != sep and s.strip() in single[0]]
            if others:
                raise TreeError(
                    f"category {single[0]!r} has no {separator!r} separator but another one "
                    f"({others[0].strip()!r}); write every path with {separator!r}")
        titles = {key: key.rsplit("\x1f", 1)[-1] for path in paths for key in path}
        tree = cls(classes, paths, titles)
        tree.separator = separator
        return tree

    @classmethod
    def from_frame(cls, nodes: pd.DataFrame, labels: Sequence[Any], *, id_column: str = "id",
                   parent_column: str = "parent_id", title_column: str | None = "title") -> CategoryTree:
        """A tree from a node table (``id, parent_id, title``); ``labels`` are node ids.

        Root markers (a parent that is empty, 0, or the node itself) end a path.
        A parent id that is not a node, a cycle, or a label that is not a node is
        a :class:`TreeError` naming it. The top node ("all categories") is left
        out of the paths when every class lies under it.
        """
        for column in (id_column, parent_column):
            if column not in nodes.columns:
                raise TreeError(f"the tree has no column {column!r}; it has {list(map(str, nodes.columns))}")
        ids = [_key(v) for v in nodes[id_column].to_numpy(dtype=object)]
        parents = [_key(v) for v in nodes[parent_column].to_numpy(dtype=object)]
        duplicated = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) < len(ids) else []
        if duplicated:
            raise TreeError(f"the tree lists node ids more than once: {duplicated[:10]}")
        parent_of = dict(zip(ids, parents, strict=True))
        titles = ({i: str(t) for i, t in zip(ids, nodes[title_column].to_numpy(dtype=object), strict=True)}
                  if title_column and title_column in nodes.columns else {})
        roots = {"", "0", "nan", "None"}
        classes = sorted({_key(label) for label in labels})
        paths = []
        for label in classes:
            if label not in parent_of:
                raise TreeError(f"category {label!r} is not a node of the tree")
            path, node = [label], label
            while True:
                parent = parent_of[node]
                if parent in roots or parent == node:
                    break
                if parent not in parent_of:
                    raise TreeError(f"node {node!r} names parent {parent!r}, which is not in the tree")
                if parent in path:
                    cycle = " -> ".join([*path[path.index(parent):], parent][::-1])
                    raise TreeError(f"the tree has a cycle through category {label!r}: {cycle}")
                path.append(parent)
                node = parent
            paths.append(path[::-1])
        tops = {path[0] for path in paths}
        if len(tops) == 1 and all(len(path) > 1 for path in paths):
            paths = [path[1:] for path in paths]  # drop the common root ("all categories")
        return cls(classes, paths, titles)

    @classmethod
    def read(cls, path: str | Path, labels: Sequence[Any], **columns: str) -> CategoryTree:
        """:meth:`from_frame` on a CSV or Parquet node table."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tree file {path} does not exist" if not path.exists()
                                    else f"tree file {path} is not a file")
        try:
            frame = (pd.read_parquet(path) if path.suffix.lower() in (".parquet", ".pq")
                     else pd.read_csv(path, dtype=str, keep_default_na=False))
        except (ValueError, OSError) as exc:  # pandas' EmptyDataError and ParserError are ValueErrors
            raise TreeError(f"tree file {path}: cannot read it as a table ({type(exc).__name__}: {exc})") from exc
        if frame.empty:
            raise TreeError(f"tree file {path} has no rows: it needs one row per node (id, parent_id, title)")
        try:
            return cls.from_frame(frame, labels, **columns)
        except TreeError as exc:
            raise TreeError(f"tree file {path}: {exc}") from exc

    # -- views -------------------------------------------------------------------

    def aligned(self, classes: Sequence[Any]) -> CategoryTree:
        """The same tree with classes in the order of ``classes`` (the stack's ``classes_``)."""
        position = {str(c): i for i, c in enumerate(self.classes)}
        missing = [c for c in classes if str(c) not in position]
        if missing:
            raise TreeError(f"categories {missing[:10]} are not in the tree")
        order = [position[str(c)] for c in classes]
        tree = CategoryTree([self.classes[i] for i in order], [self.paths[i] for i in order], self.titles)
        tree.classes = np.asarray(list(classes), dtype=object)
        return tree

    def level_labels(self, level: int) -> np.ndarray:
        """Each class's ancestor ``level`` steps up (1 = parent), as a node key; itself at the top."""
        out = []
        for path in self.paths:
            keep = max(len(path) - level, 1)
            out.append(" > ".join(self.titles.get(k, k) for k in path[:keep]))
        return np.asarray(out, dtype=object)


def category_tree(tree: Any, label_separator: str | None, classes: Sequence[Any]) -> CategoryTree | None:
    """The tree of a stack's ``classes``: from a tree (or its file), from path labels, or None.

    Examples
    --------
    >>> category_tree(None, " > ", ["A > x", "A > y"]).names
    ['A > x', 'A > y']
    """
    if isinstance(tree, (str, Path)):
        return CategoryTree.read(tree, classes).aligned(classes)
    if tree is not None:
        return tree.aligned(classes)
    if label_separator is not None:
        return CategoryTree.from_paths(classes, label_separator).aligned(classes)
    return None


def _refuse_shortened_paths(classes: Sequence[str], paths: Sequence[Sequence[str]], separator: str) -> None:
    """A label that is the end of a longer one (``Shirts`` beside ``Apparel > Topwear > Shirts``) is one
    category under two names: its products would be split between two classes."""
    by_depth = sorted(zip(paths, classes, strict=True), key=lambda pair: len(pair[0]))
    ends: dict[tuple[str, ...], str] = {}
    for path, label in reversed(by_depth):  # deepest first
        parts = tuple(path[-1].split("\x1f"))
        longer = ends.get(parts)
        if longer is not None:
            raise TreeError(f"category {label!r} is the end of the path {longer!r}: one category under two "
                            f"names (labels of mixed depth, or spelled apart only by spaces around "
                            f"{separator.strip()!r}); write every label as its full path with {separator!r}")
        for start in range(len(parts)):
            ends.setdefault(parts[start:], label)


def _normal(text: str) -> str:
    return unicodedata.normalize("NFC", text).strip()


def _key(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return _normal(str(value))


def hierarchy_scores(y_true: np.ndarray, y_pred: np.ndarray, tree: CategoryTree) -> dict[str, float]:
    """Accuracy at each level of the tree, and where the errors fall.

    ``y_true`` and ``y_pred`` are class indices into ``tree.classes``. Returns
    ``accuracy_level_k`` for k = 0 (the leaf) .. depth - 1 (the top level), and
    ``errors_under_right_parent``: the share of wrong leaves whose parent is
    the true parent (sibling errors).

    Examples
    --------
    >>> tree = CategoryTree.from_paths(["A > x", "A > y", "B > z"])
    >>> hierarchy_scores(np.array([0, 1, 2]), np.array([1, 1, 0]), tree)["errors_under_right_parent"]
    0.5
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    scores = {"accuracy_level_0": float(np.mean(y_true == y_pred))}
    for level in range(1, tree.depth):
        labels = tree.level_labels(level)
        scores[f"accuracy_level_{level}"] = float(np.mean(labels[y_true] == labels[y_pred]))
    wrong = y_true != y_pred
    if tree.depth > 1 and wrong.any():
        parents = tree.level_labels(1)
        scores["errors_under_right_parent"] = float(np.mean(parents[y_true[wrong]] == parents[y_pred[wrong]]))
    else:
        scores["errors_under_right_parent"] = float("nan")
    return scores
