"""How much the ``metric`` member's errors repeat the other members' (Myntra image subset run folder).

    python experiments/metric_space_overlap.py --run-dir RUN

Reads the fold jobs' OOF files of a run folder filled by experiments/metric_space_myntra.py
(members ``metric``, ``lexical``, ``bert``, ``fusion``, ``image``) and prints, for each other
member, the share of ``metric``'s errors it shares, and on how many of the products that all
three text members (lexical, bert, fusion) get wrong ``metric`` is right.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def oof_predictions(run_dir: Path, model: str) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, predicted class index)`` of a member's stored fold jobs."""
    rows, predicted = [], []
    for path in sorted((run_dir / "jobs" / model).glob("fold-*.oof.npz")):
        with np.load(path) as stored:
            rows.append(stored["test"])
            predicted.append(stored["oof"].argmax(axis=1))
    return np.concatenate(rows), np.concatenate(predicted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    args = parser.parse_args()
    import joblib

    stack = joblib.load(args.run_dir / "stacker.joblib")
    y = stack.oof_target_
    wrong = {}
    for model in ("metric", "lexical", "bert", "fusion", "image"):
        rows, predicted = oof_predictions(args.run_dir, model)
        wrong[model] = np.zeros(len(y), dtype=bool)
        wrong[model][rows] = predicted != y[rows]
    for model in ("lexical", "bert", "fusion", "image"):
        shared = int((wrong["metric"] & wrong[model]).sum())
        print(f"metric {wrong['metric'].sum()} errors, {model} {wrong[model].sum()}: {shared} shared "
              f"({shared / wrong['metric'].sum():.0%} of metric's)")
    text_wrong = wrong["lexical"] & wrong["bert"] & wrong["fusion"]
    print(f"metric right on {int((~wrong['metric'] & text_wrong).sum())} of the {int(text_wrong.sum())} products "
          "lexical, bert and fusion all get wrong")


if __name__ == "__main__":
    main()
