"""FastText on all 44,446 Myntra products: 5-fold OOF of the wrapper against plain baselines.

Text = productDisplayName + attributes (gender, baseColour, season, usage), target
articleType, folds StratifiedKFold(5, shuffle=True, random_state=42).

    python experiments/fasttext_myntra.py --data ../shared/data/myntra/styles_merged.csv \
        --configs wrapper plain tfidf_svc --out experiments/results/fasttext_myntra.json
"""

from __future__ import annotations

import argparse
import json
import resource
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import StratifiedKFold

from stackcat.data import TableSpec, prepare_table, read_table
from stackcat.models.fasttext import FastTextClassifier

SPEC = TableSpec(text_columns=["productDisplayName"], attribute_columns=["gender", "baseColour", "season", "usage"],
                 target="articleType", id_column="id")

CONFIGS = {
    # the wrapper as shipped (its defaults)
    "wrapper": lambda: FastTextClassifier(),
    # plain fastText as in the issue: epoch 25, lr 0.5, wordNgrams 2, char n-grams 2-5, dim 100, no up-weighting
    "plain": lambda: FastTextClassifier(epoch=25, lr=0.5, wordNgrams=2, minn=2, maxn=5, dim=100,
                                        title_repeat=0, bucket=2_000_000),
    "wrapper_bucket2m": lambda: FastTextClassifier(bucket=2_000_000),
    "wrapper_no_title": lambda: FastTextClassifier(title_repeat=0),
    "wrapper_lower": lambda: FastTextClassifier(lowercase=True),
}


def tfidf_svc():
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import LinearSVC

    return make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), LinearSVC())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_config(name: str, frame, y: np.ndarray, folds) -> dict:
    predicted = np.empty(len(y), dtype=object)
    fit_seconds = predict_seconds = 0.0
    for train, test in folds:
        if name == "tfidf_svc":
            model, X_train, X_test = tfidf_svc(), frame["text"].to_numpy()[train], frame["text"].to_numpy()[test]
        else:
            model, X_train, X_test = CONFIGS[name](), frame.iloc[train], frame.iloc[test]
        start = time.perf_counter()
        model.fit(X_train, y[train])
        fit_seconds += time.perf_counter() - start
        start = time.perf_counter()
        predicted[test] = model.predict(X_test)
        predict_seconds += time.perf_counter() - start
    return {
        "config": name,
        "weighted_f1": round(f1_score(y, predicted, average="weighted"), 4),
        "macro_f1": round(f1_score(y, predicted, average="macro"), 4),
        "accuracy": round(accuracy_score(y, predicted), 4),
        "fit_seconds_5_folds": round(fit_seconds, 1),
        "predict_rows_per_s": round(len(y) / predict_seconds),
        "peak_rss_mb": round(peak_rss_mb()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/myntra/styles_merged.csv"))
    parser.add_argument("--configs", nargs="+", default=["wrapper", "plain", "tfidf_svc"],
                        choices=[*CONFIGS, "tfidf_svc"])
    parser.add_argument("--reference-text", action="store_true",
                        help="the reference work's text: attribute values without their keys, lower-cased")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    spec = replace(SPEC, attribute_keys=False, lowercase=True) if args.reference_text else SPEC
    prepared = prepare_table(read_table(args.data), spec)
    print(prepared.summary().splitlines()[0])
    frame = prepared.frame
    y = frame["label"].to_numpy(dtype=object)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")
        folds = list(StratifiedKFold(5, shuffle=True, random_state=42).split(frame, y))
    rows = []
    for name in args.configs:
        rows.append({**run_config(name, frame, y, folds), "reference_text": args.reference_text})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
