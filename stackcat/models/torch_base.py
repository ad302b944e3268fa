"""TorchClassifier: the skeleton that every stackcat torch text estimator shares (in the spirit of skorch).

:class:`TorchClassifier` owns ``fit(X, y, eval_set=None)``, ``predict_proba``, the
eval-set labels, seeding, threads, the training loop, ``save`` / ``load`` and
pickling. A subclass supplies its torch module (``_build_module``), its training
stages (``_stages``), its per-row inputs besides the text (``_row_arrays``) and
its params. How the text reaches the module is an **input strategy**, chosen from
``freeze_encoder``:

- :class:`TokenInputs`: the encoder is inside the module and fine-tuned; texts
  become token ids, padded per batch.
- :class:`CachedStateInputs`: the encoder stays frozen and never runs in
  training; each text's token states are computed once and cached
  (:mod:`stackcat.features.text_states`), and batches hold those states (or their
  mean, ``pooled=True``).
- :class:`CachedLayerInputs`: the encoder stays frozen below its top ``k``
  layers, whose input states are computed once and cached the same way; copies
  of the top ``k`` layers train inside the module (a subclass's
  ``_top_layers_to_tune``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.utils._param_validation import Interval, Options
from sklearn.utils.validation import check_is_fitted
from torch import nn

from stackcat.core import encode_labels, label_positions, limit_threads, resolve_device
from stackcat.features.hub import load_text_encoder, tokenize, transformer_layers, usable_max_length
from stackcat.features.text_states import (
    check_text_model,
    mean_pooled,
    text_model_identity,
    token_states,
)
from stackcat.models import training
from stackcat.models._base import ProbaClassifierMixin, seed_everything
from stackcat.models.batching import (
    ArrayCollator,
    Collator,
    LengthBucketBatchSampler,
    SortedBatchSampler,
    StateCollator,
    batch_loader,
)
from stackcat.models.persistence import (
    SavableTorchMixin,
    load_non_encoder_state,
    load_saved_encoder,
    non_encoder_state,
    save_text_module,
)
from stackcat.progress import progress_bar

__all__ = ["CachedLayerInputs", "CachedStateInputs", "TextInputs", "TokenInputs", "TorchClassifier"]

# Fitted attributes that describe the text inputs: a refit forgets them (it may switch strategy).
_TEXT_ATTRIBUTES = ("tokenizer_", "text_model_identity_", "max_length_", "hidden_size_", "tuned_layers_")


class TextInputs:
    """How a torch estimator turns texts into module inputs (an input strategy).

    ``fit_rows`` prepares the training (and eval) rows and seeds at the point that
    keeps the module's initialization independent of caches; ``rows`` prepares
    rows at predict time; ``collator`` batches rows; ``save`` / ``load`` write and
    read the strategy's part of the weights. ``fitted`` holds the fitted
    attributes the strategy gives its estimator (e.g. ``tokenizer_``).

    Examples
    --------
    >>> inputs = estimator._text_inputs(fitting=False)  # doctest: +SKIP
    >>> rows = inputs.rows(["red cotton shirt"])  # doctest: +SKIP
    >>> collate = inputs.collator(rows, arrays={}, labels=None, with_rows=True)  # doctest: +SKIP
    """

    torch_attributes: tuple[str, ...] = ("module_",)

    def __init__(self) -> None:
        self.fitted: dict[str, Any] = {}

    def fit_rows(self, texts: list[str], eval_texts: list[str] | None,
                 seed: Callable[[], None]) -> tuple[Any, Any, nn.Module | None]:
        """``(rows, eval_rows or None, encoder or None)`` for training; calls ``seed`` once."""
        raise NotImplementedError

    def rows(self, texts: list[str]) -> Any:
        """The rows of ``texts`` for a fitted model."""
        raise NotImplementedError

    def lengths(self, rows: Any) -> list[int] | np.ndarray:
        """Each row's length, for length-bucketed batches."""
        return [len(row) for row in rows]

    def collator(self, rows: Any, *, arrays: dict[str, np.ndarray], labels: np.ndarray | None,
                 with_rows: bool) -> ArrayCollator:
        raise NotImplementedError

    def save(self, folder: Path, module: nn.Module) -> None:
        raise NotImplementedError

    def load(self, folder: Path) -> nn.Module | None:
        """The encoder saved in ``folder`` (None: the module has none)."""
        raise NotImplementedError

    def module_threads(self, n_threads: int | None) -> int | None:
        """Torch threads while the module trains and predicts (None: as around it)."""
        return None

    def warm(self, texts: list[str]) -> None:
        """Fill the strategy's cache with ``texts`` (nothing to do without one)."""


