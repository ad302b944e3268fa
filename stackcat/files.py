"""Files written whole or not at all, and digests of their content: the one writer and hasher of stackcat.

Writing (:func:`atomic_path`, :func:`write_bytes_atomic`, :func:`write_text_atomic`):
a file is written under a temporary name in its own folder
(``.<name>.<random>.tmp``), flushed to disk (fsync) and renamed over its final
name, so a reader never sees half a file, whatever happens to the writer
(``kill -9`` included). The file gets the permissions the process's umask gives
a new file (``mkstemp`` alone would make it 0600, keeping a shared cache from
other users).

Hashing: :func:`file_digest` is the BLAKE2b-128 of a file's bytes, remembered
per (absolute path, size, mtime) in this process, so each unchanged file is
read once whatever asks for it (image cache keys, run-folder fingerprints,
encoder identities); :func:`folder_digest` does the same for a folder's files
(and, inside :func:`folders_fixed`, reads each folder's file list once per block);
:func:`digest` hashes Python values (job keys).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stackcat.core import current_umask

__all__ = [
    "TEMP_SUFFIX",
    "as_file_path",
    "atomic_folder",
    "atomic_path",
    "digest",
    "file_content_hash",
    "file_digest",
    "folder_digest",
    "folders_fixed",
    "folder_files",
    "forget_digests",
    "write_bytes_atomic",
    "write_text_atomic",
]

#: Suffix of the temporary names (a run folder deletes the ones a killed writer left).
TEMP_SUFFIX = ".tmp"
_READ_CHUNK = 1 << 20

# --------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = TEMP_SUFFIX) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed onto ``path``.

    On any error (a full disk included) the temporary file is removed and
    ``path`` keeps its previous content, if it had one.

    Parameters
    ----------
    path : str or path-like
        The final file; its folder is created when needed.
    suffix : str, default=".tmp"
        Suffix of the temporary name (a writer that picks the format from the
        name, as ``onnx.save`` does, wants the final one).

    Examples
    --------
    >>> import tempfile, os
    >>> target = os.path.join(tempfile.mkdtemp(), "a.txt")
    >>> with atomic_path(target) as tmp:
    ...     _ = tmp.write_text("whole")
    >>> open(target).read()
    'whole'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
            os.fchmod(handle.fileno(), 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it is renamed onto ``path`` (new or empty).

    On any error the temporary folder is removed: ``path`` never holds half a
    folder. The files written inside should be flushed by their writers (the
    last one fsynced) when a crash of the machine must not leave them empty.

    Raises
    ------
    FileExistsError
        When ``path`` exists and is not an empty folder (checked before and after writing).

    Examples
    --------
    >>> import tempfile, os
    >>> target = os.path.join(tempfile.mkdtemp(), "bundle")
    >>> with atomic_folder(target) as tmp:
    ...     _ = (tmp / "a.txt").write_text("whole")
    >>> sorted(os.listdir(target))
    ['a.txt']
    """
    import shutil

    path = Path(path)
    _refuse_used_folder(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())
        _refuse_used_folder(path)
        if path.exists():
            path.rmdir()
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _refuse_used_folder(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not an empty folder; give a new folder")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`); returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


# --------------------------------------------------------------------------- content digests

# (absolute path, size, mtime_ns) -> digest of a file; (folder, its files' stats) -> digest of a folder
_file_memo: dict[tuple[str, int, int], str] = {}
_folder_memo: dict[tuple[str, tuple], str] = {}
_memo_lock = threading.Lock()


def file_digest(path: str | os.PathLike) -> str:
    """BLAKE2b-128 hex digest of a file's bytes, read once per process while unchanged.

    The digest is remembered by (absolute path, size, mtime): an unchanged file
    is not read again, a file replaced in place (new size or mtime) is.

    Raises
    ------
    OSError
        No regular file at ``path`` (``IsADirectoryError`` for a folder or a device),
        or it cannot be read.

    Examples
    --------
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "a.bin")
    >>> _ = write_bytes_atomic(path, b"abc")
    >>> file_digest(path)
    'cf4ab791c62b8d2b2109c90275287816'
    """
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise IsADirectoryError(f"{os.fspath(path)!s}: not a regular file")
    memo_key = (os.path.abspath(path), info.st_size, info.st_mtime_ns)
    with _memo_lock:
        known = _file_memo.get(memo_key)
    if known is not None:
        return known
    hasher = hashlib.blake2b(digest_size=16)
    _hash_into(hasher, path)
    value = hasher.hexdigest()
    with _memo_lock:
        _file_memo[memo_key] = value
    return value


def _hash_into(hasher: Any, path: str | os.PathLike) -> None:
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_READ_CHUNK), b""):
            hasher.update(chunk)


