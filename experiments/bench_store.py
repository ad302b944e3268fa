"""EmbeddingStore on disk: the v2 shard format at 1M entries, against v1 (one .npy per entry).

Each measurement runs in a fresh process (open time and peak RSS are that process's own):

- ``write``: entries/s of ``put`` (one entry per call, as ``stackcat.features.images`` does) and
  of ``put_many`` (batches of ``--batch`` entries).
- ``read``: open time (first ``get`` of a fresh process: loading every index), then
  entries/s of ``get_many`` on random batches of ``--read-batch`` keys and on all keys in
  write order, batch by batch; with the page cache warm, and cold (the shard files
  dropped from the page cache with ``posix_fadvise(DONTNEED)`` after an ``fsync``).
  The in-process memory LRU is disabled (``MemoryCache(0)``): every entry comes from disk.
- disk use (allocated blocks) and file count.

Data: ``--entries`` float32 vectors of ``--dim`` (image embeddings), ``--matrices``
float16 ``(T, --hidden)`` matrices with T uniform in ``[4, 32]`` (token states), and the
same vectors at ``--v1-entries`` in both formats. The v1 code is the previous
``stackcat/cache.py`` taken from git (``--v1-commit``), run unchanged. Everything is
written under a temporary folder in ``--dir`` and deleted at the end.

Run (~6-20 min on 2 busy cores, ~3.5 GB of disk at the peak)::

    nice -n 5 .venv/bin/python experiments/bench_store.py --dir /tmp

``--compare-mmap`` instead times random reads of this format against the variant that read
through memory maps (commit ``f305cfc``), alternating batches in one process.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from stackcat.features import store as store_module
from stackcat.features.store import content_key

REPO = Path(__file__).resolve().parent.parent


def keys_for(n: int) -> list[str]:
    return [content_key(str(i)) for i in range(n)]


def vector_of(i: int, dim: int) -> np.ndarray:
    return np.full(dim, i % 9973, dtype=np.float32)


def matrix_of(i: int, hidden: int) -> np.ndarray:
    tokens = 4 + (i * 7919) % 29  # 4..32
    return np.full((tokens, hidden), i % 251, dtype=np.float16)


def module_at(commit: str, name: str):
    """``stackcat/cache.py`` of ``commit``, imported as ``name``."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:stackcat/cache.py"],
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        shutil.rmtree(path.parent)
    return module


def v1_module(commit: str):
    """The one-file-per-entry cache.py of ``commit``."""
    module = module_at(commit, "cache_v1")
    if module.CACHE_FORMAT != "v1":
        raise SystemExit(f"stackcat/cache.py of {commit} is not the v1 format")
    return module


def compare_mmap(args) -> None:
    """Random reads of the current store and of the memory-mapped variant of ``--mmap-commit``,
    batch by batch in alternation in one process, on one store of ``--ab-entries`` vectors."""
    mapped = module_at(args.mmap_commit, "cache_mmap")
    root = tempfile.mkdtemp(prefix="bench_store-ab-", dir=args.dir)
    try:
        keys = keys_for(args.ab_entries)
        writer = store_module.EmbeddingStore("ab", root, ndim=1, memory=store_module.MemoryCache(0))
        for first in range(0, len(keys), args.batch):
            writer.put_many({key: vector_of(i, args.dim)
                             for i, key in enumerate(keys[first:first + args.batch], first)})
        store_module._close_folders()
        stores = {"pread (current)": store_module.EmbeddingStore("ab", root, ndim=1, memory=store_module.MemoryCache(0)),
                  f"mmap ({args.mmap_commit})": mapped.EmbeddingStore("ab", root, ndim=1,
                                                                     memory=mapped.MemoryCache(0))}
        for store in stores.values():
            store.get(keys[0])
        rng = random.Random(1)
        rates: dict[str, list[float]] = {name: [] for name in stores}
        for repeat in range(args.random_batches):
            batch = rng.sample(keys, args.read_batch)
            order = list(stores.items()) if repeat % 2 else list(stores.items())[::-1]
            for name, store in order:
                start = time.perf_counter()
                found = store.get_many(batch)
                rates[name].append(len(found) / (time.perf_counter() - start))
        for name, values in rates.items():
            print(f"{name}: median {np.median(values):,.0f} random get_many entries/s "
                  f"({len(values)} batches of {args.read_batch:,}, min {min(values):,.0f}, max {max(values):,.0f})")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def store_for(args, kind: str):
    module = v1_module(args.v1_commit) if args.format == "v1" else store_module
    dtype, ndim = (np.float16, 2) if kind == "matrix" else (np.float32, 1)
    return module.EmbeddingStore(f"bench-{kind}", args.root, dtype=dtype, ndim=ndim,
                                 memory=module.MemoryCache(0))


def make_value(args, kind: str, i: int) -> np.ndarray:
    return matrix_of(i, args.hidden) if kind == "matrix" else vector_of(i, args.dim)


# --- phases (each in its own process) ---------------------------------------------------------


def phase_write(args) -> dict:
    store = store_for(args, args.kind)
    keys = keys_for(args.n)
    split = min(args.single_puts, args.n)
    start = time.perf_counter()
    for i in range(split):
        store.put(keys[i], make_value(args, args.kind, i))
    single_s = time.perf_counter() - start
    start = time.perf_counter()
    for first in range(split, args.n, args.batch):
        last = min(args.n, first + args.batch)
        batch = {keys[i]: make_value(args, args.kind, i) for i in range(first, last)}
        if hasattr(store, "put_many"):
            store.put_many(batch)
        else:
            for key, value in batch.items():
                store.put(key, value)
    many_s = time.perf_counter() - start
    result = {"put_per_s": split / single_s if split else None}
    if args.n > split:
        result["put_many_per_s"] = (args.n - split) / many_s
    return result


