"""An honest measure of the suspected-label-error list: inject label noise into Myntra, see what is found.

    PYTHONPATH=$PWD python experiments/label_noise.py --subset images
    PYTHONPATH=$PWD python experiments/label_noise.py --subset all --rows 20000

Data: Myntra (``--data``), target articleType, text = productDisplayName + gender,
baseColour, season, usage (as in experiments/myntra_stack.py). A stratified 20%
of the rows is a clean held-out test split; the noise goes into the other 80%:

* ``uniform``: 5% of the training labels flipped to another class drawn uniformly;
* ``confusable``: 5% flipped to each product's most confusable class, its likeliest
  non-true class under the stack's out-of-fold probabilities on the clean labels
  (the hard case: a mistake the models themselves would make).

The stack (the cheapest honest one: members ``lexical`` TF-IDF + ``fasttext`` with
few epochs, ``meta="average"``, 5 folds) is fitted on the noisy labels; its
out-of-fold probabilities rank the rows (:func:`stackcat.label_issues.rank_label_issues`).
Reported: precision and recall of the flagged rows (the default cut) against the
rows truly flipped, precision in the top 1/2/5% of the ranking, the same from the
lexical member's OOF alone, and ``cleanlab.filter.find_label_issues`` on the same
probabilities (its default ``prune_by_noise_rate`` and ``confident_learning``).
Then the members are refitted on all training rows with the noisy labels, with the
flagged rows dropped, and with them relabelled to the suggested class; their plain
average is scored against the clean test labels (and the clean-label refit is the
ceiling). Last, the time of ``rank_label_issues`` and ``lookalike_categories`` on a random
44,446 x 143 probability matrix.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import clone
from sklearn.model_selection import StratifiedKFold

from stackcat.data import TableSpec, prepare_table, read_table
from stackcat.label_issues import rank_label_issues, stack_probabilities
from stackcat.lookalikes import lookalike_categories
from stackcat.models.fasttext import FastTextClassifier
from stackcat.models.lexical import TfidfClassifier
from stackcat.stacking import StackingCategorizer, predict_aligned

SPEC = TableSpec(text_columns=["productDisplayName"], attribute_columns=["gender", "baseColour", "season", "usage"],
                 target="articleType", id_column="id", attribute_keys=False, lowercase=True)
NOISE_RATE = 0.05
TOP_SHARES = (0.01, 0.02, 0.05)


def members(epochs: int) -> list[tuple[str, object]]:
    return [("lexical", TfidfClassifier(random_state=0)),
            ("fasttext", FastTextClassifier(epoch=epochs, n_threads=2, random_state=0))]


def load(data_dir: Path, subset: str, rows: int | None, seed: int) -> pd.DataFrame:
    raw = read_table(data_dir / "styles_merged.csv")
    if subset == "images":
        has_image = raw["id"].map(lambda i: (data_dir / "images_224" / f"{i}.jpg").exists())
        raw = raw[has_image.to_numpy(dtype=bool)].reset_index(drop=True)
    frame = prepare_table(raw, SPEC).frame.reset_index(drop=True)
    if rows and rows < len(frame):
        frame = frame.sample(n=rows, random_state=seed).reset_index(drop=True)
    return frame


def split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified 80/20 (classes with one row stay in training)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # classes with fewer than 5 rows
        train, test = next(StratifiedKFold(5, shuffle=True, random_state=seed).split(labels, labels))
    counts = pd.Series(labels).value_counts()
    alone = np.isin(labels[test], counts[counts < 2].index)
    return np.sort(np.concatenate([train, test[alone]])), test[~alone]


def fit_stack(frame: pd.DataFrame, labels: np.ndarray, epochs: int) -> StackingCategorizer:
    stack = StackingCategorizer(members(epochs), meta="average", n_splits=5, random_state=0,
                                progress=False, verbose=0, retrieval=False, category_names=None)
    return stack.fit(frame, labels)


def inject(labels: np.ndarray, kind: str, rng: np.random.Generator, classes: np.ndarray,
           clean_proba: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Noisy labels and the mask of flipped rows."""
    n_flip = round(NOISE_RATE * len(labels))
    flipped = np.zeros(len(labels), dtype=bool)
    flipped[rng.choice(len(labels), n_flip, replace=False)] = True
    noisy = labels.copy()
    position = {c: i for i, c in enumerate(classes)}
    for row in np.flatnonzero(flipped):
        true = position[labels[row]]
        if kind == "uniform":
            other = rng.integers(len(classes) - 1)
            noisy[row] = classes[other + (other >= true)]
        else:
            scores = np.asarray(clean_proba[row], dtype=np.float64).copy()
            scores[true] = -1.0
            noisy[row] = classes[int(scores.argmax())]
    return noisy, flipped


