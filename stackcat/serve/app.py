"""The categorization service and its review page: ``create_app``.

A small explicit Starlette app around a loaded
:class:`~stackcat.predictor.Predictor`:

====================  ========================================================
``GET /``             the page: try a product, review a queue (static files)
``GET /health``       model version, the product fields, category count
``GET /v1/categories``  every category with its tree path
``POST /v1/categorize``  ``{"products": [...]}`` -> top-k, paths, review flag
``POST /v1/queue``    a predictions / label-issues CSV -> the review queue
``GET /v1/queue/pending``  products the service marked ``review``
``GET /v1/images/{id}``   a queued product's photo
``POST /v1/corrections``  a reviewer's decision, acknowledged once committed
``GET /v1/corrections.csv``  the decisions, as ``stackcat fit --corrections``
``GET /metrics``      Prometheus text
====================  ========================================================

Concurrent categorize requests are micro-batched (:mod:`~stackcat.serve.batching`).
Bad input is answered with a 4xx JSON body ``{"error", "field"}``; anything
unexpected with a JSON 500 (the traceback goes to the log, not the client).

Examples
--------
>>> from starlette.testclient import TestClient                     # doctest: +SKIP
>>> with TestClient(create_app(Predictor.load("artifacts/demo"))) as client:   # doctest: +SKIP
...     client.post("/v1/categorize", json={"products": [{"productDisplayName": "Nike tee"}]}).json()
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from stackcat.core import plain_value, set_threads
from stackcat.data import prepare_table
from stackcat.predictor import USABLE_IMAGE, ImageInput
from stackcat.serve.batching import DEFAULT_MAX_ROWS, DEFAULT_WINDOW_S, MicroBatcher
from stackcat.serve.images import ImagePolicy
from stackcat.serve.inputs import (
    MAX_PRODUCTS,
    MAX_TOP_K,
    UPLOAD_FIELD,
    ProductFields,
    RequestError,
    parse_payload,
)
from stackcat.serve.limits import BodyLimit, RequestMetrics
from stackcat.serve.metrics import Metrics
from stackcat.serve.queue import PendingQueue, ProductTable, queue_items, with_product
from stackcat.serve.store import CorrectionStore

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
# The column of a raw micro-batch holding each product's checked image file (not a training column).
IMAGE_FILE = "__stackcat_image_file"
STATIC_DIR = Path(__file__).parent / "static"
LOG = logging.getLogger("stackcat.serve")


def service_spec(predictor: Any) -> Any:
    """The fit's table spec without its image columns: the service places images itself (checked paths,
    uploads), so ``prepare_table`` reads none."""
    return replace(predictor.spec, image_column=None, image_dir=None)


class Service:
    """What the routes share: the predictor, the batcher, the image policy, the stores."""

    def __init__(self, predictor: Any, *, token: str | None, store: CorrectionStore | None,
                 images: ImagePolicy, products: ProductTable | None, window_s: float, max_batch_rows: int,
                 max_products: int, metrics: Metrics, threads: int | None = None) -> None:
        self.predictor = predictor
        self.fields = ProductFields.from_spec(predictor.spec)
        self.spec = service_spec(predictor)
        self.token = token
        self.store = store
        self.images = images
        self.products = products
        self.pending = PendingQueue()
        self.max_products = max_products
        self.metrics = metrics
        self.paths = dict(zip((str(c) for c in predictor.categories()["category"]), predictor.category_paths))
        self.batcher = MicroBatcher(self._predict, window_s=window_s, max_rows=max_batch_rows,
                                    on_batch=metrics.observe_batch,
                                    worker_setup=None if threads is None else partial(set_threads, threads))

    def _predict(self, raw: pd.DataFrame) -> pd.DataFrame:
        """Predictions of a micro-batch of raw products, with each product's ``title`` and ``text``.

        Preparing the batch here, in the worker thread, keeps the event loop free to read requests.
        """
        frame = prepare_table(raw, self.spec, with_target=False).frame
        frame["image_path"] = raw[IMAGE_FILE].to_numpy(dtype=object)
        predictions = self.predictor.predict_prepared(frame, top_k=MAX_TOP_K, images=self._checked_images(frame))
        return predictions.assign(title=frame["title"].to_numpy(dtype=object),
                                  text=frame["text"].to_numpy(dtype=object))

    def _checked_images(self, frame: pd.DataFrame) -> ImageInput | None:
        """The batch's image statuses, from the checks every image passed when its request came in
        (:class:`~stackcat.serve.images.ImagePolicy`): no image file is decoded a second time."""
        members = self.predictor.image_members
        if not members:
            return None
        paths = frame["image_path"].to_numpy(dtype=object)
        statuses = pd.DataFrame({"row": frame.index, "id": frame["id"].to_numpy(dtype=object), "image_path": paths,
                                 "status": [USABLE_IMAGE if path else "no_path" for path in paths]})
        return ImageInput(members, statuses, named=True)

    def raw_frame(self, products: list[dict[str, Any]], image_paths: list[str | None]) -> pd.DataFrame:
        """The products as a table named as the training table, with the checked image files."""
        columns = self.spec.required_columns(with_target=False)
        raw = pd.DataFrame({c: [p.get(c) for p in products] for c in columns}, dtype=object)
        raw[IMAGE_FILE] = pd.Series(image_paths, dtype=object)
        return raw

    def image_paths(self, products: list[dict[str, Any]], uploads: dict[int, bytes]) -> list[str | None]:
        paths: list[str | None] = []
        try:
            for index, product in enumerate(products):
                if index in uploads:
                    paths.append(self.images.uploaded_image(uploads[index], f"image_{index}"))
                elif product.get(UPLOAD_FIELD):
                    paths.append(self.images.uploaded_image(product[UPLOAD_FIELD],
                                                            f"products[{index}].{UPLOAD_FIELD}"))
                elif product.get(self.fields.image):
                    paths.append(self.images.path_image(product[self.fields.image],
                                                        f"products[{index}].{self.fields.image}"))
                else:
                    paths.append(None)
        except RequestError:
            self.images.release(paths)
            raise
        return paths

    def check_token(self, request: Request) -> None:
        if self.token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            raise RequestError("authorization", "this endpoint needs the server's token: "
                                                "'Authorization: Bearer TOKEN'", status=401)


# --------------------------------------------------------------------------- routes


async def health(request: Request) -> Response:
    service: Service = request.app.state.service
    return JSONResponse({"status": "ok", "model_version": service.predictor.model_version,
                         "categories": len(service.paths), "fields": service.fields.describe(),
                         "review": service.predictor.review.describe(),
                         "corrections": service.store is not None, "token_required": service.token is not None})


async def categories(request: Request) -> Response:
    table = request.app.state.service.predictor.categories()
    return JSONResponse({"categories": [{"category": str(c), "path": p, "n_train": int(n)}
                                        for c, p, n in table.itertuples(index=False)]})


async def categorize(request: Request) -> Response:
    service: Service = request.app.state.service
    payload, uploads = await _payload_and_uploads(request)
    products, top_k = parse_payload(payload, service.fields, service.max_products)
    bad_uploads = sorted(set(uploads) - set(range(len(products))))
    if bad_uploads:
        raise RequestError(f"image_{bad_uploads[0]}", f"an image for product {bad_uploads[0]}, "
                                                      f"but the request has {len(products)} product(s)")
    paths = await run_in_threadpool(service.image_paths, products, uploads)  # reads image headers
    try:
        predictions = await service.batcher.predict(service.raw_frame(products, paths))
    finally:
        service.images.release(paths)
    rows = [_prediction(row, top_k) for row in predictions.itertuples(index=False)]
    for row, product, path in zip(rows, predictions.itertuples(index=False), paths):
        if row["review"] == "review":
            service.pending.add(_pending_item(row, product, path, service))
    return JSONResponse({"model_version": service.predictor.model_version, "predictions": rows})


async def open_queue(request: Request) -> Response:
    service: Service = request.app.state.service
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=10, max_part_size=DEFAULT_MAX_BODY_BYTES)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise RequestError("file", "expected a CSV file in the form field 'file'")
        data = await upload.read()
    else:
        data = await request.body()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise RequestError("file", "not UTF-8 text") from None
    decided = await _latest_decisions(service)
    items = queue_items(text, paths=service.paths, products=service.products, decided=decided)
    return JSONResponse({"items": items})


async def pending_queue(request: Request) -> Response:
    service: Service = request.app.state.service
    decided = await _latest_decisions(service)
    items = [{**{k: v for k, v in item.items() if k != "image_file"}, "decided": decided.get(item["id"])}
             for item in service.pending.items()]
    return JSONResponse({"items": items})


async def image(request: Request) -> Response:
    service: Service = request.app.state.service
    product_id = request.path_params["product_id"]
    product = service.products.get(product_id) if service.products is not None else None
    path = product.get("image_path") if product else None
    if path is None and (item := service.pending.get(product_id)) is not None:
        path = item.get("image_file")
    if not path or not Path(path).is_file():
        raise RequestError("product_id", f"no photo for product {product_id!r}", status=404)
    return FileResponse(path)


async def add_correction(request: Request) -> Response:
    service: Service = request.app.state.service
    service.check_token(request)
    if service.store is None:
        raise RequestError("corrections", "this server keeps no corrections (start it with --corrections FILE)",
                           status=409)
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise RequestError("body", "expected a JSON object {\"id\", \"label\"}")
    unknown = sorted(set(body) - {"id", "label", "was", "source"})
    if unknown:
        raise RequestError(unknown[0], "unknown field; a correction's fields are: id, label, was, source")
    for name in ("id", "label"):
        if not isinstance(body.get(name), (str, int)) or isinstance(body.get(name), bool) or body[name] == "":
            raise RequestError(name, "expected a non-empty string")
    label = str(body["label"])
    if label not in service.paths:
        raise RequestError("label", f"unknown category {label!r}: pick one of the model's categories")
    for name in ("was", "source"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise RequestError(name, "expected a string or null")
    # the commit waits for the disk (synchronous=FULL): off the event loop
    record = await run_in_threadpool(service.store.add, str(body["id"]), label, was=body.get("was"),
                                     source=body.get("source"))
    return JSONResponse(record, status_code=201)


async def _latest_decisions(service: Service) -> dict[str, str]:
    """Each decided id's latest label, read off the event loop (a commit may hold the store's lock)."""
    return await run_in_threadpool(service.store.latest) if service.store is not None else {}


async def export_corrections(request: Request) -> Response:
    service: Service = request.app.state.service
    if service.store is None:
        raise RequestError("corrections", "this server keeps no corrections (start it with --corrections FILE)",
                           status=409)
    # off the event loop, as the writes are: the store's lock may be held through a commit's fsync
    return PlainTextResponse(await run_in_threadpool(service.store.export_csv), media_type="text/csv",
                             headers={"content-disposition": "attachment; filename=corrections.csv"})


async def metrics(request: Request) -> Response:
    return PlainTextResponse(request.app.state.service.metrics.exposition(),
                             media_type="text/plain; version=0.0.4")


async def index(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html")


# --------------------------------------------------------------------------- helpers


async def _json_body(request: Request) -> Any:
    data = await request.body()
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError("body", f"malformed JSON ({exc})", status=400) from None


async def _payload_and_uploads(request: Request) -> tuple[Any, dict[int, bytes]]:
    """A JSON body, or a multipart form: ``products`` (JSON text) and files ``image_<i>``."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return await _json_body(request), {}
    form = await request.form(max_files=MAX_PRODUCTS, max_fields=MAX_PRODUCTS + 1,
                              max_part_size=DEFAULT_MAX_BODY_BYTES)
    text = form.get("products")
    if not isinstance(text, str):
        raise RequestError("products", "a multipart request needs a 'products' field holding the JSON body")
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError("products", f"malformed JSON ({exc})", status=400) from None
    uploads: dict[int, bytes] = {}
    for name, value in form.multi_items():
        if name == "products":
            continue
        index = name.removeprefix("image_")
        if not name.startswith("image_") or not index.isdigit() or isinstance(value, str):
            raise RequestError(name, "unknown form field; expected 'products' and files 'image_<index>'")
        uploads[int(index)] = await value.read()
    return payload, uploads


