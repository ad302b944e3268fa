"""EmbeddingStore's on-disk format: round trips, concurrent and killed writers, damage, v1 fallback."""

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from stackcat.features import store as store_module
from stackcat.features.store import (
    EmbeddingStore,
    MemoryCache,
    content_key,
    count_entries,
    namespace_slug,
)


@pytest.fixture(autouse=True)
def fresh_process_state():
    """Each test starts as a new process would: nothing of any folder loaded."""
    store_module._close_folders()
    yield
    store_module._close_folders()


def vector_store(folder, **kwargs) -> EmbeddingStore:
    return EmbeddingStore("toy-images", folder, dtype=np.float32, ndim=1, memory=MemoryCache(), **kwargs)


def matrix_store(folder) -> EmbeddingStore:
    return EmbeddingStore("toy-text", folder, dtype=np.float16, ndim=2, memory=MemoryCache())


def vector_of(key: str, dim: int = 16) -> np.ndarray:
    """A value that follows from the key, so any process can check what it reads."""
    return np.random.default_rng(int(key[:8], 16)).standard_normal(dim).astype(np.float32)


def keys_of(numbers) -> list[str]:
    return [content_key(str(n)) for n in numbers]


def shard_files(folder: Path, suffix: str) -> list[Path]:
    return sorted(folder.rglob(f"shard-*{suffix}"))


def reopened(folder, make=vector_store) -> EmbeddingStore:
    store_module._close_folders()
    return make(folder)


def run_python(script: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          env=env, timeout=timeout)


# --- round trips --------------------------------------------------------------------------------


def test_vectors_and_variable_length_matrices_round_trip(tmp_path):
    vectors = {key: vector_of(key) for key in keys_of(range(50))}
    lengths = [0, 1, 7, 33, 2]
    matrices = {content_key(f"text {n}"): np.arange(n * 4, dtype=np.float64).reshape(n, 4) / 7
                for n in lengths}
    stored = vector_store(tmp_path).put_many(dict(list(vectors.items())[:25]))
    assert len(stored) == 25 and all(not array.flags.writeable for array in stored.values())
    for key, array in list(vectors.items())[25:]:
        vector_store(tmp_path).put(key, array)
    for key, array in matrices.items():
        matrix_store(tmp_path).put(key, array)

    found = reopened(tmp_path).get_many(list(vectors) + keys_of(["never stored"]))
    assert list(found) == list(vectors)
    for key, array in vectors.items():
        np.testing.assert_array_equal(found[key], array)
        assert found[key].dtype == np.float32 and not found[key].flags.writeable
    texts = matrix_store(tmp_path).get_many(matrices)
    for key, array in matrices.items():
        assert texts[key].dtype == np.float16 and texts[key].shape == array.shape
        np.testing.assert_array_equal(texts[key], array.astype(np.float16))
    assert count_entries(tmp_path) == len(vectors) + len(matrices)
    assert len(shard_files(tmp_path, ".bin")) == 2, "one shard per namespace and process, not per entry"


def test_an_entry_of_another_dtype_or_dimension_count_is_absent(tmp_path):
    key = content_key("a")
    vector_store(tmp_path).put(key, np.ones(3))
    as_half = EmbeddingStore("toy-images", tmp_path, dtype=np.float16, memory=MemoryCache())
    as_matrix = EmbeddingStore("toy-images", tmp_path, dtype=np.float32, ndim=2, memory=MemoryCache())
    assert as_half.get(key) is None and as_matrix.get(key) is None
    assert EmbeddingStore("other", tmp_path, memory=MemoryCache()).get(key) is None
    assert vector_store(tmp_path).get(key) is not None


def test_bad_keys_and_shapes_are_refused(tmp_path):
    store = vector_store(tmp_path)
    with pytest.raises(ValueError, match="1 dimension"):
        store.put(content_key("a"), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="at most 5 dimensions"):
        EmbeddingStore("any", tmp_path).put(content_key("a"), np.zeros((1,) * 6))
    with pytest.raises(ValueError, match="non-empty strings"):
        store.put("", np.zeros(2))


def test_a_key_written_twice_reads_back_the_later_value_in_its_process(tmp_path):
    key = content_key("a")
    store = vector_store(tmp_path)
    store.put(key, np.zeros(4))
    assert store.memory.clear() is None and store.get(key) is not None  # loaded: the next put is a new run
    store.put(key, np.ones(4))
    store.memory.clear()
    np.testing.assert_array_equal(store.get(key), np.ones(4))
    assert count_entries(tmp_path) == 1


