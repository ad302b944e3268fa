"""The service's API through Starlette's TestClient: answers, micro-batching, metrics, bad input."""

from __future__ import annotations

import base64
import io
import json
import struct
import warnings
import zlib

import pytest
from PIL import Image
from starlette.testclient import TestClient

from stackcat.serve import create_app

from serve_fixtures import toy_predictor


@pytest.fixture(scope="module")
def predictor():
    return toy_predictor()


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    Image.new("RGB", (32, 24), (200, 30, 30)).save(root / "red.jpg")
    (root / "broken.jpg").write_bytes(b"not an image at all")
    return root


@pytest.fixture
def client(predictor, image_root, tmp_path):
    app = create_app(predictor, corrections=tmp_path / "corrections.sqlite", image_roots=[image_root],
                     max_body_bytes=1_000_000)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def categorize(client, *products, **extra):
    return client.post("/v1/categorize", json={"products": list(products), **extra})


def test_one_product_gets_its_top_k_with_paths_review_flag_and_version(client):
    answer = categorize(client, {"sku": "a1", "name": "w2 n3 n4", "colour": "red"}, top_k=3)
    assert answer.status_code == 200
    body = answer.json()
    assert body["model_version"] == "toy-1"
    [prediction] = body["predictions"]
    assert prediction["id"] == "a1" and prediction["category"] == "class 2"
    assert [c["category"] for c in prediction["top"]][0] == "class 2" and len(prediction["top"]) == 3
    assert prediction["top"][0]["path"] == "class 2" and prediction["review"] in ("auto", "review")
    probabilities = [c["probability"] for c in prediction["top"]]
    assert probabilities == sorted(probabilities, reverse=True) and probabilities[0] == prediction["probability"]


def test_many_products_keep_their_order_and_equal_batch_prediction(client, predictor):
    import pandas as pd

    products = [{"sku": f"p{i}", "name": f"w{i % 4} n{i}"} for i in range(20)]
    served = categorize(client, *products).json()["predictions"]
    offline = predictor.categorize(pd.DataFrame({"sku": [p["sku"] for p in products],
                                                 "name": [p["name"] for p in products],
                                                 "colour": None, "photo": None}))
    assert [p["id"] for p in served] == [p["sku"] for p in products]
    assert [p["category"] for p in served] == offline["category"].tolist()
    assert [p["probability"] for p in served] == pytest.approx(offline["probability"].tolist(), abs=1e-6)


def test_concurrent_requests_are_predicted_in_fewer_model_calls(predictor):
    import asyncio

    import httpx

    app = create_app(predictor, batch_window_ms=50)

    async def run():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                answers = await asyncio.gather(*(http.post("/v1/categorize", json={"products": [
                    {"sku": str(i), "name": f"w{i % 4}"}]}) for i in range(16)))
            return answers, app.state.service.batcher.batches

    answers, batches = asyncio.run(run())
    assert all(a.status_code == 200 for a in answers)
    assert [a.json()["predictions"][0]["id"] for a in answers] == [str(i) for i in range(16)]
    assert batches < 16


