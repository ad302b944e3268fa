"""The training loop of the torch estimators: stages, callbacks, prediction.

The loop (:class:`TrainingLoop`) runs a list of :class:`Stage` s (e.g. "head only",
then "everything"); each stage has its own optimizer and a linear warmup-then-decay
schedule. Extras are callbacks in the skorch spirit, not flags of the loop:
:class:`ProgressBar`, :class:`BestWeights` (keeps the best state in memory) and
:class:`EarlyStopping`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from stackcat.core import Precision
from stackcat.progress import log_stage, progress_bar, rate

__all__ = ["BestWeights", "Callback", "EarlyStopping", "EpochLog", "ProgressBar", "Stage", "TrainingLoop",
           "encoder_parameters", "history_records", "predict_probabilities", "training_callbacks",
           "warmup_linear_decay"]


@dataclass
class Stage:
    """One phase of training: which parameters learn, at what rate, for how many epochs.

    ``param_groups`` are AdamW parameter groups (``{"params": [...], "lr": ...,
    "weight_decay": ...}``); every other parameter of the module is frozen for the
    stage. Each stage gets a fresh AdamW and its own linear warmup-then-decay
    schedule. ``forward_kwargs`` go to the module's forward in this stage (e.g.
    ``{"text_noise": True}``); ``monitor=False`` skips the eval set in this stage
    (so its weights are never kept as the best; such stages must come first).
    """

    name: str
    epochs: int
    param_groups: list[dict[str, Any]]
    warmup_ratio: float = 0.0
    forward_kwargs: dict[str, Any] = field(default_factory=dict)
    monitor: bool = True

    def make_optimizer(self, module: nn.Module) -> torch.optim.Optimizer:
        """Freeze the module's parameters outside ``param_groups`` and build the stage's AdamW."""
        trainable = {id(p) for group in self.param_groups for p in group["params"]}
        for parameter in module.parameters():
            parameter.requires_grad_(id(parameter) in trainable)
        return torch.optim.AdamW([dict(group) for group in self.param_groups])


@dataclass
class EpochLog:
    stage: str
    epoch: int  # 1-based, within the stage
    train_loss: float
    valid_loss: float | None = None


class Callback:
    """Hooks of :class:`TrainingLoop`; override the ones you need."""

    def on_train_begin(self, loop: TrainingLoop) -> None: ...
    def on_stage_begin(self, loop: TrainingLoop, stage: Stage) -> None: ...
    def on_epoch_begin(self, loop: TrainingLoop, stage: Stage, epoch: int, n_batches: int) -> None: ...
    def on_batch_end(self, loop: TrainingLoop, loss: float) -> None: ...
    def on_epoch_end(self, loop: TrainingLoop, log: EpochLog) -> None: ...
    def on_stage_end(self, loop: TrainingLoop, stage: Stage) -> None: ...
    def on_train_end(self, loop: TrainingLoop) -> None: ...


def warmup_linear_decay(optimizer: torch.optim.Optimizer, total_steps: int,
                        warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """lr rises linearly from 0 over the first ``warmup_ratio`` of the steps, then falls to 0."""
    warmup = int(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class TrainingLoop:
    """Train ``module`` (``module(**inputs) -> logits``) through stages, calling callbacks.

    Batches are dicts of tensors with a ``"labels"`` entry; the rest goes to the module.
    Callbacks may set ``loop.stop_stage = True`` to end the current stage.
    """

    def __init__(self, module: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 device: torch.device, callbacks: Sequence[Callback] = ()):
        self.module = module
        self.loss_fn = loss_fn
        self.device = device
        self.precision = Precision(device)
        self.callbacks = list(callbacks)
        self.history: list[EpochLog] = []
        self.stop_stage = False

    def fit(self, stages: Sequence[Stage], train: Iterable[dict[str, torch.Tensor]],
            valid: Iterable[dict[str, torch.Tensor]] | None = None) -> list[EpochLog]:
        """Run every stage with ``epochs > 0``; ``train``/``valid`` are re-iterable loaders."""
        self.module.to(self.device)
        self._call("on_train_begin")
        for stage in stages:
            if stage.epochs > 0:
                self._run_stage(stage, train, valid)
        self._call("on_train_end")
        for parameter in self.module.parameters():  # leave nothing frozen in the fitted module
            parameter.requires_grad_(True)
        return self.history

    def _run_stage(self, stage: Stage, train: Iterable, valid: Iterable | None) -> None:
        self.stop_stage = False
        n_batches = len(train)
        optimizer = stage.make_optimizer(self.module)
        scheduler = warmup_linear_decay(optimizer, stage.epochs * n_batches, stage.warmup_ratio)
        self._call("on_stage_begin", stage)
        for epoch in range(1, stage.epochs + 1):
            self._call("on_epoch_begin", stage, epoch, n_batches)
            train_loss = self._train_epoch(stage, train, optimizer, scheduler)
            valid_loss = self.evaluate(valid, stage.forward_kwargs) if valid is not None and stage.monitor else None
            log = EpochLog(stage.name, epoch, train_loss, valid_loss)
            self.history.append(log)
            self._call("on_epoch_end", log)
            if self.stop_stage:
                break
        self._call("on_stage_end", stage)

    def _train_epoch(self, stage: Stage, train: Iterable, optimizer: torch.optim.Optimizer,
                     scheduler: Any) -> float:
        self.module.train()
        total, count = 0.0, 0
        for batch in train:
            inputs, labels = self._to_device(batch)
            optimizer.zero_grad(set_to_none=True)
            with self.precision.autocast():
                logits = self.module(**inputs, **stage.forward_kwargs)
            loss = self.loss_fn(logits.float(), labels)
            self.precision.step(loss, optimizer)
            scheduler.step()
            batch_loss = loss.item()
            total += batch_loss * len(labels)
            count += len(labels)
            self._call("on_batch_end", batch_loss)
        return total / max(count, 1)

    @torch.no_grad()
    def evaluate(self, batches: Iterable, forward_kwargs: dict[str, Any] | None = None) -> float:
        """Mean cross-entropy (no label smoothing) over ``batches``."""
        self.module.eval()
        total, count = 0.0, 0
        for batch in batches:
            inputs, labels = self._to_device(batch)
            with self.precision.autocast():
                logits = self.module(**inputs, **(forward_kwargs or {}))
            total += nn.functional.cross_entropy(logits.float(), labels, reduction="sum").item()
            count += len(labels)
        return total / max(count, 1)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        inputs = {k: v.to(self.device) for k, v in batch.items() if k != "labels"}
        return inputs, batch["labels"].to(self.device)

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)


@torch.no_grad()
def predict_probabilities(module: nn.Module, batches: Iterable[tuple[list[int], dict[str, torch.Tensor]]],
                   n_rows: int, n_classes: int, device: torch.device) -> np.ndarray:
    """Softmax probabilities ``(n_rows, n_classes)`` (float64), rows put back in input order.

    ``batches`` yields ``(row_indices, inputs)``.
    """
    module.to(device).eval()
    precision = Precision(device)
    proba = np.zeros((n_rows, n_classes), dtype=np.float64)
    for rows, inputs in batches:
        with precision.autocast():
            logits = module(**{k: v.to(device) for k, v in inputs.items()})
        proba[rows] = torch.softmax(logits.double(), dim=-1).cpu().numpy()
    return proba


# ---------------------------------------------------------------- callbacks


class ProgressBar(Callback):
    """Per epoch: a bar with the running training loss (on a terminal, when ``enabled``), then one log line."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.total, self.count = 0.0, 0
        self.title, self.start = "", 0.0

    def on_epoch_begin(self, loop: TrainingLoop, stage: Stage, epoch: int, n_batches: int) -> None:
        self.title = f"{stage.name} epoch {epoch}/{stage.epochs}"
        self.bar = progress_bar(total=n_batches, desc=self.title, unit="batch", enabled=self.enabled)
        self.total, self.count = 0.0, 0
        self.start = time.perf_counter()

    def on_batch_end(self, loop: TrainingLoop, loss: float) -> None:
        self.total += loss
        self.count += 1
        self.bar.update()
        self.bar.set_postfix(loss=f"{self.total / self.count:.4f}", refresh=False)

    def on_epoch_end(self, loop: TrainingLoop, log: EpochLog) -> None:
        postfix = {"loss": f"{log.train_loss:.4f}"}
        if log.valid_loss is not None:
            postfix["valid_loss"] = f"{log.valid_loss:.4f}"
        self.bar.set_postfix(postfix)
        self.bar.close()
        log_stage(f"{self.title}: " + rate(self.count, "batches", time.perf_counter() - self.start)
                  + ", " + ", ".join(f"{k} {v}" for k, v in postfix.items()), level=logging.DEBUG)


