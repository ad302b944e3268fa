"""MetricSpaceClassifier: a learned retrieval space on the cached frozen text and image embeddings.

The frozen encoders' vectors (the ones ``bert``/``knn_text`` and
``image``/``knn_image`` already cache) were trained for other tasks: products of
one category do not cluster there, and the cosine of two products says as much
about their photo's background as about their category. This member learns a
small projection of those vectors (linear, or one hidden layer, to ``dim``
dimensions, unit length) in which they do: a proxy loss with an additive
cosine margin (CosFace; "classification is a strong baseline for deep metric
learning", Zhai & Wu 2019) pulls each product towards a learned proxy of its
class and away from the others.

It predicts from class *prototypes* (the normalized mean of the projected
training rows of each class): ``softmax(cosine / temperature)``, the
temperature fitted on an inner held-out split, optionally blended with the
votes of the nearest training rows in the learned space. Its projected
training rows (``index_``) and :meth:`project` give the stack retrieval
signals in the learned space, computed by each fold's model for its own
held-out rows, so no row's label ever shapes the space it is scored in.

Only ``fit`` needs torch: the projection is kept as NumPy arrays.
"""

from __future__ import annotations

import os
from numbers import Integral, Real
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from stackcat.core import limit_threads
from stackcat.features.hub import DEFAULT_TEXT_MODEL
from stackcat.features.image_encoders import DEFAULT_IMAGE_ENCODER
from stackcat.models._base import ProbaClassifierMixin, encode_labels, seed_everything
from stackcat.models.heads import (
    FeatureMinibatches,
    inner_split,
    nonzero_scale,
    softmax_rows,
    stop_after,
)
from stackcat.models.neighbours import (
    NeighboursClassifier,
    l2_normalized,
    nearest_neighbours,
    neighbour_votes,
)

__all__ = ["MetricSpaceClassifier"]

NEIGHBOUR_WEIGHTS = (0.0, 0.25, 0.5, 0.75)  # blends tried on the inner split with neighbour_weight="auto"


