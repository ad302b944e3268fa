"""The full stack on real data (Myntra), against its parts and against the peers.

Image subset (9,583 products with a photo, 75 classes):
    python experiments/myntra_stack.py --subset images --run-dir artifacts/myntra_images

Text only, all 44,446 products (143 classes):
    python experiments/myntra_stack.py --subset all --models fasttext,bert --run-dir artifacts/myntra_text

Target articleType; text = productDisplayName + gender, baseColour, season, usage
(values only, lower-cased, as in the reference figures); folds
StratifiedKFold(5, shuffle=True, random_state=42). Base models run through
``StackingCategorizer`` with a run folder, so a stopped run resumes; each
meta-learner is then fitted on the same OOF matrices and scored on its own
nested out-of-fold predictions. Peers on the same folds: TF-IDF + LinearSVC,
plain fastText, and scikit-learn-style stacking (LogisticRegression on the
concatenated log-OOF, nested over the same folds).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from stackcat.data import TableSpec, prepare_table, read_table
from stackcat.meta import RerankMeta
from stackcat.metrics import comparison_table
from stackcat.models.fasttext import FastTextClassifier
from stackcat.presets import OFFLINE_TEXT_PREFIX, ModelOptions, build_models, offline_weights
from stackcat.progress import print_stage_lines
from stackcat.report import write_report
from stackcat.stacking import StackingCategorizer, nested_meta_oof
from stackcat.taxonomy import CategoryTree, hierarchy_scores

SPEC = TableSpec(text_columns=["productDisplayName"], attribute_columns=["gender", "baseColour", "season", "usage"],
                 target="articleType", id_column="id", image_dir="images_224", attribute_keys=False,
                 lowercase=True)
PROFILES = {
    # frozen multilingual e5-small: each text encoded once per run, heads trained on the cache
    "frozen": {},
    # fine-tuned e5-small (word embeddings frozen: on a CPU, AdamW's update of the 96M-parameter
    # embedding matrix costs more than the rest of the step)
    "finetuned": {"bert": {"freeze_embeddings": True}, "fusion": {"freeze_embeddings": True}},
}


def load_subset(data_dir: Path, subset: str) -> pd.DataFrame:
    raw = read_table(data_dir / "styles_merged.csv")
    if subset == "images":
        has_image = raw["id"].map(lambda i: (data_dir / "images_224" / f"{i}.jpg").exists())
        raw = raw[has_image.to_numpy(dtype=bool)].reset_index(drop=True)
    return raw


def peak_rss_mb() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


PEERS = ("tfidf_linearsvc", "plain_fasttext", "sklearn_stacking_lr")


def peer_predictions(frame: pd.DataFrame, y_index: np.ndarray, folds: np.ndarray, n_classes: int,
                     oof: dict[str, np.ndarray], peers: tuple[str, ...] = PEERS) -> dict[str, np.ndarray]:
    """Out-of-fold one-hot/probabilities of the peers, on the stack's folds."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import LinearSVC

    texts = frame["text"].to_numpy(dtype=object)
    results = {f"peer:{name}": np.zeros((len(texts), n_classes), dtype=np.float32) for name in peers}
    stacked_features = np.hstack([np.log(np.clip(np.asarray(m, dtype=np.float64), 1e-7, 1)) for m in oof.values()])
    for fold in np.unique(folds):
        train, test = folds != fold, folds == fold
        if "tfidf_linearsvc" in peers:
            svc = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), LinearSVC())
            svc.fit(texts[train], y_index[train])
            results["peer:tfidf_linearsvc"][np.flatnonzero(test), svc.predict(texts[test])] = 1.0
        if "plain_fasttext" in peers:
            plain = FastTextClassifier(epoch=25, lr=0.5, wordNgrams=2, minn=2, maxn=5, dim=100, title_repeat=0,
                                       normalize=False, bucket=2_000_000)
            plain.fit(list(texts[train]), y_index[train])
            results["peer:plain_fasttext"][np.ix_(np.flatnonzero(test), plain.classes_)] = plain.predict_proba(
                list(texts[test]))
        if "sklearn_stacking_lr" in peers:
            lr = LogisticRegression(C=1.0, max_iter=2000).fit(stacked_features[train], y_index[train])
            results["peer:sklearn_stacking_lr"][np.ix_(np.flatnonzero(test), lr.classes_)] = lr.predict_proba(
                stacked_features[test])
    return results


