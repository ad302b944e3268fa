"""Stack OOF matrices taken from several finished run folders (same data, classes and folds).

    python experiments/combine_runs.py artifacts/demo:fasttext,image,fusion artifacts/demo_ft_headlr:bert
    python experiments/combine_runs.py artifacts/demo:fasttext,bert,image,fusion artifacts/demo_ft_headlr:bert=bert_ft

Each argument is ``RUN_DIR:model,model``: the named models' out-of-fold
probabilities are taken from that run's ``stacker.joblib``; ``model=alias``
renames one (two runs' ``bert`` side by side). Runs must share the
class list, the targets and the fold of every row (same table and ``--seed``),
which is checked. Prints each model, the average blend and RerankMeta scored
on its nested OOF (refitted fold by fold on the other folds' rows), as the
stack itself does. Use it to try a base model from one run beside the models
of another without recomputing either.
"""

from __future__ import annotations

import argparse

import numpy as np

from stackcat.meta import RerankMeta
from stackcat.metrics import comparison_table
from stackcat.stacking import StackingCategorizer, nested_meta_oof


def load_oof(specs: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    oof, reference = {}, None
    for spec in specs:
        run_dir, _, names = spec.partition(":")
        stack = StackingCategorizer.load(run_dir)  # signature checked before unpickling
        identity = (list(stack.classes_), stack.oof_target_, stack.fold_of_row_)
        if reference is None:
            reference = identity
        elif (identity[0] != reference[0] or not np.array_equal(identity[1], reference[1])
              or not np.array_equal(identity[2], reference[2])):
            raise SystemExit(f"{run_dir}: classes, targets or folds differ from {specs[0].partition(':')[0]}")
        for entry in names.split(","):
            name, _, alias = entry.partition("=")
            if name not in stack.oof_:
                raise SystemExit(f"{run_dir} has no model {name!r} (it has {list(stack.oof_)})")
            oof[alias or name] = np.asarray(stack.oof_[name], dtype=np.float32)
    return oof, reference[1], reference[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="RUN_DIR:model,model")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    oof, y, folds = load_oof(args.runs)
    results = dict(oof)
    results["average"] = np.mean(list(oof.values()), axis=0)
    results["meta:RerankMeta"] = nested_meta_oof(RerankMeta(n_threads=args.threads), oof, y, folds)
    print(comparison_table(results, y).round(4).to_string())


if __name__ == "__main__":
    main()