class MetricSpaceClassifier(ProbaClassifierMixin, ClassifierMixin, BaseEstimator):
    """Class prototypes in a learned projection of the cached frozen text and/or image embeddings.

    The input vector of a product is its unit frozen-text vector (mean of the
    encoder's token states), its unit image vector, or both side by side with a
    has-image flag (``source="both"``: a product without a usable photo gets
    zeros for the image part and flag 0). Inputs are standardized, projected to
    ``dim`` dimensions and L2-normalized. Training minimizes the cross-entropy
    of ``scale * (cos(z, proxy_c) - margin * [c = y])`` over learned class
    proxies, in minibatches (AdamW, linear decay), stopping early on a
    stratified inner split; with ``refit`` the projection is trained again on
    every row for the best epoch count.

    Prediction: the cosine of the projected product to each class prototype,
    ``softmax(cosine / temperature_)``, blended as
    ``(1 - w) * prototypes + w * neighbour votes`` (the ``n_neighbors``
    nearest training rows in the learned space, weighted by
    ``softmax(cosine / neighbour_temperature)``), then mixed with the class
    prior by ``smoothing``. ``temperature_`` (and ``w`` with
    ``neighbour_weight="auto"``) minimize the log loss of the inner split's rows.

    Parameters
    ----------
    source : {"text", "image", "both"}, default="both"
        Which cached embeddings are projected.
    text_column, image_column : str, default="text", "image_path"
        Columns of X holding the text and the image path (one source: X may be a plain list).
    model_name : str or path-like, default="cointegrated/rubert-tiny2"
        Frozen text encoder (shared cache with ``BertClassifier(freeze_encoder=True)`` and ``knn_text``).
    text_prefix : str, default=""
        Put before every text (e5: ``"passage: "``).
    max_length : int, default=128
        Tokens kept per text (part of the text cache's key).
    encoder : str or object, default="ViT-L-14/openai"
        Image encoder (shared cache with ``ImageEmbeddingClassifier`` and ``knn_image``).
    text_cache_dir, image_cache_dir : str, path-like or None, default=None
        The run's embedding caches (None: this process's memory only).
    dim : int, default=128
        Dimensions of the learned space.
    hidden_units : int, default=0
        Units of a hidden ReLU layer before the projection; 0 = a linear projection.
    dropout : float, default=0.0
        Dropout on the standardized inputs while training.
    margin : float, default=0.1
        Additive cosine margin of the true class in the training loss.
    scale : float, default=16.0
        Logit scale of the training loss (cosines are in [-1, 1]).
    learning_rate : float, default=1e-3
        Peak AdamW learning rate.
    weight_decay : float, default=1e-4
    batch_size : int, default=256
    max_epochs : int, default=40
    patience : int, default=4
        Epochs without a lower inner-split loss before training stops.
    validation_fraction : float, default=0.1
        Share of the rows (stratified) held out for early stopping and the temperature.
    refit : bool, default=True
        Train again on every row for the best epoch count once the inner split has chosen it.
    n_neighbors : int, default=10
        Training rows that vote in the neighbour blend.
    neighbour_weight : float or "auto", default="auto"
        Weight of the neighbour votes against the prototypes; "auto" picks one of
        0, 0.25, 0.5, 0.75 on the inner split.
    neighbour_temperature : float, default=0.05
        Softmax temperature of the neighbours' votes, in cosine units.
    smoothing : float, default=0.01
        Weight of the training class prior mixed into every row.
    random_state : int or None, default=0
        Seed of the inner split, the initialization and the batch order.
    n_threads : int or None, default=None
        Torch / BLAS threads while fitting and predicting; -1 = all cores.
    device : str, default="auto"
        Where an encoder runs when something is not cached (training runs on the CPU).
    encode_batch_size : int, default=64
        Texts or images per encoder pass.
    progress : bool, default=True
        Progress bar while encoding what is not cached.

    Attributes
    ----------
    classes_ : ndarray
        The labels, sorted; columns of ``predict_proba`` follow this order.
    class_prior_ : ndarray of shape (n_classes,)
    n_input_features_ : int
        Length of the input vector (text, image and flag parts).
    mean_, scale_ : ndarray of shape (n_input_features_,)
        Standardization of the inputs.
    coefs_, intercepts_ : list of ndarray
        The projection's layers, input first.
    prototypes_ : ndarray of shape (n_classes, dim), float32
        Unit mean of each class's projected training rows (zeros: a class with no usable row).
    temperature_ : float
        Softmax temperature over prototype cosines.
    neighbour_weight_ : float
        Weight of the neighbour votes used at prediction.
    index_ : ndarray of shape (n_indexed, dim), float16
        Projected training rows (those with an input for the source).
    index_labels_ : ndarray of shape (n_indexed,)
        Class index of each row of ``index_``.
    n_epochs_, best_epoch_ : int
        Epochs run with the inner split, and the one kept (1-based).
    best_valid_loss_ : float or None
        Its inner-split loss (None without an inner split).
    text_model_identity_ : str
        Content hash of the text encoder (text sources): predicting refuses a changed checkpoint.

    Examples
    --------
    >>> import numpy as np
    >>> class MeanColour:  # any object with .name and .encode is an image encoder
    ...     name = "mean-colour"
    ...     def encode(self, images):
    ...         return np.array([np.asarray(im, np.float32).mean((0, 1)) for im in images])
    >>> from stackcat.demo import load_demo
    >>> frame, _ = load_demo(n_rows=300)
    >>> space = MetricSpaceClassifier(source="image", encoder=MeanColour(), dim=8, max_epochs=3, progress=False)
    >>> space.fit(frame, frame["articleType"]).predict_proba(frame).shape
    (300, 75)
    >>> space.project(frame.head(2)).shape
    (2, 8)
    """

    # params that change how fast, not what, it learns: left out of the run folder's job keys
    _runtime_params = ("text_cache_dir", "image_cache_dir", "encode_batch_size", "progress", "n_threads")

    _parameter_constraints: dict = {
        "source": [StrOptions({"text", "image", "both"})],
        "text_column": [str],
        "image_column": [str],
        "model_name": [str, os.PathLike],
        "text_prefix": [str],
        "max_length": [Interval(Integral, 1, None, closed="left")],
        "encoder": [str, HasMethods(["encode"])],
        "text_cache_dir": [str, os.PathLike, None],
        "image_cache_dir": [str, os.PathLike, None],
        "dim": [Interval(Integral, 2, None, closed="left")],
        "hidden_units": [Interval(Integral, 0, None, closed="left")],
        "dropout": [Interval(Real, 0, 1, closed="left")],
        "margin": [Interval(Real, 0, 1, closed="left")],
        "scale": [Interval(Real, 0, None, closed="neither")],
        "learning_rate": [Interval(Real, 0, None, closed="neither")],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "max_epochs": [Interval(Integral, 1, None, closed="left")],
        "patience": [Interval(Integral, 1, None, closed="left")],
        "validation_fraction": [Interval(Real, 0, 1, closed="left")],
        "refit": ["boolean"],
        "n_neighbors": [Interval(Integral, 1, None, closed="left")],
        "neighbour_weight": [Interval(Real, 0, 1, closed="both"), StrOptions({"auto"})],
        "neighbour_temperature": [Interval(Real, 0, None, closed="neither")],
        "smoothing": [Interval(Real, 0, 1, closed="both")],
        "random_state": [Interval(Integral, 0, None, closed="left"), None],
        "n_threads": [Integral, None],
        "device": [str],
        "encode_batch_size": [Interval(Integral, 1, None, closed="left")],
        "progress": ["boolean"],
    }

    def __init__(
        self,
        source: str = "both",
        text_column: str = "text",
        image_column: str = "image_path",
        model_name: str | os.PathLike = DEFAULT_TEXT_MODEL,
        text_prefix: str = "",
        max_length: int = 128,
        encoder: Any = DEFAULT_IMAGE_ENCODER,
        text_cache_dir: str | os.PathLike | None = None,
        image_cache_dir: str | os.PathLike | None = None,
        dim: int = 128,
        hidden_units: int = 0,
        dropout: float = 0.0,
        margin: float = 0.1,
        scale: float = 16.0,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-4,
        batch_size: int = 256,
        max_epochs: int = 40,
        patience: int = 4,
        validation_fraction: float = 0.1,
        refit: bool = True,
        n_neighbors: int = 10,
        neighbour_weight: float | str = "auto",
        neighbour_temperature: float = 0.05,
        smoothing: float = 0.01,
        random_state: int | None = 0,
        n_threads: int | None = None,
        device: str = "auto",
        encode_batch_size: int = 64,
        progress: bool = True,
    ) -> None:
        self.source = source
        self.text_column = text_column
        self.image_column = image_column
        self.model_name = model_name
        self.text_prefix = text_prefix
        self.max_length = max_length
        self.encoder = encoder
        self.text_cache_dir = text_cache_dir
        self.image_cache_dir = image_cache_dir
        self.dim = dim
        self.hidden_units = hidden_units
        self.dropout = dropout
        self.margin = margin
        self.scale = scale
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.refit = refit
        self.n_neighbors = n_neighbors
        self.neighbour_weight = neighbour_weight
        self.neighbour_temperature = neighbour_temperature
        self.smoothing = smoothing
        self.random_state = random_state
        self.n_threads = n_threads
        self.device = device
        self.encode_batch_size = encode_batch_size
        self.progress = progress

    # -- the estimator --------------------------------------------------------------------

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any) -> MetricSpaceClassifier:
        """Read the cached embeddings of ``X`` (encoding what is missing), then learn the space."""
        self.classes_, y_index = encode_labels(y, len(X))
        if len(self.classes_) < 2:
            raise ValueError(f"y holds a single class ({self.classes_[0]!r}); a classifier needs at least 2")
        self.class_prior_ = np.bincount(y_index, minlength=len(self.classes_)) / len(y_index)
        if self.source != "image":
            from stackcat.features.text_states import text_model_identity

            self.text_model_identity_ = text_model_identity(self.model_name)
        features, usable = self._input_features(X)
        if not usable.any():
            raise ValueError(f"none of the {len(usable)} training rows has a usable image in column "
                             f"{self.image_column!r}; cannot learn an image space")
        features, y_index = features[usable], y_index[usable]
        self.n_input_features_ = features.shape[1]
        self.mean_ = features.mean(axis=0)
        self.scale_ = nonzero_scale(features.std(axis=0))
        standardized = (features - self.mean_) / self.scale_
        with limit_threads(self.n_threads):
            self._learn(standardized, y_index)
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """Probabilities ``(n_samples, n_classes)`` in ``classes_`` order; rows sum to 1.

        Rows without an input for the source (``source="image"`` and no usable photo) get ``class_prior_``.
        """
        check_is_fitted(self, "prototypes_")
        projected, usable = self._projected(X)
        proba = np.tile(self.class_prior_, (len(usable), 1))
        if usable.any():
            with limit_threads(self.n_threads):
                mixed = self._blend(projected[usable], self.neighbour_weight_, self._index32(), self.index_labels_)
            proba[usable] = (1.0 - self.smoothing) * mixed + self.smoothing * self.class_prior_
        return proba

    def project(self, X: Any) -> np.ndarray:
        """``(n_rows, dim)`` float32 unit vectors of the rows of ``X`` in the learned space.

        A row without an input for the source (``source="image"`` and no usable photo) is a zero row.
        """
        check_is_fitted(self, "prototypes_")
        projected, _ = self._projected(X)
        return projected

    def file_columns(self) -> list[str]:
        """Columns of X whose files this model reads: the image column, unless ``source="text"``."""
        return [] if self.source == "text" else [self.image_column]

    @property
    def optional_columns(self) -> tuple[str, ...]:
        """Column params not read with this ``source`` (the stack's preflight does not require them)."""
        return ("text_column",) if self.source == "image" else ()

    def warm_cache(self, X: Any) -> None:
        """Encode every row of ``X`` into the cache folders once, before parallel fold jobs start."""
        for view in self._views():
            view.warm_cache(X)

    # -- inputs ---------------------------------------------------------------------------

    def _views(self) -> list[NeighboursClassifier]:
        """The frozen embedders of the source(s): the same cache entries as the kNN members."""
        shared = dict(device=self.device, encode_batch_size=self.encode_batch_size, progress=self.progress)
        views = []
        if self.source in ("text", "both"):
            views.append(NeighboursClassifier(
                source="text", text_column=self.text_column, model_name=self.model_name,
                text_prefix=self.text_prefix, max_length=self.max_length, text_cache_dir=self.text_cache_dir,
                **shared))
        if self.source in ("image", "both"):
            views.append(NeighboursClassifier(source="image", image_column=self.image_column, encoder=self.encoder,
                                              image_cache_dir=self.image_cache_dir, **shared))
        return views

    def _input_features(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(features, usable)``: each row's input vector, and whether it has one for the source."""
        parts = [view.embed(X) for view in self._views()]
        if self.source == "text":
            return parts[0], np.ones(len(parts[0]), dtype=bool)
        has_image = np.any(parts[-1] != 0, axis=1)
        if self.source == "image":
            return parts[0], has_image
        return np.hstack([*parts, has_image[:, None].astype(np.float32)]), np.ones(len(has_image), dtype=bool)

    def _projected(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        if self.source != "image":
            from stackcat.features.text_states import check_text_model

            check_text_model(self.model_name, self.text_model_identity_)
        features, usable = self._input_features(X)
        if features.shape[1] != self.n_input_features_:
            raise ValueError(f"the encoders give {features.shape[1]} input features per row; this model was "
                             f"fitted on {self.n_input_features_} (a different text or image encoder?)")
        projected = np.zeros((len(features), self.dim), dtype=np.float32)
        if usable.any():
            with limit_threads(self.n_threads):
                projected[usable] = self._project_standardized((features[usable] - self.mean_) / self.scale_)
        return projected, usable

    def _project_standardized(self, hidden: np.ndarray) -> np.ndarray:
        for layer, (weights, bias) in enumerate(zip(self.coefs_, self.intercepts_, strict=True)):
            hidden = hidden @ weights + bias
            if layer < len(self.coefs_) - 1:
                hidden = np.maximum(hidden, 0.0)
        return l2_normalized(hidden)

    # -- learning -------------------------------------------------------------------------

    def _learn(self, X: np.ndarray, y_index: np.ndarray) -> None:
        """Train with early stopping, fit the temperature (and blend) on the inner split, then refit."""
        train, valid = inner_split(y_index, self.validation_fraction, self.random_state)
        history = self._train_projection(X[train], y_index[train],
                                         None if valid is None else (X[valid], y_index[valid]), self.max_epochs)
        self.n_epochs_ = len(history)
        best = min(history, key=lambda log: log.valid_loss) if valid is not None else history[-1]
        self.best_epoch_, self.best_valid_loss_ = best.epoch, best.valid_loss
        reference = self._project_standardized(X[train])
        self.prototypes_ = class_prototypes(reference, y_index[train], len(self.classes_))
        if valid is None:
            self.temperature_ = 1.0 / self.scale
            self.neighbour_weight_ = 0.0 if self.neighbour_weight == "auto" else float(self.neighbour_weight)
        else:
            self._fit_temperature_and_blend(self._project_standardized(X[valid]), y_index[valid],
                                            reference, y_index[train])
        if self.refit and valid is not None:
            self._train_projection(X, y_index, None, self.best_epoch_)
        self.index_ = self._project_standardized(X).astype(np.float16)
        self.index_labels_ = y_index
        self.prototypes_ = class_prototypes(self._index32(), y_index, len(self.classes_))

    def _fit_temperature_and_blend(self, queries: np.ndarray, y_valid: np.ndarray, reference: np.ndarray,
                                   y_reference: np.ndarray) -> None:
        cosines = queries @ self.prototypes_.T
        self.temperature_ = fit_temperature(cosines, y_valid)
        if self.neighbour_weight != "auto":
            self.neighbour_weight_ = float(self.neighbour_weight)
            return
        losses = {}
        for weight in NEIGHBOUR_WEIGHTS:
            mixed = self._blend(queries, weight, reference, y_reference)
            proba = (1.0 - self.smoothing) * mixed + self.smoothing * self.class_prior_
            losses[weight] = -np.mean(np.log(np.maximum(proba[np.arange(len(y_valid)), y_valid], 1e-15)))
        self.neighbour_weight_ = min(losses, key=losses.get)

    def _blend(self, queries: np.ndarray, weight: float, reference: np.ndarray,
               reference_labels: np.ndarray) -> np.ndarray:
        """``(1 - weight) * softmax(prototype cosines / T) + weight * neighbour votes``."""
        proba = softmax_rows((queries @ self.prototypes_.T).astype(np.float64) / self.temperature_)
        if weight > 0:
            similarities, positions = nearest_neighbours(queries, reference, self.n_neighbors)
            votes = neighbour_votes(similarities, reference_labels[positions], len(self.classes_),
                                    self.neighbour_temperature)
            proba = (1.0 - weight) * proba + weight * votes
        return proba

    def _index32(self) -> np.ndarray:
        return self.index_.astype(np.float32)

    def _train_projection(self, X: np.ndarray, y_index: np.ndarray, valid: tuple[np.ndarray, np.ndarray] | None,
                          epochs: int) -> list:
        """Train a fresh projection for at most ``epochs`` (early stopping on ``valid``); keep its weights."""
        import torch

        from stackcat.models.training import Stage, TrainingLoop, training_callbacks

        seed_everything(self.random_state)
        module = _proxy_space_module(X.shape[1], self.hidden_units, self.dim, len(self.classes_), self.scale,
                                     self.dropout)
        margin_logit = self.scale * self.margin

        def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            margins = torch.nn.functional.one_hot(labels, logits.shape[1]).to(logits.dtype) * margin_logit
            return torch.nn.functional.cross_entropy(logits - margins, labels)

        generator = torch.Generator()
        if self.random_state is None:
            generator.seed()
        else:
            generator.manual_seed(self.random_state)
        train_batches = FeatureMinibatches(X, y_index, self.batch_size, generator)
        valid_batches = None if valid is None else FeatureMinibatches(*valid, 4096, None)
        # the schedule always spans max_epochs, so a refit for fewer epochs sees the same learning rates
        stage = Stage("metric space", self.max_epochs, [{"params": list(module.parameters()),
                                                         "lr": self.learning_rate,
                                                         "weight_decay": self.weight_decay}])
        callbacks = training_callbacks(progress=False, monitored=valid is not None, patience=self.patience)
        loop = TrainingLoop(module, loss_fn, torch.device("cpu"), [*callbacks, stop_after(epochs)])
        history = loop.fit([stage], train_batches, valid_batches)
        linears = [layer for layer in module.layers if isinstance(layer, torch.nn.Linear)]
        self.coefs_ = [layer.weight.detach().numpy().T.copy() for layer in linears]
        self.intercepts_ = [layer.bias.detach().numpy().copy() for layer in linears]
        return history

    def __sklearn_tags__(self):  # noqa: D105
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        return tags


def class_prototypes(vectors: np.ndarray, y_index: np.ndarray, n_classes: int) -> np.ndarray:
    """``(n_classes, dim)`` unit means of the unit ``vectors`` of each class (zero rows: classes without one).

    Examples
    --------
    >>> class_prototypes(np.array([[1.0, 0], [0, 1], [1, 0]]), np.array([0, 0, 1]), 3).astype(float).round(2).tolist()
    [[0.71, 0.71], [1.0, 0.0], [0.0, 0.0]]
    """
    sums = np.zeros((n_classes, vectors.shape[1]), dtype=np.float32)
    np.add.at(sums, y_index, vectors.astype(np.float32))
    return l2_normalized(sums)


def fit_temperature(cosines: np.ndarray, y_index: np.ndarray) -> float:
    """Temperature T minimizing the log loss of ``softmax(cosines / T)`` for the true classes ``y_index``.

    Examples
    --------
    >>> cosines = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.5]])
    >>> 0.0 < fit_temperature(cosines, np.array([0, 1, 1])) < 1.0
    True
    """
    rows = np.arange(len(y_index))
    cosines = cosines.astype(np.float64)

    def loss(log_t: float) -> float:
        logits = cosines / np.exp(log_t)
        logits -= logits.max(axis=1, keepdims=True)
        log_proba = logits[rows, y_index] - np.log(np.exp(logits).sum(axis=1))
        return float(-log_proba.mean())

    result = minimize_scalar(loss, bounds=(np.log(1e-3), np.log(10.0)), method="bounded", options={"xatol": 1e-3})
    return float(np.exp(result.x))


def _proxy_space_module(n_features: int, hidden_units: int, dim: int, n_classes: int, scale: float,
                        dropout: float) -> Any:
    """``features -> scale * cos(unit projection, unit class proxies)``: the logits of the proxy loss."""
    import torch
    from torch import nn

    class ProxySpace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            sizes = [n_features] + ([hidden_units] if hidden_units else []) + [dim]
            layers: list[nn.Module] = []
            for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
                layers += [nn.Linear(n_in, n_out), nn.ReLU()]
            self.layers = nn.Sequential(*layers[:-1])
            self.dropout = nn.Dropout(dropout)
            self.proxies = nn.Parameter(torch.randn(n_classes, dim) / dim ** 0.5)

        def forward(self, features):
            projected = nn.functional.normalize(self.layers(self.dropout(features)), dim=1)
            return scale * projected @ nn.functional.normalize(self.proxies, dim=1).T

    return ProxySpace()
