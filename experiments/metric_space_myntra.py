"""A learned retrieval space (the ``metric`` member) on the Myntra image subset: alone and in the stack.

    nice -n 19 python experiments/metric_space_myntra.py --data ../shared/data/myntra \\
        --run-dir artifacts/myntra_images

9,583 products with a photo, 75 classes; the text, the frozen encoders
(multilingual e5-small, ``max_length=48``; EfficientNet-Lite0) and the folds
(StratifiedKFold(5, shuffle=True, random_state=42)) are those of
experiments/myntra_stack.py, whose run folder this script reuses: the seven
members' fold jobs already there are read back, not refitted; only the
``metric`` member's jobs run (and the embeddings come from the run's cache).

1. Members alone, out of fold: ``knn_text``, ``knn_image`` and
   ``MetricSpaceClassifier`` on the text states, the image vectors and both
   (each fitted per fold here, timed in CPU seconds; the embeddings are read
   before the clock starts).
2. The stack (fasttext, lexical, bert, knn_text, image, knn_image, fusion
   [+ metric]): the plain average, ensemble selection and RerankMeta, each on
   its own nested OOF, with the learned space off, as a member only, as
   retrieval signals only, and both.

Prints and writes (--results, JSON) errors, error %, macro F1 and CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from myntra_stack import SPEC, load_subset, peak_rss_mb
from sklearn.metrics import f1_score

from stackcat.data import prepare_table
from stackcat.meta import EnsembleSelection, RerankMeta
from stackcat.presets import OFFLINE_TEXT_PREFIX, ModelOptions, build_models, offline_weights
from stackcat.progress import print_stage_lines
from stackcat.stacking import StackingCategorizer, make_folds, nested_meta_oof, take_rows

STACK_MEMBERS = ("fasttext", "lexical", "bert", "knn_text", "image", "knn_image", "fusion")
ALONE = ("knn_text", "knn_image", "metric:text", "metric:image", "metric:both")


def scores(name: str, proba: np.ndarray, y_index: np.ndarray, cpu_seconds: float | None = None) -> dict:
    predicted = np.asarray(proba).argmax(axis=1)
    row = {"name": name, "errors": int((predicted != y_index).sum()),
           "error_pct": round(100 * float((predicted != y_index).mean()), 2),
           "macro_f1": round(float(f1_score(y_index, predicted, average="macro")), 4)}
    if cpu_seconds is not None:
        row["cpu_seconds"] = round(cpu_seconds, 1)
    print(json.dumps(row), flush=True)
    return row


def member_alone(config: str, options: ModelOptions, params: dict, frame, y_index: np.ndarray,
                 folds: np.ndarray, n_classes: int) -> tuple[np.ndarray, float]:
    """OOF probabilities of one member fitted fold by fold, and its CPU seconds (fit + predict)."""
    name, _, source = config.partition(":")
    model = build_models([name], options, {name: {**params, **({"source": source} if source else {})}})[0][1]
    model.warm_cache(frame)  # embeddings read (or encoded) before the clock starts
    proba = np.zeros((len(y_index), n_classes))
    cpu = time.process_time()
    for fold in np.unique(folds):
        train, test = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
        fitted = model.fit(take_rows(frame, train), y_index[train])
        proba[np.ix_(test, fitted.classes_)] = fitted.predict_proba(take_rows(frame, test))
    return proba, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/myntra"))
    parser.add_argument("--run-dir", type=Path, default=Path("artifacts/myntra_images"))
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--metric-params", default="{}", help="JSON params of every MetricSpaceClassifier")
    parser.add_argument("--alone", default=",".join(ALONE), help="members scored alone ('' for none)")
    parser.add_argument("--no-stack", action="store_true", help="members alone only")
    parser.add_argument("--results", type=Path, default=Path("experiments/results/metric_space_myntra.json"))
    args = parser.parse_args()
    with print_stage_lines():
        run(args)


def run(args: argparse.Namespace) -> None:
    frame = prepare_table(load_subset(args.data, "images"), SPEC, base_dir=args.data).frame
    labels = frame["label"].to_numpy(dtype=object)
    text_model, image_encoder = offline_weights()
    options = ModelOptions(text_model=text_model, text_prefix=OFFLINE_TEXT_PREFIX, image_encoder=image_encoder,
                           cache_dir=str(args.run_dir / "embeddings"), max_length=args.max_length,
                           freeze_text_encoder=True, random_state=0, progress=False)
    metric_params = json.loads(args.metric_params)
    out: dict = {"rows": len(frame), "metric_params": metric_params, "alone": [], "stack": [],
                 "load_before": [round(x, 2) for x in os.getloadavg()]}
    classes = np.unique(labels)
    y_index = np.searchsorted(classes, labels)
    members = build_models([*STACK_MEMBERS, "metric"], options, {"metric": metric_params})
    fold_of_row = make_folds(y_index, 5, 42)
    for config in (c for c in args.alone.split(",") if c):
        proba, cpu = member_alone(config, options, metric_params if config.startswith("metric") else {},
                                  frame, y_index, fold_of_row, len(classes))
        out["alone"].append(scores(config, proba, y_index, cpu))
        _write(args.results, out)
    if args.no_stack:
        return

    stack = StackingCategorizer(members, meta="average", n_splits=5, random_state=42, run_dir=args.run_dir,
                                n_jobs=1, verbose=1, progress=False)
    started = time.perf_counter()
    stack.fit(frame, labels)
    out["stack_fit_wall_seconds"] = round(time.perf_counter() - started, 1)
    out["jobs"] = stack.jobs_.groupby("model")[["fit_seconds", "predict_seconds"]].sum().round(1).to_dict("index")
    assert np.array_equal(stack.fold_of_row_, fold_of_row) and np.array_equal(stack.classes_, classes)
    signals = stack.meta_inputs_["signals"]
    frozen_signals = {k: v for k, v in signals.items() if not k.startswith("metric:")}
    out["signals"] = sorted(signals)
    for name, proba in stack.oof_.items():
        out["stack"].append(scores(f"member {name}", proba, y_index))
    for space, with_member, with_signals in (("off", False, False), ("member + signals", True, True),
                                             ("member only", True, False), ("signals only", False, True)):
        oof = {k: v for k, v in stack.oof_.items() if with_member or k != "metric"}
        if not with_signals:
            out["stack"].append(scores(f"average [{space}]", np.mean(list(oof.values()), axis=0), y_index))
            cpu = time.process_time()
            proba = nested_meta_oof(EnsembleSelection(), oof, y_index, fold_of_row)
            out["stack"].append(scores(f"ensemble selection [{space}]", proba, y_index, time.process_time() - cpu))
        cpu = time.process_time()
        proba = nested_meta_oof(RerankMeta(), oof, y_index, fold_of_row, signals if with_signals else frozen_signals)
        out["stack"].append(scores(f"RerankMeta [{space}]", proba, y_index, time.process_time() - cpu))
        _write(args.results, out)
    out["load_after"] = [round(x, 2) for x in os.getloadavg()]
    out["peak_rss_mb"] = peak_rss_mb()
    _write(args.results, out)


def _write(path: Path, out: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