class BestWeights(Callback):
    """Keep (in memory) the weights of the epoch with the lowest eval loss.

    They are put back at the end of each stage, so a later stage starts from the
    best weights so far and the trained module ends with the best of all.
    """

    def __init__(self) -> None:
        self.best_loss = math.inf
        self.best_epoch: EpochLog | None = None
        self.state: dict[str, torch.Tensor] | None = None
        self._current_is_best = False

    def on_epoch_end(self, loop: TrainingLoop, log: EpochLog) -> None:
        self._current_is_best = log.valid_loss is not None and log.valid_loss < self.best_loss
        if self._current_is_best:
            self.best_loss, self.best_epoch = log.valid_loss, log
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in loop.module.state_dict().items()}

    def on_stage_end(self, loop: TrainingLoop, stage: Stage) -> None:
        if self.state is not None and not self._current_is_best:
            loop.module.load_state_dict(self.state)
            self._current_is_best = True


class EarlyStopping(Callback):
    """End a stage after ``patience`` epochs without a lower eval loss (counted per stage)."""

    def __init__(self, patience: int, min_delta: float = 0.0):
        self.patience = patience
        self.min_delta = min_delta

    def on_stage_begin(self, loop: TrainingLoop, stage: Stage) -> None:
        self.best_loss, self.bad_epochs = math.inf, 0

    def on_epoch_end(self, loop: TrainingLoop, log: EpochLog) -> None:
        if log.valid_loss is None:
            return
        if log.valid_loss < self.best_loss - self.min_delta:
            self.best_loss, self.bad_epochs = log.valid_loss, 0
        else:
            self.bad_epochs += 1
            loop.stop_stage = self.bad_epochs >= self.patience


def training_callbacks(progress: bool, monitored: bool, patience: int | None) -> list[Callback]:
    """The callbacks the estimators use: a progress bar, and best weights + early stopping with an eval set."""
    callbacks: list[Callback] = [ProgressBar(enabled=progress)]
    if monitored:
        callbacks.append(BestWeights())
        if patience is not None:
            callbacks.append(EarlyStopping(patience))
    return callbacks


def history_records(loop: TrainingLoop) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """``(history_, best_epoch_)`` of a finished loop, as plain dicts."""
    best = next((c.best_epoch for c in loop.callbacks if isinstance(c, BestWeights)), None)
    return [asdict(log) for log in loop.history], (asdict(best) if best is not None else None)


def encoder_parameters(encoder: nn.Module, freeze_embeddings: bool) -> list[nn.Parameter]:
    """The encoder's parameters to fine-tune; the word-embedding matrix left out when frozen.

    On a CPU, AdamW's dense update of a multilingual model's embedding matrix
    (96M of e5-small's 118M parameters) costs more than the rest of the step.
    """
    if not freeze_embeddings:
        return list(encoder.parameters())
    frozen = {id(p) for p in encoder.get_input_embeddings().parameters()}
    return [p for p in encoder.parameters() if id(p) not in frozen]
