"""blade's Prometheus metrics beside KServe's own on /metrics: requests by outcome, latency, batch sizes."""
from __future__ import annotations

from prometheus_client import Counter, Histogram

REQUESTS = Counter("blade_requests_total", "inference requests answered, by outcome (ok, invalid, error)",
                   ["model_name", "outcome"])
LATENCY = Histogram("blade_request_latency_seconds", "time from a request's arrival at the model to its answer",
                    ["model_name"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
BATCH_ROWS = Histogram("blade_batch_rows", "rows (items along the batch dim) in each call the batcher ran",
                       ["model_name"], buckets=(1, 2, 4, 8, 16, 32, 64, 128))
BATCH_REQUESTS = Histogram("blade_batch_requests", "requests joined into each call the batcher ran",
                           ["model_name"], buckets=(1, 2, 4, 8, 16, 32, 64))


def request_done(model: str, outcome: str, seconds: float) -> None:
    REQUESTS.labels(model_name=model, outcome=outcome).inc()
    LATENCY.labels(model_name=model).observe(seconds)


def batch_done(model: str, requests: int, rows: int) -> None:
    BATCH_ROWS.labels(model_name=model).observe(rows)
    BATCH_REQUESTS.labels(model_name=model).observe(requests)