def test_health_categories_and_metrics(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["categories"] == 4
    assert health["fields"]["text"] == ["name"] and health["fields"]["image_path"] == "photo"
    categories = client.get("/v1/categories").json()["categories"]
    assert [c["category"] for c in categories] == ["class 0", "class 1", "class 2", "class 3"]
    categorize(client, {"name": "w1"})
    client.post("/v1/categorize", content=b"{")
    text = client.get("/metrics").text
    assert 'stackcat_requests_total{path="/v1/categorize",status="200"} 1' in text
    assert 'stackcat_errors_total{path="/v1/categorize"} 1' in text
    assert 'stackcat_request_seconds_bucket{path="/v1/categorize",le="+Inf"} 2' in text
    assert "stackcat_batch_rows_count 1" in text


def test_a_photo_by_path_under_the_root_or_uploaded(client, image_root):
    by_path = categorize(client, {"name": "w1", "photo": "red.jpg"})
    assert by_path.status_code == 200
    data = (image_root / "red.jpg").read_bytes()
    uploaded = categorize(client, {"name": "w1", "image_base64": base64.b64encode(data).decode()})
    assert uploaded.status_code == 200
    form = client.post("/v1/categorize", data={"products": json.dumps({"products": [{"name": "w1"}]})},
                       files={"image_0": ("red.jpg", data, "image/jpeg")})
    assert form.status_code == 200, form.text


def test_each_image_is_checked_once_and_a_product_without_one_goes_to_review(image_root, tmp_path, monkeypatch):
    import stackcat.features.images as images
    import stackcat.serve.images as serve_images

    predictor = toy_predictor()
    predictor._image_members = ("image",)  # as if a member read the photos
    checked, statuses = [], images.image_statuses

    def counted(paths, **options):
        checked.extend(paths)
        return statuses(paths, **options)

    monkeypatch.setattr(serve_images, "image_statuses", counted)
    monkeypatch.setattr(images, "image_statuses", counted)
    with TestClient(create_app(predictor, image_roots=[image_root])) as client:
        with_photo = categorize(client, {"name": "w1", "photo": "red.jpg"}).json()["predictions"][0]
        without = categorize(client, {"name": "w1"}).json()["predictions"][0]
    assert len(checked) == 1  # by the request's check; the prediction reuses it
    assert without["review"] == "review" and with_photo["probability"] == without["probability"]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("body", "status", "field"), [
    (b"{\"products\": [", 400, "body"),
    (b"[1, 2]", 422, "body"),
    (b"{\"products\": []}", 422, "products"),
    (b"{\"products\": {\"name\": \"x\"}}", 422, "products"),
    (b"{\"products\": [{\"name\": \"x\"}], \"verbose\": true}", 422, "verbose"),
    (b"{\"products\": [{\"name\": \"x\", \"price\": 3}]}", 422, "products[0].price"),
    (b"{\"products\": [{\"name\": [\"x\"]}]}", 422, "products[0].name"),
    (b"{\"products\": [{\"name\": \"x\", \"colour\": {\"a\": 1}}]}", 422, "products[0].colour"),
    (b"{\"products\": [\"x\"]}", 422, "products[0]"),
    (b"{\"products\": [{\"colour\": \"red\"}]}", 422, "products[0]"),
    (b"{\"products\": [{\"name\": \"x\"}], \"top_k\": \"5\"}", 422, "top_k"),
    (b"{\"products\": [{\"name\": \"x\"}], \"top_k\": 0}", 422, "top_k"),
    (b"\xff\xfe", 400, "body"),
])
def test_malformed_or_mistyped_bodies_get_a_4xx_naming_the_field(client, body, status, field):
    answer = client.post("/v1/categorize", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == status, answer.text
    assert answer.json()["field"] == field and answer.json()["error"]


def test_a_10_mb_body_is_refused_with_413(client):
    answer = client.post("/v1/categorize", content=b"x" * 10_000_000)
    assert answer.status_code == 413 and answer.json()["field"] == "body"
    assert client.get("/health").status_code == 200


def test_a_chunked_body_over_the_limit_is_refused_while_streaming(client):
    def chunks():
        for _ in range(40):
            yield b"x" * 100_000

    answer = client.post("/v1/categorize", content=chunks())
    assert answer.status_code == 413 and answer.json()["field"] == "body"


def test_too_many_products_in_one_request(predictor):
    with TestClient(create_app(predictor, max_products=3)) as small:
        answer = categorize(small, *({"name": "w1"} for _ in range(4)))
    assert answer.status_code == 413 and answer.json()["field"] == "products"


def hundred_megapixel_png() -> bytes:
    """A valid PNG header of 10,000 x 10,000 pixels (the pixel data is never reached)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 10_000, 10_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) \
        + chunk(b"IEND", b"")


def test_a_100_megapixel_image_is_refused_by_the_fits_pixel_limit(client, image_root):
    data = hundred_megapixel_png()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert Image.open(io.BytesIO(data)).size == (10_000, 10_000)
    uploaded = categorize(client, {"name": "w1", "image_base64": base64.b64encode(data).decode()})
    assert uploaded.status_code == 413 and uploaded.json()["field"] == "products[0].image_base64"
    (image_root / "huge.png").write_bytes(data)
    by_path = categorize(client, {"name": "w1", "photo": "huge.png"})
    assert by_path.status_code == 413 and by_path.json()["field"] == "products[0].photo"


@pytest.mark.parametrize(("photo", "status"), [
    ("/etc/passwd", 403), ("../../../etc/passwd", 403), ("nope.jpg", 422), ("broken.jpg", 422)])
def test_image_paths_outside_the_roots_missing_or_unreadable(client, photo, status):
    answer = categorize(client, {"name": "w1", "photo": photo})
    assert answer.status_code == status and answer.json()["field"] == "products[0].photo"


def test_an_empty_image_path_is_a_product_without_a_photo(client):
    assert categorize(client, {"name": "w1", "photo": ""}).status_code == 200


def test_bad_uploads(client):
    not_base64 = categorize(client, {"name": "w1", "image_base64": "***"})
    assert not_base64.status_code == 422 and not_base64.json()["field"] == "products[0].image_base64"
    extra_file = client.post("/v1/categorize", data={"products": json.dumps({"products": [{"name": "w1"}]})},
                             files={"image_3": ("x.jpg", b"123", "image/jpeg")})
    assert extra_file.status_code == 422 and extra_file.json()["field"] == "image_3"


def test_unknown_paths_and_methods_get_json_errors(client):
    assert client.get("/v1/nothing").json()["error"] == "Not Found"
    assert client.get("/v1/categorize").status_code == 405


def test_an_unexpected_failure_is_a_json_500_without_traceback(predictor):
    class Broken:
        def __getattr__(self, name):
            return getattr(predictor, name)

        def predict_prepared(self, frame, top_k):
            raise ZeroDivisionError("boom")

    with TestClient(create_app(Broken()), raise_server_exceptions=False) as broken:
        answer = categorize(broken, {"name": "w1"})
        assert answer.status_code == 500
        assert "Traceback" not in answer.text and answer.json()["error"].startswith("internal error")
        assert broken.get("/health").status_code == 200


def test_the_batchers_worker_thread_is_set_up_before_its_first_batch():
    import asyncio
    import threading

    import pandas as pd

    from stackcat.serve.batching import MicroBatcher

    setup_threads, model_threads = [], []

    async def run():
        batcher = MicroBatcher(lambda frame: model_threads.append(threading.get_ident()) or frame,
                               worker_setup=lambda: setup_threads.append(threading.get_ident()))
        await batcher.start()
        for i in range(2):
            await batcher.predict(pd.DataFrame({"x": [i]}))
        await batcher.stop()

    asyncio.run(run())
    assert len(setup_threads) == 1 and model_threads == setup_threads * 2
    assert setup_threads[0] != threading.get_ident()


def test_set_threads_caps_the_process_and_limit_threads_never_raises_it(monkeypatch):
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    from stackcat import core

    monkeypatch.setattr(core, "_thread_budget", None)
    before = torch.get_num_threads()
    try:
        with threadpool_limits(limits=None):  # puts the libraries' threads back after the block
            core.set_threads(1)
            assert torch.get_num_threads() == 1
            assert all(info["num_threads"] == 1 for info in threadpool_info())
            with core.limit_threads(2):
                assert torch.get_num_threads() == 1
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_requests_arriving_while_the_model_is_busy_form_the_next_batch():
    import asyncio
    import time as clock

    import pandas as pd

    from stackcat.serve.batching import MicroBatcher

    sizes = []

    def slow_model(frame):
        sizes.append(len(frame))
        clock.sleep(0.2)
        return frame

    async def run():
        batcher = MicroBatcher(slow_model, window_s=0.001)
        await batcher.start()
        first = asyncio.create_task(batcher.predict(pd.DataFrame({"x": [0]})))
        await asyncio.sleep(0.05)  # the first batch is being predicted
        later = [asyncio.create_task(batcher.predict(pd.DataFrame({"x": [i]}))) for i in range(1, 11)]
        await asyncio.sleep(0.01)
        even_later = asyncio.create_task(batcher.predict(pd.DataFrame({"x": [11, 12]})))
        answers = await asyncio.gather(first, *later, even_later)
        await batcher.stop()
        return [a["x"].tolist() for a in answers]

    answers = asyncio.run(run())
    assert answers == [[i] for i in range(11)] + [[11, 12]]
    assert sizes == [1, 12]


def test_serve_refuses_bad_arguments_before_loading_the_model(tmp_path, capsys):
    from stackcat.cli import EXIT_RUN_ERROR, EXIT_USAGE, main

    assert main(["serve", str(tmp_path), "--port", "70000"]) == EXIT_USAGE
    assert "--port 70000" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--precision", "2"]) == EXIT_USAGE
    assert main(["serve", str(tmp_path), "--image-root", str(tmp_path / "nope")]) == EXIT_RUN_ERROR
    assert "--image-root" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--products", str(tmp_path / "nope.csv")]) == EXIT_RUN_ERROR
    assert "--products" in capsys.readouterr().err


def test_serve_listens_on_loopback_unless_told_otherwise():
    from stackcat.cli import build_parser

    args = build_parser().parse_args(["serve", "run"])
    assert (args.host, args.port, args.token, args.corrections) == ("127.0.0.1", 8000, None, None)
