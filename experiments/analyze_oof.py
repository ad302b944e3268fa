"""Where a finished stack's errors come from: oracle accuracy, shared errors, look-alike pairs, tiny classes.

    python experiments/analyze_oof.py artifacts/myntra_images

Reads ``stacker.joblib`` of a run folder written by ``stackcat fit`` or
``experiments/myntra_stack.py`` and prints, over the out-of-fold predictions:
each base model's, the average blend's and the meta-learner's error count;
the products no base model gets right (so no selector can fix); errors shared
by each pair of models; the most frequent confused class pairs of the blend;
and the classes too small to ever be right out of fold.
"""

from __future__ import annotations

import argparse
import itertools
from collections import Counter
from pathlib import Path

import numpy as np

from stackcat.stacking import StackingCategorizer

SMALL_CLASS = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--pairs", type=int, default=8, help="confused class pairs to list")
    args = parser.parse_args()

    stack = StackingCategorizer.load(args.run_dir)  # signature checked before unpickling
    y, classes = stack.oof_target_, np.asarray(stack.classes_)
    predicted = {name: np.asarray(p).argmax(axis=1) for name, p in stack.oof_.items()}
    blend = np.mean([np.asarray(p, dtype=np.float32) for p in stack.oof_.values()], axis=0).argmax(axis=1)
    wrong = {name: p != y for name, p in predicted.items()}

    print(f"{len(y)} products, {len(classes)} classes")
    for name, errors in wrong.items():
        print(f"  {name:10s} {errors.sum():6d} errors")
    print(f"  {'average':10s} {(blend != y).sum():6d} errors")
    if stack.meta_oof_ is not None:
        print(f"  {'meta':10s} {(stack.meta_oof_.argmax(axis=1) != y).sum():6d} errors ({type(stack.meta_).__name__})")

    nobody_right = np.logical_and.reduce(list(wrong.values()))
    print(f"no base model right on {nobody_right.sum()} products: oracle accuracy {1 - nobody_right.mean():.4f}")
    print(f"blend errors some model gets right: {((blend != y) & ~nobody_right).sum()}")
    for a, b in itertools.combinations(wrong, 2):
        shared = (wrong[a] & wrong[b]).sum()
        print(f"  errors shared by {a} and {b}: {shared} ({shared / min(wrong[a].sum(), wrong[b].sum()):.0%} of the smaller)")

    pairs = Counter(tuple(sorted((classes[t], classes[p]))) for t, p in zip(y[blend != y], blend[blend != y], strict=True))
    top = pairs.most_common(args.pairs)
    print(f"blend's top {args.pairs} confused pairs ({sum(n for _, n in top) / max(1, (blend != y).sum()):.0%} of its errors):")
    for (a, b), n in top:
        print(f"  {a} / {b}: {n}")

    counts = np.bincount(y, minlength=len(classes))
    never_right = [c for c in range(len(classes)) if not any((p[y == c] == c).any() for p in predicted.values())]
    print(f"classes with < {SMALL_CLASS} products: {(counts < SMALL_CLASS).sum()} ({counts[counts < SMALL_CLASS].sum()} rows); "
          f"never right out of fold in any model: {len(never_right)} -> macro F1 <= "
          f"{(len(classes) - len(never_right)) / len(classes):.3f}")


if __name__ == "__main__":
    main()