def _prediction(row: Any, top_k: int) -> dict[str, Any]:
    top = [{"category": str(c), "probability": round(float(p), 6), "path": path}
           for c, p, path in zip(row.top_categories[:top_k], row.top_probabilities[:top_k], row.top_paths[:top_k])]
    return {"id": plain_value(row.id), "category": str(row.category), "probability": round(float(row.probability), 6),
            "review": row.review, "top": top}


def _pending_item(row: dict[str, Any], product: Any, path: str | None, service: Service) -> dict[str, Any]:
    kept_image = path if path and service.images.is_root_file(path) else None
    item = {"id": str(row["id"]), "kind": "pending", "proposed": row["category"],
            "probability": row["probability"], "review": row["review"],
            "candidates": row["top"][:5], "title": product.title, "text": product.text,
            "has_image": kept_image is not None, "image_file": kept_image}
    return with_product(item, service.products)


async def _request_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestError)
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail, "field": None}, status_code=exc.status_code)


async def _server_error(request: Request, exc: Exception) -> Response:
    LOG.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server logged the details",
                         "field": None}, status_code=500)


# --------------------------------------------------------------------------- the app


def create_app(predictor: Any, *, token: str | None = None, corrections: str | Path | None = None,
               image_roots: Sequence[str | Path] = (), products: str | Path | None = None,
               batch_window_ms: float = DEFAULT_WINDOW_S * 1000, max_batch_rows: int = DEFAULT_MAX_ROWS,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_products: int = MAX_PRODUCTS,
               threads: int | None = None) -> Starlette:
    """The service's ASGI app around a loaded predictor.

    Parameters
    ----------
    predictor : Predictor
        The loaded model (see :meth:`stackcat.predictor.Predictor.load`).
    token : str, optional
        When set, ``POST /v1/corrections`` needs ``Authorization: Bearer TOKEN``.
    corrections : path, optional
        The SQLite file of reviewers' decisions (none kept without it).
    image_roots : sequence of path
        Folders whose images requests may name by path.
    products : path, optional
        The products table whose text and photos the review queue shows.
    batch_window_ms : float, default=4
        How long a request waits for concurrent ones to be predicted together.
    max_batch_rows : int, default=512
        Products predicted in one model call at most.
    max_body_bytes : int, default=8 MiB
        Larger request bodies get 413.
    max_products : int, default=1000
        Products in one request at most.
    threads : int, optional
        Threads the model computes on (:func:`stackcat.core.set_threads`, in the
        thread that predicts); None leaves the libraries' defaults.

    Examples
    --------
    >>> app = create_app(predictor, corrections="corrections.sqlite")   # doctest: +SKIP
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)                   # doctest: +SKIP
    """
    if batch_window_ms < 0 or max_batch_rows < 1 or max_body_bytes < 1 or max_products < 1:
        raise ValueError("batch_window_ms must be >= 0 and max_batch_rows, max_body_bytes, max_products >= 1")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    product_table = ProductTable.read(products, predictor.spec) if products is not None else None
    roots = list(image_roots)
    store = CorrectionStore(corrections) if corrections is not None else None
    registry = Metrics()
    service = Service(predictor, token=token, store=store, images=ImagePolicy(roots), products=product_table,
                      window_s=batch_window_ms / 1000, max_batch_rows=max_batch_rows,
                      max_products=max_products, metrics=registry, threads=threads)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await service.batcher.start()
        try:
            yield
        finally:
            await service.batcher.stop()
            service.images.close()
            if store is not None:
                store.close()

    routes = [
        Route("/", index),
        Route("/health", health),
        Route("/metrics", metrics),
        Route("/v1/categories", categories),
        Route("/v1/categorize", categorize, methods=["POST"]),
        Route("/v1/queue", open_queue, methods=["POST"]),
        Route("/v1/queue/pending", pending_queue),
        Route("/v1/images/{product_id:path}", image),
        Route("/v1/corrections", add_correction, methods=["POST"]),
        Route("/v1/corrections.csv", export_corrections),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={RequestError: _request_error, HTTPException: _http_error,
                                        Exception: _server_error})
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=registry)
    return app


__all__ = ["DEFAULT_MAX_BODY_BYTES", "create_app"]
