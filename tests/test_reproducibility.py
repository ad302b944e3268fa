"""Same seed, same numbers: every model type, alone and through the stacker, on CPU.

Each check fits twice from fresh state (new estimator objects; the global
random generators of Python, NumPy and torch scrambled in between, so a model
that forgot to seed itself fails) and compares the out-of-fold matrices and
the predictions bit for bit. FastText is compared across two fresh processes:
within one long-lived process fastText's training is not bit-repeatable (see
docs/reliability.md).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stackcat.features.images import clear_memory_cache
from stackcat.meta import MulticlassMeta, RerankMeta
from stackcat.runs import MANIFEST, TRACKED_PACKAGES, package_versions
from stackcat.stacking import StackingCategorizer

from tiny_bert import build_tiny_bert
from tiny_images import CLASS_COLOURS, CountingEncoder, toy_image_dataset
from toy_models import NaiveBayesText, toy_table

TESTS_DIR = Path(__file__).parent
WORDS = {"shirt": "red cotton shirt", "jeans": "blue denim jeans", "shoes": "white running shoes"}


def scramble_global_random_state(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.rand(seed % 7 + 1)
    np.random.rand(seed % 5 + 1)


def fit_twice(make_stack, X, y) -> tuple[StackingCategorizer, StackingCategorizer]:
    fits = []
    for scramble in (11, 2024):
        scramble_global_random_state(scramble)
        clear_memory_cache()
        fits.append(make_stack().fit(X, y))
    return fits[0], fits[1]


def assert_same_numbers(first: StackingCategorizer, second: StackingCategorizer, X) -> None:
    assert first.oof_.keys() == second.oof_.keys()
    for name in first.oof_:
        np.testing.assert_array_equal(first.oof_[name], second.oof_[name], err_msg=name)
    np.testing.assert_array_equal(first.predict_proba(X), second.predict_proba(X))
    if first.meta_oof_ is not None:
        np.testing.assert_array_equal(first.meta_oof_, second.meta_oof_)


def stack_of(estimators, **params) -> StackingCategorizer:
    defaults = dict(meta="average", n_splits=2, random_state=0, progress=False, verbose=0)
    return StackingCategorizer(estimators, **{**defaults, **params})


@pytest.fixture(scope="module")
def products(tmp_path_factory) -> tuple[pd.DataFrame, np.ndarray]:
    """18 products of 3 classes: a text and a photo (noisy single colour) each."""
    paths, labels = toy_image_dataset(tmp_path_factory.mktemp("repro-images"), per_class=6)
    texts = [f"{WORDS[label]} {i % 4}" for i, label in enumerate(labels)]
    frame = pd.DataFrame({"text": texts, "image_path": paths}, dtype=object)
    return frame, np.array(labels, dtype=object)


@pytest.fixture(scope="module")
def tiny_text_model(tmp_path_factory) -> str:
    return str(build_tiny_bert(tmp_path_factory.mktemp("repro-bert"), WORDS.values()))


# --------------------------------------------------------------------------- base models


@pytest.mark.slow
def test_fasttext_single_thread_is_repeatable_in_fresh_processes(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        sys.path.insert(0, {str(TESTS_DIR)!r})
        from toy_models import toy_table
        from stackcat.models.fasttext import FastTextClassifier
        from stackcat.stacking import StackingCategorizer
        X, y = toy_table(n_per_class=20)
        stack = StackingCategorizer([("fasttext", FastTextClassifier(n_threads=1, dim=16, random_state=7))],
                                    meta="average", n_splits=3, progress=False, verbose=0).fit(X, y)
        np.savez(sys.argv[1], oof=stack.oof_["fasttext"], proba=stack.predict_proba(X))
    """)
    results = []
    for run in ("first", "second"):
        out = tmp_path / f"{run}.npz"
        subprocess.run([sys.executable, "-c", script, str(out)], check=True, timeout=300)
        with np.load(out) as stored:
            results.append({key: stored[key] for key in stored.files})
    np.testing.assert_array_equal(results[0]["oof"], results[1]["oof"])
    np.testing.assert_array_equal(results[0]["proba"], results[1]["proba"])
    assert results[0]["oof"].max() > 0.5  # a trained model, not a degenerate uniform one