def precision_recall(selected: np.ndarray, flipped: np.ndarray) -> dict[str, float]:
    hits = int((selected & flipped).sum())
    return {"flagged": int(selected.sum()), "precision": hits / max(int(selected.sum()), 1),
            "recall": hits / max(int(flipped.sum()), 1)}


def precision_at(order: np.ndarray, flipped: np.ndarray) -> dict[str, float]:
    return {f"precision_top_{share:.0%}": float(flipped[order[: max(1, round(share * len(order)))]].mean())
            for share in TOP_SHARES}


def scores_of(proba: object, y_index: np.ndarray, flipped: np.ndarray) -> dict[str, object]:
    start = time.perf_counter()
    ranking = rank_label_issues(proba, y_index)
    seconds = time.perf_counter() - start
    flagged = np.zeros(len(y_index), dtype=bool)
    flagged[ranking.loc[ranking["flagged"], "row"].to_numpy()] = True
    by_self_confidence = np.argsort(ranking.sort_values("row")["given_probability"].to_numpy(), kind="stable")
    return {"cut": precision_recall(flagged, flipped), "margin": precision_at(ranking["row"].to_numpy(), flipped),
            "self_confidence": precision_at(by_self_confidence, flipped), "seconds": seconds,
            "_ranking": ranking}


def cleanlab_scores(proba: np.ndarray, y_index: np.ndarray, flipped: np.ndarray) -> dict[str, object]:
    from cleanlab.filter import find_label_issues

    out = {}
    proba = np.asarray(proba, dtype=np.float64)
    proba = proba / proba.sum(axis=1, keepdims=True)
    for filter_by in ("prune_by_noise_rate", "confident_learning"):
        start = time.perf_counter()
        mask = find_label_issues(y_index, proba, filter_by=filter_by, n_jobs=1)
        out[filter_by] = {**precision_recall(mask, flipped), "seconds": time.perf_counter() - start}
    return out


def refit_accuracy(frame: pd.DataFrame, labels: np.ndarray, test: pd.DataFrame, test_labels: np.ndarray,
                   epochs: int) -> float:
    """Members fitted on all given rows, their plain average scored against the clean test labels."""
    classes = np.unique(labels)
    probas = [predict_aligned(clone(model).fit(frame, labels), test, classes) for _, model in members(epochs)]
    predicted = classes[np.mean(probas, axis=0).argmax(axis=1)]
    return float((predicted == test_labels).mean())


