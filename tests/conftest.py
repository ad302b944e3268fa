"""Shared fixtures. Tests never download: models are tiny and built on the spot."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Run folders are signed with a per-user key: tests (and the CLI subprocesses they start) use
# one of their own instead of creating ~/.config/stackcat/key.
os.environ.setdefault("STACKCAT_KEY_FILE", os.path.join(tempfile.mkdtemp(prefix="stackcat-test-key-"), "key"))

DATA_DIR = Path(__file__).parent / "data"
# Fixtures whose tests run the CLI end to end: with clusters, those are "slow" (left out of `make test-fast`).
END_TO_END_FIXTURES = frozenset({"toy_model_in_the_cli"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark slow every test that runs the CLI end to end or starts a dask cluster."""
    for item in items:
        if item.get_closest_marker("dask") or END_TO_END_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def ke_csv() -> Path:
    """36 hand-made KazanExpress-format products (4 categories) with 3 bad rows."""
    return DATA_DIR / "ke_products.csv"


@pytest.fixture(autouse=True)
def fresh_feature_caches():
    """Every test starts and ends with the frozen encoders' in-memory caches empty.

    The image embeddings, text token states, loaded encoders and onnxruntime
    sessions are process-wide (see :func:`stackcat.features.clear_caches`); the
    disk caches are the tests' own tmp folders.
    """
    from stackcat.features import clear_caches

    clear_caches()
    yield
    clear_caches()


@pytest.fixture(scope="module")
def toy_model_in_the_cli():
    """``stackcat fit --models toy`` builds the fast, exactly repeatable NaiveBayesText."""
    from stackcat import presets

    from toy_models import NaiveBayesText

    presets.register_model("toy", lambda options: NaiveBayesText())
    yield
    presets.unregister_model("toy")
