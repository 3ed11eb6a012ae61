"""The Celery app factory: the broker contract shared by producers and workers.

`gristmill.producers.app:app` is built lazily from the environment (for `celery -A` and Flower).
"""

from __future__ import annotations

from typing import Any

import orjson
import zstandard
from celery import Celery
from kombu import Exchange, Queue, compression
from kombu.serialization import register
from kombu.utils import json as kombu_json

from . import constants as C
from .redis_server import is_sentinel, master_name, resolve_redis_url
from .schemas import loads_line
from .settings import Settings

# Task messages are JSON, written by orjson and read back exactly (`schemas.loads_line`: orjson
# where it gives the standard library's value). kombu's JSON spent ~6 us per line encoding a chunk
# at ingest, orjson ~0.7. A content type of its own, so plain JSON (events, results, messages
# from other clients) still goes through kombu's JSON; workers accept both.
SERIALIZER = "gristmill-json"
CONTENT_TYPE = "application/x-gristmill-json"


def _encode(body: Any) -> bytes | str:
    try:
        return orjson.dumps(body)
    except TypeError:  # integers beyond 64 bits, lone surrogates: what kombu's JSON wrote
        return kombu_json.dumps(body)


def _decode(data: bytes | str) -> Any:
    try:
        return loads_line(data)
    except ValueError as e:  # kombu reports it as a DecodeError naming the message
        raise ValueError(f"task message is not JSON: {e}") from None


register(SERIALIZER, _encode, _decode, content_type=CONTENT_TYPE, content_encoding="utf-8")

# Task messages are zstd-compressed (level 1): a chunk of lines waits in Redis until a worker takes
# it, so a large file's backlog sits in Redis's memory (397 -> 184 bytes a queued line, kept copy
# and custom_id set included). kombu registers zstd itself only
# where Python has compression.zstd (3.14) or backports.zstd; the frames are the same, so the
# content type is kombu's and either side may be the other.
ZSTD = "application/zstd"


def _zstd_decompress(data: bytes) -> bytes:
    # a stream decoder: frames written without their content size (other clients) decode too
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


if ZSTD not in compression.encoders():
    compression.register(lambda body: zstandard.ZstdCompressor(level=1).compress(body), _zstd_decompress, ZSTD,
                         aliases=["zstd", "zstandard"])


def make_app(settings: Settings | None = None, redis_url: str | None = None) -> Celery:
    settings = settings or Settings()
    url = redis_url or resolve_redis_url(settings)
    transport = {
        # Must exceed a reserved message's wait + run time, or it is delivered twice (see Settings).
        "visibility_timeout": settings.visibility_timeout_s,
        # Only the workers that consume a queue get its broadcast events.
        "fanout_prefix": True, "fanout_patterns": True,
    }
    backend_options = {"visibility_timeout": settings.visibility_timeout_s}
    if is_sentinel(url):  # kombu's and Celery's Sentinel transports find the primary by this name
        transport["master_name"] = backend_options["master_name"] = master_name(settings.redis_master_name)
    app = Celery("gristmill", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        # JSON only: a pickled message from anyone who can write to the broker would run code.
        task_serializer=SERIALIZER, result_serializer="json", event_serializer="json", task_compression="zstd",
        accept_content=[SERIALIZER, "json"], result_accept_content=["json"],
        # Ack after the task returns, i.e. after its results are written; a crash mid-chunk
        # redelivers the chunk and the idempotent writes drop what was already written.
        task_acks_late=True,
        # A pool child killed mid-task (OOM, segfault) requeues its message instead of acking it;
        # our attempts cap (Settings.max_attempts) stops a poison message from looping.
        task_reject_on_worker_lost=True,
        # The batcher sees concurrency x multiplier messages; see Settings.prefetch_multiplier.
        worker_prefetch_multiplier=settings.prefetch_multiplier,
        broker_transport_options=transport,
        result_backend_transport_options=backend_options,
        # Results go to our per-batch hash, never one Celery result per message.
        task_ignore_result=True,
        result_expires=settings.result_ttl_s,
        # Task events for Flower.
        worker_send_task_events=True, task_send_sent_event=True,
        # each queue bound to an exchange of its own under its own key: a bare Queue(name) is
        # bound to the default exchange and key (the classify queue's), so a message routed
        # through that exchange would land in both queues
        task_queues=[Queue(q, Exchange(q, type="direct"), routing_key=q) for q in C.QUEUES],
        task_default_queue=C.CLASSIFY_QUEUE,
        task_routes={C.GENERATE_TASK: {"queue": C.GENERATE_QUEUE}, C.CLASSIFY_TASK: {"queue": C.CLASSIFY_QUEUE}},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


# Bindings that releases declaring bare queues left in Redis: the generate queue bound to the
# classify exchange under the classify key. Left there, messages for the classify queue would also
# be copied into the generate queue.
_STALE_BINDINGS = {f"_kombu.binding.{C.CLASSIFY_QUEUE}": [f"{C.CLASSIFY_QUEUE}\x06\x16\x06\x16{C.GENERATE_QUEUE}"]}


def drop_stale_bindings(redis) -> int:
    """Remove the bindings earlier releases declared (idempotent; workers call it at start)."""
    return sum(redis.srem(key, *members) for key, members in _STALE_BINDINGS.items())


def __getattr__(name: str):
    if name == "app":
        global app
        app = make_app()
        return app
    raise AttributeError(name)
