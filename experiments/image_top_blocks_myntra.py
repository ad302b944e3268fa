"""The image member with its encoder's top blocks tuned on cached feature maps, on the Myntra image subset.

    nice -n 19 python experiments/image_top_blocks_myntra.py --data ../shared/data/myntra \\
        --cache-dir artifacts/image_top_blocks_cache --configs lite0-frozen,lite0-top1,lite0-top2 --folds 5

Each config is an ``ImageEmbeddingClassifier`` on the 9,583 photos of the image subset
(75 classes), scored on the folds of experiments/image_head_myntra.py
(StratifiedKFold(5, shuffle=True, random_state=42)); ``--folds N`` runs only the first
N of those 5 folds. Configs: ``<encoder>-frozen`` (the L-BFGS logistic head on frozen
embeddings, today's default) and ``<encoder>-top<k>`` (``tune_top_blocks=k``), with
encoder ``lite0`` or ``lite2``. Every tuned model is scored twice on its test fold,
without and with flip averaging (``flip_average`` changes only prediction there).

The encoder's outputs (embeddings, or the feature maps of every photo and its mirror
image) are computed once into ``--cache-dir`` before the clock of the folds starts;
that caching is timed separately (wall and CPU seconds, for all photos). Per fold:
training wall and CPU seconds, the epochs run, the epoch kept and its train and
held-out losses. Results go to ``--results`` (JSON) after every fold.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from image_encoders_myntra import image_subset
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedKFold

from stackcat.models.image import ImageEmbeddingClassifier

ENCODERS = {"lite0": "efficientnet-lite0", "lite2": "efficientnet-lite2"}


def parse_config(config: str) -> tuple[str, int]:
    """``"lite0-top2"`` -> ``("efficientnet-lite0", 2)``; ``"lite0-frozen"`` -> ``(..., 0)``."""
    encoder, _, mode = config.partition("-")
    if encoder not in ENCODERS or not (mode == "frozen" or mode.startswith("top") and mode[3:].isdigit()):
        raise SystemExit(f"config {config!r}: expected <lite0|lite2>-frozen or <lite0|lite2>-top<k>")
    return ENCODERS[encoder], 0 if mode == "frozen" else int(mode[3:])


def model_for(encoder: str, k: int, args: argparse.Namespace) -> ImageEmbeddingClassifier:
    return ImageEmbeddingClassifier(encoder=encoder, image_cache_dir=args.cache_dir, tune_top_blocks=k,
                                    tune_epochs=args.epochs, tune_lr=args.lr, tune_head_lr=args.head_lr,
                                    n_threads=args.n_threads, progress=False)


def fill_cache(frame: pd.DataFrame, encoder: str, k: int, args: argparse.Namespace) -> dict:
    start, cpu = time.perf_counter(), time.process_time()
    model_for(encoder, k, args).warm_cache(frame)
    return {"cache_wall_s": round(time.perf_counter() - start, 1),
            "cache_cpu_s": round(time.process_time() - cpu, 1)}


def scores(y: np.ndarray, predicted: np.ndarray) -> dict:
    return {"errors": int((predicted != y).sum()), "error_rate": round(float((predicted != y).mean()), 4),
            "macro_f1": round(float(f1_score(y, predicted, average="macro")), 4),
            "weighted_f1": round(float(f1_score(y, predicted, average="weighted")), 4)}


def run_config(frame: pd.DataFrame, config: str, args: argparse.Namespace, on_fold) -> dict:
    encoder, k = parse_config(config)
    row = {"config": config, "encoder": encoder, "tune_top_blocks": k, "epochs": args.epochs, "lr": args.lr,
           "head_lr": args.head_lr, **fill_cache(frame, encoder, k, args), "folds": []}
    y = frame["articleType"].to_numpy(dtype=object)
    splitter = StratifiedKFold(5, shuffle=True, random_state=42)
    tested = []
    views = ["plain", "flip_average"] if k else ["plain"]
    predicted = {view: np.empty(len(y), dtype=object) for view in views}
    for fold, (train, test) in enumerate(splitter.split(np.zeros(len(y)), y)):
        if fold >= args.folds:
            break
        model = model_for(encoder, k, args)
        start, cpu = time.perf_counter(), time.process_time()
        model.fit(frame.iloc[train], y[train])
        record = {"fold": fold, "train_wall_s": round(time.perf_counter() - start, 1),
                  "train_cpu_s": round(time.process_time() - cpu, 1), "load": os.getloadavg()[0]}
        for view in views:
            model.set_params(flip_average=view == "flip_average")  # changes only prediction once fitted
            predicted[view][test] = model.predict(frame.iloc[test])
            record[view] = scores(y[test], predicted[view][test])
        if k:
            record["history"] = model.history_
            record["best_epoch"] = model.best_epoch_
        tested.append(test)
        row["folds"].append(record)
        rows = np.concatenate(tested)
        row.update({view: {"rows": len(rows), **scores(y[rows], predicted[view][rows])} for view in views})
        row["folds_run"] = len(tested)
        on_fold(row)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/myntra"))
    parser.add_argument("--configs", default="lite0-frozen,lite0-top1,lite0-top2")
    parser.add_argument("--cache-dir", type=Path, default=Path("artifacts/image_top_blocks_cache"))
    parser.add_argument("--folds", type=int, default=5, help="run the first N of the 5 folds")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--head-lr", type=float, default=3e-3)
    parser.add_argument("--n-threads", type=int, default=-1)
    parser.add_argument("--results", type=Path, default=Path("experiments/results/image_top_blocks_myntra.json"))
    args = parser.parse_args()
    frame = image_subset(args.data)
    done: list[dict] = []

    def save(current: dict) -> None:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps([*done, current], indent=2) + "\n")
        summary = {view: current[view] for view in ("plain", "flip_average") if view in current}
        print(json.dumps({"config": current["config"], "folds_run": current["folds_run"], **summary,
                          "last_fold": {k: v for k, v in current["folds"][-1].items() if k != "history"}}),
              flush=True)

    for config in args.configs.split(","):
        done.append(run_config(frame, config, args, save))


if __name__ == "__main__":
    main()
