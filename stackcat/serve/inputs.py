"""What a request to ``POST /v1/categorize`` may hold, checked field by field.

``{"products": [{...}, ...], "top_k": 5}``: each product's fields are named
as in the training table (its text, attribute and id columns), plus its
image: a path under the server's image roots (the training table's image
column, or ``image_path``) or the image's bytes in base64
(``image_base64``). Anything else is a :class:`RequestError` naming the
field (``products[3].price``), answered with a 4xx before any prediction.

Examples
--------
>>> fields = ProductFields.from_spec(TableSpec(text_columns=["name"], id_column="sku"))
>>> rows, top_k = parse_payload({"products": [{"sku": "a", "name": "red tee"}]}, fields)
>>> rows[0]["name"], top_k
('red tee', 5)
>>> try:
...     parse_payload({"products": [{"name": "tee", "colour": "red"}]}, fields)
... except RequestError as error:
...     print(error.field, "-", error.message)
products[0].colour - unknown field; a product's fields are: image_base64, image_path, name, sku
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stackcat.data import TableSpec

DEFAULT_TOP_K = 5
MAX_TOP_K = 50
MAX_PRODUCTS = 1000
UPLOAD_FIELD = "image_base64"
PAYLOAD_KEYS = ("products", "top_k")


class RequestError(Exception):
    """A bad request: the field at fault, what is wrong, and the HTTP status to answer."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "field": self.field}


@dataclass(frozen=True)
class ProductFields:
    """The fields a product may have: from the training table's spec."""

    text: tuple[str, ...]
    attributes: tuple[str, ...]
    id: str | None
    image: str

    @classmethod
    def from_spec(cls, spec: TableSpec) -> ProductFields:
        if spec.json_column:
            text = (spec.json_column, *(c for c in (spec.shop_column, spec.sale_column) if c))
        else:
            text = tuple(spec.text_columns)
        return cls(text=text, attributes=tuple(spec.attribute_columns), id=spec.id_column,
                   image=spec.image_column or "image_path")

    @property
    def allowed(self) -> list[str]:
        named = [*self.text, *self.attributes, self.id, self.image, UPLOAD_FIELD]
        return sorted({name for name in named if name})

    def describe(self) -> dict[str, Any]:
        return {"text": list(self.text), "attributes": list(self.attributes), "id": self.id,
                "image_path": self.image, "image_upload": UPLOAD_FIELD}


def parse_payload(payload: Any, fields: ProductFields,
                  max_products: int = MAX_PRODUCTS) -> tuple[list[dict[str, Any]], int]:
    """The products of a request body (checked) and its ``top_k``."""
    if not isinstance(payload, dict):
        raise RequestError("body", f"expected a JSON object {{\"products\": [...]}}, got {_kind(payload)}")
    unknown = sorted(set(payload) - set(PAYLOAD_KEYS))
    if unknown:
        raise RequestError(unknown[0], f"unknown field; the body's fields are: {', '.join(PAYLOAD_KEYS)}")
    products = payload.get("products")
    if not isinstance(products, list) or not products:
        raise RequestError("products", f"expected a non-empty list of products, got {_kind(products)}")
    if len(products) > max_products:
        raise RequestError("products", f"{len(products):,} products in one request; at most {max_products:,}",
                           status=413)
    top_k = payload.get("top_k", DEFAULT_TOP_K)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
        raise RequestError("top_k", f"expected an integer from 1 to {MAX_TOP_K}, got {top_k!r}")
    return [check_product(product, index, fields) for index, product in enumerate(products)], top_k


def check_product(product: Any, index: int, fields: ProductFields) -> dict[str, Any]:
    """One product's fields, type-checked: text and attributes are strings, numbers or null."""
    where = f"products[{index}]"
    if not isinstance(product, dict):
        raise RequestError(where, f"expected an object of fields, got {_kind(product)}")
    allowed = fields.allowed
    for name, value in product.items():
        if name not in allowed:
            raise RequestError(f"{where}.{name}", f"unknown field; a product's fields are: {', '.join(allowed)}")
        if name in (fields.image, UPLOAD_FIELD):
            if value is not None and not isinstance(value, str):
                raise RequestError(f"{where}.{name}", f"expected a string, got {_kind(value)}")
        elif value is not None and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
            raise RequestError(f"{where}.{name}", f"expected a string or a number, got {_kind(value)}")
    if not any(_given(product.get(name)) for name in fields.text):
        raise RequestError(where, f"no product text: give at least one of {', '.join(fields.text)}")
    return product


def _given(value: Any) -> bool:
    return value is not None and str(value).strip() != ""


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


__all__ = ["DEFAULT_TOP_K", "MAX_PRODUCTS", "ProductFields", "RequestError", "UPLOAD_FIELD", "parse_payload"]
