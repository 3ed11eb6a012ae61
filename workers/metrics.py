"""Prometheus metrics of one worker process, served on GRISTMILL_METRICS_PORT (+ the GPU index).

Flower shows tasks and workers; these show what the engine does: items by outcome, device batch
sizes, padding, engine busy time, and how long each message takes from start to written.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

ITEMS = Counter("gristmill_items_total", "Items (input lines) this worker processed, by outcome; a redelivered "
                "message counts again, though its duplicate lines are never stored", ["model", "outcome"])
BATCH_SIZE = Histogram("gristmill_batch_size", "Items per device batch", ["model"],
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096))
BUSY = Counter("gristmill_engine_busy_seconds_total", "Time the engine spent running batches", ["model"])
TOKENS = Counter("gristmill_tokens_total", "Tokens in device batches: real ones, and padded slots", ["model", "kind"])
CHUNK_SECONDS = Histogram("gristmill_message_seconds", "From a message's start to its lines written",
                          ["queue"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
SPLITS = Counter("gristmill_batch_splits_total", "Batches split after an error or out-of-memory", ["model"])


def on_batch(model: str, size: int, real_tokens: int, padded_tokens: int, seconds: float) -> None:
    BATCH_SIZE.labels(model).observe(size)
    BUSY.labels(model).inc(seconds)
    TOKENS.labels(model, "real").inc(real_tokens)
    TOKENS.labels(model, "padded").inc(padded_tokens)


def on_split(model: str) -> None:
    SPLITS.labels(model).inc()


def serve(port: int) -> None:
    if port:
        start_http_server(port, addr="127.0.0.1")
