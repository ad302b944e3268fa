"""The run folder: atomic files, a lock, the manifest and the fingerprints that key every result.

A run folder holds everything one ``fit`` produced::

    manifest.json                 versions, data fingerprint, classes, folds, models
    .lock                         held (flock) by the process working on the folder
    jobs/<model>/<job>.<key>.oof.npz      out-of-fold part of one (model, fold) job
    jobs/<model>/<job>.<key>.model.joblib the fitted fold model (for test-time prediction)
    meta/<key>.joblib             fitted meta-learners
    stacker.joblib                the fitted StackingCategorizer (refers to the files above)

Every file is written to a temporary name in the same folder, flushed to disk
and renamed over its final name, so a reader never sees half a file, whatever
happens to the writer (``kill -9`` included). A job counts as done when its
``.oof.npz`` exists: it is written last.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd

MANIFEST = "manifest.json"
LOCK = ".lock"
TRACKED_PACKAGES = ("stackcat", "numpy", "pandas", "scikit-learn", "catboost", "fasttext-numpy2",
                    "torch", "transformers", "open_clip_torch", "joblib")
# Params that change how a model runs, never what it learns: left out of its fingerprint.
RUNTIME_PARAMS = frozenset({"verbose", "progress", "cache_dir", "image_cache_dir", "text_cache_dir", "n_jobs",
                            "num_threads", "predict_batch_size", "thread_count"})


class RunFolderError(RuntimeError):
    """The run folder cannot be used (locked by another process, unreadable manifest...)."""


# --------------------------------------------------------------------------- atomic files


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed onto ``path``.

    On any error (a full disk included) the temporary file is removed and
    ``path`` keeps its previous content, if it had one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_joblib(obj: Any, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        joblib.dump(obj, tmp)
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
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


# --------------------------------------------------------------------------- fingerprints


def digest(*parts: Any) -> str:
    """A stable hex digest of picklable values (joblib's hasher: numpy-aware, order-sensitive)."""
    return joblib.hash(parts, hash_name="sha1")


def frame_fingerprint(X: Any, y: Any = None) -> str:
    """Fingerprint of the data a model sees: every cell of X (and y), in order."""
    if isinstance(X, pd.DataFrame):
        hashed = pd.util.hash_pandas_object(X.astype(object), index=False).to_numpy()
        names = [str(c) for c in X.columns]
    else:
        hashed = pd.util.hash_array(np.asarray(X, dtype=object).astype(str))
        names = []
    labels = None if y is None else pd.util.hash_array(np.asarray(y, dtype=object).astype(str))
    return digest(names, hashed, labels)


def model_fingerprint(estimator: Any) -> str:
    """Class + learning params (runtime-only params such as ``verbose`` left out)."""
    params = {k: v for k, v in estimator.get_params(deep=True).items()
              if k.split("__")[-1] not in RUNTIME_PARAMS}
    return digest(type(estimator).__module__, type(estimator).__qualname__, sorted(params.items(), key=str))


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
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
        if not self.manifest_path.exists():
            return None
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise RunFolderError(f"{self.manifest_path}: unreadable manifest ({exc})") from exc

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

    # job files -------------------------------------------------------------
    def job_stem(self, model: str, job: str, key: str) -> Path:
        return self.path / "jobs" / _safe_name(model) / f"{job}.{key[:16]}"

    def oof_path(self, model: str, job: str, key: str) -> Path:
        return self.job_stem(model, job, key).with_name(self.job_stem(model, job, key).name + ".oof.npz")

    def model_path(self, model: str, job: str, key: str) -> Path:
        return self.job_stem(model, job, key).with_name(self.job_stem(model, job, key).name + ".model.joblib")

    def meta_path(self, key: str) -> Path:
        return self.path / "meta" / f"{key[:16]}.joblib"

    def remove_temp_files(self) -> list[Path]:
        """Delete temporary files that a killed writer left (``.<name>.<random>.tmp``).

        Call it while holding the lock: no other process is writing then. The
        image embedding cache (``embeddings/``) is left alone: it never reads
        its temporary names.
        """
        folders = [self.path, self.path / "meta", *sorted((self.path / "jobs").glob("*"))]
        removed = []
        for folder in folders:
            if folder.is_dir():
                for file in folder.glob(".*.tmp"):
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


def _safe_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    if not cleaned:
        raise ValueError(f"model name {name!r} has no usable characters")
    return cleaned if cleaned == name else f"{cleaned}-{hashlib.sha1(name.encode()).hexdigest()[:6]}"
