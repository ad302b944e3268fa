"""The run folder: its files, a lock, the manifest and the fingerprints that key every result.

A run folder holds everything one ``fit`` produced::

    manifest.json                 versions, data fingerprint, classes, folds, models
    .lock                         held (flock) by the process working on the folder
    table.json                    the table's column settings (TableSpec) and source, for predict
    data_problems.csv             rows left out or repaired, and why (row, id, column, reason)
    image_problems.csv            rows whose image is unusable (row, id, image_path, status), if any
    jobs/<model>/<job>.<key>.oof.npz      out-of-fold part of one (model, fold) job
    jobs/<model>/<job>.<key>.model.joblib the fitted fold model (for test-time prediction)
    meta/<key>.joblib             fitted meta-learners
    stacker.joblib                the fitted StackingCategorizer (refers to the files above)
    <any>.joblib.sig              HMAC-SHA256 signature of the pickle beside it (see below)
    tmp/                          scratch files of running jobs (a fastText training text...)
    report.md, *.png, per_class_f1.csv    the report (:func:`stackcat.report.write_run_report`)

:class:`RunFolder` names these files and reads and writes the ones that are
not the stacker's own (the table settings and the problem lists).

Every file is written with :func:`stackcat.files.atomic_path`: to a temporary
name in the same folder, flushed to disk and renamed over its final name, so a
reader never sees half a file, whatever happens to the writer (``kill -9``
included). A job counts as done when its ``.oof.npz`` exists: it is written
last.

Trust model of the pickles
--------------------------
Fitted models are pickles, and unpickling a file can run any code in it. So
every pickle stackcat writes is signed with an HMAC-SHA256 under a secret key
of the user (:func:`key_path`: ``$STACKCAT_KEY_FILE``, else
``$XDG_CONFIG_HOME/stackcat/key``, else ``~/.config/stackcat/key``; 32 random
bytes created on first use, mode 0600), the signature stored beside the file
(``<file>.sig``). :func:`load_pickle` verifies the signature before
unpickling and refuses an unsigned or mis-signed file, naming it, unless the
caller says the folder is trusted (``trusted=True``, ``--trust-run-dir``: a
folder from a colleague, or one written before signatures existed). A run
folder written by another user is therefore refused until trusted; one you
wrote yourself loads as it is, wherever it was moved. With a dask cluster, the
workers write the fold models unsigned and the driver signs each one when its
job comes back, so the workers need no key.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import hashlib
import hmac
import json
import os
import platform
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd

from stackcat import __version__
from stackcat.core import current_umask  # noqa: F401 - re-exported: its old home
from stackcat.files import (
    TEMP_SUFFIX,
    atomic_path,
    digest,
    file_content_hash,
    folder_files,
    write_text_atomic,
)

MANIFEST = "manifest.json"
LOCK = ".lock"
TABLE_SETTINGS = "table.json"
DATA_PROBLEMS = "data_problems.csv"
IMAGE_PROBLEMS = "image_problems.csv"
DATA_PROBLEM_COLUMNS = ("row", "id", "column", "reason")
IMAGE_PROBLEM_COLUMNS = ("row", "id", "image_path", "status")
TRACKED_PACKAGES = ("numpy", "pandas", "scikit-learn", "catboost", "fasttext-numpy2",
                    "torch", "transformers", "open_clip_torch", "joblib")
# Params that change how a model runs, never what it learns: left out of its fingerprint. An
# estimator class names its own in ``_runtime_params``; this set is for those that do not.
RUNTIME_PARAMS = frozenset({"verbose", "progress", "cache_dir", "image_cache_dir", "text_cache_dir", "n_jobs",
                            "num_threads", "predict_batch_size", "encode_batch_size", "thread_count"})


# The first release whose run folders this one reads: 0.2 renamed params and moved classes, so a
# folder of an older release holds pickles and job keys of names that are gone.
OLDEST_READABLE_RELEASE = (0, 2)

SIGNATURE_SUFFIX = ".sig"
KEY_BYTES = 32
TEMP_FOLDER = "tmp"


class RunFolderError(RuntimeError):
    """The run folder cannot be used (locked by another process, unreadable manifest...)."""


class RunFolderConflict(RunFolderError):
    """A new run cannot start in the folder: it is a file, holds a run, or holds files of another kind."""


class OutdatedRunFolderError(RunFolderError):
    """A run folder fitted by a release older than :data:`OLDEST_READABLE_RELEASE`: nothing of it is reused."""


class UntrustedFileError(RunFolderError):
    """A pickle without a valid signature of this user's key: it is not unpickled."""


