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

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stackcat import __version__
from stackcat.core import plain_value
from stackcat.review import REVIEW, ReviewThreshold, review_marks, threshold_for_precision
from stackcat.topk import dense_rows

DEFAULT_PRECISION = 0.99
DEFAULT_TOP_K = 5
USABLE_IMAGE = "ok"


@dataclass(frozen=True)
class ImageInput:
    """The images of the rows to predict, as the run's members that read images see them.

    Parameters
    ----------
    members : tuple of str
        The members of the stack that read images (``image``, ``fusion``...).
    statuses : DataFrame
        ``row, id, image_path, status`` per row (:data:`stackcat.features.images.IMAGE_STATUSES`).
    named : bool
        Whether the table named images at all (an image column or an image
        folder); False for a table without its photo column.

    Examples
    --------
    >>> statuses = pd.DataFrame({"row": [0, 1], "id": ["a", "b"], "image_path": ["a.jpg", None],
    ...                          "status": ["ok", "no_path"]})
    >>> ImageInput(("image",), statuses, named=True).counts()
    {'ok': 1, 'no_path': 1}
    """

    members: tuple[str, ...]
    statuses: pd.DataFrame
    named: bool = True

    @property
    def unusable(self) -> np.ndarray:
        """Per row: True where the image members predict without an image (so the row goes to review)."""
        return self.statuses["status"].to_numpy(dtype=object) != USABLE_IMAGE

    def counts(self) -> dict[str, int]:
        """Rows per image status, most common first."""
        return {str(k): int(v) for k, v in self.statuses["status"].value_counts(sort=True).items()}

    def problems(self) -> pd.DataFrame:
        """The rows without a usable image: ``row, id, image_path, status``."""
        return self.statuses.loc[self.unusable].reset_index(drop=True)

    def describe(self) -> str:
        """One line: the counts by status and what happens to rows without a usable image."""
        counts = ", ".join(f"{n:,} {status}" for status, n in self.counts().items())
        line = f"images of {len(self.statuses):,} rows: {counts}"
        if self.unusable.any():
            line += (f"; {', '.join(self.members)} predict rows without a usable image from their other input, "
                     "and those rows go to review")
        return line


