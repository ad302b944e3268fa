"""The categorization service: ``create_app`` (Starlette) and ``serve`` (uvicorn).

``stackcat serve RUN_OR_BUNDLE --port 8000`` loads the model once and answers
``POST /v1/categorize``; the same app serves the review page at ``/``. See
:mod:`stackcat.serve.app` for the endpoints.

Examples
--------
>>> from stackcat.serve import create_app                               # doctest: +SKIP
>>> app = create_app(Predictor.load("artifacts/demo"), corrections="corrections.sqlite")  # doctest: +SKIP
"""

from stackcat.serve.app import create_app
from stackcat.serve.server import serve

__all__ = ["create_app", "serve"]
