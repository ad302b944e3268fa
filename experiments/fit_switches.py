"""Fit-time switches at many classes: fastText's loss, lexical passes, the image head (issue 18 item 4).

    python experiments/fit_switches.py fasttext --labels articleType articleType+baseColour \\
        --configs softmax hs ova
    python experiments/fit_switches.py lexical --labels articleType articleType+baseColour \\
        --configs 10 5 3
    python experiments/fit_switches.py image_head --labels articleType articleType+baseColour \\
        --vectors /tmp/ih/lite0.npy --configs logistic torch

Tables: all 44,446 Myntra products (text = productDisplayName + gender, baseColour,
season, usage as stackcat renders them). ``--labels articleType`` is the real
target (143 classes); ``articleType+baseColour`` is a label-crossed target for
marketplace-like class counts: "Tshirts | Navy Blue", keeping the crossed classes
with at least 5 products (855 classes, 42,573 products; the colour is in the text,
so the crossed label is learnable). Classes with one product are left out of
the real target (7 products), as a stratified split needs two. One fixed split: 80% train / 20% test,
stratified, random_state=42. Fit seconds are wall and process CPU of ``fit``.

``image_head`` reads frozen EfficientNet-Lite0 vectors of the 9,583 photos
(``--vectors``, rows in the order of experiments/image_head_myntra.py: the table
filtered to ids with a photo) and fits ``ImageEmbeddingClassifier``'s two heads
directly on them: articleType (75 classes there) and the crossed label (classes
with >= 5 photos).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split

from stackcat.data import TableSpec, prepare_table, read_table

SPEC = TableSpec(text_columns=["productDisplayName"], attribute_columns=["gender", "baseColour", "season", "usage"],
                 target="label", id_column="id")
MIN_CROSSED = 5


def labelled(raw: pd.DataFrame, label: str) -> pd.DataFrame:
    """``raw`` with a ``label`` column: one column, or columns crossed with '+' (rare crossings dropped)."""
    columns = label.split("+")
    values = raw[columns].fillna("?").astype(str).to_numpy(dtype=object)
    out = raw.assign(label=[" | ".join(row) for row in values])
    counts = out["label"].value_counts()
    least = MIN_CROSSED if len(columns) > 1 else 2  # a stratified split needs 2
    return out[out["label"].isin(counts[counts >= least].index)].reset_index(drop=True)


def split(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")
        return train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=42)


def scored(name: str, model, X_train, y_train, X_test, y_test, extra: dict | None = None) -> dict:
    start, cpu = time.perf_counter(), time.process_time()
    model.fit(X_train, y_train)
    fit_wall, fit_cpu = time.perf_counter() - start, time.process_time() - cpu
    predicted = model.predict(X_test)
    return {"config": name, "classes": len(np.unique(y_train)), "train_rows": len(y_train),
            "test_rows": len(y_test), "errors": int((predicted != y_test).sum()),
            "accuracy": round(float(accuracy_score(y_test, predicted)), 4),
            "weighted_f1": round(float(f1_score(y_test, predicted, average="weighted")), 4),
            "macro_f1": round(float(f1_score(y_test, predicted, average="macro")), 4),
            "fit_seconds": round(fit_wall, 1), "fit_cpu_seconds": round(fit_cpu, 1), **(extra or {})}


def text_frame(data: Path, label: str) -> pd.DataFrame:
    raw = labelled(read_table(data / "styles_merged.csv"), label)
    return prepare_table(raw, SPEC).frame


def run_fasttext(frame: pd.DataFrame, config: str, threads: int) -> dict:
    from stackcat.models.fasttext import FastTextClassifier

    y = frame["label"].to_numpy(dtype=object)
    train, test = split(y)
    model = FastTextClassifier(loss=config, n_threads=threads)
    return scored(f"fasttext loss={config}", model, frame.iloc[train], y[train], frame.iloc[test], y[test])


def run_lexical(frame: pd.DataFrame, config: str, threads: int) -> dict:
    from stackcat.models.lexical import TfidfClassifier

    y = frame["label"].to_numpy(dtype=object)
    train, test = split(y)
    model = TfidfClassifier(max_iter=int(config)) if config.isdigit() else TfidfClassifier(max_iter=config)
    result = scored(f"lexical max_iter={config}", model, frame.iloc[train], y[train], frame.iloc[test], y[test])
    result["passes_run"] = int(model.n_iter_) if hasattr(model, "n_iter_") else None
    return result


def photo_labels(data: Path, label: str) -> np.ndarray:
    """``label`` of the photo subset, rows in the order of experiments/image_head_myntra.py."""
    from image_encoders_myntra import image_subset

    ids = image_subset(data)["id"]
    raw = pd.read_csv(data / "styles_merged.csv").set_index("id").loc[ids].reset_index()
    values = raw[label.split("+")].fillna("?").astype(str).to_numpy(dtype=object)
    return np.asarray([" | ".join(row) for row in values], dtype=object)


def run_image_head(vectors: np.ndarray, labels: np.ndarray, config: str, threads: int) -> dict:
    """The image member's head on frozen vectors (unit length, as the member feeds them) of classes with >= 5 photos."""
    from stackcat.core import limit_threads
    from stackcat.models.image import ImageEmbeddingClassifier

    counts = pd.Series(labels).value_counts()
    keep = np.flatnonzero(pd.Series(labels).isin(counts[counts >= MIN_CROSSED].index).to_numpy())
    X = vectors[keep] / np.maximum(np.linalg.norm(vectors[keep], axis=1, keepdims=True), 1e-12)
    classes, y = np.unique(labels[keep], return_inverse=True)
    train, test = split(y)
    head = ImageEmbeddingClassifier(head=config)._make_head(y[train])
    with limit_threads(threads):
        return scored(f"image head={config}", head, X[train], y[train], X[test], y[test])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("switch", choices=["fasttext", "lexical", "image_head"])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/myntra"))
    parser.add_argument("--labels", nargs="+", default=["articleType", "articleType+baseColour"])
    parser.add_argument("--configs", nargs="+", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vectors", type=Path, help="image_head: frozen image vectors (.npy)")
    parser.add_argument("--out", type=Path, help="append the JSON lines here")
    args = parser.parse_args()
    for label in args.labels:
        if args.switch == "image_head":
            vectors, labels = np.load(args.vectors), photo_labels(args.data, label)
            runs = [lambda c, v=vectors, y=labels: run_image_head(v, y, c, args.threads)]
        else:
            frame = text_frame(args.data, label)
            runner = run_fasttext if args.switch == "fasttext" else run_lexical
            runs = [lambda c, f=frame, r=runner: r(f, c, args.threads)]
        for config in args.configs:
            result = {"switch": args.switch, "label": label, **runs[0](config)}
            print(json.dumps(result), flush=True)
            if args.out:
                with args.out.open("a") as handle:
                    handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