# --------------------------------------------------------------------------- files written whole


def write_joblib(obj: Any, path: str | Path, *, sign: bool = True) -> Path:
    """Pickle ``obj`` to ``path`` atomically; signed (``<path>.sig``) unless ``sign=False``.

    The signature is renamed into place before the pickle: a crash between the
    two leaves the old pickle beside the new signature, a mismatch that readers
    treat as damage (never a new pickle that passes for signed).
    """
    with atomic_path(path) as tmp:
        joblib.dump(obj, tmp)
        if sign:
            write_text(file_signature(tmp), signature_path(path))
    return Path(path)


def write_json(obj: Any, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str, ensure_ascii=False), encoding="utf-8")
    return Path(path)


def write_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
    return Path(path)


def write_text(text: str, path: str | Path) -> Path:
    return write_text_atomic(path, text)


# --------------------------------------------------------------------------- scratch files

_scratch_folder: contextvars.ContextVar[Path | None] = contextvars.ContextVar("stackcat_scratch", default=None)


@contextlib.contextmanager
def scratch_files_in(folder: str | Path | None) -> Iterator[None]:
    """Within this block (this thread), :func:`scratch_dir` is ``folder`` (created when used)."""
    token = _scratch_folder.set(Path(folder) if folder is not None else None)
    try:
        yield
    finally:
        _scratch_folder.reset(token)


def scratch_dir() -> str | None:
    """Folder for a model's temporary files: the running job's ``<run>/tmp``, else None ($TMPDIR).

    A model passes it as ``dir=`` to :mod:`tempfile`; files a killed job left
    there are deleted when the run folder is next opened.
    """
    folder = _scratch_folder.get()
    if folder is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)


# --------------------------------------------------------------------------- signed pickles


def key_path() -> Path:
    """Where this user's signing key lives: ``$STACKCAT_KEY_FILE``, else the user's config folder.

    On a cluster, point ``STACKCAT_KEY_FILE`` of the driver at the same file on
    every machine that runs ``fit``/``predict`` for you (workers need none).
    """
    explicit = os.environ.get("STACKCAT_KEY_FILE")
    if explicit:
        return Path(explicit).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config) / "stackcat" / "key"


def signing_key() -> bytes:
    """This user's secret signing key, created (32 random bytes as hex, mode 0600) on first use.

    A key that cannot be created or read (a read-only home folder) is a
    :class:`RunFolderError` naming the file and ``STACKCAT_KEY_FILE``.
    """
    path = key_path()
    try:
        return _read_or_create_key(path)
    except OSError as exc:
        raise RunFolderError(
            f"cannot {'read' if path.exists() else 'create'} the signing key {path} ({type(exc).__name__}: "
            f"{exc.strerror or exc}): run folders are signed with it; set STACKCAT_KEY_FILE to a file "
            "path you can write (e.g. STACKCAT_KEY_FILE=/tmp/$USER-stackcat-key), or make that folder "
            "writable") from exc


def _read_or_create_key(path: Path) -> bytes:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first: use theirs
            pass
        else:
            with os.fdopen(fd, "wb") as handle:
                handle.write(os.urandom(KEY_BYTES).hex().encode("ascii"))
    key = path.read_bytes().strip()
    if len(key) < KEY_BYTES:
        # created by a process still writing it, or damaged
        time.sleep(0.1)
        key = path.read_bytes().strip()
        if len(key) < KEY_BYTES:
            raise RunFolderError(f"signing key {path} is too short ({len(key)} bytes): delete it to make a "
                                 "new one (run folders signed with it will then need --trust-run-dir)")
    return key


def signature_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + SIGNATURE_SUFFIX)


def file_signature(path: str | Path, handle: Any = None) -> str:
    """``hmac-sha256:<hex>`` of a file's bytes under :func:`signing_key`."""
    mac = hmac.new(signing_key(), digestmod=hashlib.sha256)
    with contextlib.nullcontext(handle) if handle is not None else open(path, "rb") as source:
        for chunk in iter(lambda: source.read(1 << 20), b""):
            mac.update(chunk)
    return f"hmac-sha256:{mac.hexdigest()}"


