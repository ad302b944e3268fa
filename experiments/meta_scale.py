"""Meta-learners at the reference scale: RerankMeta vs CatBoost MultiClass.

Builds synthetic but realistic out-of-fold (OOF) probabilities shaped like the
reference marketplace problem -- 91,120 products, 874 leaf categories, 4 base
models -- and measures:

* RerankMeta: fit time (candidate building + boosting), peak RSS of the fit
  process, candidate recall, and hold-out accuracy / weighted F1 against the
  best single model and the plain average of the models;
* CatBoost MultiClass on the concatenated log-OOF (what a naive stack does):
  seconds per boosting iteration (the time of a 1+k iteration fit minus a
  1-iteration fit, over k), measured on two row subsamples that hold every
  class they can, and extrapolated to the full size with
  ``t = classes * (a + b * rows)`` (see :func:`extrapolate_multiclass`).

Synthetic data (see :func:`make_oof`):

* class sizes: the reference's head (6,590, 3,709, 1,463 rows), then a
  Zipf-Mandelbrot tail ``A / (r + q) ** s`` solved so the body starts just
  below the head, ends at 1 row and sums to the remaining rows: a long tail
  with many 1-2 row classes (scaled down with ``--rows``);
* categories live in a latent space: ~15 leaves per parent category, siblings
  close together, so confusions concentrate among similar classes;
* a product is its class's point plus shared noise (ambiguity every model
  sees); each model sees the product through its own noise, part of it shared
  with the models of the same family (text models err together), scaled per
  parent category (a model is better on some branches of the tree);
* each model's logits are ``beta * (-distance**2 / 2 + alpha * log(class
  frequency))``: a prior for frequent classes as trained models have; the
  noise scale is bisected to hit the model's target accuracy (0.64 for the
  image model, 0.867-0.888 for the text models) and ``beta`` to hit its target
  mean confidence (slightly over-confident text models);
* OOF realism: a 1-member class is unseen by the fold model that predicts its
  own product, so its column is 0 on that row. Hold-out rows (the "test" set)
  come from models trained on everything.

Matrices are stored as float16, as the stacking engine keeps them.

Usage (from the repository root)::

    nice -n 10 .venv/bin/python experiments/meta_scale.py --rows 20000 --threads 2 --out artifacts/meta_scale_20k.json
    .venv/bin/python experiments/meta_scale.py --threads 2 --out artifacts/meta_scale_full.json   # full, ~quiet machine
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REFERENCE_ROWS = 91_120
REFERENCE_HEAD = (6_590, 3_709, 1_463)
LEAVES_PER_PARENT = 15
LATENT_DIM = 24
AMBIGUOUS = 0.10  # share of products that look (partly) like a sibling category: every model is pulled there
SHARED_IMAGE, SHARED_TEXT, FAMILY_TEXT = 0.25, 0.4, 0.3


@dataclass(frozen=True)
class BaseModelSpec:
    """A synthetic base model: its family (shared errors), target accuracy and confidence."""

    name: str
    family: str
    accuracy: float
    overconfidence: float  # target mean top-1 probability minus accuracy
    prior_strength: float  # alpha: pull towards frequent classes
    shared_share: float    # share of its noise variance shared by every model (product ambiguity)
    family_share: float    # share shared with the models of its family


BASE_MODELS = (
    BaseModelSpec("clip_logreg", "image", 0.64, 0.00, 0.6, SHARED_IMAGE, 0.0),
    BaseModelSpec("fasttext", "text", 0.867, 0.04, 0.4, SHARED_TEXT, FAMILY_TEXT),
    BaseModelSpec("rubert_tiny2", "text", 0.885, 0.02, 0.3, SHARED_TEXT, FAMILY_TEXT),
    BaseModelSpec("labse", "text", 0.888, 0.02, 0.3, SHARED_TEXT, FAMILY_TEXT),
)


# ---------------------------------------------------------------------------
# class sizes
# ---------------------------------------------------------------------------

def class_sizes(n_rows: int, n_classes: int) -> np.ndarray:
    """Long-tailed class sizes summing to ``n_rows``, largest first.

    The head follows the reference (6,590 / 3,709 / 1,463 of 91,120 rows,
    scaled to ``n_rows``); the rest is a Zipf-Mandelbrot curve from 85% of the
    last head class down to 1 row, its offset ``q`` bisected to hit the sum.
    """
    scale = n_rows / REFERENCE_ROWS
    head = np.maximum(np.round(np.array(REFERENCE_HEAD) * scale), 1)[: max(n_classes - 1, 0)]
    n_body = n_classes - len(head)
    body_rows = n_rows - head.sum()
    if n_body < 1 or body_rows < n_body:
        raise ValueError(f"cannot spread {n_rows} rows over {n_classes} classes with the reference head")
    first = max(0.85 * head[-1], 1.0) if len(head) else body_rows / 10
    rank = np.arange(1, n_body + 1, dtype=np.float64)

    def curve(q: float) -> np.ndarray:
        # through (1, first) and (n_body, 1): s from the two end points
        s = np.log(first) / max(np.log((n_body + q) / (1 + q)), 1e-12)
        return first * ((1 + q) / (rank + q)) ** s

    low, high = 0.0, 1e6
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if curve(mid).sum() < body_rows else (low, mid)
    body = np.maximum(np.round(curve((low + high) / 2)), 1)
    body[0] += body_rows - body.sum()  # rounding remainder to the largest body class
    sizes = np.concatenate([head, body]).astype(np.int64)
    if sizes.min() < 1:
        raise ValueError(f"{n_rows} rows are too few for {n_classes} classes")
    return np.sort(sizes)[::-1]


# ---------------------------------------------------------------------------
# latent catalogue and base models
# ---------------------------------------------------------------------------

@dataclass
class Catalogue:
    """Latent positions of the classes and of their parent categories."""

    centres: np.ndarray      # (n_classes, LATENT_DIM)
    parent: np.ndarray       # (n_classes,) parent category index
    log_frequency: np.ndarray


def make_catalogue(sizes: np.ndarray, rng: np.random.Generator) -> Catalogue:
    n_classes = len(sizes)
    n_parents = max(n_classes // LEAVES_PER_PARENT, 2)
    parent = rng.integers(0, n_parents, n_classes)
    parent_centres = rng.normal(0, 1.0, (n_parents, LATENT_DIM))
    centres = parent_centres[parent] + rng.normal(0, 0.45, (n_classes, LATENT_DIM))
    return Catalogue(centres.astype(np.float32), parent, np.log(sizes / sizes.sum()).astype(np.float32))


@dataclass
class Products:
    """Latent draws of a set of products: everything a model's view is built from."""

    y: np.ndarray
    position: np.ndarray               # what the product looks like (ambiguous ones: like a sibling)
    shared_noise: np.ndarray           # noise every model sees
    family_noise: dict[str, np.ndarray]
    own_noise: np.ndarray              # (n_models, n, LATENT_DIM)


