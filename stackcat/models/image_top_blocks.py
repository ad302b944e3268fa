"""Tuning the top blocks of an EfficientNet-Lite image encoder on cached feature maps.

The maps that enter the last ``k`` MBConv blocks are computed once per photo and
per mirror image (:class:`stackcat.features.image_encoders.EfficientNetLiteBlockInputs`,
cached like any embedding); :class:`TopBlocksClassifier` holds copies of those
``k`` blocks, the encoder's head convolution, its batch norm and activation, the
global average pooling and a linear classifier, and trains on them. Each epoch
sees every training photo once, as itself or mirrored (a coin flip per photo):
flip augmentation at no extra encoding.

Batch norm keeps the encoder's statistics (the tuned layers' BatchNorm modules stay
in eval mode, their scale and shift train): minibatches of a few dozen photos of a
few classes would give noisy statistics, and it keeps the untrained module exactly
the frozen encoder. :func:`fit_top_blocks` is the training (the project's
:class:`~stackcat.models.training.TrainingLoop`: a head-only epoch, then blocks and
head, early stopping on an inner stratified split, the best epoch's weights kept).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from stackcat.features.image_encoders import efficientnet_lite_architecture
from stackcat.models._base import seed_everything
from stackcat.models.heads import inner_split
from stackcat.models.training import (
    Stage,
    TrainingLoop,
    history_records,
    predict_probabilities,
    training_callbacks,
)

__all__ = ["TopBlocksClassifier", "TopBlocksTraining", "build_module", "fit_top_blocks", "predict_top_blocks"]

# Share of the training photos held out for early stopping.
VALIDATION_FRACTION = 0.1
# Dropout before the classifier: EfficientNet-Lite's own in its ImageNet training.
DROPOUT = 0.2


class TopBlocksClassifier(nn.Module):
    """The last ``n_blocks`` MBConv blocks of an EfficientNet-Lite -> head conv -> BN -> ReLU6 -> mean -> linear.

    Runs on the flattened maps entering those blocks (``features``, shape ``(n,
    channels * height * width)``). With the encoder's weights and nothing trained,
    :meth:`pooled` equals the encoder's embedding (the ImageNet classifier's input).

    Parameters
    ----------
    model : efficientnet_lite_pytorch.EfficientNet
        The encoder's network; its last ``n_blocks`` blocks, ``_conv_head`` and ``_bn1``
        are copied (the module does not keep ``model``).
    n_blocks : int
    map_shape : tuple of int
        ``(channels, height, width)`` of the input maps.
    n_classes : int
    dropout : float, default=DROPOUT
        Dropout before the linear classifier.

    Examples
    --------
    >>> from efficientnet_lite_pytorch import EfficientNet
    >>> module = TopBlocksClassifier(EfficientNet.from_name("efficientnet-lite0"), 1, (192, 7, 7), n_classes=3)
    >>> module(torch.zeros(2, 192 * 7 * 7)).shape
    torch.Size([2, 3])
    """

    def __init__(self, model: nn.Module, n_blocks: int, map_shape: tuple[int, int, int], n_classes: int,
                 dropout: float = DROPOUT) -> None:
        super().__init__()
        n_total = len(model._blocks)
        self.map_shape = tuple(int(v) for v in map_shape)
        self.blocks = copy.deepcopy(model._blocks[n_total - n_blocks:])
        # stochastic depth of these blocks in training, as in the encoder's ImageNet training
        rate = model._global_params.drop_connect_rate or 0.0
        self.drop_connect_rates = [rate * (n_total - n_blocks + i) / n_total for i in range(n_blocks)]
        self.conv_head = copy.deepcopy(model._conv_head)
        self.bn = copy.deepcopy(model._bn1)
        self.activation = copy.deepcopy(model._swish)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.bn.num_features, n_classes)
        self.to(memory_format=torch.channels_last)

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        """The 1280-d pooled features (the frozen encoder's embedding when nothing was trained)."""
        x = features.reshape(-1, *self.map_shape).contiguous(memory_format=torch.channels_last)
        for block, rate in zip(self.blocks, self.drop_connect_rates, strict=True):
            x = block(x, drop_connect_rate=rate)
        return self.activation(self.bn(self.conv_head(x))).mean(dim=(2, 3))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.pooled(features)))

    def train(self, mode: bool = True) -> TopBlocksClassifier:
        """Dropout and drop connect follow ``mode``; batch norm always uses the encoder's statistics."""
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self


def build_module(variant: str, n_blocks: int, map_shape: tuple[int, int, int], n_classes: int,
                 state: dict[str, np.ndarray] | None = None) -> TopBlocksClassifier:
    """A :class:`TopBlocksClassifier` of ``variant``'s architecture, with ``state`` (NumPy weights) loaded.

    Examples
    --------
    >>> build_module("efficientnet-lite0", 1, (192, 7, 7), n_classes=3).classifier.out_features
    3
    """
    module = TopBlocksClassifier(efficientnet_lite_architecture(variant), n_blocks, map_shape, n_classes)
    if state is not None:
        module.load_state_dict({name: torch.from_numpy(np.asarray(value)) for name, value in state.items()})
    return module