def top_cleaning(ranking: pd.DataFrame, classes: np.ndarray, train: pd.DataFrame, noisy: np.ndarray,
                 test: pd.DataFrame, y_test: np.ndarray, epochs: int) -> dict[str, float]:
    """Refit accuracy after dropping or relabelling the top 1/2/5% of the ranking (flagged or not)."""
    out = {}
    for share in TOP_SHARES:
        top = ranking.head(round(share * len(ranking)))
        keep = np.ones(len(train), dtype=bool)
        keep[top["row"].to_numpy()] = False
        relabelled = noisy.copy()
        relabelled[top["row"].to_numpy()] = classes[top["suggested"].to_numpy()]
        out[f"dropped_top_{share:.0%}"] = refit_accuracy(train[keep].reset_index(drop=True), noisy[keep], test,
                                                         y_test, epochs)
        out[f"relabelled_top_{share:.0%}"] = refit_accuracy(train, relabelled, test, y_test, epochs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/myntra"))
    parser.add_argument("--subset", choices=["images", "all"], default="images")
    parser.add_argument("--rows", type=int, default=None, help="a random sample of N rows")
    parser.add_argument("--epochs", type=int, default=10, help="fastText epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", default="uniform,confusable")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--clean-top", action="store_true",
                        help="also refit after dropping / relabelling the top 1/2/5%% of the ranking")
    args = parser.parse_args()
    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    frame = load(args.data, args.subset, args.rows, args.seed)
    labels = frame["label"].to_numpy(dtype=object)
    train_rows, test_rows = split(labels, args.seed)
    train, test = frame.iloc[train_rows].reset_index(drop=True), frame.iloc[test_rows].reset_index(drop=True)
    y_clean, y_test = labels[train_rows], labels[test_rows]
    print(f"{len(frame):,} rows ({args.subset}), {len(np.unique(labels))} classes; "
          f"train {len(train):,}, clean test {len(test):,}", flush=True)
    results: dict[str, object] = {"subset": args.subset, "rows": len(frame), "train": len(train), "test": len(test),
                                  "stack": f"lexical + fasttext (epoch={args.epochs}), meta=average, 5 folds"}
    clean_stack = fit_stack(train, y_clean, args.epochs)
    _, clean_proba = stack_probabilities(clean_stack)
    results["clean_refit_accuracy"] = refit_accuracy(train, y_clean, test, y_test, args.epochs)
    clean_errors = int((clean_stack.classes_[np.asarray(clean_proba).argmax(axis=1)] != y_clean).sum())
    results["clean_oof_errors"] = clean_errors
    clean_ranking = rank_label_issues(clean_proba, clean_stack.oof_target_)
    suspects = np.zeros(len(train), dtype=bool)  # flagged before any noise: the catalogue's own suspects
    suspects[clean_ranking.loc[clean_ranking["flagged"], "row"].to_numpy()] = True
    results["clean_flagged"] = int(suspects.sum())
    print(f"clean labels: OOF errors {clean_errors}, refit test accuracy {results['clean_refit_accuracy']:.4f} "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    for kind in args.noise.split(","):
        noisy, flipped = inject(y_clean, kind, rng, clean_stack.classes_, clean_proba)
        stack = fit_stack(train, noisy, args.epochs)
        y_index = stack.oof_target_
        source, proba = stack_probabilities(stack)
        stack_scores = scores_of(proba, y_index, flipped)
        lexical_scores = scores_of(stack.oof_["lexical"], y_index, flipped)
        ranking = stack_scores.pop("_ranking")
        lexical_scores.pop("_ranking")
        flagged_rows = ranking.loc[ranking["flagged"], "row"].to_numpy()
        keep = np.ones(len(train), dtype=bool)
        keep[flagged_rows] = False
        relabelled = noisy.copy()
        relabelled[flagged_rows] = stack.classes_[ranking.loc[ranking["flagged"], "suggested"].to_numpy()]
        false_positives = np.zeros(len(train), dtype=bool)
        false_positives[flagged_rows] = True
        false_positives &= ~flipped
        entry = {
            "flipped": int(flipped.sum()), "source": source, "stack": stack_scores, "lexical": lexical_scores,
            "false_positives": int(false_positives.sum()),
            "false_positives_flagged_on_clean_labels": int((false_positives & suspects).sum()),
            "cleanlab_stack": cleanlab_scores(proba, y_index, flipped),
            "relabelled_correctly": float((relabelled[flagged_rows] == y_clean[flagged_rows])[
                flipped[flagged_rows]].mean()) if flipped[flagged_rows].any() else 0.0,
            "accuracy_noisy": refit_accuracy(train, noisy, test, y_test, args.epochs),
            "accuracy_dropped": refit_accuracy(train[keep].reset_index(drop=True), noisy[keep], test, y_test,
                                               args.epochs),
            "accuracy_relabelled": refit_accuracy(train, relabelled, test, y_test, args.epochs),
        }
        if args.clean_top:
            entry["accuracy_top"] = top_cleaning(ranking, stack.classes_, train, noisy, test, y_test, args.epochs)
        cost = results["clean_refit_accuracy"] - entry["accuracy_noisy"]
        for way in ("dropped", "relabelled"):
            entry[f"recovered_{way}"] = ((entry[f"accuracy_{way}"] - entry["accuracy_noisy"]) / cost
                                         if cost > 0 else float("nan"))
        results[kind] = entry
        print(f"{kind}: {json.dumps(entry, indent=1)} ({time.perf_counter() - started:.0f} s)", flush=True)
    timing = np.random.default_rng(1).dirichlet(np.full(143, 0.05), size=44_446).astype(np.float32)
    timing_labels = np.random.default_rng(2).integers(0, 143, 44_446)
    start = time.perf_counter()
    rank_label_issues(timing, timing_labels)
    results["rank_seconds_44446x143"] = time.perf_counter() - start
    start = time.perf_counter()
    lookalike_categories(timing, timing_labels, [f"category {c}" for c in range(143)])
    results["lookalikes_seconds_44446x143"] = time.perf_counter() - start
    results["total_seconds"] = time.perf_counter() - started
    print(f"rank_label_issues on 44,446 x 143: {results['rank_seconds_44446x143']:.2f} s, lookalike_categories "
          f"{results['lookalikes_seconds_44446x143']:.2f} s; "
          f"total {results['total_seconds']:.0f} s", flush=True)
    out = args.out or Path(f"experiments/results/label_noise_{args.subset}{'_' + str(args.rows) if args.rows else ''}.json")
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
