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
from collections import Counter
from typing import Any

from ..producers import constants as C
from ..producers import schemas as S
from ..producers.batches import BatchStore, ChunkCounts
from ..producers.policy import Policy
from ..producers.redis_server import connect, with_retry
from ..producers.settings import Settings

from . import metrics
from .batcher import BatchPolicy, MicroBatcher, Slot, tagged
from .dedup import Recent, ScoreCache
from .reaper import Lease
from .host import EngineHost, item_error
from .records import ChunkOutcome, Prepared, Repeat

log = logging.getLogger(__name__)


class WorkerState:
    """Per-process singletons: settings, Redis, engine host, micro-batcher."""

    def __init__(self, settings: Settings, redis_url: str, device: str, app=None, queues: list[str] | None = None):
        self.settings = settings
        self.redis = connect(redis_url, master=settings.redis_master_name, decode_responses=True)
        from ..producers.app import drop_stale_bindings
        drop_stale_bindings(self.redis)
        self.lease = Lease(app, self.redis, settings.lease_ttl_s, queues).start() if app is not None else None
        self.store = BatchStore(self.redis, settings.result_ttl_s, settings.redis_min_replicas)
        cache_redis = self.redis
        if settings.dedup_redis_url:
            # a cache server that stops answering costs a lookup its timeout, then the inputs run
            cache_redis = connect(settings.dedup_redis_url, master=settings.redis_master_name, decode_responses=True,
                                               socket_timeout=5, socket_connect_timeout=2)
        self.host = EngineHost(settings, device, ScoreCache(cache_redis, settings.dedup_ttl_s))
        if self.lease is not None:
            self.lease.serving = self.host.serving  # published with each heartbeat, and when it changes
            self.host.loader.on_serving = self.lease.beat
        metrics.watch_tokenizers(self.host)
        self.recent = Recent() if settings.dedup_ttl_s > 0 else None
        policy = BatchPolicy(settings.max_batch_size, settings.token_budget, settings.max_wait_ms / 1000.0)
        self.batcher = MicroBatcher(self.host.run, policy, on_batch=metrics.on_batch, on_split=metrics.on_split,
                                    streamer=self.host.streamer)

    def shutdown(self) -> None:
        if self.lease is not None:
            self.lease.stop()
        self.batcher.shutdown()
        self.host.shutdown()


_state: WorkerState | None = None
_state_lock = threading.Lock()


def init_state(settings: Settings, redis_url: str, device: str, app=None,
               queues: list[str] | None = None) -> WorkerState:
    global _state
    with _state_lock:
        if _state is None:
            _state = WorkerState(settings, redis_url, device, app, queues)
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


def _write(st: WorkerState, batch_id: str, chunk: int, outcome: ChunkOutcome) -> None:
    # retried while Redis is down: the write is idempotent (HSETNX on the chunk's part), and the
    # message is acked only after it, so an outage delays a chunk instead of failing it
    with_retry(st.store.record, batch_id, chunk, outcome.lines, counts=outcome.counts,
               what=f"writing chunk {chunk} of {batch_id}")
    per_model: dict[tuple[str, str], int] = {}
    for model, line in zip(outcome.models, outcome.lines):
        k = (model, "failed" if line.is_error else "completed")
        per_model[k] = per_model.get(k, 0) + 1
    for (model, result), n in per_model.items():
        metrics.ITEMS.labels(model, result).inc(n)


def submit_chunk(batcher: MicroBatcher, prepared: list, recent: Recent | None = None,
                 tag: str = "") -> list[tuple[Prepared, list]]:
    """Hand a chunk's items to the batcher in one call per model, so the engine thread sees the
    chunk arrive whole and plans it once. (Submitting item by item woke it per item: it re-planned
    up to 2,048 times per chunk and, its wait expiring mid-chunk, ran half-size batches.)
    Classifier inputs the score cache answered get resolved slots; an input repeating an earlier
    one of the chunk, or one another chunk is running (`recent`), shares that slot. A `tag`
    keeps these items in device batches of their own.
    Returns (prepared item, its slots) pairs."""
    by_model: dict[str, list[Prepared]] = {}
    for p in prepared:
        if isinstance(p, Prepared):
            by_model.setdefault(p.item.model, []).append(p)
    out = []
    for model, group in by_model.items():
        payloads, costs, keys = [], [], []
        where: list[int | Slot | Repeat] = []  # per input: its index among those submitted, a slot, or a repeat
        with recent.lock if recent is not None else contextlib.nullcontext():
            for p in group:
                cls = p.inputs
                for k, payload in enumerate(p.payloads):
                    key = Repeat(cls.model_key, cls.sha256[k]) if cls is not None else None
                    shared = recent.get(key) if recent is not None and key is not None and payload is not None else None
                    if cls is not None and cls.known[k] is not None:
                        where.append(Slot.resolved(cls.known[k]))
                    elif payload is None:
                        where.append(key)  # a repeat within the chunk: filled in below
                    elif shared is not None:
                        where.append(shared)
                        cls.reused[k] = True  # type: ignore[union-attr]
                    else:
                        where.append(len(payloads))
                        payloads.append(payload)
                        costs.append(p.costs[k])
                        keys.append(key)
            submitted = batcher.submit(tagged(model, tag) if tag else model, payloads, costs) if payloads else []
            if recent is not None:
                for key, f in zip(keys, submitted):
                    if key is not None:
                        recent.put(key, f)
        resolved: list[Slot] = []
        first: dict[Repeat, Slot] = {}  # each input's slot, for repeats later in the chunk
        for s, (p, k) in zip(where, ((p, k) for p in group for k in range(len(p.payloads)))):
            f = submitted[s] if isinstance(s, int) else s if isinstance(s, Slot) else first[s]
            if p.inputs is not None:
                first.setdefault(Repeat(p.inputs.model_key, p.inputs.sha256[k]), f)
            resolved.append(f)
        k = 0
        for p in group:
            out.append((p, resolved[k: k + len(p.payloads)]))
            k += len(p.payloads)
    return out


