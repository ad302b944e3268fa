"""The ``stackcat`` command line: one entry point, one subcommand per job.

Exit codes: 0 ok, 1 the run failed (bad data, a model error), 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from stackcat import __version__

EXIT_OK, EXIT_RUN_ERROR, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stackcat",
        description="Stacked product categorization: FastText, BERT, CLIP and a fusion net "
                    "combined by a CatBoost meta-learner.",
    )
    parser.add_argument("--version", action="version", version=f"stackcat {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = commands.add_parser("demo", help="run on the embedded demo data (Myntra subset) and print scores")
    demo.add_argument("--folds", type=int, default=5, help="number of stratified folds (default 5)")
    demo.add_argument("--rows", type=int, default=None, help="use a stratified subsample of N rows")
    demo.set_defaults(handler=run_demo)
    return parser


def run_demo(args: argparse.Namespace) -> int:
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    from stackcat.data import TableSpec, prepare_table
    from stackcat.demo import DEMO_COLUMNS, load_demo
    from stackcat.models.fasttext import FastTextClassifier

    raw, _ = load_demo(n_rows=args.rows)
    prepared = prepare_table(raw, TableSpec(**DEMO_COLUMNS))
    print(prepared.summary())
    frame, y = prepared.frame, prepared.frame["label"].to_numpy(dtype=object)
    start = time.perf_counter()
    folds = StratifiedKFold(args.folds, shuffle=True, random_state=42)
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")
        predicted = cross_val_predict(FastTextClassifier(), frame, y, cv=folds)
    print(f"FastText, {args.folds}-fold out-of-fold: weighted F1 {f1_score(y, predicted, average='weighted'):.4f}, "
          f"macro F1 {f1_score(y, predicted, average='macro'):.4f}, accuracy {accuracy_score(y, predicted):.4f} "
          f"({time.perf_counter() - start:.1f} s, {len(np.unique(y))} categories)")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
