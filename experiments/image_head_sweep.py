"""A small sweep of TorchHeadClassifier's params on the Myntra image subset's cached EfficientNet-Lite0 embeddings.

    python experiments/image_head_sweep.py --cache-dir artifacts/image_encoder_cache \\
        '{"learning_rate": 1e-3, "patience": 10, "max_epochs": 200}' '{"batch_size": 512}'

Each argument is a JSON dict of TorchHeadClassifier params (the rest at their
defaults, n_threads=1). The embeddings (and with --flip-average those of the
mirror images) must be in --cache-dir already (experiments/image_head_myntra.py
fills it); they are l2-normalized as ImageEmbeddingClassifier does, then each
param set is scored out of fold on StratifiedKFold(5, shuffle=True,
random_state=42). Prints errors, CPU seconds and epochs per fold.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from image_encoders_myntra import image_subset
from sklearn.model_selection import StratifiedKFold

from stackcat.features.image_encoders import MirroredEncoder, get_encoder
from stackcat.features.images import image_embeddings
from stackcat.models.heads import TorchHeadClassifier


def cached_features(paths: list[str], encoder: str, cache_dir: Path, flip_average: bool) -> np.ndarray:
    encoders = [get_encoder(encoder)] + ([MirroredEncoder(get_encoder(encoder))] if flip_average else [])
    vectors = np.mean([image_embeddings(paths, each, cache_dir=cache_dir, progress=False).embeddings
                       for each in encoders], axis=0)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("params", nargs="+", type=json.loads)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/myntra"))
    parser.add_argument("--encoder", default="efficientnet-lite0")
    parser.add_argument("--cache-dir", type=Path, default=Path("artifacts/image_encoder_cache"))
    parser.add_argument("--flip-average", action="store_true")
    args = parser.parse_args()
    frame = image_subset(args.data)
    X = cached_features(frame["image_path"].tolist(), args.encoder, args.cache_dir, args.flip_average)
    y = frame["articleType"].to_numpy(dtype=object)
    folds = list(StratifiedKFold(5, shuffle=True, random_state=42).split(X, y))
    for params in args.params:
        cpu, predicted, epochs = time.process_time(), np.empty(len(y), dtype=object), []
        for train, test in folds:
            head = TorchHeadClassifier(n_threads=1, **params).fit(X[train], y[train])
            predicted[test] = head.predict(X[test])
            epochs.append(head.n_epochs_)
        print(json.dumps({"params": params, "flip_average": args.flip_average,
                          "error_rate": round(float((predicted != y).mean()), 4),
                          "cpu_seconds": round(time.process_time() - cpu, 1), "epochs_per_fold": epochs}),
              flush=True)


if __name__ == "__main__":
    main()
