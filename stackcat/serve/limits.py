"""ASGI middleware of the service: ``BodyLimit`` (413 over a size) and ``RequestMetrics``.

Examples
--------
>>> app = BodyLimit(RequestMetrics(some_app, metrics=Metrics()), max_bytes=1 << 20)   # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from typing import Any

from stackcat.serve.inputs import RequestError
from stackcat.serve.metrics import Metrics

# /metrics labels: the route, not the URL (an id in the path would make a series per product)
PATH_LABELS = ("/health", "/metrics", "/v1/categories", "/v1/categorize", "/v1/queue/pending", "/v1/queue",
               "/v1/corrections.csv", "/v1/corrections", "/v1/images", "/static", "/")


def path_label(path: str) -> str:
    for label in PATH_LABELS:
        if path == label or (label not in ("/",) and path.startswith(label + "/")):
            return label
    return "other"


class BodyLimit:
    """Answers 413 to a body over ``max_bytes``: from its Content-Length before reading, or while streaming."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await _send_json(send, 413, {"error": f"request body over {self.max_bytes:,} bytes", "field": "body"})
            return
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise RequestError("body", f"request body over {self.max_bytes:,} bytes", status=413)
            return message

        await self.app(scope, limited_receive, send)


class RequestMetrics:
    """Counts every answered request by route and status, with its latency."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def recorded_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recorded_send)
        finally:
            self.metrics.observe(path_label(scope["path"]), status, time.perf_counter() - start)


async def _send_json(send: Any, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})


__all__ = ["BodyLimit", "RequestMetrics", "path_label"]
