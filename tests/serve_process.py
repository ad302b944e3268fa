"""``stackcat serve`` as a real process on 127.0.0.1, for the tests that kill it or flood it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """``python -m stackcat.cli serve ARGS`` with the tests' toy models importable; waits for /health."""

    def __init__(self, *args: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stackcat.cli", "serve", *args, "--port", str(self.port)],
            stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 60) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}): {self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise TimeoutError(f"the server did not answer within {timeout} s: {self.log.read_text()}")

    def kill(self) -> None:
        self.process.kill()  # SIGKILL: no shutdown handler runs
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
