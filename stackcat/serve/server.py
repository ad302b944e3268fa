"""Running the service: ``serve`` loads a run folder or bundle once and starts uvicorn.

Examples
--------
>>> serve("artifacts/demo", port=8000, corrections="corrections.sqlite")   # doctest: +SKIP
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stackcat.core import set_threads
from stackcat.data import prepare_table
from stackcat.serve.app import DEFAULT_MAX_BODY_BYTES, create_app, service_spec
from stackcat.serve.batching import DEFAULT_WINDOW_S

DEFAULT_HOST = "127.0.0.1"
# Threads the model computes on: one product's tiny matrix products gain nothing from more, and on a
# few cores the event loop (reading requests, writing answers) needs the others.
DEFAULT_THREADS = 1
DEFAULT_PORT = 8000
# Connections held at once (idle ones included) before new requests get 503.
MAX_CONNECTIONS = 2048
# Seconds an idle keep-alive connection stays open after a response.
KEEP_ALIVE_S = 5


def serve(model: str | Path, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token: str | None = None,
          corrections: str | Path | None = None, image_roots: Sequence[str | Path] = (),
          products: str | Path | None = None, precision: float = 0.99, trusted: bool = False,
          batch_window_ms: float = DEFAULT_WINDOW_S * 1000, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
          threads: int = DEFAULT_THREADS, log_level: str = "info") -> None:
    """Load ``model`` (a run folder or a bundle) and answer requests until stopped (Ctrl-C, SIGTERM).

    Everything that can be wrong with the arguments is checked before the model loads. The model
    computes on ``threads`` threads (:func:`stackcat.core.set_threads`).
    """
    import uvicorn

    from stackcat.predictor import Predictor

    for root in image_roots:
        if not Path(root).is_dir():
            raise FileNotFoundError(f"--image-root {root}: no such folder")
    if products is not None and not Path(products).is_file():
        raise FileNotFoundError(f"--products {products}: no such file")
    if threads < 1:
        raise ValueError(f"--threads {threads}: expected 1 or more")
    start = time.perf_counter()
    predictor = Predictor.load(model, trusted=trusted, precision=precision)
    set_threads(threads)  # before the warm-up: the encoders' sessions take their thread count when made
    warm_up(predictor)
    app = create_app(predictor, token=token, corrections=corrections, image_roots=image_roots,
                     products=products, batch_window_ms=batch_window_ms, max_body_bytes=max_body_bytes,
                     threads=threads)
    print(f"loaded {model} ({predictor.model_version}, {len(predictor.classes):,} categories) in "
          f"{time.perf_counter() - start:.1f} s; serving on http://{host}:{port}", file=sys.stderr, flush=True)
    _allow_connections(MAX_CONNECTIONS + 64)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False,
                limit_concurrency=MAX_CONNECTIONS, backlog=MAX_CONNECTIONS, timeout_keep_alive=KEEP_ALIVE_S)


def warm_up(predictor: Any) -> None:
    """Predict one made-up product: every model file is read (and checked) now, not on the first request."""
    import pandas as pd

    spec = service_spec(predictor)
    raw = pd.DataFrame({column: ["warm up"] for column in spec.required_columns(with_target=False)}, dtype=object)
    frame = prepare_table(raw, spec, with_target=False).frame
    predictor.predict_prepared(frame)


def _allow_connections(wanted: int) -> None:
    """Raise the open-file limit so that ``wanted`` sockets fit (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "DEFAULT_THREADS", "serve"]