class TokenInputs(TextInputs):
    """A fine-tuned encoder inside the module: texts -> token ids, padded per batch.

    Parameters
    ----------
    model_name : str or path-like
        The checkpoint loaded at fit time.
    max_length : int
        Tokens kept per text (capped by the model at fit time).
    tokenizer, fitted_max_length : optional
        A fitted model's tokenizer and token limit.

    Examples
    --------
    >>> inputs = TokenInputs("/models/rubert-tiny2", 128)  # doctest: +SKIP
    >>> rows, _, encoder = inputs.fit_rows(["a text"], None, seed=lambda: None)  # doctest: +SKIP
    """

    torch_attributes = ("module_", "tokenizer_")

    def __init__(self, model_name: str | os.PathLike, max_length: int, *, tokenizer: Any = None,
                 fitted_max_length: int | None = None):
        super().__init__()
        self.model_name = model_name
        self.max_length = max_length
        if tokenizer is not None:
            self.fitted = {"tokenizer_": tokenizer, "max_length_": fitted_max_length}

    def fit_rows(self, texts: list[str], eval_texts: list[str] | None,
                 seed: Callable[[], None]) -> tuple[Any, Any, nn.Module | None]:
        seed()
        encoder, tokenizer = load_text_encoder(self.model_name)
        self.fitted = {"tokenizer_": tokenizer,
                       "max_length_": usable_max_length(self.max_length, tokenizer, encoder)}
        return self.rows(texts), (None if eval_texts is None else self.rows(eval_texts)), encoder

    def rows(self, texts: list[str]) -> list[list[int]]:
        return tokenize(self.fitted["tokenizer_"], texts, self.fitted["max_length_"])

    def collator(self, rows: Any, *, arrays: dict[str, np.ndarray], labels: np.ndarray | None,
                 with_rows: bool) -> ArrayCollator:
        pad_id = self.fitted["tokenizer_"].pad_token_id
        return Collator(rows, pad_id if pad_id is not None else 0, arrays=arrays, labels=labels,
                        with_rows=with_rows)

    def save(self, folder: Path, module: nn.Module) -> None:
        save_text_module(folder, module, self.fitted["tokenizer_"])

    def load(self, folder: Path) -> nn.Module:
        encoder, tokenizer = load_saved_encoder(folder)
        self.fitted["tokenizer_"] = tokenizer
        return encoder


class CachedStateInputs(TextInputs):
    """A frozen encoder: its token states, computed once per distinct text and cached.

    The model holds no encoder: it records the checkpoint's content hash
    (``text_model_identity_``), loads the encoder again only for texts that are
    not cached, and refuses a changed checkpoint at predict time. Its module
    trains on 1 thread unless ``n_threads`` says otherwise: without the encoder its
    matrix products are small, and more threads lose time on a busy CPU (5 folds
    of a frozen FusionClassifier on the demo: 9 s on 1 thread, 52 s on 2).

    Parameters
    ----------
    model_name, max_length : the frozen encoder and its token limit
    cache_dir : str, path-like or None
        The token-state cache folder (None: this process's memory).
    device, batch_size, progress : how the encoder runs (``batch_size`` texts per pass)
    pooled : bool
        Rows are the mean of each text's states (``(n, H)`` ``features``) instead
        of the states themselves (``text_states``, padded per batch).
    identity : str, optional
        A fitted model's checkpoint hash.

    Examples
    --------
    >>> inputs = CachedStateInputs("/models/e5-small", 128, None, "cpu", 64, False,
    ...                            pooled=True)  # doctest: +SKIP
    >>> features, _, _ = inputs.fit_rows(["a text"], None, seed=lambda: None)  # doctest: +SKIP
    """

    def __init__(self, model_name: str | os.PathLike, max_length: int, cache_dir: str | os.PathLike | None,
                 device: str, batch_size: int, progress: bool, *, pooled: bool,
                 identity: str | None = None):
        super().__init__()
        self.model_name = model_name
        self.max_length = int(max_length)
        self.cache_dir = cache_dir
        self.device = device
        self.batch_size = batch_size
        self.progress = progress
        self.pooled = pooled
        self.identity = identity

    def fit_rows(self, texts: list[str], eval_texts: list[str] | None,
                 seed: Callable[[], None]) -> tuple[Any, Any, nn.Module | None]:
        self.identity = text_model_identity(self.model_name)
        self.fitted = {"text_model_identity_": self.identity, "max_length_": self.max_length}
        states = self._states(texts)
        if states:
            self.fitted["hidden_size_"] = int(states[0].shape[1])
        eval_rows = None if eval_texts is None else self._as_rows(self._states(eval_texts))
        seed()  # after the states: the module starts the same whether or not they were cached
        return self._as_rows(states), eval_rows, None

    def rows(self, texts: list[str]) -> Any:
        check_text_model(self.model_name, self.identity)
        return self._as_rows(self._states(texts))

    def _states(self, texts: list[str]) -> list[np.ndarray]:
        return token_states(texts, self.model_name, self.max_length, cache_dir=self.cache_dir,
                            device=self.device, batch_size=self.batch_size, progress=self.progress)

    def _as_rows(self, states: list[np.ndarray]) -> Any:
        return mean_pooled(states) if self.pooled else states

    def lengths(self, rows: Any) -> list[int] | np.ndarray:
        return np.zeros(len(rows), dtype=np.int64) if self.pooled else super().lengths(rows)

    def collator(self, rows: Any, *, arrays: dict[str, np.ndarray], labels: np.ndarray | None,
                 with_rows: bool) -> ArrayCollator:
        if self.pooled:
            return ArrayCollator(arrays={"features": rows, **arrays}, labels=labels, with_rows=with_rows)
        return StateCollator(rows, arrays=arrays, labels=labels, with_rows=with_rows)

    def save(self, folder: Path, module: nn.Module) -> None:
        torch.save(non_encoder_state(module), folder / "head.pt")

    def load(self, folder: Path) -> None:
        return None

    def module_threads(self, n_threads: int | None) -> int | None:
        return n_threads or 1

    def warm(self, texts: list[str]) -> None:
        if self.cache_dir is not None:
            self._states(texts)


