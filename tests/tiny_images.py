"""Test helpers: images written on the spot, a counting stub encoder, a tiny open_clip config."""

from __future__ import annotations

import json
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from stackcat.features.image_encoders import EfficientNetLite0Encoder

# Colours that a mean-colour encoder tells apart: one per class of the toy data.
CLASS_COLOURS = {"shirt": (200, 30, 30), "jeans": (30, 40, 190), "shoes": (30, 170, 40)}


# Encoding logs live outside the encoder objects, so copies made by sklearn's clone (deepcopy)
# or by pickling report into the same log.
_ENCODING_LOGS: dict[str, dict] = {}


class CountingEncoder:
    """A cheap deterministic encoder that counts how often each image was encoded.

    The vector is the image's mean colour (scaled to [0, 1]) followed by ``dim - 3``
    fixed functions of it; images are told apart by a hash of their pixels. Copies of
    an encoder (clone, pickle) share its counts.
    """

    def __init__(self, dim: int = 8, name: str = "counting-stub/v1") -> None:
        self.dim = dim
        self.name = name
        self.log_id = f"log-{len(_ENCODING_LOGS)}"
        _ENCODING_LOGS[self.log_id] = {"calls": 0, "encoded": Counter()}

    @property
    def calls(self) -> int:
        return _ENCODING_LOGS[self.log_id]["calls"]

    @property
    def encoded(self) -> Counter[str]:
        return _ENCODING_LOGS[self.log_id]["encoded"]

    def encode(self, images: list[Image.Image]) -> np.ndarray:
        _ENCODING_LOGS[self.log_id]["calls"] += 1
        rows = []
        for image in images:
            assert image.mode == "RGB", image.mode
            pixels = np.asarray(image, dtype=np.float32) / 255.0
            self.encoded[pixel_hash(image)] += 1
            mean = pixels.mean(axis=(0, 1))
            extra = [np.sin((k + 1) * mean.sum()) for k in range(self.dim - 3)]
            rows.append(np.concatenate([mean, extra]))
        return np.asarray(rows, dtype=np.float32).reshape(len(images), self.dim)

    @property
    def max_encodings_per_image(self) -> int:
        return max(self.encoded.values(), default=0)


class FailingEncoder:
    """An encoder that must never be asked for anything (everything should be cached)."""

    def __init__(self, name: str = "counting-stub/v1") -> None:
        self.name = name

    def encode(self, images):
        raise AssertionError(f"encode() called for {len(images)} images")


def pixel_hash(image: Image.Image) -> str:
    return str(hash(image.tobytes()))


def write_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (24, 16),
                colour=(200, 30, 30), fmt: str | None = None, **save_args) -> Path:
    """Write a single-colour image of ``mode``; returns its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, format=fmt, **save_args)
    return path


def write_colour_pngs(folder: Path, colours: dict[str, tuple[int, int, int]]) -> dict[str, str]:
    """One small single-colour PNG per name in ``colours``; returns name -> path."""
    return {name: str(write_image(folder / f"{name}.png", size=(8, 8), colour=rgb)) for name, rgb in colours.items()}


def write_noisy_jpeg(path: Path, colour, seed: int, size: tuple[int, int] = (32, 32)) -> Path:
    """A JPEG of ``colour`` plus a little noise, so that every file (and its hash) differs."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 12, (*size[::-1], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path, format="JPEG", quality=90)
    return path


def toy_image_dataset(folder: Path, per_class: int = 6) -> tuple[list[str], list[str]]:
    """``(paths, labels)``: noisy single-colour JPEGs, one colour per class."""
    paths, labels = [], []
    for k in range(per_class):
        for j, (label, colour) in enumerate(CLASS_COLOURS.items()):
            paths.append(str(write_noisy_jpeg(folder / f"{label}_{k}.jpg", colour, seed=10 * k + j)))
            labels.append(label)
    return paths, labels


def write_truncated_jpeg(path: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, format="JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_huge_png(path: Path, width: int = 10_000, height: int = 10_000) -> Path:
    """A valid single-colour grey PNG of ``width`` x ``height``, streamed: never held in memory."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))

    compressor = zlib.compressobj(9)
    row = b"\x00" + b"\x80" * width  # filter byte 0, then mid-grey pixels
    idat = bytearray()
    for _ in range(height):
        idat += compressor.compress(row)
    idat += compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    with open(path, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n")
        handle.write(chunk(b"IHDR", header))
        handle.write(chunk(b"IDAT", bytes(idat)))
        handle.write(chunk(b"IEND", b""))
    return path


TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


def tiny_open_clip_dir(folder: Path) -> Path:
    """A folder with an ``open_clip_config.json`` of a tiny ViT and no weights (random init)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": TINY_OPEN_CLIP_CONFIG,
              "preprocess_cfg": {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}
    (folder / "open_clip_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


class TinyLiteEncoder(EfficientNetLite0Encoder):
    """EfficientNet-Lite0's architecture with seeded random weights, on 64 px images: a fast stand-in.

    Every stride-2 layer sees an even size at 64 px as at 224 px, so the "same" padding
    the architecture computes for 224 px holds. ``seed`` changes the weights and the name.
    """

    image_size = 64

    def __init__(self, seed: int = 0, **settings) -> None:
        super().__init__(**{"device": "cpu", "backend": "torch", **settings})
        self.seed = seed
        self.name = f"tiny-efficientnet-lite0/seed{seed}"

    def _load_key(self) -> tuple:
        return ("tiny-efficientnet-lite0", self.seed)

    def _content_identity(self) -> str:
        return self.name

    def _build(self, device):
        import torch

        from stackcat.features.image_encoders import efficientnet_lite_architecture

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = efficientnet_lite_architecture(self.variant)
            # Batch norm statistics of a batch of colours: with them, the random layers keep
            # the images apart (with the identity statistics every image gets the same vector).
            for module in model.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.reset_running_stats()
                    module.momentum = None  # the batch's own statistics
            colours = torch.rand(16, 3, 1, 1) * 2 - 1
            with torch.no_grad():
                model.train().extract_features(colours.expand(16, 3, self.image_size, self.image_size)
                                               + 0.1 * torch.randn(16, 3, self.image_size, self.image_size))
        return model.eval().requires_grad_(False).to(device), self._transform()
