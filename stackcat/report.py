"""The evaluation report: ``report.md``, ``per_class_f1.csv`` and PNG plots.

:func:`write_report` turns the probabilities of every model, the average blend
and the meta-learner into one markdown page with its figures; the numbers come
from :mod:`stackcat.metrics`. :func:`write_run_report` writes that report for a
fitted :class:`~stackcat.stacking.StackingCategorizer` (its out-of-fold results,
or a labelled table), with the notes ``stackcat fit`` and ``evaluate`` give it:
data, folds, job times, images, the meta-learner's choice, and (out of fold) the
catalogue's own mistakes: suspected label errors and look-alike categories
(:mod:`stackcat.label_issues`, :mod:`stackcat.lookalikes`). Plots are matplotlib
``Figure`` objects (no pyplot state, Agg rendering); every file is written
atomically.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from stackcat.core import label_positions
from stackcat.files import atomic_path, write_text_atomic
from stackcat.metrics import (
    COVERAGE_TARGETS,
    ECE_BINS,
    _check_proba,
    _train_count_column,
    class_counts,
    comparison_table,
    confused_pairs,
    coverage_at_precision,
    error_reduction,
    expected_calibration_error,
    f1_per_class,
    per_class_report,
    precision_coverage_curve,
    reliability_bins,
    y_as_indices,
)
from stackcat.runs import DATA_PROBLEMS, IMAGE_PROBLEMS, RunFolder
from stackcat.topk import row_argmax, row_max

if TYPE_CHECKING:
    from stackcat.data import PreparedTable
    from stackcat.stacking import Evaluation, StackingCategorizer

MAX_LABEL_CHARS = 40
MAX_LISTED_UNSEEN = 10
PLOTS = {
    "model_comparison": "model_comparison.png",
    "f1_vs_frequency": "f1_vs_frequency.png",
    "confused_pairs": "confused_pairs.png",
    "coverage": "precision_vs_coverage.png",
    "reliability": "reliability.png",
}


def markdown_table(table: pd.DataFrame, float_format: str = "{:.4f}", index: bool = True) -> str:
    """A GitHub markdown rendering of ``table`` (no tabulate dependency).

    Examples
    --------
    >>> print(markdown_table(pd.DataFrame({"f1": [0.5]}, index=["a"])))
    |  | f1 |
    |---|---|
    | a | 0.5000 |
    """
    def cell(value: Any) -> str:
        if isinstance(value, (float, np.floating)):
            return float_format.format(value) if np.isfinite(value) else str(value)
        return str(value).replace("|", "\\|")

    header = ([table.index.name or ""] if index else []) + [str(c) for c in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, row in zip(table.index, table.itertuples(index=False), strict=True):
        cells = ([cell(label)] if index else []) + [cell(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(
    run_dir: str | os.PathLike,
    results: Mapping[str, Any],
    y_true: Any,
    classes: Sequence[Any],
    *,
    y_kind: str | None = None,
    train_counts: Sequence[int] | Mapping[Any, int] | None = None,
    title: str = "stackcat evaluation",
    notes: Sequence[str] = (),
    headline: str | None = None,
    average: str | None = "average",
    base_models: Sequence[str] | None = None,
    sections: Sequence[str] = (),
) -> Path:
    """Write ``report.md``, ``per_class_f1.csv`` and the PNG plots into ``run_dir``.

    Parameters
    ----------
    run_dir : path
        Created if needed; files are written atomically (temp file + rename).
    results : mapping name -> (n_samples, n_classes) probabilities
        Each base model, the average blend and the meta-learner, in the order
        the table should show them.
    y_true : array-like
        Class indices into ``classes``, or labels of ``classes`` (see ``y_kind``).
    classes : sequence
        The label of each column.
    y_kind : {"indices", "labels"} or None, default=None
        What ``y_true`` holds. None reads it as labels when every value is one of
        ``classes``, else as indices, and raises when both readings fit and differ
        (integer classes such as ``[0, 2, 3]`` with ``y_true=[0, 2]``): pass it
        whenever ``classes`` are integers.
    train_counts : per-class counts or mapping label -> count, optional
        Training frequency of each class (x axis of the F1-vs-frequency plot);
        the evaluation support is used without it.
    title : str
    notes : sequence of str
        Bullet points written under the title (data, settings, ...).
    headline : str, optional
        The model the report is about; default the last entry of ``results``.
    average : str or None, default="average"
        Key of the average blend in ``results`` (ignored when absent).
    base_models : sequence of str, optional
        Keys of the single base models; default every key that is neither the
        headline nor ``average``.
    sections : sequence of str
        Markdown lines appended to the report (e.g. :func:`catalogue_sections`).

    Returns
    -------
    Path
        The path of ``report.md``.

    Examples
    --------
    >>> import tempfile
    >>> proba = {"text": [[0.9, 0.1], [0.4, 0.6]], "image": [[0.6, 0.4], [0.7, 0.3]]}
    >>> path = write_report(tempfile.mkdtemp(), proba, [0, 1], ["shirt", "jeans"], y_kind="indices",
    ...                     headline="text")
    >>> path.name
    'report.md'
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    classes = list(classes)
    y = y_as_indices(y_true, classes, y_kind)
    probas = {str(name): _check_proba(proba, len(y)) for name, proba in results.items()}
    if not probas:
        raise ValueError("results is empty: give at least one model's probabilities")
    names = list(probas)
    headline = names[-1] if headline is None else headline
    if headline not in probas:
        raise ValueError(f"headline {headline!r} is not in results {names}")
    average = average if average in probas and average != headline else None
    singles = list(base_models) if base_models is not None else [n for n in names if n not in (headline, average)]
    unknown = [n for n in singles if n not in probas]
    if unknown:
        raise ValueError(f"base_models {unknown} are not in results {names}")

    table = comparison_table(probas, y)
    counts = _train_count_column(train_counts, classes)
    frequency = counts if train_counts is not None else np.bincount(y, minlength=len(classes)).astype(float)
    per_class = per_class_report(y, probas[headline], classes, train_counts, y_kind="indices")
    for name in names:
        per_class[f"f1[{name}]"] = _per_class_f1(y, probas[name], len(classes))[
            label_positions(classes, per_class["class"], what="the per-class table")]
    write_text_atomic(run_dir / "per_class_f1.csv", per_class.to_csv(index=False))

    best_single = max(singles, key=lambda n: table.loc[n, "weighted_f1"]) if singles else None
    figures: dict[str, Callable[[], Any]] = {
        "model_comparison": lambda: plot_model_comparison(table, headline),
        "f1_vs_frequency": lambda: plot_f1_vs_frequency(
            {n: _per_class_f1(y, probas[n], len(classes)) for n in dict.fromkeys([headline, best_single]) if n},
            frequency, np.bincount(y, minlength=len(classes)),
            "training count" if train_counts is not None else "evaluation support"),
        "confused_pairs": lambda: plot_confused_pairs(
            confused_pairs(y, row_argmax(probas[headline]), len(classes)), classes, headline),
        "coverage": lambda: plot_coverage({n: probas[n] for n in dict.fromkeys([headline, average, best_single]) if n},
                                          y, headline),
        "reliability": lambda: plot_reliability({n: probas[n] for n in dict.fromkeys([headline, average]) if n}, y),
    }
    for key, make_figure in figures.items():
        _atomic_save_figure(make_figure(), run_dir / PLOTS[key])

    text = _report_markdown(title, notes, table, headline, best_single, average, per_class, classes, y, probas)
    text += "\n".join(["", *sections]) if sections else ""
    path = run_dir / "report.md"
    write_text_atomic(path, text)
    return path


