"""Where one product's prediction spends its time: per stage and per member, on a loaded model.

Loads MODEL (a bundle or a run folder) in this process, timing the imports and
the load, predicts one demo product to warm up (first calls load the encoders),
then predicts ``--repeats`` single products (text-only, or with a demo photo
each: ``--photo``) and reports the median milliseconds of each stage:

- ``prepare``: ``prepare_table`` of the raw row (the service's path);
- ``images``: the image status check;
- ``member:<name>``: each member's ``predict_proba`` (all its fold models);
- ``signals``: the re-ranker's retrieval and name signals (``_predict_signals``);
- ``meta``: the meta-learner's ``predict_proba`` on the members' probabilities;
- ``output``: top-k, review marks and the output frame;
- ``total``: ``Predictor.predict_prepared`` end to end on the same product again: its
  text and photo are then in the encoders' memory caches, so this is the cost
  without the encoders (in ``member:bert``, the first text member, and ``member:image``).

Stages are timed in wall time, or with ``--cpu`` in the process's CPU time
(all threads), which the other jobs of a shared box inflate much less.

``--cprofile N`` adds the top N functions by cumulative time over the repeats.

    python experiments/profile_predict.py artifacts/demo-bundle --repeats 50 --cpu --threads 1
    python experiments/profile_predict.py artifacts/demo-bundle --repeats 30 --photo --cpu --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import time

T0 = time.perf_counter()
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from stackcat.data import prepare_table  # noqa: E402
from stackcat.demo import DEMO_COLUMNS, load_demo  # noqa: E402
from stackcat.predictor import Predictor  # noqa: E402
from stackcat.serve.app import service_spec  # noqa: E402
from stackcat.topk import dense_rows  # noqa: E402

FIELDS = [*DEMO_COLUMNS["text_columns"], *DEMO_COLUMNS["attribute_columns"]]
# What a stage's time is read from: wall time, or with --cpu the process's CPU time (all its threads),
# which other jobs on a shared box inflate much less.
clock = time.perf_counter


def raw_rows(predictor: Predictor, n: int, photo: bool, seed: int = 7) -> list[tuple[pd.DataFrame, str | None]]:
    """``n`` single demo products as the service hands them to the model: a raw row and its photo's path."""
    raw, _ = load_demo()
    rows = raw.sample(n=n, replace=n > len(raw), random_state=seed)
    columns = service_spec(predictor).required_columns(with_target=False)
    out = []
    for i in range(n):
        row = rows.iloc[[i]]
        frame = pd.DataFrame({c: row[c].to_numpy(dtype=object) if c in row else [None] for c in columns}, dtype=object)
        out.append((frame, str(row["image_path"].iloc[0]) if photo else None))
    return out


def stage_times(predictor: Predictor, raw: pd.DataFrame, image: str | None) -> dict[str, float]:
    from stackcat import topk
    from stackcat.data import PreparedTable
    from stackcat.stacking.estimator import _plain_average, predict_aligned

    times: dict[str, float] = {}
    spec = service_spec(predictor)
    began = clock()
    frame = prepare_table(raw, spec, with_target=False).frame
    frame["image_path"] = [image]
    times["prepare"] = clock() - began

    began = clock()
    if predictor.image_members:
        predictor.check_images(PreparedTable(frame=frame, spec=spec), allow_missing=True)
    times["images"] = clock() - began

    stack = predictor.stack
    top_k = getattr(stack, "oof_top_k_", None)
    base = {}
    for name, refs in stack.fold_models_.items():
        began = clock()
        probas = [predict_aligned(stack._model(ref), frame, stack.classes_, "float32", top_k) for ref in refs]
        mean = _plain_average(probas)
        base[name] = mean if top_k is None else topk.as_top_k(mean, top_k)
        times[f"member:{name}"] = clock() - began

    began = clock()
    context = stack._predict_context(frame)
    times["signals"] = clock() - began

    began = clock()
    proba = stack.meta_.predict_proba(base, **context)
    times["meta"] = clock() - began

    began = clock()
    dense = dense_rows(proba, slice(None), spread=False)
    np.argsort(-dense, axis=1, kind="stable")[:, :5]
    times["output"] = clock() - began

    began = clock()
    predictor.predict_prepared(frame)
    times["total"] = clock() - began
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--photo", action="store_true", help="each product with a demo photo (a new one each time)")
    parser.add_argument("--cprofile", type=int, default=0, metavar="N")
    parser.add_argument("--threads", type=int, help="compute on this many threads, as stackcat serve --threads")
    parser.add_argument("--cpu", action="store_true", help="stages in CPU time of the process, not wall time")
    parser.add_argument("--sort", default="cumulative", help="cProfile order: cumulative or tottime")
    args = parser.parse_args()
    global clock
    clock = time.process_time if args.cpu else time.perf_counter

    imported = time.perf_counter() - T0
    began = time.perf_counter()
    predictor = Predictor.load(args.model, trusted=True)
    loaded = time.perf_counter() - began
    if args.threads is not None:
        from stackcat.core import set_threads

        set_threads(args.threads)
    rows = raw_rows(predictor, args.repeats + 1, args.photo)
    began = time.perf_counter()
    stage_times(predictor, *rows[0])
    first = time.perf_counter() - began

    profiler = None
    if args.cprofile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    runs = [stage_times(predictor, raw, image) for raw, image in rows[1:]]
    if profiler is not None:
        profiler.disable()
    median = {stage: round(1000 * float(np.median([r[stage] for r in runs])), 2) for stage in runs[0]}
    p99 = round(1000 * float(np.percentile([r["total"] for r in runs], 99)), 2)
    report = {"model": args.model, "photo": args.photo, "repeats": args.repeats, "clock": clock.__name__,
              "threads": args.threads,
              "imports_s": round(imported, 2), "load_s": round(loaded, 2), "first_call_s": round(first, 2),
              "median_ms": median, "total_p99_ms": p99, "load_average": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps(report, indent=2))
    if profiler is not None:
        import pstats

        pstats.Stats(profiler).sort_stats(args.sort).print_stats(args.cprofile)


if __name__ == "__main__":
    main()