class CachedLayerInputs(CachedStateInputs):
    """A frozen encoder below its top ``k`` layers: the states that enter them, cached.

    Rows are those states (``text_states`` + ``attention_mask``, padded per batch,
    keyed apart from the last hidden states by ``k``); the module holds copies of
    the top ``k`` layers, taken from the pretrained encoder that ``fit_rows`` and
    ``load`` return (the saved weights then replace them). The top layers'
    matrix products are those of a real encoder: the module threads are left as
    they are (``n_threads``).

    Parameters
    ----------
    model_name, max_length, cache_dir, device, batch_size, progress, identity :
        as :class:`CachedStateInputs`
    top_layers : int
        ``k``, the number of top transformer layers that train (at least 1).

    Examples
    --------
    >>> inputs = CachedLayerInputs("/models/e5-small", 128, None, "cpu", 64, False,
    ...                            top_layers=1)  # doctest: +SKIP
    >>> states, _, encoder = inputs.fit_rows(["a text"], None, seed=lambda: None)  # doctest: +SKIP
    """

    def __init__(self, model_name: str | os.PathLike, max_length: int, cache_dir: str | os.PathLike | None,
                 device: str, batch_size: int, progress: bool, *, top_layers: int,
                 identity: str | None = None):
        super().__init__(model_name, max_length, cache_dir, device, batch_size, progress, pooled=False,
                         identity=identity)
        self.top_layers = int(top_layers)

    def fit_rows(self, texts: list[str], eval_texts: list[str] | None,
                 seed: Callable[[], None]) -> tuple[Any, Any, nn.Module | None]:
        encoder, _ = load_text_encoder(self.model_name)
        n_layers = len(transformer_layers(encoder))
        if self.top_layers > n_layers:  # before any text is encoded
            raise ValueError(f"tune_top_layers={self.top_layers}, but {str(self.model_name)!r} has "
                             f"{n_layers} transformer layers")
        rows, eval_rows, _ = super().fit_rows(texts, eval_texts, seed)
        self.fitted["tuned_layers_"] = self.top_layers
        return rows, eval_rows, encoder

    def _states(self, texts: list[str]) -> list[np.ndarray]:
        return token_states(texts, self.model_name, self.max_length, cache_dir=self.cache_dir,
                            device=self.device, batch_size=self.batch_size, progress=self.progress,
                            below_top_layers=self.top_layers)

    def load(self, folder: Path) -> nn.Module:
        check_text_model(self.model_name, self.identity)
        encoder, _ = load_text_encoder(self.model_name)
        return encoder

    def module_threads(self, n_threads: int | None) -> int | None:
        return None  # the estimator's own limit_threads(n_threads) holds around fit and predict