def drop_page_cache(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def phase_read(args) -> dict:
    keys = keys_for(args.n)
    if args.cold:
        drop_page_cache(Path(args.root))
    store = store_for(args, args.kind)
    rss_before_open_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    first = store.get(keys[0])
    open_s = time.perf_counter() - start
    assert first is not None
    rng = random.Random(0)
    batches = [rng.sample(keys, min(args.read_batch, len(keys))) for _ in range(args.random_batches)]
    read, start = 0, time.perf_counter()
    for batch in batches:
        found = store.get_many(batch)
        assert len(found) == len(batch), f"{len(batch) - len(found)} entries missing"
        read += len(found)
    random_rate = read / (time.perf_counter() - start)
    result = {"open_s": open_s, "random_per_s": random_rate, "rss_before_open_mb": rss_before_open_mb}
    if not args.cold:
        read, start = 0, time.perf_counter()
        for first in range(0, len(keys), args.read_batch):
            found = store.get_many(keys[first:first + args.read_batch])
            read += len(found)
        assert read == len(keys)
        result["sequential_per_s"] = read / (time.perf_counter() - start)
        i = len(keys) // 2
        np.testing.assert_array_equal(store.get(keys[i]), make_value(args, args.kind, i))
    return result


def run_phase(args, phase: str, **options) -> dict:
    command = [sys.executable, __file__, "--phase", phase]
    for name, value in options.items():
        if value is True:
            command.append(f"--{name.replace('_', '-')}")
        elif value is not False:
            command += [f"--{name.replace('_', '-')}", str(value)]
    for name in ("dim", "hidden", "batch", "read_batch", "random_batches", "v1_commit"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"phase {phase} {options} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def disk_use(folder: Path) -> tuple[int, int]:
    files = [path for path in folder.rglob("*") if path.is_file()]
    return sum(path.stat().st_blocks * 512 for path in files), len(files)


# --- driver -------------------------------------------------------------------------------------


def measure(args, label: str, fmt: str, kind: str, n: int, single_puts: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix=f"{fmt}-{kind}-{n}-", dir=args.work))
    common = {"format": fmt, "kind": kind, "n": n, "root": root}
    row = {"label": label, "format": fmt, "entries": n}
    row.update(run_phase(args, "write", single_puts=single_puts, **common))
    row["write_peak_rss_mb"] = row.pop("peak_rss_mb")
    row["disk_bytes"], row["files"] = disk_use(root)
    warm = run_phase(args, "read", **common)
    row.update(warm)
    cold = run_phase(args, "read", cold=True, **common)
    row["cold_open_s"], row["cold_random_per_s"] = cold["open_s"], cold["random_per_s"]
    row["read_peak_rss_mb"] = max(warm.pop("peak_rss_mb"), cold["peak_rss_mb"])
    shutil.rmtree(root)
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict]) -> str:
    def rate(value):
        return "-" if value is None else f"{value:,.0f}"

    lines = ["| data | format | entries | put/s | put_many/s | open s (warm / cold) | "
             "random get_many/s (warm / cold) | sequential/s | disk | files | peak RSS MB (write / read / "
             "read before open) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(
            f"| {row['label']} | {row['format']} | {row['entries']:,} | {rate(row['put_per_s'])} | "
            f"{rate(row.get('put_many_per_s'))} | {row['open_s']:.2f} / {row['cold_open_s']:.2f} | "
            f"{rate(row['random_per_s'])} / {rate(row['cold_random_per_s'])} | {rate(row['sequential_per_s'])} | "
            f"{row['disk_bytes'] / 2**20:,.0f} MiB | {row['files']:,} | "
            f"{row['write_peak_rss_mb']:.0f} / {row['read_peak_rss_mb']:.0f} / {row['rss_before_open_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the temporary store folders go (deleted at the end)")
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--v1-entries", type=int, default=100_000)
    parser.add_argument("--matrices", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--batch", type=int, default=1000, help="entries per put_many")
    parser.add_argument("--single-puts", type=int, default=20_000, help="entries written by put, one call each")
    parser.add_argument("--read-batch", type=int, default=10_000)
    parser.add_argument("--random-batches", type=int, default=20)
    parser.add_argument("--v1-commit", default="b414026", help="a commit whose cache.py is the v1 format")
    parser.add_argument("--compare-mmap", action="store_true",
                        help="only compare random reads with the memory-mapped variant of --mmap-commit")
    parser.add_argument("--mmap-commit", default="f305cfc")
    parser.add_argument("--ab-entries", type=int, default=300_000)
    # the phases' own options
    parser.add_argument("--phase", choices=["write", "read"])
    parser.add_argument("--format", choices=["v1", "v2"])
    parser.add_argument("--kind", choices=["vector", "matrix"])
    parser.add_argument("--n", type=int)
    parser.add_argument("--root")
    parser.add_argument("--cold", action="store_true")
    args = parser.parse_args()

    if args.phase:
        result = phase_write(args) if args.phase == "write" else phase_read(args)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    if args.compare_mmap:
        compare_mmap(args)
        return
    args.work = Path(tempfile.mkdtemp(prefix="bench_store-", dir=args.dir))
    try:
        rows = [measure(args, "384 float32", "v1", "vector", args.v1_entries, args.single_puts),
                measure(args, "384 float32", "v2", "vector", args.v1_entries, args.single_puts),
                measure(args, "384 float32", "v2", "vector", args.entries, args.single_puts),
                measure(args, "(4-32, 384) float16", "v2", "matrix", args.matrices, args.single_puts)]
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    print(table(rows))


if __name__ == "__main__":
    main()
