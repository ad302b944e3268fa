"""Image encoders and ImageEmbeddingClassifier: throughput, memory, cache reuse, out-of-fold F1.

Sections (each prints a markdown table; numbers go to experiments/results/images.md):

1. throughput: images/s of each encoder on this machine's CPU (or GPU), peak RSS of a
   fresh process that loads it and encodes ``--n-images`` demo photos; also the
   end-to-end ``image_embeddings`` rate (hash + decode + encode + cache write) and the
   rate of reading the same embeddings back from the disk cache.
2. cache reuse and OOF F1: 5-fold ImageEmbeddingClassifier with EfficientNet-Lite0 on the
   demo data (``stackcat.demo.load_demo()``), plus a second model asking for the same
   images, all through one ``cache_dir`` with the in-process memory cache dropped
   before every fold (as if each fold ran in its own process); reports encoder calls
   per image and weighted/macro F1 of each head.
3. ``--myntra DIR``: the same OOF evaluation on the 9,583 Myntra products with a
   photo (target ``articleType``, StratifiedKFold(5, shuffle=True, random_state=42)).

Run (short version, ~5 min on 2 busy cores)::

    nice -n 10 .venv/bin/python experiments/bench_images.py --n-images 128
    nice -n 10 .venv/bin/python experiments/bench_images.py --skip-throughput \
        --myntra /work/shared/data/myntra
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import clone
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import StratifiedKFold

from stackcat.core import proba_for_classes
from stackcat.demo import load_demo
from stackcat.features.image_encoders import get_encoder
from stackcat.features.images import clear_memory_cache, image_embeddings, load_image
from stackcat.models.image import ImageEmbeddingClassifier

DEFAULT_ENCODERS = ("efficientnet-lite0", "ViT-B-32/random-init-seed0")

# Encoding log kept outside the encoder objects: sklearn's clone deep-copies them.
_ENCODED: Counter[str] = Counter()


class CountingEncoder:
    """Wraps a real encoder, counting how often each distinct image goes through it."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name = inner.name

    @property
    def dim(self) -> int:
        return self.inner.dim

    def encode(self, images):
        for image in images:
            _ENCODED[str(hash(image.tobytes()))] += 1
        return self.inner.encode(images)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def throughput_worker(spec: str, n_images: int, batch_size: int) -> dict:
    """Run in a fresh process: load the encoder, encode demo photos, report rates and RSS."""
    frame, _ = load_demo()
    paths = list(frame["image_path"][:n_images])
    images = [load_image(p)[0] for p in paths]
    rss_before = peak_rss_mb()
    encoder = get_encoder(spec)
    start = time.perf_counter()
    encoder.encode(images[:2])  # loads the weights
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    encoder.encode(images)
    encode_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as cache:
        clear_memory_cache()
        start = time.perf_counter()
        image_embeddings(paths, encoder, cache_dir=cache, batch_size=batch_size, progress=False)
        pipeline_s = time.perf_counter() - start
        clear_memory_cache()
        start = time.perf_counter()
        image_embeddings(paths, encoder, cache_dir=cache, batch_size=batch_size, progress=False)
        cached_s = time.perf_counter() - start
    return {
        "encoder": encoder.name, "n_images": len(images), "load_s": load_s,
        "encode_img_s": len(images) / encode_s, "pipeline_img_s": len(images) / pipeline_s,
        "cache_read_img_s": len(images) / cached_s, "peak_rss_mb": peak_rss_mb(),
        "rss_before_model_mb": rss_before,
    }


