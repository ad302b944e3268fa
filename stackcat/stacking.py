"""The out-of-fold engine: ``StackingCategorizer``.

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
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.model_selection import StratifiedKFold
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.metaestimators import _BaseComposition
from sklearn.utils.validation import check_is_fitted

from stackcat import __version__
from stackcat.models._base import encode_labels, proba_for_classes
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
    scratch_files_in,
    sign_file,
    signature_problem,
    write_joblib,
    write_npz,
)

STACKER_FILE = "stacker.joblib"
FLOAT16_CELLS = 20_000_000  # above this many OOF cells per model, "auto" stores float16


@dataclass(frozen=True)
class Job:
    """One unit of work: fit ``model`` on ``train`` rows, predict ``test`` rows."""

    model: str
    name: str  # "fold-0" ... or "full" (refit on all rows)
    train: np.ndarray
    test: np.ndarray
    key: str


@dataclass
class JobResult:
    model: str
    name: str
    key: str
    test: np.ndarray
    oof: np.ndarray
    fit_seconds: float
    predict_seconds: float
    n_train: int
    estimator: Any = None  # the fitted model when it is not kept on disk
    cached: bool = False
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- folds


def make_folds(y_index: np.ndarray, n_splits: int, random_state: int | None) -> np.ndarray:
    """Fold number of each row: ``StratifiedKFold(n_splits, shuffle=True, random_state)``.

    Classes with fewer than ``n_splits`` members are spread one member per fold
    (scikit-learn's warning about them is replaced by ``rare_classes_``).
    """
    counts = np.bincount(y_index)
    if n_splits > len(y_index):
        raise ValueError(f"n_splits={n_splits} is more than the {len(y_index)} rows")
    if counts.max() < n_splits:
        raise ValueError(
            f"n_splits={n_splits} but the largest class has only {counts.max()} rows; "
            "use fewer folds or more data"
        )
    splitter = StratifiedKFold(n_splits, shuffle=True, random_state=random_state)
    folds = np.empty(len(y_index), dtype=np.int32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")
        for fold, (_, test) in enumerate(splitter.split(np.zeros(len(y_index)), y_index)):
            folds[test] = fold
    return folds


def nested_meta_oof(meta: Any, oof: dict[str, np.ndarray], y_index: np.ndarray,
                    fold_of_row: np.ndarray) -> np.ndarray:
    """A meta-learner's honest OOF: refit on the OOF rows of the other folds, fold by fold.

    ``oof`` maps model names to ``(n_rows, n_classes)`` out-of-fold probabilities;
    ``fold_of_row`` gives each row's fold (the folds that produced ``oof``).
    """
    n_classes = next(iter(oof.values())).shape[1]
    out = np.zeros((len(y_index), n_classes), dtype=np.float32)
    for fold in np.unique(fold_of_row):
        held_out = fold_of_row == fold
        inner = clone(meta).fit({k: v[~held_out] for k, v in oof.items()}, y_index[~held_out])
        out[held_out] = inner.predict_proba({k: v[held_out] for k, v in oof.items()})
    return out


def take_rows(X: Any, rows: np.ndarray) -> Any:
    """Rows of a DataFrame (index reset), Series, array or list."""
    if isinstance(X, pd.DataFrame):
        return X.iloc[rows].reset_index(drop=True)
    if isinstance(X, pd.Series):
        return X.iloc[rows].reset_index(drop=True)
    if isinstance(X, np.ndarray):
        return X[rows]
    return [X[i] for i in rows]


def run_job(job: Job, estimator: Any, X: Any, y: np.ndarray, classes: np.ndarray,
            run_path: str | None, oof_dtype: str) -> JobResult:
    """Fit one clone and predict its held-out rows; with ``run_path`` the result is written there.

    The model file is written before the OOF file: a job is complete exactly
    when its ``.oof.npz`` exists. The model file is written unsigned: the
    process that planned the jobs signs it when the result comes back (a dask
    worker needs no signing key). Temporary files of the model go to the run
    folder's ``tmp/``.
    """
    with scratch_files_in(RunFolder(run_path).temp_folder if run_path is not None else None):
        return _run_job(job, estimator, X, y, classes, run_path, oof_dtype)


def _run_job(job: Job, estimator: Any, X: Any, y: np.ndarray, classes: np.ndarray,
             run_path: str | None, oof_dtype: str) -> JobResult:
    model = clone(estimator)
    start = time.perf_counter()
    model.fit(take_rows(X, job.train), y[job.train])
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    if len(job.test):
        proba = model.predict_proba(take_rows(X, job.test))
        oof = proba_for_classes(np.asarray(proba), model.classes_, classes).astype(oof_dtype)
    else:
        oof = np.zeros((0, len(classes)), dtype=oof_dtype)
    predict_seconds = time.perf_counter() - start
    result = JobResult(job.model, job.name, job.key, job.test, oof, fit_seconds, predict_seconds,
                       len(job.train), estimator=model)
    if run_path is not None:
        run = RunFolder(run_path)
        write_joblib(model, run.model_path(job.model, job.name, job.key), sign=False)
        write_npz(run.oof_path(job.model, job.name, job.key), test=job.test, oof=oof,
                  timings=np.array([fit_seconds, predict_seconds]), n_train=np.array(len(job.train)))
        result.estimator = None
    return result


def load_job(run: RunFolder, job: Job) -> JobResult | None:
    """The stored result of ``job``, or None when it has not finished.

    A job whose files were damaged or deleted since (disk errors, a hand-edited
    folder) is not trusted: it is recomputed, with a warning. Its model file
    must carry this user's signature (see :mod:`stackcat.runs`), which also
    catches a truncated or overwritten model without unpickling it.
    """
    path = run.oof_path(job.model, job.name, job.key)
    if not path.exists():
        return None
    model_path = run.model_path(job.model, job.name, job.key)
    if not model_path.exists():
        warnings.warn(f"{path}: its fitted model file is gone; the job is computed again", stacklevel=3)
        return None
    problem = signature_problem(model_path)
    if problem is not None:
        warnings.warn(f"{model_path}: {problem}; the job is computed again", stacklevel=3)
        return None
    try:
        with np.load(path) as stored:
            if not np.array_equal(stored["test"], job.test):
                return None
            fit_seconds, predict_seconds = stored["timings"].tolist()
            return JobResult(job.model, job.name, job.key, stored["test"], stored["oof"], fit_seconds,
                             predict_seconds, int(stored["n_train"]), cached=True)
    except Exception as exc:  # a damaged zip raises BadZipFile, ValueError, KeyError, EOFError...
        warnings.warn(f"{path}: unreadable ({type(exc).__name__}: {exc}); the job is computed again",
                      stacklevel=3)
        return None


# --------------------------------------------------------------------------- the estimator


class StackingCategorizer(ClassifierMixin, _BaseComposition, BaseEstimator):
    """Stack base classifiers through out-of-fold probabilities and a meta-learner.

    Parameters
    ----------
    estimators : list of (str, estimator)
        Named base classifiers; each reads the columns it needs from X.
    meta : {"auto", "rerank", "multiclass", "average"} or estimator, default="auto"
        The meta-learner (:func:`stackcat.meta.make_meta`); "auto" re-ranks
        candidates when there are more than 50 classes, else CatBoost MultiClass.
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
    >>> stack = StackingCategorizer([("ft", FastTextClassifier(thread=1, dim=8, epoch=5))],
    ...                             meta="average", n_splits=3, progress=False, verbose=0)
    >>> stack.fit(texts, labels).oof_["ft"].shape
    (30, 3)
    """

    _parameter_constraints: dict = {
        "estimators": [list],
        "meta": [StrOptions({"auto", "rerank", "multiclass", "average"}), HasMethods(["fit", "predict_proba"])],
        "n_splits": [Interval(Integral, 2, None, closed="left")],
        "random_state": ["random_state"],
        "refit": ["boolean"],
        "run_dir": [str, Path, None],
        "n_jobs": [Interval(Integral, None, -1, closed="right"), Interval(Integral, 1, None, closed="left"), None],
        "backend": [str, None],
        "scheduler": [str, None],
        "oof_dtype": [StrOptions({"auto", "float32", "float16"})],
        "evaluate_meta": ["boolean"],
        "keep_models": ["boolean"],
        "progress": ["boolean"],
        "verbose": [Integral, "boolean"],
    }

    def __init__(self, estimators: list[tuple[str, Any]], meta: Any = "auto", n_splits: int = 5,
                 random_state: int | None = 0, refit: bool = False, run_dir: str | Path | None = None,
                 n_jobs: int | None = 1, backend: str | None = None, scheduler: str | None = None,
                 oof_dtype: str = "auto", evaluate_meta: bool = True, keep_models: bool = True,
                 progress: bool = True, verbose: int = 1) -> None:
        self.estimators = estimators
        self.meta = meta
        self.n_splits = n_splits
        self.random_state = random_state
        self.refit = refit
        self.run_dir = run_dir
        self.n_jobs = n_jobs
        self.backend = backend
        self.scheduler = scheduler
        self.oof_dtype = oof_dtype
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
            self._collect(results, n_rows)
            self._fit_meta_explained(y_index, [job.key for job in jobs], run)
            self.oof_scores_ = self._score_table(y_index)
            if run:
                self.run_dir_ = str(Path(self.run_dir).resolve())
                write_joblib(self, run.path / STACKER_FILE)
                run.write_manifest(self._manifest(data_key, n_rows, status="complete"))
                # only now: until the new stacker.joblib is in place, the old one refers to these files
                for name, _ in self.estimators:
                    run.remove_stale_jobs(name, {job.key for job in jobs if job.model == name})
        return self

    def _fit_meta_explained(self, y_index: np.ndarray, job_keys: list[str], run: RunFolder | None) -> None:
        """``_fit_meta``, with a failure of the meta-learner's own library said in stackcat's terms."""
        start = time.perf_counter()
        try:
            self._fit_meta(y_index, job_keys, run)
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
                key = digest(model_key, data_key, train, test, self._oof_storage)
                jobs.append(Job(name, f"fold-{fold}", train, test, key))
            if self.refit:
                jobs.append(Job(name, "full", rows, rows[:0], digest(model_key, data_key, "full")))
        return jobs

    def _run_jobs(self, jobs: list[Job], X: Any, labels: np.ndarray, run: RunFolder | None) -> list[JobResult]:
        done = [r for r in (load_job(run, job) for job in jobs) if r is not None] if run else []
        finished = {(r.model, r.name) for r in done}
        pending = [job for job in jobs if (job.model, job.name) not in finished]
        estimators = self.named_estimators
        run_path = str(run.path) if run else None
        results = list(done)
        for name in dict.fromkeys(job.model for job in pending):
            # frozen encoders fill their cache once here instead of once per parallel job
            warm_cache = getattr(estimators[name], "warm_cache", None)
            if callable(warm_cache):
                warm_cache(X)
        bar = progress_bar(total=len(jobs), initial=len(done), desc="jobs", unit="job", enabled=self.progress)
        if done and self.verbose:
            log_stage(f"{len(done)} of {len(jobs)} jobs already done in {run.path}; {len(pending)} to run")
        elif self.verbose:
            log_stage(f"{len(jobs)} jobs to run ({len(estimators)} models x {self.n_splits} folds"
                      f"{' + a refit on all rows' if self.refit else ''}, {len(X):,} rows)")
        tasks = (joblib.delayed(run_job)(job, estimators[job.model], X, labels, self.classes_,
                                         run_path, self._oof_storage) for job in pending)
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

    @contextlib.contextmanager
    def _parallel_backend(self) -> Iterator[None]:
        if self.scheduler is None and self.backend != "dask":
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
            predicted = self.classes_[np.asarray(result.oof, dtype=np.float32).argmax(axis=1)]
            line += f", {len(result.test):,} held-out rows, accuracy {(predicted == labels[result.test]).mean():.4f}"
        return line

    def _collect(self, results: Iterable[JobResult], n_rows: int) -> None:
        names = [name for name, _ in self.estimators]
        self.oof_ = {name: np.zeros((n_rows, len(self.classes_)), dtype=self._oof_storage) for name in names}
        filled = {name: np.zeros(n_rows, dtype=np.int32) for name in names}
        models: dict[str, dict[str, Any]] = {name: {} for name in names}
        records = []
        run = RunFolder(self.run_dir) if self.run_dir is not None else None
        for result in results:
            self.oof_[result.model][result.test] = result.oof
            filled[result.model][result.test] += 1
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
        wanted = ["full"] if self.refit else [f"fold-{k}" for k in range(self.n_splits)]
        self.fold_models_ = {name: [models[name][job] for job in wanted] for name in names} if self.keep_models else {}
        self.jobs_ = pd.DataFrame(records).sort_values(["model", "job"], ignore_index=True)

    def _fit_meta(self, y_index: np.ndarray, job_keys: list[str], run: RunFolder | None) -> None:
        from stackcat.meta import make_meta

        meta = (make_meta(self.meta, len(self.classes_)) if isinstance(self.meta, str)
                else clone(self.meta))
        # the job keys determine the OOF matrices exactly, so they key the meta-learner too
        oof_key = digest(model_fingerprint(meta), sorted(job_keys), y_index, self.evaluate_meta)
        cached = _read_cached(run.meta_path(oof_key)) if run else None
        if cached is not None:
            self.meta_, self.meta_oof_ = cached
            return
        self.meta_oof_ = self._meta_oof(meta, y_index) if self.evaluate_meta else None
        self.meta_ = clone(meta).fit(self.oof_, y_index)
        if run:
            write_joblib((self.meta_, self.meta_oof_), run.meta_path(oof_key))

    def _meta_oof(self, meta: Any, y_index: np.ndarray) -> np.ndarray:
        return nested_meta_oof(meta, self.oof_, y_index, self.fold_of_row_)

    def _score_table(self, y_index: np.ndarray) -> pd.DataFrame:
        from stackcat.metrics import comparison_table

        return comparison_table(self.oof_results(), y_index)

    def oof_results(self) -> dict[str, np.ndarray]:
        """OOF probabilities of each base model, their plain average and the meta-learner."""
        check_is_fitted(self, "oof_")
        results = {name: np.asarray(p, dtype=np.float32) for name, p in self.oof_.items()}
        if len(results) > 1:
            results["average"] = np.mean(list(results.values()), axis=0)
        if self.meta_oof_ is not None:
            results[f"meta:{type(self.meta_).__name__}"] = self.meta_oof_
        return results

    def _manifest(self, data_key: str, n_rows: int, status: str) -> dict[str, Any]:
        return {
            "stackcat_version": __version__,
            "status": status,
            "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
            "versions": package_versions(),
            "data_fingerprint": data_key,
            "n_rows": n_rows,
            "classes": [c.item() if hasattr(c, "item") else c for c in self.classes_],
            "folds": {"n_splits": self.n_splits, "random_state": self.random_state,
                      "fingerprint": digest(self.fold_of_row_)},
            "rare_classes": [c.item() if hasattr(c, "item") else c for c in self.rare_classes_],
            "models": {name: {"class": type(est).__name__, "fingerprint": model_fingerprint(est),
                              "params": {k: repr(v) for k, v in est.get_params(deep=False).items()}}
                       for name, est in self.estimators},
            "meta": repr(self.meta),
            "refit": self.refit,
            "oof_dtype": self._oof_storage,
        }

    # prediction -------------------------------------------------------------
    def predict_base_proba(self, X: Any) -> dict[str, np.ndarray]:
        """Test-time probabilities of every base model (mean of its fold models, or its refit model)."""
        check_is_fitted(self, "meta_")
        if not self.fold_models_:
            raise RuntimeError("the fold models were not kept (keep_models=False): this stack cannot predict new data")
        out = {}
        for name, refs in self.fold_models_.items():
            total = np.zeros((len(X), len(self.classes_)), dtype=np.float32)
            for ref in refs:
                model = self._model(ref)
                total += proba_for_classes(np.asarray(model.predict_proba(X), dtype=np.float32),
                                           model.classes_, self.classes_)
            out[name] = total / len(refs)
        return out

    def predict_proba(self, X: Any) -> np.ndarray:
        """Meta-learner probabilities ``(n_samples, n_classes)`` in ``classes_`` order."""
        return self.meta_.predict_proba(self.predict_base_proba(X))

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


def _read_cached(path: Path) -> Any:
    """A cached, signed result, or None when absent, unsigned or damaged (then it is computed again)."""
    if not path.exists():
        return None
    problem = signature_problem(path)
    if problem is not None:
        warnings.warn(f"{path}: {problem}; computed again", stacklevel=3)
        return None
    try:
        return load_pickle(path, trusted=True, what="cached result")  # its signature was just checked
    except (RunFolderError, OSError) as exc:
        warnings.warn(f"{exc}; computed again", stacklevel=3)
        return None


