"""Which linear head for TfidfClassifier: solvers timed on Myntra folds (all 44,446 rows).

Text = productDisplayName + attributes (gender, baseColour, season, usage), target
articleType, folds StratifiedKFold(5, shuffle=True, random_state=42), as in
fasttext_myntra.py. The TF-IDF features (TfidfClassifier's own: word 1-2-grams +
char_wb 2-5-grams, sublinear tf, min_df 2) are built once per fold; each head is
timed on them alone (feature time is reported apart).

    nice -n 5 python experiments/lexical_solvers.py --folds 1 \
        --heads saga lbfgs sgd svc_calibrated svc --out experiments/results/lexical_solvers.json

``--shipped`` instead runs TfidfClassifier() as shipped (features included) on all 5
folds and scores its out-of-fold predictions.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.metrics import accuracy_score, f1_score, log_loss
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import LinearSVC

from stackcat.data import TableSpec, prepare_table, read_table
from stackcat.models.lexical import TfidfClassifier, tfidf_features

SPEC = TableSpec(text_columns=["productDisplayName"], attribute_columns=["gender", "baseColour", "season", "usage"],
                 target="articleType", id_column="id")


def head(name: str, C: float, max_iter: int, tol: float = 1e-3, class_weight: str | None = None):
    """The classifier for ``name``; ``C`` and ``max_iter`` apply to the logistic regressions."""
    if name in ("saga", "lbfgs", "sag"):
        return LogisticRegression(C=C, solver=name, max_iter=max_iter, tol=tol, class_weight=class_weight,
                                  random_state=0)
    if name == "sgd":  # one-vs-rest log loss; probabilities are the normalized per-class sigmoids
        return SGDClassifier(loss="log_loss", alpha=1e-6, max_iter=max_iter, tol=1e-4, random_state=0)
    if name == "svc_calibrated":
        return CalibratedClassifierCV(LinearSVC(C=0.5), method="sigmoid", cv=3)
    if name == "svc":
        return LinearSVC(C=0.5)
    raise ValueError(name)


def expected_calibration_error(proba: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE: |accuracy - confidence| averaged over equal-width confidence bins."""
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y
    edges = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        rows = edges == b
        if rows.any():
            total += rows.sum() * abs(correct[rows].mean() - confidence[rows].mean())
    return total / len(y)


def score_head(name: str, C: float, max_iter: int, tol: float, X_train, y_train, X_test, y_test,
               n_classes: int, class_weight: str | None = None) -> dict:
    model = head(name, C, max_iter, tol, class_weight)
    start = time.process_time()
    wall = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        try:
            model.fit(X_train, y_train)
        except ValueError as exc:  # CalibratedClassifierCV: a class with fewer rows than its folds
            return {"head": name, "error": str(exc)}
    row = {"head": name, "C": C if name in ("saga", "lbfgs", "sag") else None, "max_iter": max_iter,
           "tol": tol if name in ("saga", "lbfgs", "sag") else None,
           "class_weight": class_weight if name in ("saga", "lbfgs", "sag") else None,
           "fit_cpu_s": round(time.process_time() - start, 1), "fit_wall_s": round(time.perf_counter() - wall, 1)}
    predicted = model.predict(X_test)
    row.update(weighted_f1=round(f1_score(y_test, predicted, average="weighted"), 4),
               macro_f1=round(f1_score(y_test, predicted, average="macro"), 4),
               accuracy=round(accuracy_score(y_test, predicted), 4))
    if hasattr(model, "predict_proba"):
        proba = np.zeros((len(y_test), n_classes))
        proba[:, model.classes_] = model.predict_proba(X_test)
        proba = np.clip(proba, 1e-15, None)
        proba /= proba.sum(axis=1, keepdims=True)
        row.update(log_loss=round(log_loss(y_test, proba, labels=range(n_classes)), 4),
                   ece=round(expected_calibration_error(proba, y_test), 4))
    if hasattr(model, "n_iter_"):
        row["n_iter"] = int(np.max(model.n_iter_))
    return row


def shipped_oof(texts: np.ndarray, y: np.ndarray, folds, n_classes: int) -> dict:
    """TfidfClassifier() end to end on every fold: OOF scores and CPU/wall time (fit + predict)."""
    proba = np.zeros((len(y), n_classes))
    cpu, wall = time.process_time(), time.perf_counter()
    for train, test in folds:
        model = TfidfClassifier().fit(texts[train].tolist(), y[train])
        proba[np.ix_(test, model.classes_)] = model.predict_proba(texts[test].tolist())
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    predicted = proba.argmax(axis=1)
    return {"model": "TfidfClassifier()", "folds": len(folds), "cpu_s": round(cpu, 1), "wall_s": round(wall, 1),
            "weighted_f1": round(f1_score(y, predicted, average="weighted"), 4),
            "macro_f1": round(f1_score(y, predicted, average="macro"), 4),
            "accuracy": round(accuracy_score(y, predicted), 4),
            "log_loss": round(log_loss(y, np.clip(proba, 1e-15, 1), labels=range(n_classes)), 4),
            "ece": round(expected_calibration_error(proba, y), 4)}


def sweep(texts: np.ndarray, y: np.ndarray, folds, args: argparse.Namespace, n_classes: int) -> list[dict]:
    """Features once per fold, then every head of ``args.heads`` on them."""
    rows = []
    for fold, (train, test) in enumerate(folds):
        start = time.process_time()
        features = tfidf_features()
        X_train = features.fit_transform(texts[train].tolist())
        X_test = features.transform(texts[test].tolist())
        feature_cpu = round(time.process_time() - start, 1)
        print(f"fold {fold}: {X_train.shape[1]} features, nnz/row {X_train.nnz / X_train.shape[0]:.0f}, "
              f"{feature_cpu} s CPU", flush=True)
        for name in args.heads:
            for C in (args.C if name in ("saga", "lbfgs", "sag") else [None]):
                for max_iter in (args.max_iter if name in ("saga", "lbfgs", "sag", "sgd") else [None]):
                    row = score_head(name, C, max_iter, args.tol, X_train, y[train], X_test, y[test], n_classes,
                                     args.class_weight)
                    rows.append({"fold": fold, "feature_cpu_s": feature_cpu, **row})
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/myntra/styles_merged.csv"))
    parser.add_argument("--folds", type=int, default=1, help="how many of the 5 folds to run")
    parser.add_argument("--heads", nargs="+", default=["saga", "lbfgs", "sgd", "svc_calibrated", "svc"])
    parser.add_argument("--C", type=float, nargs="+", default=[20.0], help="C values of the logistic regressions")
    parser.add_argument("--max-iter", type=int, nargs="+", default=[30])
    parser.add_argument("--tol", type=float, default=1e-3, help="tol of the logistic regressions")
    parser.add_argument("--class-weight", choices=["balanced"], help="class_weight of the logistic regressions")
    parser.add_argument("--shipped", action="store_true", help="TfidfClassifier() on all 5 folds, OOF scores")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    frame = prepare_table(read_table(args.data), SPEC).frame
    texts = frame["text"].to_numpy(dtype=object)
    classes, y = np.unique(frame["label"].to_numpy(dtype=object), return_inverse=True)
    print(f"{len(y)} rows, {len(classes)} classes", flush=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")
        folds = list(StratifiedKFold(5, shuffle=True, random_state=42).split(texts, y))
    if args.shipped:
        rows = [shipped_oof(texts, y, folds, len(classes))]
        print(json.dumps(rows[0]), flush=True)
    else:
        rows = sweep(texts, y, folds[:args.folds], args, len(classes))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
