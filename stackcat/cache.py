"""Caches of frozen-encoder outputs: arrays stored once under string keys, on disk and in memory.

:class:`EmbeddingStore` is what :mod:`stackcat.images` (one vector per image) and
:mod:`stackcat.models._text_features` (one ``(tokens, hidden)`` matrix per text) put
their encoder outputs in. A store belongs to one *namespace* (an encoder, with
whatever else changes its output, e.g. a token limit); the caller picks the keys,
usually content hashes made by :func:`content_key`, so that equal inputs share an
entry and a changed input never meets a stale one.

Layout: ``<cache_dir>/<namespace slug>/<first 2 chars of key>/<key>.npy``, one
array per file (a 2-level tree: 256 folders of ~400 files for 100k entries), and
``ENCODER.txt`` naming the namespace. Each file is written to a temporary name in
the same folder and renamed into place with ``os.replace``, which is atomic: a
reader sees a whole entry or none, whatever runs concurrently or is killed
(``kill -9``) mid-write. Temporary names never end in ``.npy``, so they are never
read; an entry that fails to load, or has the wrong dtype or number of
dimensions (disk damage), counts as absent: it is recomputed and rewritten.
Entries are small and independent, so parallel jobs need no lock. A full or
read-only disk costs the cache (one warning), never the run.

In front of the disk, a :class:`MemoryCache` (an LRU bounded in bytes) avoids
reading or computing an entry twice in one process; without ``cache_dir`` it is
the only cache.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from stackcat.runs import current_umask

__all__ = [
    "MEMORY_CACHE_BYTES",
    "EmbeddingStore",
    "MemoryCache",
    "content_key",
    "namespace_slug",
]

#: Default byte budget of a :class:`MemoryCache`.
MEMORY_CACHE_BYTES = 512 * 2**20
# Part of every namespace's folder name: a new on-disk format gets fresh folders.
CACHE_FORMAT = "v1"
_KEY_PATTERN = re.compile(r"[0-9A-Za-z_-]{3,}")
_INFO_FILE = "ENCODER.txt"


def content_key(*parts: str | bytes) -> str:
    """BLAKE2b-128 hex digest of ``parts`` (unambiguous: each part is length-prefixed).

    Examples
    --------
    >>> len(content_key("model-id", "32", "a red shirt"))
    32
    >>> content_key("ab", "c") == content_key("a", "bc")
    False
    """
    hasher = hashlib.blake2b(digest_size=16)
    for part in parts:
        data = part.encode("utf-8") if isinstance(part, str) else bytes(part)
        hasher.update(len(data).to_bytes(8, "little"))
        hasher.update(data)
    return hasher.hexdigest()


def namespace_slug(namespace: str) -> str:
    """Folder name of a namespace: a readable prefix + a hash of the whole name and the format."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", namespace).strip("_")[:60]
    digest = hashlib.blake2b(f"{CACHE_FORMAT}\0{namespace}".encode(), digest_size=6).hexdigest()
    return f"{readable}-{digest}"


class MemoryCache:
    """A thread-safe LRU of arrays keyed by ``(namespace, key)``, bounded in bytes.

    Arrays are stored read-only, so a caller cannot change a cached entry by accident.

    Examples
    --------
    >>> memory = MemoryCache(max_bytes=64)
    >>> memory.put("ns", "a", np.zeros(8))  # 64 bytes
    >>> memory.put("ns", "b", np.zeros(4))  # evicts "a", the least recently used
    >>> memory.get("ns", "a") is None, memory.get("ns", "b").shape
    (True, (4,))
    """

    def __init__(self, max_bytes: int = MEMORY_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, namespace: str, key: str) -> np.ndarray | None:
        with self._lock:
            array = self._entries.get((namespace, key))
            if array is not None:
                self._entries.move_to_end((namespace, key))
            return array

    def put(self, namespace: str, key: str, array: np.ndarray) -> None:
        if array.nbytes > self.max_bytes:
            return
        array.setflags(write=False)
        with self._lock:
            old = self._entries.pop((namespace, key), None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[(namespace, key)] = array
            self._bytes += array.nbytes
            while self._bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= dropped.nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)


