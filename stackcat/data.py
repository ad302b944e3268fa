"""Read product tables, validate their columns and build the product text.

Data flows one way: a CSV/Parquet table -> :func:`read_table` -> a
:class:`TableSpec` saying which column holds what -> :func:`prepare_table`,
which returns a :class:`PreparedTable` whose ``frame`` has the columns every
stackcat model reads: ``id``, ``title``, ``text``, ``image_path`` and, for
training data, ``label``.

Two ways to name the inputs:

* the KazanExpress format (a ``text_fields`` JSON column with title,
  description, attributes, characteristics, filters, rating and sale, plus
  ``shop_title``, ``product_id`` and ``category_id``), detected automatically;
* a generic spec for any other table: text columns (the first one is the
  title), attribute columns rendered as ``Key: value``, a target, an id and an
  image column.

Only an empty cell is missing: words such as ``NA`` or ``None`` are values.
Ids and labels are text, the same whatever the file format (a Parquet ``1``
and a CSV ``"1"`` are one category); labels are stripped and NFC-normalized,
with a warning when that merges spellings.

Bad rows never crash a run: each one becomes a :class:`RowError` naming the
row's id, the column and the reason. Training rows with an error are left out
(and listed), unless the problem was repaired (a missing id gets the id
``row-<row number>``); rows to predict are kept with a best-effort text, since
every product needs a prediction. ``strict=True`` turns any row error into one
:class:`DataError` that lists them all. Which column holds what can be
inferred from the values: see :mod:`stackcat.columns`.
"""

from __future__ import annotations

import codecs
import difflib
import html
import json
import math
import re
import unicodedata
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stackcat.runs import DATA_PROBLEM_COLUMNS

SALE_WORD = "Распродажа"
KE_JSON_COLUMN = "text_fields"
CSV_SUFFIXES = {".csv", ".tsv", ".txt"}
PARQUET_SUFFIXES = {".parquet", ".pq"}
MAX_LISTED_ERRORS = 20

_TAG = re.compile(r"<[^>]*>")
_BRACKETS = re.compile(r"[\[\]{}<>]")
_SPACES = re.compile(r"\s+")
_TRUE_WORDS = {"true", "1", "yes", "y", "t", "да"}
_INTEGRAL_FLOAT_TEXT = re.compile(r"-?\d+\.0+")
# UTF-32 first: its little-endian mark starts with UTF-16's
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


class DataError(ValueError):
    """Input that stackcat cannot use; the message names the file, column or rows."""


@dataclass(frozen=True)
class RowError:
    """One bad row: its position in the table, its id, the column and the reason.

    ``keeps_row``: the problem was repaired (e.g. a generated id) and the row
    stays in the training data; other problems leave a training row out.
    """

    row: int
    row_id: Any
    column: str
    reason: str
    keeps_row: bool = False

    def __str__(self) -> str:
        return f"row {self.row} (id {self.row_id!r}), column {self.column!r}: {self.reason}"


