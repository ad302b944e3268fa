"""Reviewers' corrections as labels for the next fit: ``read_corrections``, ``apply_corrections``.

A corrections file is a CSV with the columns ``id`` and ``label`` (what
``stackcat serve`` exports from its review queue, ``GET /v1/corrections.csv``).
In the next fit a corrected id overrides the label its row had in the
training table; ids the table does not have are reported, not added (a
correction holds no product text).

Examples
--------
>>> raw = pd.DataFrame({"sku": ["a", "b"], "name": ["red tee", "blue jeans"], "type": ["Jeans", "Jeans"]})
>>> spec = TableSpec(text_columns=["name"], id_column="sku", target="type")
>>> fixes = pd.DataFrame({"id": ["a", "zz"], "label": ["Tshirts", "Shoes"]})
>>> corrected, applied = apply_corrections(raw, spec, fixes)
>>> corrected["type"].tolist(), applied.changed, applied.unknown_ids
(['Tshirts', 'Jeans'], 1, ['zz'])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from stackcat.data import DataError, TableSpec, key_texts, normalize_label, read_table

CORRECTION_COLUMNS = ("id", "label")
MAX_LISTED_IDS = 10


@dataclass(frozen=True)
class AppliedCorrections:
    """What :func:`apply_corrections` did: rows relabelled, rows already right, ids not in the table."""

    changed: int
    unchanged: int
    unknown_ids: list[str] = field(default_factory=list)

    def describe(self) -> str:
        line = f"corrections: {self.changed:,} label(s) changed, {self.unchanged:,} already right"
        if self.unknown_ids:
            shown = ", ".join(map(repr, self.unknown_ids[:MAX_LISTED_IDS]))
            more = " ..." if len(self.unknown_ids) > MAX_LISTED_IDS else ""
            line += f"; {len(self.unknown_ids):,} id(s) not in the table, ignored: {shown}{more}"
        return line


def read_corrections(path: str | Path) -> pd.DataFrame:
    """The corrections CSV at ``path``: columns ``id`` and ``label`` as text, the last one per id.

    Raises
    ------
    DataError
        A missing column, or a row without an id or a label (naming the row).
    """
    table = read_table(path)
    missing = [c for c in CORRECTION_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{path}: a corrections file needs the columns {list(CORRECTION_COLUMNS)}; "
                        f"missing {missing} (columns: {list(table.columns)})")
    ids = key_texts(table["id"].to_numpy(dtype=object))
    labels = key_texts(table["label"].to_numpy(dtype=object))
    for row, (product_id, label) in enumerate(zip(ids, labels)):
        if product_id is None or label is None:
            empty = "id" if product_id is None else "label"
            raise DataError(f"{path}: row {row + 1} has an empty {empty!r}: every correction needs both")
    frame = pd.DataFrame({"id": ids, "label": [normalize_label(v) for v in labels]}, dtype=object)
    return frame.drop_duplicates("id", keep="last").reset_index(drop=True)


def apply_corrections(raw: pd.DataFrame, spec: TableSpec,
                      corrections: pd.DataFrame) -> tuple[pd.DataFrame, AppliedCorrections]:
    """``raw`` with each corrected id's target replaced by its corrected label.

    Ids are matched as text (see :func:`stackcat.data.key_texts`) against the
    spec's id column, or against the row number when the table has none.
    """
    if not spec.target or spec.target not in raw.columns:
        raise DataError(f"cannot apply corrections: the table has no target column {spec.target!r}")
    if spec.id_column and spec.id_column not in raw.columns:
        raise DataError(f"cannot apply corrections: the table has no id column {spec.id_column!r}")
    table_ids = (key_texts(raw[spec.id_column].to_numpy(dtype=object)) if spec.id_column
                 else [str(row) for row in range(len(raw))])
    wanted = dict(zip(corrections["id"].to_numpy(dtype=object), corrections["label"].to_numpy(dtype=object)))
    labels = raw[spec.target].to_numpy(dtype=object).copy()
    old = key_texts(labels)
    changed = unchanged = 0
    seen: set[str] = set()
    for row, product_id in enumerate(table_ids):
        if product_id not in wanted:
            continue
        seen.add(product_id)
        if old[row] is not None and normalize_label(old[row]) == wanted[product_id]:
            unchanged += 1
        else:
            labels[row] = wanted[product_id]
            changed += 1
    corrected = raw.copy()
    corrected[spec.target] = pd.Series(labels, index=raw.index, dtype=object)
    unknown = [i for i in wanted if i not in seen]
    return corrected, AppliedCorrections(changed=changed, unchanged=unchanged, unknown_ids=unknown)


__all__ = ["AppliedCorrections", "CORRECTION_COLUMNS", "apply_corrections", "read_corrections"]
