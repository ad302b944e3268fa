"""The estimator: ``StackingCategorizer``.

For every base model and every stratified fold, a clone is fitted on the
other folds and predicts the held-out fold; the held-out predictions of all
folds form the model's out-of-fold (OOF) probability matrix, aligned to the
global class list. A meta-learner (see :mod:`stackcat.meta`) is fitted on
those matrices. At test time each base model's probabilities are the mean of
its fold models (or of one model refitted on all rows, ``refit=True``).

Every (model, fold) job runs through joblib (``n_jobs``; ``backend="dask"``
or ``scheduler=ADDRESS`` for a dask.distributed cluster) and, with a
``run_dir``, writes its result atomically under a key made of the model's
params, the data and the fold's rows. A stopped or crashed fit resumes where
it stopped, and changing one model recomputes that model only.

Rare classes: a class with fewer members than ``n_splits`` is spread over as
many folds as it has members (one member per fold), so every fold model but
one per member trains on it and it stays in ``classes_``, in the test-time
fold average and in the meta-learner. Its OOF rows stay honest: a class with
a single member is predicted by a model that never saw it (probability 0 for
the true class). Such classes are listed in ``rare_classes_``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.metaestimators import _BaseComposition
from sklearn.utils.validation import check_is_fitted

from stackcat import __version__, topk
from stackcat.core import encode_labels, label_positions, plain_value
from stackcat.files import folders_fixed
from stackcat.preflight import check_before_jobs
from stackcat.progress import log_stage, progress_bar
from stackcat.runs import (
    RunFolder,
    RunFolderError,
    digest,
    file_columns_of,
    files_fingerprint,
    frame_fingerprint,
    load_pickle,
    model_fingerprint,
    package_versions,
    param_files_fingerprint,
    sign_file,
    write_joblib,
)
from stackcat.stacking.jobs import (
    Job,
    JobResult,
    has_learned_space,
    load_job,
    make_folds,
    predict_aligned,
    read_cached,
    run_job,
    take_rows,
)
from stackcat.stacking.meta_choice import accepted, choose_meta, meta_context, nested_meta_oof
from stackcat.topk import DEFAULT_TOP_K, TOP_K_ABOVE_CLASSES

STACKER_FILE = "stacker.joblib"
FLOAT16_CELLS = 20_000_000  # above this many OOF cells per model, "auto" stores float16


@dataclass
class Evaluation:
    """A labelled table scored by a fitted stack (:meth:`StackingCategorizer.evaluation_results`)."""

    results: dict[str, Any]  # name -> probabilities of the scored rows; the meta-learner last
    y_index: np.ndarray  # the scored rows' classes, as indices into classes_
    scored: np.ndarray  # per input row: its category was seen in training
    unseen_labels: list[str]  # the categories left out, sorted

    @property
    def n_unseen_rows(self) -> int:
        return int((~self.scored).sum())


class StackingCategorizer(ClassifierMixin, _BaseComposition, BaseEstimator):
    """Stack base classifiers through out-of-fold probabilities and a meta-learner.

    Parameters
    ----------
    estimators : list of (str, estimator)
        Named base classifiers; each reads the columns it needs from X.
    meta : {"auto", "rerank", "multiclass", "average", "ensemble"} or estimator, default="auto"
        The meta-learner (:func:`stackcat.meta.make_meta`). "auto" scores three
        on the nested OOF -- the plain average, greedy ensemble selection and a
        learned CatBoost meta (RerankMeta above 50 classes, else MulticlassMeta)
        -- and ships the one with the fewest errors (``meta_selection_``), so
        the stack never ships a meta worse than the blend on its own folds.
        A list of names and/or estimators chooses among those (ties go to the
        earlier one).
    retrieval : bool, default=True
        Give the meta-learner retrieval signals (:mod:`stackcat.meta.retrieval`):
        for every member that can embed its input (``embed(X)``, e.g.
        :class:`~stackcat.models.neighbours.NeighboursClassifier`), each
        product's cosine to every class's centroid and nearest product, and
        each class's share of its nearest neighbours -- computed out of fold. A
        member with a learned space (``project(X)``, e.g.
        :class:`~stackcat.models.metric.MetricSpaceClassifier`) gives the same
        signals in its space, each fold's model scoring its own held-out rows.
    category_names : "auto", mapping or None, default="auto"
        Names of the classes, embedded by a member's text encoder
        (``embed_texts``) to score each product against each category's name.
        "auto": the tree's paths when there is a tree, else the labels
        themselves when they are words (not numeric ids). None: off.
    tree : CategoryTree, str, Path or None, default=None
        The category tree (:class:`stackcat.taxonomy.CategoryTree`, or the path
        of a node table ``id, parent_id, title`` whose ids are the labels):
        the re-ranker gets parent / grandparent probability mass per member.
    label_separator : str or None, default=None
        Labels are paths (``"Men > Topwear > Tshirts"`` with ``" > "``): the tree
        is read from them.
    n_splits : int, default=5
        Stratified folds.
    random_state : int or None, default=0
        Seed of the fold split.
    refit : bool, default=False
        Test-time probabilities from one model refitted on all rows instead of
        the mean of the fold models.
    run_dir : str or Path, optional
        Folder for the run's results; fits resume from it. Without it all
        results stay in memory.
    n_jobs : int, default=1
        (model, fold) jobs run at once.
    backend : str, optional
        joblib backend ("loky", "threading", "dask"...).
    scheduler : str, optional
        Address of a dask.distributed scheduler (implies ``backend="dask"``);
        with a cluster, ``run_dir`` must be on storage the workers share.
    oof_dtype : {"auto", "float32", "float16"}, default="auto"
        Storage of OOF matrices; "auto" uses float16 above 20M cells per model.
    oof_top_k : int, "auto" or None, default="auto"
        Keep each model's OOF and test-time probabilities as their ``k``
        largest entries per row (:mod:`stackcat.topk`; the rest of the mass
        implied): memory linear in the number of products, whatever the number
        of classes. "auto": top-32 above 1,000 classes, dense below. None: dense.
    evaluate_meta : bool, default=True
        Also score the meta-learner honestly by refitting it fold by fold on
        the OOF matrices (``meta_oof_``).
    keep_models : bool, default=True
        Keep the fitted fold models (needed to predict new data).
    progress, verbose : bool / int
        A progress bar over jobs (on a terminal only); a line per finished job
        when ``verbose``, on the ``"stackcat"`` logger (see :mod:`stackcat.progress`).

    Attributes
    ----------
    classes_ : ndarray
    oof_ : dict of str -> ndarray (n_samples, n_classes)
        Out-of-fold probabilities of each base model.
    oof_scores_ : DataFrame
        Scores of each base model, the average blend and the meta-learner.
    meta_ : fitted meta-learner
    meta_oof_ : ndarray or None
        The meta-learner's own out-of-fold probabilities (``evaluate_meta``).
    meta_selection_ : DataFrame or None
        With ``meta="auto"``: each candidate meta-learner's nested-OOF scores and
        which one was chosen.
    candidate_meta_oof_ : dict of str -> ndarray
        Nested OOF probabilities of every candidate meta-learner.
    meta_inputs_ : dict
        What the meta-learners got beside the OOF (``signals``, ``ancestors``);
        kept in memory after ``fit`` for ablations, not saved with the stack.
    tree_ : CategoryTree or None
    oof_target_ : ndarray
        Each training row's class, as an index into ``classes_`` (the OOF rows' truth).
    fold_of_row_ : ndarray
        Fold of each training row.
    rare_classes_ : ndarray
        Classes with fewer members than ``n_splits``.
    jobs_ : DataFrame
        One row per (model, job): rows, timings and whether it came from the run folder.

    Examples
    --------
    >>> from stackcat.models.fasttext import FastTextClassifier
    >>> texts = ["red shirt", "blue jeans", "black shoes"] * 10
    >>> labels = ["shirt", "jeans", "shoes"] * 10
    >>> stack = StackingCategorizer([("ft", FastTextClassifier(n_threads=1, dim=8, epoch=5))],
    ...                             meta="average", n_splits=3, progress=False, verbose=0)
    >>> stack.fit(texts, labels).oof_["ft"].shape
    (30, 3)
    """

    _parameter_constraints: dict = {
        "estimators": [list],
        "meta": [StrOptions({"auto", "rerank", "multiclass", "average", "ensemble"}),
                 HasMethods(["fit", "predict_proba"]), list],
        "retrieval": ["boolean"],
        "category_names": [StrOptions({"auto"}), dict, None],
        "tree": [HasMethods(["aligned"]), str, Path, None],
        "label_separator": [str, None],
        "n_splits": [Interval(Integral, 2, None, closed="left")],
        "random_state": ["random_state"],
        "refit": ["boolean"],
        "run_dir": [str, Path, None],
        "n_jobs": [Interval(Integral, None, -1, closed="right"), Interval(Integral, 1, None, closed="left"), None],
        "backend": [str, None],
        "scheduler": [str, None],
        "oof_dtype": [StrOptions({"auto", "float32", "float16"})],
        "oof_top_k": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"}), None],
        "evaluate_meta": ["boolean"],
        "keep_models": ["boolean"],
        "progress": ["boolean"],
        "verbose": [Integral, "boolean"],
    }

    def __init__(self, estimators: list[tuple[str, Any]], meta: Any = "auto", n_splits: int = 5,
                 random_state: int | None = 0, refit: bool = False, run_dir: str | Path | None = None,
                 n_jobs: int | None = 1, backend: str | None = None, scheduler: str | None = None,
                 oof_dtype: str = "auto", oof_top_k: int | str | None = "auto",
                 evaluate_meta: bool = True, keep_models: bool = True,
                 progress: bool = True, verbose: int = 1, retrieval: bool = True,
                 category_names: Any = "auto", tree: Any = None, label_separator: str | None = None) -> None:
        self.estimators = estimators
        self.meta = meta
        self.retrieval = retrieval
        self.category_names = category_names
        self.tree = tree
        self.label_separator = label_separator
        self.n_splits = n_splits
        self.random_state = random_state
        self.refit = refit
        self.run_dir = run_dir
        self.n_jobs = n_jobs
        self.backend = backend
        self.scheduler = scheduler
        self.oof_dtype = oof_dtype
        self.oof_top_k = oof_top_k
        self.evaluate_meta = evaluate_meta
        self.keep_models = keep_models
        self.progress = progress
        self.verbose = verbose

    # sklearn plumbing for nested params: "fasttext__epoch" ------------------
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return self._get_params("estimators", deep=deep)

    def set_params(self, **params: Any) -> StackingCategorizer:
        self._set_params("estimators", **params)
        return self

    @property
    def named_estimators(self) -> dict[str, Any]:
        return dict(self.estimators)

    # fitting ----------------------------------------------------------------
    def fit(self, X: Any, y: Any) -> StackingCategorizer:
        """Compute every base model's OOF probabilities, then fit the meta-learner on them."""
        self._validate_params()
        self._check_estimators()
        n_rows = len(X)
        self.classes_, y_index = encode_labels(y, n_rows)
        if len(self.classes_) < 2:
            raise ValueError(f"y holds a single category ({self.classes_[0]!r}): there is nothing to "
                             "learn. Is the target the right column?")
        labels = self.classes_[y_index]
        self.oof_target_ = y_index
        self.fold_of_row_ = make_folds(y_index, self.n_splits, self.random_state)
        counts = np.bincount(y_index, minlength=len(self.classes_))
        self.class_counts_ = counts
        self.rare_classes_ = self.classes_[counts < self.n_splits]
        self._oof_storage = self._storage_dtype(n_rows)
        self.oof_top_k_ = self._resolved_top_k()
        self.tree_ = check_before_jobs(self, X, self.classes_)  # the tree, params, key, cluster: now
        data_key = frame_fingerprint(X, labels)
        run = RunFolder(self.run_dir) if self.run_dir is not None else None
        with run.locked() if run else contextlib.nullcontext():
            previous = run.read_manifest() if run else None
            if run:
                run.warn_if_versions_differ(previous)
                run.remove_temp_files()
                run.write_manifest(self._manifest(data_key, n_rows, status="running"))
            jobs = self._plan_jobs(data_key, X)
            results = self._run_jobs(jobs, X, labels, run)
            learned_signals = self._collect(results, n_rows)
            signals = self._fit_signals(X, y_index, learned_signals)
            self._fit_meta_explained(y_index, [job.key for job in jobs], run, signals)
            self.oof_scores_ = self._score_table(y_index)
            if run:
                self.run_dir_ = str(Path(self.run_dir).resolve())
                write_joblib(self, run.path / STACKER_FILE)
                run.write_manifest(self._manifest(data_key, n_rows, status="complete"))
                # only now: until the new stacker.joblib is in place, the old one refers to these files
                for name, _ in self.estimators:
                    run.remove_stale_jobs(name, {job.key for job in jobs if job.model == name})
        return self

    def _fit_meta_explained(self, y_index: np.ndarray, job_keys: list[str], run: RunFolder | None,
                            signals: dict[str, Any]) -> None:
        """``_fit_meta``, with a failure of the meta-learner's own library said in stackcat's terms."""
        start = time.perf_counter()
        try:
            self._fit_meta(y_index, job_keys, run, signals)
            if self.verbose:
                log_stage(f"meta-learner {type(self.meta_).__name__} ready in {time.perf_counter() - start:.1f} s "
                          f"({len(y_index):,} rows, {len(self.classes_):,} categories)")
        except (OSError, RunFolderError):
            raise
        except Exception as exc:  # CatBoostError and others from the meta-learner's library
            raise RuntimeError(
                f"the meta-learner (meta={self.meta!r}) failed on the out-of-fold probabilities of "
                f"{len(y_index)} rows and {len(self.classes_)} categories ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}). A learned meta-learner "
                "needs enough out-of-fold rows per fold; with few rows use meta='average' (--meta average)"
            ) from exc

    def _check_estimators(self) -> None:
        if not self.estimators:
            raise ValueError("estimators is empty: give at least one (name, classifier) pair")
        names = [name for name, _ in self.estimators]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"estimator names must be unique; repeated: {duplicated}")
        for name, estimator in self.estimators:
            if not hasattr(estimator, "predict_proba"):
                raise TypeError(f"estimator {name!r} ({type(estimator).__name__}) has no predict_proba")

    def _resolved_top_k(self) -> int | None:
        if self.oof_top_k == "auto":
            return DEFAULT_TOP_K if len(self.classes_) > TOP_K_ABOVE_CLASSES else None
        return None if self.oof_top_k is None or self.oof_top_k >= len(self.classes_) else int(self.oof_top_k)

    def _storage_dtype(self, n_rows: int) -> str:
        if self.oof_dtype != "auto":
            return self.oof_dtype
        return "float16" if n_rows * len(self.classes_) > FLOAT16_CELLS else "float32"

    def _plan_jobs(self, data_key: str, X: Any) -> list[Job]:
        """One job per (model, fold), keyed by the model's params, the data and the fold's rows.

        The data part covers the content of the files a model reads (the
        columns :func:`stackcat.runs.file_columns_of` finds: its
        ``image_column``...), so replacing an image under the same name
        recomputes the models that read images, and only those; the model
        part covers the local files its params name (a checkpoint folder, see
        :func:`stackcat.runs.param_files_fingerprint`).
        """
        rows = np.arange(len(self.fold_of_row_))
        files_keys: dict[tuple[str, ...], str | None] = {(): None}
        jobs = []
        for name, estimator in self.estimators:
            columns = tuple(file_columns_of(estimator))
            if columns not in files_keys:
                files_keys[columns] = files_fingerprint(X, columns)
            model_key = digest(model_fingerprint(estimator), files_keys[columns], param_files_fingerprint(estimator))
            for fold in range(self.n_splits):
                test = rows[self.fold_of_row_ == fold]
                train = rows[self.fold_of_row_ != fold]
                storage = self._oof_storage if self.oof_top_k_ is None else (self._oof_storage, self.oof_top_k_)
                key = digest(model_key, data_key, train, test, storage)
                jobs.append(Job(name, f"fold-{fold}", train, test, key))
            if self.refit:
                jobs.append(Job(name, "full", rows, rows[:0], digest(model_key, data_key, "full")))
        return jobs

    def _run_jobs(self, jobs: list[Job], X: Any, labels: np.ndarray, run: RunFolder | None) -> list[JobResult]:
        estimators = self.named_estimators
        done = [r for r in (load_job(run, job, has_learned_space(estimators[job.model])) for job in jobs)
                if r is not None] if run else []
        finished = {(r.model, r.name) for r in done}
        pending = [job for job in jobs if (job.model, job.name) not in finished]
        run_path = str(run.path) if run else None
        results = list(done)
        self._warm_caches([estimators[name] for name in dict.fromkeys(job.model for job in pending)], X)
        bar = progress_bar(total=len(jobs), initial=len(done), desc="jobs", unit="job", enabled=self.progress)
        if done and self.verbose:
            log_stage(f"{len(done)} of {len(jobs)} jobs already done in {run.path}; {len(pending)} to run")
        elif self.verbose:
            log_stage(f"{len(jobs)} jobs to run ({len(estimators)} models x {self.n_splits} folds"
                      f"{' + a refit on all rows' if self.refit else ''}, {len(X):,} rows)")
        tasks = (joblib.delayed(run_job)(job, estimators[job.model], X, labels, self.classes_,
                                         run_path, self._oof_storage, self.oof_top_k_) for job in pending)
        try:
            with self._parallel_backend():
                parallel = joblib.Parallel(n_jobs=self.n_jobs, return_as="generator_unordered")
                for result in parallel(tasks):
                    if run is not None:
                        sign_file(run.model_path(result.model, result.name, result.key))
                    results.append(result)
                    bar.update(1)
                    if self.verbose:
                        log_stage(f"{self._job_line(result, labels)} ({len(results) - len(done)} of "
                                  f"{len(pending)} jobs to run done)")
        finally:
            bar.close()
        return results

    def _warm_caches(self, estimators: list[Any], X: Any) -> None:
        """Frozen encoders fill their cache once here instead of once per parallel job.

        On a dask cluster the rows are sharded over the workers, so encoding
        (the slowest stage of a frozen-encoder stack) runs on the whole cluster;
        the cache folder must then be on storage the workers share, like the
        run folder.
        """
        warmers = [est.warm_cache for est in estimators if callable(getattr(est, "warm_cache", None))]
        if not warmers:
            return
        if not self._distributed():
            for warm in warmers:
                warm(X)
            return
        with self._parallel_backend():
            shards = np.array_split(np.arange(len(X)), max(min(len(X), 2 * _n_workers()), 1))
            tasks = [joblib.delayed(warm)(take_rows(X, rows)) for warm in warmers for rows in shards if len(rows)]
            started = time.perf_counter()
            joblib.Parallel(n_jobs=-1)(tasks)
            if self.verbose:
                log_stage(f"encoder caches filled on the cluster: {len(tasks)} shards of {len(X):,} rows "
                          f"in {time.perf_counter() - started:.1f} s")

    def _distributed(self) -> bool:
        return self.scheduler is not None or self.backend == "dask"

    @contextlib.contextmanager
    def _parallel_backend(self) -> Iterator[None]:
        if not self._distributed():
            with joblib.parallel_config(backend=self.backend) if self.backend else contextlib.nullcontext():
                yield
            return
        try:
            from distributed import Client, get_client
        except ImportError as exc:
            raise ImportError("backend='dask' needs dask.distributed: pip install 'stackcat[dask]'") from exc
        if self.scheduler is not None:
            client = Client(self.scheduler)
            close = True
        else:
            try:
                client = get_client()
            except ValueError:
                raise RuntimeError("backend='dask' needs a running dask.distributed Client, "
                                   "or scheduler='tcp://HOST:PORT'") from None
            close = False
        try:
            with joblib.parallel_config(backend="dask"):
                yield
        finally:
            if close:
                client.close()

    def _job_line(self, result: JobResult, labels: np.ndarray) -> str:
        line = (f"[{result.model} {result.name}] {result.n_train:,} train rows, fit {result.fit_seconds:.1f} s, "
                f"predict {result.predict_seconds:.1f} s")
        if len(result.test):
            predicted = self.classes_[topk.row_argmax(result.oof)]
            line += f", {len(result.test):,} held-out rows, accuracy {(predicted == labels[result.test]).mean():.4f}"
        return line

    def _collect(self, results: Iterable[JobResult], n_rows: int) -> dict[str, Any]:
        """Gather the jobs' OOF blocks and fold models; returns the learned members' OOF retrieval signals."""
        names = [name for name, _ in self.estimators]
        parts: dict[str, list] = {name: [] for name in names}
        signal_parts: dict[str, list] = {}
        filled = {name: np.zeros(n_rows, dtype=np.int32) for name in names}
        models: dict[str, dict[str, Any]] = {name: {} for name in names}
        records = []
        run = RunFolder(self.run_dir) if self.run_dir is not None else None
        for result in results:
            parts[result.model].append((result.test, result.oof))
            filled[result.model][result.test] += 1
            for kind, values in result.signals.items():
                signal_parts.setdefault(f"{result.model}:{kind}", []).append((result.test, values))
            if self.keep_models:
                models[result.model][result.name] = (
                    result.estimator if run is None
                    else str(run.model_path(result.model, result.name, result.key).relative_to(run.path)))
            records.append({"model": result.model, "job": result.name, "train_rows": result.n_train,
                            "oof_rows": len(result.test), "fit_seconds": result.fit_seconds,
                            "predict_seconds": result.predict_seconds, "from_run_folder": result.cached})
        for name, count in filled.items():
            if not (count == 1).all():
                raise RuntimeError(f"internal error: OOF rows of {name!r} filled {np.unique(count)} times")
        self.oof_ = {name: topk.put_rows(parts[name], n_rows, len(self.classes_), self._oof_storage)
                     for name in names}
        wanted = ["full"] if self.refit else [f"fold-{k}" for k in range(self.n_splits)]
        self.fold_models_ = {name: [models[name][job] for job in wanted] for name in names} if self.keep_models else {}
        self.jobs_ = pd.DataFrame(records).sort_values(["model", "job"], ignore_index=True)
        return {name: topk.put_rows(blocks, n_rows, len(self.classes_)) for name, blocks in signal_parts.items()}

    def _fit_meta(self, y_index: np.ndarray, job_keys: list[str], run: RunFolder | None,
                  signals: dict[str, Any]) -> None:
        candidates = self._meta_candidates()
        ancestors = self.tree_.ancestors if self.tree_ is not None else None
        self.meta_inputs_ = meta_context(signals, ancestors)  # for ablations; not saved with the stack
        # the job keys determine the OOF matrices exactly, so they key the meta-learner too
        oof_key = digest({name: model_fingerprint(m) for name, m in candidates.items()}, sorted(job_keys), y_index,
                         self.evaluate_meta, sorted(signals), [signals[k] for k in sorted(signals)], ancestors)
        cached = read_cached(run.meta_path(oof_key)) if run else None
        if cached is not None:
            self.meta_, self.meta_oof_, self.candidate_meta_oof_, self.meta_selection_ = cached
            return
        nested = {}
        if self.evaluate_meta or len(candidates) > 1:
            nested = {name: nested_meta_oof(meta, self.oof_, y_index, self.fold_of_row_, signals, ancestors)
                      for name, meta in candidates.items()}
        if len(candidates) > 1:
            choice, self.meta_selection_ = choose_meta(nested, y_index)
            if self.verbose:
                log_stage(f"meta-learner chosen on nested OOF: {choice} (errors: "
                          + ", ".join(f"{n} {int(e)}" for n, e in self.meta_selection_["errors"].items()) + ")")
        else:
            choice, self.meta_selection_ = next(iter(candidates)), None
        self.candidate_meta_oof_ = nested
        self.meta_oof_ = nested.get(choice)
        meta = clone(candidates[choice])
        self.meta_ = meta.fit(self.oof_, y_index, **accepted(meta.fit, meta_context(signals, ancestors)))
        if run:
            write_joblib((self.meta_, self.meta_oof_, self.candidate_meta_oof_, self.meta_selection_),
                         run.meta_path(oof_key))

    def _meta_candidates(self) -> dict[str, Any]:
        """The meta-learners to try, simplest first (ties go to the simpler one)."""
        from stackcat.meta import AverageBlend, EnsembleSelection, make_meta

        if self.meta == "auto":
            learned = make_meta("auto", len(self.classes_))
            if len(self.estimators) == 1:  # nothing to blend
                return {type(learned).__name__: learned}
            choices = [AverageBlend(), EnsembleSelection(), learned]
        else:
            choices = self.meta if isinstance(self.meta, list) else [self.meta]
        if not choices:
            raise ValueError("meta is an empty list: name at least one meta-learner")
        candidates = {}
        for choice in choices:
            meta = make_meta(choice, len(self.classes_)) if isinstance(choice, str) else clone(choice)
            name = type(meta).__name__
            if name in candidates:
                raise ValueError(f"meta lists {name} twice; give each meta-learner once")
            candidates[name] = meta
        return candidates

    def _embedders(self) -> dict[str, Any]:
        """Members that can embed their input (``embed(X)``), by name."""
        if not self.retrieval:
            return {}
        return {name: est for name, est in self.estimators if callable(getattr(est, "embed", None))}

    def _class_names(self) -> list[str] | None:
        if self.category_names is None:
            return None
        if isinstance(self.category_names, dict):
            missing = [c for c in self.classes_ if c not in self.category_names]
            if missing:
                raise ValueError(f"category_names has no name for categories {missing[:10]}")
            return [str(self.category_names[c]) for c in self.classes_]
        if self.tree_ is not None:
            return list(self.tree_.names)
        labels = [str(c) for c in self.classes_]
        numeric = sum(label.replace(".", "", 1).lstrip("-").isdigit() for label in labels)
        return None if numeric > len(labels) / 2 else labels

    def _fit_signals(self, X: Any, y_index: np.ndarray, learned_signals: dict[str, Any]) -> dict[str, np.ndarray]:
        """Out-of-fold retrieval and name signals of the training rows; keeps what predict needs.

        ``learned_signals``: those of the members with a learned space, computed by their fold jobs.
        """
        from stackcat.meta.retrieval import NeighbourIndex, name_signal, oof_signals

        embedders = self._embedders()
        embeddings = {name: est.embed(X) for name, est in embedders.items()}
        n_classes = len(self.classes_)
        signals = (oof_signals(embeddings, y_index, n_classes, self.fold_of_row_, top_k=self.oof_top_k_)
                   if embeddings else {})
        self.retrieval_index_ = {name: NeighbourIndex(matrix, y_index, n_classes)
                                 for name, matrix in embeddings.items()}
        self.name_embeddings_ = {}
        names = self._class_names() if embedders else None
        for name, est in embedders.items():
            # the name signal needs an embedder of texts (a text kNN member, not an image one)
            if names and callable(getattr(est, "embed_texts", None)) and getattr(est, "source", "text") == "text":
                self.name_embeddings_[name] = est.embed_texts(names)
                signals[f"name:{name}"] = name_signal(embeddings[name], self.name_embeddings_[name],
                                                      self.oof_top_k_)
        if self.retrieval:
            signals.update(learned_signals)
        return signals

    def _predict_signals(self, X: Any) -> dict[str, np.ndarray]:
        from stackcat.meta.retrieval import index_signals, name_signal

        signals: dict[str, np.ndarray] = {}
        estimators = self.named_estimators
        top_k = getattr(self, "oof_top_k_", None)
        for name, index in getattr(self, "retrieval_index_", {}).items():
            embedded = estimators[name].embed(X)
            signals.update({f"{name}:{kind}": values for kind, values in index_signals(index, embedded, top_k).items()})
            if name in self.name_embeddings_:
                signals[f"name:{name}"] = name_signal(embedded, self.name_embeddings_[name], top_k)
        signals.update(self._predict_learned_signals(X, top_k))
        return signals

    def _predict_learned_signals(self, X: Any, top_k: int | None) -> dict[str, Any]:
        """Signals in each learned member's space: the mean over its fold models (or its refit model)."""
        from stackcat.meta.retrieval import learned_space_signals

        if not self.retrieval:
            return {}
        signals: dict[str, Any] = {}
        for name, estimator in self.estimators:
            if not has_learned_space(estimator) or name not in self.fold_models_:
                continue
            per_model = [learned_space_signals(self._model(ref), X, self.classes_) for ref in self.fold_models_[name]]
            for kind in per_model[0]:
                mean = np.mean([signals_of[kind] for signals_of in per_model], axis=0, dtype=np.float32)
                signals[f"{name}:{kind}"] = mean if top_k is None else topk.top_k_rows(mean, top_k)
        return signals

    def _score_table(self, y_index: np.ndarray) -> pd.DataFrame:
        from stackcat.metrics import comparison_table

        return comparison_table(self.oof_results(), y_index)

    def oof_results(self) -> dict[str, np.ndarray]:
        """OOF probabilities of each base model, their plain average, the other candidate meta-learners
        and the chosen one (last).

        The plain average is there once: as ``"average"``, or as the chosen
        meta-learner's row when that is the plain average (``AverageBlend()``).
        """
        check_is_fitted(self, "oof_")
        results = {name: p if topk.is_top_k(p) else np.asarray(p, dtype=np.float32) for name, p in self.oof_.items()}
        chosen = f"meta:{type(self.meta_).__name__}"
        plain = {f"meta:{name}" for name, meta in self._meta_candidates().items() if _is_plain_average(meta)}
        if len(results) > 1 and not (chosen in plain and self.meta_oof_ is not None):
            results["average"] = _plain_average(list(results.values()))
        for name, proba in getattr(self, "candidate_meta_oof_", {}).items():
            if f"meta:{name}" != chosen and f"meta:{name}" not in plain:
                results[f"meta:{name}"] = proba
        if self.meta_oof_ is not None:
            results[chosen] = self.meta_oof_  # last: the report's headline
        return results

    def report_notes(self, results: dict[str, np.ndarray] | None = None,
                     y_index: np.ndarray | None = None) -> list[str]:
        """Lines for the report: how the meta-learner was chosen, and scores per level of the tree."""
        from stackcat.taxonomy import hierarchy_scores

        results = self.oof_results() if results is None else results
        y_index = self.oof_target_ if y_index is None else y_index
        notes = []
        selection = getattr(self, "meta_selection_", None)
        if selection is not None:
            chosen = selection.index[selection["chosen"]][0]
            notes.append(f"Meta-learner chosen on nested OOF: {chosen} ("
                         + "; ".join(f"{name}: {int(row.errors)} errors, weighted F1 {row.weighted_f1:.4f}"
                                     for name, row in selection.iterrows()) + ").")
        if getattr(self, "tree_", None) is not None and self.tree_.depth > 1:
            for name, proba in results.items():
                scores = hierarchy_scores(y_index, np.asarray(proba).argmax(axis=1), self.tree_)
                levels = ", ".join(f"level {k} {scores[f'accuracy_level_{k}']:.4f}" for k in range(self.tree_.depth))
                notes.append(f"Tree, {name}: accuracy by level (0 = leaf) {levels}; "
                             f"{scores['errors_under_right_parent']:.1%} of errors stay under the right parent.")
        return notes

    def predict_results(self, X: Any) -> dict[str, np.ndarray]:
        """Test-time probabilities of each base model, their plain average (unless the meta-learner is
        that) and the meta-learner (last)."""
        base = self.predict_base_proba(X)
        results = dict(base)
        if len(base) > 1 and not _is_plain_average(self.meta_):
            results["average"] = _plain_average(list(base.values()))
        results[f"meta:{type(self.meta_).__name__}"] = self.predict_proba(X, base)
        return results

    def label_indices(self, y: Any) -> np.ndarray:
        """Each label's index into ``classes_``; -1 for a label not seen in training.

        Examples
        --------
        >>> stack = StackingCategorizer([])
        >>> stack.classes_ = np.array(["jeans", "shirt"], dtype=object)
        >>> stack.label_indices(["shirt", "hat"]).tolist()
        [1, -1]
        """
        check_is_fitted(self, "classes_")
        return label_positions(self.classes_, _label_array(y), missing=-1)

    def evaluation_results(self, X: Any, y: Any) -> Evaluation:
        """Test-time results on a labelled table, for its rows whose category was seen in training.

        A row of a category unseen in training is necessarily mispredicted and
        has no column to be scored in: it is left out (``Evaluation.scored``),
        and its category listed in ``Evaluation.unseen_labels``.

        Returns
        -------
        Evaluation
            ``results`` (:meth:`predict_results` of the scored rows; empty when no
            row's category is known), ``y_index`` (their classes), ``scored`` and
            ``unseen_labels``.
        """
        y_all = self.label_indices(y)
        if len(y_all) != len(X):
            raise ValueError(f"X has {len(X)} rows but y has {len(y_all)}")
        scored = y_all >= 0
        unseen = sorted({str(label) for label in _label_array(y)[~scored]})
        results = self.predict_results(take_rows(X, np.flatnonzero(scored))) if scored.any() else {}
        return Evaluation(results=results, y_index=y_all[scored], scored=scored, unseen_labels=unseen)

    def _predict_context(self, X: Any) -> dict[str, Any]:
        if not accepted(self.meta_.predict_proba, {"signals": None}):
            return {}
        return meta_context(self._predict_signals(X), None)

    def _manifest(self, data_key: str, n_rows: int, status: str) -> dict[str, Any]:
        return {
            "stackcat_version": __version__,
            "status": status,
            "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
            "versions": package_versions(),
            "data_fingerprint": data_key,
            "n_rows": n_rows,
            "classes": [plain_value(c) for c in self.classes_],
            "folds": {"n_splits": self.n_splits, "random_state": self.random_state,
                      "fingerprint": digest(self.fold_of_row_)},
            "rare_classes": [plain_value(c) for c in self.rare_classes_],
            "models": {name: {"class": type(est).__name__, "fingerprint": model_fingerprint(est),
                              "params": {k: repr(v) for k, v in est.get_params(deep=False).items()}}
                       for name, est in self.estimators},
            "meta": repr(self.meta),
            "refit": self.refit,
            "oof_dtype": self._oof_storage,
            "oof_top_k": self.oof_top_k_,
        }

    # prediction -------------------------------------------------------------
    def predict_base_proba(self, X: Any) -> dict[str, np.ndarray]:
        """Test-time probabilities of every base model (mean of its fold models, or its refit model)."""
        check_is_fitted(self, "meta_")
        if not self.fold_models_:
            raise RuntimeError("the fold models were not kept (keep_models=False): this stack cannot predict new data")
        top_k = getattr(self, "oof_top_k_", None)
        out = {}
        with folders_fixed():  # the members check their frozen encoder's folder once, not one by one
            for name, refs in self.fold_models_.items():
                fold_probas = [predict_aligned(self._model(ref), X, self.classes_, "float32", top_k) for ref in refs]
                mean = _plain_average(fold_probas)
                out[name] = mean if top_k is None else topk.as_top_k(mean, top_k)
        return out

    def predict_proba(self, X: Any, base_proba: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Meta-learner probabilities ``(n_samples, n_classes)`` in ``classes_`` order.

        ``base_proba``: the base models' probabilities of X when already at hand
        (:meth:`predict_base_proba`).
        """
        with folders_fixed():
            base = self.predict_base_proba(X) if base_proba is None else base_proba
            return self.meta_.predict_proba(base, **self._predict_context(X))

    def predict(self, X: Any) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def _model(self, ref: Any) -> Any:
        if not isinstance(ref, str):
            return ref
        cache = self.__dict__.setdefault("_loaded_models", {})
        if ref not in cache:
            path = Path(self.run_dir_) / ref
            if not path.exists():
                raise RunFolderError(f"{path}: fold model missing; run the same fit again with --resume to "
                                     "recompute it (finished jobs are reused)")
            model = load_pickle(path, trusted=self.__dict__.get("_trusted_run", False), what="fold model")
            if not (hasattr(model, "predict_proba") and hasattr(model, "classes_")):
                raise RunFolderError(f"{path}: holds a {type(model).__name__}, not a fitted classifier; run the "
                                     "same fit again with --resume to recompute it")
            cache[ref] = model
        return cache[ref]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_loaded_models", None)
        state.pop("meta_inputs_", None)
        state.pop("_trusted_run", None)
        return state

    # saving -----------------------------------------------------------------
    @classmethod
    def load(cls, run_dir: str | Path, *, trusted: bool = False) -> StackingCategorizer:
        """The fitted stack of a run folder (the folder may have moved since).

        Parameters
        ----------
        run_dir : str or Path
            The run folder.
        trusted : bool, default=False
            Load its pickles even when they do not carry this user's signature
            (a folder from a colleague, or written before stackcat signed its
            files). Unpickling can run code: trust only folders you would run
            code from. See :mod:`stackcat.runs` for the trust model.
        """
        RunFolder(run_dir).read_manifest()  # a folder of an older release is refused before unpickling
        path = Path(run_dir) / STACKER_FILE
        if not path.exists():
            raise FileNotFoundError(f"{run_dir}: no {STACKER_FILE}; the fit did not finish (run it again to resume)")
        stack = load_pickle(path, trusted=trusted, what="fitted stack")
        if not isinstance(stack, cls) or not hasattr(stack, "meta_"):
            raise RunFolderError(
                f"{path}: holds a {type(stack).__name__}, not a fitted {cls.__name__}; the file was replaced or "
                "damaged. Run the same fit again with --resume to rebuild it (finished jobs are reused)")
        stack.run_dir_ = str(Path(run_dir).resolve())
        stack._trusted_run = trusted
        return stack


def _label_array(y: Any) -> np.ndarray:
    return np.asarray(y.to_numpy(dtype=object) if isinstance(y, pd.Series) else y, dtype=object)


def _is_plain_average(meta: Any) -> bool:
    """Whether a meta-learner is the plain average of the members (the report's ``"average"`` row)."""
    from stackcat.meta import AverageBlend

    return isinstance(meta, AverageBlend) and meta.weights is None and not meta.calibrate


def _n_workers() -> int:
    """Workers of the current dask client (1 when it cannot say)."""
    try:
        from distributed import get_client

        return max(len(get_client().scheduler_info().get("workers", {})), 1)
    except (ImportError, ValueError):
        return 1


def _plain_average(matrices: list[Any]) -> Any:
    """The plain mean of probability matrices (float32 dense, or top-k CSR)."""
    mean = topk.weighted_sum(matrices, [1.0 / len(matrices)] * len(matrices))
    return mean.astype(np.float32)
