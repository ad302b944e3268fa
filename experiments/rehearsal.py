"""Seed-scale rehearsal: the default stack end to end on Myntra at two sizes, stage by stage.

    python experiments/rehearsal.py --sizes 4000 16000 --out experiments/results/rehearsal.json

Each size is a random sample of all 44,446 Myntra products (text for all, a photo
for the ~22% that have one), fitted from an empty run folder with the members
`stackcat demo` uses (offline weights: frozen multilingual e5-small, EfficientNet-
Lite0), 5 folds, meta="auto". Stages timed apart: text encoding, image encoding
(the frozen encoders' one pass over the rows), each member's 5 fold jobs, and the
meta-learner (retrieval signals, three nested meta-learners, the final fit).

The projection to the reference catalogue (91,120 products, all with a photo,
874 classes) scales each stage by its measured cost per row at the larger size:
encoders by rows; members and meta by rows, and the members' linear heads also by
classes (their cost is rows x classes); see ``project``. The encoders are loaded
(and exported to ONNX) before the timed stages, with the process's caches cleared,
so each size encodes its own rows from nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

from stackcat.data import TableSpec, prepare_table, read_table
from stackcat.features import clear_caches
from stackcat.presets import OFFLINE_TEXT_PREFIX, ModelOptions, build_models, offline_weights
from stackcat.progress import print_stage_lines
from stackcat.stacking import StackingCategorizer

SPEC = TableSpec(text_columns=["productDisplayName"], attribute_columns=["gender", "baseColour", "season", "usage"],
                 target="articleType", id_column="id", image_dir="images_224", attribute_keys=False,
                 lowercase=True)
MEMBERS = ["fasttext", "lexical", "bert", "knn_text", "image", "fusion"]
REFERENCE = {"rows": 91_120, "classes": 874, "image_share": 1.0}
# members whose fit cost grows with rows x classes: LogisticRegression heads over all their
# features (lexical, the image head) and fastText's softmax; the torch heads' class layer is a small
# part of their cost (measured per row)
CLASS_LINEAR = {"fasttext", "lexical", "image"}


def fit_one(raw, size: int, run_dir: Path, data_dir: Path) -> dict:
    sample = raw.sample(n=size, random_state=0).reset_index(drop=True)
    prepared = prepare_table(sample, SPEC, base_dir=data_dir)
    frame = prepared.frame
    labels = frame["label"].to_numpy(dtype=object)
    text_model, image_encoder = offline_weights()
    options = ModelOptions(text_model=text_model, text_prefix=OFFLINE_TEXT_PREFIX, image_encoder=image_encoder,
                           cache_dir=str(run_dir / "embeddings"), max_length=48, freeze_text_encoder=True,
                           progress=False)
    models = build_models(MEMBERS, options, {"fasttext": {"n_threads": 1}})
    named = dict(models)
    # load (and export) the encoders outside the timed stages, with nothing cached in this process
    clear_caches()
    named["bert"].warm_cache(raw_warmup(frame))
    named["image"].warm_cache(raw_warmup(frame))
    seconds = {}
    start = time.perf_counter()
    named["bert"].warm_cache(frame)
    seconds["encode_texts"] = time.perf_counter() - start
    start = time.perf_counter()
    named["image"].warm_cache(frame)
    seconds["encode_images"] = time.perf_counter() - start
    stack = StackingCategorizer(models, meta="auto", n_splits=5, random_state=42, run_dir=run_dir, verbose=1,
                                progress=False)
    start = time.perf_counter()
    stack.fit(frame, labels)
    fit_seconds = time.perf_counter() - start
    jobs = stack.jobs_.groupby("model")[["fit_seconds", "predict_seconds"]].sum().sum(axis=1)
    seconds.update({f"member_{name}": float(value) for name, value in jobs.items()})
    seconds["meta_and_engine"] = fit_seconds - float(jobs.sum())
    has_image = frame["image_path"].map(lambda p: isinstance(p, str) and Path(p).exists()).to_numpy(dtype=bool)
    return {"rows": size, "classes": len(stack.classes_), "rows_with_image": int(has_image.sum()),
            "seconds": {k: round(v, 1) for k, v in seconds.items()},
            "total_seconds": round(sum(seconds.values()), 1),
            "meta_choice": type(stack.meta_).__name__,
            "scores": stack.oof_scores_.round(4)[["weighted_f1", "macro_f1", "accuracy"]].to_dict("index")}


def raw_warmup(frame):
    """Four rows with new texts (and the sample's first photos), to load the encoders."""
    warm = frame[frame["image_path"].map(lambda p: isinstance(p, str) and Path(p).exists())].head(4).copy()
    warm["text"] = [f"warm-up {i}" for i in range(len(warm))]
    return warm


def project(measured: dict, target: dict) -> dict:
    """Seconds per stage at ``target`` size from the per-row (and per-class) cost of ``measured``."""
    rows = target["rows"] / measured["rows"]
    classes = target["classes"] / measured["classes"]
    images = target["rows"] * target["image_share"] / max(measured["rows_with_image"], 1)
    out = {}
    for stage, seconds in measured["seconds"].items():
        member = stage.removeprefix("member_")
        factor = images if stage == "encode_images" else rows
        if stage.startswith("member_") and member in CLASS_LINEAR:
            factor *= classes
        out[stage] = round(seconds * factor, 1)
    out["total"] = round(sum(out.values()), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/myntra"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[4000, 16000])
    parser.add_argument("--work", type=Path, default=Path("artifacts/rehearsal"))
    parser.add_argument("--out", type=Path, default=Path("experiments/results/rehearsal.json"))
    args = parser.parse_args()
    raw = read_table(args.data / "styles_merged.csv")
    runs = []
    with print_stage_lines():
        for size in args.sizes:
            run_dir = args.work / f"rows-{size}"
            shutil.rmtree(run_dir, ignore_errors=True)
            runs.append(fit_one(raw, size, run_dir, args.data))
            print(json.dumps(runs[-1], indent=2), flush=True)
    largest = max(runs, key=lambda r: r["rows"])
    growth = {stage: round(largest["seconds"][stage] / max(runs[0]["seconds"][stage], 1e-9), 2)
              for stage in largest["seconds"]} if len(runs) > 1 else {}
    summary = {"runs": runs, "growth_largest_over_smallest": growth,
               "rows_ratio": round(largest["rows"] / runs[0]["rows"], 2),
               "projection_reference_cpu": project(largest, REFERENCE), "reference": REFERENCE,
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