def sign_file(path: str | Path) -> Path:
    """Sign a pickle written elsewhere (a worker's fold model): ``<path>.sig``."""
    return write_text(file_signature(path), signature_path(path))


def signature_problem(path: str | Path, handle: Any = None) -> str | None:
    """None when ``path`` carries this user's valid signature, else what is wrong with it."""
    sig = signature_path(path)
    if not sig.exists():
        return f"it is not signed (no {sig.name})"
    expected = sig.read_text(encoding="utf-8", errors="replace").strip()
    actual = file_signature(path, handle)
    if not hmac.compare_digest(expected.encode(), actual.encode()):
        return (f"its signature in {sig.name} does not match its content (damaged, changed since, "
                f"or signed with another user's key {key_path()})")
    return None


def load_pickle(path: str | Path, *, trusted: bool = False, what: str = "file") -> Any:
    """Unpickle a file stackcat wrote, after checking its signature.

    Parameters
    ----------
    path : str or Path
        A pickle written by :func:`write_joblib`.
    trusted : bool, default=False
        Skip the signature check: for a folder you trust though it was not
        signed with your key (a colleague's run, one written before signatures).
    what : str
        What the file holds, for error messages.

    Raises
    ------
    UntrustedFileError
        The file is unsigned or its signature does not match: it is not unpickled.
    RunFolderError
        The file is signed but does not unpickle (or ``trusted`` and damaged).

    Examples
    --------
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "x.joblib")
    >>> _ = write_joblib({"a": 1}, path)
    >>> load_pickle(path)
    {'a': 1}
    """
    path = Path(path)
    with open(path, "rb") as handle:
        if not trusted:
            problem = signature_problem(path, handle)
            if problem is not None:
                raise UntrustedFileError(
                    f"{path}: refused to load this {what}: {problem}. A pickle can run code when loaded, "
                    "so stackcat only loads its own signed files. If you trust this run folder (you wrote it "
                    "with an older stackcat, or a colleague gave it to you), pass --trust-run-dir "
                    "(trusted=True); if it is your own run, run the same fit with --resume to recompute "
                    "what is damaged")
            handle.seek(0)
        try:
            return joblib.load(handle)
        except Exception as exc:  # a damaged pickle raises almost anything
            raise RunFolderError(
                f"{path}: unreadable {what} ({type(exc).__name__}: {exc}); the file is damaged. Run the "
                "same fit again with --resume to recompute it (finished jobs are reused)") from exc


# --------------------------------------------------------------------------- fingerprints


def frame_fingerprint(X: Any, y: Any = None, file_columns: Sequence[str] = ()) -> str:
    """Fingerprint of the data a model sees: every cell of X (and y), in order.

    ``file_columns`` name the columns whose cells are paths of files the model
    reads (images): the *content* of those files is fingerprinted too (see
    :func:`files_fingerprint`), so a file replaced under the same name changes
    the fingerprint. When X is not a DataFrame, any non-empty ``file_columns``
    means that X's values themselves are the paths.
    """
    if isinstance(X, pd.DataFrame):
        hashed = pd.util.hash_pandas_object(X.astype(object), index=False).to_numpy()
        names = [str(c) for c in X.columns]
    else:
        hashed = pd.util.hash_array(np.asarray(X, dtype=object).astype(str))
        names = []
    labels = None if y is None else pd.util.hash_array(np.asarray(y, dtype=object).astype(str))
    if not file_columns:
        return digest(names, hashed, labels)
    return digest(names, hashed, labels, files_fingerprint(X, file_columns))


def files_fingerprint(X: Any, file_columns: Sequence[str]) -> str:
    """Digest of the content of every file named in ``file_columns`` of X (row order kept).

    Each file is hashed once per process and remembered by (path, size,
    mtime): the same hasher as the image embedding cache
    (:func:`stackcat.files.file_content_hash`), so a fit reads each image once
    for both. Missing files and empty cells count as such.
    """
    parts = []
    for column in sorted(set(file_columns)):
        if isinstance(X, pd.DataFrame):
            if column not in X.columns:
                continue
            values = X[column].to_numpy(dtype=object)
        else:
            values = np.asarray(X, dtype=object).ravel()
        parts.append((column, [file_content_hash(value) for value in values]))
    return digest(parts)


