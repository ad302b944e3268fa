"""Batches for the torch estimators: samplers, padding and collators.

Batches are length-bucketed (:class:`LengthBucketBatchSampler`) and padded to their
own longest row (:func:`pad_batch`, :func:`pad_states`), so little compute is spent
on padding. A collator turns a list of row indices into a batch dict; a
:func:`batch_loader` wraps both in a DataLoader.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

__all__ = ["ArrayCollator", "Collator", "LengthBucketBatchSampler", "SortedBatchSampler", "StateCollator",
           "batch_loader", "mean_pool", "pad_batch", "pad_states", "shuffled_batches"]


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

