"""Engine overhead of a FastText-only stack on the Myntra text data (44,446 rows, 143 classes).

Overhead = wall time of ``StackingCategorizer.fit`` minus the time spent inside the
base models' ``fit``/``predict_proba`` (as recorded per job) and minus the
meta-learner. A second ``fit`` on the finished run folder reuses every job.

    python experiments/engine_overhead.py --data ../shared/data/myntra/styles_merged.csv \
        --run-dir artifacts/engine_overhead --out experiments/results/engine_overhead.json
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

from stackcat.data import TableSpec, prepare_table, read_table
from stackcat.models.fasttext import FastTextClassifier
from stackcat.stacking import StackingCategorizer

SPEC = TableSpec(text_columns=["productDisplayName"], attribute_columns=["gender", "baseColour", "season", "usage"],
                 target="articleType", id_column="id")


def timed_fit(stack: StackingCategorizer, frame, y) -> dict:
    start = time.perf_counter()
    stack.fit(frame, y)
    wall = time.perf_counter() - start
    jobs = stack.jobs_
    ran = jobs[~jobs["from_run_folder"]]
    model_seconds = float(ran["fit_seconds"].sum() + ran["predict_seconds"].sum())
    return {"wall_seconds": round(wall, 2), "base_model_seconds": round(model_seconds, 2),
            "jobs_run": int(len(ran)), "jobs_reused": int(jobs["from_run_folder"].sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/myntra/styles_merged.csv"))
    parser.add_argument("--run-dir", type=Path, default=Path("artifacts/engine_overhead"))
    parser.add_argument("--meta", default="average")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    frame = prepare_table(read_table(args.data), SPEC).frame
    y = frame["label"].to_numpy(dtype=object)
    shutil.rmtree(args.run_dir, ignore_errors=True)

    def stack() -> StackingCategorizer:
        return StackingCategorizer([("fasttext", FastTextClassifier())], meta=args.meta, n_splits=5,
                                   random_state=42, run_dir=args.run_dir, evaluate_meta=False,
                                   progress=False, verbose=0)

    first = timed_fit(stack(), frame, y)
    first["overhead_seconds"] = round(first["wall_seconds"] - first["base_model_seconds"], 2)
    first["overhead_share"] = round(first["overhead_seconds"] / first["wall_seconds"], 4)
    rerun = timed_fit(stack(), frame, y)
    rerun["share_of_first_run"] = round(rerun["wall_seconds"] / first["wall_seconds"], 4)
    result = {"rows": len(frame), "classes": int(frame["label"].nunique()), "meta": args.meta,
              "first_fit": first, "rerun_of_finished_fit": rerun,
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