@dataclass
class TopBlocksTraining:
    """How :func:`fit_top_blocks` trains: epochs in all (the first ``head_epochs`` train the classifier only),
    peak learning rates of the blocks (with head conv and BN) and of the classifier, batch size, patience."""

    epochs: int = 8
    head_epochs: int = 1
    lr: float = 3e-4
    head_lr: float = 3e-3
    batch_size: int = 64
    weight_decay: float = 1e-4
    warmup_ratio: float = 0.1
    patience: int | None = 2
    progress: bool = False


def fit_top_blocks(module: TopBlocksClassifier, plain: np.ndarray, mirrored: np.ndarray, y_index: np.ndarray,
                   training: TopBlocksTraining, class_weight: np.ndarray | None,
                   random_state: int | None) -> tuple[list[dict], dict | None]:
    """Train ``module`` on the maps of the photos (``plain``) and of their mirror images; returns its history.

    ``VALIDATION_FRACTION`` of the photos (stratified, plain maps) are held out for early
    stopping; the module ends with the weights of the epoch with the lowest held-out loss.
    Returns ``(history, best_epoch)`` as :func:`stackcat.models.training.history_records`.

    Examples
    --------
    >>> module = TopBlocksClassifier(encoder.network(), 1, (192, 7, 7), n_classes=75)  # doctest: +SKIP
    >>> history, best = fit_top_blocks(module, plain, mirrored, y_index, TopBlocksTraining(epochs=6),
    ...                                class_weight=None, random_state=0)  # doctest: +SKIP
    >>> best["stage"], best["epoch"]  # doctest: +SKIP
    ('top1', 4)
    """
    seed_everything(random_state)
    train, valid = inner_split(y_index, VALIDATION_FRACTION, random_state)
    generator = torch.Generator()
    generator.manual_seed(0 if random_state is None else random_state)
    train_batches = _FlipMinibatches(plain[train], mirrored[train], y_index[train], training.batch_size, generator)
    valid_batches = None if valid is None else _FlipMinibatches(plain[valid], None, y_index[valid], 256, None)
    weights = None if class_weight is None else torch.as_tensor(class_weight, dtype=torch.float32)

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, labels, weight=weights)

    callbacks = training_callbacks(training.progress, monitored=valid is not None, patience=training.patience)
    loop = TrainingLoop(module, loss_fn, torch.device("cpu"), callbacks)
    loop.fit(_stages(module, training), train_batches, valid_batches)
    return history_records(loop)


def _stages(module: TopBlocksClassifier, training: TopBlocksTraining) -> list[Stage]:
    head = {"params": list(module.classifier.parameters()), "lr": training.head_lr,
            "weight_decay": training.weight_decay}
    tuned = [p for name, p in module.named_parameters() if not name.startswith("classifier.")]
    blocks = {"params": tuned, "lr": training.lr, "weight_decay": training.weight_decay}
    head_epochs = min(training.head_epochs, training.epochs)
    return [Stage("head", head_epochs, [head], training.warmup_ratio),
            Stage(f"top{len(module.blocks)}", training.epochs - head_epochs, [blocks, head], training.warmup_ratio)]


def predict_top_blocks(module: TopBlocksClassifier, maps: list[np.ndarray], n_classes: int,
                       batch_size: int = 256) -> np.ndarray:
    """Probabilities ``(n, n_classes)``: the mean of the module's softmax over each array of ``maps``
    (the photos' maps, and those of their mirror images for flip averaging).

    Examples
    --------
    >>> predict_top_blocks(module, [plain, mirrored], n_classes=75).shape  # doctest: +SKIP
    (1917, 75)
    """
    proba = [predict_probabilities(module, _rows(each, batch_size), len(each), n_classes, torch.device("cpu"))
             for each in maps]
    return np.mean(proba, axis=0)


def _rows(maps: np.ndarray, batch_size: int) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    for start in range(0, len(maps), batch_size):
        stop = min(start + batch_size, len(maps))
        yield list(range(start, stop)), {"features": torch.from_numpy(maps[start:stop].astype(np.float32))}


class _FlipMinibatches:
    """Re-iterable minibatches of maps; each pass takes each photo's plain or mirrored map (a coin flip).

    Without a generator: the plain maps in order (evaluation).
    """

    def __init__(self, plain: np.ndarray, mirrored: np.ndarray | None, y: np.ndarray, batch_size: int,
                 generator: torch.Generator | None) -> None:
        self.plain, self.mirrored = plain, mirrored
        self.y = torch.from_numpy(y.astype(np.int64))
        self.batch_size, self.generator = batch_size, generator

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        n = len(self.y)
        if self.generator is None:
            order, flip = np.arange(n), np.zeros(n, dtype=bool)
        else:
            order = torch.randperm(n, generator=self.generator).numpy()
            flip = (torch.rand(n, generator=self.generator) < 0.5).numpy()
        for start in range(0, n, self.batch_size):
            rows, flipped = order[start:start + self.batch_size], flip[start:start + self.batch_size]
            batch = self.plain[rows].astype(np.float32)
            if self.mirrored is not None and flipped.any():
                batch[flipped] = self.mirrored[rows[flipped]]
            yield {"features": torch.from_numpy(batch), "labels": self.y[torch.from_numpy(rows)]}
