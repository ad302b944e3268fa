"""A fitted stack ready to categorize raw products: ``Predictor``.

The one object that `stackcat predict`, `stackcat serve` and a Python user
share: the fitted :class:`~stackcat.stacking.StackingCategorizer`, the table
spec it was fitted with (so raw rows named as in the training table can be
prepared the same way), the review rule read from its out-of-fold
predictions, and each category's readable tree path.

Examples
--------
>>> predictor = Predictor.load("artifacts/demo")                    # doctest: +SKIP
>>> predictor.categorize(pd.DataFrame({"productDisplayName": ["Nike red tee"]}))  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stackcat import __version__
from stackcat.review import REVIEW, ReviewThreshold, review_marks, threshold_for_precision
from stackcat.topk import dense_rows

DEFAULT_PRECISION = 0.99
DEFAULT_TOP_K = 5


class Predictor:
    """A fitted stack, its table spec and review rule: raw products in, top-k categories out.

    Parameters
    ----------
    stack : StackingCategorizer
        A fitted stack.
    spec : TableSpec
        The columns of the training table (how raw rows become product texts).
    oof_confidence, oof_correct : ndarray
        The top-1 probability of every out-of-fold prediction and whether it
        was right: the review rule is read from them.
    review_source : str
        Which OOF probabilities those are (``"meta:RerankMeta"``, ...).
    precision : float, default=0.99
        Predictions whose top-1 probability reached this precision out of fold
        are marked ``auto``, the others ``review``.
    model_version : str, optional
        Names the fitted model (a bundle's digest, a run folder's fit time).
    source : str, optional
        Where it was loaded from.
    """

    def __init__(self, stack: Any, spec: Any, *, oof_confidence: np.ndarray, oof_correct: np.ndarray,
                 review_source: str, precision: float = DEFAULT_PRECISION, model_version: str | None = None,
                 source: str | None = None) -> None:
        self.stack = stack
        self.spec = spec
        self.oof_confidence = np.asarray(oof_confidence, dtype=np.float64)
        self.oof_correct = np.asarray(oof_correct, dtype=bool)
        self.review_source = review_source
        self.model_version = model_version or f"stackcat-{__version__}"
        self.source = source
        self.review = self._review_at(precision)

    # -- loading ---------------------------------------------------------------

    @classmethod
    def from_stack(cls, stack: Any, spec: Any, **options: Any) -> Predictor:
        """A predictor of a fitted stack in memory (its OOF predictions give the review rule)."""
        from stackcat.review import oof_for_review

        proba, source = oof_for_review(stack)
        dense = dense_rows(proba, slice(None), spread=False)
        correct = dense.argmax(axis=1) == np.asarray(stack.oof_target_)
        return cls(stack, spec, oof_confidence=dense.max(axis=1), oof_correct=correct, review_source=source,
                   **options)

    @classmethod
    def load(cls, path: str | Path, *, trusted: bool = False, precision: float = DEFAULT_PRECISION) -> Predictor:
        """The predictor of a model bundle (:mod:`stackcat.bundle`) or of a run folder.

        Parameters
        ----------
        path : str or Path
            A bundle (a folder with ``bundle.json``: its files' sha256 are
            checked, nothing is unpickled) or a run folder.
        trusted : bool, default=False
            Run folders only: load pickles that do not carry this user's signature.
        precision : float, default=0.99
            The review rule's precision.
        """
        from stackcat.bundle import is_bundle, load_bundle

        if is_bundle(path):
            return load_bundle(path, precision=precision)
        return cls._load_run(Path(path), trusted=trusted, precision=precision)

    @classmethod
    def _load_run(cls, path: Path, *, trusted: bool, precision: float) -> Predictor:
        from stackcat.data import TableSpec
        from stackcat.runs import RunFolder
        from stackcat.stacking import StackingCategorizer

        settings = RunFolder(path).read_table_settings()
        stack = StackingCategorizer.load(path, trusted=trusted)
        manifest = RunFolder(path).read_manifest() or {}
        version = f"run:{path.resolve().name}@{manifest.get('updated', 'unknown')}"
        return cls.from_stack(stack, TableSpec.from_dict(settings["spec"]), precision=precision,
                              model_version=version, source=str(path))

    def save(self, path: str | Path, *, quantize_fasttext: bool = False) -> Path:
        """Write this predictor as a model bundle into the new folder ``path`` (see :mod:`stackcat.bundle`).

        Examples
        --------
        >>> Predictor.load("artifacts/demo").save("artifacts/demo-bundle")   # doctest: +SKIP
        >>> Predictor.load("artifacts/demo-bundle").model_version             # doctest: +SKIP
        'bundle-3f1c2a9b7d10'
        """
        from stackcat.bundle import save_bundle

        return save_bundle(self, path, quantize_fasttext=quantize_fasttext)

    # -- what it knows ---------------------------------------------------------

    @property
    def classes(self) -> np.ndarray:
        return self.stack.classes_

    @property
    def category_paths(self) -> list[str]:
        """Each class's readable tree path (``"Apparel > Topwear > Shirts"``), or its label without a tree."""
        tree = getattr(self.stack, "tree_", None)
        if tree is not None:
            return list(tree.names)
        return [str(c) for c in self.classes]

    def categories(self) -> pd.DataFrame:
        """One row per category: ``category``, ``path``, ``n_train`` (training products)."""
        counts = getattr(self.stack, "class_counts_", None)
        return pd.DataFrame({"category": [_plain(c) for c in self.classes], "path": self.category_paths,
                             "n_train": (np.asarray(counts, dtype=int) if counts is not None
                                         else np.zeros(len(self.classes), dtype=int))})

    def with_precision(self, precision: float) -> Predictor:
        """The same predictor with another review precision."""
        other = object.__new__(Predictor)
        other.__dict__.update(self.__dict__)
        other.review = self._review_at(precision)
        return other

    def _review_at(self, precision: float) -> ReviewThreshold:
        return threshold_for_precision(self.oof_confidence, self.oof_correct, precision, self.review_source)

    # -- predicting ------------------------------------------------------------

    def prepare(self, raw: pd.DataFrame, *, base_dir: str | Path | None = None, image_dir: str | None = None) -> Any:
        """``raw`` rows (columns named as in the training table) as the stack's input (a PreparedTable)."""
        from stackcat.data import prepare_table

        spec = replace(self.spec, image_dir=image_dir) if image_dir else self.spec
        return prepare_table(raw, spec, with_target=False, base_dir=base_dir)

    def predict_prepared(self, frame: pd.DataFrame, *, top_k: int = DEFAULT_TOP_K) -> pd.DataFrame:
        """Top-k categories of a prepared frame: one row per product.

        Columns: ``id``, ``category``, ``probability``, ``review`` (``auto`` /
        ``review``), ``top_categories``, ``top_probabilities``, ``top_paths``
        (lists of ``top_k``).
        """
        if frame.empty:
            return _empty_predictions()
        proba = dense_rows(self.stack.predict_proba(frame), slice(None), spread=False)
        k = min(top_k, proba.shape[1])
        top = np.argsort(-proba, axis=1, kind="stable")[:, :k]
        top_proba = np.take_along_axis(proba, top, axis=1)
        paths = np.asarray(self.category_paths, dtype=object)
        review = review_marks(top_proba[:, 0], self.review.threshold)
        return pd.DataFrame({
            "id": frame["id"].to_numpy(dtype=object),
            "category": [_plain(c) for c in self.classes[top[:, 0]]],
            "probability": top_proba[:, 0].round(6),
            "review": review,
            "top_categories": [[_plain(c) for c in self.classes[row]] for row in top],
            "top_probabilities": [row.round(6).tolist() for row in top_proba],
            "top_paths": [paths[row].tolist() for row in top],
        })

    def categorize(self, raw: pd.DataFrame, *, top_k: int = DEFAULT_TOP_K, base_dir: str | Path | None = None,
                   image_dir: str | None = None) -> pd.DataFrame:
        """Top-k categories of raw products (see :meth:`predict_prepared` for the columns)."""
        prepared = self.prepare(raw, base_dir=base_dir, image_dir=image_dir)
        return self.predict_prepared(prepared.frame, top_k=top_k)


def load(path: str | Path, *, trusted: bool = False, precision: float = DEFAULT_PRECISION) -> Predictor:
    """The :class:`Predictor` of a model bundle or a run folder (``stackcat.load``).

    Examples
    --------
    >>> import stackcat
    >>> predictor = stackcat.load("artifacts/demo-bundle")                     # doctest: +SKIP
    >>> predictor.categorize(pd.DataFrame({"productDisplayName": ["Nike red tee"]}))  # doctest: +SKIP
    """
    return Predictor.load(path, trusted=trusted, precision=precision)


def _empty_predictions() -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype=object) for name in
                         ("id", "category", "probability", "review", "top_categories", "top_probabilities",
                          "top_paths")})


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


__all__ = ["DEFAULT_PRECISION", "DEFAULT_TOP_K", "REVIEW", "Predictor", "load"]