# Params that name a column of file paths the estimator reads (``image_column``...).
FILE_COLUMN_PARAMS = ("image_column",)
FILE_COLUMN_SUFFIX = "_file_column"
# Params that may name a local file or folder the estimator reads (a text model checkpoint...).
FILE_PARAMS = ("model_name", "pretrained_vectors")
FILE_PARAM_SUFFIXES = ("_file", "_path")


def file_columns_of(estimator: Any) -> list[str]:
    """Columns of X whose cells are paths of files ``estimator`` reads.

    An estimator declares them with a ``file_columns`` attribute or method
    (a list of column names); otherwise any of its params (nested ones
    included) named ``image_column`` or ending in ``_file_column`` names one.
    """
    declared = getattr(estimator, "file_columns", None)
    if declared is not None:
        return list(declared() if callable(declared) else declared)
    columns = []
    for name, value in estimator.get_params(deep=True).items():
        leaf = name.split("__")[-1]
        if isinstance(value, str) and (leaf in FILE_COLUMN_PARAMS or leaf.endswith(FILE_COLUMN_SUFFIX)):
            columns.append(value)
    return sorted(set(columns))


def runtime_params(estimator: Any) -> frozenset[str]:
    """The params of ``estimator`` that do not change what it learns (left out of its fingerprint).

    An estimator class declares them in a ``_runtime_params`` class attribute
    (``("progress", "cache_dir", ...)``); one that declares nothing gets
    :data:`RUNTIME_PARAMS`.

    Examples
    --------
    >>> from sklearn.linear_model import LogisticRegression
    >>> "verbose" in runtime_params(LogisticRegression())
    True
    """
    declared = getattr(type(estimator), "_runtime_params", None)
    return RUNTIME_PARAMS if declared is None else frozenset(declared)


def model_fingerprint(estimator: Any) -> str:
    """Class + learning params; each (nested) estimator's :func:`runtime_params` left out."""
    deep = estimator.get_params(deep=True)

    def is_runtime(key: str) -> bool:
        owner_key, _, leaf = key.rpartition("__")
        owner = deep.get(owner_key) if owner_key else estimator
        return leaf in runtime_params(owner)

    params = {k: v for k, v in deep.items() if not is_runtime(k)}
    return digest(type(estimator).__module__, type(estimator).__qualname__, sorted(params.items(), key=str))


def param_files_fingerprint(estimator: Any) -> str | None:
    """Digest of the content of the local files and folders the estimator's params name, or None.

    Params named ``model_name`` or ``pretrained_vectors``, or ending in
    ``_file`` or ``_path`` (nested ones included), whose value is an existing
    local path: a checkpoint folder or vectors file replaced in place changes
    the digest. A hub name or a missing path counts as its text (the params'
    fingerprint has it already). Files are hashed like :func:`files_fingerprint`
    (once per process); hidden files of a folder are left out.
    """
    parts = []
    for name, value in sorted(estimator.get_params(deep=True).items()):
        leaf = name.split("__")[-1]
        if not (leaf in FILE_PARAMS or leaf.endswith(FILE_PARAM_SUFFIXES)) or not isinstance(value, (str, os.PathLike)):
            continue
        path = Path(value)
        if path.is_file():
            parts.append((name, file_content_hash(path)))
        elif path.is_dir():
            files = folder_files(path)
            parts.append((name, [(f.relative_to(path).as_posix(), file_content_hash(f)) for f in files]))
    return digest(parts) if parts else None


def package_versions() -> dict[str, str | None]:
    # stackcat's own: the code that runs (an editable install's metadata keeps the version it was installed at)
    versions: dict[str, str | None] = {"python": platform.python_version(), "stackcat": __version__}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# --------------------------------------------------------------------------- the folder


