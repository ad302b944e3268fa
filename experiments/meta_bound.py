"""The meta's training sample bound: RerankMeta's fit time and errors at several max_train_products.

    python experiments/meta_bound.py RUN_DIR --bounds none 20000 10000 --out results/meta_bound.json

RUN_DIR is a finished ``stackcat fit`` run folder (its table is read again from the
path in table.json; the retrieval signals are recomputed out of fold from the
run's cached embeddings, as the fit computes them). One split: the meta learns
from the OOF probabilities and signals of the rows outside one of the run's folds
(``--fold``, default 0) and is scored on that fold's rows, once per bound (RerankMeta defaults otherwise,
random_state 0). With ``meta="auto"`` the fit runs this learner six times (five
nested folds and the final fit), so its fit seconds here are about a sixth of
the meta stage.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from stackcat import topk
from stackcat.data import TableSpec, prepare_table, read_table
from stackcat.meta import AverageBlend, RerankMeta
from stackcat.stacking import StackingCategorizer


def bound_value(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--bounds", nargs="+", type=bound_value, default=[None, 20_000, 10_000])
    parser.add_argument("--fold", type=int, default=0, help="the run's fold scored (the meta learns from the others)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    table = json.loads((args.run_dir / "table.json").read_text())
    stack = StackingCategorizer.load(args.run_dir)
    frame = prepare_table(read_table(Path(table["source"])), TableSpec.from_dict(table["spec"])).frame
    labels = frame["label"].to_numpy(dtype=object)
    y_index = np.searchsorted(stack.classes_, labels)
    assert (stack.classes_[y_index] == labels).all()
    start = time.perf_counter()
    signals = stack._fit_signals(frame, y_index)
    signal_seconds = time.perf_counter() - start
    train, test = np.flatnonzero(stack.fold_of_row_ != args.fold), np.flatnonzero(stack.fold_of_row_ == args.fold)
    oof_train = {k: topk.take_rows(v, train) for k, v in stack.oof_.items()}
    oof_test = {k: topk.take_rows(v, test) for k, v in stack.oof_.items()}
    signals_train = {k: topk.take_rows(v, train) for k, v in signals.items()}
    signals_test = {k: topk.take_rows(v, test) for k, v in signals.items()}
    average = AverageBlend().fit(oof_train, y_index[train]).predict_proba(oof_test)
    rows = [{"meta": "average", "errors": int((average.argmax(axis=1) != y_index[test]).sum())}]
    for bound in args.bounds:
        meta = RerankMeta(max_train_products=bound, random_state=0)
        start, cpu = time.perf_counter(), time.process_time()
        meta.fit(oof_train, y_index[train], signals=signals_train)
        fit_wall, fit_cpu = time.perf_counter() - start, time.process_time() - cpu
        proba = meta.predict_proba(oof_test, signals=signals_test)
        rows.append({"meta": "RerankMeta", "max_train_products": bound, "train_products": len(train),
                     "test_products": len(test), "errors": int((proba.argmax(axis=1) != y_index[test]).sum()),
                     "fit_seconds": round(fit_wall, 1), "fit_cpu_seconds": round(fit_cpu, 1),
                     "iterations": int(meta.best_iteration_)})
        print(json.dumps(rows[-1]), flush=True)
    summary = {"run_dir": str(args.run_dir), "fold": args.fold, "signal_seconds": round(signal_seconds, 1), "rows": rows}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