def run_throughput(specs: list[str], n_images: int, batch_size: int) -> list[dict]:
    rows = []
    for spec in specs:
        command = [sys.executable, __file__, "--worker", spec, "--n-images", str(n_images),
                   "--batch-size", str(batch_size)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print("\n| encoder | images | load (s) | encode img/s | image_embeddings img/s "
          "(hash+decode+encode+write) | cache read img/s | RSS before model (MB) | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['encoder']} | {r['n_images']} | {r['load_s']:.1f} | {r['encode_img_s']:.1f} | "
              f"{r['pipeline_img_s']:.1f} | {r['cache_read_img_s']:.0f} | {r['rss_before_model_mb']:.0f} | "
              f"{r['peak_rss_mb']:.0f} |")
    return rows


def demo_table(n_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    frame, _ = load_demo(n_rows=n_rows)
    return frame["image_path"].to_numpy(dtype=object), frame["articleType"].to_numpy(dtype=object)


def myntra_table(folder: Path, n_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    styles = pd.read_csv(folder / "styles_merged.csv", dtype={"id": str})
    styles["image_path"] = [str(folder / "images_224" / f"{i}.jpg") for i in styles["id"]]
    with_image = styles[[Path(p).is_file() for p in styles["image_path"]]]
    if n_rows is not None and n_rows < len(with_image):  # a random subset, for a smoke run
        with_image = with_image.sample(n=n_rows, random_state=0)
    return (with_image["image_path"].to_numpy(dtype=object),
            with_image["articleType"].to_numpy(dtype=object))


def out_of_fold(models: dict, X: np.ndarray, y: np.ndarray, n_splits: int, seed: int) -> dict:
    """5-fold OOF probabilities of each model; every fold starts with an empty memory cache."""
    classes = np.unique(y)
    folds = list(StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(X, y))
    results = {}
    for name, model in models.items():
        oof = np.zeros((len(y), len(classes)))
        start = time.perf_counter()
        for train, test in folds:
            clear_memory_cache()
            fitted = clone(model).fit(X[train], y[train])
            oof[test] = proba_for_classes(fitted.predict_proba(X[test]), fitted.classes_, classes)
        predicted = classes[oof.argmax(axis=1)]
        results[name] = {
            "weighted_f1": f1_score(y, predicted, average="weighted"),
            "macro_f1": f1_score(y, predicted, average="macro"),
            "accuracy": accuracy_score(y, predicted),
            "seconds": time.perf_counter() - start,
        }
    return results


def run_oof(label: str, X: np.ndarray, y: np.ndarray, heads: dict, seed: int, cache_dir: str) -> dict:
    encoder = CountingEncoder(get_encoder("efficientnet-lite0"))
    _ENCODED.clear()
    models = {name: ImageEmbeddingClassifier(encoder=encoder, image_cache_dir=cache_dir, progress=False,
                                               **params)
              for name, params in heads.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # StratifiedKFold: classes with < 5 rows
        results = out_of_fold(models, X, y, n_splits=5, seed=seed)
    calls = {"distinct_images_encoded": len(_ENCODED),
             "max_encodings_per_image": max(_ENCODED.values(), default=0),
             "total_encodings": sum(_ENCODED.values())}
    print(f"\n{label}: {len(y)} rows, {len(np.unique(y))} classes; encoder calls: {calls} "
          f"({len(heads)} models x 5 folds through one cache_dir)")
    print("\n| model (EfficientNet-Lite0 + LogReg) | weighted F1 | macro F1 | accuracy | seconds "
          "(5 folds, incl. encoding on first use) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['weighted_f1']:.4f} | {r['macro_f1']:.4f} | {r['accuracy']:.4f} | "
              f"{r['seconds']:.0f} |")
    return {"calls": calls, "results": results}


HEADS = {
    "normalize='l2', C=100 (default)": {"normalize": "l2", "C": 100.0},
    "normalize='standard', C=1": {"normalize": "standard", "C": 1.0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-images", type=int, default=256, help="demo photos per throughput run")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--encoders", default=",".join(DEFAULT_ENCODERS),
                        help="comma-separated encoder specs for the throughput table")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--demo-rows", type=int, help="stratified subsample of the demo (default: all)")
    parser.add_argument("--myntra", type=Path, help="folder of the Myntra data (styles_merged.csv)")
    parser.add_argument("--myntra-rows", type=int, help="random subset of the Myntra image rows")
    parser.add_argument("--cache-dir", help="embedding cache to use (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write all figures to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(throughput_worker(args.worker, args.n_images, args.batch_size)))
        return

    figures: dict = {}
    with tempfile.TemporaryDirectory() as scratch:
        cache_dir = args.cache_dir or scratch
        if not args.skip_throughput:
            figures["throughput"] = run_throughput(args.encoders.split(","), args.n_images,
                                                   args.batch_size)
        if not args.skip_demo:
            figures["demo"] = run_oof("demo", *demo_table(args.demo_rows), HEADS, seed=42, cache_dir=cache_dir)
        if args.myntra:
            figures["myntra"] = run_oof("myntra", *myntra_table(args.myntra, args.myntra_rows), HEADS, seed=42,
                                        cache_dir=cache_dir)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=float))


if __name__ == "__main__":
    main()