@dataclass(frozen=True)
class TableSpec:
    """Which column of a table holds what.

    Parameters
    ----------
    text_columns : sequence of str
        Free-text columns, most informative first; the first is the title.
    attribute_columns : sequence of str
        Columns rendered as ``"Column: value"`` after the text.
    target : str or None
        The category column (``None`` for tables to predict).
    id_column : str or None
        Product id column; ``None`` numbers the rows.
    image_column : str or None
        Column with image paths (absolute, or relative to ``image_dir``).
    image_dir : str or None
        Folder of images; without ``image_column`` each product's image is
        ``<image_dir>/<id><image_suffix>``.
    json_column : str or None
        A KazanExpress-style JSON column with title, description, attributes,
        characteristics and filters.
    shop_column, sale_column : str or None
        Shop name (put first: ``"shop: title. ..."``) and sale flag (adds
        :data:`SALE_WORD`).
    lowercase : bool
        Lower-case the product text.
    attribute_keys : bool
        Render attributes as ``"Column: value"`` (default) or as bare values.

    Examples
    --------
    >>> spec = TableSpec(text_columns=["name"], attribute_columns=["colour"], target="type")
    >>> spec.required_columns()
    ['name', 'colour', 'type']
    """

    text_columns: Sequence[str] = ()
    attribute_columns: Sequence[str] = ()
    target: str | None = None
    id_column: str | None = None
    image_column: str | None = None
    image_dir: str | None = None
    image_suffix: str = ".jpg"
    json_column: str | None = None
    shop_column: str | None = None
    sale_column: str | None = None
    lowercase: bool = False
    attribute_keys: bool = True

    def __post_init__(self) -> None:
        # tuples, whether given lists or tuples: two specs of the same columns compare equal
        for name in ("text_columns", "attribute_columns"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @classmethod
    def kazanexpress(cls, image_dir: str | None = None, target: str | None = "category_id") -> TableSpec:
        """The KazanExpress product format (``text_fields`` JSON + shop + sale)."""
        return cls(
            target=target,
            id_column="product_id",
            json_column=KE_JSON_COLUMN,
            shop_column="shop_title",
            sale_column="sale",
            image_dir=image_dir,
        )

    @classmethod
    def detect(cls, columns: Iterable[str], **overrides: Any) -> TableSpec:
        """Guess the spec from the column names: KazanExpress if ``text_fields`` is present.

        Generic tables need ``text_columns`` (and ``target`` for training) in
        ``overrides``; everything given in ``overrides`` wins over the guess.
        """
        names = set(columns)
        if KE_JSON_COLUMN in names:
            spec = cls.kazanexpress(target="category_id" if "category_id" in names else None)
            optional = {"shop_column": spec.shop_column, "sale_column": spec.sale_column,
                        "id_column": spec.id_column}
            spec = replace(spec, **{k: (v if v in names else None) for k, v in optional.items()})
        else:
            spec = cls()
        spec = replace(spec, **{k: v for k, v in overrides.items() if v is not None})
        if not spec.json_column and not spec.text_columns:
            raise DataError(
                "cannot tell which columns hold the product text: the table has no "
                f"{KE_JSON_COLUMN!r} column (KazanExpress format); name the text columns "
                f"(--text-columns / TableSpec(text_columns=...)). Columns: {sorted(names)}"
            )
        return spec

    def required_columns(self, with_target: bool = True) -> list[str]:
        """Columns the table must have (the target only when ``with_target``)."""
        named = [*self.text_columns, *self.attribute_columns, self.json_column,
                 self.id_column, self.image_column, self.shop_column, self.sale_column]
        if with_target:
            named.append(self.target)
        return list(dict.fromkeys(c for c in named if c))

    def to_dict(self) -> dict[str, Any]:
        out = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in self.__dict__.items()}
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TableSpec:
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()})


@dataclass
class PreparedTable:
    """The validated table: ``frame`` (id, title, text, image_path[, label]) and its row errors.

    ``frame`` keeps the original row order; training rows with an error are
    already left out of it, and ``errors`` says which and why.
    """

    frame: pd.DataFrame
    errors: list[RowError] = field(default_factory=list)
    spec: TableSpec = field(default_factory=TableSpec)
    n_input_rows: int = 0

    def summary(self) -> str:
        """A short human summary: rows read, rows kept, the first errors."""
        kept = len(self.frame)
        lines = [f"{self.n_input_rows} rows read, {kept} kept, {len(self.errors)} row problem(s)"]
        if "label" in self.frame:
            lines[0] += f", {self.frame['label'].nunique()} categories"
        lines += [f"  - {e}" for e in self.errors[:MAX_LISTED_ERRORS]]
        if len(self.errors) > MAX_LISTED_ERRORS:
            lines.append(f"  ... and {len(self.errors) - MAX_LISTED_ERRORS} more")
        return "\n".join(lines)

    def problems(self) -> pd.DataFrame:
        """One line per row problem: ``row, id, column, reason`` (the run folder's ``data_problems.csv``).

        Examples
        --------
        >>> prepared = prepare_table(pd.DataFrame({"title": ["a shirt", ""], "category": ["x", "x"]}),
        ...                          TableSpec(text_columns=["title"], target="category"))
        >>> prepared.problems()[["row", "column"]].values.tolist()
        [[1, 'title']]
        """
        rows = [{"row": e.row, "id": e.row_id, "column": e.column, "reason": e.reason} for e in self.errors]
        return pd.DataFrame(rows, columns=list(DATA_PROBLEM_COLUMNS))

    def image_statuses(self) -> pd.DataFrame | None:
        """Each kept row's image status: ``row, id, image_path, status``; None when no row names an image.

        The status is :func:`stackcat.features.images.load_image`'s (``ok``,
        ``no_path``, ``missing``, ``too_large``, ``corrupt``), from a reduced-size
        decode of each file (:func:`~stackcat.features.images.image_statuses`).
        """
        from stackcat.features.images import image_statuses

        frame = self.frame
        if frame["image_path"].isna().all():
            return None
        return pd.DataFrame({"row": frame.index, "id": frame["id"], "image_path": frame["image_path"],
                             "status": image_statuses(frame["image_path"].tolist())})


