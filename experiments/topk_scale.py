"""The meta path at marketplace scale on top-k OOF: memory and time (simulation).

    python experiments/topk_scale.py --rows 1000000 --classes 5000 --members 4 --k 32

Simulates each member's out-of-fold probabilities directly as top-k CSR
matrices (``stackcat.topk``; a dense 1M x 5,000 float32 matrix would be 20 GB
per member): a long-tailed class distribution (Zipf), members of different
accuracy whose errors are partly shared (a "confusable" sibling per class),
probability mass spread over the stored entries. Then runs what the stack runs
after the base models -- the scores of every member, the plain average, greedy
ensemble selection and RerankMeta (fitted on a sample of ``max_train_products``
products, predicting every product) -- and reports each step's time and the
process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
from scipy import sparse

from stackcat.meta import AverageBlend, EnsembleSelection, RerankMeta
from stackcat.metrics import score
from stackcat.topk import weighted_sum

BLOCK = 100_000


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def simulate(n_rows: int, n_classes: int, n_members: int, k: int, seed: int) -> tuple[list, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_classes + 1) ** 1.1
    y = rng.choice(n_classes, n_rows, p=weights / weights.sum())
    sibling = rng.permutation(n_classes)  # each class's look-alike
    shared_hard = rng.random(n_rows) < 0.04  # products every member tends to get wrong
    members = []
    for m in range(n_members):
        accuracy = 0.80 + 0.03 * m
        blocks = []
        for start in range(0, n_rows, BLOCK):
            rows = np.arange(start, min(start + BLOCK, n_rows))
            truth = y[rows]
            right = (rng.random(len(rows)) < accuracy) & ~(shared_hard[rows] & (rng.random(len(rows)) < 0.7))
            top1 = np.where(right, truth, np.where(rng.random(len(rows)) < 0.6, sibling[truth],
                                                    rng.integers(0, n_classes, len(rows))))
            others = rng.integers(0, n_classes, (len(rows), k))
            others[:, 0] = top1
            # the runner-up is often the answer, but 3% of the time the answer is not stored at all
            runner_up = np.where(rng.random(len(rows)) < 0.97, truth, rng.integers(0, n_classes, len(rows)))
            others[:, 1] = np.where(right, sibling[truth], runner_up)
            values = rng.dirichlet(np.r_[8.0, 2.0, np.full(k - 2, 0.15)], size=len(rows)).astype(np.float32)
            values.sort(axis=1)
            values = values[:, ::-1] * 0.97  # 3% of the mass outside the top-k
            matrix = sparse.csr_matrix((values.ravel(), (np.repeat(np.arange(len(rows)), k), others.ravel())),
                                       shape=(len(rows), n_classes))  # duplicates add up
            matrix.sum_duplicates()
            blocks.append(matrix)
        members.append(sparse.vstack(blocks, format="csr"))
    return members, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=5000)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=100, help="RerankMeta boosting iterations")
    parser.add_argument("--max-train-products", type=int, default=300_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("experiments/results/topk_scale.json"))
    args = parser.parse_args()

    timings, scores = {}, {}
    start = time.perf_counter()
    members, y = simulate(args.rows, args.classes, args.members, args.k, args.seed)
    timings["simulate"] = time.perf_counter() - start
    probas = {f"m{i}": m for i, m in enumerate(members)}
    stored_mb = sum(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes for m in members) / 2**20
    print(f"{args.rows:,} rows x {args.classes:,} classes x {args.members} members, top-{args.k}: "
          f"{stored_mb:,.0f} MB stored (dense float32 would be "
          f"{args.rows * args.classes * 4 * args.members / 2**30:,.1f} GB)", flush=True)

    def step(name, work):
        started = time.perf_counter()
        result = work()
        timings[name] = time.perf_counter() - started
        print(f"{name}: {timings[name]:.1f} s, peak RSS {peak_rss_gb():.2f} GB", flush=True)
        return result

    for name, matrix in probas.items():
        scores[name] = step(f"score_{name}", lambda matrix=matrix: score(y, matrix))
    blend_proba = step("average", lambda: weighted_sum(list(probas.values()), [1 / len(probas)] * len(probas)))
    scores["average"] = step("score_average", lambda: score(y, blend_proba))
    selection = step("ensemble_fit", lambda: EnsembleSelection(n_iterations=20).fit(probas, y))
    scores["ensemble"] = step("ensemble_score", lambda: score(y, selection.predict_proba(probas)))
    average_meta = step("average_meta_fit", lambda: AverageBlend().fit(probas, y))
    scores["average_meta"] = step("average_meta_score", lambda: score(y, average_meta.predict_proba(probas)))
    rerank = RerankMeta(iterations=args.iterations, n_threads=args.threads, class_feature=False,
                        max_train_products=args.max_train_products, early_stopping_rounds=None)
    step("rerank_fit", lambda: rerank.fit(probas, y))
    proba = step("rerank_predict", lambda: rerank.predict_proba(probas))
    scores["rerank"] = step("rerank_score", lambda: score(y, proba))
    summary = {"rows": args.rows, "classes": args.classes, "members": args.members, "k": args.k,
               "stored_mb": round(stored_mb), "rerank_iterations": args.iterations,
               "max_train_products": args.max_train_products, "n_candidates_per_product": rerank.n_candidates_,
               "seconds": {k: round(v, 1) for k, v in timings.items()}, "peak_rss_gb": round(peak_rss_gb(), 2),
               "scores": {k: {m: round(v, 4) for m, v in s.items() if m in ("accuracy", "weighted_f1", "macro_f1",
                                                                          "top5_accuracy")}
                          for k, s in scores.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