def test_a_writer_starts_a_new_shard_past_the_size_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "SHARD_BYTES", 200)
    vectors = {key: vector_of(key) for key in keys_of(range(20))}  # 64 bytes each
    store = vector_store(tmp_path)
    for key, array in vectors.items():
        store.put(key, array)
    assert len(shard_files(tmp_path, ".bin")) == 5
    found = reopened(tmp_path).get_many(vectors)
    assert all(np.array_equal(found[key], array) for key, array in vectors.items())


# --- several processes ------------------------------------------------------------------------


@pytest.mark.slow
def test_an_open_reader_sees_entries_another_process_wrote_since(tmp_path):
    store = vector_store(tmp_path)
    key = content_key("late")
    assert store.get(key) is None  # the folder is loaded (and empty) now
    done = run_python(f"""
        import numpy as np
        from stackcat.features.store import EmbeddingStore
        EmbeddingStore("toy-images", {str(tmp_path)!r}, ndim=1).put({key!r}, np.full(3, 7.0))
    """)
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(store.get(key), np.full(3, 7.0))


WRITER = """
    import sys
    import numpy as np
    from stackcat.features.store import EmbeddingStore, MemoryCache, content_key
    from test_cache import vector_of
    folder, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    store = EmbeddingStore("toy-images", folder, ndim=1, memory=MemoryCache())
    keys = [content_key(str(n)) for n in range(first, last)]
    for start in range(0, len(keys), 7):  # batches and single puts, interleaved with reads
        store.put_many({key: vector_of(key) for key in keys[start:start + 5]})
        for key in keys[start + 5:start + 7]:
            store.put(key, vector_of(key))
        assert len(store.get_many(keys[:start + 7])) == min(len(keys), start + 7)
"""


@pytest.mark.slow
def test_concurrent_writers_with_overlapping_keys(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    ranges = [(0, 120), (60, 180), (100, 220), (0, 220)]
    writers = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(WRITER), str(tmp_path),
                                 str(first), str(last)], env=env, stderr=subprocess.PIPE, text=True)
               for first, last in ranges]
    for writer in writers:
        _, stderr = writer.communicate(timeout=120)
        assert writer.returncode == 0, stderr
    keys = keys_of(range(220))
    found = reopened(tmp_path).get_many(keys)
    assert list(found) == keys
    for key in keys:
        np.testing.assert_array_equal(found[key], vector_of(key))
    assert count_entries(tmp_path) == len(keys)
    assert len(shard_files(tmp_path, ".idx")) == len(ranges)


# --- crashes and damage -------------------------------------------------------------------------


KILLED_WRITER = """
    import os, signal, sys
    import numpy as np
    from stackcat.features import store as store_module
    from test_cache import vector_of
    folder, target, calls_before_kill = sys.argv[1], sys.argv[2], int(sys.argv[3])
    real_write_all = store_module._write_all
    calls = {"n": 0}

    def write_half_then_die(fd, payload):
        is_target = os.readlink(f"/proc/self/fd/{fd}").endswith(target)
        if is_target:
            calls["n"] += 1
            if calls["n"] > calls_before_kill:
                real_write_all(fd, payload[: len(payload) // 2 + 1])
                os.kill(os.getpid(), signal.SIGKILL)
        real_write_all(fd, payload)

    store_module._write_all = write_half_then_die
    store = store_module.EmbeddingStore("toy-images", folder, ndim=1)
    keys = [store_module.content_key(str(n)) for n in range(100)]
    for start in range(0, 100, 10):
        store.put_many({key: vector_of(key) for key in keys[start:start + 10]})
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc to find which file is written")
@pytest.mark.parametrize("target", [".bin", ".idx"])
def test_a_writer_killed_mid_batch_leaves_a_readable_store(tmp_path, target):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    child = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_WRITER), str(tmp_path), target, "3"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    keys = keys_of(range(100))
    store = vector_store(tmp_path)
    found = store.get_many(keys)
    # Three whole batches; of the torn one, the entries whose record was written whole.
    whole = 30 if target == ".bin" else 30 + (10 * 64 // 2 + 1) // 64
    assert list(found) == keys[:whole]
    for key in found:
        np.testing.assert_array_equal(found[key], vector_of(key))
    store.put_many({key: vector_of(key) for key in keys[30:]})  # resumed by the next run
    assert list(reopened(tmp_path).get_many(keys)) == keys


@pytest.mark.slow
def test_a_writer_killed_at_a_random_moment_leaves_only_whole_entries(tmp_path):
    script = f"""
        import numpy as np
        from stackcat.features.store import EmbeddingStore, MemoryCache, content_key
        from test_cache import vector_of
        store = EmbeddingStore("toy-images", {str(tmp_path)!r}, ndim=1, memory=MemoryCache(0))
        n = 0
        while True:
            keys = [content_key(str(i)) for i in range(n, n + 50)]
            store.put_many({{key: vector_of(key, 1000) for key in keys}})
            n += 50
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], env=env)
    deadline = time.time() + 60
    while time.time() < deadline and sum(p.stat().st_size for p in shard_files(tmp_path, ".idx")) < 64 * 2000:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    written = sum(p.stat().st_size for p in shard_files(tmp_path, ".idx")) // 64
    keys = keys_of(range(written + 100))
    found = vector_store(tmp_path).get_many(keys)
    assert len(found) >= 2000 and list(found) == keys[:len(found)]
    for key, array in found.items():
        np.testing.assert_array_equal(array, vector_of(key, 1000))


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_damaged_shard_or_index_means_absent_entries_that_are_recomputed(tmp_path):
    keys = keys_of(range(10))
    vector_store(tmp_path).put_many({key: vector_of(key) for key in keys})  # 64 bytes each
    [shard] = shard_files(tmp_path, ".bin")
    [index] = shard_files(tmp_path, ".idx")
    flip_byte(shard, 3 * 64 + 5)  # bytes of entry 3
    flip_byte(index, 5 * 64 + 20)  # record of entry 5
    with open(shard, "r+b") as handle:
        handle.truncate(9 * 64 + 10)  # entry 9 cut short
    with open(index, "ab") as handle:
        handle.write(b"\x00" * 64 + b"garbage")  # a zeroed record and a torn one

    store = reopened(tmp_path)
    found = store.get_many(keys)
    assert set(keys) - set(found) == {keys[3], keys[5], keys[9]}
    for key, array in found.items():
        np.testing.assert_array_equal(array, vector_of(key))
    for key in set(keys) - set(found):  # the caller recomputes them
        store.put(key, vector_of(key))
    found = reopened(tmp_path).get_many(keys)
    assert list(found) == keys
    for key, array in found.items():
        np.testing.assert_array_equal(array, vector_of(key))


