"""Caches of frozen-encoder outputs: arrays stored once under string keys, on disk and in memory.

:class:`EmbeddingStore` is what :mod:`stackcat.features.images` (one vector per image) and
:mod:`stackcat.features.text_states` (one ``(tokens, hidden)`` matrix per text) put
their encoder outputs in. A store belongs to one *namespace* (an encoder, with
whatever else changes its output, e.g. a token limit); the caller picks the keys,
usually content hashes made by :func:`content_key`, so that equal inputs share an
entry and a changed input never meets a stale one.

On-disk format (``v2``)
-----------------------
One folder per namespace, ``<cache_dir>/<namespace slug>/``, holding
``ENCODER.txt`` (what the namespace is) and *shards* made of two append-only files
that belong to the process that created them (``<name>`` is
``shard-<pid>-<random>``)::

    <name>.bin   the entries' raw bytes, one after the other
    <name>.idx   one 64-byte record per entry: BLAKE2b-128 of the key, offset and
                 size in the .bin, shape, dtype, CRC-32 of the bytes, and a checksum
                 of the record itself

A million entries are a handful of files, not a million. A writer appends an
entry's bytes to its ``.bin``, then its record to its ``.idx``; nobody else writes
to these files, so parallel writers (processes, Dask workers on a shared file
system) need no lock. A reader loads every ``.idx`` into sorted arrays (one
``searchsorted`` per batch of keys) and reads each entry with one ``pread`` of its
``.bin``. When a key is missing, it first reads whatever the ``.idx`` files
gained since (entries other processes wrote meanwhile).

Guarantees, as in the one-file-per-entry ``v1`` format:

- **Atomic entries**: an entry exists once its record is whole and valid, and its
  bytes match the record's CRC-32; bytes are written before the record. A writer
  killed (``kill -9``) mid-entry leaves bytes without a record, or a torn last
  record that fails its checksum: either is ignored, never read.
- **Damage = absent**: an entry whose record fails its checksum, whose bytes are
  missing (a short ``.bin``) or fail their CRC, or whose dtype or number of
  dimensions is not the store's, counts as absent; it is recomputed and appended
  again. Of several records of one key (written again after damage, or by
  concurrent writers), the first that reads whole is used, the latest loaded
  first (a process's own writes in their order): content keys make them equal.
- **A full or read-only disk costs the cache, never the run** (one warning per
  store; the process tries writing again after :data:`RETRY_WRITE_AFTER_S`).
- **Content-keyed**: keys are the callers' content hashes; the index holds a
  BLAKE2b-128 digest of each key.

Space: a writer starts a new shard past :data:`SHARD_BYTES`. When a folder holds
:data:`COMPACT_MIN_SHARDS` or more shards under :data:`COMPACT_BELOW_BYTES` that no
live process is writing (a writer holds an ``flock`` on its ``.idx``), the next
process to read the folder copies their valid entries (up to :data:`SHARD_BYTES`)
into one new shard, syncs it, then deletes them; a crash in between leaves
duplicates, never a loss, and a process that had loaded a deleted shard finds its
entries in the new one on its next miss. Compaction is also what reclaims the
bytes of killed writers and of keys written twice by concurrent writers; bytes in
large shards are not reclaimed (at most one entry per killed writer, plus
duplicates when jobs encode the same inputs at once: fill the cache first with one
call on all the inputs to avoid them). Where ``flock`` is missing (Windows) or
fails (some network file systems), nothing is compacted.

The ``v1`` cache of a namespace (``<slug>/<2 chars>/<key>.npy`` files) is still
read: a key missing from ``v2`` is looked up there and, when found, copied into
``v2``. The ``v1`` files are left in place (an older stackcat may still use them);
delete their folder once no older version runs.

In front of the disk, a :class:`MemoryCache` (an LRU bounded in bytes) avoids
reading or computing an entry twice in one process; without ``cache_dir`` it is
the only cache.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import secrets
import struct
import threading
import time
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: no flock, so no compaction (a live shard cannot be told apart)
    fcntl = None

from stackcat.files import write_bytes_atomic

__all__ = [
    "CACHE_FORMAT",
    "COMPACT_BELOW_BYTES",
    "COMPACT_MIN_SHARDS",
    "MEMORY_CACHE_BYTES",
    "RETRY_WRITE_AFTER_S",
    "SHARD_BYTES",
    "EmbeddingStore",
    "MemoryCache",
    "content_key",
    "count_entries",
    "namespace_slug",
]

#: Default byte budget of a :class:`MemoryCache`.
MEMORY_CACHE_BYTES = 512 * 2**20
#: Part of every namespace's folder name: a new on-disk format gets fresh folders.
CACHE_FORMAT = "v2"
#: A writer starts a new shard once its ``.bin`` holds this many bytes.
SHARD_BYTES = 2**30
#: Shards smaller than this are merged on open, when there are at least COMPACT_MIN_SHARDS of them.
COMPACT_BELOW_BYTES = 64 * 2**20
COMPACT_MIN_SHARDS = 16
#: After a failed write, a process leaves the folder alone for this many seconds.
RETRY_WRITE_AFTER_S = 60.0

_V1_FORMAT = "v1"
_V1_KEY_PATTERN = re.compile(r"[0-9A-Za-z_-]{3,}")
_INFO_FILE = "ENCODER.txt"
_SHARD_PREFIX = "shard-"
_MAX_NDIM = 5
# A record without its trailing checksum: digest, offset, nbytes, data CRC-32, shape, ndim, dtype.
_RECORD_BODY = struct.Struct("<16sQII5IB7s")
_RECORD = np.dtype([
    ("digest", "S16"), ("offset", "<u8"), ("nbytes", "<u4"), ("crc", "<u4"),
    ("shape", "<u4", (_MAX_NDIM,)), ("ndim", "u1"), ("dtype", "S7"), ("check", "<u4"),
])
assert _RECORD.itemsize == _RECORD_BODY.size + 4 == 64
_BODY_WORDS = _RECORD_BODY.size // 4
# The record checksum: a weighted sum of its 15 32-bit words, computed in numpy for a
# whole .idx at once. A torn or zeroed record passes it with probability ~2**-32.
_CHECK_WEIGHTS = np.array([(0x9E3779B1 * (i + 1)) & 0xFFFFFFFF | 1 for i in range(_BODY_WORDS)],
                          dtype=np.uint64)
_CHECK_SEED = 0x5EED5EED
_WORDS = struct.Struct(f"<{_BODY_WORDS}I")
# Shard files a folder keeps open for reading (least recently read ones are closed).
_MAX_OPEN_SHARDS = 64
# A process's own records are turned into a sorted run at the next lookup, or at this count.
_PENDING_LIMIT = 65536


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


def namespace_slug(namespace: str, cache_format: str = CACHE_FORMAT) -> str:
    """Folder name of a namespace: a readable prefix + a hash of the whole name and the format."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", namespace).strip("_")[:60]
    digest = hashlib.blake2b(f"{cache_format}\0{namespace}".encode(), digest_size=6).hexdigest()
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
        Entries are stored in this dtype; an entry of another dtype counts as absent.
    ndim : int or None, default=None
        Number of dimensions of every entry (checked on read); None accepts any up
        to 5.
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
        self._v1_root = (Path(cache_dir) / namespace_slug(namespace, _V1_FORMAT)
                         if cache_dir is not None else None)
        self._v1_exists: bool | None = None
        self._write_warned = False

    def get(self, key: str) -> np.ndarray | None:
        """The entry under ``key`` (read-only), or None."""
        return self.get_many([key]).get(key)

    def get_many(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        """``{key: entry}`` for the keys that have one, in the order of ``keys``."""
        keys = list(dict.fromkeys(keys))
        found = {}
        missing = []
        for key in keys:
            array = self.memory.get(self.namespace, key)
            if array is None:
                missing.append(key)
            else:
                found[key] = array
        if missing and self.root is not None:
            from_disk = _folder(self.root).read_many(missing, self.dtype, self.ndim)
            from_disk.update(self._read_v1([key for key in missing if key not in from_disk]))
            for key, array in from_disk.items():
                self.memory.put(self.namespace, key, array)
            found.update(from_disk)
        return {key: found[key] for key in keys if key in found}

    def put(self, key: str, array: np.ndarray) -> np.ndarray:
        """Store a copy of ``array`` (converted to the store's dtype) under ``key``; returns the copy."""
        return self.put_many({key: array})[key]

    def put_many(self, entries: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Store copies of several arrays at once (one write per file); returns ``{key: copy}``."""
        stored = {key: self._converted(key, array) for key, array in entries.items()}
        for key, array in stored.items():
            self.memory.put(self.namespace, key, array)
        if self.root is not None and stored:
            self._write(stored)
        return stored

    def _converted(self, key: str, array: np.ndarray) -> np.ndarray:
        if not isinstance(key, str) or not key:
            raise ValueError(f"cache keys are non-empty strings; got {key!r}")
        array = np.array(array, dtype=self.dtype, order="C")
        if self.ndim is not None and array.ndim != self.ndim:
            raise ValueError(f"{self.what} entries of {self.namespace!r} have {self.ndim} dimension(s); "
                             f"got an array of shape {array.shape}")
        if array.ndim > _MAX_NDIM:
            raise ValueError(f"{self.what} entries have at most {_MAX_NDIM} dimensions; "
                             f"got an array of shape {array.shape}")
        array.setflags(write=False)
        return array

    def _write(self, stored: dict[str, np.ndarray]) -> None:
        error = _folder(self.root).write(stored, self._info_text())
        if error is not None and not self._write_warned:
            # The arrays are already computed: a full disk costs the cache, not the run.
            warnings.warn(f"cannot write the {self.what} cache under {self.root}: {error}",
                          RuntimeWarning, stacklevel=4)
            self._write_warned = True

    def _info_text(self) -> str:
        return f"encoder: {self.namespace}\nformat: {CACHE_FORMAT}\ndtype: {self.dtype.name}\n"

    def _read_v1(self, keys: list[str]) -> dict[str, np.ndarray]:
        """Entries of the one-file-per-entry format, copied into the current one when found."""
        if not keys or self._v1_root is None:
            return {}
        if self._v1_exists is None:
            self._v1_exists = self._v1_root.is_dir()
        if not self._v1_exists:
            return {}
        found = {}
        for key in keys:
            if not _V1_KEY_PATTERN.fullmatch(key):
                continue
            try:
                array = np.load(self._v1_root / key[:2] / f"{key}.npy", allow_pickle=False)
            except (OSError, ValueError, EOFError):
                continue  # absent or damaged
            if array.dtype == self.dtype and (self.ndim is None or array.ndim == self.ndim) \
                    and array.ndim <= _MAX_NDIM:
                array.setflags(write=False)
                found[key] = array
        if found:
            self._write(found)
        return found


def count_entries(cache_dir: str | os.PathLike) -> int:
    """Number of distinct keys indexed on disk under ``cache_dir``, all namespaces together.

    Counts records that pass their checksum (the bytes they point at are not read).

    Examples
    --------
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> store = EmbeddingStore("toy-encoder", folder)
    >>> _ = store.put_many({"key-a": np.zeros(3), "key-b": np.ones(3)})
    >>> _ = store.put("key-a", np.ones(3))  # written again: still one key
    >>> count_entries(folder)
    2
    """
    total = 0
    if not Path(cache_dir).is_dir():
        return 0
    for namespace_dir in Path(cache_dir).iterdir():
        if not namespace_dir.is_dir():
            continue
        digests = [_valid_records(path.read_bytes())[0]["digest"]
                   for path in namespace_dir.glob(f"{_SHARD_PREFIX}*.idx")]
        if digests:
            total += len(np.unique(np.concatenate(digests)))
    return total


# the old name of the atomic writer, kept for callers of this module
atomic_write = write_bytes_atomic


# --- records --------------------------------------------------------------------------------


def _key_digest(key: str) -> bytes:
    return hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()


def _record(digest: bytes, offset: int, payload: bytes, shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    body = _RECORD_BODY.pack(digest, offset, len(payload), zlib.crc32(payload),
                             *shape, *(0,) * (_MAX_NDIM - len(shape)), len(shape), dtype.str.encode())
    check = (sum(w * int(c) for w, c in zip(_WORDS.unpack(body), _CHECK_WEIGHTS)) + _CHECK_SEED) & 0xFFFFFFFF
    return body + check.to_bytes(4, "little")


def _record_checks(records: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """The checksum each record should carry (in chunks: the uint64 temporaries stay small)."""
    words = records.view(np.uint32).reshape(len(records), _RECORD.itemsize // 4)[:, :_BODY_WORDS]
    checks = np.empty(len(records), dtype=np.uint64)
    for start in range(0, len(records), chunk):
        part = words[start:start + chunk].astype(np.uint64)
        part *= _CHECK_WEIGHTS
        checks[start:start + chunk] = part.sum(axis=1, dtype=np.uint64)
    return (checks + np.uint64(_CHECK_SEED)) & np.uint64(0xFFFFFFFF)


def _valid_records(raw: bytes) -> tuple[np.ndarray, int]:
    """The records of an ``.idx`` chunk that pass their checksum, and how many bytes to consume.

    Bytes after the last valid record are not consumed: they may be a record being written.
    """
    count = len(raw) // _RECORD.itemsize
    records = np.frombuffer(raw, dtype=_RECORD, count=count)
    valid = (_record_checks(records) == records["check"]) & (records["ndim"] <= _MAX_NDIM)
    if not valid.any():
        return records[:0], 0
    last = int(np.flatnonzero(valid)[-1])
    return records[valid], (last + 1) * _RECORD.itemsize


@dataclass
class _Run:
    """Records sorted by the first 8 bytes of their digest (``hi``), one per ``hi``, with their shard."""

    hi: np.ndarray
    shard: np.ndarray
    records: np.ndarray

    @classmethod
    def build(cls, records: np.ndarray, shard: np.ndarray) -> _Run:
        """Sort by ``hi``; records sharing one keep their order (oldest first)."""
        records = np.ascontiguousarray(records)
        hi = records.view(np.uint8).reshape(len(records), _RECORD.itemsize)[:, :8].copy().view("<u8").ravel()
        order = np.argsort(hi, kind="stable")
        return cls(hi[order], shard[order], records[order])

    def merged_with(self, newer: _Run) -> _Run:
        return _Run.build(np.concatenate([self.records, newer.records]),
                          np.concatenate([self.shard, newer.shard]))


# --- shards ---------------------------------------------------------------------------------


@dataclass
class _Shard:
    """A ``.bin``/``.idx`` pair as this process reads it."""

    name: str
    root: Path
    own: bool = False
    consumed: int = 0  # bytes of the .idx already loaded
    gone: bool = False
    fd: int | None = None

    def read(self, offset: int, nbytes: int) -> bytes | None:
        """``nbytes`` bytes at ``offset`` of the ``.bin``; None when the file is gone or too short.

        ``pread``, not a memory map: a ``.bin`` cut short while mapped would kill the process
        (SIGBUS) instead of making its entries absent, and mapped pages would count in the
        process's RSS.
        """
        if self.fd is None:
            if self.gone:
                return None
            try:
                self.fd = os.open(self.root / f"{self.name}.bin", os.O_RDONLY | getattr(os, "O_BINARY", 0))
            except FileNotFoundError:
                self.gone = True
                return None
            except OSError:
                return None
        try:
            payload = _pread(self.fd, nbytes, offset)
        except OSError:
            return None
        return payload if len(payload) == nbytes else None

    def close(self, gone: bool = False) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        self.gone = self.gone or gone


def _pread(fd: int, nbytes: int, offset: int) -> bytes:
    if hasattr(os, "pread"):
        return os.pread(fd, nbytes, offset)
    os.lseek(fd, offset, os.SEEK_SET)  # no pread (Windows): callers hold the folder's lock
    return os.read(fd, nbytes)


@dataclass
class _Writer:
    """This process's shard: it alone appends to it, and holds an ``flock`` on its ``.idx`` meanwhile."""

    name: str
    bin_fd: int
    idx_fd: int
    size: int = 0

    @classmethod
    def create(cls, root: Path) -> _Writer:
        name = f"{_SHARD_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | getattr(os, "O_BINARY", 0)
        bin_fd = os.open(root / f"{name}.bin", flags, 0o666)
        temporary = root / f".{name}.idx.tmp"
        try:
            idx_fd = os.open(temporary, flags, 0o666)
        except OSError:
            os.close(bin_fd)
            raise
        # Locked before it gets the name compaction looks for: a live shard is never merged away.
        _try_lock(idx_fd)
        try:
            os.replace(temporary, root / f"{name}.idx")
        except OSError:
            os.close(bin_fd)
            os.close(idx_fd)
            raise
        return cls(name, bin_fd, idx_fd)

    def append(self, entries: list[tuple[bytes, np.ndarray]]) -> list[bytes]:
        """Append the arrays' bytes, then their records; returns the records."""
        payloads, records = [], []
        offset = self.size
        for digest, array in entries:
            payload = array.tobytes()
            records.append(_record(digest, offset, payload, array.shape, array.dtype))
            payloads.append(payload)
            offset += len(payload)
        _write_all(self.bin_fd, b"".join(payloads))
        self.size = offset
        _write_all(self.idx_fd, b"".join(records))
        return records

    def sync(self) -> None:
        os.fsync(self.bin_fd)
        os.fsync(self.idx_fd)

    def close(self) -> None:
        for fd in (self.bin_fd, self.idx_fd):
            try:
                os.close(fd)
            except OSError:
                pass


def _write_all(fd: int, payload: bytes) -> None:
    view = memoryview(payload)
    while view:
        view = view[os.write(fd, view):]


def _try_lock(fd: int) -> bool:
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


# --- one namespace folder, as this process sees it -----------------------------------------


@dataclass
class _Folder:
    """One namespace folder as this process sees it: its shards, the sorted index runs, its writer."""

    root: Path
    lock: threading.RLock = field(default_factory=threading.RLock)
    shards: list[_Shard] = field(default_factory=list)
    by_name: dict[str, int] = field(default_factory=dict)
    runs: list[_Run] = field(default_factory=list)
    pending: list[tuple[np.ndarray, int]] = field(default_factory=list)  # (records, shard number)
    own_pending: list[tuple[bytes, int]] = field(default_factory=list)
    open_shards: OrderedDict[int, None] = field(default_factory=OrderedDict)
    writer: _Writer | None = None
    opened: bool = False
    blocked_until: float = 0.0
    last_error: OSError | None = None

    # reading

    def read_many(self, keys: list[str], dtype: np.dtype, ndim: int | None) -> dict[str, np.ndarray]:
        digests = [_key_digest(key) for key in keys]
        with self.lock:
            if not self.opened:
                self._open()
            found = self._read_found(keys, digests, dtype, ndim)
            if len(found) < len(keys) and self._refresh():
                missing = [i for i, key in enumerate(keys) if key not in found]
                found.update(self._read_found([keys[i] for i in missing], [digests[i] for i in missing],
                                              dtype, ndim))
        return found

    def _read_found(self, keys: list[str], digests: list[bytes], dtype: np.dtype,
                    ndim: int | None) -> dict[str, np.ndarray]:
        run_of, position, seen = self._lookup(digests)
        found = {}
        for run_number, run in enumerate(self.runs):
            rows = np.flatnonzero(run_of == run_number)
            if len(rows) == 0:
                continue
            records = run.records[position[rows]]
            usable = records["dtype"] == dtype.str.encode()
            if ndim is not None:
                usable &= records["ndim"] == ndim
            rows, records, shards = rows[usable], records[usable], run.shard[position[rows]][usable]
            columns = zip(rows.tolist(), shards.tolist(), records["offset"].tolist(),
                          records["nbytes"].tolist(), records["crc"].tolist(),
                          records["shape"].tolist(), records["ndim"].tolist())
            for row, shard, offset, nbytes, crc, shape, dims in columns:
                array = self._entry(shard, offset, nbytes, crc, tuple(shape[:dims]), dtype)
                if array is not None:
                    found[keys[row]] = array
        for row in np.flatnonzero(seen).tolist():
            if keys[row] not in found:
                array = self._read_any(digests[row], dtype, ndim)
                if array is not None:
                    found[keys[row]] = array
        return found

    def _read_any(self, digest: bytes, dtype: np.dtype, ndim: int | None) -> np.ndarray | None:
        """The slow path: try every record of ``digest``, latest loaded first, until one reads whole."""
        hi = np.frombuffer(digest[:8], dtype="<u8")
        for run in reversed(self.runs):
            first, end = (int(np.searchsorted(run.hi, hi, side=side)[0]) for side in ("left", "right"))
            for position in range(end - 1, first - 1, -1):
                record = run.records[position]
                if (bytes(record["digest"]).ljust(16, b"\0") != digest or record["dtype"] != dtype.str.encode()
                        or (ndim is not None and record["ndim"] != ndim)):
                    continue
                shape = tuple(int(n) for n in record["shape"][:record["ndim"]])
                array = self._entry(int(run.shard[position]), int(record["offset"]), int(record["nbytes"]),
                                    int(record["crc"]), shape, dtype)
                if array is not None:
                    return array
        return None

    def _entry(self, shard: int, offset: int, nbytes: int, crc: int, shape: tuple[int, ...],
               dtype: np.dtype) -> np.ndarray | None:
        if nbytes != dtype.itemsize * math.prod(shape):
            return None
        if nbytes == 0:
            return np.empty(shape, dtype=dtype)
        payload = self.shards[shard].read(offset, nbytes)
        self._keep_open(shard)
        if payload is None or zlib.crc32(payload) != crc:
            return None  # damaged: counts as absent, recomputed and appended again
        array = np.frombuffer(payload, dtype=dtype)
        return array if len(shape) == 1 else array.reshape(shape)

    def _keep_open(self, shard: int) -> None:
        """Keep the file of ``shard`` open, and at most _MAX_OPEN_SHARDS files of the folder."""
        if self.open_shards and next(reversed(self.open_shards)) == shard:
            return
        self.open_shards[shard] = None
        self.open_shards.move_to_end(shard)
        if len(self.open_shards) > _MAX_OPEN_SHARDS:
            oldest, _ = self.open_shards.popitem(last=False)
            self.shards[oldest].close()

    def _lookup(self, digests: list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Where the latest loaded record of each digest is: run number (-1: none) and position there.

        Also says which digests share their first 8 bytes with some record (``seen``):
        those that then fail to read get the slow path (:meth:`_read_any`).
        """
        self._flush_pending()
        joined = b"".join(digests)
        hi = np.frombuffer(joined, dtype="<u8")[::2]
        full = np.frombuffer(joined, dtype="S16")
        run_of = np.full(len(digests), -1)
        position = np.zeros(len(digests), dtype=np.intp)
        seen = np.zeros(len(digests), dtype=bool)
        unresolved = np.arange(len(digests))
        for run_number in range(len(self.runs) - 1, -1, -1):
            run = self.runs[run_number]
            if len(unresolved) == 0:
                break
            if len(run.hi) == 0:
                continue
            at = np.maximum(np.searchsorted(run.hi, hi[unresolved], side="right") - 1, 0)
            hit = run.hi[at] == hi[unresolved]
            rows, at = unresolved[hit], at[hit]
            same = run.records["digest"][at] == full[rows]
            run_of[rows[same]] = run_number
            position[rows[same]] = at[same]
            seen[rows] = True
            unresolved = unresolved[~hit]
        return run_of, position, seen

    def _flush_pending(self) -> None:
        if self.own_pending:
            records = np.frombuffer(b"".join(record for record, _ in self.own_pending), dtype=_RECORD)
            shards = np.array([shard for _, shard in self.own_pending], dtype=np.uint32)
            self.pending.append((records, shards))
            self.own_pending = []
        if not self.pending:
            return
        records = np.concatenate([records for records, _ in self.pending])
        shards = np.concatenate([np.broadcast_to(np.asarray(s, dtype=np.uint32), len(r))
                                 for r, s in self.pending])
        self.pending = []
        self.runs.append(_Run.build(records, shards))
        # Log-structured merging: runs shrink geometrically, so a lookup searches O(log n) runs.
        while len(self.runs) > 1 and 2 * len(self.runs[-1].hi) >= len(self.runs[-2].hi):
            newer = self.runs.pop()
            self.runs[-1] = self.runs[-1].merged_with(newer)

    # loading

    def _open(self) -> None:
        self.opened = True
        if fcntl is not None:
            try:
                _compact(self.root)
            except OSError:
                pass  # e.g. a read-only folder: compaction is an optimisation
        self._refresh()

    def _refresh(self) -> bool:
        """Load what the ``.idx`` files gained since last time; True when anything was added."""
        try:
            listing = [entry for entry in os.scandir(self.root)
                       if entry.name.startswith(_SHARD_PREFIX) and entry.name.endswith(".idx")]
        except OSError:
            return False
        present = {entry.name[:-4]: entry for entry in listing}
        for name, number in self.by_name.items():
            if name not in present:
                self.shards[number].close(gone=True)
        new = sorted((entry for name, entry in present.items() if name not in self.by_name),
                     key=_mtime)
        for entry in new:
            self._add_shard(_Shard(entry.name[:-4], self.root))
        added = False
        for name, entry in present.items():
            shard = self.shards[self.by_name[name]]
            if not shard.own and _size(entry) > shard.consumed:
                added |= self._load_tail(shard)
        return added

    def _add_shard(self, shard: _Shard) -> int:
        self.by_name[shard.name] = len(self.shards)
        self.shards.append(shard)
        return len(self.shards) - 1

    def _load_tail(self, shard: _Shard) -> bool:
        try:
            with open(self.root / f"{shard.name}.idx", "rb") as handle:
                handle.seek(shard.consumed)
                raw = handle.read()
        except OSError:
            return False
        records, consumed = _valid_records(raw)
        shard.consumed += consumed
        if len(records):
            self.pending.append((records, self.by_name[shard.name]))
        return len(records) > 0

    # writing

    def write(self, stored: dict[str, np.ndarray], info_text: str) -> OSError | None:
        """Append ``stored``; returns the error that stopped it, if any."""
        entries = [(_key_digest(key), array) for key, array in stored.items()]
        with self.lock:
            if time.monotonic() < self.blocked_until:
                return self.last_error
            try:
                writer = self._writer(info_text)
                for batch in _batches(entries, 64 * 2**20):
                    records = writer.append(batch)
                    number = self.by_name[writer.name]
                    self.shards[number].consumed += len(records) * _RECORD.itemsize
                    self.own_pending.extend((record, number) for record in records)
                    if len(self.own_pending) >= _PENDING_LIMIT:
                        self._flush_pending()
            except OSError as exc:
                # A half-written record would misalign the next ones: this shard takes no more.
                self._retire_writer()
                self.blocked_until = time.monotonic() + RETRY_WRITE_AFTER_S
                self.last_error = exc
                return exc
            except BaseException:  # e.g. KeyboardInterrupt mid-write: same reason
                self._retire_writer()
                raise
        return None

    def _writer(self, info_text: str) -> _Writer:
        if self.writer is not None and self.writer.size >= SHARD_BYTES:
            self._retire_writer()
        if self.writer is None:
            if not (self.root / _INFO_FILE).exists():
                self.root.mkdir(parents=True, exist_ok=True)
                write_bytes_atomic(self.root / _INFO_FILE, info_text.encode("utf-8"))
            self.writer = _Writer.create(self.root)
            self._add_shard(_Shard(self.writer.name, self.root, own=True))
        return self.writer

    def _retire_writer(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def close(self) -> None:
        with self.lock:
            self._retire_writer()
            for shard in self.shards:
                shard.close()


def _batches(entries: list[tuple[bytes, np.ndarray]], max_bytes: int):
    batch, size = [], 0
    for entry in entries:
        batch.append(entry)
        size += entry[1].nbytes
        if size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _size(entry: os.DirEntry) -> int:
    try:
        return entry.stat().st_size
    except OSError:
        return 0


def _mtime(entry: os.DirEntry) -> int:
    try:
        return entry.stat().st_mtime_ns
    except OSError:
        return 0


# --- compaction -----------------------------------------------------------------------------


def _compact(root: Path) -> bool:
    """Merge small shards no live process writes into one (at most SHARD_BYTES); True when it did."""
    small = []
    for idx in sorted(root.glob(f"{_SHARD_PREFIX}*.idx"), key=lambda path: path.stat().st_mtime_ns):
        try:
            size = os.stat(idx.with_suffix(".bin")).st_size
        except FileNotFoundError:
            size = 0  # an index whose data is lost: nothing to copy, deleted below
        if size < COMPACT_BELOW_BYTES:
            small.append((idx, size))
    if len(small) < COMPACT_MIN_SHARDS:
        return False
    locked: list[tuple[Path, int]] = []
    try:
        total = 0
        for idx, size in small:
            if total + size > SHARD_BYTES:
                break
            fd = os.open(idx, os.O_RDONLY)
            if _try_lock(fd):
                locked.append((idx, fd))
                total += size
            else:
                os.close(fd)  # a live writer's shard (or another process compacting it)
        if len(locked) < COMPACT_MIN_SHARDS:
            return False
        _copy_into_new_shard(root, [idx for idx, _ in locked])
        for idx, _ in locked:
            idx.unlink()
            idx.with_suffix(".bin").unlink(missing_ok=True)
        return True
    finally:
        for _, fd in locked:
            os.close(fd)


def _copy_into_new_shard(root: Path, indexes: list[Path]) -> None:
    """Copy the last valid record of each key in ``indexes`` (oldest first) into a new shard.

    One source ``.bin`` (smaller than COMPACT_BELOW_BYTES) is in memory at a time.
    """
    sources = [_valid_records(idx.read_bytes())[0] for idx in indexes]
    last: dict[bytes, tuple[int, int]] = {}
    for number, records in enumerate(sources):
        for position, digest in enumerate(records["digest"].tolist()):
            last[digest.ljust(16, b"\0")] = (number, position)
    writer = _Writer.create(root)
    try:
        for number, (idx, records) in enumerate(zip(indexes, sources)):
            try:
                data = idx.with_suffix(".bin").read_bytes()
            except FileNotFoundError:
                continue
            entries = []
            for position, record in enumerate(records.tolist()):
                digest, offset, nbytes, crc, shape, ndim, dtype = record[:7]
                digest = digest.ljust(16, b"\0")
                payload = data[offset:offset + nbytes]
                if last[digest] != (number, position) or len(payload) != nbytes or zlib.crc32(payload) != crc:
                    continue
                array = np.frombuffer(payload, dtype=np.dtype(dtype.decode())).reshape(shape[:ndim])
                entries.append((digest, array))
            for batch in _batches(entries, 64 * 2**20):
                writer.append(batch)
        writer.sync()
    finally:
        writer.close()


# --- process-wide folders -------------------------------------------------------------------

_folders: dict[tuple[int, str], _Folder] = {}
_folders_lock = threading.Lock()


def _folder(root: Path) -> _Folder:
    """This process's view of a namespace folder (a forked child gets its own)."""
    key = (os.getpid(), os.path.abspath(root))
    with _folders_lock:
        folder = _folders.get(key)
        if folder is None:
            folder = _folders[key] = _Folder(Path(key[1]))
        return folder


def _close_folders() -> None:
    """Close this process's shards and forget what it loaded (the next use reopens the folders)."""
    with _folders_lock:
        for folder in _folders.values():
            folder.close()
        _folders.clear()