# --------------------------------------------------------------------------- reading


def read_table(path: str | Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Read a CSV (``.csv``/``.tsv``/``.txt``) or Parquet (``.parquet``/``.pq``) table.

    CSV cells are read as text, and only an empty cell is missing: ids keep
    leading zeros, and words such as ``NA``, ``None`` or ``null`` stay words
    (a category or a product called ``None`` is not lost). UTF-16 and UTF-32
    files (with a byte-order mark, or UTF-16 without one) are decoded; bytes
    that are not UTF-8 in any other file are replaced and reported with their
    line numbers as a warning. Two columns with the same name are refused.
    Text columns come back as ``object`` dtype.

    Examples
    --------
    >>> from stackcat.demo import demo_csv_path
    >>> read_table(demo_csv_path()).shape[0] > 1000
    True
    """
    path = _checked_table_path(path)
    frame = _read_parquet(path) if path.suffix.lower() in PARQUET_SUFFIXES else _read_csv(path)
    if frame.empty:
        raise DataError(f"{path}: the table has a header but no rows")
    frame = _plain_object_text(frame)
    if columns is not None:
        require_columns(frame, columns, source=str(path))
    return frame


def read_table_chunks(path: str | Path, chunk_rows: int = 10_000) -> Iterator[pd.DataFrame]:
    """Read a table in chunks of at most ``chunk_rows`` rows (bounded memory for large files).

    Same formats, checks and dtypes as :func:`read_table`; the chunks' index
    continues across chunks (row numbers of the whole file).
    """
    path = _checked_table_path(path)
    if path.suffix.lower() in PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        _refuse_duplicate_parquet_columns(path)
        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=chunk_rows)
        except Exception as exc:
            raise DataError(f"{path}: not a readable Parquet file: {exc}") from exc
        chunks = (batch.to_pandas() for batch in batches)
    else:
        options = _csv_options(path)
        try:
            chunks = pd.read_csv(path, chunksize=chunk_rows, **options)
        except pd.errors.EmptyDataError as exc:
            raise DataError(f"{path}: the file has no header and no rows") from exc
    start = 0
    for chunk in _named_parse_errors(chunks, path):
        if not len(chunk):  # a header-only CSV yields one empty chunk: models cannot predict 0 rows
            continue
        chunk.index = pd.RangeIndex(start, start + len(chunk))
        start += len(chunk)
        yield _plain_object_text(chunk)
    if not start:
        raise DataError(f"{path}: the table has a header but no rows")


def _named_parse_errors(chunks: Iterator[pd.DataFrame], path: Path) -> Iterator[pd.DataFrame]:
    """Chunks as they come; a broken row met mid-file raises a DataError naming the file."""
    try:
        yield from chunks
    except pd.errors.ParserError as exc:
        raise DataError(f"{path}: not a well-formed CSV table: {str(exc).strip()}") from exc


def _checked_table_path(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    if path.suffix.lower() not in CSV_SUFFIXES | PARQUET_SUFFIXES:
        raise DataError(f"{path}: unknown table type {path.suffix.lower()!r}; use .csv, .tsv or .parquet")
    return path


def _csv_options(path: Path) -> dict[str, Any]:
    """``pd.read_csv`` options for ``path``: its encoding and separator, every cell as text,
    only an empty cell missing; checks the header for duplicate names first."""
    encoding = text_encoding(path)
    if encoding == "utf-8":
        _warn_non_utf8(path)
    options = {"sep": _separator(path, encoding), "dtype": str, "keep_default_na": False,
               "na_values": [""], "encoding": encoding, "encoding_errors": "replace"}
    _refuse_duplicate_csv_columns(path, options)
    return options


def text_encoding(path: str | Path) -> str:
    """The encoding of a text table: from its byte-order mark, else UTF-16 when every
    other byte of its start is NUL, else ``"utf-8"``.

    Raises :class:`DataError` for a file with NUL bytes that is not UTF-16 (a
    binary file, e.g. a spreadsheet saved under a ``.csv`` name).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "t.csv"
    >>> _ = path.write_bytes("name,type\\nRed shirt,Shirts\\n".encode("utf-16"))
    >>> text_encoding(path)
    'utf-16'
    """
    with Path(path).open("rb") as handle:
        head = handle.read(4096)
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            return encoding
    if b"\x00" not in head:
        return "utf-8"
    nul_even, nul_odd = head[0::2].count(0), head[1::2].count(0)
    # UTF-16 of ASCII-heavy text (the header, digits, commas) has its NULs on one side only
    encoding = "utf-16-le" if nul_odd > nul_even else "utf-16-be"
    if min(nul_even, nul_odd) <= 0.05 * max(nul_even, nul_odd) and _decodes(head, encoding):
        return encoding
    raise DataError(f"{path}: holds NUL bytes but is not UTF-16 text: is it a binary file (e.g. an "
                    "Excel workbook renamed .csv)? Export the table as CSV (UTF-8) or Parquet")


def _decodes(head: bytes, encoding: str) -> bool:
    try:
        codecs.getincrementaldecoder(encoding)().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


def _separator(path: Path, encoding: str = "utf-8") -> str:
    """Tab for ``.tsv``; else comma, unless the header has no comma but semicolons or tabs
    (spreadsheet exports in many locales use ``;``)."""
    if path.suffix.lower() == ".tsv":
        return "\t"
    with path.open(encoding=encoding, errors="replace") as handle:
        header = handle.readline()
    if "," not in header:
        for candidate in (";", "\t"):
            if candidate in header:
                return candidate
    return ","


def _refuse_duplicate_csv_columns(path: Path, options: Mapping[str, Any]) -> None:
    """pandas renames a repeated column ``name.1``; the user would never learn which one is read."""
    try:
        header = pd.read_csv(path, header=None, nrows=1, **options).iloc[0].tolist()
    except (pd.errors.EmptyDataError, pd.errors.ParserError, IndexError):
        return  # the full read reports these with the file's name
    _refuse_duplicate_names([str(name) for name in header if not _is_missing(name)], path)


def _refuse_duplicate_parquet_columns(path: Path) -> None:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as exc:  # pyarrow raises many types for a broken file
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from exc
    _refuse_duplicate_names(names, path)


def _refuse_duplicate_names(names: Sequence[Any], source: Any) -> None:
    positions: dict[Any, list[int]] = {}
    for position, name in enumerate(names, start=1):
        positions.setdefault(name, []).append(position)
    repeated = {name: where for name, where in positions.items() if len(where) > 1}
    if repeated:
        described = "; ".join(f"{str(name)!r} is columns {', '.join(map(str, where))}"
                              for name, where in repeated.items())
        raise DataError(f"{source}: duplicate column name(s): {described}. Rename them so that "
                        "each column has its own name")


def _warn_non_utf8(path: Path) -> None:
    bad_lines = _non_utf8_lines(path)
    if bad_lines:
        shown = ", ".join(map(str, bad_lines[:10])) + (" ..." if len(bad_lines) > 10 else "")
        warnings.warn(
            f"{path}: bytes that are not UTF-8 on line(s) {shown}; they were replaced by U+FFFD. "
            "Re-save the file as UTF-8 to keep those characters.",
            stacklevel=5,
        )


def _read_csv(path: Path) -> pd.DataFrame:
    options = _csv_options(path)
    try:
        return pd.read_csv(path, **options)
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path}: the file has no header and no rows") from exc
    except pd.errors.ParserError as exc:
        raise DataError(f"{path}: not a well-formed CSV table: {exc}") from exc


def _non_utf8_lines(path: Path) -> list[int]:
    bad: list[int] = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                bad.append(number)
    return bad


def _read_parquet(path: Path) -> pd.DataFrame:
    _refuse_duplicate_parquet_columns(path)
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises many types for a broken file
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from exc


def _plain_object_text(frame: pd.DataFrame) -> pd.DataFrame:
    """Arrow-backed strings (pandas 3) -> object arrays that scikit-learn can index."""
    text_like = [c for c in frame.columns
                 if pd.api.types.is_string_dtype(frame[c]) and frame[c].dtype != object]
    if text_like:
        frame = frame.astype({c: object for c in text_like})
        for c in text_like:
            frame[c] = frame[c].where(frame[c].notna(), None)
    return frame


def require_columns(frame: pd.DataFrame, columns: Iterable[str], source: str = "the table") -> None:
    """Raise :class:`DataError` naming every missing column (and close matches)."""
    missing = [c for c in dict.fromkeys(columns) if c not in frame.columns]
    if not missing:
        return
    hints = []
    for name in missing:
        close = difflib.get_close_matches(name, [str(c) for c in frame.columns], n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise DataError(
        f"{source}: missing column(s) {', '.join(hints)}; it has {[str(c) for c in frame.columns]}"
    )


# --------------------------------------------------------------------------- text recipe


def clean_text(value: Any) -> str:
    """Strip HTML tags, entities and brackets; collapse whitespace. ``None``/NaN -> ``""``."""
    if _is_missing(value):
        return ""
    text = html.unescape(_TAG.sub(" ", str(value)))
    text = _BRACKETS.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


def render_value(value: Any) -> str:
    """A cell as text: lists joined by ``", "``, mappings as ``"Key: value"`` pairs."""
    if _is_missing(value):
        return ""
    if isinstance(value, Mapping):
        parts = []
        for key, inner in value.items():
            rendered = render_value(inner)
            parts.append(f"{clean_text(key)}: {rendered}" if rendered else clean_text(key))
        return ", ".join(p for p in parts if p)
    if isinstance(value, (list, tuple, np.ndarray)):
        return ", ".join(p for p in (render_value(v) for v in value) if p)
    return clean_text(value)


def join_segments(segments: Iterable[str]) -> str:
    """Join non-empty text pieces with ``". "`` without doubling the full stops."""
    pieces = [s.strip().rstrip(".").strip() for s in segments]
    return ". ".join(p for p in pieces if p)


def ke_product_text(fields: Mapping[str, Any], shop_title: Any = None,
                    sale: Any = None) -> tuple[str, str]:
    """Title and product text of one KazanExpress product, by the reference recipe.

    ``"shop: title. description. attributes. characteristics. filters"``, with
    HTML and brackets stripped, ``rating`` dropped (a leak) and
    :data:`SALE_WORD` appended when the product is on sale. ``sale`` may come
    from the JSON or from its own column; the column wins when both are given.

    Examples
    --------
    >>> fields = {"title": "Кабель <b>USB</b>", "description": "<p>Длина 1м</p>",
    ...           "attributes": ["Цвет: черный"], "defined_characteristics": {"Длина": ["1м"]},
    ...           "rating": 4.9, "sale": True}
    >>> ke_product_text(fields, shop_title="Aksik")
    ('Кабель USB', 'Aksik: Кабель USB. Длина 1м. Цвет: черный. Длина: 1м. Распродажа')
    """
    title = clean_text(fields.get("title"))
    shop = clean_text(shop_title)
    head = f"{shop}: {title}" if shop and title else (shop or title)
    characteristics = [render_value(fields.get(k))
                       for k in ("custom_characteristics", "defined_characteristics")]
    filters = render_value(fields.get("filters"))
    seen = {c for c in characteristics if c}
    segments = [head, clean_text(fields.get("description")), render_value(fields.get("attributes")),
                *characteristics, filters if filters not in seen else ""]
    on_sale = _as_bool(sale) if not _is_missing(sale) else _as_bool(fields.get("sale"))
    if on_sale:
        segments.append(SALE_WORD)
    return title, join_segments(segments)


def upweight_title(text: str, title: str | None = None, words: int = 3, repeat: int = 2) -> str:
    """Repeat the first ``words`` words of the title ``repeat`` times before the text.

    The single most useful trick of the reference FastText model: the first
    words of a title usually name the product type. With no title, the text's
    own first words are used.

    Examples
    --------
    >>> upweight_title("Shop: Red cotton shirt for men", "Red cotton shirt for men", words=2)
    'Red cotton Red cotton Shop: Red cotton shirt for men'
    """
    source = title if title else text
    head = " ".join(str(source).split()[:words]) if words > 0 else ""
    if not head or repeat <= 0:
        return text
    return " ".join([head] * repeat + [text])


# --------------------------------------------------------------------------- preparing


def prepare_table(frame: pd.DataFrame, spec: TableSpec, *, with_target: bool = True,
                  strict: bool = False, base_dir: str | Path | None = None) -> PreparedTable:
    """Validate ``frame`` against ``spec`` and build the model-ready frame.

    Parameters
    ----------
    frame : DataFrame
        The raw table (from :func:`read_table` or your own).
    spec : TableSpec
        Which column holds what.
    with_target : bool
        Training data (target required; bad rows left out) or data to predict
        (no target needed; every row kept, bad ones with a best-effort text).
    strict : bool
        Raise one :class:`DataError` listing every row problem instead of
        reporting them.
    base_dir : path, optional
        Folder that relative image paths (and ``spec.image_dir``) start from.

    Returns
    -------
    PreparedTable
        ``frame`` with columns ``id, title, text, image_path`` (+ ``label``),
        indexed by the original row position, plus the row errors.

    Examples
    --------
    >>> raw = pd.DataFrame({"name": ["Red shirt", "Blue jeans"], "colour": ["red", None],
    ...                     "type": ["Shirts", "Jeans"]})
    >>> spec = TableSpec(text_columns=["name"], attribute_columns=["colour"], target="type")
    >>> prepare_table(raw, spec).frame[["text", "label"]].values.tolist()
    [['Red shirt. colour: red', 'Shirts'], ['Blue jeans', 'Jeans']]
    """
    if with_target and not spec.target:
        raise DataError("no target column named: say which column holds the category (--target)")
    if with_target:
        _refuse_target_as_input(spec)
    _refuse_duplicate_names(list(frame.columns), "the table")
    require_columns(frame, spec.required_columns(with_target), source="the table")
    first_row = _first_row_number(frame)
    frame = _plain_object_text(frame.reset_index(drop=True))
    for column in (spec.id_column, spec.target if with_target else None):
        if column:
            _require_plain_values(frame[column], column, first_row)
    errors: list[RowError] = []
    ids = _row_ids(frame, spec, errors, with_target, first_row)
    titles, texts = _product_texts(frame, spec, ids, errors, with_target)
    columns = {"id": ids, "title": titles, "text": texts,
               "image_path": _image_paths(frame, spec, ids, base_dir)}
    # object arrays, not pandas 3's inferred string dtype: scikit-learn indexes them as-is
    out = pd.DataFrame(columns, index=frame.index, dtype=object)
    if with_target:
        out["label"] = pd.Series(_labels(frame[spec.target], spec.target, ids, errors),
                                 index=out.index, dtype=object)
    errors.sort(key=lambda e: e.row)
    if first_row:
        errors = [replace(e, row=e.row + first_row) for e in errors]
        out.index = out.index + first_row
    if strict and errors:
        raise DataError(f"{len(errors)} bad row(s) (strict mode):\n{_listed(errors)}")
    if with_target:
        out = out.drop(index=sorted({e.row for e in errors if not e.keeps_row}))
        if out.empty and len(frame):
            raise DataError(f"no usable training rows: each of the {len(frame)} rows has a problem:\n"
                            f"{_listed(errors)}")
    return PreparedTable(frame=out, errors=errors, spec=spec, n_input_rows=len(frame))


_INPUT_ROLES = (("text_columns", "the text columns (--text-columns)"),
                ("attribute_columns", "the attribute columns (--attribute-columns)"),
                ("id_column", "the id column (--id-column)"), ("image_column", "the image column (--image-column)"),
                ("json_column", "the JSON text column"))


def _refuse_target_as_input(spec: TableSpec) -> None:
    """The category among the model's input would be a leak: out-of-fold accuracy 1.0, useless on new rows."""
    for field_name, described in _INPUT_ROLES:
        value = getattr(spec, field_name)
        named = value if isinstance(value, tuple) else (value,)
        if spec.target in named:
            raise DataError(f"the target column {spec.target!r} is also one of {described}: the models would "
                            "read the answer (out-of-fold accuracy 1.0, useless on new products); remove it "
                            "from there")


def _listed(errors: Sequence[RowError]) -> str:
    listed = "\n".join(f"  - {e}" for e in errors[:MAX_LISTED_ERRORS])
    more = f"\n  ... and {len(errors) - MAX_LISTED_ERRORS} more" if len(errors) > MAX_LISTED_ERRORS else ""
    return listed + more


def _first_row_number(frame: pd.DataFrame) -> int:
    """Row number of the frame's first row in its file: a chunk of :func:`read_table_chunks`
    starts where the previous one ended; any other frame starts at 0."""
    index = frame.index
    if isinstance(index, pd.RangeIndex) and index.step == 1 and len(index):
        return int(index.start)
    return 0


def _require_plain_values(column: pd.Series, name: str, first_row: int) -> None:
    """Ids and categories must be plain values (a Parquet list/struct cell is neither hashable nor a label)."""
    nested = [row + first_row for row, value in enumerate(column.to_numpy(dtype=object))
              if isinstance(value, (list, tuple, np.ndarray, Mapping))]
    if nested:
        shown = ", ".join(map(str, nested[:10])) + (" ..." if len(nested) > 10 else "")
        raise DataError(
            f"column {name!r} holds nested values (lists or structs) at row(s) {shown}; product ids "
            "and categories must be plain text or numbers: flatten the column before using it"
        )


def _row_ids(frame: pd.DataFrame, spec: TableSpec, errors: list[RowError],
             with_target: bool, first_row: int = 0) -> np.ndarray:
    """Each row's id as text (its row number in the file without an id column).

    A missing id (an empty cell) gets the id ``row-<row number>`` and is
    reported; the row is kept, for training too (the models never read the id).
    Duplicate ids are row errors: left out of training, still predicted.
    """
    if not spec.id_column:
        return np.arange(first_row, first_row + len(frame)).astype(object)
    ids = np.array(key_texts(frame[spec.id_column].to_numpy(dtype=object)), dtype=object)
    first_seen: dict[Any, int] = {}
    for row, value in enumerate(ids):
        if value is None:
            ids[row] = value = f"row-{row + first_row}"
            errors.append(RowError(row, value, spec.id_column,
                                   f"missing product id; the row is kept under the id {value!r}",
                                   keeps_row=True))
        if value in first_seen:
            reason = f"duplicate product id (first seen at row {first_seen[value] + first_row})"
            outcome = "; row left out" if with_target else "; both rows predicted"
            errors.append(RowError(row, value, spec.id_column, reason + outcome))
        else:
            first_seen[value] = row
    return ids


def key_texts(values: Sequence[Any]) -> list[str | None]:
    """Ids or labels as text, the same whatever the file format: ``None`` where missing.

    Numbers become their text; a column whose numbers are all integral floats
    (an integer column that pandas or a CSV export turned into ``1.0``, ``2.0``
    because of a missing cell) is written as integers. A cell of only
    whitespace is missing.

    Examples
    --------
    >>> key_texts([1.0, float("nan"), 3.0])
    ['1', None, '3']
    >>> key_texts(["007", " ", "2.0"]), key_texts(["1.0", "2.0"]), key_texts([1.5, 2])
    (['007', None, '2.0'], ['1', '2'], ['1.5', '2'])
    """
    plain = [v.item() if isinstance(v, np.generic) else v for v in values]
    texts = [None if _is_missing(v) or (isinstance(v, str) and not v.strip()) else v for v in plain]
    present = [v for v in texts if v is not None]
    numbers = [v for v in present if isinstance(v, (int, float)) and not isinstance(v, bool)]
    integral = bool(present) and (
        all(isinstance(v, str) and _INTEGRAL_FLOAT_TEXT.fullmatch(v.strip()) for v in present)
        or (len(numbers) == len(present) and all(float(v).is_integer() for v in numbers))
    )
    if integral:
        return [None if v is None else str(int(float(v))) for v in texts]
    return [None if v is None else str(v) for v in texts]


def _product_texts(frame: pd.DataFrame, spec: TableSpec, ids: np.ndarray,
                   errors: list[RowError], with_target: bool) -> tuple[list[str], list[str]]:
    titles, texts = [], []
    for row, record in enumerate(frame.to_dict("records")):
        try:
            title, text = (_ke_row_text(record, spec) if spec.json_column
                           else _generic_row_text(record, spec))
        except ValueError as exc:
            errors.append(RowError(row, ids[row], spec.json_column or "", str(exc)))
            raw = "" if _is_missing(record[spec.json_column]) else str(record[spec.json_column])
            title, text = "", clean_text(re.sub(r"[\"']|\\[nrt]", " ", raw))
        else:
            if not text.strip():
                columns = spec.json_column or ", ".join(spec.text_columns)
                errors.append(RowError(row, ids[row], columns, "empty product text"))
        if spec.lowercase:
            title, text = title.lower(), text.lower()
        titles.append(title)
        texts.append(text)
    return titles, texts


def _ke_row_text(record: Mapping[str, Any], spec: TableSpec) -> tuple[str, str]:
    fields = _parse_fields(record[spec.json_column])
    shop = record[spec.shop_column] if spec.shop_column else None
    sale = record[spec.sale_column] if spec.sale_column else None
    title, text = ke_product_text(fields, shop_title=shop, sale=sale)
    extra = _generic_segments(record, spec)
    return title, join_segments([text, *extra])


def _parse_fields(value: Any) -> Mapping[str, Any]:
    if isinstance(value, Mapping):
        return value
    if _is_missing(value) or not str(value).strip():
        raise ValueError("empty JSON")
    try:
        fields = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"malformed JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(fields, Mapping):
        raise ValueError(f"JSON is a {type(fields).__name__}, expected an object with a title")
    return fields


def _generic_row_text(record: Mapping[str, Any], spec: TableSpec) -> tuple[str, str]:
    title = render_value(record[spec.text_columns[0]]) if spec.text_columns else ""
    segments = _generic_segments(record, spec)
    if spec.shop_column and not _is_missing(record[spec.shop_column]):
        segments[0:1] = [f"{clean_text(record[spec.shop_column])}: {segments[0] if segments else ''}"]
    if spec.sale_column and _as_bool(record[spec.sale_column]):
        segments.append(SALE_WORD)
    return title, join_segments(segments)


def _generic_segments(record: Mapping[str, Any], spec: TableSpec) -> list[str]:
    segments = [render_value(record[c]) for c in spec.text_columns]
    attributes = [f"{c}: {v}" if spec.attribute_keys else v
                  for c in spec.attribute_columns if (v := render_value(record[c]))]
    if attributes:
        segments.append(", ".join(attributes))
    return [s for s in segments if s]


def _image_paths(frame: pd.DataFrame, spec: TableSpec, ids: np.ndarray,
                 base_dir: str | Path | None) -> list[str | None]:
    root = Path(base_dir) if base_dir else Path.cwd()
    image_dir = root / spec.image_dir if spec.image_dir else None
    if spec.image_column:
        folder = image_dir or root
        return [None if _is_missing(p) or not str(p).strip() else str(folder / str(p))
                for p in frame[spec.image_column]]
    if image_dir is not None:
        return [str(image_dir / f"{i}{spec.image_suffix}") for i in ids]
    return [None] * len(frame)


def _labels(column: pd.Series, name: str, ids: np.ndarray, errors: list[RowError]) -> np.ndarray:
    """Labels as text (see :func:`key_texts`): surrounding whitespace stripped,
    Unicode NFC; a missing label is a row error."""
    raw = key_texts(column.to_numpy(dtype=object))
    labels = np.array([None if v is None else normalize_label(v) for v in raw], dtype=object)
    for row in np.flatnonzero([label is None for label in labels]):
        errors.append(RowError(int(row), ids[row], name, "missing target"))
    _warn_merged_labels(raw, labels, name)
    return labels


def normalize_label(label: str) -> str:
    """A label as a class name: surrounding whitespace stripped, Unicode NFC, ``1.0`` written ``1``.

    A whole number written as a float is the same category as the integer,
    whatever the other labels of the column are (``"1"`` beside ``"1.0"`` and
    ``"1.5"`` is one class, not two).

    Examples
    --------
    >>> normalize_label(" Shirts ") == normalize_label("Shirts")
    True
    >>> normalize_label("Cafe\u0301") == "Caf\u00e9"
    True
    >>> normalize_label("1.0"), normalize_label("1.5"), normalize_label("007")
    ('1', '1.5', '007')
    """
    label = unicodedata.normalize("NFC", label.strip())
    return str(int(float(label))) if _INTEGRAL_FLOAT_TEXT.fullmatch(label) else label


def _warn_merged_labels(raw: Sequence[str | None], labels: np.ndarray, name: str) -> None:
    spellings: dict[str, set[str]] = {}
    for original, label in zip(raw, labels):
        if label is not None:
            spellings.setdefault(label, set()).add(original)
    merged = {label: sorted(found) for label, found in spellings.items() if len(found) > 1}
    if not merged:
        return
    shown = "; ".join(f"{' + '.join(map(repr, found))} -> {label!r}"
                      for label, found in sorted(merged.items())[:10])
    more = f" ... and {len(merged) - 10} more" if len(merged) > 10 else ""
    warnings.warn(f"target column {name!r}: labels that differ only in surrounding whitespace, Unicode "
                  f"form or a whole number's '.0' are one category: {shown}{more}", stacklevel=4)


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return value is pd.NA or value is pd.NaT


def _as_bool(value: Any) -> bool:
    if _is_missing(value):
        return False
    if isinstance(value, str):
        return value.strip().lower() in _TRUE_WORDS
    return bool(value)
