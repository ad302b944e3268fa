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

With the fit-time switches (issue 18 item 4) the projection changes for the
stages they touch; re-project a stored measurement without refitting:

    python experiments/rehearsal.py --reproject experiments/results/rehearsal.json \
        --switches experiments/results/fit_switches.jsonl

Each switched member's projected cost is multiplied by the measured fit-time
ratio of its new setting over the old one on the ~800-class crossed Myntra table
(experiments/fit_switches.py); the meta's by the ratio of the products its six
fits (five nested, one final) learn from, now bounded by
``RerankMeta.max_train_products`` (see ``meta_factor``).
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
CLASS_LINEAR = {"fasttext", "lexical", "image", "clip"}  # "clip": the image member's name in older results
# The switches' stages: fit_switches.py's switch name -> the rehearsal's stage names.
SWITCH_STAGES = {"fasttext": ("member_fasttext",), "lexical": ("member_lexical",),
                 "image_head": ("member_image", "member_clip")}
# fit_switches.py configs: what the defaults now do at 874 classes, and what they did when measured
CHOSEN = {"fasttext": "fasttext loss=softmax", "lexical": "lexical max_iter=5", "image_head": "image head=torch"}
BASELINE = {"fasttext": "fasttext loss=softmax", "lexical": "lexical max_iter=10", "image_head": "image head=logistic"}


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


def meta_train_products(rows: int, bound: int | None, folds: int = 5) -> int:
    """Products the meta's fits learn from with meta="auto": ``folds`` nested fits and the final one."""
    def capped(n: int) -> int:
        return n if bound is None else min(n, bound)
    return folds * capped(rows * (folds - 1) // folds) + capped(rows)


def meta_factor(measured_rows: int, target_rows: int, bound: int | None) -> float:
    """The meta's projected cost ratio, bounded over unbounded: its cost taken as proportional to the
    products it learns from (the candidates' booster), prediction and retrieval signals neglected."""
    return meta_train_products(target_rows, bound) / meta_train_products(target_rows, None)


def switch_factors(path: Path, chosen: dict[str, str], baseline: dict[str, str],
                   label: str = "articleType+baseColour") -> dict[str, float]:
    """Fit CPU-time ratio chosen / baseline per switch, from fit_switches.py's JSON lines at ``label``
    (CPU seconds: the wall seconds of a shared box say more about the neighbours' load)."""
    seconds = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row["label"] == label:
            seconds[(row["switch"], row["config"])] = row["fit_cpu_seconds"]
    return {switch: seconds[(switch, chosen[switch])] / seconds[(switch, baseline[switch])]
            for switch in chosen if (switch, chosen[switch]) in seconds and (switch, baseline[switch]) in seconds}


def reproject(stored: dict, factors: dict[str, float], bound: int | None) -> dict:
    """The stored projection with the switched stages and the bounded meta scaled."""
    largest = max(stored["runs"], key=lambda r: r["rows"])
    before = project(largest, REFERENCE)
    after = dict(before)
    for switch, factor in factors.items():
        for stage in SWITCH_STAGES[switch]:
            if stage in after:
                after[stage] = round(after[stage] * factor, 1)
    after["meta_and_engine"] = round(before["meta_and_engine"]
                                     * meta_factor(largest["rows"], REFERENCE["rows"], bound), 1)
    after["total"] = round(sum(v for k, v in after.items() if k != "total"), 1)
    return {"before": before, "after": after, "switch_factors": factors, "meta_bound": bound,
            "meta_factor": round(meta_factor(largest["rows"], REFERENCE["rows"], bound), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/myntra"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[4000, 16000])
    parser.add_argument("--work", type=Path, default=Path("artifacts/rehearsal"))
    parser.add_argument("--out", type=Path, default=Path("experiments/results/rehearsal.json"))
    parser.add_argument("--reproject", type=Path, help="a stored rehearsal JSON: project it again, no fit")
    parser.add_argument("--switches", type=Path, default=Path("experiments/results/fit_switches.jsonl"))
    args = parser.parse_args()
    if args.reproject:
        from stackcat.meta import RerankMeta

        stored = json.loads(args.reproject.read_text())
        factors = switch_factors(args.switches, chosen=CHOSEN, baseline=BASELINE)
        print(json.dumps(reproject(stored, factors, RerankMeta().max_train_products), indent=2))
        return
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
