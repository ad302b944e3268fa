"""What the torch estimators share: a small training loop with callbacks, batching, saving.

The loop (:class:`TrainingLoop`) runs a list of :class:`Stage` s (e.g. "head only",
then "everything"); each stage has its own optimizer and a linear warmup-then-decay
schedule. Extras are callbacks in the skorch spirit, not flags of the loop:
:class:`ProgressBar`, :class:`BestWeights` (keeps the best state in memory) and
:class:`EarlyStopping`.

Batches are length-bucketed (:class:`LengthBucketBatchSampler`) and padded to their
own longest row (:func:`pad_batch`), so little compute is spent on padding.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from stackcat._deprecated import moved_names
from stackcat.core import Precision, resolve_device
from stackcat.features import hub
from stackcat.models._base import seed_everything
from stackcat.progress import log_stage, progress_bar, rate

# Loading Hugging Face models moved to stackcat.features.hub: the old names keep working for one release.
__getattr__ = moved_names(__name__, None, elsewhere={
    name: "stackcat.features.hub" for name in ("PretrainedModelNotFoundError", "hub_offline", "load_text_encoder",
                                               "quiet_transformers", "tokenize", "usable_max_length")})[0]

# ---------------------------------------------------------------- devices, threads, precision


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(num_threads)``; None leaves torch alone."""
    if num_threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- tokens and batches


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` padded on the right to the batch's own longest row."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
        attention_mask[row, : len(sequence)] = 1
    return input_ids, attention_mask


def pad_states(states: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token states ``(T_i, H)`` of a batch -> ``(B, T, H)`` float32, zero-padded, + ``attention_mask``."""
    width = max(len(s) for s in states)
    padded = torch.zeros((len(states), width, states[0].shape[1]), dtype=torch.float32)
    attention_mask = torch.zeros((len(states), width), dtype=torch.long)
    for row, rows_of_text in enumerate(states):
        padded[row, : len(rows_of_text)] = torch.from_numpy(np.asarray(rows_of_text, dtype=np.float32))
        attention_mask[row, : len(rows_of_text)] = 1
    return padded, attention_mask


class LengthBucketBatchSampler(Sampler[list[int]]):
    """Shuffled batches of rows of similar length.

    Each pass shuffles the rows, cuts them into chunks of ``bucket_batches``
    batches, sorts every chunk by length, cuts it into batches and shuffles the
    batch order: batches are random but hold rows of similar length, so padding
    to each batch's longest row wastes little. A lone last row joins the batch
    before it (BatchNorm cannot train on a batch of one).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int | None = None,
                 bucket_batches: int = 50):
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.bucket_batches = bucket_batches
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        n_rows = len(self.lengths)
        lone_last_row = n_rows > self.batch_size and n_rows % self.batch_size == 1
        return math.ceil(n_rows / self.batch_size) - lone_last_row

    def __iter__(self) -> Iterator[list[int]]:
        order = self.rng.permutation(len(self.lengths))
        chunk = self.batch_size * self.bucket_batches
        batches = []
        for start in range(0, len(order), chunk):
            rows = order[start : start + chunk]
            rows = rows[np.argsort(self.lengths[rows], kind="stable")]
            batches += [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        if len(batches) > 1 and len(batches[-1]) == 1:
            batches[-2:] = [np.concatenate(batches[-2:])]
        for k in self.rng.permutation(len(batches)):
            yield batches[k].tolist()


class SortedBatchSampler(Sampler[list[int]]):
    """Batches of rows sorted by length (for prediction; callers restore the input order)."""

    def __init__(self, lengths: Sequence[int], batch_size: int):
        self.order = np.argsort(np.asarray(lengths), kind="stable")
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, len(self.order), self.batch_size):
            yield self.order[start : start + self.batch_size].tolist()


def shuffled_batches(n_rows: int, batch_size: int, *, seed: int | None = None) -> LengthBucketBatchSampler:
    """Random batches of rows that all weigh the same (e.g. pooled features), reshuffled every pass."""
    return LengthBucketBatchSampler(np.zeros(n_rows, dtype=np.int64), batch_size, seed=seed)


class ArrayCollator:
    """Row indices -> a batch of per-row arrays (``{name: tensor}``) and ``labels``.

    ``arrays`` are the module's inputs (e.g. pooled text features, image
    embeddings). With ``with_rows=True`` a batch is ``(rows, inputs)``, for prediction.
    """

    def __init__(self, *, arrays: dict[str, np.ndarray] | None = None, labels: np.ndarray | None = None,
                 with_rows: bool = False):
        self.arrays = arrays or {}
        self.labels = labels
        self.with_rows = with_rows

    def text_inputs(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """The batch's text inputs (none here; subclasses pad tokens or token states)."""
        return {}

    def __call__(self, rows: list[int]) -> Any:
        batch = self.text_inputs(rows)
        batch.update({name: torch.from_numpy(values[rows]) for name, values in self.arrays.items()})
        if self.labels is not None:
            batch["labels"] = torch.as_tensor(self.labels[rows], dtype=torch.long)
        return (rows, batch) if self.with_rows else batch


class Collator(ArrayCollator):
    """Batches of padded ``input_ids`` + ``attention_mask`` (and per-row ``arrays``, ``labels``)."""

    def __init__(self, token_ids: Sequence[Sequence[int]], pad_id: int, *,
                 arrays: dict[str, np.ndarray] | None = None, labels: np.ndarray | None = None,
                 with_rows: bool = False):
        super().__init__(arrays=arrays, labels=labels, with_rows=with_rows)
        self.token_ids = token_ids
        self.pad_id = pad_id

    def text_inputs(self, rows: list[int]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_batch([self.token_ids[i] for i in rows], self.pad_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask}


class StateCollator(ArrayCollator):
    """Batches of cached token states: padded ``text_states`` + ``attention_mask`` (see :func:`pad_states`)."""

    def __init__(self, states: Sequence[np.ndarray], *, arrays: dict[str, np.ndarray] | None = None,
                 labels: np.ndarray | None = None, with_rows: bool = False):
        super().__init__(arrays=arrays, labels=labels, with_rows=with_rows)
        self.states = states

    def text_inputs(self, rows: list[int]) -> dict[str, torch.Tensor]:
        text_states, attention_mask = pad_states([self.states[i] for i in rows])
        return {"text_states": text_states, "attention_mask": attention_mask}


def batch_loader(n_rows: int, batch_sampler: Sampler[list[int]],
                 collate: Callable[[list[int]], dict[str, torch.Tensor]]) -> DataLoader:
    """A DataLoader over row indices: ``collate`` turns a list of row indices into a batch dict."""
    return DataLoader(range(n_rows), batch_sampler=batch_sampler, collate_fn=collate)


def mean_pool(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states ``(B, T, H)`` over the tokens the mask keeps -> ``(B, H)``."""
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


# ---------------------------------------------------------------- the training loop


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


def fit_stages(estimator: Any, train: Any, valid: Any, device: torch.device) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Train ``estimator.module_`` through ``estimator._stages()``; return ``(history_, best_epoch_)``.

    The loss (cross-entropy with the estimator's label smoothing), callbacks and
    thread count are the ones every stackcat torch estimator uses.
    """
    loop = TrainingLoop(
        estimator.module_,
        nn.CrossEntropyLoss(label_smoothing=estimator.label_smoothing),
        device,
        training_callbacks(estimator.progress, valid is not None, estimator.early_stopping_patience),
    )
    with torch_threads(estimator._module_threads()):
        loop.fit(estimator._stages(), train, valid)
    return history_records(loop)


def history_records(loop: TrainingLoop) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """``(history_, best_epoch_)`` of a finished loop, as plain dicts."""
    best = next((c.best_epoch for c in loop.callbacks if isinstance(c, BestWeights)), None)
    return [asdict(log) for log in loop.history], (asdict(best) if best is not None else None)


# ---------------------------------------------------------------- eval-set labels


def label_indices(classes: np.ndarray, y: Any, n_samples: int) -> np.ndarray:
    """Index of each label of ``y`` in ``classes`` (for an eval set); unknown labels are an error."""
    labels = np.asarray(y.to_numpy(dtype=object) if hasattr(y, "to_numpy") else y, dtype=object)
    if len(labels) != n_samples:
        raise ValueError(f"eval_set: X has {n_samples} rows but y has {len(labels)}")
    position = {c: i for i, c in enumerate(classes.tolist())}
    unknown = sorted({repr(v) for v in labels if v not in position})
    if unknown:
        raise ValueError(f"eval_set has labels absent from the training labels: {', '.join(unknown[:10])}")
    return np.array([position[v] for v in labels], dtype=np.int64)


# ---------------------------------------------------------------- saving and pickling


def non_encoder_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state outside ``encoder.*`` (saved next to the encoder's own checkpoint)."""
    return {k: v.detach().cpu() for k, v in module.state_dict().items() if not k.startswith("encoder.")}


def save_text_module(folder: Path, module: nn.Module, tokenizer: Any) -> None:
    """``folder/encoder`` and ``folder/tokenizer`` via ``save_pretrained``; the rest in ``head.pt``."""
    with hub.quiet_transformers():
        module.encoder.save_pretrained(folder / "encoder")
        tokenizer.save_pretrained(folder / "tokenizer")
    torch.save(non_encoder_state(module), folder / "head.pt")


def load_non_encoder_state(module: nn.Module, folder: Path) -> None:
    """Load ``folder/head.pt`` (written by :func:`save_text_module`) into ``module``."""
    path = folder / "head.pt"
    missing, unexpected = module.load_state_dict(torch.load(path, weights_only=True), strict=False)
    missing = [k for k in missing if not k.startswith("encoder.")]
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the model: missing {missing}, unexpected {unexpected}")


def load_saved_encoder(folder: Path) -> tuple[nn.Module, Any]:
    """``(encoder, tokenizer)`` from ``folder/encoder`` and ``folder/tokenizer``."""
    from transformers import AutoModel, AutoTokenizer

    with hub.quiet_transformers():
        return (AutoModel.from_pretrained(folder / "encoder"),
                AutoTokenizer.from_pretrained(folder / "tokenizer"))


def folder_to_bytes(folder: str | os.PathLike) -> bytes:
    """The files of ``folder`` as an uncompressed tar, in memory."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(str(folder), arcname=".")
    return buffer.getvalue()


def bytes_to_folder(blob: bytes, folder: str | os.PathLike) -> None:
    """Unpack a tar made by :func:`folder_to_bytes` into ``folder``."""
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
        tar.extractall(str(folder), filter="data")


def _to_json_value(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _json_ready(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


class SavableTorchMixin:
    """``save(path)`` / ``load(path)`` folders and pickling for estimators holding torch state.

    Subclasses name their torch attributes in ``_torch_attributes`` and implement
    ``_save_weights(folder)`` / ``_load_weights(folder)``. The folder holds those
    weight files plus ``estimator.json`` (class, params, ``classes_`` and other
    JSON-able fitted attributes); params that are not JSON-able (an encoder
    object) go to ``params.joblib``. Pickling stores the weight files as an
    in-memory tar.
    """

    _torch_attributes: tuple[str, ...] = ()
    _transient_attributes: tuple[str, ...] = ()  # caches, rebuilt on demand; never saved
    _ESTIMATOR_FILE = "estimator.json"
    _OBJECT_PARAMS_FILE = "params.joblib"

    def _save_weights(self, folder: Path) -> None:
        raise NotImplementedError

    def _load_weights(self, folder: Path) -> None:
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted model into the folder ``path`` (created; must be empty if it exists).

        Returns
        -------
        pathlib.Path
            The folder, which :meth:`load` reads back.
        """
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self, "classes_")
        folder = Path(path)
        if folder.exists() and any(folder.iterdir()):
            raise FileExistsError(f"{folder} exists and is not empty; give save() a new folder")
        record = self._json_record()
        folder.mkdir(parents=True, exist_ok=True)
        object_params = {k: v for k, v in self.get_params(deep=False).items()
                         if k not in record["params"]}
        if object_params:
            joblib.dump(object_params, folder / self._OBJECT_PARAMS_FILE)
        self._save_weights(folder)
        (folder / self._ESTIMATOR_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False),
                                                   encoding="utf-8")
        return folder

    def _json_record(self) -> dict[str, Any]:
        """Class, JSON-able params, classes_ and the other fitted attributes, for estimator.json."""
        params = {k: _to_json_value(v) for k, v in self.get_params(deep=False).items()}
        fitted = {k: _to_json_value(v) for k, v in vars(self).items()
                  if k.endswith("_") and not k.startswith("_") and k != "classes_"
                  and k not in self._torch_attributes}
        for name, value in fitted.items():
            if not _json_ready(value):
                raise TypeError(f"cannot save the fitted attribute {name} (not JSON-able)")
        classes = self.classes_.tolist()
        if not _json_ready(classes):
            kinds = sorted({type(c).__name__ for c in classes})
            raise TypeError(f"cannot save classes_ of types {kinds} to JSON; use str or int labels "
                            "(joblib.dump works with any labels)")
        return {
            "estimator": type(self).__name__,
            "params": {k: v for k, v in params.items() if _json_ready(v)},
            "classes": classes,
            "classes_dtype": self.classes_.dtype.str,
            "fitted": fitted,
        }

    @classmethod
    def load(cls, path: str | os.PathLike, **params: Any) -> Any:
        """Read a folder written by :meth:`save`; ``params`` override saved ones (e.g. ``device``)."""
        folder = Path(path)
        record_file = folder / cls._ESTIMATOR_FILE
        if not record_file.is_file():
            raise FileNotFoundError(f"{folder} is not a saved {cls.__name__} (no {cls._ESTIMATOR_FILE})")
        record = json.loads(record_file.read_text(encoding="utf-8"))
        if record["estimator"] != cls.__name__:
            raise TypeError(f"{folder} holds a {record['estimator']}, not a {cls.__name__}")
        saved = dict(record["params"])
        if (folder / cls._OBJECT_PARAMS_FILE).is_file():
            saved.update(joblib.load(folder / cls._OBJECT_PARAMS_FILE))
        estimator = cls(**{**saved, **params})
        dtype = np.dtype(record["classes_dtype"])
        estimator.classes_ = np.asarray(record["classes"], dtype=dtype)
        for key, value in record["fitted"].items():
            setattr(estimator, key, value)
        estimator._load_weights(folder)
        return estimator

    def __getstate__(self) -> dict[str, Any]:
        skip = set(self._torch_attributes) | set(self._transient_attributes)
        state = {k: v for k, v in super().__getstate__().items() if k not in skip}
        if all(hasattr(self, name) for name in self._torch_attributes):
            with tempfile.TemporaryDirectory(prefix="stackcat-pickle-") as tmp:
                self._save_weights(Path(tmp))
                state["_weights_tar"] = folder_to_bytes(tmp)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        blob = state.pop("_weights_tar", None)
        super().__setstate__(state)
        if blob is not None:
            tmp = tempfile.mkdtemp(prefix="stackcat-unpickle-")
            try:
                bytes_to_folder(blob, tmp)
                self._load_weights(Path(tmp))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)


def start_fit(random_state: int | None, device: str) -> torch.device:
    """Seed everything for a repeatable CPU run and resolve the device."""
    seed_everything(random_state)
    return resolve_device(device)


def encoder_parameters(encoder: nn.Module, freeze_embeddings: bool) -> list[nn.Parameter]:
    """The encoder's parameters to fine-tune; the word-embedding matrix left out when frozen.

    On a CPU, AdamW's dense update of a multilingual model's embedding matrix
    (96M of e5-small's 118M parameters) costs more than the rest of the step.
    """
    if not freeze_embeddings:
        return list(encoder.parameters())
    frozen = {id(p) for p in encoder.get_input_embeddings().parameters()}
    return [p for p in encoder.parameters() if id(p) not in frozen]
