"""Figures of docs/reliability.md rows 35 and 40 (issue 12): stale image resume, image memory.

``resume``: fit ``--models image --offline-weights`` on 60 demo rows (3 classes),
rotate the photos between products under the same file names, ``--resume``,
and compare with a fresh fit on the new files.

``peak NAME``: extra peak RSS of ``image_embeddings`` on one image with
EfficientNet-Lite0 (its preprocessing resizes the short side to 224 px), the
model loaded and warmed first; the image file is made by another process, so
that making it does not raise this one's peak. NAME: one of :data:`IMAGES`.

    PYTHONPATH=$PWD python experiments/run_safety.py resume /tmp/run-safety
    PYTHONPATH=$PWD python experiments/run_safety.py peak thin-16000x1
"""

from __future__ import annotations

import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from stackcat.demo import demo_csv_path, demo_image_dir

OPTIONS = ["--text-columns", "productDisplayName", "--target", "articleType", "--id-column", "id",
           "--image-dir", "imgs", "--models", "image", "--offline-weights", "--no-progress", "--folds", "5",
           "--meta", "average"]


def fit(folder: Path, run: str, *extra: str) -> tuple[float, list[str]]:
    done = subprocess.run([sys.executable, "-m", "stackcat.cli", "fit", "t.csv", "--run-dir", run, *OPTIONS, *extra],
                          cwd=folder, capture_output=True, text=True, check=True)
    f1 = float(re.search(r"^image\s+([0-9.]+)", done.stdout, re.MULTILINE).group(1))
    return f1, [line for line in done.stdout.splitlines() if "jobs" in line]


def resume(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "imgs").mkdir(parents=True)
    table = pd.read_csv(demo_csv_path(), dtype=str)
    top = table["articleType"].value_counts().index[:3]
    table = table[table["articleType"].isin(top)].groupby("articleType").head(20)
    table.to_csv(folder / "t.csv", index=False)
    ids = table["id"].tolist()
    for product in ids:
        shutil.copy(Path(demo_image_dir()) / f"{product}.jpg", folder / "imgs" / f"{product}.jpg")
    first, _ = fit(folder, "run")
    photos = {product: (folder / "imgs" / f"{product}.jpg").read_bytes() for product in ids}
    for product, other in zip(ids, ids[20:] + ids[:20]):  # each file now shows a product of another class
        (folder / "imgs" / f"{product}.jpg").write_bytes(photos[other])
    resumed, lines = fit(folder, "run", "--resume")
    fresh, _ = fit(folder, "fresh")
    print(f"first fit: weighted F1 {first}; after replacing the photos, --resume: {resumed} "
          f"({'; '.join(lines)}); fresh fit on the new photos: {fresh}")


# name -> (mode, size, fill); PNG files
IMAGES = {
    "thin-16000x1": ("L", (16000, 1), 128),
    "thin-40000x1": ("L", (40000, 1), 128),
    "rgba-7000x7000": ("RGBA", (7000, 7000), (10, 200, 30, 128)),
    "rgba-1000x20000": ("RGBA", (1000, 20000), (10, 200, 30, 128)),
    "grey16-7000x7000": ("I;16", (7000, 7000), 40000),
    "palette-alpha-7000x7000": ("P", (7000, 7000), 3),
}


def make(name: str, path: str) -> None:
    from PIL import Image

    mode, size, fill = IMAGES[name]
    extra = {"transparency": fill} if mode == "P" else {}
    Image.new(mode, size, fill).save(path, **extra)


def peak(name: str) -> None:
    from PIL import Image

    from stackcat.features.image_encoders import get_encoder
    from stackcat.features.images import image_embeddings

    folder = Path(tempfile.mkdtemp())
    path = str(folder / f"{name}.png")
    subprocess.run([sys.executable, __file__, "make", name, path], check=True)
    Image.new("RGB", (64, 64), "red").save(folder / "small.png")
    encoder = get_encoder("efficientnet-lite0", device="cpu")
    image_embeddings([str(folder / "small.png")], encoder, progress=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = image_embeddings([path], encoder, progress=False)
    added = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(f"{name} png: status {result.status[0]}, added peak RSS {added:.0f} MB, "
          f"{time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    if sys.argv[1] == "resume":
        resume(Path(sys.argv[2]))
    elif sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3])
    else:
        peak(sys.argv[2])
