"""Infer what each column of a product table holds, for a one-call fit.

``stackcat fit table.csv --target category`` on a table that is not in the
KazanExpress format names no text column. Like AutoGluon's predictors, stackcat
then reads the other columns and gives each a role:

* **id**: every value present and unique, no spaces (a column named like an id,
  ``id``, ``sku``, ``product_id``, is preferred);
* **image**: values that are image file names (``.jpg``, ``.png``...), of which
  at least one exists relative to the table's folder;
* **title and description** (the text columns): free text, that is several
  words per value or mostly distinct values; name-like columns (``title``,
  ``name``, ``productDisplayName``) first, description-like ones last;
* **attributes**: short strings (or numbers) with few distinct values,
  rendered ``"Column: value"`` after the text;
* not used: empty columns, a single value in every row, numbers with many
  distinct values (prices, counts: the text models read no numbers), a second
  id-like column.

The target is never a feature. Every flag the user gives
(``--attribute-columns``, ``--id-column``, ``--image-column``) wins over the
inferred role and takes its column out of the other roles; naming
``--text-columns`` means the user describes the table: nothing is inferred.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stackcat.data import KE_JSON_COLUMN, DataError, TableSpec, require_columns

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
IMAGE_SHARE = 0.9  # of the present values that must look like image files
IMAGES_CHECKED = 20  # values whose files are looked for
FREE_TEXT_WORDS = 3.0  # mean words per value from which a column is free text
ATTRIBUTE_SHARE = 0.5  # at most this share of distinct values for an attribute
MAX_ATTRIBUTE_VALUES = 1000
MAX_NUMBER_VALUES = 50  # a number column with more distinct values is not an attribute
# an id column may have this share of bad cells (empty, or repeating an earlier id): one in 100
ID_BAD_SHARE = 0.01

_ID_NAME = re.compile(r"^(id|sku|ean|upc|gtin|asin|code)$|[_\- ](id|code|sku)$|[a-z]Id$|^id[_\- ]", re.IGNORECASE)
_TITLE_NAME = re.compile(r"title|name|heading|caption", re.IGNORECASE)
_DESCRIPTION_NAME = re.compile(r"desc|detail|body|about|summary|text", re.IGNORECASE)


@dataclass(frozen=True)
class InferredSpec:
    """A table spec with the reason behind each column's role.

    ``inferred`` is False when nothing had to be inferred (a KazanExpress
    table, or text columns named by the user).
    """

    spec: TableSpec
    reasons: Mapping[str, str] = field(default_factory=dict)
    inferred: bool = False

    def describe(self) -> str:
        """The roles as printed by ``stackcat fit``, with the flags that give the same spec."""
        if not self.inferred:
            return ""
        width = max(len(str(c)) for c in self.reasons)
        lines = ["columns (inferred; the flags below set them yourself):"]
        lines += [f"  {str(c):<{width}}  {reason}" for c, reason in self.reasons.items()]
        lines.append("  same as: " + " ".join(spec_flags(self.spec)))
        return "\n".join(lines)


def spec_flags(spec: TableSpec) -> list[str]:
    """The ``stackcat fit`` flags that name the columns of ``spec``.

    Examples
    --------
    >>> spec_flags(TableSpec(text_columns=["name"], attribute_columns=["colour", "size"], target="type"))
    ['--target', 'type', '--text-columns', 'name', '--attribute-columns', 'colour,size']
    """
    flags = [("--target", spec.target), ("--text-columns", ",".join(spec.text_columns)),
             ("--attribute-columns", ",".join(spec.attribute_columns)), ("--id-column", spec.id_column),
             ("--image-column", spec.image_column), ("--image-dir", spec.image_dir)]
    return [part for flag, value in flags if value for part in (flag, _quoted(value))]


def _quoted(value: str) -> str:
    return repr(value) if re.search(r"[\s'\"$`\\]", value) else value


def infer_spec(frame: pd.DataFrame, *, base_dir: str | Path | None = None, **overrides: Any) -> InferredSpec:
    """The table spec of ``frame``: KazanExpress, the user's, or inferred from the values.

    Parameters
    ----------
    frame : DataFrame
        The raw table (from :func:`stackcat.data.read_table`).
    base_dir : path, optional
        Folder that relative image paths start from (the table's folder).
    **overrides
        :class:`~stackcat.data.TableSpec` fields given by the user (``None``
        for "not given"): ``target`` (required unless the table is in the
        KazanExpress format), ``text_columns``, ``attribute_columns``,
        ``id_column``, ``image_column``, ``image_dir``, ``lowercase``.

    Returns
    -------
    InferredSpec

    Examples
    --------
    >>> raw = pd.DataFrame({"sku": ["a1", "a2", "a3", "a4", "a5", "a6"],
    ...                     "name": ["Red cotton shirt", "Blue denim jeans", "Red linen shirt",
    ...                              "Black slim jeans", "Blue oxford shirt", "Red cotton jeans"],
    ...                     "colour": ["red", "blue", "red", "black", "blue", "red"],
    ...                     "type": ["shirt", "jeans"] * 3})
    >>> spec = infer_spec(raw, target="type").spec
    >>> spec.id_column, list(spec.text_columns), list(spec.attribute_columns)
    ('sku', ['name'], ['colour'])
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    if KE_JSON_COLUMN in frame.columns or given.get("text_columns") or given.get("json_column"):
        return InferredSpec(TableSpec.detect(frame.columns, **given))
    target = given.get("target")
    if not target:
        raise DataError("no target column named: say which column holds the category (--target); "
                        "the roles of the other columns are then inferred (or name them: --text-columns, "
                        f"--attribute-columns, --id-column, --image-column). Columns: {[str(c) for c in frame]}")
    named = [target, *given.get("attribute_columns", ()), given.get("id_column"), given.get("image_column")]
    require_columns(frame, [c for c in named if c], source="the table")
    roles = _column_roles(frame, [c for c in frame.columns if c not in named], given, base_dir)
    reasons = _reasons(roles, given)
    in_table_order = {str(c): reasons[str(c)] for c in frame.columns if str(c) in reasons}
    return InferredSpec(_spec_from_roles(roles, given), {**in_table_order, **reasons}, inferred=True)


@dataclass(frozen=True)
class _Role:
    column: str
    role: str  # "id", "image", "text", "attribute" or "unused"
    reason: str
    rank: int = 1  # text columns: 0 name-like, 1 other, 2 description-like


def _column_roles(frame: pd.DataFrame, columns: Sequence[str], given: Mapping[str, Any],
                  base_dir: str | Path | None) -> list[_Role]:
    image_root = Path(base_dir or ".") / given.get("image_dir", "")
    roles = [_role_of(str(c), frame[c].to_numpy(dtype=object), image_root) for c in columns]
    return _one_of_each(roles, "id", given.get("id_column"), prefer=_ID_NAME)


def _one_of_each(roles: list[_Role], role: str, named: str | None, prefer: re.Pattern) -> list[_Role]:
    """At most one column in ``role``: none when the user named one, else the
    first column whose name matches ``prefer``, else the first candidate."""
    candidates = [r for r in roles if r.role == role]
    chosen = None if named or not candidates else next(
        (r for r in candidates if prefer.search(r.column)), candidates[0])
    kept = named or (chosen.column if chosen else None)
    return [r if r.role != role or r is chosen
            else replace(r, role="unused", reason=f"not used: unique values like the {role} ({kept})")
            for r in roles]


def _role_of(column: str, values: np.ndarray, image_root: Path) -> _Role:
    present = [v for v in values if not _missing(v)]
    if not present:
        return _Role(column, "unused", "not used: empty")
    if any(isinstance(v, (list, tuple, np.ndarray, Mapping)) for v in present):
        return _Role(column, "attribute", "attribute: lists or structs")
    texts = [str(v).strip() for v in present]
    distinct = len(set(texts))
    if distinct == 1:
        return _Role(column, "unused", f"not used: the same value in every row ({texts[0][:30]!r})")
    numbers = pd.to_numeric(pd.Series(texts), errors="coerce")
    if numbers.notna().all():
        return _number_role(column, numbers, distinct, len(values), len(present))
    if sum(t.lower().endswith(IMAGE_SUFFIXES) for t in texts) >= IMAGE_SHARE * len(texts):
        return _image_role(column, texts, image_root)
    words = float(np.mean([len(t.split()) for t in texts]))
    if _nearly_unique(distinct, len(values)) and words == 1.0:
        return _Role(column, "id", "id: unique values without spaces" + _bad_ids(distinct, len(values)))
    if words >= FREE_TEXT_WORDS or distinct > ATTRIBUTE_SHARE * len(present) or distinct > MAX_ATTRIBUTE_VALUES:
        rank = 0 if _TITLE_NAME.search(column) else 2 if _DESCRIPTION_NAME.search(column) else 1
        return _Role(column, "text", f"free text ({words:.1f} words per value, {distinct} distinct "
                                     f"of {len(present)})", rank)
    return _Role(column, "attribute", f"attribute: {distinct} distinct short values")


def _number_role(column: str, numbers: pd.Series, distinct: int, n_rows: int, n_present: int) -> _Role:
    integral = bool((numbers == numbers.round()).all())
    # numbers may be unique by chance (prices): a few bad cells only in a column named like an id
    if integral and (distinct == n_rows or (_ID_NAME.search(column) and _nearly_unique(distinct, n_rows))):
        return _Role(column, "id", "id: unique whole numbers" + _bad_ids(distinct, n_rows))
    if distinct <= MAX_NUMBER_VALUES and distinct <= ATTRIBUTE_SHARE * n_present:
        return _Role(column, "attribute", f"attribute: a number with {distinct} distinct values")
    return _Role(column, "unused", f"not used: a number with {distinct} distinct values (the models read "
                                   "text; add it with --attribute-columns to read it as words)")


def _nearly_unique(distinct: int, n_rows: int) -> bool:
    """Unique but for a few bad cells (empty or repeated): at most :data:`ID_BAD_SHARE` of the rows."""
    return n_rows - distinct <= int(ID_BAD_SHARE * n_rows)


def _bad_ids(distinct: int, n_rows: int) -> str:
    bad = n_rows - distinct
    return f" ({bad} empty or repeated: those rows are reported)" if bad else ""


def _image_role(column: str, texts: Sequence[str], image_root: Path) -> _Role:
    checked = texts[:IMAGES_CHECKED]
    found = sum((image_root / t).is_file() for t in checked)
    if not found:
        return _Role(column, "unused", f"not used: image file names, but none of the first {len(checked)} "
                                       f"is in {image_root} (name the folder with --image-dir)")
    return _Role(column, "image", f"image: {found} of the first {len(checked)} files found in {image_root}")


def _spec_from_roles(roles: Sequence[_Role], given: Mapping[str, Any]) -> TableSpec:
    def columns_in(role: str) -> list[str]:
        return [r.column for r in roles if r.role == role]

    text = [r.column for r in sorted((r for r in roles if r.role == "text"), key=lambda r: r.rank)]
    inferred = {"text_columns": tuple(text), "attribute_columns": tuple(columns_in("attribute")),
                "id_column": next(iter(columns_in("id")), None),
                "image_column": next(iter(columns_in("image")), None)}
    return replace(TableSpec(**inferred), **given)


def _reasons(roles: Sequence[_Role], given: Mapping[str, Any]) -> dict[str, str]:
    reasons = {given["target"]: "target"}
    for key, role in (("id_column", "id"), ("image_column", "image")):
        if given.get(key):
            reasons[given[key]] = f"{role} (named)"
    for column in given.get("attribute_columns", ()):
        reasons[column] = "attribute (named)"
    text = sorted((r for r in roles if r.role == "text"), key=lambda r: r.rank)
    for number, role in enumerate(text):
        reasons[role.column] = f"{'title' if number == 0 else 'text'}: {role.reason}"
    reasons.update({r.column: r.reason for r in roles if r.role != "text"})
    if not text:
        reasons["(text)"] = "no free-text column found: the product text is made of the attributes"
    return reasons


def _missing(value: Any) -> bool:
    if value is None or value is pd.NA:
        return True
    if isinstance(value, float) and np.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()