@dataclass
class RunReport:
    """What :func:`write_run_report` wrote."""

    path: Path  # report.md
    image_problems: pd.DataFrame | None  # rows with an unusable image (row, id, image_path, status); None: no images


def write_run_report(stack: StackingCategorizer, prepared: PreparedTable, out_dir: str | os.PathLike, *,
                     fit_seconds: float | None = None, evaluation: Evaluation | None = None) -> RunReport:
    """The report of a fitted stack: :func:`write_report` with the run's notes, into ``out_dir``.

    Parameters
    ----------
    stack : StackingCategorizer
        Fitted.
    prepared : PreparedTable
        The table it was fitted on, or the labelled table of ``evaluation``.
    out_dir : path
        The run folder (for the out-of-fold report), or a folder of its own.
    fit_seconds : float, optional
        Wall time of the fit, for the notes.
    evaluation : Evaluation, optional
        ``stack.evaluation_results(prepared.frame, labels)``: report on that
        table's scored rows instead of the out-of-fold results.

    Returns
    -------
    RunReport
        The path of ``report.md``, and the rows whose image is unusable (also
        written to ``image_problems.csv`` in ``out_dir``).

    Examples
    --------
    >>> report = write_run_report(stack, prepared, "artifacts/run")  # doctest: +SKIP
    >>> report.path.name  # doctest: +SKIP
    'report.md'
    """
    out_dir = Path(out_dir)
    if evaluation is None:
        results, y_index = stack.oof_results(), stack.oof_target_
    else:
        results, y_index = evaluation.results, evaluation.y_index
        prepared = replace(prepared, frame=prepared.frame[evaluation.scored])
    notes = _run_notes(stack, prepared, fit_seconds)
    image_notes, image_problems = _image_notes(prepared, out_dir)
    notes += image_notes
    notes += stack.report_notes(results, y_index)
    unseen = unseen_labels_note(evaluation) if evaluation is not None else None
    if unseen:
        notes.append(unseen)
    # the members, not the meta candidates, are the "single models" the stack is compared with
    members = [name for name, _ in stack.estimators if name in results]
    sections = catalogue_sections(stack, prepared, out_dir, results) if evaluation is None else []
    path = write_report(out_dir, results, y_index, stack.classes_, y_kind="indices",
                        train_counts=stack.class_counts_, notes=notes, base_models=members or None,
                        sections=sections)
    return RunReport(path, image_problems)