def draw_products(y: np.ndarray, catalogue: Catalogue, rng: np.random.Generator) -> Products:
    n = len(y)
    position = catalogue.centres[y].copy()
    ambiguous = np.flatnonzero(rng.random(n) < AMBIGUOUS)
    sibling = _random_sibling(y[ambiguous], catalogue, rng)
    pull = rng.uniform(0.3, 1.0, (len(ambiguous), 1)).astype(np.float32)
    position[ambiguous] += pull * (catalogue.centres[sibling] - position[ambiguous])
    shared = rng.normal(0, 1, (n, LATENT_DIM)).astype(np.float32)
    families = sorted({spec.family for spec in BASE_MODELS})
    family_noise = {f: rng.normal(0, 1, (n, LATENT_DIM)).astype(np.float32) for f in families}
    own = rng.normal(0, 1, (len(BASE_MODELS), n, LATENT_DIM)).astype(np.float32)
    return Products(y, position, shared, family_noise, own)


def _random_sibling(y: np.ndarray, catalogue: Catalogue, rng: np.random.Generator) -> np.ndarray:
    """A random other class of the same parent category (any class when it has none)."""
    by_parent = np.argsort(catalogue.parent, kind="stable")
    parent_sizes = np.bincount(catalogue.parent)
    parent_starts = np.cumsum(parent_sizes) - parent_sizes
    parent = catalogue.parent[y]
    pick = by_parent[parent_starts[parent] + rng.integers(0, parent_sizes[parent])]
    lonely = pick == y
    pick[lonely] = rng.integers(0, len(catalogue.parent), lonely.sum())
    return pick


def model_logits(view: np.ndarray, catalogue: Catalogue, prior_strength: float) -> np.ndarray:
    """``-||view - centre||^2 / 2 + alpha * log(freq)`` up to a per-row constant."""
    centres = catalogue.centres
    return (view @ centres.T - 0.5 * np.sum(centres**2, axis=1)
            + prior_strength * catalogue.log_frequency).astype(np.float32)