class EmbeddingStore:
    """Arrays of one namespace under string keys: a memory LRU in front of an optional disk folder.

    Parameters
    ----------
    namespace : str
        What the entries are outputs of (an encoder name, plus anything else that
        changes its output). Each namespace gets its own folder.
    cache_dir : str, path-like or None
        Root folder of the on-disk cache (created when first written); None keeps
        entries in memory only.
    dtype : numpy dtype, default=np.float32
        Entries are stored in this dtype; a file of another dtype counts as absent.
    ndim : int or None, default=None
        Number of dimensions of every entry (checked on read); None accepts any.
    memory : MemoryCache or None, default=None
        The in-process cache in front of the disk; None gives the store a private
        one of :data:`MEMORY_CACHE_BYTES`. Share one between stores to share its budget.
    what : str, default="embedding"
        How warnings name the entries (``"cannot write the <what> cache under ..."``).

    Examples
    --------
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> store = EmbeddingStore("toy-encoder", folder, dtype=np.float16, ndim=2)
    >>> key = content_key("a red shirt")
    >>> store.put(key, np.ones((3, 4))).dtype
    dtype('float16')
    >>> fresh = EmbeddingStore("toy-encoder", folder, dtype=np.float16, ndim=2)  # new memory
    >>> found = fresh.get_many([key, content_key("unknown")])
    >>> list(found) == [key], found[key].dtype, found[key].shape
    (True, dtype('float16'), (3, 4))
    """

    def __init__(self, namespace: str, cache_dir: str | os.PathLike | None, *,
                 dtype: np.dtype | type = np.float32, ndim: int | None = None,
                 memory: MemoryCache | None = None, what: str = "embedding") -> None:
        self.namespace = namespace
        self.root = Path(cache_dir) / namespace_slug(namespace) if cache_dir is not None else None
        self.dtype = np.dtype(dtype)
        self.ndim = ndim
        self.memory = memory if memory is not None else MemoryCache()
        self.what = what
        self._write_warned = False

    def get(self, key: str) -> np.ndarray | None:
        """The entry under ``key`` (read-only), or None."""
        array = self.memory.get(self.namespace, key)
        if array is None and self.root is not None:
            array = self._read(key)
            if array is not None:
                self.memory.put(self.namespace, key, array)
        return array

    def get_many(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        """``{key: entry}`` for the keys that have one."""
        found = {}
        for key in keys:
            array = self.get(key)
            if array is not None:
                found[key] = array
        return found

    def put(self, key: str, array: np.ndarray) -> np.ndarray:
        """Store a copy of ``array`` (converted to the store's dtype) under ``key``; returns the copy."""
        array = np.array(array, dtype=self.dtype, order="C")
        if self.ndim is not None and array.ndim != self.ndim:
            raise ValueError(f"{self.what} entries of {self.namespace!r} have {self.ndim} dimension(s); "
                             f"got an array of shape {array.shape}")
        array.setflags(write=False)
        self.memory.put(self.namespace, key, array)
        if self.root is not None:
            self._write(key, array)
        return array

    def entry_path(self, key: str) -> Path:
        """Where the entry of ``key`` lives on disk (whether it exists or not)."""
        if self.root is None:
            raise ValueError("this store has no cache_dir")
        if not _KEY_PATTERN.fullmatch(key):
            raise ValueError(f"cache keys are file names of letters, digits, '_' and '-'; got {key!r}")
        return self.root / key[:2] / f"{key}.npy"

    def _read(self, key: str) -> np.ndarray | None:
        try:
            array = np.load(self.entry_path(key), allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError):
            return None  # a damaged entry: recomputed and replaced
        if array.dtype != self.dtype or (self.ndim is not None and array.ndim != self.ndim):
            return None
        return array

    def _write(self, key: str, array: np.ndarray) -> None:
        final = self.entry_path(key)
        try:
            if not self.root.exists():
                self._create_root()
            final.parent.mkdir(exist_ok=True)
            atomic_write(final, npy_bytes(array))
        except OSError as exc:
            # The array is already computed: a full disk costs the cache, not the run.
            if not self._write_warned:
                warnings.warn(f"cannot write the {self.what} cache under {self.root}: {exc}",
                              RuntimeWarning, stacklevel=4)
                self._write_warned = True

    def _create_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        info = f"encoder: {self.namespace}\nformat: {CACHE_FORMAT}\ndtype: {self.dtype.name}\n"
        atomic_write(self.root / _INFO_FILE, info.encode("utf-8"))


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` in the ``.npy`` format, in memory."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def atomic_write(final: Path, payload: bytes) -> None:
    """Write to a temporary file beside ``final`` (never named ``*.npy``), then rename over it."""
    fd, temporary = tempfile.mkstemp(dir=final.parent, prefix=f".{final.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            os.fchmod(handle.fileno(), 0o666 & ~current_umask())  # mkstemp makes it 0600
        os.replace(temporary, final)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