def test_a_damaged_entry_read_by_an_open_store_is_replaced(tmp_path):
    key = content_key("a")
    store = vector_store(tmp_path)
    store.put(key, vector_of(key))
    flip_byte(shard_files(tmp_path, ".bin")[0], 0)
    store.memory.clear()
    assert store.get(key) is None
    store.put(key, vector_of(key))
    store.memory.clear()
    np.testing.assert_array_equal(store.get(key), vector_of(key))


# --- disks that refuse writes ----------------------------------------------------------------


def test_a_cache_dir_that_is_a_file_warns_once_and_the_run_goes_on(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    store = vector_store(blocker)
    with pytest.warns(RuntimeWarning, match="cannot write the embedding cache"):
        stored = store.put(content_key("a"), np.ones(3))
    np.testing.assert_array_equal(stored, np.ones(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store.put(content_key("b"), np.ones(3))  # no second warning
    assert store.get(content_key("b")) is not None, "still in memory"


def test_a_read_only_folder_is_read_and_warned_about(tmp_path, monkeypatch):
    keys = keys_of(range(5))
    vector_store(tmp_path).put_many({key: vector_of(key) for key in keys[:3]})
    store_module._close_folders()
    real_open = os.open

    def read_only_open(path, flags, *args):
        if flags & (os.O_CREAT | os.O_WRONLY):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(store_module.os, "open", read_only_open)
    store = vector_store(tmp_path)
    assert list(store.get_many(keys)) == keys[:3]
    with pytest.warns(RuntimeWarning, match="Read-only file system"):
        store.put_many({key: vector_of(key) for key in keys[3:]})
    assert list(store.get_many(keys)) == keys


def test_a_full_disk_mid_write_costs_only_the_cache(tmp_path, monkeypatch):
    store = vector_store(tmp_path)
    first = {key: vector_of(key) for key in keys_of(range(4))}
    store.put_many(first)
    real_write = os.write

    def disk_full(fd, payload):
        real_write(fd, bytes(payload)[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module.os, "write", disk_full)
    with pytest.warns(RuntimeWarning, match="No space left"):
        store.put_many({key: vector_of(key) for key in keys_of(range(4, 8))})
    monkeypatch.undo()
    found = reopened(tmp_path).get_many(keys_of(range(8)))
    assert list(found) == list(first)


# --- v1 and compaction -------------------------------------------------------------------------


def test_v1_entries_are_read_and_copied_into_the_current_format(tmp_path):
    keys = keys_of(range(4))
    v1_root = tmp_path / namespace_slug("toy-images", "v1")
    for key in keys[:3]:
        (v1_root / key[:2]).mkdir(parents=True, exist_ok=True)
        np.save(v1_root / key[:2] / f"{key}.npy", vector_of(key))
    (v1_root / keys[2][:2] / f"{keys[2]}.npy").write_bytes(b"damaged")
    found = vector_store(tmp_path).get_many(keys)
    assert list(found) == keys[:2]
    np.testing.assert_array_equal(found[keys[0]], vector_of(keys[0]))

    for path in sorted(v1_root.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    assert list(reopened(tmp_path).get_many(keys)) == keys[:2], "copied into v2"


def test_compaction_merges_idle_small_shards_and_leaves_live_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "COMPACT_MIN_SHARDS", 4)
    keys = keys_of(range(30))
    for start in range(0, 30, 5):  # six processes' worth of shards, overlapping keys
        reopened(tmp_path).put_many({key: vector_of(key) for key in keys[max(0, start - 2):start + 5]})
    root = next(tmp_path.iterdir())
    live = store_module._Writer.create(root)  # another process, still writing
    try:
        live.append([(store_module._key_digest(keys[0]), vector_of(keys[0]))])
        assert len(shard_files(tmp_path, ".idx")) == 7
        found = reopened(tmp_path).get_many(keys)
        indexes = shard_files(tmp_path, ".idx")
        assert len(indexes) == 2 and (root / f"{live.name}.idx") in indexes
        merged = next(path for path in indexes if live.name not in path.name)
        assert merged.stat().st_size == 64 * len(keys), "one record per key: duplicates dropped"
        assert list(found) == keys
        for key, array in found.items():
            np.testing.assert_array_equal(array, vector_of(key))
    finally:
        live.close()
    assert list(reopened(tmp_path).get_many(keys)) == keys


def test_too_few_small_shards_are_left_alone(tmp_path):
    for n in range(3):
        reopened(tmp_path).put(content_key(str(n)), np.ones(2))
    reopened(tmp_path).get(content_key("0"))
    assert len(shard_files(tmp_path, ".idx")) == 3


def test_when_the_latest_record_of_a_key_is_damaged_an_older_one_is_read(tmp_path):
    key = content_key("a")
    store = vector_store(tmp_path)
    store.put(key, np.full(4, 2.0))
    store.memory.clear()
    assert store.get(key) is not None
    store.put(key, np.full(4, 2.0))  # written again: bytes 16..31 of the shard
    flip_byte(shard_files(tmp_path, ".bin")[0], 20)
    store.memory.clear()
    np.testing.assert_array_equal(store.get(key), np.full(4, 2.0))


def test_an_interrupted_write_does_not_spoil_the_next_ones(tmp_path, monkeypatch):
    store = vector_store(tmp_path)
    keys = keys_of(range(6))
    real_write_all = store_module._write_all

    def interrupted(fd, payload):
        real_write_all(fd, payload[:len(payload) // 2 + 1])  # half a record, then Ctrl-C
        raise KeyboardInterrupt

    store.put_many({key: vector_of(key) for key in keys[:2]})
    monkeypatch.setattr(store_module, "_write_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.put(keys[2], vector_of(keys[2]))
    monkeypatch.undo()
    store.put_many({key: vector_of(key) for key in keys[3:]})
    found = reopened(tmp_path).get_many(keys)
    assert list(found) == keys[:2] + keys[3:]
    assert len(shard_files(tmp_path, ".idx")) == 2, "the interrupted shard takes no more records"


def test_a_shard_cut_short_while_open_makes_its_tail_absent(tmp_path):
    keys = keys_of(range(3))
    store = vector_store(tmp_path)
    store.put_many({key: vector_of(key) for key in keys})  # 64 bytes each
    store.memory.clear()
    assert len(store.get_many(keys)) == 3  # the shard is open now
    with open(shard_files(tmp_path, ".bin")[0], "r+b") as handle:
        handle.truncate(64)
    store.memory.clear()
    assert list(store.get_many(keys)) == keys[:1]


def test_a_reader_keeps_a_bounded_number_of_shards_open(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "SHARD_BYTES", 100)
    monkeypatch.setattr(store_module, "_MAX_OPEN_SHARDS", 2)
    vectors = {key: vector_of(key) for key in keys_of(range(6))}
    writer = vector_store(tmp_path)
    for key, array in vectors.items():
        writer.put(key, array)  # a shard per two entries
    store = reopened(tmp_path)
    found = store.get_many(vectors)
    assert all(np.array_equal(found[key], array) for key, array in vectors.items())
    folder = store_module._folder(store.root)
    assert len(folder.shards) == 3 and sum(shard.fd is not None for shard in folder.shards) == 2


def test_one_compaction_merges_at_most_a_shard_worth_of_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "COMPACT_MIN_SHARDS", 2)
    monkeypatch.setattr(store_module, "SHARD_BYTES", 3 * 64)
    keys = keys_of(range(5))
    for key in keys:  # five idle shards of 64 bytes each
        reopened(tmp_path).put(key, vector_of(key))
    found = reopened(tmp_path).get_many(keys)
    assert list(found) == keys
    assert len(shard_files(tmp_path, ".idx")) == 3, "three merged into one, two left for next time"
