"""ImageEmbeddingClassifier: a frozen image encoder + a softmax head (L-BFGS logistic regression or a torch head).

The head is the same whatever the encoder (open_clip, EfficientNet...). With an
EfficientNet-Lite encoder, ``tune_top_blocks=k`` trains copies of its last ``k``
blocks with the head instead, on cached feature maps (:mod:`stackcat.models.image_top_blocks`).
"""

from __future__ import annotations

import os
from numbers import Integral, Real
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context, clone
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from stackcat.core import limit_threads
from stackcat.features.image_encoders import (
    DEFAULT_IMAGE_ENCODER,
    EfficientNetLite0Encoder,
    EfficientNetLiteBlockInputs,
    MirroredEncoder,
    efficientnet_lite_block_count,
    get_encoder,
)
from stackcat.features.images import ImageEmbeddings, image_embeddings
from stackcat.models._base import (
    ProbaClassifierMixin,
    column_values,
    encode_labels,
    normalize_rows,
    proba_for_classes,
    seed_everything,
)
from stackcat.models.heads import TorchHeadClassifier, loss_class_weights

_SHOWN_ROWS = 10
# fitted attributes of one mode only: the frozen encoder's head, or the tuned top blocks
_MODE_ATTRIBUTES = ("head_", "scaler_", "embedding_dim_", "top_blocks_state_", "feature_map_shape_", "history_",
                    "best_epoch_")
# head="auto": the torch head above this many classes (the L-BFGS head's cost grows with rows x classes)
TORCH_HEAD_ABOVE = 300