def catalogue_sections(stack: StackingCategorizer, prepared: PreparedTable, run_dir: str | os.PathLike,
                       results: dict[str, Any] | None = None) -> list[str]:
    """The catalogue's own mistakes, from the out-of-fold probabilities: writes ``label_issues.csv`` and
    ``lookalike_categories.csv`` into ``run_dir``; returns the report's two sections. ``results``:
    ``stack.oof_results()`` when the caller has them already."""
    from stackcat.label_issues import stack_probabilities, write_label_issues
    from stackcat.lookalikes import write_lookalikes

    source, proba = stack_probabilities(stack, results)
    _, issue_lines = write_label_issues(stack, prepared, run_dir, proba, source)
    _, lookalike_lines = write_lookalikes(stack, prepared, run_dir, proba, source)
    return issue_lines + lookalike_lines


def unseen_labels_note(evaluation: Evaluation) -> str | None:
    """What an evaluation left out: rows of categories unseen in training; None when there are none."""
    unseen = evaluation.unseen_labels
    if not unseen:
        return None
    listed = ", ".join(unseen[:MAX_LISTED_UNSEEN]) + (" ..." if len(unseen) > MAX_LISTED_UNSEEN else "")
    return (f"{evaluation.n_unseen_rows} rows of {len(unseen)} categories unseen in training ({listed}) are "
            "left out of the scores below; every one of them is necessarily mispredicted.")


def _run_notes(stack: StackingCategorizer, prepared: PreparedTable, fit_seconds: float | None) -> list[str]:
    timings = stack.jobs_.groupby("model")[["fit_seconds", "predict_seconds"]].sum()
    notes = [f"Data: {prepared.summary().splitlines()[0]}; problems listed in {DATA_PROBLEMS}.",
             f"{stack.n_splits} stratified folds (seed {stack.random_state}); "
             f"{len(stack.rare_classes_)} classes with fewer than {stack.n_splits} rows "
             "(spread one member per fold, see the stacking docs).",
             "Job time per model: " + ", ".join(f"{m} fit {r.fit_seconds:.0f} s / predict {r.predict_seconds:.0f} s"
                                                for m, r in timings.iterrows()) + "."]
    if fit_seconds is not None:
        notes.append(f"Wall time of this fit: {fit_seconds:.0f} s (jobs found in the run folder are not re-run).")
    return notes


def _image_notes(prepared: PreparedTable, out_dir: Path) -> tuple[list[str], pd.DataFrame | None]:
    """The images' note, and the rows whose image is unusable (written to ``image_problems.csv``)."""
    statuses = prepared.image_statuses()
    if statuses is None:
        return [], None
    counts = Counter(statuses["status"])
    note = "Images: " + ", ".join(f"{status} {n}" for status, n in sorted(counts.items())) + "."
    problems = statuses[~statuses["status"].isin(["ok", "no_path"])]
    if not problems.empty:
        RunFolder(out_dir).write_image_problems(problems)
        note += f" Unusable images are listed in {IMAGE_PROBLEMS}."
    if counts.keys() - {"ok"}:
        note += (" Rows without a usable image get a zero embedding and a missing-image flag: "
                 "the image model predicts the class prior there, the fusion net uses the text.")
    return [note], problems


