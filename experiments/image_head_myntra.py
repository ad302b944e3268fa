"""The image member's head on the Myntra image subset: L-BFGS logistic regression vs the torch head, flip averaging on/off.

    python experiments/image_head_myntra.py --cache-dir artifacts/image_encoder_cache \\
        --configs torch,torch+flip,logistic,logistic+flip

Every photo of the image subset (9,583 products, 75 classes) is embedded once by
EfficientNet-Lite0 (onnxruntime, cached in --cache-dir; with flip averaging also
its mirror image, cached under the encoder's name + "+hflip"). Each config is
ImageEmbeddingClassifier(head=..., flip_average=...) scored out of fold on
StratifiedKFold(5, shuffle=True, random_state=42), the folds of
experiments/myntra_stack.py and experiments/image_encoders_myntra.py. The
embeddings are encoded before the clock starts, so head seconds are the heads'
(plus reading the cache). Prints and writes (--results, JSON) errors, weighted
and macro F1, head wall and CPU seconds per config.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from image_encoders_myntra import image_subset
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedKFold

from stackcat.features.image_encoders import MirroredEncoder, get_encoder
from stackcat.features.images import image_embeddings
from stackcat.models.image import ImageEmbeddingClassifier


def score_config(frame: pd.DataFrame, config: str, encoder: str, cache_dir: Path, folds: int,
                 n_threads: int) -> dict:
    head, _, flip = config.partition("+")
    flip_average = flip == "flip"
    encoders = [get_encoder(encoder)] + ([MirroredEncoder(get_encoder(encoder))] if flip_average else [])
    for each in encoders:  # fill the cache outside the timed part
        image_embeddings(frame["image_path"].tolist(), each, cache_dir=cache_dir, progress=False)
    y = frame["articleType"].to_numpy(dtype=object)
    predicted = np.empty(len(y), dtype=object)
    start, cpu = time.perf_counter(), time.process_time()
    epochs = []
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=42).split(np.zeros(len(y)), y):
        model = ImageEmbeddingClassifier(encoder=encoder, image_cache_dir=cache_dir, head=head,
                                         flip_average=flip_average, n_threads=n_threads, progress=False)
        model.fit(frame.iloc[train], y[train])
        predicted[test] = model.predict(frame.iloc[test])
        epochs.append(int(getattr(model.head_, "n_epochs_", getattr(model.head_, "n_iter_", [0])[0])))
    return {"config": config, "encoder": encoder, "rows": len(y), "errors": int((predicted != y).sum()),
            "error_rate": round(float((predicted != y).mean()), 4),
            "weighted_f1": round(float(f1_score(y, predicted, average="weighted")), 4),
            "macro_f1": round(float(f1_score(y, predicted, average="macro")), 4),
            "head_seconds": round(time.perf_counter() - start, 1),
            "head_cpu_seconds": round(time.process_time() - cpu, 1),
            "epochs_or_iterations_per_fold": epochs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/myntra"))
    parser.add_argument("--encoder", default="efficientnet-lite0")
    parser.add_argument("--configs", default="torch,torch+flip,logistic,logistic+flip")
    parser.add_argument("--cache-dir", type=Path, default=Path("artifacts/image_encoder_cache"))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--n-threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=Path("experiments/results/image_head_myntra.json"))
    args = parser.parse_args()
    frame = image_subset(args.data)
    rows = []
    for config in args.configs.split(","):
        rows.append(score_config(frame, config, args.encoder, args.cache_dir, args.folds, args.n_threads))
        print(json.dumps(rows[-1]), flush=True)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(rows, indent=2) + "\n")
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
