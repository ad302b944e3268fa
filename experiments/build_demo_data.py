"""Build the embedded demo data set ``stackcat/demo/`` from the Myntra data.

One-off, rerunnable and deterministic (fixed seed): it reads the real Myntra
catalogue in ``../shared/data/myntra`` (only this script reads it; the library
never does), draws a stratified subset of the products that have a photo, and
writes into ``stackcat/demo/``:

- ``products.csv``: the rows, untouched apart from dropping the label-leak
  columns ``masterCategory`` and ``subCategory``;
- ``images/<id>.jpg``: the photos, downscaled, RGB JPEG;
- ``README.md``: provenance, sampling, measured class sizes, rebuild command.

Sampling: every ``articleType`` keeps ``floor(FRACTION * n + 0.5)`` of its
``n`` rows, but at least ``MIN_PER_CLASS`` (all of them when it has fewer), so
the long tail (classes with 1-4 products) survives as it is in the real data.

Usage (from the repository root)::

    .venv/bin/python experiments/build_demo_data.py
    .venv/bin/python experiments/build_demo_data.py --source /path/to/myntra
"""

from __future__ import annotations

import argparse
import io
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "myntra"
DEFAULT_OUT = REPO / "stackcat" / "demo"

SEED = 42
FRACTION = 0.20
MIN_PER_CLASS = 5
IMAGE_SIZE = 128
JPEG_QUALITY = 80
MAX_FOLDER_BYTES = 9_000_000

COLUMNS = [
    "id",
    "productDisplayName",
    "gender",
    "baseColour",
    "season",
    "year",
    "usage",
    "articleType",
]
LEAK_COLUMNS = ["masterCategory", "subCategory"]
TARGET = "articleType"
REBUILD_COMMAND = ".venv/bin/python experiments/build_demo_data.py"


def per_class_quota(n: int) -> int:
    """Rows kept for a class of ``n`` rows (see the module docstring)."""
    return min(n, max(MIN_PER_CLASS, math.floor(FRACTION * n + 0.5)))


