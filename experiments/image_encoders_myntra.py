"""Frozen image encoders on the Myntra image subset: EfficientNet-Lite0 vs -Lite2 under the image head.

    python experiments/image_encoders_myntra.py --encoders efficientnet-lite0,efficientnet-lite2

For each encoder: every photo of the image subset (9,583 products, 75 classes) is
encoded once (onnxruntime on the CPU, cached in --cache-dir), then
ImageEmbeddingClassifier (its default logistic head) is scored out of fold on
StratifiedKFold(5, shuffle=True, random_state=42), the folds of
experiments/myntra_stack.py. Prints encode rate, head time and the image member's
errors, weighted and macro F1; writes them to --results as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedKFold

from stackcat.features.images import image_embeddings
from stackcat.models.image import ImageEmbeddingClassifier


def image_subset(data_dir: Path) -> pd.DataFrame:
    raw = pd.read_csv(data_dir / "styles_merged.csv", usecols=["id", "articleType"])
    raw["image_path"] = [str(data_dir / "images_224" / f"{i}.jpg") for i in raw["id"]]
    has_image = np.array([os.path.exists(p) for p in raw["image_path"]])
    return raw[has_image].reset_index(drop=True)


def score_encoder(frame: pd.DataFrame, encoder: str, cache_dir: Path, folds: int) -> dict:
    start = time.perf_counter()
    cpu = time.process_time()
    image_embeddings(frame["image_path"].tolist(), encoder, cache_dir=cache_dir, progress=False)
    encode_seconds, encode_cpu = time.perf_counter() - start, time.process_time() - cpu
    y = frame["articleType"].to_numpy(dtype=object)
    predicted = np.empty(len(y), dtype=object)
    start = time.perf_counter()
    splitter = StratifiedKFold(folds, shuffle=True, random_state=42)
    for train, test in splitter.split(np.zeros(len(y)), y):
        head = ImageEmbeddingClassifier(encoder=encoder, image_cache_dir=cache_dir, progress=False)
        head.fit(frame.iloc[train], y[train])
        predicted[test] = head.predict(frame.iloc[test])
    return {"encoder": encoder, "rows": len(y), "errors": int((predicted != y).sum()),
            "error_rate": float((predicted != y).mean()),
            "weighted_f1": float(f1_score(y, predicted, average="weighted")),
            "macro_f1": float(f1_score(y, predicted, average="macro")),
            "encode_seconds": round(encode_seconds, 1), "encode_cpu_seconds": round(encode_cpu, 1),
            "head_seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/myntra"))
    parser.add_argument("--encoders", default="efficientnet-lite0,efficientnet-lite2")
    parser.add_argument("--cache-dir", type=Path, default=Path("artifacts/image_encoder_cache"))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--results", type=Path, default=Path("experiments/results/image_encoders_myntra.json"))
    args = parser.parse_args()
    frame = image_subset(args.data)
    rows = []
    for encoder in args.encoders.split(","):
        rows.append(score_encoder(frame, encoder, args.cache_dir, args.folds))
        print(json.dumps(rows[-1]), flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(rows, indent=2) + "\n")
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