def myntra_tree(raw: pd.DataFrame, frame: pd.DataFrame) -> CategoryTree:
    """masterCategory > subCategory > articleType: label structure only, never an input.

    An articleType filed under several subCategories takes its most frequent one.
    """
    kept = raw.set_index(raw["id"].astype(str)).loc[frame["id"].astype(str)]
    paths = (kept.groupby("articleType")[["masterCategory", "subCategory"]]
             .agg(lambda column: column.value_counts().index[0]))
    classes = sorted(paths.index)
    return CategoryTree(classes, [[m, f"{m}/{s}", f"{m}/{s}/{c}"] for c, (m, s) in
                                  ((c, paths.loc[c]) for c in classes)],
                        titles={**{m: m for m in paths["masterCategory"]},
                                **{f"{m}/{s}": s for m, s in paths.itertuples(index=False)},
                                **{f"{m}/{s}/{c}": c for c, (m, s) in paths.iterrows()}})


def ablations(stack: StackingCategorizer, with_tree: bool) -> dict[str, np.ndarray]:
    """RerankMeta's nested OOF with each feature group switched off, on the stack's OOF and signals."""
    inputs = stack.meta_inputs_
    variants = {"rerank:probabilities_only": {"signal_groups": (), "hierarchy_levels": 0},
                "rerank:no_retrieval": {"signal_groups": ("names",)},
                "rerank:no_names": {"signal_groups": ("retrieval",)}}
    if with_tree:
        variants["rerank:no_hierarchy"] = {"hierarchy_levels": 0}
    out = {}
    for name, params in variants.items():
        started = time.perf_counter()
        out[name] = nested_meta_oof(RerankMeta(**params), stack.oof_, stack.oof_target_, stack.fold_of_row_,
                                    inputs.get("signals"), inputs.get("ancestors"))
        print(f"{name}: {time.perf_counter() - started:.0f} s, accuracy "
              f"{(out[name].argmax(1) == stack.oof_target_).mean():.4f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/myntra"))
    parser.add_argument("--subset", choices=["images", "all"], default="images")
    parser.add_argument("--models", default="fasttext,bert,image,fusion")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="frozen")
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=2, help="BERT epochs (fine-tuned profile)")
    parser.add_argument("--run-dir", type=Path, default=Path("artifacts/myntra_images"))
    parser.add_argument("--results", type=Path, default=Path("experiments/results/myntra"))
    parser.add_argument("--n-jobs", type=int, default=1)
    parser.add_argument("--metas", default="auto",
                        help="meta-learners to fit on the OOF after the average blend (comma-separated); "
                             "auto reports the average, ensemble selection and RerankMeta")
    parser.add_argument("--tree", action="store_true",
                        help="give the stack masterCategory > subCategory > articleType as the category tree")
    parser.add_argument("--ablation", action="store_true", help="RerankMeta with each feature group off")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help="comma-separated peers on the same folds ('' for none; sklearn_stacking_lr is slow)")
    args = parser.parse_args()
    with print_stage_lines():
        run(args)


