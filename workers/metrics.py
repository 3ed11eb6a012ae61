"""Prometheus metrics of one worker process, served on GRISTMILL_METRICS_PORT (+ its slot) or
`gristmill worker --metrics-port P`.

Flower shows tasks and workers; these show what the engine does: items by outcome, device batch
sizes, padding, engine time per batch, how long messages wait in the queue and take to run, the
GPU memory in use, how often the score cache and the classifier tokenizer's chunk cache hit, and
how often the score cache's server failed a call.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .batcher import model_of

_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)

ITEMS = Counter("gristmill_items_total", "Items (input lines) this worker processed, by outcome; a redelivered "
                "message counts again, though its duplicate lines are never stored", ["model", "outcome"])
BATCH_SIZE = Histogram("gristmill_batch_size", "Items per device batch", ["model"],
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096))
BUSY = Counter("gristmill_engine_busy_seconds_total", "Time the engine spent running batches", ["model"])
TOKENS = Counter("gristmill_tokens_total", "Tokens in device batches: real ones, and padded slots", ["model", "kind"])
CHUNK_SECONDS = Histogram("gristmill_message_seconds", "From a message's start to its lines written",
                          ["queue"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
QUEUE_WAIT = Histogram("gristmill_queue_wait_seconds", "From a message's enqueue (by the producer) to its start "
                       "on this worker", ["queue"], buckets=_SECONDS)
ENGINE_SECONDS = Histogram("gristmill_engine_seconds", "Engine time per device batch", ["model"], buckets=_SECONDS)
GPU_MEMORY = Gauge("gristmill_gpu_memory_bytes", "GPU memory held by this worker's tensors (allocated) and by "
                   "torch's caching allocator (reserved)", ["kind"])
SPLITS = Counter("gristmill_batch_splits_total", "Batches split after an error or out-of-memory", ["model"])
CACHE_INPUTS = Counter("gristmill_score_cache_inputs_total", "Classifier inputs looked up in the score cache: hit "
                       "(answered by it) or miss (run, or shared with a repeat)", ["model", "outcome"])
CASCADE_INPUTS = Counter("gristmill_cascade_inputs_total", "Classifier inputs a cascade scored, by which of its models "
                         "decided them: the student, the full model (escalated near a threshold), or a three-stage "
                         "cascade's middle stage",
                         ["model", "decided_by"])
CACHE_ERRORS = Counter("gristmill_score_cache_errors_total", "Score-cache calls that failed (a lookup's inputs ran; "
                       "a publish's lines kept their own scores)", ["op"])


def on_batch(model: str, size: int, real_tokens: int, padded_tokens: int, seconds: float) -> None:
    model = model_of(model)  # a tagged batcher key: label by its model
    BATCH_SIZE.labels(model).observe(size)
    BUSY.labels(model).inc(seconds)
    ENGINE_SECONDS.labels(model).observe(seconds)
    TOKENS.labels(model, "real").inc(real_tokens)
    TOKENS.labels(model, "padded").inc(padded_tokens)


def on_split(model: str) -> None:
    SPLITS.labels(model_of(model)).inc()


def watch_gpu_memory() -> None:
    """Report the current CUDA device's memory at every scrape (a GPU worker sees one device)."""
    import torch
    if torch.cuda.is_available():
        GPU_MEMORY.labels("allocated").set_function(torch.cuda.memory_allocated)
        GPU_MEMORY.labels("reserved").set_function(torch.cuda.memory_reserved)


class _TokenizerCaches:
    """The classifier engines' tokenizer counters (kernels/tokenize.py), read at each scrape."""

    host = None  # the worker's EngineHost

    def collect(self):
        chunks = CounterMetricFamily("gristmill_tokenizer_chunks", "Whitespace chunks of classifier inputs that the "
                                     "tokenizer's cache answered (hit) or had to tokenize (miss)", labels=["model", "outcome"])
        held = GaugeMetricFamily("gristmill_tokenizer_cache_chunks", "Chunks held in the tokenizer's cache", labels=["model"])
        texts = CounterMetricFamily("gristmill_tokenizer_texts", "Classifier inputs tokenized by the C++ ASCII path "
                                    "(ascii) or passed to the other tokenizers (other)", labels=["model", "path"])
        for name, eng in (self.host.loaded() if self.host is not None else {}).items():
            cache = getattr(eng, "chunk_cache", None)
            if cache is not None:
                chunks.add_metric([name, "hit"], cache.hits)
                chunks.add_metric([name, "miss"], cache.misses)
                held.add_metric([name], len(cache.cache))
            fast = getattr(eng, "ascii_tokenizer", None)
            if fast is not None:
                texts.add_metric([name, "ascii"], fast.routed)
                texts.add_metric([name, "other"], fast.passed)
        yield chunks
        yield held
        yield texts


_TOKENIZER_CACHES = _TokenizerCaches()
REGISTRY.register(_TOKENIZER_CACHES)


def watch_tokenizers(host) -> None:
    """Report the tokenizer caches of `host`'s engines (the latest host, if called again)."""
    _TOKENIZER_CACHES.host = host


def serve(port: int, addr: str = "127.0.0.1") -> None:
    if port:
        start_http_server(port, addr=addr)