def _per_class_f1(y: np.ndarray, proba: np.ndarray, n_classes: int) -> np.ndarray:
    return f1_per_class(*class_counts(y, row_argmax(proba), n_classes))


def _report_markdown(title: str, notes: Sequence[str], table: pd.DataFrame, headline: str,
                     best_single: str | None, average: str | None, per_class: pd.DataFrame,
                     classes: Sequence[Any], y: np.ndarray, probas: Mapping[str, np.ndarray]) -> str:
    lines = [f"# {title}", ""]
    lines += [f"- {note}" for note in notes]
    lines += ["" if notes else "", f"{len(y):,} products, {len(classes):,} classes. Headline model: **{headline}**.", ""]
    lines += ["## Models", "", markdown_table(table.drop(columns=["n_samples"])), ""]
    lines += ["Coverage at 95% / 99%: the share of products whose top-1 category can be accepted "
              "automatically (by decreasing top-1 probability) with at least that precision; "
              "the rest goes to human review. Threshold: the lowest accepted probability.", ""]
    lines += _reduction_lines(table, headline, best_single, average)
    lines += ["", f"![model comparison]({PLOTS['model_comparison']})", ""]
    lines += ["## Per class", "", f"Per-class F1 of every model: [per_class_f1.csv](per_class_f1.csv). "
              f"Weakest classes of {headline} with support >= 5:", ""]
    weakest = per_class[per_class["support"] >= 5].nsmallest(10, "f1")
    weakest = weakest.assign(train_count=weakest["train_count"].astype("Int64"))
    lines += [markdown_table(weakest[["class", "support", "precision", "recall", "f1", "train_count"]], index=False), ""]
    lines += [f"![per-class F1 vs class frequency]({PLOTS['f1_vs_frequency']})", ""]
    pairs = confused_pairs(y, row_argmax(probas[headline]), len(classes))
    pairs_table = pd.DataFrame({"true": [classes[i] for i in pairs["true"]],
                                "predicted": [classes[i] for i in pairs["predicted"]], "count": pairs["count"]})
    lines += ["## Most confused pairs", "", markdown_table(pairs_table, index=False), "",
              f"![most confused pairs]({PLOTS['confused_pairs']})", ""]
    lines += ["## Auto-categorization and calibration", "",
              f"![precision vs coverage]({PLOTS['coverage']})", "", f"![reliability]({PLOTS['reliability']})", ""]
    return "\n".join(lines)


def _reduction_lines(table: pd.DataFrame, headline: str, best_single: str | None, average: str | None) -> list[str]:
    lines = []
    for label, reference in (("best single model", best_single), ("average blend", average)):
        if reference is None or reference == headline:
            continue
        accuracy_cut = error_reduction(1 - table.loc[reference, "accuracy"], 1 - table.loc[headline, "accuracy"])
        f1_cut = error_reduction(1 - table.loc[reference, "weighted_f1"], 1 - table.loc[headline, "weighted_f1"])
        lines.append(f"- vs the {label} ({reference}): error rate {1 - table.loc[reference, 'accuracy']:.2%} -> "
                     f"{1 - table.loc[headline, 'accuracy']:.2%}, relative error reduction {accuracy_cut:+.1%}; "
                     f"in 1 - weighted F1: {f1_cut:+.1%} (negative: worse)")
    return lines


# ---------------------------------------------------------------------------
# plots (matplotlib Figure objects, no pyplot state, Agg rendering)
# ---------------------------------------------------------------------------

def _figure(width: float = 7.0, height: float = 4.5) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _short(label: Any) -> str:
    text = str(label)
    return text if len(text) <= MAX_LABEL_CHARS else text[: MAX_LABEL_CHARS - 1] + "…"