def _process_chunk(st: WorkerState, batch_id: str, chunk: int, raw_items: list[dict[str, Any]],
                   policy: Policy | None) -> dict[str, int]:
    store = st.store
    status, attempts, expired, written = with_retry(store.begin_chunk, batch_id, chunk,
                                                    what=f"starting chunk {chunk}")
    if status is None:
        log.warning("batch %s has no record (expired or deleted); dropping chunk %d", batch_id, chunk)
        return {"skipped": len(raw_items)}
    if status in (C.CANCELLING, C.CANCELLED) or written:
        # a chunk sent again after it was written (the lost-chunk sweep, a resumed ingest) is not
        # run again; marking it drops the kept copy a resumed ingest may have made
        store.record(batch_id, chunk, [])
        return {"skipped": len(raw_items)}
    items = [S.WorkItem.from_message(m) for m in raw_items]
    cap = st.settings.max_attempts + len(items)  # isolation fails at most one line per delivery
    if attempts > cap or expired:
        if expired:
            store.mark_expired(batch_id)
            code, msg = C.E_EXPIRED, "the batch's completion window ended before this request ran"
        else:
            code, msg = C.E_WORKER_CRASHED, (f"delivered {attempts} times without finishing; the worker "
                                             f"likely crashed on it")
        failing = ChunkOutcome()
        for it in items:
            failing.add(S.error_line(it.custom_id, code, msg, it.line), True, it.model)
        _write(st, batch_id, chunk, failing)
        return {"failed": len(items)}
    outcome = _isolate(st, batch_id, chunk, items, policy) if attempts > 1 else run_items(st, items, policy)
    _write(st, batch_id, chunk, outcome)
    failed = outcome.failed
    return {"completed": len(outcome.lines) - failed, "failed": failed}


def _prepare_apart(st: WorkerState, items: list[S.WorkItem]) -> list[Prepared | S.LineError]:
    """After preparing a chunk failed: each model's items apart, and item by item within a model
    that loads, so only the items that cannot be prepared fail (a model that cannot load fails
    its own items, once, not the chunk's other models')."""
    out: list[Prepared | S.LineError | None] = [None] * len(items)
    by_model: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_model.setdefault(it.model, []).append(i)
    for model, idx in by_model.items():
        try:
            if model in st.host.registry.specs:
                st.host.engine(model)
        except Exception as exc:  # noqa: BLE001 - its items fail below
            for i in idx:
                out[i] = S.LineError(items[i].line, items[i].custom_id, C.E_ENGINE, str(exc))
            continue
        for i in idx:
            try:
                out[i] = st.host.prepare([items[i]])[0]
            except Exception as exc:  # noqa: BLE001 - this item fails alone
                out[i] = S.LineError(items[i].line, items[i].custom_id, C.E_ENGINE, f"{type(exc).__name__}: {exc}")
    return out  # type: ignore[return-value]


