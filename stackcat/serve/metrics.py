"""The service's Prometheus metrics, in the text exposition format: ``Metrics``.

Three families, written by hand (the format is a few lines; no dependency):
``stackcat_requests_total{path,status}``, ``stackcat_errors_total{path}``
(4xx and 5xx answers) and ``stackcat_request_seconds`` (a latency histogram
per path), plus ``stackcat_predicted_products_total`` and
``stackcat_batch_rows`` (how many products each model call predicted).

Examples
--------
>>> metrics = Metrics()
>>> metrics.observe("/v1/categorize", 200, 0.012)
>>> 'stackcat_requests_total{path="/v1/categorize",status="200"} 1' in metrics.exposition()
True
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.total += value

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out, cumulative = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts):
            cumulative += count
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {cumulative}')
        braces = f"{{{labels}}}" if labels else ""
        out.append(f"{name}_sum{braces} {self.total:.6f}")
        out.append(f"{name}_count{braces} {cumulative}")
        return out


class Metrics:
    """Counters and histograms of the running service (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, int], int] = defaultdict(int)
        self._errors: dict[str, int] = defaultdict(int)
        self._latency: dict[str, _Histogram] = {}
        self._batch_rows = _Histogram(BATCH_BUCKETS)
        self._predicted = 0

    def observe(self, path: str, status: int, seconds: float) -> None:
        """One answered request."""
        with self._lock:
            self._requests[(path, status)] += 1
            if status >= 400:
                self._errors[path] += 1
            self._latency.setdefault(path, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def observe_batch(self, rows: int) -> None:
        """One model call over ``rows`` products (several requests micro-batched together)."""
        with self._lock:
            self._batch_rows.observe(rows)
            self._predicted += rows

    def exposition(self) -> str:
        """The Prometheus text format (version 0.0.4)."""
        with self._lock:
            lines = ["# HELP stackcat_requests_total Requests answered, by path and status.",
                     "# TYPE stackcat_requests_total counter"]
            lines += [f'stackcat_requests_total{{path="{p}",status="{s}"}} {n}'
                      for (p, s), n in sorted(self._requests.items())]
            lines += ["# HELP stackcat_errors_total Requests answered with a 4xx or 5xx status, by path.",
                      "# TYPE stackcat_errors_total counter"]
            lines += [f'stackcat_errors_total{{path="{p}"}} {n}' for p, n in sorted(self._errors.items())]
            lines += ["# HELP stackcat_request_seconds Time to answer a request, by path.",
                      "# TYPE stackcat_request_seconds histogram"]
            for path, histogram in sorted(self._latency.items()):
                lines += histogram.lines("stackcat_request_seconds", f'path="{path}"')
            lines += ["# HELP stackcat_predicted_products_total Products predicted.",
                      "# TYPE stackcat_predicted_products_total counter",
                      f"stackcat_predicted_products_total {self._predicted}",
                      "# HELP stackcat_batch_rows Products per model call (micro-batches).",
                      "# TYPE stackcat_batch_rows histogram"]
            lines += self._batch_rows.lines("stackcat_batch_rows", "")
        return "\n".join(lines) + "\n"


__all__ = ["LATENCY_BUCKETS", "Metrics"]
