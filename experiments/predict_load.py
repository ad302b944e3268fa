"""Load test of ``stackcat predict``: memory stays flat however long the file is.

Fits a FastText-only run on the embedded demo data (2,005 Myntra products, 75
classes) once, then writes tables of N products made by sampling demo products
and perturbing their names (words dropped, swapped, re-cased, a size or
colour word added; fresh ids), and runs ``stackcat predict`` on each in its own
process. For every table it records the peak RSS of that process (its
``ru_maxrss``) and its rows per second; one more run reads the largest table
in a single chunk, to show that the chunks are what keeps memory bounded.

    nice -n 10 python experiments/predict_load.py --rows 10000 100000 \\
        --out experiments/results/predict_load.md

The box it ran on and its load average go into the report with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from stackcat.demo import DEMO_COLUMNS, load_demo

SIZES = ["XS", "S", "M", "L", "XL", "XXL", "Free Size", "Pack of 2", "Pack of 3", "New"]
FIT_COLUMNS = ["--text-columns", ",".join(DEMO_COLUMNS["text_columns"]),
               "--attribute-columns", ",".join(DEMO_COLUMNS["attribute_columns"]),
               "--target", DEMO_COLUMNS["target"], "--id-column", DEMO_COLUMNS["id_column"]]
# Reads children's peak RSS: run the command as the only child of this wrapper.
RSS_WRAPPER = ("import resource, subprocess, sys, json; r = subprocess.run(sys.argv[1:]); "
               "print(json.dumps({'rc': r.returncode, "
               "'max_rss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")


def perturb_name(name: str, rng: np.random.Generator) -> str:
    """A plausible variant of a product name: what a second seller of the same item might write."""
    words = str(name).split()
    if len(words) > 3:
        words = [w for w in words if rng.random() > 0.15] or words
    if len(words) > 2 and rng.random() < 0.3:
        i, j = rng.choice(len(words), size=2, replace=False)
        words[i], words[j] = words[j], words[i]
    if rng.random() < 0.2:
        words = [w.upper() if rng.random() < 0.5 else w.lower() for w in words]
    if rng.random() < 0.5:
        words.append(str(rng.choice(SIZES)))
    return " ".join(words)


def make_table(demo: pd.DataFrame, n_rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    table = demo.iloc[rng.integers(0, len(demo), n_rows)].reset_index(drop=True)
    table["productDisplayName"] = [perturb_name(name, rng) for name in table["productDisplayName"]]
    colours = demo["baseColour"].dropna().unique()
    recoloured = rng.random(n_rows) < 0.05
    table.loc[recoloured, "baseColour"] = rng.choice(colours, recoloured.sum())
    table["id"] = np.arange(10_000_000, 10_000_000 + n_rows)
    return table.drop(columns=[DEMO_COLUMNS["target"]])


def stackcat_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "stackcat.cli", *args]


def fit_demo_run(workdir: Path, meta: str, folds: int) -> tuple[Path, float]:
    demo, _ = load_demo()
    train = workdir / "demo_train.csv"
    demo.drop(columns=["image_path"]).to_csv(train, index=False)
    run_dir = workdir / f"run-fasttext-{meta}"
    if (run_dir / "stacker.joblib").exists():
        return run_dir, 0.0
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(stackcat_command("fit", str(train), "--run-dir", str(run_dir), *FIT_COLUMNS,
                                    "--models", "fasttext", "--folds", str(folds), "--meta", meta,
                                    "--no-progress"), check=True, stdout=subprocess.DEVNULL)
    return run_dir, time.perf_counter() - start


def measure_predict(run_dir: Path, table: Path, out: Path, chunk_rows: int) -> dict:
    command = stackcat_command("predict", str(run_dir), str(table), "--out", str(out),
                               "--chunk-rows", str(chunk_rows))
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", RSS_WRAPPER, *command], check=True,
                            capture_output=True, text=True)
    seconds = time.perf_counter() - start
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    if measured["rc"] != 0:
        raise RuntimeError(f"predict failed ({measured['rc']}): {result.stderr[-2000:]}")
    n_rows = sum(1 for _ in open(out, encoding="utf-8")) - 1
    # predict's own last progress line: throughput once the run is loaded (no process start)
    inner = re.findall(r"([\d,]+) rows predicted \((\d+) rows/s\)", result.stderr)
    return {"rows": n_rows, "chunk_rows": chunk_rows, "seconds": seconds, "rows_per_s": n_rows / seconds,
            "predict_rows_per_s": int(inner[-1][1]) if inner else None,
            "peak_rss_mib": measured["max_rss_kib"] / 1024, "load_before": load_before,
            "load_after": os.getloadavg()[0], "command": " ".join(command[1:])}


def report(results: list[dict], fit_seconds: float, meta: str, args: argparse.Namespace) -> str:
    lines = [
        "## `stackcat predict` under load: memory does not grow with the file",
        "",
        f"Model: FastText-only run on the demo data (2,005 products, 75 classes, {args.folds} folds, "
        f"meta `{meta}`; " + (f"fit took {fit_seconds:.0f} s" if fit_seconds else "fitted earlier") + "). Tables: demo products sampled with "
        "replacement, names perturbed (words dropped/swapped/re-cased, a size word added), 5% re-coloured.",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        "every command ran under `nice -n 10` on a shared box.",
        "",
        "| rows | chunk rows | wall s | rows/s (wall) | rows/s (predicting) | peak RSS (MiB) "
        "| load avg before -> after |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(f"| {r['rows']:,} | {r['chunk_rows']:,} | {r['seconds']:.1f} | {r['rows_per_s']:,.0f} | "
                     f"{r['predict_rows_per_s'] or 0:,} | {r['peak_rss_mib']:.0f} | "
                     f"{r['load_before']:.2f} -> {r['load_after']:.2f} |")
    lines += ["", *growth_summary(results, args.chunk_rows)]
    lines += ["", "Wall time includes the process start (imports, loading the run). \"rows/s (predicting)\" "
              "is the rate `stackcat predict` itself reports after its last chunk (from its first chunk on).", "",
              "Command of the whole experiment:", "", "```",
              "nice -n 10 python experiments/predict_load.py " + " ".join(sys.argv[1:]), "```", "",
              "Each row's own command (run as the only child of a wrapper that reads its `ru_maxrss`):", ""]
    lines += [f"- `{r['command']}`" for r in results]
    return "\n".join(lines) + "\n"


def growth_summary(results: list[dict], chunk_rows: int) -> list[str]:
    """How peak memory moves with the file size when reading in chunks, and without them."""
    chunked = sorted((r for r in results if r["chunk_rows"] == chunk_rows), key=lambda r: r["rows"])
    whole = [r for r in results if r["chunk_rows"] != chunk_rows]
    lines = []
    if len(chunked) > 1:
        small, large = chunked[0], chunked[-1]
        lines.append(f"Reading in chunks of {chunk_rows:,} rows, {large['rows'] / small['rows']:.0f}x more rows "
                     f"({small['rows']:,} -> {large['rows']:,}) change the peak RSS by "
                     f"{large['peak_rss_mib'] - small['peak_rss_mib']:+.0f} MiB "
                     f"({small['peak_rss_mib']:.0f} -> {large['peak_rss_mib']:.0f} MiB).")
    for r in whole:
        lines.append(f"The same {r['rows']:,} rows read as one chunk peak at {r['peak_rss_mib']:.0f} MiB: "
                     "the chunks are what bounds the memory.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--chunk-rows", type=int, default=10_000)
    parser.add_argument("--meta", default="rerank", choices=["rerank", "multiclass", "average"])
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("artifacts/predict_load"))
    parser.add_argument("--no-single-chunk", action="store_true",
                        help="skip the contrast run that reads the largest table in one chunk")
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    run_dir, fit_seconds = fit_demo_run(args.workdir, args.meta, args.folds)
    demo, _ = load_demo()
    results = []
    for n_rows in args.rows:
        table = args.workdir / f"products-{n_rows}.csv"
        make_table(demo, n_rows, seed=n_rows).to_csv(table, index=False)
        results.append(measure_predict(run_dir, table, args.workdir / f"predictions-{n_rows}.csv",
                                       args.chunk_rows))
        print(json.dumps(results[-1]), flush=True)
    if not args.no_single_chunk:
        largest = max(args.rows)
        results.append(measure_predict(run_dir, args.workdir / f"products-{largest}.csv",
                                       args.workdir / f"predictions-{largest}-one-chunk.csv", largest))
        print(json.dumps(results[-1]), flush=True)
    text = report(results, fit_seconds, args.meta, args)
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