def test_bert_through_the_stacker(products, tiny_text_model):
    from stackcat.models.bert import BertClassifier

    X, y = products

    def make():
        return stack_of([("bert", BertClassifier(model_name=tiny_text_model, epochs=1, batch_size=4, lr=3e-3,
                                                 max_length=16, warmup_ratio=0.0, dropout=0.2,
                                                 early_stopping_patience=None, progress=False,
                                                 random_state=3, n_threads=1))])

    assert_same_numbers(*fit_twice(make, X, y), X)


def test_fusion_through_the_stacker(products, tiny_text_model):
    from stackcat.models.fusion import FusionClassifier

    X, y = products
    encoder = CountingEncoder(dim=8)

    def make():
        return stack_of([("fusion", FusionClassifier(
            model_name=tiny_text_model, image_encoder=encoder, max_length=16, fusion_dim=16, image_dim=8,
            image_tokens=2, batch_size=4, lr=3e-3, head_lr=1e-2, image_epochs=1, frozen_epochs=1, epochs=1,
            warmup_ratio=0.0, dropout=0.2, progress=False, random_state=3, n_threads=1))])

    assert_same_numbers(*fit_twice(make, X, y), X)


def test_clip_head_through_the_stacker(products):
    from stackcat.models.image import ImageEmbeddingClassifier

    X, y = products
    encoder = CountingEncoder(dim=8)

    def make():
        return stack_of([("clip", ImageEmbeddingClassifier(encoder=encoder, normalize="standard", progress=False,
                                                      random_state=3))])

    first, second = fit_twice(make, X, y)
    assert_same_numbers(first, second, X)
    assert set(CLASS_COLOURS) == set(first.classes_)


# --------------------------------------------------------------------------- meta-learners


@pytest.mark.parametrize("meta", [MulticlassMeta(iterations=40, random_state=5),
                                  RerankMeta(iterations=40, top_k=3, random_state=5)],
                         ids=["multiclass", "rerank"])
def test_meta_learners_through_the_stacker(meta):
    X, y = toy_table(n_per_class=12, n_classes=5, rare=(2,))

    def make():
        return stack_of([("a", NaiveBayesText()), ("b", NaiveBayesText(alpha=0.3))], meta=meta, n_splits=3)

    first, second = fit_twice(make, X, y)
    assert_same_numbers(first, second, X)
    assert type(first.meta_) is type(meta)


# --------------------------------------------------------------------------- library versions


def test_manifest_records_versions_and_resuming_with_others_warns(tmp_path):
    X, y = toy_table()
    run_dir = tmp_path / "run"
    first = stack_of([("nb", NaiveBayesText())], run_dir=run_dir).fit(X, y)
    manifest = json.loads((run_dir / MANIFEST).read_text())
    assert manifest["versions"] == package_versions()
    assert set(TRACKED_PACKAGES) <= set(manifest["versions"])
    assert manifest["versions"]["stackcat"] == manifest["stackcat_version"]  # the running code's, not pip's record
    for name in ("numpy", "scikit-learn", "catboost", "fasttext-numpy2", "torch", "joblib"):
        assert manifest["versions"][name], name
    manifest["versions"]["numpy"] = "1.0.0"
    manifest["versions"]["catboost"] = "0.9"
    (run_dir / MANIFEST).write_text(json.dumps(manifest))
    expected = rf"numpy 1\.0\.0 -> {package_versions()['numpy']}; catboost 0\.9 -> "
    with pytest.warns(UserWarning, match=expected):
        again = stack_of([("nb", NaiveBayesText())], run_dir=run_dir).fit(X, y)
    assert again.jobs_["from_run_folder"].all()
    np.testing.assert_array_equal(again.oof_["nb"], first.oof_["nb"])
    assert json.loads((run_dir / MANIFEST).read_text())["versions"] == package_versions()