def run(args: argparse.Namespace) -> None:

    timings: dict[str, float] = {}
    start = time.perf_counter()
    raw = load_subset(args.data, args.subset)
    spec = SPEC if args.subset == "images" else TableSpec(**{**SPEC.to_dict(), "image_dir": None})
    prepared = prepare_table(raw, spec, base_dir=args.data)
    frame = prepared.frame
    labels = frame["label"].to_numpy(dtype=object)
    print(prepared.summary().splitlines()[0], flush=True)
    timings["prepare_data"] = time.perf_counter() - start

    text_model, image_encoder = offline_weights()
    options = ModelOptions(text_model=text_model, text_prefix=OFFLINE_TEXT_PREFIX, image_encoder=image_encoder,
                           cache_dir=str(args.run_dir / "embeddings"), max_length=args.max_length,
                           freeze_text_encoder=args.profile == "frozen",
                           epochs=args.epochs, random_state=0, progress=True)
    names = args.models.split(",")
    profile = PROFILES[args.profile]
    models = build_models(names, options, {name: params for name, params in profile.items() if name in names})
    stack = StackingCategorizer(models, meta="average", n_splits=5, random_state=42, run_dir=args.run_dir,
                                n_jobs=args.n_jobs, verbose=1)
    start = time.perf_counter()
    stack.fit(frame, labels)
    timings["base_models_wall"] = time.perf_counter() - start
    for model, row in stack.jobs_.groupby("model")[["fit_seconds", "predict_seconds"]].sum().iterrows():
        timings[f"{model}_fit"] = float(row.fit_seconds)
        timings[f"{model}_predict"] = float(row.predict_seconds)

    results = {name: np.asarray(p, dtype=np.float32) for name, p in stack.oof_.items()}
    results["average"] = np.mean(list(results.values()), axis=0)
    tree = myntra_tree(raw, frame) if args.tree else None
    for meta in args.metas.split(","):
        start = time.perf_counter()
        stack.set_params(meta=meta, tree=tree).fit(frame, labels)
        timings[f"meta_{meta}_nested_cv_and_fit"] = time.perf_counter() - start
        if meta == "auto":
            results.update({f"meta:{name}": proba for name, proba in stack.candidate_meta_oof_.items()})
            print(stack.meta_selection_.round(4).to_string(), flush=True)
        else:
            results[f"meta:{meta}"] = stack.meta_oof_
    if args.ablation:
        start = time.perf_counter()
        results.update(ablations(stack, tree is not None))
        timings["ablations"] = time.perf_counter() - start
    start = time.perf_counter()
    peers = tuple(name for name in args.peers.split(",") if name)
    if peers:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            results.update(peer_predictions(frame, stack.oof_target_, stack.fold_of_row_, len(stack.classes_),
                                            stack.oof_, peers))
    timings["peers"] = time.perf_counter() - start
    if tree is not None:
        for name, proba in results.items():
            scores = hierarchy_scores(stack.oof_target_, proba.argmax(axis=1), tree.aligned(stack.classes_))
            print(f"tree {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))

    table = comparison_table(results, stack.oof_target_)
    args.results.mkdir(parents=True, exist_ok=True)
    report = write_report(args.run_dir / "comparison", results, stack.oof_target_, stack.classes_, y_kind="indices",
                          train_counts=stack.class_counts_,
                          title=f"Myntra {args.subset}: stackcat vs its parts and the peers",
                          headline=f"meta:{type(stack.meta_).__name__}")
    for png in report.parent.glob("*.png"):
        shutil.copy(png, args.results / png.name)
    summary = {"subset": args.subset, "rows": len(frame), "classes": len(stack.classes_),
               "models": names, "profile": args.profile, "text_model": text_model, "image_encoder": image_encoder,
               "max_length": args.max_length, "scores": table.round(4).to_dict("index"),
               "seconds": {k: round(v, 1) for k, v in timings.items()}, "peak_rss_mb": peak_rss_mb()}
    (args.results / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(table.round(4).to_string())
    print(json.dumps(summary["seconds"], indent=2))
    print(f"peak RSS {summary['peak_rss_mb']} MB; report {report}")


if __name__ == "__main__":
    main()