def plot_model_comparison(table: pd.DataFrame, headline: str) -> Any:
    """Grouped bars of weighted F1, macro F1 and accuracy per model."""
    figure = _figure(max(6.0, 1.2 * len(table) + 2), 4.5)
    axes = figure.add_subplot()
    metrics = ["weighted_f1", "macro_f1", "accuracy"]
    width = 0.8 / len(metrics)
    x = np.arange(len(table))
    for i, metric in enumerate(metrics):
        axes.bar(x + (i - 1) * width, table[metric], width, label=metric)
    axes.set_xticks(x, [f"*{n}*" if n == headline else n for n in table.index], rotation=20, ha="right")
    low = float(table[metrics].to_numpy().min())
    axes.set_ylim(max(0.0, low - 0.05), 1.0)
    axes.set_ylabel("score")
    axes.set_title("Models compared")
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return figure


def plot_f1_vs_frequency(f1_by_model: Mapping[str, np.ndarray], frequency: np.ndarray,
                         support: np.ndarray, frequency_label: str) -> Any:
    """Per-class F1 against class frequency (log x), classes present in the evaluation."""
    figure = _figure()
    axes = figure.add_subplot()
    present = (support > 0) & (frequency > 0)
    for name, f1 in f1_by_model.items():
        axes.scatter(frequency[present], f1[present], s=10, alpha=0.5, label=name)
    axes.set_xscale("log")
    axes.set_xlabel(f"class frequency ({frequency_label}, log scale)")
    axes.set_ylabel("F1")
    axes.set_ylim(-0.02, 1.02)
    axes.set_title("Per-class F1 against class frequency")
    axes.legend(loc="lower right")
    return figure


def plot_confused_pairs(pairs: pd.DataFrame, classes: Sequence[Any], model: str) -> Any:
    """Horizontal bars: the most frequent true -> predicted confusions."""
    figure = _figure(8.0, max(2.5, 0.35 * len(pairs) + 1.2))
    axes = figure.add_subplot()
    labels = [f"{_short(classes[t])} → {_short(classes[p])}" for t, p in zip(pairs["true"], pairs["predicted"], strict=True)]
    axes.barh(np.arange(len(pairs))[::-1], pairs["count"], color="tab:red")
    axes.set_yticks(np.arange(len(pairs))[::-1], labels, fontsize=8)
    axes.set_xlabel("products")
    axes.set_title(f"Most confused pairs ({model})" if len(pairs) else f"No errors ({model})")
    return figure


def plot_coverage(probas: Mapping[str, np.ndarray], y: np.ndarray, headline: str) -> Any:
    """Precision of auto-accepted products against their share, with the 95% / 99% points."""
    figure = _figure()
    axes = figure.add_subplot()
    for name, proba in probas.items():
        confidence = row_max(proba)
        curve = precision_coverage_curve(confidence, row_argmax(proba) == y)
        axes.plot(curve["coverage"], curve["precision"], label=name, lw=2 if name == headline else 1)
        if name != headline:
            continue
        for target in COVERAGE_TARGETS:
            coverage, threshold = coverage_at_precision(curve, target)
            axes.axhline(target, color="grey", lw=0.6, ls="--")
            if coverage > 0:
                axes.plot([coverage], [target], "o", color="black")
                axes.annotate(f"{coverage:.1%} at p>={threshold:.2f}", (coverage, target),
                              textcoords="offset points", xytext=(5, -12), fontsize=8)
    axes.set_xlabel("coverage (share of products accepted automatically)")
    axes.set_ylabel("precision of accepted products")
    axes.set_xlim(0, 1)
    axes.set_title("Auto-categorization: precision against coverage")
    axes.legend(loc="lower left")
    return figure


def plot_reliability(probas: Mapping[str, np.ndarray], y: np.ndarray) -> Any:
    """Reliability diagram: accuracy against mean top-1 probability per bin."""
    figure = _figure(5.5, 5.0)
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], color="grey", ls="--", lw=0.8, label="perfect calibration")
    for name, proba in probas.items():
        confidence = row_max(proba)
        correct = row_argmax(proba) == y
        bins = reliability_bins(confidence, correct)
        filled = bins["count"] > 0
        ece = expected_calibration_error(confidence, correct)
        axes.plot(bins["confidence"][filled], bins["accuracy"][filled], "o-", label=f"{name} (ECE {ece:.3f})")
    axes.set_xlabel("mean top-1 probability")
    axes.set_ylabel("accuracy")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_title(f"Reliability ({ECE_BINS} bins)")
    axes.legend(loc="upper left")
    return figure


# ---------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------

def _atomic_save_figure(figure: Any, path: Path) -> None:
    with atomic_path(path) as temp:
        figure.savefig(str(temp), format="png", dpi=110)