def model_view(products: Products, index: int, noise_scale: float, branch_skill: np.ndarray,
               catalogue: Catalogue, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
    spec = BASE_MODELS[index]
    own_share = 1.0 - spec.shared_share - spec.family_share
    noise = (np.sqrt(spec.shared_share) * products.shared_noise[rows]
             + np.sqrt(spec.family_share) * products.family_noise[spec.family][rows]
             + np.sqrt(own_share) * products.own_noise[index][rows])
    scale = noise_scale * branch_skill[catalogue.parent[products.y[rows]]][:, None]
    return products.position[rows] + scale * noise


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return logits


def _bisect(function: Any, target: float, low: float, high: float, increasing: bool, steps: int = 30) -> float:
    for _ in range(steps):
        mid = (low + high) / 2
        below = function(mid) < target
        low, high = (mid, high) if below == increasing else (low, mid)
    return (low + high) / 2


def calibrate_models(catalogue: Catalogue, sizes: np.ndarray, rng: np.random.Generator,
                     n_probe: int = 4000) -> list[tuple[float, float, np.ndarray]]:
    """Per model: (noise scale, beta, per-parent skill) hitting its target accuracy and confidence."""
    y = rng.choice(len(sizes), size=n_probe, p=sizes / sizes.sum())
    probe = draw_products(y, catalogue, rng)
    n_parents = int(catalogue.parent.max()) + 1
    settings = []
    for index, spec in enumerate(BASE_MODELS):
        skill = np.exp(rng.normal(0, 0.35, n_parents)).astype(np.float32)

        def accuracy(noise: float, index=index, spec=spec, skill=skill) -> float:
            view = model_view(probe, index, noise, skill, catalogue)
            return float(np.mean(model_logits(view, catalogue, spec.prior_strength).argmax(1) == y))

        noise = _bisect(accuracy, spec.accuracy, 0.0, 5.0, increasing=False, steps=18)
        logits = model_logits(model_view(probe, index, noise, skill, catalogue), catalogue, spec.prior_strength)

        def confidence(beta: float, logits=logits) -> float:
            return float(softmax_rows(beta * logits).max(axis=1).mean())

        beta = _bisect(confidence, spec.accuracy + spec.overconfidence, 0.01, 50.0, increasing=True)
        settings.append((noise, beta, skill))
    return settings


def predict_models(products: Products, catalogue: Catalogue, settings: list, oof: bool,
                   chunk: int = 8192) -> dict[str, np.ndarray]:
    """float16 probability matrices per model; OOF rows zero their own 1-member class."""
    n, n_classes = len(products.y), len(catalogue.log_frequency)
    singleton = np.bincount(products.y, minlength=n_classes) == 1
    out = {spec.name: np.empty((n, n_classes), dtype=np.float16) for spec in BASE_MODELS}
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        y = products.y[rows]
        for index, (spec, (noise, beta, skill)) in enumerate(zip(BASE_MODELS, settings, strict=True)):
            view = model_view(products, index, noise, skill, catalogue, rows)
            proba = softmax_rows(beta * model_logits(view, catalogue, spec.prior_strength))
            if oof:
                unseen = np.flatnonzero(singleton[y])
                proba[unseen, y[unseen]] = 0.0
                proba /= proba.sum(axis=1, keepdims=True)
            out[spec.name][rows] = proba
    return out


def make_oof(n_rows: int, n_classes: int, n_holdout: int, seed: int = 0) -> dict[str, Any]:
    """Training OOF + hold-out probabilities, labels and class sizes (see the module docstring)."""
    rng = np.random.default_rng(seed)
    sizes = class_sizes(n_rows, n_classes)
    catalogue = make_catalogue(sizes, rng)
    settings = calibrate_models(catalogue, sizes, rng)
    y_train = rng.permutation(np.repeat(np.arange(n_classes), sizes))
    y_holdout = rng.choice(n_classes, size=n_holdout, p=sizes / sizes.sum())
    train = predict_models(draw_products(y_train, catalogue, rng), catalogue, settings, oof=True)
    holdout = predict_models(draw_products(y_holdout, catalogue, rng), catalogue, settings, oof=False)
    return {"train": train, "y_train": y_train, "holdout": holdout, "y_holdout": y_holdout, "sizes": sizes}


# ---------------------------------------------------------------------------
# measurements, each in its own process (peak RSS = that fit alone)
# ---------------------------------------------------------------------------

def save_data(data: dict[str, Any], folder: Path) -> None:
    for part in ("train", "holdout"):
        for name, matrix in data[part].items():
            np.save(folder / f"{part}__{name}.npy", matrix)
    np.save(folder / "y_train.npy", data["y_train"])
    np.save(folder / "y_holdout.npy", data["y_holdout"])


def load_part(folder: Path, part: str) -> dict[str, np.ndarray]:
    return {spec.name: np.load(folder / f"{part}__{spec.name}.npy") for spec in BASE_MODELS}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def rerank_worker(folder: str, params: dict[str, Any]) -> dict[str, Any]:
    """Fit RerankMeta on the training OOF, score the hold-out; report time and memory."""
    from stackcat.meta import AverageBlend, RerankMeta
    from stackcat.metrics import score

    folder_path = Path(folder)
    train, y_train = load_part(folder_path, "train"), np.load(folder_path / "y_train.npy")
    rss_before = peak_rss_gb()
    started = time.perf_counter()
    meta = RerankMeta(**params).fit(train, y_train)
    fit_seconds = time.perf_counter() - started
    rss_fit = peak_rss_gb()
    del train

    holdout, y_holdout = load_part(folder_path, "holdout"), np.load(folder_path / "y_holdout.npy")
    started = time.perf_counter()
    results = {name: matrix.astype(np.float32) for name, matrix in holdout.items()}
    results["average"] = AverageBlend().fit(holdout, y_holdout).predict_proba(holdout)
    results["rerank"] = meta.predict_proba(holdout)
    predict_seconds = time.perf_counter() - started
    scores = {name: score(y_holdout, proba) for name, proba in results.items()}
    # early stopping trains `early_stopping_rounds` trees past the best one before it stops
    trained_trees = (min(meta.iterations, meta.best_iteration_ + meta.early_stopping_rounds)
                     if meta.inner_scores_ else meta.best_iteration_)
    return {
        "fit_seconds": fit_seconds,
        "fit_time_breakdown": meta.fit_times_,
        "predict_seconds_holdout": predict_seconds,
        "peak_rss_gb_after_loading": rss_before,
        "peak_rss_gb_fit": rss_fit,
        "candidate_recall": meta.candidate_recall_,
        "candidates_per_product": meta.n_candidates_,
        "candidate_rows": int(round(meta.n_candidates_ * len(y_train))),
        "best_iteration": meta.best_iteration_,
        "seconds_per_iteration": meta.fit_times_.get("boosting", np.nan) / max(trained_trees, 1),
        "temperature": meta.temperature_,
        "inner_scores": meta.inner_scores_,
        "top_features": _top_features(meta),
        "holdout": scores,
    }


def _top_features(meta: Any, n: int = 12) -> dict[str, float]:
    order = np.argsort(-meta.feature_importances_)[:n]
    return {meta.feature_names_[i]: round(float(meta.feature_importances_[i]), 2) for i in order}


def covering_sample(y: np.ndarray, n_rows: int, rng: np.random.Generator) -> np.ndarray:
    """``n_rows`` random rows holding as many classes as possible (one row of each first)."""
    shuffled = rng.permutation(len(y))
    first_of_class = shuffled[np.unique(y[shuffled], return_index=True)[1]]
    rest = np.setdiff1d(shuffled, first_of_class, assume_unique=True)
    rng.shuffle(first_of_class)
    return np.concatenate([first_of_class, rng.permutation(rest)])[: min(n_rows, len(y))]


def multiclass_worker(folder: str, n_rows: int, iterations: int, threads: int, seed: int) -> dict[str, Any]:
    """Seconds per CatBoost MultiClass iteration on ``n_rows`` rows of the concatenated log-OOF.

    Per-iteration time = (fit with 1 + k trees - fit with 1 tree) / k, so data
    loading and quantization are left out.
    """
    from catboost import CatBoostClassifier

    from stackcat.meta import log_features

    folder_path = Path(folder)
    y = np.load(folder_path / "y_train.npy")
    rows = covering_sample(y, n_rows, np.random.default_rng(seed))
    train = load_part(folder_path, "train")
    features = log_features([m[rows] for m in train.values()])
    del train
    timings = {}
    for n_trees in (1, 1 + iterations):
        model = CatBoostClassifier(loss_function="MultiClass", iterations=n_trees, depth=6,
                                   thread_count=threads, random_seed=seed, verbose=False,
                                   allow_writing_files=False)
        started = time.perf_counter()
        model.fit(features, y[rows])
        timings[n_trees] = time.perf_counter() - started
    return {
        "rows": len(rows),
        "features": features.shape[1],
        "classes_present": int(len(np.unique(y[rows]))),
        "iterations_timed": iterations,
        "fit_seconds_1_iteration": timings[1],
        "seconds_per_iteration": (timings[1 + iterations] - timings[1]) / iterations,
        "peak_rss_gb": peak_rss_gb(),
    }


def extrapolate_multiclass(small: dict[str, Any], large: dict[str, Any], rows: int, classes: int) -> dict[str, Any]:
    """Seconds per iteration at ``rows`` x ``classes`` from two subsample timings.

    Model: ``t = classes_present * (a + b * rows)`` -- split scoring over the
    features' borders costs per class whatever the rows (a), histograms cost
    per row and class (b); a and b are solved from the two measurements. When
    timing noise makes b negative it is set to 0 and the result is only a
    lower bound (``lower_bound``): use larger subsamples (``--multiclass-rows``).
    """
    per_class = [m["seconds_per_iteration"] / m["classes_present"] for m in (small, large)]
    slope = (per_class[1] - per_class[0]) / max(large["rows"] - small["rows"], 1)
    lower_bound = slope <= 0
    slope = max(slope, 0.0)
    intercept = max(per_class[0] - slope * small["rows"], 0.0)
    return {"seconds_per_iteration": classes * (intercept + slope * rows), "a": intercept, "b": slope,
            "lower_bound": lower_bound,
            "model": "t = classes_present * (a + b * rows), a and b from the two subsamples"}


def run_in_child(function: Any, *args: Any) -> Any:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rows", type=int, default=REFERENCE_ROWS, help="training (OOF) rows")
    parser.add_argument("--classes", type=int, default=874)
    parser.add_argument("--holdout", type=float, default=0.2, help="hold-out rows as a share of --rows")
    parser.add_argument("--iterations", type=int, default=500, help="RerankMeta max iterations")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--loss", default="Logloss", help="RerankMeta loss")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--learning-rate", type=float, default=0.1, help="RerankMeta learning rate (0 = CatBoost auto)")
    parser.add_argument("--class-feature", action=argparse.BooleanOptionalAction, default=True,
                        help="the candidate class as a CatBoost categorical feature")
    parser.add_argument("--refit", action="store_true")
    parser.add_argument("--multiclass-iterations", type=int, default=2,
                        help="MultiClass iterations timed (after a 1-iteration warm-up fit); 0 skips it")
    parser.add_argument("--multiclass-rows", type=int, default=2000,
                        help="MultiClass timed on this many rows and on half as many (one row of each class first)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    data = make_oof(args.rows, args.classes, int(round(args.rows * args.holdout)), args.seed)
    sizes = data["sizes"]
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "data": {
            "rows": args.rows, "holdout_rows": len(data["y_holdout"]), "classes": args.classes,
            "models": [spec.name for spec in BASE_MODELS],
            "largest_classes": sizes[:5].tolist(),
            "classes_with_1_2_rows": int(np.sum(sizes <= 2)),
            "classes_with_1_row": int(np.sum(sizes == 1)),
            "oof_accuracy": {name: float(np.mean(m.argmax(1) == data["y_train"]))
                             for name, m in data["train"].items()},
            "oof_mean_confidence": {name: float(m.max(1).astype(np.float32).mean())
                                    for name, m in data["train"].items()},
            "generation_seconds": time.perf_counter() - started,
        },
    }
    print(json.dumps(report["data"], indent=2), flush=True)
    params = {"iterations": args.iterations, "n_threads": args.threads, "loss": args.loss,
              "top_k": args.top_k, "learning_rate": args.learning_rate or None,
              "class_feature": args.class_feature, "refit": args.refit, "random_state": args.seed}
    report["rerank_params"] = params
    with tempfile.TemporaryDirectory(prefix="stackcat-meta-scale-") as folder:
        save_data(data, Path(folder))
        del data
        report["rerank"] = run_in_child(rerank_worker, folder, params)
        print(json.dumps(report["rerank"], indent=2, default=float), flush=True)
        if args.multiclass_iterations > 0:
            sizes = (args.multiclass_rows // 2, args.multiclass_rows)
            timings = [run_in_child(multiclass_worker, folder, size, args.multiclass_iterations,
                                    args.threads, args.seed) for size in sizes]
            full = extrapolate_multiclass(*timings, args.rows, args.classes)
            timing = {"subsamples": timings, "extrapolated_full": full}
            report["multiclass"] = timing
            report["speedup_per_iteration"] = (full["seconds_per_iteration"]
                                               / report["rerank"]["seconds_per_iteration"])
            print(json.dumps(timing, indent=2), flush=True)
    report["total_seconds"] = time.perf_counter() - started
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=float), encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
