"""Scores and the evaluation report: tables, per-class CSV and PNG plots.

Everything works on a probability matrix ``proba`` of shape ``(n_samples,
n_classes)`` and true class indices ``y_true`` (or labels, with ``classes``)
and is vectorized: a 90k x 900 matrix scores in about a second.

* :func:`score` -- weighted F1 (the headline), macro F1, accuracy, top-5,
  expected calibration error, and the share of products that can be
  auto-categorized at 95% / 99% precision (the rest goes to human review).
* :func:`per_class_report`, :func:`comparison_table`, :func:`markdown_table`.
* :func:`write_report` -- ``report.md`` + ``per_class_f1.csv`` + PNG plots.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stackcat.topk import is_top_k, rank_of, row_argmax, row_max

ECE_BINS = 15
COVERAGE_TARGETS = (0.95, 0.99)
TOP_K = 5
RANK_CHUNK = 8192
MAX_LABEL_CHARS = 40
PLOTS = {
    "model_comparison": "model_comparison.png",
    "f1_vs_frequency": "f1_vs_frequency.png",
    "confused_pairs": "confused_pairs.png",
    "coverage": "precision_vs_coverage.png",
    "reliability": "reliability.png",
}


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------

def as_indices(y_true: Any, n_classes: int, classes: Sequence[Any] | None = None) -> np.ndarray:
    """``y_true`` as int class indices: labels are mapped through ``classes`` when given."""
    y = np.asarray(y_true.to_numpy(dtype=object) if isinstance(y_true, pd.Series) else y_true)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D; got shape {y.shape}")
    if classes is not None:
        index = pd.Index(list(classes))
        if not index.is_unique:
            raise ValueError("classes has duplicate labels")
        positions = index.get_indexer(y)
        if (positions < 0).any():
            raise ValueError(f"y_true has labels not in classes: {list(dict.fromkeys(y[positions < 0].tolist()))[:10]}")
        return positions.astype(np.int64)
    if y.dtype.kind not in "iu":
        raise TypeError(f"y_true must be class indices (dtype {y.dtype}); pass classes=... to give labels")
    bad = np.flatnonzero((y < 0) | (y >= n_classes))
    if bad.size:
        raise ValueError(f"y_true has indices outside [0, {n_classes}) at rows {bad[:10].tolist()}")
    return y.astype(np.int64)


def _check_proba(proba: Any, n_samples: int) -> Any:
    """A 2-D probability matrix: dense, or top-k sparse (:mod:`stackcat.topk`)."""
    proba = proba if is_top_k(proba) else np.asarray(proba)
    if proba.ndim != 2 or proba.shape[0] != n_samples:
        raise ValueError(f"proba must be (n_samples={n_samples}, n_classes); got shape {proba.shape}")
    return proba


# ---------------------------------------------------------------------------
# scores
# ---------------------------------------------------------------------------

def class_counts(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> tuple[np.ndarray, ...]:
    """Per class: true positives, predicted count, true count (support)."""
    tp = np.bincount(y_true[y_true == y_pred], minlength=n_classes)
    return tp, np.bincount(y_pred, minlength=n_classes), np.bincount(y_true, minlength=n_classes)


def f1_per_class(tp: np.ndarray, predicted: np.ndarray, support: np.ndarray) -> np.ndarray:
    """F1 = 2 TP / (predicted + support); 0 where a class is neither true nor predicted."""
    denominator = predicted + support
    return np.divide(2.0 * tp, denominator, out=np.zeros(len(tp)), where=denominator > 0)


def true_class_rank(y_true: np.ndarray, proba: Any) -> np.ndarray:
    """How many classes score at least as high as the true one (ties count against it).

    A top-k matrix ranks a true class it does not store after every stored one.
    """
    if is_top_k(proba):
        return rank_of(proba, y_true)
    ranks = np.empty(len(y_true), dtype=np.int64)
    for start in range(0, len(y_true), RANK_CHUNK):
        block = proba[start:start + RANK_CHUNK]
        true_p = block[np.arange(len(block)), y_true[start:start + RANK_CHUNK]]
        ranks[start:start + RANK_CHUNK] = (block >= true_p[:, None]).sum(axis=1) - 1
    return ranks


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE over ``n_bins`` equal-width bins of the top-1 probability, bins (lo, hi]."""
    bins = reliability_bins(confidence, correct, n_bins)
    weights = bins["count"] / max(len(confidence), 1)
    return float(np.sum(weights * np.abs(bins["accuracy"] - bins["confidence"])))


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Per bin: count, mean confidence and accuracy (0 for empty bins)."""
    index = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    safe = np.maximum(count, 1)
    return {
        "count": count,
        "confidence": np.bincount(index, weights=confidence, minlength=n_bins) / safe,
        "accuracy": np.bincount(index, weights=correct.astype(np.float64), minlength=n_bins) / safe,
        "edges": np.linspace(0.0, 1.0, n_bins + 1),
    }


def precision_coverage_curve(confidence: np.ndarray, correct: np.ndarray) -> dict[str, np.ndarray]:
    """Accepting every product with top-1 probability >= t, for each distinct t (highest first).

    Returns the thresholds, the share accepted (coverage) and the precision of
    the accepted products. Ties are accepted or rejected together.
    """
    order = np.argsort(-confidence, kind="stable")
    sorted_confidence = confidence[order]
    hits = np.cumsum(correct[order])
    accepted = np.arange(1, len(order) + 1)
    block_end = np.flatnonzero(np.r_[sorted_confidence[1:] != sorted_confidence[:-1], True])
    return {
        "threshold": sorted_confidence[block_end],
        "coverage": accepted[block_end] / max(len(order), 1),
        "precision": hits[block_end] / accepted[block_end],
    }


def coverage_at_precision(curve: Mapping[str, np.ndarray], target: float) -> tuple[float, float]:
    """(largest coverage whose precision >= target, its threshold); (0.0, inf) if none."""
    ok = np.flatnonzero(curve["precision"] >= target)
    if ok.size == 0:
        return 0.0, float("inf")
    best = ok[np.argmax(curve["coverage"][ok])]
    return float(curve["coverage"][best]), float(curve["threshold"][best])


def _target_key(target: float) -> str:
    return f"{round(target * 100):d}"


def score(y_true: Any, proba: Any, classes: Sequence[Any] | None = None) -> dict[str, float]:
    """The evaluation numbers of one probability matrix.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        Class indices into the columns of ``proba``, or labels when ``classes`` is given.
    proba : array-like of shape (n_samples, n_classes)
    classes : sequence, optional
        The label of each column of ``proba``.

    Returns
    -------
    dict
        ``weighted_f1`` (headline), ``macro_f1`` (over classes that are true
        or predicted, as scikit-learn), ``accuracy``, ``top5_accuracy`` (ties
        count against the true class), ``ece`` (15 bins of the top-1
        probability), and for auto-categorization: ``coverage_at_95`` /
        ``coverage_at_99`` -- the largest share of products whose top-1 can be
        accepted with precision >= 95% / 99% when accepting by decreasing top-1
        probability -- with ``threshold_at_95`` / ``threshold_at_99``, the
        lowest accepted probability (inf when no share reaches the target);
        and ``n_samples``.

    Examples
    --------
    >>> proba = [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]]
    >>> result = score([0, 1, 1, 1], proba)
    >>> result["accuracy"], result["coverage_at_95"], result["threshold_at_95"]
    (0.75, 0.75, 0.7)
    """
    proba = proba if is_top_k(proba) else np.asarray(proba)
    if proba.ndim != 2:
        raise ValueError(f"proba must be 2-D (n_samples, n_classes); got shape {proba.shape}")
    y = as_indices(y_true, proba.shape[1], classes)
    proba = _check_proba(proba, len(y))
    n_classes = proba.shape[1]
    y_pred = row_argmax(proba)
    tp, predicted, support = class_counts(y, y_pred, n_classes)
    f1 = f1_per_class(tp, predicted, support)
    seen = (predicted + support) > 0
    confidence = row_max(proba)
    correct = y_pred == y
    result = {
        "weighted_f1": float(np.sum(f1 * support) / max(support.sum(), 1)),
        "macro_f1": float(f1[seen].mean()) if seen.any() else 0.0,
        "accuracy": float(correct.mean()) if len(y) else 0.0,
        f"top{TOP_K}_accuracy": float(np.mean(true_class_rank(y, proba) < TOP_K)) if len(y) else 0.0,
        "ece": expected_calibration_error(confidence, correct),
    }
    curve = precision_coverage_curve(confidence, correct)
    for target in COVERAGE_TARGETS:
        coverage, threshold = coverage_at_precision(curve, target)
        result[f"coverage_at_{_target_key(target)}"] = coverage
        result[f"threshold_at_{_target_key(target)}"] = threshold
    result["n_samples"] = len(y)
    return result


def per_class_report(y_true: Any, proba: Any, classes: Sequence[Any],
                     train_counts: Sequence[int] | Mapping[Any, int] | None = None) -> pd.DataFrame:
    """One row per class: support, predicted count, precision, recall, F1, training frequency.

    ``y_true`` holds labels of ``classes`` (when every value is one) or class
    indices; ``train_counts`` (per class, in ``classes`` order, or a mapping
    label -> count) fills the ``train_count`` column (NaN without it). Sorted
    by support, largest first (ties keep the ``classes`` order).

    Examples
    --------
    >>> table = per_class_report([0, 1, 1], [[0.9, 0.1], [0.4, 0.6], [0.7, 0.3]], ["a", "b"])
    >>> table[["class", "support", "precision", "recall"]].values.tolist()
    [['b', 2, 1.0, 0.5], ['a', 1, 0.5, 1.0]]
    """
    proba = proba if is_top_k(proba) else np.asarray(proba)
    classes = list(classes)
    if proba.ndim != 2 or proba.shape[1] != len(classes):
        raise ValueError(f"proba has shape {proba.shape} but {len(classes)} classes were given")
    y = _indices_or_labels(y_true, classes)
    proba = _check_proba(proba, len(y))
    tp, predicted, support = class_counts(y, row_argmax(proba), len(classes))
    table = pd.DataFrame({
        "class": pd.Series(classes, dtype=object),
        "support": support,
        "predicted": predicted,
        "precision": np.divide(tp, predicted, out=np.zeros(len(tp)), where=predicted > 0),
        "recall": np.divide(tp, support, out=np.zeros(len(tp)), where=support > 0),
        "f1": f1_per_class(tp, predicted, support),
        "train_count": _train_count_column(train_counts, classes),
    })
    return table.sort_values("support", ascending=False, kind="stable").reset_index(drop=True)


def _indices_or_labels(y_true: Any, classes: Sequence[Any]) -> np.ndarray:
    """Labels when every value of ``y_true`` is one of ``classes``, else class indices."""
    y = np.asarray(y_true.to_numpy(dtype=object) if isinstance(y_true, pd.Series) else y_true)
    if y.ndim == 1 and (pd.Index(classes).get_indexer(y) >= 0).all():
        return as_indices(y, len(classes), classes)
    return as_indices(y, len(classes))


def _train_count_column(train_counts: Any, classes: Sequence[Any]) -> np.ndarray:
    if train_counts is None:
        return np.full(len(classes), np.nan)
    if isinstance(train_counts, Mapping):
        return np.array([train_counts.get(c, 0) for c in classes], dtype=np.float64)
    counts = np.asarray(train_counts, dtype=np.float64)
    if counts.shape != (len(classes),):
        raise ValueError(f"train_counts has shape {counts.shape}; expected one count per class ({len(classes)})")
    return counts


def comparison_table(results: Mapping[str, Any], y_true: Any, classes: Sequence[Any] | None = None) -> pd.DataFrame:
    """One row per model / blend / meta (in ``results`` order) with the :func:`score` columns.

    Examples
    --------
    >>> table = comparison_table({"a": [[0.9, 0.1], [0.6, 0.4]], "b": [[0.2, 0.8], [0.3, 0.7]]}, [0, 1])
    >>> table["accuracy"].tolist()
    [0.5, 0.5]
    """
    if not results:
        raise ValueError("results is empty: give at least one model's probabilities")
    rows = {str(name): score(y_true, proba, classes) for name, proba in results.items()}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "model"
    return table


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


# ---------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------

def confused_pairs(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, top: int = 15) -> pd.DataFrame:
    """The ``top`` most frequent (true, predicted) error pairs, counted with one bincount."""
    wrong = y_true != y_pred
    pair_counts = np.bincount(y_true[wrong] * n_classes + y_pred[wrong])
    pairs = np.flatnonzero(pair_counts)
    pairs = pairs[np.argsort(-pair_counts[pairs], kind="stable")][:top]
    return pd.DataFrame({"true": pairs // n_classes, "predicted": pairs % n_classes,
                         "count": pair_counts[pairs]})


def error_reduction(error_reference: float, error_model: float) -> float:
    """Relative error reduction ``(ref - model) / ref``; NaN when the reference makes no error."""
    return (error_reference - error_model) / error_reference if error_reference > 0 else float("nan")


def write_report(
    run_dir: str | os.PathLike,
    results: Mapping[str, Any],
    y_true: Any,
    classes: Sequence[Any],
    *,
    train_counts: Sequence[int] | Mapping[Any, int] | None = None,
    title: str = "stackcat evaluation",
    notes: Sequence[str] = (),
    headline: str | None = None,
    average: str | None = "average",
    base_models: Sequence[str] | None = None,
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
        Class indices into ``classes`` (or labels of ``classes``).
    classes : sequence
        The label of each column.
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

    Returns
    -------
    Path
        The path of ``report.md``.

    Examples
    --------
    >>> import tempfile
    >>> proba = {"text": [[0.9, 0.1], [0.4, 0.6]], "image": [[0.6, 0.4], [0.7, 0.3]]}
    >>> path = write_report(tempfile.mkdtemp(), proba, [0, 1], ["shirt", "jeans"], headline="text")
    >>> path.name
    'report.md'
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    classes = list(classes)
    y = _indices_or_labels(y_true, classes)
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
    per_class = per_class_report(y, probas[headline], classes, train_counts)
    for name in names:
        per_class[f"f1[{name}]"] = _per_class_f1(y, probas[name], len(classes))[_class_positions(per_class, classes)]
    _atomic_write_text(run_dir / "per_class_f1.csv", per_class.to_csv(index=False))

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
    path = run_dir / "report.md"
    _atomic_write_text(path, text)
    return path


def _per_class_f1(y: np.ndarray, proba: np.ndarray, n_classes: int) -> np.ndarray:
    return f1_per_class(*class_counts(y, row_argmax(proba), n_classes))


def _class_positions(per_class: pd.DataFrame, classes: Sequence[Any]) -> np.ndarray:
    position = {label: i for i, label in enumerate(classes)}
    return np.array([position[c] for c in per_class["class"]], dtype=np.int64)


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

def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    from stackcat.runs import atomic_path

    with atomic_path(path) as temp:
        write(str(temp))


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda temp: Path(temp).write_text(text, encoding="utf-8"))


def _atomic_save_figure(figure: Any, path: Path) -> None:
    _atomic_write(path, lambda temp: figure.savefig(temp, format="png", dpi=110))