class RunFolder:
    """One run's folder: paths, lock and manifest.

    Examples
    --------
    >>> import tempfile
    >>> with RunFolder(tempfile.mkdtemp()).locked() as run:
    ...     _ = run.write_manifest({"note": "hello"})
    ...     run.read_manifest()["note"]
    'hello'
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock_handle: Any = None

    # locking ---------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[RunFolder]:
        """Hold the folder's lock; a second process is refused with a clear message."""
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / LOCK, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunFolderError(
                f"run folder {self.path} is in use by {holder}; wait for it to finish, "
                "or stop it and run again (finished jobs are kept)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})")
        handle.flush()
        self._lock_handle = handle
        try:
            yield self
        finally:
            self._lock_handle = None
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            handle.close()

    # manifest --------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def read_manifest(self) -> dict[str, Any] | None:
        """The manifest, or None before the first fit wrote one.

        Raises
        ------
        RunFolderError
            The manifest is unreadable.
        OutdatedRunFolderError
            The folder was fitted by a release older than
            :data:`OLDEST_READABLE_RELEASE` (nothing of it is reused).
        """
        if not self.manifest_path.exists():
            return None
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise RunFolderError(f"{self.manifest_path}: unreadable manifest ({exc})") from exc
        release = _release(manifest.get("stackcat_version"))
        if release is not None and release < OLDEST_READABLE_RELEASE:
            raise OutdatedRunFolderError(
                f"run folder {self.path}: fitted by stackcat {release[0]}.{release[1]}: fit again; `--resume` "
                f"reuses nothing (its {MANIFEST} says stackcat {manifest['stackcat_version']}; choose a new "
                "--run-dir)")
        return manifest

    def write_manifest(self, manifest: Mapping[str, Any]) -> Path:
        return write_json(dict(manifest), self.manifest_path)

    def warn_if_versions_differ(self, manifest: Mapping[str, Any] | None) -> list[str]:
        """Warn (and return the differences) when the folder was written by other library versions."""
        if not manifest or "versions" not in manifest:
            return []
        now = package_versions()
        changed = [f"{name} {old} -> {now.get(name)}" for name, old in manifest["versions"].items()
                   if name in now and now.get(name) != old]
        if changed:
            warnings.warn(
                f"run folder {self.path} was written with other library versions ({'; '.join(changed)}); "
                "finished jobs are reused as they are. Use a new --run-dir to recompute everything "
                "with the current versions.",
                stacklevel=3,
            )
        return changed

    # a new run ---------------------------------------------------------------
    def check_new_run(self, resume: bool = False) -> None:
        """Refuse a folder that a new run must not write into.

        That is a file; a folder that holds a run, unless ``resume`` (its
        finished jobs are then reused); a folder that is neither a run folder nor
        empty (no file of the user's is mixed with the run).

        Raises
        ------
        RunFolderConflict
            Saying why, and what to do instead.
        """
        path, manifest = self.path, self.manifest_path
        if path.exists() and not path.is_dir():
            raise RunFolderConflict(f"--run-dir {path} is a file, not a folder: choose another --run-dir")
        if manifest.exists() and not resume:
            raise RunFolderConflict(f"run folder {path} already holds a run: pass --resume to continue it "
                                    "(finished jobs are reused), or choose another --run-dir")
        if resume:
            self.read_manifest()  # a folder of an older release: refused before the table is read
        if path.is_dir() and not manifest.exists() and not self.table_settings_path.exists():
            others = sorted(p.name for p in path.iterdir())
            if others:
                raise RunFolderConflict(
                    f"--run-dir {path} is not a stackcat run folder and is not empty "
                    f"({', '.join(others[:5])}{' ...' if len(others) > 5 else ''}): "
                    "choose a new or empty folder, so that no file of yours is mixed with the run")

    # the table ---------------------------------------------------------------
    @property
    def table_settings_path(self) -> Path:
        return self.path / TABLE_SETTINGS

    def record_table(self, spec: Mapping[str, Any], source: str,
                     data_problems: pd.DataFrame | Iterable[Mapping[str, Any]] = ()) -> None:
        """Keep the table's settings and its data problems, under the folder's lock.

        Parameters
        ----------
        spec : mapping
            The table's column settings (``TableSpec.to_dict()``): predict reads the
            next tables with them.
        source : str
            Where the table came from (a path, "stackcat demo").
        data_problems : DataFrame or iterable of mappings
            One row per problem, with the columns :data:`DATA_PROBLEM_COLUMNS`
            (``PreparedTable.problems()``).

        Raises
        ------
        RunFolderError
            Another process holds the folder (nothing is written then).
        """
        with self.locked():
            self.write_table_settings(spec, source)
            self.write_data_problems(data_problems)

    def write_table_settings(self, spec: Mapping[str, Any], source: str) -> Path:
        return write_json({"spec": dict(spec), "source": source}, self.table_settings_path)

    def read_table_settings(self) -> dict[str, Any]:
        """``{"spec": <TableSpec dict>, "source": str}`` as :meth:`record_table` wrote it.

        Raises
        ------
        FileNotFoundError
            The folder has no table settings: it is not a run folder.
        OutdatedRunFolderError
            The folder was fitted by an older release (see :meth:`read_manifest`).
        """
        if not self.table_settings_path.exists():
            raise FileNotFoundError(f"{self.path}: not a stackcat run folder (no {TABLE_SETTINGS})")
        self.read_manifest()  # a folder of an older release: its settings may name what is gone
        return json.loads(self.table_settings_path.read_text(encoding="utf-8"))

    def write_data_problems(self, problems: pd.DataFrame | Iterable[Mapping[str, Any]]) -> Path:
        """``data_problems.csv``: the columns :data:`DATA_PROBLEM_COLUMNS`, a header alone when none."""
        return _write_rows(self.path / DATA_PROBLEMS, problems, DATA_PROBLEM_COLUMNS)

    def write_image_problems(self, problems: pd.DataFrame | Iterable[Mapping[str, Any]]) -> Path:
        """``image_problems.csv``: the columns :data:`IMAGE_PROBLEM_COLUMNS`."""
        return _write_rows(self.path / IMAGE_PROBLEMS, problems, IMAGE_PROBLEM_COLUMNS)

    # job files -------------------------------------------------------------
    def job_stem(self, model: str, job: str, key: str) -> Path:
        return self.path / "jobs" / _safe_name(model) / f"{job}.{key[:16]}"

    def oof_path(self, model: str, job: str, key: str) -> Path:
        return self.job_stem(model, job, key).with_name(self.job_stem(model, job, key).name + ".oof.npz")

    def model_path(self, model: str, job: str, key: str) -> Path:
        return self.job_stem(model, job, key).with_name(self.job_stem(model, job, key).name + ".model.joblib")

    def meta_path(self, key: str) -> Path:
        return self.path / "meta" / f"{key[:16]}.joblib"

    @property
    def temp_folder(self) -> Path:
        """Scratch files of running jobs (a fastText training text): emptied at the next start."""
        return self.path / TEMP_FOLDER

    def remove_temp_files(self) -> list[Path]:
        """Delete temporary files that a killed writer left (``.<name>.<random>.tmp``, ``tmp/``).

        Call it while holding the lock: no other process is writing then. The
        image embedding cache (``embeddings/``) is left alone: it never reads
        its temporary names.
        """
        folders = [self.path, self.path / "meta", *sorted((self.path / "jobs").glob("*"))]
        removed = []
        for folder in folders:
            if folder.is_dir():
                for file in folder.glob(f".*{TEMP_SUFFIX}"):
                    file.unlink(missing_ok=True)
                    removed.append(file)
        if self.temp_folder.is_dir():
            for file in sorted(self.temp_folder.rglob("*"), reverse=True):  # files before their folders
                if file.is_dir() and not file.is_symlink():
                    file.rmdir()
                else:
                    file.unlink(missing_ok=True)
                    removed.append(file)
        return removed

    def remove_stale_jobs(self, model: str, keep_keys: set[str]) -> list[Path]:
        """Delete job files of ``model`` whose key is not in ``keep_keys`` (params changed since)."""
        folder = self.path / "jobs" / _safe_name(model)
        if not folder.is_dir():
            return []
        short = {k[:16] for k in keep_keys}
        removed = []
        for file in folder.iterdir():
            parts = file.name.split(".")
            if file.name.startswith(".") or len(parts) < 3 or parts[1] not in short:
                file.unlink()
                removed.append(file)
        return removed


def _write_rows(path: Path, rows: pd.DataFrame | Iterable[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    table = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows), columns=list(columns))
    return write_text(table[list(columns)].to_csv(index=False), path)


def _release(version: Any) -> tuple[int, int] | None:
    """``(major, minor)`` of a version string ("0.1.0" -> (0, 1)); None when it is not one."""
    parts = str(version).split(".")[:2] if version is not None else []
    if len(parts) < 2 or not all(part.isdigit() for part in parts):
        return None
    return int(parts[0]), int(parts[1])


def _safe_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    if not cleaned:
        raise ValueError(f"model name {name!r} has no usable characters")
    return cleaned if cleaned == name else f"{cleaned}-{hashlib.sha1(name.encode()).hexdigest()[:6]}"
