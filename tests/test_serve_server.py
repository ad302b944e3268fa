"""The service as a real uvicorn process: kill -9 durability, idle connections, a tampered run folder."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading

import httpx
import pytest

from serve_process import REPO, ServerProcess, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, toy_model_in_the_cli):
    from stackcat.cli import EXIT_OK, main

    from toy_models import write_toy_csv

    folder = tmp_path_factory.mktemp("serve-run")
    train = write_toy_csv(folder / "train.csv")
    run_dir = folder / "run"
    assert main(["fit", str(train), "--target", "label", "--text-columns", "text", "--id-column", "id",
                 "--models", "toy", "--folds", "2", "--meta", "average", "--no-progress",
                 "--run-dir", str(run_dir)]) == EXIT_OK
    return run_dir


@pytest.fixture
def server(toy_run, tmp_path):
    started = []

    def start(*extra: str) -> ServerProcess:
        process = ServerProcess(str(toy_run), *extra, log=tmp_path / "server.log").wait_ready()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def test_kill_9_while_posting_1000_corrections_loses_no_acknowledged_one(server, tmp_path):
    database = tmp_path / "corrections.sqlite"
    first = server("--corrections", str(database))
    acknowledged: list[int] = []
    enough = threading.Event()

    def post_all() -> None:
        with httpx.Client(base_url=first.url, timeout=5) as client:
            for number in range(1000):
                try:
                    answer = client.post("/v1/corrections", json={"id": f"p{number}", "label": "class 1"})
                except httpx.HTTPError:
                    return  # the server is gone
                if answer.status_code == 201:
                    acknowledged.append(number)
                if number == 300:
                    enough.set()

    poster = threading.Thread(target=post_all)
    poster.start()
    assert enough.wait(60), "the client did not get 300 corrections through"
    first.kill()
    poster.join(30)
    assert 300 <= len(acknowledged) < 1000, len(acknowledged)
    second = server("--corrections", str(database))
    exported = httpx.get(second.url + "/v1/corrections.csv").text.splitlines()[1:]
    kept = {line.split(",")[0] for line in exported}
    assert {f"p{n}" for n in acknowledged} <= kept


def test_1000_idle_connections_do_not_stop_the_service(server):
    running = server()
    idle = []
    try:
        for _ in range(1000):
            idle.append(socket.create_connection(("127.0.0.1", running.port), timeout=5))
        answer = httpx.post(running.url + "/v1/categorize", json={"products": [{"text": "w1"}]}, timeout=30)
        assert answer.status_code in (200, 503)  # served, or a bounded refusal
    finally:
        for connection in idle:
            connection.close()
    assert httpx.post(running.url + "/v1/categorize", json={"products": [{"text": "w1"}]},
                      timeout=30).status_code == 200
    assert running.process.poll() is None


def test_malformed_requests_over_the_wire_leave_the_server_up(server):
    running = server()
    with socket.create_connection(("127.0.0.1", running.port), timeout=5) as raw:
        raw.sendall(b"POST /v1/categorize HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n{")
        assert b" 413 " in raw.recv(4096).split(b"\r\n")[0] + b" "
    with socket.create_connection(("127.0.0.1", running.port), timeout=5) as raw:
        raw.sendall(b"NONSENSE\r\n\r\n")
        assert raw.recv(4096).startswith(b"HTTP/1.1 400")
    assert httpx.get(running.url + "/health").status_code == 200


def test_a_tampered_run_folder_refuses_to_start_naming_the_file(toy_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(toy_run, copy)
    model_file = next(p for p in sorted(copy.rglob("*.joblib")) if p.name != "stacker.joblib")
    model_file.write_bytes(model_file.read_bytes() + b"tampered")
    env_path = f"{REPO}:{REPO / 'tests'}"
    result = subprocess.run([sys.executable, "-m", "stackcat.cli", "serve", str(copy), "--port", str(free_port())],
                            capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "PYTHONPATH": env_path})
    assert result.returncode != 0
    assert model_file.name in result.stderr, result.stderr