class TorchClassifier(SavableTorchMixin, ProbaClassifierMixin, ClassifierMixin, BaseEstimator):
    """Base of the torch text classifiers: fit, predict_proba, eval set, saving, threads, seeding.

    A subclass holds its params (``__init__``), and implements:

    - ``_texts(X) -> list[str]``: the texts of X;
    - ``_build_module(encoder) -> nn.Module``: the module, around ``encoder``
      (None with cached states: ``hidden_size_`` gives their width);
    - ``_stages() -> list[Stage]``: the training stages of ``module_``;
    - ``_row_arrays(X, n_rows) -> dict``: per-row inputs besides the text
      (default none);

    It reads the params ``model_name``, ``max_length``, ``batch_size``,
    ``encode_batch_size``, ``text_cache_dir``, ``n_threads``, ``label_smoothing``,
    ``early_stopping_patience``, ``device``, ``random_state`` and ``progress``.

    Examples
    --------
    >>> class Tiny(TorchClassifier):  # doctest: +SKIP
    ...     def _build_module(self, encoder): ...
    ...     def _stages(self): ...
    """

    _pooled_states = False  # with a frozen encoder: train on the mean of the token states

    # the params every torch member has; a subclass adds its own: {**TorchClassifier._parameter_constraints, ...}
    _parameter_constraints: dict = {
        "model_name": [str, os.PathLike],
        "text_column": [str],
        "max_length": [Interval(Integral, 2, None, closed="left")],
        "text_prefix": [str],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "warmup_ratio": [Interval(Real, 0, 1, closed="both")],
        "label_smoothing": [Interval(Real, 0, 1, closed="left")],
        "dropout": [Interval(Real, 0, 1, closed="left")],
        "freeze_encoder": ["boolean"],
        "freeze_embeddings": ["boolean"],
        "early_stopping_patience": [Interval(Integral, 1, None, closed="left"), None],
        "encode_batch_size": [Interval(Integral, 1, None, closed="left")],
        "text_cache_dir": [str, os.PathLike, None],
        "device": [str],
        "n_threads": [Interval(Integral, 1, None, closed="left"), Options(Integral, {-1}), None],
        "random_state": [Interval(Integral, 0, None, closed="left"), None],
        "progress": ["boolean"],
    }

    # ---------------------------------------------------------------- hooks

    def _texts(self, X: Any) -> list[str]:
        raise NotImplementedError

    def _build_module(self, encoder: nn.Module | None) -> nn.Module:
        raise NotImplementedError

    def _stages(self) -> list[training.Stage]:
        raise NotImplementedError

    def _row_arrays(self, X: Any, n_rows: int) -> dict[str, np.ndarray]:
        return {}

    def _fit_row_arrays(self, X: Any, n_rows: int) -> dict[str, np.ndarray]:
        """The training rows' arrays (a subclass may record fitted attributes about them here)."""
        return self._row_arrays(X, n_rows)

    def _check_params(self) -> None:
        """Checks across params, before fitting."""

    def _top_layers_to_tune(self) -> int:
        """With a frozen encoder: how many of its top layers train on cached states (0: none)."""
        return 0


    # ---------------------------------------------------------------- the input strategy

    def _fitted_on_cached_text(self) -> bool:
        return getattr(self, "text_model_identity_", None) is not None

    def _text_inputs(self, *, fitting: bool) -> TextInputs:
        """The input strategy: from ``freeze_encoder`` when fitting, else from what the fit recorded."""
        cached = self.freeze_encoder if fitting else self._fitted_on_cached_text()
        top_layers = self._top_layers_to_tune() if fitting else getattr(self, "tuned_layers_", 0)
        if cached and top_layers:
            return CachedLayerInputs(self.model_name, self.max_length, self.text_cache_dir, self.device,
                                     self.encode_batch_size, self.progress, top_layers=top_layers,
                                     identity=getattr(self, "text_model_identity_", None))
        if cached:
            return CachedStateInputs(self.model_name, self.max_length, self.text_cache_dir, self.device,
                                     self.encode_batch_size, self.progress, pooled=self._pooled_states,
                                     identity=getattr(self, "text_model_identity_", None))
        return TokenInputs(self.model_name, self.max_length, tokenizer=getattr(self, "tokenizer_", None),
                           fitted_max_length=getattr(self, "max_length_", None))

    @property
    def _torch_attributes(self) -> tuple[str, ...]:
        return (CachedStateInputs if self._fitted_on_cached_text() else TokenInputs).torch_attributes

    # ---------------------------------------------------------------- fit and predict

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any, eval_set: tuple[Any, Any] | None = None) -> TorchClassifier:
        """Train on ``X`` and labels ``y``; ``eval_set=(X_val, y_val)`` is scored after every epoch.

        With an eval set, the best epoch's weights are kept and a stage ends early
        per ``early_stopping_patience``; its labels must all occur in ``y``.
        """
        self._check_params()
        texts = self._texts(X)
        self.classes_, y_index = encode_labels(y, len(texts))
        for name in _TEXT_ATTRIBUTES:  # from an earlier fit, which may have used the other strategy
            self.__dict__.pop(name, None)
        inputs = self._text_inputs(fitting=True)
        n_threads = self.n_threads
        with limit_threads(n_threads):
            train, valid = self._training_batches(inputs, X, texts, y_index, eval_set)
            loop = training.TrainingLoop(
                self.module_, nn.CrossEntropyLoss(label_smoothing=self.label_smoothing),
                resolve_device(self.device),
                training.training_callbacks(self.progress, valid is not None, self.early_stopping_patience))
            with limit_threads(inputs.module_threads(n_threads)):
                loop.fit(self._stages(), train, valid)
        self.history_, self.best_epoch_ = training.history_records(loop)
        return self

    def _training_batches(self, inputs: TextInputs, X: Any, texts: list[str], y_index: np.ndarray,
                          eval_set: tuple[Any, Any] | None) -> tuple[Any, Any]:
        """Build ``module_`` (seeded) and return the ``(train, valid or None)`` loaders."""
        arrays = self._fit_row_arrays(X, len(texts))
        eval_texts = eval_labels = None
        if eval_set is not None:
            eval_texts = self._texts(eval_set[0])
            eval_labels = self._eval_labels(eval_set[1], len(eval_texts))
        rows, eval_rows, encoder = inputs.fit_rows(texts, eval_texts, seed=lambda: seed_everything(self.random_state))
        vars(self).update(inputs.fitted)
        self.module_ = self._build_module(encoder)
        train = self._loader(inputs, rows, arrays, y_index, shuffle=True)
        if eval_set is None:
            return train, None
        eval_arrays = self._row_arrays(eval_set[0], len(eval_texts))
        return train, self._loader(inputs, eval_rows, eval_arrays, eval_labels, shuffle=False)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Probabilities ``(n_samples, n_classes)`` in ``classes_`` order; rows sum to 1."""
        check_is_fitted(self, "module_")
        texts = self._texts(X)
        inputs = self._text_inputs(fitting=False)
        n_threads = self.n_threads
        with limit_threads(n_threads):
            rows = inputs.rows(texts)
            loader = self._loader(inputs, rows, self._row_arrays(X, len(texts)), None, shuffle=False,
                                  with_rows=True)
            batches = progress_bar(loader, desc="predict", unit="batch", enabled=self.progress)
            with limit_threads(inputs.module_threads(n_threads)):
                return training.predict_probabilities(self.module_, batches, len(texts), len(self.classes_),
                                                      resolve_device(self.device))

    def warm_cache(self, X: Any) -> None:
        """With a frozen encoder and a ``text_cache_dir``: encode every text of ``X`` once, now.

        The stacking engine calls this in the main process before fold jobs run
        in parallel, so that they read the cache instead of each encoding the
        same texts. Does nothing for a model that fine-tunes its encoder.
        """
        if self.freeze_encoder:
            self._text_inputs(fitting=True).warm(self._texts(X))

    def _loader(self, inputs: TextInputs, rows: Any, arrays: dict[str, np.ndarray], labels: np.ndarray | None,
                *, shuffle: bool, with_rows: bool = False) -> Any:
        """Training batches (shuffled, of rows of similar length) or prediction batches (sorted)."""
        lengths = inputs.lengths(rows)
        sampler = (LengthBucketBatchSampler(lengths, self.batch_size, seed=self.random_state) if shuffle
                   else SortedBatchSampler(lengths, self.encode_batch_size))
        return batch_loader(len(lengths), sampler,
                            inputs.collator(rows, arrays=arrays, labels=labels, with_rows=with_rows))

    def _eval_labels(self, y: Any, n_samples: int) -> np.ndarray:
        labels = y.to_numpy(dtype=object) if hasattr(y, "to_numpy") else np.asarray(y, dtype=object)
        if len(labels) != n_samples:
            raise ValueError(f"eval_set: X has {n_samples} rows but y has {len(labels)}")
        return label_positions(self.classes_, labels, what="eval_set")

    # ---------------------------------------------------------------- saving and pickling

    def _save_weights(self, folder: Path) -> None:
        self._text_inputs(fitting=False).save(folder, self.module_)

    def _load_weights(self, folder: Path) -> None:
        inputs = self._text_inputs(fitting=False)
        encoder = inputs.load(folder)
        vars(self).update(inputs.fitted)
        self.module_ = self._build_module(encoder)
        load_non_encoder_state(self.module_, folder)

    def __sklearn_tags__(self):  # noqa: D105
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        tags.non_deterministic = self.random_state is None
        return tags
