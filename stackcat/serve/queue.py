"""The review queue: products to accept or correct, with their text, photo and top candidates.

Three sources fill it:

- a predictions file of ``stackcat predict`` (``id, category, probability,
  review, top5_categories, top5_probabilities``): the proposed category is the
  top-1, the candidates its top-5;
- a label-issues file (``id, given_label, suggested_label, given_probability,
  suggested_probability, score``): reviewing the training data, the proposed
  category is the suggestion and the given label is a candidate;
- products the service categorized with ``review == "review"``
  (:class:`PendingQueue`, the latest ones, in memory).

Text and photos come from the products table the server was given
(:class:`ProductTable`, ``stackcat serve --products TABLE``).

Examples
--------
>>> text = "id,category,probability,review,top5_categories,top5_probabilities\\n" \\
...        '7,Shirts,0.6,review,"[""Shirts"", ""Tshirts""]","[0.6, 0.3]"\\n'
>>> item = queue_items(text, paths={"Shirts": "Apparel > Shirts"})[0]
>>> item["id"], item["proposed"], [c["category"] for c in item["candidates"]]
('7', 'Shirts', ['Shirts', 'Tshirts'])
"""

from __future__ import annotations

import io
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from stackcat.data import TableSpec, key_texts, prepare_table, read_table
from stackcat.serve.inputs import RequestError

LABEL_ISSUE_COLUMNS = ("id", "given_label", "suggested_label")
PREDICTION_COLUMNS = ("top5_categories", "top5_probabilities")
DEFAULT_PENDING = 1000


class ProductTable:
    """Products by id: ``title``, ``text``, ``image_path`` (and the table's label when it has one)."""

    def __init__(self, products: Mapping[str, dict[str, Any]]) -> None:
        self.products = dict(products)

    @classmethod
    def read(cls, path: str | Path, spec: TableSpec) -> ProductTable:
        """The products of the table at ``path``, prepared with the fit's ``spec``."""
        path = Path(path)
        raw = read_table(path)
        if spec.image_column and spec.image_column not in raw.columns:
            spec = replace(spec, image_column=None)
        prepared = prepare_table(raw, spec, with_target=False, base_dir=path.parent)
        labels = (key_texts(raw[spec.target].to_numpy(dtype=object)) if spec.target in raw.columns
                  else [None] * len(raw))
        frame = prepared.frame
        return cls({str(row.id): {"title": row.title, "text": row.text, "image_path": row.image_path,
                                  "label": label}
                    for row, label in zip(frame.itertuples(index=False), labels)})

    def get(self, product_id: str) -> dict[str, Any] | None:
        return self.products.get(product_id)


class PendingQueue:
    """The latest products the service marked for review (bounded, oldest dropped first)."""

    def __init__(self, max_items: int = DEFAULT_PENDING) -> None:
        self.max_items = max_items
        self._items: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, item: dict[str, Any]) -> None:
        with self._lock:
            self._items.pop(item["id"], None)
            self._items[item["id"]] = item
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def items(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._items.values())

    def get(self, product_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self._items.get(product_id)


def queue_items(text: str, *, paths: Mapping[str, str], products: ProductTable | None = None,
                decided: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """The queue of a predictions or label-issues CSV (its text), joined with the products' text."""
    try:
        table = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as exc:
        raise RequestError("file", f"not a readable CSV ({exc})") from None
    columns = set(table.columns)
    if set(LABEL_ISSUE_COLUMNS) <= columns:
        items = [_label_issue(row, paths) for row in table.to_dict("records")]
    elif set(PREDICTION_COLUMNS) <= columns and len(table.columns) >= 2:
        id_name, category_name = table.columns[:2]
        items = [_prediction(row, number, id_name, category_name, paths)
                 for number, row in enumerate(table.to_dict("records"), start=2)]
    else:
        raise RequestError("file", "expected a predictions file (columns id, category, ..., top5_categories, "
                                   "top5_probabilities) or a label-issues file (columns id, given_label, "
                                   f"suggested_label, ...); got columns {list(table.columns)}")
    for item in items:
        with_product(item, products)
        item["decided"] = (decided or {}).get(item["id"])
    return items


def with_product(item: dict[str, Any], products: ProductTable | None) -> dict[str, Any]:
    """``item`` with the product's title, text and whether it has a photo (from the products table)."""
    product = products.get(item["id"]) if products is not None else None
    if product is not None:
        item.setdefault("title", product["title"])
        item.setdefault("text", product["text"])
        item["has_image"] = bool(product.get("image_path"))
        if product.get("label") and not item.get("given_label"):
            item["given_label"] = product["label"]
    item.setdefault("title", None)
    item.setdefault("text", None)
    item.setdefault("has_image", False)
    return item


def _prediction(row: dict[str, str], number: int, id_name: str, category_name: str,
                paths: Mapping[str, str]) -> dict[str, Any]:
    categories = _json_list(row["top5_categories"], f"row {number}, top5_categories")
    probabilities = _json_list(row["top5_probabilities"], f"row {number}, top5_probabilities")
    if len(probabilities) != len(categories):
        raise RequestError(f"row {number}", "top5_categories and top5_probabilities differ in length")
    candidates = [_candidate(c, p, paths) for c, p in zip(categories, probabilities)]
    return {"id": str(row[id_name]), "kind": "prediction", "proposed": str(row[category_name]),
            "probability": _number(row.get("probability")), "review": row.get("review"),
            "candidates": candidates}


def _label_issue(row: dict[str, str], paths: Mapping[str, str]) -> dict[str, Any]:
    suggested, given = row["suggested_label"], row["given_label"]
    candidates = [_candidate(suggested, _number(row.get("suggested_probability")), paths)]
    if given != suggested:
        candidates.append(_candidate(given, _number(row.get("given_probability")), paths))
    return {"id": str(row["id"]), "kind": "label_issue", "proposed": suggested, "given_label": given,
            "score": _number(row.get("score")), "candidates": candidates}


def _candidate(category: Any, probability: Any, paths: Mapping[str, str]) -> dict[str, Any]:
    name = str(category)
    return {"category": name, "probability": probability, "path": paths.get(name, name)}


def _json_list(text: str, where: str) -> list[Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise RequestError(where, f"not a JSON list: {text[:60]!r}") from None
    if not isinstance(value, list):
        raise RequestError(where, f"not a JSON list: {text[:60]!r}")
    return value


def _number(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


__all__ = ["PendingQueue", "ProductTable", "queue_items", "with_product"]
