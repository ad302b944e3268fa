"""Model bundles of the demo run: size, cold load, speed and held-out accuracy, fold models vs refit.

    python experiments/bundle_demo.py --run artifacts/demo [--refit-run DIR] --holdout 1000

Exports each run folder as a bundle, once with fastText as ``.bin`` and once
quantized (``.ftz``), then for the run folder and every bundle prints: size
on disk, cold load (a fresh interpreter: imports + load), load and first call
(8 products: encoders, and a run folder's fold models, load lazily) in this
process, rows per second on
a held-out batch, one-product latency (median of 20 calls) and top-1 accuracy
on held-out Myntra products (those with a photo that are not among the
demo's 2,005 training rows; ``--myntra`` names the data folder), plus how
often its top-1 agrees with the run folder's. ``--refit-run``: a run of the
same demo fitted with ``refit=True`` (one model per member refitted on all
rows, not the five fold models).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from stackcat.bundle import export_run
from stackcat.predictor import Predictor

COLD_LOAD = ("import sys, time; start = time.perf_counter(); import stackcat; "
             "stackcat.load(sys.argv[1], trusted=True); print(time.perf_counter() - start)")


def held_out_products(myntra: Path, run: Path, n_rows: int, seed: int = 0) -> pd.DataFrame:
    """Myntra products with a photo, outside the demo's training rows, of the demo's categories."""
    from stackcat.demo import load_demo

    demo, _ = load_demo()
    table = pd.read_csv(myntra / "styles_merged.csv")
    table["image_path"] = [str(myntra / "images_224" / f"{i}.jpg") for i in table["id"]]
    has_photo = np.array([Path(p).is_file() for p in table["image_path"]])
    known = table["articleType"].isin(set(demo["articleType"]))
    held_out = table[has_photo & known & ~table["id"].isin(set(demo["id"]))]
    return held_out.sample(min(n_rows, len(held_out)), random_state=seed).reset_index(drop=True)


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def measure(name: str, path: Path, products: pd.DataFrame, baseline: np.ndarray | None) -> dict:
    cold = float(subprocess.run([sys.executable, "-c", COLD_LOAD, str(path)], capture_output=True, text=True,
                                check=True).stdout.strip().splitlines()[-1])
    start = time.perf_counter()
    predictor = Predictor.load(path, trusted=True)
    warm_load = time.perf_counter() - start
    start = time.perf_counter()
    predictor.categorize(products.head(8))  # first call: encoders (a run folder: its fold models) loaded
    first_call = time.perf_counter() - start
    start = time.perf_counter()
    predictions = predictor.categorize(products)
    batch_seconds = time.perf_counter() - start
    single = []
    for row in range(20):
        start = time.perf_counter()
        predictor.categorize(products.iloc[[row]])
        single.append(time.perf_counter() - start)
    top1 = predictions["category"].to_numpy(dtype=object)
    truth = products["articleType"].to_numpy(dtype=object)
    return {"model": name, "MB": round(folder_mb(path), 1), "cold_load_s": round(cold, 2),
            "load_s": round(warm_load, 2), "first_call_s": round(first_call, 2), "rows_per_s": round(len(products) / batch_seconds, 1),
            "one_product_ms": round(1000 * statistics.median(single), 1),
            "accuracy": round(float((top1 == truth).mean()), 4),
            "agrees_with_run": None if baseline is None else round(float((top1 == baseline).mean()), 4),
            "_top1": top1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("artifacts/demo"))
    parser.add_argument("--refit-run", type=Path, help="the demo fitted with refit=True")
    parser.add_argument("--myntra", type=Path, default=Path("/work/shared/data/myntra"))
    parser.add_argument("--holdout", type=int, default=1000, help="held-out products to predict")
    parser.add_argument("--quantize", choices=["none", "refit", "all"], default="refit",
                        help="which runs also get a quantized-fastText bundle (quantizing takes minutes per "
                             "fastText model: five for fold models, one for refit)")
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args()

    products = held_out_products(args.myntra, args.run, args.holdout)
    print(f"{len(products)} held-out products, {products['articleType'].nunique()} categories")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bundle-demo-") as scratch:
        runs = {"fold models": args.run, **({"refit": args.refit_run} if args.refit_run else {})}
        baseline = None
        for label, run in runs.items():
            result = measure(f"run folder ({label})", run, products, baseline)
            baseline = result["_top1"] if baseline is None else baseline
            rows.append(result)
            quantized = args.quantize == "all" or (args.quantize == "refit" and label == "refit")
            for quantize in (False, True) if quantized else (False,):
                start = time.perf_counter()
                bundle = export_run(run, Path(scratch) / f"{label}-{quantize}", trusted=True,
                                    quantize_fasttext=quantize)
                export_seconds = time.perf_counter() - start
                result = measure(f"bundle ({label}, fastText {'.ftz' if quantize else '.bin'})", bundle,
                                 products, baseline)
                result["export_s"] = round(export_seconds, 1)
                rows.append(result)
                shutil.rmtree(bundle)
    table = pd.DataFrame([{k: v for k, v in row.items() if not k.startswith("_")} for row in rows])
    print(table.to_string(index=False))
    if args.json:
        args.json.write_text(json.dumps(table.to_dict(orient="records"), indent=1))


if __name__ == "__main__":
    main()