def concat_image_inputs(parts: Sequence[ImageInput]) -> ImageInput | None:
    """The image input of a whole table predicted in chunks (None when no member reads images)."""
    if not parts:
        return None
    return ImageInput(parts[0].members, pd.concat([p.statuses for p in parts], ignore_index=True),
                      named=any(p.named for p in parts))


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
        self._said_no_image_column = False
        self._image_members: tuple[str, ...] | None = None

    # -- loading ---------------------------------------------------------------

    @classmethod
    def from_stack(cls, stack: Any, spec: Any, **options: Any) -> Predictor:
        """A predictor of a fitted stack in memory (its OOF predictions give the review rule)."""
        from stackcat.review import oof_confidence

        confidence, correct, source = oof_confidence(stack)
        return cls(stack, spec, oof_confidence=confidence, oof_correct=correct, review_source=source, **options)

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
        return pd.DataFrame({"category": [plain_value(c) for c in self.classes], "path": self.category_paths,
                             "n_train": (np.asarray(counts, dtype=int) if counts is not None
                                         else np.zeros(len(self.classes), dtype=int))})

    @property
    def image_members(self) -> tuple[str, ...]:
        """Names of the members that read images (from their declared file columns)."""
        from stackcat.runs import file_columns_of

        if self._image_members is None:  # asked per prediction; the stack does not change
            self._image_members = tuple(name for name, estimator in self.stack.estimators
                                        if file_columns_of(estimator))
        return self._image_members

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
        """``raw`` rows (columns named as in the training table) as the stack's input (a PreparedTable).

        A table without the run's image column is predicted without images
        (one warning), or, with ``image_dir``, with ``<image_dir>/<id>.jpg``
        as in fit.
        """
        from stackcat.data import prepare_table

        return prepare_table(raw, self._spec_for(raw.columns, image_dir), with_target=False, base_dir=base_dir)

    def _spec_for(self, columns: Any, image_dir: str | None) -> Any:
        spec = replace(self.spec, image_dir=image_dir) if image_dir else self.spec
        if not spec.image_column or spec.image_column in columns:
            return spec
        # without the photo column: images by id in the folder given now, else none
        spec = replace(spec, image_column=None, image_dir=image_dir)
        members = self.image_members
        if members and not self._said_no_image_column:
            self._said_no_image_column = True
            where = (f"images are read as {image_dir}/<id>{spec.image_suffix}" if image_dir
                     else "the rows are predicted without images and go to review")
            warnings.warn(f"the table has no image column {self.spec.image_column!r}, which "
                          f"{', '.join(members)} read: {where}", stacklevel=3)
        return spec

    def check_images(self, prepared: Any, *, allow_missing: bool = False) -> ImageInput | None:
        """The image status of each prepared row; None when no member reads images.

        Raises
        ------
        DataError
            When the table names images (a column, or an image folder) but
            not one row has a usable image: a wrong ``--image-dir`` would
            otherwise give every product the same category. ``allow_missing``
            says that predicting from the other input alone is intended.
        """
        from stackcat.data import DataError
        from stackcat.features.images import image_statuses

        members = self.image_members
        if not members:
            return None
        frame = prepared.frame
        paths = frame["image_path"].tolist()
        statuses = pd.DataFrame({"row": frame.index, "id": frame["id"].to_numpy(dtype=object),
                                 "image_path": paths, "status": image_statuses(paths)})
        named = bool(prepared.spec.image_column or prepared.spec.image_dir)
        images = ImageInput(members, statuses, named=named)
        if named and len(statuses) and images.unusable.all() and not allow_missing:
            raise DataError(_no_usable_image_message(images, prepared.spec))
        return images

    def predict_prepared(self, frame: pd.DataFrame, *, top_k: int = DEFAULT_TOP_K,
                         images: ImageInput | None = None) -> pd.DataFrame:
        """Top-k categories of a prepared frame: one row per product.

        Columns: ``id``, ``category``, ``probability``, ``review`` (``auto`` /
        ``review``), ``top_categories``, ``top_probabilities``, ``top_paths``
        (lists of ``top_k``). A row without a usable image goes to ``review``
        when a member reads images; ``images`` (from :meth:`check_images`)
        saves reading the image files' headers a second time.
        """
        if frame.empty:
            return _empty_predictions()
        if images is None and self.image_members:
            from stackcat.data import PreparedTable

            images = self.check_images(PreparedTable(frame=frame, spec=self.spec), allow_missing=True)
        proba = dense_rows(self.stack.predict_proba(frame), slice(None), spread=False)
        k = min(top_k, proba.shape[1])
        top = np.argsort(-proba, axis=1, kind="stable")[:, :k]
        top_proba = np.take_along_axis(proba, top, axis=1)
        paths = np.asarray(self.category_paths, dtype=object)
        review = review_marks(top_proba[:, 0], self.review.threshold)
        if images is not None:
            review[images.unusable] = REVIEW
        return pd.DataFrame({
            "id": frame["id"].to_numpy(dtype=object),
            "category": [plain_value(c) for c in self.classes[top[:, 0]]],
            "probability": top_proba[:, 0].round(6),
            "review": review,
            "top_categories": [[plain_value(c) for c in self.classes[row]] for row in top],
            "top_probabilities": [row.round(6).tolist() for row in top_proba],
            "top_paths": [paths[row].tolist() for row in top],
        })

    def categorize(self, raw: pd.DataFrame, *, top_k: int = DEFAULT_TOP_K, base_dir: str | Path | None = None,
                   image_dir: str | None = None, allow_missing_images: bool = False) -> pd.DataFrame:
        """Top-k categories of raw products (see :meth:`predict_prepared` for the columns).

        Refused (:class:`~stackcat.data.DataError`) when the rows name images
        but none is usable, unless ``allow_missing_images``.
        """
        prepared = self.prepare(raw, base_dir=base_dir, image_dir=image_dir)
        images = self.check_images(prepared, allow_missing=allow_missing_images)
        return self.predict_prepared(prepared.frame, top_k=top_k, images=images)


def _no_usable_image_message(images: ImageInput, spec: Any) -> str:
    counts = ", ".join(f"{n:,} {status}" for status, n in images.counts().items())
    example = next((p for p in images.statuses["image_path"] if p is not None), None)
    source = (f"image column {spec.image_column!r}" if spec.image_column
              else f"image folder {spec.image_dir} (<id>{spec.image_suffix})")
    return (f"none of the {len(images.statuses):,} rows has a usable image ({counts}"
            f"{f'; e.g. {example}' if example else ''}) in the {source}, and {', '.join(images.members)} "
            "read images: every product would get the same few categories. Check --image-dir (or the "
            "image column), or pass --allow-missing-images to predict from the other input alone "
            "(the rows then go to review)")


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


__all__ = ["DEFAULT_PRECISION", "DEFAULT_TOP_K", "ImageInput", "Predictor", "REVIEW", "concat_image_inputs", "load"]