class ImageEmbeddingClassifier(ProbaClassifierMixin, ClassifierMixin, BaseEstimator):
    """Frozen image embeddings (open_clip by default, any encoder pluggable) + a softmax head.

    Each image is embedded once by a frozen encoder (see
    :func:`stackcat.features.images.image_embeddings`; with ``image_cache_dir`` the embeddings are
    shared by every fold and model that asks for the same images), the vectors are
    normalized, and a head is trained on them: scikit-learn's ``LogisticRegression``
    (``head="logistic"``) or a :class:`stackcat.models.heads.TorchHeadClassifier`
    (``head="torch"``, minibatch AdamW with early stopping on an inner split).

    Rows without a usable image (no path, missing file, corrupt or too large: see
    :mod:`stackcat.features.images`) are left out of the head's training, and at prediction
    time get ``missing_image``'s answer: by default the training class prior (the
    label frequencies of all training rows), i.e. "no evidence from the picture".

    Parameters
    ----------
    image_column : str, default="image_path"
        Column of X holding image paths (X may also be a plain list of paths).
    encoder : str or object, default="ViT-L-14/openai"
        A spec for :func:`stackcat.features.image_encoders.get_encoder` (an open_clip
        ``"<architecture>/<tag>"`` or ``"<architecture>/<checkpoint path>"``,
        ``"efficientnet-lite0"``, ...), or any object with a ``name`` and an
        ``encode(images) -> (n, dim)`` method: the plug-in point for other encoders.
        It must pickle for the fitted model to pickle.
    image_cache_dir : str, path-like or None, default=None
        On-disk embedding cache shared by all models and processes.
    normalize : {"l2", "standard"} or None, default="l2"
        Scaling of the embeddings before the head: unit length (the usual for CLIP
        features), per-feature standardization learned on the training rows, or none.
    head : {"auto", "logistic", "torch"} or classifier, default="auto"
        ``"auto"``: ``"logistic"`` up to :data:`TORCH_HEAD_ABOVE` classes, ``"torch"``
        above, where L-BFGS's cost (rows x classes) dominates a fit: on 301
        label-crossed Myntra classes the torch head took 3.7 times less CPU for
        4.6% more errors (860 vs 822 of 1,763; experiments/RESULTS.md, "Fit time
        at scale"). ``"logistic"``: L-BFGS logistic regression (``C``, ``max_iter``).
        ``"torch"``: :class:`~stackcat.models.heads.TorchHeadClassifier` with its
        defaults (``C`` and ``max_iter`` unused). Or an unfitted classifier with
        ``fit`` and ``predict_proba`` (e.g. a ``TorchHeadClassifier`` with other
        params), cloned at fit. On the Myntra image subset (Lite0, 5 folds) the
        torch head makes 11.37% errors against the logistic head's 11.16%, with
        2.3 times less CPU (experiments/RESULTS.md, "Image head"), and its
        defaults are for thousands of rows: a few hundred rows train better with a
        larger ``learning_rate``.
    flip_average : bool, default=False
        Also embed every image flipped left to right (cached under the encoder's
        name + ``"+hflip"``) and use the mean of both vectors, in training and
        prediction. Costs a second encoding of each image. With ``tune_top_blocks``:
        at prediction, the mean of the probabilities of the image and of its mirror image.
    tune_top_blocks : int, default=0
        EfficientNet-Lite encoders only. 0: the encoder is frozen (the head trains on
        its embeddings). ``k >= 1``: the feature maps that enter the encoder's last
        ``k`` MBConv blocks are computed once per image and per mirror image (cached
        as float16 in ``image_cache_dir``, keyed by the encoder, ``k`` and the image
        size), and copies of those ``k`` blocks, the head convolution and a linear
        classifier train on them (each epoch sees each photo plain or mirrored: flip
        augmentation), stopping early on 10% of the rows held out (stratified) and
        keeping the best epoch's weights. ``normalize``, ``head``, ``C`` and
        ``max_iter`` are then unused. Costs two encodings of each image and, per
        epoch, a forward and backward pass of the tuned blocks per training image.
    tune_epochs : int, default=8
        With ``tune_top_blocks``: epochs in all, the first of which trains the linear
        classifier alone.
    tune_lr : float, default=3e-4
        With ``tune_top_blocks``: peak AdamW learning rate of the tuned blocks and head
        convolution (linear warmup, then linear decay).
    tune_head_lr : float, default=3e-3
        With ``tune_top_blocks``: peak learning rate of the linear classifier.
    tune_batch_size : int, default=64
        With ``tune_top_blocks``: images per training step.
    C : float, default=100.0
        Inverse regularization strength of the logistic head. Unit-length features are small,
        hence a much larger C than scikit-learn's default 1.0: on the demo data
        (EfficientNet-Lite0, l2, 5-fold OOF weighted F1) C=1 gives 0.605, 10 0.769,
        100 0.796, 300 0.799, 1000 0.794 (experiments/results/images.md).
    max_iter : int, default=1000
        L-BFGS iterations of the logistic head.
    class_weight : dict, "balanced" or None, default=None
        Passed to the head.
    missing_image : {"prior", "uniform", "error"}, default="prior"
        What a row without a usable image predicts: the training class prior, a
        uniform distribution, or an error naming the rows.
    device : str, default="auto"
        Device of an encoder built from a string (CUDA when available, else CPU).
    encode_batch_size : int, default=64
        Images decoded and encoded at a time.
    random_state : int or None, default=0
        Seed of the head.
    n_threads : int or None, default=None
        CPU threads for encoding (torch) and for the head (BLAS) while this model
        works; -1 = all cores; None leaves the libraries' settings alone. Give 1 to
        each of several models running in parallel processes.
    progress : bool, default=True
        Show a progress bar while images are encoded (cached images are not).

    Deprecated parameters: ``cache_dir`` (now ``image_cache_dir``), ``batch_size``
    (now ``encode_batch_size``), ``n_jobs`` (now ``n_threads``).

    Attributes
    ----------
    classes_ : ndarray
        The labels, sorted; columns of ``predict_proba`` follow this order.
    class_prior_ : ndarray of shape (n_classes,)
        Label frequencies of all training rows (what rows without image predict).
    encoder_ : ImageEncoder
        The encoder used (built from ``encoder`` when it is a string).
    embedding_dim_ : int
    scaler_ : StandardScaler or None
        Fitted when ``normalize="standard"``.
    head_ : LogisticRegression, TorchHeadClassifier or DummyClassifier
        Trained on the rows with a usable image, on class indices (a
        ``DummyClassifier`` when those rows hold a single class). Absent with
        ``tune_top_blocks``.
    top_blocks_state_ : dict of str to ndarray
        With ``tune_top_blocks``: the trained weights (tuned blocks, head convolution,
        batch norm, classifier) of a :class:`~stackcat.models.image_top_blocks.TopBlocksClassifier`.
    feature_map_shape_ : tuple of int
        With ``tune_top_blocks``: ``(channels, height, width)`` of the cached maps.
    history_ : list of dict
        With ``tune_top_blocks``: one record per epoch (stage, epoch, train_loss, valid_loss).
    best_epoch_ : dict or None
        With ``tune_top_blocks``: the epoch whose weights were kept (None without a held-out split).
    n_images_failed_ : int
        Training rows without a usable image.
    image_status_counts_ : dict
        Training rows per image status (``ok``, ``no_path``, ``missing``,
        ``too_large``, ``corrupt``).

    Examples
    --------
    >>> import numpy as np
    >>> from stackcat.demo import load_demo
    >>> class MeanColour:  # any object with .name and .encode is an encoder
    ...     name = "mean-colour"
    ...     def encode(self, images):
    ...         return np.array([np.asarray(im, np.float32).mean((0, 1)) for im in images])
    >>> frame, _ = load_demo(n_rows=300)
    >>> clf = ImageEmbeddingClassifier(encoder=MeanColour(), normalize="standard", progress=False)
    >>> clf = clf.fit(frame, frame["articleType"])
    >>> clf.predict_proba(frame).shape, clf.n_images_failed_
    ((300, 75), 0)
    >>> bool(np.allclose(clf.predict_proba([None])[0], clf.class_prior_))  # no image: the prior
    True
    """

    # params that change how fast, not what, it learns: left out of the run folder's job keys
    _runtime_params = ("encode_batch_size", "image_cache_dir", "n_threads", "progress")
    # weight arrays a model bundle writes as safetensors files
    _tensor_attributes = ("top_blocks_state_",)

    _parameter_constraints: dict = {
        "image_column": [str],
        "encoder": [str, HasMethods(["encode"])],
        "image_cache_dir": [str, os.PathLike, None],
        "normalize": [StrOptions({"l2", "standard"}), None],
        "head": [StrOptions({"auto", "logistic", "torch"}), HasMethods(["fit", "predict_proba"])],
        "flip_average": ["boolean"],
        "tune_top_blocks": [Interval(Integral, 0, None, closed="left")],
        "tune_epochs": [Interval(Integral, 1, None, closed="left")],
        "tune_lr": [Interval(Real, 0, None, closed="neither")],
        "tune_head_lr": [Interval(Real, 0, None, closed="neither")],
        "tune_batch_size": [Interval(Integral, 1, None, closed="left")],
        "C": [Interval(Real, 0, None, closed="neither")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "class_weight": [dict, StrOptions({"balanced"}), None],
        "missing_image": [StrOptions({"prior", "uniform", "error"})],
        "device": [str],
        "encode_batch_size": [Interval(Integral, 1, None, closed="left")],
        "random_state": [Interval(Integral, 0, None, closed="left"), None],
        "n_threads": [Integral, None],
        "progress": ["boolean"],
    }

    def __init__(
        self,
        image_column: str = "image_path",
        encoder: Any = DEFAULT_IMAGE_ENCODER,
        image_cache_dir: str | os.PathLike | None = None,
        normalize: str | None = "l2",
        head: Any = "auto",
        flip_average: bool = False,
        tune_top_blocks: int = 0,
        tune_epochs: int = 8,
        tune_lr: float = 3e-4,
        tune_head_lr: float = 3e-3,
        tune_batch_size: int = 64,
        C: float = 100.0,
        max_iter: int = 1000,
        class_weight: dict | str | None = None,
        missing_image: str = "prior",
        device: str = "auto",
        encode_batch_size: int = 64,
        random_state: int | None = 0,
        n_threads: int | None = None,
        progress: bool = True,
    ) -> None:
        self.image_column = image_column
        self.encoder = encoder
        self.image_cache_dir = image_cache_dir
        self.normalize = normalize
        self.head = head
        self.flip_average = flip_average
        self.tune_top_blocks = tune_top_blocks
        self.tune_epochs = tune_epochs
        self.tune_lr = tune_lr
        self.tune_head_lr = tune_head_lr
        self.tune_batch_size = tune_batch_size
        self.C = C
        self.max_iter = max_iter
        self.class_weight = class_weight
        self.missing_image = missing_image
        self.device = device
        self.encode_batch_size = encode_batch_size
        self.random_state = random_state
        self.n_threads = n_threads
        self.progress = progress

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any) -> ImageEmbeddingClassifier:
        """Embed the images of ``X`` and train the head on the rows whose image is usable.

        With ``tune_top_blocks``: compute the feature maps of the images and of their
        mirror images, and train the top blocks and the head on them.
        """
        paths = column_values(X, self.image_column, what="image")
        for name in _MODE_ATTRIBUTES:  # a refit in the other mode must not predict with this one's weights
            self.__dict__.pop(name, None)
        self.classes_, y_index = encode_labels(y, len(paths))
        self.encoder_ = get_encoder(self.encoder, device=self.device)
        if self.tune_top_blocks:
            self._block_inputs(self.encoder_)  # refuse an encoder or k that cannot be tuned before encoding
        with limit_threads(self.n_threads):
            if self.tune_top_blocks:
                embedded, mirrored = self._maps(paths, mirrored=True)
            else:
                embedded = self._embed(paths)
            self._record_image_status(embedded)
            usable = embedded.ok
            if not usable.any():
                raise ValueError(
                    f"none of the {len(paths)} training rows has a usable image in column "
                    f"{self.image_column!r} ({self._failure_summary(embedded, paths)}); "
                    f"cannot train an image classifier"
                )
            if self.missing_image == "error":
                self._raise_for_failed(embedded, paths)
            self.class_prior_ = np.bincount(y_index, minlength=len(self.classes_)) / len(y_index)
            if self.tune_top_blocks:
                self._fit_top_blocks(embedded.embeddings[usable], mirrored.embeddings[usable], y_index[usable])
                return self
            self.embedding_dim_ = int(embedded.embeddings.shape[1])
            features = self._fit_features(embedded.embeddings[usable])
            self.head_ = self._make_head(y_index[usable]).fit(features, y_index[usable])
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """Probabilities ``(n_samples, n_classes)`` in ``classes_`` order; rows sum to 1.

        Rows without a usable image get ``class_prior_`` (``missing_image="prior"``).
        """
        check_is_fitted(self, ["head_", "top_blocks_state_"], all_or_any=any)
        paths = column_values(X, self.image_column, what="image")
        tuned = hasattr(self, "top_blocks_state_")
        with limit_threads(self.n_threads):
            if tuned:
                embedded, mirrored = self._maps(paths, mirrored=self.flip_average)
            else:
                embedded = self._embed(paths)
            if self.missing_image == "error":
                self._raise_for_failed(embedded, paths)
            proba = np.tile(self._fallback_proba(), (len(paths), 1))
            usable = embedded.ok
            if usable.any() and tuned:
                views = [embedded] + ([mirrored] if mirrored is not None else [])
                proba[usable] = self._top_blocks_proba([view.embeddings[usable] for view in views])
            elif usable.any():
                head_proba = self.head_.predict_proba(self._features(embedded.embeddings[usable]))
                proba[usable] = proba_for_classes(head_proba, self.head_.classes_,
                                                  range(len(self.classes_)))
        return normalize_rows(proba)

    def warm_cache(self, X: Any) -> None:
        """Encode every image of ``X`` into ``image_cache_dir`` once, before fold jobs start in parallel.

        The stacking engine calls this in the main process, so that parallel
        fold jobs read the cache instead of each encoding the same images.
        """
        cache_dir = self.image_cache_dir
        if cache_dir is None:
            return
        paths = column_values(X, self.image_column, what="image")
        encoder = get_encoder(self.encoder, device=self.device)
        with limit_threads(self.n_threads):
            if self.tune_top_blocks:
                self._maps(paths, mirrored=True, encoder=encoder)
            else:
                self._embed(paths, encoder)

    def _encoders(self, encoder: Any) -> list[Any]:
        return [encoder, MirroredEncoder(encoder)] if self.flip_average else [encoder]

    def _embed(self, paths: np.ndarray, encoder: Any = None) -> ImageEmbeddings:
        """The embeddings of ``paths`` by ``encoder`` (default: the fitted ``encoder_``), flip-averaged if asked."""
        embedded = [image_embeddings(list(paths), each, cache_dir=self.image_cache_dir,
                                     batch_size=self.encode_batch_size, device=self.device, progress=self.progress)
                    for each in self._encoders(self.encoder_ if encoder is None else encoder)]
        if len(embedded) == 1:
            return embedded[0]
        plain, mirrored = embedded  # same decoded image, so the same status per row
        return ImageEmbeddings((plain.embeddings + mirrored.embeddings) / 2, plain.ok & mirrored.ok, plain.status)

    def _block_inputs(self, encoder: Any) -> EfficientNetLiteBlockInputs:
        """What the top-block tune trains on: the maps entering ``encoder``'s last ``tune_top_blocks`` blocks."""
        k = self.tune_top_blocks
        if not isinstance(encoder, EfficientNetLite0Encoder):
            raise ValueError(
                f"tune_top_blocks={k} tunes the top blocks of an EfficientNet-Lite encoder ('efficientnet-lite0', "
                f"'efficientnet-lite2'); encoder {getattr(encoder, 'name', encoder)!r} is not one: use "
                f"tune_top_blocks=0 (a frozen encoder and a head) with it"
            )
        n_blocks = efficientnet_lite_block_count(encoder.variant)
        if k > n_blocks:
            raise ValueError(f"tune_top_blocks={k}, but encoder {encoder.variant!r} has {n_blocks} MBConv blocks")
        return EfficientNetLiteBlockInputs(encoder, k)

    def _maps(self, paths: np.ndarray, mirrored: bool,
              encoder: Any = None) -> tuple[ImageEmbeddings, ImageEmbeddings | None]:
        """The flattened maps entering the tuned blocks, of the images and (when asked) of their mirror images."""
        block_inputs = self._block_inputs(self.encoder_ if encoder is None else encoder)
        encoders = [block_inputs, MirroredEncoder(block_inputs)] if mirrored else [block_inputs]
        maps = [image_embeddings(list(paths), each, cache_dir=self.image_cache_dir, batch_size=self.encode_batch_size,
                                 device=self.device, progress=self.progress, dtype=np.float16)
                for each in encoders]
        return maps[0], (maps[1] if mirrored else None)

    def _fit_top_blocks(self, plain: np.ndarray, mirrored: np.ndarray, y_usable: np.ndarray) -> None:
        if len(np.unique(y_usable)) < 2:
            raise ValueError(f"tune_top_blocks={self.tune_top_blocks} needs at least 2 classes among the training "
                             f"rows with a usable image; they hold only {self.classes_[y_usable[0]]!r}")
        from stackcat.models.image_top_blocks import (
            TopBlocksClassifier,
            TopBlocksTraining,
            fit_top_blocks,
        )

        block_inputs = self._block_inputs(self.encoder_)
        seed_everything(self.random_state)  # the classifier's initial weights
        module = TopBlocksClassifier(self.encoder_.network(), self.tune_top_blocks, block_inputs.map_shape, len(self.classes_))
        training = TopBlocksTraining(epochs=self.tune_epochs, lr=self.tune_lr, head_lr=self.tune_head_lr,
                                     batch_size=self.tune_batch_size, progress=self.progress)
        weights = loss_class_weights(self.class_weight, self.classes_, y_usable)
        self.history_, self.best_epoch_ = fit_top_blocks(module, plain, mirrored, y_usable, training, weights,
                                                         self.random_state)
        self.feature_map_shape_ = block_inputs.map_shape
        self.top_blocks_state_ = {name: value.detach().cpu().numpy().copy()
                                  for name, value in module.state_dict().items()}

    def _top_blocks_proba(self, views: list[np.ndarray]) -> np.ndarray:
        from stackcat.models.image_top_blocks import build_module, predict_top_blocks

        module = build_module(self.encoder_.variant, self.tune_top_blocks, self.feature_map_shape_,
                              len(self.classes_), self.top_blocks_state_)
        return predict_top_blocks(module, views, len(self.classes_))

    def _record_image_status(self, embedded: ImageEmbeddings) -> None:
        self.image_status_counts_ = embedded.status_counts
        self.n_images_failed_ = int((~embedded.ok).sum())

    def _make_head(self, y_usable: np.ndarray) -> Any:
        if len(np.unique(y_usable)) == 1:
            return DummyClassifier(strategy="prior")
        if not isinstance(self.head, str):
            return clone(self.head)
        torch_head = self.head == "torch" or (self.head == "auto" and len(np.unique(y_usable)) > TORCH_HEAD_ABOVE)
        if torch_head:
            return TorchHeadClassifier(class_weight=self.class_weight, random_state=self.random_state)
        return LogisticRegression(C=self.C, max_iter=self.max_iter, class_weight=self.class_weight,
                                  random_state=self.random_state)

    def _fit_features(self, embeddings: np.ndarray) -> np.ndarray:
        self.scaler_ = StandardScaler().fit(embeddings) if self.normalize == "standard" else None
        return self._features(embeddings)

    def _features(self, embeddings: np.ndarray) -> np.ndarray:
        features = embeddings.astype(np.float64)
        if self.normalize == "l2":
            norms = np.linalg.norm(features, axis=1, keepdims=True)
            features = features / np.maximum(norms, 1e-12)
        elif self.scaler_ is not None:
            features = self.scaler_.transform(features)
        return features

    def _fallback_proba(self) -> np.ndarray:
        if self.missing_image == "uniform":
            return np.full(len(self.classes_), 1.0 / len(self.classes_))
        return self.class_prior_.astype(np.float64)

    def _failure_summary(self, embedded: ImageEmbeddings, paths: np.ndarray) -> str:
        counts = {k: v for k, v in embedded.status_counts.items() if v}
        bad = np.flatnonzero(~embedded.ok)[:_SHOWN_ROWS]
        examples = ", ".join(f"row {i}: {embedded.status[i]} {paths[i]!r}" for i in bad)
        return f"status counts {counts}; e.g. {examples}"

    def _raise_for_failed(self, embedded: ImageEmbeddings, paths: np.ndarray) -> None:
        if embedded.ok.all():
            return
        raise ValueError(
            f"{int((~embedded.ok).sum())} rows have no usable image in column {self.image_column!r} "
            f"and missing_image='error' ({self._failure_summary(embedded, paths)})"
        )

    def __sklearn_tags__(self):  # noqa: D105
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        return tags

