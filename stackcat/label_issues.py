"""Suspected label errors: training products whose given category the stack's out-of-fold probabilities doubt.

Marketplace labels are noisy (sellers pick categories themselves), and the
stack holds the best evidence there is against them: an honest out-of-fold
probability for every training product. This module turns it into a queue a
catalogue team can act on, by confident learning (Northcutt et al. 2021):

* each class ``j`` gets a threshold ``t_j``, the mean out-of-fold probability
  of ``j`` over the products labelled ``j`` (its self-confidence);
* a product is *confidently* of class ``j`` when ``p_j >= t_j``; when several
  classes qualify, its likeliest class (as cleanlab's confident joint);
* a product is flagged when that confident class is not its given label, nor
  is its likeliest class (:func:`rank_label_issues`, column ``flagged``: the
  default cut; the rule of ``cleanlab.filter.find_label_issues(filter_by=
  "confident_learning")``).

Every product is ranked by ``score = p_suggested - p_given`` (the negated
normalized margin; from -1, surely right, to 1, surely wrong), where the
suggested label is the likeliest class other than the given one. Measured on
Myntra with 5% injected noise (``experiments/label_noise.py``, RESULTS.md
section 15): the cut flags the same rows as cleanlab's ``confident_learning``
filter (cleanlab's default ``prune_by_noise_rate`` is 2-3 points more precise
for up to 2 points less recall), and the margin ranks the most-confusable noise
better than self-confidence (precision in the top 5%: 0.89 against 0.80).
Unlike cleanlab it needs no dense matrix: top-k (sparse) out-of-fold matrices
(:mod:`stackcat.topk`) are read in blocks of rows.

:func:`write_label_issues` writes ``label_issues.csv`` into a run folder
(columns :data:`LABEL_ISSUE_COLUMNS`, the flagged rows, most suspect first)
and the report's section; :func:`read_label_issues` reads it back with ids and
labels as the exact strings written (commas, newlines, non-ASCII, ``NA``).

Examples
--------
>>> import numpy as np
>>> proba = np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.1, 0.9], [0.95, 0.05]])
>>> ranking = rank_label_issues(proba, np.array([0, 0, 1, 1, 1]))
>>> ranking.loc[ranking["flagged"], "row"].tolist()
[4]
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from stackcat import topk
from stackcat.files import atomic_path, write_text_atomic

if TYPE_CHECKING:
    from stackcat.data import PreparedTable
    from stackcat.stacking import StackingCategorizer

LABEL_ISSUES = "label_issues.csv"
#: The columns of ``label_issues.csv`` (the review page reads them by these names).
LABEL_ISSUE_COLUMNS = ("id", "given_label", "suggested_label", "given_probability", "suggested_probability", "score")
THUMBNAILS = "label_issue_thumbnails"
THUMBNAIL_PIXELS = 96
REPORT_EXAMPLES = 15
REPORT_CLASSES = 10
MIN_CLASS_SUPPORT = 5
MAX_TEXT_CHARS = 90
THRESHOLD_TOLERANCE = 1e-6


def confident_thresholds(proba: Any, y_index: np.ndarray, n_classes: int | None = None) -> np.ndarray:
    """Each class's mean out-of-fold probability over the rows labelled with it (0 for an absent class).

    Examples
    --------
    >>> confident_thresholds(np.array([[0.9, 0.1], [0.7, 0.3], [0.4, 0.6]]), np.array([0, 0, 1])).round(2).tolist()
    [0.8, 0.6]
    """
    y_index = np.asarray(y_index)
    n_classes = proba.shape[1] if n_classes is None else n_classes
    given = topk.values_at(proba, y_index)
    totals = np.bincount(y_index, weights=given, minlength=n_classes)
    counts = np.bincount(y_index, minlength=n_classes)
    return np.divide(totals, counts, out=np.zeros(n_classes), where=counts > 0)


def rank_label_issues(proba: Any, y_index: np.ndarray) -> pd.DataFrame:
    """Every row ranked by how unlikely its given label is, with the confident-learning cut.

    Parameters
    ----------
    proba : ndarray or sparse matrix of shape (n_samples, n_classes)
        Out-of-fold probabilities (dense, or top-k as in :mod:`stackcat.topk`).
    y_index : ndarray of int
        Each row's given class, as a column of ``proba``.

    Returns
    -------
    DataFrame
        One row per input row, most suspect first: ``row`` (position in the
        input), ``given``, ``suggested`` (column indices), ``given_probability``,
        ``suggested_probability``, ``score`` (their difference) and ``flagged``
        (a confident class other than the given one).

    Examples
    --------
    >>> proba = np.array([[0.7, 0.3], [0.2, 0.8], [0.9, 0.1]])
    >>> rank_label_issues(proba, np.array([0, 1, 1]))[["row", "suggested", "flagged"]].values.tolist()
    [[2, 0, True], [0, 1, False], [1, 0, False]]
    """
    y_index = np.asarray(y_index, dtype=np.int64)
    n_rows, n_classes = proba.shape
    if len(y_index) != n_rows:
        raise ValueError(f"{len(y_index)} labels for {n_rows} rows of probabilities")
    if n_rows and (y_index.min() < 0 or y_index.max() >= n_classes):
        raise ValueError(f"labels must be column indices in [0, {n_classes}); got {y_index.min()}..{y_index.max()}")
    thresholds = confident_thresholds(proba, y_index, n_classes)
    parts = [_block_issues(topk.dense_rows(proba, slice(start, start + topk.BLOCK_ROWS), spread=False),
                           y_index[start:start + topk.BLOCK_ROWS], thresholds)
             for start in range(0, n_rows, topk.BLOCK_ROWS)]
    columns = ["given", "suggested", "given_probability", "suggested_probability", "flagged"]
    ranking = (pd.concat(parts, ignore_index=True) if parts
               else pd.DataFrame({c: pd.Series(dtype=bool if c == "flagged" else float) for c in columns}))
    ranking.insert(0, "row", np.arange(n_rows))
    ranking["score"] = ranking["suggested_probability"] - ranking["given_probability"]
    return ranking.sort_values(["score", "row"], ascending=[False, True], kind="stable", ignore_index=True)


def _block_issues(block: np.ndarray, given: np.ndarray, thresholds: np.ndarray) -> pd.DataFrame:
    rows = np.arange(len(block))
    given_probability = block[rows, given].astype(np.float64)
    confident = (block >= thresholds[None, :] - THRESHOLD_TOLERANCE) & (block > 0)
    n_confident = confident.sum(axis=1)
    # one confident class: that one; several: the likeliest class overall (as cleanlab's confident joint),
    # so a class whose own rows get tiny probabilities out of fold (a rare one) does not claim every row
    top = block.argmax(axis=1)
    confident_class = np.where(n_confident > 1, top, confident.argmax(axis=1))
    # a row whose likeliest class is its given one is never flagged (cleanlab does the same)
    flagged = (n_confident > 0) & (confident_class != given) & (top != given)
    others = block.astype(np.float64, copy=True)
    others[rows, given] = -1.0
    suggested = others.argmax(axis=1)
    return pd.DataFrame({"given": given, "suggested": suggested, "given_probability": given_probability,
                         "suggested_probability": others[rows, suggested] if len(block) else np.zeros(0),
                         "flagged": flagged})


def label_issues_table(ranking: pd.DataFrame, ids: Sequence[Any], classes: Sequence[Any]) -> pd.DataFrame:
    """The flagged rows of :func:`rank_label_issues` with ids and labels: the ``label_issues.csv`` frame.

    Ids and labels are written as text (``str``), as the CSV holds them.

    Examples
    --------
    >>> ranking = rank_label_issues(np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.2, 0.8], [0.95, 0.05]]),
    ...                             np.array([0, 0, 1, 1, 1]))
    >>> label_issues_table(ranking, ["a", "b", "c", "d", "e"], ["shirt", "jeans"]).iloc[0, :3].tolist()
    ['e', 'jeans', 'shirt']
    """
    ids = np.asarray(ids, dtype=object)
    classes = np.asarray(classes, dtype=object)
    if len(ids) != len(ranking):
        raise ValueError(f"{len(ids)} ids for {len(ranking)} ranked rows")
    flagged = ranking[ranking["flagged"]]
    return pd.DataFrame({
        "id": [str(i) for i in ids[flagged["row"].to_numpy()]],
        "given_label": [str(c) for c in classes[flagged["given"].to_numpy()]],
        "suggested_label": [str(c) for c in classes[flagged["suggested"].to_numpy()]],
        "given_probability": flagged["given_probability"].to_numpy(),
        "suggested_probability": flagged["suggested_probability"].to_numpy(),
        "score": flagged["score"].to_numpy(),
    }, columns=list(LABEL_ISSUE_COLUMNS))


def read_label_issues(path: str | os.PathLike) -> pd.DataFrame:
    """``label_issues.csv`` as written: ids and labels as exact strings, probabilities and score as floats.

    Raises ``ValueError`` naming the file and the missing columns when it is not such a file.
    """
    path = Path(path)
    text_columns = {"id": str, "given_label": str, "suggested_label": str}
    table = pd.read_csv(path, dtype=text_columns, keep_default_na=False, na_filter=False, encoding="utf-8")
    missing = [c for c in LABEL_ISSUE_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: not a label issues file, columns {missing} are missing "
                         f"(expected {list(LABEL_ISSUE_COLUMNS)})")
    for column in ("given_probability", "suggested_probability", "score"):
        table[column] = pd.to_numeric(table[column], errors="raise").astype(np.float64)
    for column in text_columns:
        table[column] = table[column].to_numpy(dtype=object)
    return table


def stack_probabilities(stack: StackingCategorizer, results: dict[str, Any] | None = None) -> tuple[str, Any]:
    """The out-of-fold probabilities the stack stands behind, and their name.

    The chosen meta-learner's own (nested) out-of-fold probabilities when it
    was evaluated, else the members' plain average, else the single member's.
    ``results``: ``stack.oof_results()`` when the caller has them already.
    """
    if getattr(stack, "meta_oof_", None) is not None:
        return f"meta:{type(stack.meta_).__name__}", stack.meta_oof_
    results = stack.oof_results() if results is None else results
    name = "average" if "average" in results else next(iter(results))
    return name, results[name]


@dataclass
class LabelIssues:
    """What :func:`write_label_issues` found and wrote."""

    table: pd.DataFrame  # the label_issues.csv frame
    source: str  # whose out-of-fold probabilities ranked them
    n_rows: int  # training rows examined
    path: Path


def write_label_issues(stack: StackingCategorizer, prepared: PreparedTable, run_dir: str | os.PathLike,
                       proba: Any = None, source: str | None = None) -> tuple[LabelIssues, list[str]]:
    """Find the suspected label errors of a fitted stack; write ``label_issues.csv``, thumbnails and report lines.

    Parameters
    ----------
    stack : StackingCategorizer
        Fitted on ``prepared.frame``.
    prepared : PreparedTable
        The training table (ids, text, image paths, in the stack's row order).
    run_dir : path
        The run folder.
    proba, source : optional
        The out-of-fold probabilities to rank by and their name (default: :func:`stack_probabilities`).

    Returns
    -------
    LabelIssues, list of str
        The issues, and the markdown lines of the report's section.

    Examples
    --------
    >>> issues, lines = write_label_issues(stack, prepared, "artifacts/run")  # doctest: +SKIP
    >>> issues.table.columns.tolist()  # doctest: +SKIP
    ['id', 'given_label', 'suggested_label', 'given_probability', 'suggested_probability', 'score']
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    frame = prepared.frame
    y_index = np.asarray(stack.oof_target_)
    if len(frame) != len(y_index):
        raise ValueError(f"the table has {len(frame)} rows but the stack was fitted on {len(y_index)}: "
                         "give the table the stack was fitted on")
    if proba is None:
        source, proba = stack_probabilities(stack)
    ranking = rank_label_issues(proba, y_index)
    table = label_issues_table(ranking, frame["id"].to_numpy(dtype=object), stack.classes_)
    path = write_text_atomic(run_dir / LABEL_ISSUES, table.to_csv(index=False))
    issues = LabelIssues(table, source, len(y_index), path)
    examples = ranking.loc[ranking["flagged"], "row"].to_numpy()[:REPORT_EXAMPLES]  # all the section shows
    return issues, label_issues_markdown(issues, frame.iloc[examples], y_index, stack.classes_, run_dir)


def label_issues_markdown(issues: LabelIssues, flagged: pd.DataFrame, y_index: np.ndarray,
                          classes: Sequence[Any], run_dir: Path) -> list[str]:
    """The report's section: how many, the classes with the largest share flagged, the top examples."""
    table = issues.table
    lines = ["## Suspected label errors", "",
             f"{len(table):,} of {issues.n_rows:,} training products ({len(table) / max(issues.n_rows, 1):.1%}) "
             f"have a given category that the out-of-fold probabilities of {issues.source} doubt "
             "(confident learning: another category is above its own mean self-confidence and likelier than "
             f"the given one). All of them, most suspect first: [{LABEL_ISSUES}]({LABEL_ISSUES}); "
             "score = probability of the suggested category - probability of the given one.", ""]
    if table.empty:
        return lines
    from stackcat.report import markdown_table

    lines += [f"Categories with the largest share of products flagged (at least {MIN_CLASS_SUPPORT} products):", "",
              markdown_table(_class_shares(table, y_index, classes), index=False), ""]
    top = table.head(REPORT_EXAMPLES)
    thumbnails = _write_thumbnails(flagged["image_path"].head(REPORT_EXAMPLES).tolist(), run_dir)
    examples = pd.DataFrame({
        "photo": [f"![]({t})" if t else "" for t in thumbnails],
        "id": top["id"], "text": [_one_line(t) for t in flagged["text"].head(REPORT_EXAMPLES)],
        "given": top["given_label"], "p(given)": top["given_probability"],
        "suggested": top["suggested_label"], "p(suggested)": top["suggested_probability"]})
    if not any(thumbnails):
        examples = examples.drop(columns="photo")
    lines += ["Most suspect products:", "", markdown_table(examples, float_format="{:.3f}", index=False), ""]
    return lines


def _class_shares(table: pd.DataFrame, y_index: np.ndarray, classes: Sequence[Any]) -> pd.DataFrame:
    support = pd.Series(np.bincount(y_index, minlength=len(classes)), index=[str(c) for c in classes])
    flagged = table["given_label"].value_counts().reindex(support.index, fill_value=0)
    shares = pd.DataFrame({"category": support.index, "products": support.to_numpy(),
                           "flagged": flagged.to_numpy()})
    shares["share_flagged"] = shares["flagged"] / shares["products"]
    shares = shares[(shares["products"] >= MIN_CLASS_SUPPORT) & (shares["flagged"] > 0)]
    return shares.sort_values(["share_flagged", "flagged"], ascending=False).head(REPORT_CLASSES)


def _one_line(text: Any) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_TEXT_CHARS else text[: MAX_TEXT_CHARS - 1] + "…"


def _write_thumbnails(image_paths: Sequence[Any], run_dir: Path) -> list[str]:
    """A small JPEG per example photo in ``run_dir/label_issue_thumbnails``; '' where a row has no usable photo."""
    from stackcat.features.images import load_image

    written = []
    for rank, image_path in enumerate(image_paths):
        # the members' own decoder: no path, missing, corrupt or too large give no thumbnail
        thumbnail, _ = load_image(image_path, draft_size=THUMBNAIL_PIXELS)
        if thumbnail is None:
            written.append("")
            continue
        thumbnail.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
        relative = f"{THUMBNAILS}/{rank + 1}.jpg"
        (run_dir / THUMBNAILS).mkdir(parents=True, exist_ok=True)
        with atomic_path(run_dir / relative) as temp:
            thumbnail.save(temp, format="JPEG", quality=85)
        written.append(relative)
    return written