def run_items(st: WorkerState, items: list[S.WorkItem], policy: Policy | None, tag: str = "") -> ChunkOutcome:
    """The lines of `items`, their models, and the classifier counters they add (score-cache
    reuse, cascade escalations). A `tag` keeps these items out of other messages' device batches
    (isolation)."""
    out = ChunkOutcome()
    try:
        prepared = st.host.prepare(items)
    except Exception:  # noqa: BLE001 - a chunk-wide preparation failure must not fail the other items
        log.exception("preparing %d items failed; preparing them apart", len(items))
        prepared = _prepare_apart(st, items)
    waiting = submit_chunk(st.batcher, prepared, st.recent, tag)
    for it, p in zip(items, prepared):
        if isinstance(p, S.LineError):
            out.add(S.error_line(p.custom_id, p.code, p.message, p.line), True, it.model)
    ran: list[tuple[Prepared, list[Any]]] = []
    for p, slots in waiting:
        it = p.item
        try:
            ran.append((p, [s.result() for s in slots]))
        except Exception as exc:  # noqa: BLE001 - one bad item fails alone
            out.add(item_error(it, exc), True, it.model)
    done, inputs, reused = st.host.settle(ran)
    out.counts = ChunkCounts(dedup_inputs=inputs, dedup_reused=reused, **cascade_counts(done))
    try:
        formatted = st.host.format_many(done, policy, [p.inputs.sha256 if p.inputs is not None else None for p, _ in ran])
        for (it, _), line in zip(done, formatted):
            out.add(line, False, it.model)
    except Exception:  # noqa: BLE001 - find the item that cannot be formatted; it fails alone
        for it, results in done:
            try:
                out.add(st.host.format(it, results, policy), False, it.model)
            except Exception as exc:  # noqa: BLE001
                out.add(item_error(it, exc), True, it.model)
    return out


def cascade_counts(done: list[tuple[S.WorkItem, list[Any]]]) -> dict[str, int]:
    """Inputs scored by a cascade, those it escalated past its student, and those the full model
    decided (the same, but for a three-stage cascade's middle stage), for the batch's counters; the
    metric counts them by the stage that decided them."""
    from ..kernels.cascade import deciders
    inputs = escalated = to_full = 0
    for it, results in done:
        names = deciders(results)
        if names is not None:
            by_stage = Counter(names)
            inputs += len(names)
            escalated += len(names) - by_stage["student"]
            to_full += by_stage["full"]
            for stage, n in by_stage.items():
                metrics.CASCADE_INPUTS.labels(it.model, stage).inc(n)
    return {"cascade_inputs": inputs, "escalated": escalated, "to_full": to_full}


# An item in flight during this many worker deaths (while its chunk ran one item at a time) is
# failed alone as the likely cause: 2, so that one death from elsewhere (OOM kill of a busy host,
# a node lost) never blames the line that happened to be running.
SUSPECT_DEATHS = 2
# One line at a time per process across all re-run chunks: a death then blames only the line that
# was running alone, not one line of every chunk being re-run at that moment.
_ISOLATED = threading.Lock()


def _isolate(st: WorkerState, batch_id: str, chunk: int, items: list[S.WorkItem], policy: Policy | None
             ) -> ChunkOutcome:
    """A chunk delivered again: an earlier delivery did not finish, maybe because one of its lines
    kills the worker (a poison input). Run its items one at a time, each marked in Redis while it
    runs and its line kept once done; an item that was running at SUSPECT_DEATHS deaths fails
    alone with `worker_crashed`, and the others complete."""
    store, tag = st.store, f"{batch_id}:{chunk}"
    out = ChunkOutcome()
    kept = with_retry(store.kept_lines, batch_id, chunk)
    suspects = with_retry(store.suspects, batch_id, chunk)
    for it in items:
        if str(it.line) in kept:
            line, is_error = kept[str(it.line)]
            out.add(line, is_error, it.model)
        elif suspects.get(str(it.line), 0) >= SUSPECT_DEATHS:
            log.error("line %d of %s was running at %d worker deaths; failing it alone", it.line, batch_id,
                      SUSPECT_DEATHS)
            out.add(S.error_line(it.custom_id, C.E_WORKER_CRASHED, f"the worker died {SUSPECT_DEATHS} times "
                                 f"while running this line alone; it was not retried again", it.line), True, it.model)
        else:
            with _ISOLATED:
                with_retry(store.mark_running, batch_id, chunk, it.line)
                got = run_items(st, [it], policy, tag)
                with_retry(store.keep_line, batch_id, chunk, it.line, *got.lines[0])
            out.extend(got)
    return out


def register_tasks(app) -> None:
    """Bind the chunk tasks to `app` by name; producers send them with send_task."""

    @app.task(name=C.GENERATE_TASK, ignore_result=True, acks_late=True)
    def generate(batch_id: str, chunk: int, items: list[dict[str, Any]], sent_at: float | None = None) -> dict[str, int]:
        return process_chunk(state(), batch_id, chunk, items, C.GENERATE_QUEUE, sent_at=sent_at)

    @app.task(name=C.CLASSIFY_TASK, ignore_result=True, acks_late=True)
    def classify(batch_id: str, chunk: int, items: list[dict[str, Any]],
                 policy: dict[str, Any] | None = None, sent_at: float | None = None) -> dict[str, int]:
        return process_chunk(state(), batch_id, chunk, items, C.CLASSIFY_QUEUE, policy, sent_at)
