"""TorchHeadClassifier: a small softmax head (linear or one hidden layer) trained by AdamW on cached features.

The members that read cached vectors (image embeddings, text states, kNN spaces)
need a head that trains in seconds on tens of thousands of rows and hundreds of
classes. An L-BFGS ``LogisticRegression`` takes minutes there (full-batch passes
until convergence); this head takes minibatches with AdamW, stops early on an
inner stratified split and keeps the best epoch's weights.

Only ``fit`` needs torch: the fitted weights are NumPy arrays (``coefs_``,
``intercepts_``, as scikit-learn's ``MLPClassifier``), so a fitted head predicts,
pickles and goes into a model bundle without torch.
"""

from __future__ import annotations

from numbers import Integral, Real
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.model_selection import train_test_split
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.validation import check_is_fitted, validate_data

from stackcat.core import encode_labels, limit_threads
from stackcat.models._base import ProbaClassifierMixin, seed_everything

__all__ = ["FeatureMinibatches", "TorchHeadClassifier", "inner_split", "loss_class_weights", "nonzero_scale",
           "softmax_rows", "stop_after"]


class TorchHeadClassifier(ProbaClassifierMixin, ClassifierMixin, BaseEstimator):
    """Softmax regression (or a one-hidden-layer MLP) on a feature matrix, trained by minibatch AdamW.

    Features are standardized with the training rows' mean and spread, then
    ``(hidden layer ->) linear -> softmax`` is trained with cross-entropy (class
    weights optional). ``validation_fraction`` of the rows (stratified) are held
    out; training stops after ``patience`` epochs without a lower held-out loss,
    and the weights of the best epoch are kept.

    Parameters
    ----------
    hidden_units : int, default=0
        Units of the hidden layer (ReLU); 0 = a linear head.
    learning_rate : float, default=3e-4
        Peak AdamW learning rate (linear decay to 0 over ``max_epochs``). The
        defaults (3e-4, batches of 128) were the best of a small sweep on 7,600
        rows x 1,280 features x 75 classes (experiments/RESULTS.md, "Image head");
        with a few hundred rows there are few steps per epoch: raise it (1e-2).
    weight_decay : float, default=1e-4
        AdamW's decoupled weight decay.
    batch_size : int, default=128
    max_epochs : int, default=100
    patience : int, default=5
        Epochs without a lower held-out loss before training stops.
    validation_fraction : float, default=0.1
        Share of the rows held out (stratified) for early stopping. Classes with
        fewer than 2 rows always stay in training.
    refit : bool, default=True
        After early stopping, train again from scratch on all rows (held-out ones
        included) for the best epoch count, and keep those weights.
    class_weight : dict, "balanced" or None, default=None
        Weights of the classes in the training loss (as in scikit-learn).
    random_state : int or None, default=0
        Seed of the split, the initialization and the batch order.
    n_threads : int or None, default=None
        Torch / BLAS threads while fitting and predicting; -1 = all cores.

    Attributes
    ----------
    classes_ : ndarray
        The labels, sorted; columns of ``predict_proba`` follow this order.
    n_features_in_ : int
    mean_, scale_ : ndarray of shape (n_features,)
        The standardization learned on the training rows.
    coefs_, intercepts_ : list of ndarray
        Weights ``(n_in, n_out)`` and biases of each layer, input first.
    n_epochs_ : int
        Epochs run (early stopping included).
    best_epoch_ : int
        The epoch whose weights were kept (1-based).
    best_valid_loss_ : float or None
        Its held-out cross-entropy (None without a held-out split).

    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> X, y = load_iris(return_X_y=True)
    >>> head = TorchHeadClassifier(learning_rate=0.05, batch_size=32, max_epochs=50).fit(X, y)  # 150 rows
    >>> head.predict_proba(X[:2]).shape, bool(head.score(X, y) > 0.9)
    ((2, 3), True)
    """

    _runtime_params = ("n_threads",)

    _parameter_constraints: dict = {
        "hidden_units": [Interval(Integral, 0, None, closed="left")],
        "learning_rate": [Interval(Real, 0, None, closed="neither")],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "max_epochs": [Interval(Integral, 1, None, closed="left")],
        "patience": [Interval(Integral, 1, None, closed="left")],
        "validation_fraction": [Interval(Real, 0, 1, closed="left")],
        "refit": ["boolean"],
        "class_weight": [dict, StrOptions({"balanced"}), None],
        "random_state": [Interval(Integral, 0, None, closed="left"), None],
        "n_threads": [Integral, None],
    }

    def __init__(
        self,
        hidden_units: int = 0,
        learning_rate: float = 3e-4,
        weight_decay: float = 1e-4,
        batch_size: int = 128,
        max_epochs: int = 100,
        patience: int = 5,
        validation_fraction: float = 0.1,
        refit: bool = True,
        class_weight: dict | str | None = None,
        random_state: int | None = 0,
        n_threads: int | None = None,
    ) -> None:
        self.hidden_units = hidden_units
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.refit = refit
        self.class_weight = class_weight
        self.random_state = random_state
        self.n_threads = n_threads

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any) -> TorchHeadClassifier:
        """Standardize ``X`` (n_samples, n_features), then train the head with early stopping."""
        X = validate_data(self, X, dtype=np.float32, ensure_min_samples=2)
        self.classes_, y_index = encode_labels(y, len(X))
        if len(self.classes_) < 2:
            raise ValueError(f"y holds a single class ({self.classes_[0]!r}); a classifier needs at least 2")
        self.mean_ = X.mean(axis=0)
        self.scale_ = nonzero_scale(X.std(axis=0))
        standardized = (X - self.mean_) / self.scale_
        train, valid = self._inner_split(y_index)
        with limit_threads(self.n_threads):
            self._train(standardized, y_index, train, valid)
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """Probabilities ``(n_samples, n_classes)`` in ``classes_`` order; rows sum to 1."""
        check_is_fitted(self, "coefs_")
        X = validate_data(self, X, dtype=np.float32, reset=False)
        with limit_threads(self.n_threads):
            logits = self._logits((X - self.mean_) / self.scale_)
        return softmax_rows(logits)

    def _logits(self, hidden: np.ndarray) -> np.ndarray:
        for layer, (weights, bias) in enumerate(zip(self.coefs_, self.intercepts_, strict=True)):
            hidden = hidden @ weights + bias
            if layer < len(self.coefs_) - 1:
                hidden = np.maximum(hidden, 0.0)
        return hidden.astype(np.float64)

    def _inner_split(self, y_index: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return inner_split(y_index, self.validation_fraction, self.random_state)

    def _loss_weights(self, y_index: np.ndarray) -> np.ndarray | None:
        return loss_class_weights(self.class_weight, self.classes_, y_index)

    def _train(self, X: np.ndarray, y_index: np.ndarray, train: np.ndarray, valid: np.ndarray | None) -> None:
        history = self._train_module(X[train], y_index[train], None if valid is None else (X[valid], y_index[valid]),
                                     epochs=self.max_epochs)
        self.n_epochs_ = len(history)
        best = min(history, key=lambda log: log.valid_loss) if valid is not None else history[-1]
        self.best_epoch_, self.best_valid_loss_ = best.epoch, best.valid_loss
        if self.refit and valid is not None:
            self._train_module(X, y_index, None, epochs=self.best_epoch_)

    def _train_module(self, X: np.ndarray, y_index: np.ndarray, valid: tuple[np.ndarray, np.ndarray] | None,
                      epochs: int) -> list:
        """Train a fresh module on ``X`` for at most ``epochs`` (early stopping on ``valid``); keep its weights."""
        import torch

        from stackcat.models.training import Stage, TrainingLoop, training_callbacks

        seed_everything(self.random_state)
        module = _head_module(X.shape[1], self.hidden_units, len(self.classes_))
        weights = self._loss_weights(y_index)
        loss_weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float32)

        def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(logits, labels, weight=loss_weights)

        generator = torch.Generator()
        if self.random_state is None:
            generator.seed()  # a fresh, non-deterministic seed
        else:
            generator.manual_seed(self.random_state)
        train_batches = FeatureMinibatches(X, y_index, self.batch_size, generator)
        valid_batches = None if valid is None else FeatureMinibatches(*valid, 4096, None)
        # the schedule always spans max_epochs, so a refit for fewer epochs sees the same learning rates
        stage = Stage("head", self.max_epochs, [{"params": list(module.parameters()), "lr": self.learning_rate,
                                                  "weight_decay": self.weight_decay}])
        callbacks = training_callbacks(progress=False, monitored=valid is not None, patience=self.patience)
        loop = TrainingLoop(module, loss_fn, torch.device("cpu"), [*callbacks, stop_after(epochs)])
        history = loop.fit([stage], train_batches, valid_batches)
        linears = [layer for layer in module.layers if isinstance(layer, torch.nn.Linear)]
        self.coefs_ = [layer.weight.detach().numpy().T.copy() for layer in linears]
        self.intercepts_ = [layer.bias.detach().numpy().copy() for layer in linears]
        return history


