"""Benchmark of ``stackcat serve`` on loopback: cold start, latency, throughput under load, peak RSS.

Starts ``stackcat serve MODEL`` on 127.0.0.1 in its own process, then measures,
one after the other:

- cold start: from the process start to the first ``GET /health`` answered
  (imports, loading the model, the warm-up prediction);
- one text-only product: ``--requests`` sequential ``POST /v1/categorize``, p50 / p99;
- one product with a photo (a path under ``--image-root``, a different photo
  each time, so no embedding is cached): ``--photo-requests`` of them, p50 / p99;
- batch prediction: one request of ``--batch-rows`` text-only products (the
  model's rows/s when it gets a whole batch at once);
- load: ``--clients`` concurrent clients each sending one product per request,
  for ``--seconds``: requests, errors, rows/s and its share of batch rows/s;
- the server's peak RSS (``VmHWM`` of its process);
- the server's CPU time per request in each phase (user + system, all its threads): on a box
  shared with other jobs, wall times grow with the load average, CPU times much less, and on
  an idle box a one-thread server's latency is about its CPU time plus the loopback.

Products are the embedded demo's (their names, attributes and photos). Every
load is bounded in count and time, and nothing listens beyond 127.0.0.1.

    timeout 900 python experiments/bench_serve.py artifacts/demo --out experiments/results/serve.json

The machine's load average is recorded with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from stackcat.demo import DEMO_COLUMNS, load_demo

FIELDS = [*DEMO_COLUMNS["text_columns"], *DEMO_COLUMNS["attribute_columns"]]


def products(n: int, seed: int = 0, with_photo: bool = False) -> list[dict]:
    """``n`` demo products, each with its own text (a tag ``#<seed>-<i>`` after the name): the server
    keeps encoded texts in memory, so a text seen before would cost it nothing."""
    raw, _ = load_demo()
    rows = raw.sample(n=n, replace=n > len(raw), random_state=seed).to_dict("records")
    out = []
    for i, row in enumerate(rows):
        product = {name: (None if row[name] is None else str(row[name])) for name in FIELDS}
        product[FIELDS[0]] = unique_text(product[FIELDS[0]], f"{seed}-{i}")
        if with_photo:
            product["image_path"] = Path(row["image_path"]).name
        out.append(product)
    return out


def unique_text(text: str | None, tag: str) -> str:
    return f"{text or ''} #{tag}"


def start_server(model: str, port: int, image_root: str, log: Path,
                 options: list[str]) -> tuple[subprocess.Popen, float]:
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "stackcat.cli", "serve", model, "--port", str(port),
                                "--image-root", image_root, *options],
                               stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/health"
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return process, time.perf_counter() - start
        except httpx.HTTPError:
            time.sleep(0.05)
        if time.perf_counter() - start > 300:
            process.kill()
            raise TimeoutError("no answer within 300 s")


def latencies(client: httpx.Client, items: list[dict]) -> list[float]:
    out = []
    for product in items:
        began = time.perf_counter()
        answer = client.post("/v1/categorize", json={"products": [product]})
        out.append(time.perf_counter() - began)
        answer.raise_for_status()
    return out


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"n": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "max_ms": round(float(ms.max()), 1)}


def load(url: str, clients: int, seconds: float, pool: list[dict]) -> dict:
    stop = time.monotonic() + seconds
    counts = {"requests": 0, "errors": 0}
    lock = threading.Lock()
    times: list[float] = []

    def client_loop(index: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            step = index
            while time.monotonic() < stop:
                began = time.perf_counter()
                try:
                    product = dict(pool[step % len(pool)])
                    product[FIELDS[0]] = unique_text(product[FIELDS[0]], f"load-{step}")  # never seen before
                    ok = client.post("/v1/categorize", json={"products": [product]}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                with lock:
                    counts["requests"] += 1
                    counts["errors"] += not ok
                    times.append(time.perf_counter() - began)
                step += clients

    began = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    return {**counts, "clients": clients, "seconds": round(elapsed, 1),
            "rows_per_s": round(counts["requests"] / elapsed, 1), "latency": percentiles(times)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_ms_per_request(pid: int, requests: int, run: Callable[[], Any]) -> tuple[Any, float]:
    """``run()``'s result and the server's CPU milliseconds per request while it ran."""
    before = cpu_seconds(pid)
    result = run()
    return result, round(1000 * (cpu_seconds(pid) - before) / max(requests, 1), 1)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="run folder or bundle")
    parser.add_argument("--port", type=int, default=8731)
    parser.add_argument("--image-root", default=str(Path(__file__).resolve().parents[1] / "stackcat/demo/images"))
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--photo-requests", type=int, default=30)
    parser.add_argument("--batch-rows", type=int, default=512)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--threads", type=int, help="stackcat serve --threads (default: its own)")
    parser.add_argument("--batch-window-ms", type=float, help="stackcat serve --batch-window-ms (default: its own)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    options = [*(["--threads", str(args.threads)] if args.threads is not None else []),
               *(["--batch-window-ms", str(args.batch_window_ms)] if args.batch_window_ms is not None else [])]

    log = Path(tempfile.mkdtemp(prefix="bench-serve-")) / "server.log"
    load_before = [round(x, 2) for x in os.getloadavg()]
    process, cold = start_server(args.model, args.port, args.image_root, log, options)
    url = f"http://127.0.0.1:{args.port}"
    try:
        pid = process.pid
        with httpx.Client(base_url=url, timeout=120) as client:
            times, text_cpu = cpu_ms_per_request(pid, args.requests, lambda: latencies(
                client, products(args.requests, seed=1)))
            text_only = {**percentiles(times), "server_cpu_ms_per_request": text_cpu}
            times, photo_cpu = cpu_ms_per_request(pid, args.photo_requests, lambda: latencies(
                client, products(args.photo_requests, seed=2, with_photo=True)))
            photo = {**percentiles(times), "server_cpu_ms_per_request": photo_cpu}
            batch = products(args.batch_rows, seed=3)
            began = time.perf_counter()
            _, batch_cpu = cpu_ms_per_request(pid, args.batch_rows, lambda: client.post(
                "/v1/categorize", json={"products": batch}).raise_for_status())
            batch_rows_per_s = round(args.batch_rows / (time.perf_counter() - began), 1)
        under_load, load_cpu = cpu_ms_per_request(pid, 1, lambda: load(url, args.clients, args.seconds,
                                                                        products(2000, seed=4)))
        under_load["server_cpu_ms_per_product"] = round(load_cpu / max(under_load["requests"], 1), 1)
        under_load["share_of_batch"] = round(under_load["rows_per_s"] / batch_rows_per_s, 3)
        metrics = httpx.get(url + "/metrics").text
        rss = peak_rss_mb(process.pid)
    finally:
        process.terminate()
        process.wait(30)
    batches = [line for line in metrics.splitlines() if line.startswith("stackcat_batch_rows_")]
    report = {"model": args.model, "serve_options": options, "cold_start_s": round(cold, 2),
              "server_log": log.read_text().splitlines()[-3:], "text_only": text_only, "with_photo": photo,
              "batch": {"rows": args.batch_rows, "rows_per_s": batch_rows_per_s,
                        "server_cpu_ms_per_row": batch_cpu},
              "load": under_load,
              "server_peak_rss_mb": rss, "batch_rows_metrics": batches,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "load_average_before": load_before,
                          "load_average": [round(x, 2) for x in os.getloadavg()]}}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