def draw_subset(styles: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Stratified draw by ``articleType``; deterministic for a given seed."""
    rng = np.random.default_rng(seed)
    parts = []
    for label in sorted(styles[TARGET].unique()):
        rows = styles[styles[TARGET] == label].sort_values("id")
        k = per_class_quota(len(rows))
        pick = np.sort(rng.choice(len(rows), size=k, replace=False))
        parts.append(rows.iloc[pick])
    return pd.concat(parts).sort_values("id").reset_index(drop=True)


def encode_image(src: Path) -> bytes:
    """Downscale one photo to ``IMAGE_SIZE`` px (square source) as RGB JPEG bytes."""
    with Image.open(src) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = IMAGE_SIZE / max(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        im = im.resize(size, Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return buf.getvalue()


def folder_bytes(folder: Path) -> tuple[int, int]:
    """(sum of file sizes, bytes allocated on disk) of every file under ``folder``."""
    apparent = allocated = 0
    for path in folder.rglob("*"):
        if path.is_file():
            st = path.stat()
            apparent += st.st_size
            allocated += getattr(st, "st_blocks", 0) * 512
    return apparent, allocated


def size_table(counts: pd.Series) -> list[tuple[str, int]]:
    """Number of classes per class-size bin."""
    bins = [(1, 1), (2, 4), (5, 9), (10, 49), (50, 99), (100, 10**9)]
    rows = []
    for lo, hi in bins:
        label = f"{lo}" if lo == hi else (f"{lo}+" if hi >= 10**9 else f"{lo}-{hi}")
        rows.append((label, int(((counts >= lo) & (counts <= hi)).sum())))
    return rows


def write_readme(
    out: Path, subset: pd.DataFrame, full_counts: pd.Series, n_source_rows: int, apparent: int
) -> None:
    counts = subset[TARGET].value_counts()
    counts = counts.sort_values(ascending=False, kind="stable")
    n_missing_name = int(subset["productDisplayName"].isna().sum())
    missing = {c: int(subset[c].isna().sum()) for c in COLUMNS if subset[c].isna().any()}
    missing_txt = ", ".join(f"`{c}` {n}" for c, n in missing.items()) or "none"
    lines = [
        "# stackcat demo data",
        "",
        f"{len(subset):,} real fashion products (English), {counts.size} classes of "
        f"`articleType`, one {IMAGE_SIZE} px photo each. It ships inside the package so that "
        "`stackcat demo`, the docs and the tests run offline on real data.",
        "",
        "- `products.csv`: columns `" + "`, `".join(COLUMNS) + "`.",
        f"- `images/<id>.jpg`: RGB JPEG, {IMAGE_SIZE}x{IMAGE_SIZE} px, quality {JPEG_QUALITY}.",
        "- Load it with `stackcat.demo.load_demo()`, which adds the absolute `image_path`.",
        "",
        "Target: `articleType`. Features by default: text `productDisplayName`; attributes "
        "`gender, baseColour, season, usage` (`year` is kept but is not a feature by default). "
        "`masterCategory` and `subCategory` (the label's ancestors in the category tree, "
        "a label leak) are dropped.",
        "Rows are kept as they are (values untouched; `year` is written as an integer, "
        f"`2011` for the source's `2011.0`); missing values: {missing_txt}; "
        f"empty product names: {n_missing_name}.",
        "",
        "## Provenance",
        "",
        "Listings from the Indian fashion marketplace myntra.com, as published in the Kaggle "
        'data set "Fashion Product Images (Small)" (licence reported there as MIT; not '
        "verified here).",
        "",
        "- Table: `styles.csv` from github.com/animmala3942/FashionProductRecommendationSystem "
        "(commit 91e8036; split by that repo's author into `styles.csv` + `styles_text.csv`, "
        "re-joined row by row).",
        "- Images: github.com/GaneshNeupane01/Fashion-Recommendation-System (commit 7cf2634, "
        "`images/`, 224x224 there), downscaled here.",
        "",
        "## How the subset was drawn",
        "",
        f"From the {n_source_rows:,} products that have a photo ({full_counts.size} classes; "
        "photos exist for ids 10000-21539 only, a contiguous id range, not a random sample), "
        f"stratified by `articleType` with seed {SEED} (`numpy.random.default_rng`): "
        f"each class keeps floor({FRACTION} x n + 0.5) of its n rows, at least {MIN_PER_CLASS} "
        f"(all of them when it has fewer than {MIN_PER_CLASS}), so the long tail stays as in "
        "the real data. Rows are sorted by `id`.",
        "",
        "## Class sizes (measured)",
        "",
        f"{len(subset):,} rows, {counts.size} classes; rows per class: min {counts.min()}, "
        f"median {counts.median():g}, max {counts.max()} ({counts.index[0]}); "
        f"{int((counts < 5).sum())} classes with fewer than 5 rows, "
        f"{int((counts == 1).sum())} with a single row.",
        "",
        "| rows per class | classes |",
        "|---|---|",
    ]
    lines += [f"| {label} | {n} |" for label, n in size_table(counts)]
    lines += [
        "",
        "| articleType | demo rows | rows with a photo in the full data |",
        "|---|---|---|",
    ]
    lines += [f"| {label} | {n} | {full_counts[label]} |" for label, n in counts.items()]
    lines += [
        "",
        "## Size and rebuild",
        "",
        f"Folder size (sum of file sizes, this README excluded): {apparent / 1e6:.2f} MB.",
        "Rebuild from the repository root, with the Myntra data at `../shared/data/myntra`:",
        "",
        "```",
        REBUILD_COMMAND,
        "```",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    source, out = args.source, args.out

    styles = pd.read_csv(source / "styles_merged.csv")
    image_dir = source / "images_224"
    with_image = {int(p.stem) for p in image_dir.glob("*.jpg")}
    styles = styles[styles["id"].isin(with_image)].reset_index(drop=True)
    full_counts = styles[TARGET].value_counts()
    print(f"source: {len(styles):,} rows with a photo, {full_counts.size} classes")

    subset = draw_subset(styles, SEED)
    assert not set(LEAK_COLUMNS) & set(subset[COLUMNS].columns)

    out.mkdir(parents=True, exist_ok=True)
    images_out = out / "images"
    images_out.mkdir(exist_ok=True)
    keep = {f"{i}.jpg" for i in subset["id"]}
    for stale in images_out.glob("*.jpg"):
        if stale.name not in keep:
            stale.unlink()
    for i in subset["id"]:
        data = encode_image(image_dir / f"{i}.jpg")
        target = images_out / f"{i}.jpg"
        if not target.exists() or target.read_bytes() != data:
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)

    table = subset[COLUMNS].copy()
    table["year"] = table["year"].astype("Int64")  # 2011.0 in the source -> 2011
    table.to_csv(out / "products.csv", index=False)

    readme = out / "README.md"
    if readme.exists():
        readme.unlink()
    data_bytes, _ = folder_bytes(out)
    write_readme(out, subset, full_counts, len(styles), data_bytes)
    apparent, allocated = folder_bytes(out)

    counts = subset[TARGET].value_counts()
    print(
        f"demo: {len(subset):,} rows, {counts.size} classes, "
        f"{int((counts < 5).sum())} classes with < 5 rows; "
        f"rows/class min {counts.min()} median {counts.median():g} max {counts.max()}"
    )
    print(f"images: {IMAGE_SIZE} px, JPEG quality {JPEG_QUALITY}")
    print(
        f"folder {out}: {apparent / 1e6:.2f} MB (sum of file sizes), "
        f"{allocated / 1e6:.2f} MB allocated on disk"
    )
    if apparent > MAX_FOLDER_BYTES:
        raise SystemExit(f"demo folder is {apparent:,} bytes, over the {MAX_FOLDER_BYTES:,} limit")


if __name__ == "__main__":
    main()