def loss_class_weights(class_weight: dict | str | None, classes: np.ndarray,
                       y_index: np.ndarray) -> np.ndarray | None:
    """One loss weight per class (as scikit-learn's ``class_weight``: a dict keyed by label, or
    ``"balanced"``), for labels encoded as positions in ``classes``; None without class weights.

    Examples
    --------
    >>> loss_class_weights("balanced", np.array(["a", "b"]), np.array([0, 0, 0, 1])).tolist()
    [0.6666666666666666, 2.0]
    """
    if class_weight is None:
        return None
    if isinstance(class_weight, dict):  # keyed by label: to class positions
        class_weight = {i: class_weight.get(label, 1.0) for i, label in enumerate(classes)}
    present = np.unique(y_index)
    weights = np.ones(len(classes))
    weights[present] = compute_class_weight(class_weight, classes=present, y=y_index)
    return weights


def inner_split(y_index: np.ndarray, validation_fraction: float,
                random_state: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """``(train rows, held-out rows)``: a stratified split for early stopping, or ``(all rows, None)``.

    Classes with fewer than 2 rows always stay in training; when the held-out share
    cannot hold one row per class (or would take every row), nothing is held out.

    Examples
    --------
    >>> train, valid = inner_split(np.array([0, 0, 0, 0, 1, 1, 1, 1, 2]), 0.5, random_state=0)
    >>> len(train), np.array([0, 0, 0, 0, 1, 1, 1, 1, 2])[valid].tolist()
    (5, [0, 0, 1, 1])
    """
    rows = np.arange(len(y_index))
    counts = np.bincount(y_index)
    splittable = counts[y_index] >= 2
    n_valid = int(round(validation_fraction * splittable.sum()))
    if n_valid < len(np.unique(y_index[splittable])) or n_valid >= splittable.sum():
        return rows, None  # too few rows to hold a stratified split out: train on all, all epochs
    train, valid = train_test_split(rows[splittable], test_size=n_valid, stratify=y_index[splittable],
                                    random_state=random_state)
    return np.sort(np.concatenate([train, rows[~splittable]])), np.sort(valid)


class FeatureMinibatches:
    """Re-iterable minibatches of a feature matrix, reshuffled each pass when a generator is given."""

    def __init__(self, X: np.ndarray, y: np.ndarray, batch_size: int, generator: Any) -> None:
        import torch

        self.X, self.y = torch.from_numpy(np.ascontiguousarray(X)), torch.from_numpy(y.astype(np.int64))
        self.batch_size, self.generator = batch_size, generator

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __iter__(self):
        import torch

        order = (torch.randperm(len(self.y), generator=self.generator) if self.generator is not None
                 else torch.arange(len(self.y)))
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            yield {"features": self.X[rows], "labels": self.y[rows]}


def stop_after(epochs: int) -> Any:
    """A training callback that ends the stage after ``epochs`` epochs."""
    from stackcat.models.training import Callback

    class StopAfter(Callback):
        def on_epoch_end(self, loop, log) -> None:
            loop.stop_stage = loop.stop_stage or log.epoch >= epochs

    return StopAfter()


def _head_module(n_features: int, hidden_units: int, n_classes: int) -> Any:
    from torch import nn

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            sizes = [n_features] + ([hidden_units] if hidden_units else []) + [n_classes]
            layers: list[nn.Module] = []
            for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
                layers += [nn.Linear(n_in, n_out), nn.ReLU()]
            self.layers = nn.Sequential(*layers[:-1])

        def forward(self, features):
            return self.layers(features)

    return Head()


def nonzero_scale(scale: np.ndarray) -> np.ndarray:
    """Standard deviations usable as divisors: ~0 becomes 1 (a constant feature stays 0 once centred)."""
    return np.where(scale > 1e-12, scale, 1.0).astype(np.float32)


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of a ``(n, k)`` logit matrix, shifted by each row's maximum for stability."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
