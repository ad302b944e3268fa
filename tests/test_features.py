"""The frozen-features package: its place in the import graph, its cache clearing, the re-exported ground-floor names."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stackcat.features import clear_caches, image_encoders, images, text_states
from stackcat.features.hub import load_text_encoder

from tiny_bert import CountingLoader, build_tiny_bert
from tiny_images import CountingEncoder, tiny_open_clip_dir, toy_image_dataset

PACKAGE = Path(__file__).parent.parent / "stackcat"

# Names that the ground floor holds now and their old module keeps importing, on purpose.
RE_EXPORTED = [
    ("stackcat.models._base", "encode_labels", "stackcat.core"),
    ("stackcat.models._base", "resolve_device", "stackcat.core"),
    ("stackcat.runs", "current_umask", "stackcat.core"),
    # the one atomic writer and content hasher (issue 14)
    ("stackcat.runs", "atomic_path", "stackcat.files"),
    ("stackcat.runs", "digest", "stackcat.files"),
    ("stackcat.features.images", "file_content_hash", "stackcat.files"),
    ("stackcat.features.onnx_backend", "file_digest", "stackcat.files"),
]


def stackcat_imports(path: Path) -> set[str]:
    """Every ``stackcat...`` module a file imports (at its top or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("stackcat")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stackcat"):
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names
                      if (PACKAGE.parent / node.module.replace(".", "/") / f"{alias.name}.py").exists()}
    return found


# --- the import graph -----------------------------------------------------------------------


def test_features_import_only_the_ground_floor_and_each_other():
    allowed = ("stackcat.core", "stackcat.files", "stackcat.progress", "stackcat.features")
    for path in sorted((PACKAGE / "features").glob("*.py")):
        outside = {m for m in stackcat_imports(path) if not m.startswith(allowed)}
        assert outside == set(), f"{path.name} imports {sorted(outside)}"


def test_the_ground_floor_imports_nothing_of_stackcat():
    assert stackcat_imports(PACKAGE / "core.py") == set()


def test_features_and_clearing_load_no_torch():
    code = ("import sys; from stackcat.features import clear_caches; import stackcat.core; clear_caches(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"]


# --- ground-floor names re-exported ----------------------------------------------------------------------------


@pytest.mark.parametrize(("old", "name", "new"), RE_EXPORTED)
def test_a_ground_floor_name_is_re_exported_without_a_warning(old, name, new):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        value = getattr(importlib.import_module(old), name)
    assert value is getattr(importlib.import_module(new), name)


# --- clear_caches -----------------------------------------------------------------------------


def test_clear_caches_forgets_the_image_embeddings(tmp_path):
    paths, _ = toy_image_dataset(tmp_path / "images", per_class=1)
    encoder = CountingEncoder()
    images.image_embeddings(paths, encoder, progress=False)
    images.image_embeddings(paths, encoder, progress=False)
    assert encoder.max_encodings_per_image == 1, "the memory cache answers the second call"
    clear_caches()
    images.image_embeddings(paths, encoder, progress=False)
    assert encoder.max_encodings_per_image == 2


def test_clear_caches_forgets_the_text_states_and_the_loaded_text_encoder(tmp_path, monkeypatch):
    monkeypatch.setenv("STACKCAT_ENCODER_BACKEND", "torch")  # the torch loader is the one counted
    texts = ["red cotton shirt", "blue denim jeans"]
    model = build_tiny_bert(tmp_path / "tiny-bert", texts)
    counting = CountingLoader(load_text_encoder)
    monkeypatch.setattr(text_states, "load_text_encoder", counting)
    first = text_states.token_states(texts, model, 16, progress=False)
    text_states.token_states(texts + ["a new text"], model, 16, progress=False)
    assert counting.loads == 1 and counting.max_encodings_per_text == 1
    clear_caches()
    again = text_states.token_states(texts, model, 16, progress=False)
    assert counting.loads == 2 and counting.max_encodings_per_text == 2
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)


def test_clear_caches_lets_the_loaded_image_models_go(tmp_path):
    encoder = image_encoders.get_encoder(f"local-dir:{tiny_open_clip_dir(tmp_path / 'clip')}",
                                         device="cpu", backend="torch")
    encoder.encode([Image.new("RGB", (32, 32), "red")])
    assert len(image_encoders._loaded_models) == 1
    clear_caches()
    assert len(image_encoders._loaded_models) == 0