def as_file_path(cell: Any) -> str | None:
    """The path a table cell names, or None for no path (None, NaN, ``pd.NA``, an empty string).

    Examples
    --------
    >>> as_file_path(float("nan")) is None, as_file_path(" "), as_file_path("a.jpg")
    (True, None, 'a.jpg')
    """
    if cell is None or (isinstance(cell, float) and math.isnan(cell)) or _is_na(cell):
        return None
    try:
        text = os.fspath(cell)
    except TypeError:
        text = str(cell)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    return text if text.strip() else None


def _is_na(value: Any) -> bool:
    """pandas' missing markers (``pd.NA``, ``NaT``), without importing pandas for plain paths."""
    if isinstance(value, (str, bytes, os.PathLike)):
        return False
    import pandas as pd

    return bool(pd.api.types.is_scalar(value) and pd.isna(value))


def file_content_hash(cell: Any) -> str | None:
    """:func:`file_digest` of the file a table cell names, or None when there is no readable file.

    Examples
    --------
    >>> file_content_hash("no/such/file.jpg") is None, file_content_hash(None) is None
    (True, True)
    """
    path = as_file_path(cell)
    if path is None:
        return None
    try:
        return file_digest(path)
    except (OSError, ValueError):  # ValueError: a path with a NUL byte
        return None


def folder_files(folder: str | os.PathLike) -> list[Path]:
    """The files under ``folder``, sorted; hidden files and folders (``.onnx/``, ``.git``) left out."""
    folder = Path(folder)
    return sorted(path for path in folder.rglob("*")
                  if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts))


def folder_digest(folder: str | os.PathLike) -> str:
    """BLAKE2b-128 hex digest of a folder's :func:`folder_files`: their relative names, sizes and bytes.

    Stays when the folder is copied or moved; changes when a file is added,
    removed, renamed or changed. Remembered per (folder, each file's size and
    mtime) in this process.

    Raises
    ------
    FileNotFoundError
        The folder holds no (visible) file.

    Examples
    --------
    >>> import tempfile, os
    >>> folder = tempfile.mkdtemp()
    >>> _ = write_text_atomic(os.path.join(folder, "config.json"), "{}")
    >>> len(folder_digest(folder))
    32
    """
    folder = Path(folder)
    fixed = getattr(_fixed, "digests", None)
    if fixed is not None and str(folder) in fixed:
        return fixed[str(folder)]
    files = folder_files(folder)
    if not files:
        raise FileNotFoundError(f"{str(folder)!r} holds no files")
    stats = tuple((path.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns)
                  for path, st in ((path, path.stat()) for path in files))
    memo_key = (str(folder.resolve()), stats)
    with _memo_lock:
        known = _folder_memo.get(memo_key)
    if known is None:
        hasher = hashlib.blake2b(digest_size=16)
        for path, (relative, size, _) in zip(files, stats, strict=True):
            hasher.update(f"{relative}\0{size}\0".encode())
            _hash_into(hasher, path)
        known = hasher.hexdigest()
        with _memo_lock:
            _folder_memo[memo_key] = known
    if fixed is not None:
        fixed[str(folder)] = known
    return known


# The digests read inside this thread's folders_fixed() block, by folder as named.
_fixed = threading.local()


@contextlib.contextmanager
def folders_fixed() -> Iterator[None]:
    """Within the block, :func:`folder_digest` looks at each folder's files once, in this thread.

    One prediction asks for its text encoder's identity once per member and
    per signal (a dozen times); each time, every file of the checkpoint folder
    was listed and stat'ed again. Inside the block the first answer stands, so
    a folder that changes is still seen by the next prediction, not in the
    middle of one. Nested blocks share the outermost one's answers.

    Examples
    --------
    >>> import tempfile, os
    >>> folder = tempfile.mkdtemp()
    >>> _ = write_text_atomic(os.path.join(folder, "config.json"), "{}")
    >>> with folders_fixed():
    ...     first = folder_digest(folder)
    ...     _ = write_text_atomic(os.path.join(folder, "config.json"), '{"changed": 1}')
    ...     folder_digest(folder) == first
    True
    >>> folder_digest(folder) == first
    False
    """
    if getattr(_fixed, "digests", None) is not None:
        yield
        return
    _fixed.digests = {}
    try:
        yield
    finally:
        _fixed.digests = None


def forget_digests() -> None:
    """Forget the file and folder digests remembered by this process (they are read again when asked)."""
    with _memo_lock:
        _file_memo.clear()
        _folder_memo.clear()


def digest(*parts: Any) -> str:
    """A stable hex digest of picklable values (joblib's hasher: numpy-aware, order-sensitive).

    Examples
    --------
    >>> digest("model", 1) == digest("model", 1) != digest(1, "model")
    True
    """
    import joblib  # here: reading and writing files needs none of it

    return joblib.hash(parts, hash_name="sha1")
