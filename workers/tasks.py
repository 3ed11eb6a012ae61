"""Celery tasks: one message = one chunk of validated lines of one batch.

With the threads pool, several chunk tasks run at once; each hands its items to the process's
MicroBatcher and waits, so device batches mix items from all in-flight messages. A task returns
(and, with acks_late, its message is acked) only after its lines are written to Redis.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import Future
from typing import Any

import redis

from producers import constants as C
from producers import schemas as S
from producers.batches import BatchStore
from producers.policy import Policy
from producers.settings import Settings

from . import metrics
from .batcher import BatchPolicy, MicroBatcher
from .dedup import Recent, ScoreCache
from .host import EngineHost, Prepared, item_error

log = logging.getLogger(__name__)


class WorkerState:
    """Per-process singletons: settings, Redis, engine host, micro-batcher."""

    def __init__(self, settings: Settings, redis_url: str, device: str):
        self.settings = settings
        self.redis = redis.Redis.from_url(redis_url, decode_responses=True)
        self.store = BatchStore(self.redis, settings.result_ttl_s)
        self.host = EngineHost(settings, device, ScoreCache(self.redis, settings.dedup_ttl_s))
        self.recent = Recent() if settings.dedup_ttl_s > 0 else None
        policy = BatchPolicy(settings.max_batch_size, settings.token_budget, settings.max_wait_ms / 1000.0)
        self.batcher = MicroBatcher(self.host.run, policy, on_batch=metrics.on_batch, on_split=metrics.on_split,
                                    streamer=self.host.streamer)

    def shutdown(self) -> None:
        self.batcher.shutdown()
        self.host.shutdown()


_state: WorkerState | None = None
_state_lock = threading.Lock()


def init_state(settings: Settings, redis_url: str, device: str) -> WorkerState:
    global _state
    with _state_lock:
        if _state is None:
            _state = WorkerState(settings, redis_url, device)
    return _state


def state() -> WorkerState:
    if _state is None:
        raise RuntimeError("worker state is not initialised; start workers with `gristmill worker`")
    return _state


def process_chunk(st: WorkerState, batch_id: str, chunk: int, raw_items: list[dict[str, Any]],
                  queue: str = "", policy: dict[str, Any] | None = None, sent_at: float | None = None) -> dict[str, int]:
    if sent_at is not None:
        metrics.QUEUE_WAIT.labels(queue).observe(max(0.0, time.time() - sent_at))
    t0 = time.perf_counter()
    try:
        return _process_chunk(st, batch_id, chunk, raw_items, Policy.model_validate(policy) if policy else None)
    finally:
        metrics.CHUNK_SECONDS.labels(queue).observe(time.perf_counter() - t0)


def _write(st: WorkerState, batch_id: str, chunk: int, lines: list[tuple[dict[str, Any], bool]],
           models: list[str], dedup: tuple[int, int] = (0, 0)) -> None:
    """`models[i]` is the model of `lines[i]`, for the items metric."""
    st.store.record(batch_id, chunk, lines, dedup=dedup)
    counts: dict[tuple[str, str], int] = {}
    for model, (_, is_error) in zip(models, lines):
        k = (model, "failed" if is_error else "completed")
        counts[k] = counts.get(k, 0) + 1
    for (model, outcome), n in counts.items():
        metrics.ITEMS.labels(model, outcome).inc(n)


def submit_chunk(batcher: MicroBatcher, prepared: list, recent: Recent | None = None) -> list[tuple[Prepared, list]]:
    """Hand a chunk's items to the batcher in one call per model, so the engine thread sees the
    chunk arrive whole and plans it once. (Submitting item by item woke it per item: it re-planned
    up to 2,048 times per chunk and, its wait expiring mid-chunk, ran half-size batches.)
    Classifier inputs the score cache answered get resolved futures; an input repeating an earlier
    one of the chunk, or one another chunk is running (`recent`), shares that future.
    Returns (prepared item, its futures) pairs."""
    by_model: dict[str, list[Prepared]] = {}
    for p in prepared:
        if isinstance(p, Prepared):
            by_model.setdefault(p.item.model, []).append(p)
    out = []
    for model, group in by_model.items():
        payloads, costs, keys = [], [], []
        slots: list[int | Future | tuple[str, str]] = []
        with recent.lock if recent is not None else contextlib.nullcontext():
            for p in group:
                for k, payload in enumerate(p.payloads):
                    key = (p.mkey, p.shas[k]) if p.shas is not None else None
                    shared = recent.get(key) if recent is not None and key is not None and payload is not None else None
                    if p.known is not None and p.known[k] is not None:
                        slots.append(_resolved(p.known[k]))
                    elif payload is None:
                        slots.append(key)  # a repeat within the chunk: filled in below
                    elif shared is not None:
                        slots.append(shared)
                        p.reused[k] = True  # type: ignore[index]
                    else:
                        slots.append(len(payloads))
                        payloads.append(payload)
                        costs.append(p.costs[k])
                        keys.append(key)
            futures = batcher.submit(model, payloads, costs) if payloads else []
            if recent is not None:
                for key, f in zip(keys, futures):
                    if key is not None:
                        recent.put(key, f)
        resolved: list[Future] = []
        first: dict[tuple[str, str], Future] = {}  # each input's future, for repeats later in the chunk
        for s, (p, k) in zip(slots, ((p, k) for p in group for k in range(len(p.payloads)))):
            f = futures[s] if isinstance(s, int) else s if isinstance(s, Future) else first[s]
            if p.shas is not None:
                first.setdefault((p.mkey, p.shas[k]), f)
            resolved.append(f)
        k = 0
        for p in group:
            out.append((p, resolved[k: k + len(p.payloads)]))
            k += len(p.payloads)
    return out


def _resolved(value: Any) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


def _process_chunk(st: WorkerState, batch_id: str, chunk: int, raw_items: list[dict[str, Any]],
                   policy: Policy | None) -> dict[str, int]:
    store = st.store
    status, attempts, expired = store.begin_chunk(batch_id, chunk)
    if status is None:
        log.warning("batch %s has no record (expired or deleted); dropping chunk %d", batch_id, chunk)
        return {"skipped": len(raw_items)}
    if status in (C.CANCELLING, C.CANCELLED):
        store.record(batch_id, chunk, [])
        return {"skipped": len(raw_items)}
    items = [S.WorkItem.from_message(m) for m in raw_items]
    lines: list[tuple[dict[str, Any], bool]] = []
    models: list[str] = []
    if attempts > st.settings.max_attempts or expired:
        if expired:
            store.mark_expired(batch_id)
            code, msg = C.E_EXPIRED, "the batch's completion window ended before this request ran"
        else:
            code, msg = C.E_WORKER_CRASHED, (f"delivered {attempts} times without finishing "
                                             f"(max_attempts={st.settings.max_attempts}); the worker likely crashed on it")
        lines = [(S.error_line(it.custom_id, code, msg, it.line), True) for it in items]
        _write(st, batch_id, chunk, lines, [it.model for it in items])
        return {"failed": len(lines)}

    try:
        prepared = st.host.prepare(items)
    except Exception as exc:  # noqa: BLE001 - a chunk-wide preparation failure fails its items, not the worker
        log.exception("preparing chunk %d of %s failed", chunk, batch_id)
        prepared = [S.LineError(it.line, it.custom_id, C.E_ENGINE, f"{type(exc).__name__}: {exc}") for it in items]
    waiting = submit_chunk(st.batcher, prepared, st.recent)
    for it, p in zip(items, prepared):
        if isinstance(p, S.LineError):
            lines.append((S.error_line(p.custom_id, p.code, p.message, p.line), True))
            models.append(it.model)
    ran: list[tuple[Prepared, list[Any]]] = []
    for p, futures in waiting:
        it = p.item
        try:
            ran.append((p, [f.result() for f in futures]))
        except Exception as exc:  # noqa: BLE001 - one bad item fails alone
            lines.append((item_error(it, exc), True))
            models.append(it.model)
    done, inputs, reused = st.host.settle(ran)
    try:
        lines += [(line, False) for line in st.host.format_many(done, policy)]
    except Exception:  # noqa: BLE001 - find the item that cannot be formatted; it fails alone
        for it, results in done:
            try:
                lines.append((st.host.format(it, results, policy), False))
            except Exception as exc:  # noqa: BLE001
                lines.append((item_error(it, exc), True))
    models += [it.model for it, _ in done]
    _write(st, batch_id, chunk, lines, models, (inputs, reused))
    failed = sum(1 for _, e in lines if e)
    return {"completed": len(lines) - failed, "failed": failed}


def register_tasks(app) -> None:
    """Bind the chunk tasks to `app` by name; producers send them with send_task."""

    @app.task(name=C.GENERATE_TASK, ignore_result=True, acks_late=True)
    def generate(batch_id: str, chunk: int, items: list[dict[str, Any]], sent_at: float | None = None) -> dict[str, int]:
        return process_chunk(state(), batch_id, chunk, items, C.GENERATE_QUEUE, sent_at=sent_at)

    @app.task(name=C.CLASSIFY_TASK, ignore_result=True, acks_late=True)
    def classify(batch_id: str, chunk: int, items: list[dict[str, Any]],
                 policy: dict[str, Any] | None = None, sent_at: float | None = None) -> dict[str, int]:
        return process_chunk(state(), batch_id, chunk, items, C.CLASSIFY_QUEUE, policy, sent_at)
