"""Bulk ingest: stream a JSONL file twice (validate, then enqueue), memory flat in the file's size.

Pass 1 hashes the file and finds duplicate custom_ids with a Redis set, so the client holds no
per-line state; a duplicate rejects the submission before anything is enqueued. Pass 2 validates
each line, writes error lines for the bad ones and sends the good ones in chunks, one Celery
message per `chunk_size` lines per queue.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import constants as C
from .batches import BatchStore
from .errors import DuplicateCustomIds
from .policy import Policy
from .redis_server import connect, is_oom, with_retry
from .registry import Registry
from .schemas import LineError, WorkItem, error_line, peek_custom_id, validate_line

_PIPE = 1000  # Redis round-trip amortisation for ids and error lines
_MAX_NAMED_DUPLICATES = 20
# Pass 1 notes where every _MARK_EVERY-th line starts, so pass 2 can split the file there.
_MARK_EVERY = 50_000
AUTO_PARALLEL_LINES = 200_000


def iter_lines(path: Path, start: int = 0, end: int | None = None, first_line: int = 1) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) for every non-blank line of bytes [start, end); `start`
    must be a line start and `first_line` its number."""
    pos = start
    with open(path, "rb") as f:
        f.seek(start)
        for n, raw in enumerate(f, start=first_line):
            if end is not None and pos >= end:
                return
            pos += len(raw)
            if raw.strip():
                yield n, raw


@dataclass(frozen=True)
class Pass1:
    total: int  # non-blank lines
    sha256: str
    marks: list[tuple[int, int]]  # (byte offset, line number) of every _MARK_EVERY-th line start


def ranges(marks: list[tuple[int, int]], parts: int) -> list[tuple[int, int | None, int]]:
    """Split the file into up to `parts` contiguous (start, end, first line) ranges at marks."""
    cuts = [(0, 1)] + marks
    step = max(1, -(-len(cuts) // max(1, parts)))
    starts = cuts[::step]
    return [(s, starts[i + 1][0] if i + 1 < len(starts) else None, line) for i, (s, line) in enumerate(starts)]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic GC off for a pass: ingest makes millions of short-lived acyclic dicts, and with
    a chunk of them alive each generation-0 sweep rescans them (to_message: 11 us -> 0.3 us a line
    with the GC off). Reference counting still frees everything; the GC is restored after."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@dataclass(frozen=True)
class IngestPlan:
    """What a batch's ingest follows, fixed when the batch is created and kept in its record, so
    that a second run (after the first one's process died) makes exactly the same chunks."""
    path: str
    policy: dict | None
    endpoint: str | None
    chunk_size: int
    chunk_max_bytes: int
    max_line_bytes: int


class LeaseHeld(RuntimeError):
    """Raised when another live process holds the batch's ingest lease."""


class IngestLease:
    """A Redis key with a TTL, renewed by a thread while this process ingests one batch. It lapses
    within `ttl_s` of the process dying, and `Client.resume_ingests` then takes the ingest over."""

    def __init__(self, r, batch_id: str, ttl_s: float):
        self.r, self.key, self.ttl_ms = r, C.ingest_lease_key(batch_id), int(ttl_s * 1000)
        self.token = f"{os.getpid()}:{threading.get_ident()}:{time.time()}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "IngestLease":
        if not self.r.set(self.key, self.token, nx=True, px=self.ttl_ms):
            raise LeaseHeld(f"another process is ingesting this batch ({self.key})")
        self._thread = threading.Thread(target=self._renew, name="gristmill-ingest-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            try:
                self.r.set(self.key, self.token, xx=True, px=self.ttl_ms)
            except Exception:  # noqa: BLE001 - Redis away for a moment: the next round retries
                pass

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.r.get(self.key) == self.token:
            self.r.delete(self.key)


# Ingest holds back while Redis uses more than this share of its maxmemory (when it has one).
MEMORY_HIGH_WATER = 0.8


def queued_messages(r, queue: str) -> int:
    """Messages waiting in a Celery queue on Redis (kombu keeps one list per priority step)."""
    pipe = r.pipeline(transaction=False)
    for suffix in ("", "\x06\x163", "\x06\x166", "\x06\x169"):
        pipe.llen(queue + suffix)
    return sum(pipe.execute())


def memory_full(r) -> str | None:
    """Why ingest should not write now, if Redis is near its maxmemory. Ingest stops well short of
    it: at it, a noeviction Redis refuses every write, a worker's acknowledgement included, and
    Celery ends a worker whose ack failed."""
    mem = r.info("memory")
    limit = int(mem.get("maxmemory") or 0)
    if limit and int(mem["used_memory"]) > MEMORY_HIGH_WATER * limit:
        return f"Redis uses over {MEMORY_HIGH_WATER:.0%} of its maxmemory"
    return None


def wait_for_memory(r, on_wait: Callable[[str], None] | None = None, poll_s: float = 0.2) -> None:
    """Before a batch is recorded: wait while Redis is near its maxmemory, telling `on_wait` once."""
    told = False
    while (why := memory_full(r)) is not None:
        if not told and on_wait is not None:
            on_wait(why)
        told = True
        time.sleep(poll_s)


@dataclass
class Backpressure:
    """Holds ingest back while Redis holds enough queued work: while a queue's backlog (its queued
    messages times the chunk size) is over `max_lines`, or while Redis refuses writes for want of
    memory, ingest waits for the workers to drain it, and the batch says since when it waits
    (`ingest_waiting_since`, `ingest_waiting_for`). Five large files submitted at once then hold
    one bounded backlog in Redis, not five whole files."""
    r: object
    batch_id: str
    max_lines: int  # 0: no bound
    chunk_size: int
    poll_s: float = 0.2
    on_wait: Callable[[str], None] | None = None  # told once each time ingest starts waiting
    _sent: int = 0
    _waiting: bool = False

    def before_send(self, queue: str) -> None:
        self._sent += 1
        # a look every few messages: the bounds are loose by a few chunks
        if self._sent % 4:
            return
        while True:
            why = self._full(queue)
            if why is None:
                break
            self.waiting(why)
            time.sleep(self.poll_s)
        self.resumed()

    def _full(self, queue: str) -> str | None:
        if self.max_lines and queued_messages(self.r, queue) * self.chunk_size > self.max_lines:
            return f"{queue} holds over {self.max_lines:,} queued lines (GRISTMILL_MAX_QUEUED_LINES)"
        return memory_full(self.r)

    def waiting(self, why: str) -> None:
        if not self._waiting:
            self._waiting = True
            if self.on_wait is not None:
                self.on_wait(why)
            self.r.hset(C.batch_key(self.batch_id), mapping={"ingest_waiting_since": int(time.time()),
                                                             "ingest_waiting_for": why})

    def resumed(self) -> None:
        if self._waiting:
            self._waiting = False
            self.r.hdel(C.batch_key(self.batch_id), "ingest_waiting_since", "ingest_waiting_for")

    def write(self, fn, *args, **kwargs):
        """`fn(*args, **kwargs)`: waited out, and said so, as long as Redis is at its maxmemory
        (workers draining the queue free it); retried for 5 minutes while Redis is away."""
        def on_retry(exc: BaseException) -> None:
            if not is_oom(exc):
                return
            try:
                self.waiting("Redis is at its maxmemory and refuses writes")
            except Exception as again:  # noqa: BLE001 - the flag is itself a write
                if not is_oom(again):
                    raise
        out = with_retry(fn, *args, what="ingest", on_retry=on_retry, wait_out_oom=True, **kwargs)
        self.resumed()
        return out


@dataclass
class IngestReport:
    total: int = 0
    valid: int = 0
    invalid: int = 0
    chunks: int = 0
    sha256: str = ""
    cancelled: bool = False
    by_queue: dict[str, int] = field(default_factory=dict)

    def add(self, part: dict) -> None:
        """Fold in the pass-2 counts of one range (an `asdict` of that range's report)."""
        self.valid += part["valid"]
        self.invalid += part["invalid"]
        self.chunks += part["chunks"]
        self.cancelled |= part["cancelled"]
        for q, n in part["by_queue"].items():
            self.by_queue[q] = self.by_queue.get(q, 0) + n


def check_unique(store: BatchStore, batch_id: str, path: Path) -> Pass1:
    """Pass 1: line count, sha256 and split marks of the file. Raises DuplicateCustomIds naming
    the repeats."""
    digest = hashlib.sha256()
    marks: list[tuple[int, int]] = []
    offset = 0
    pending: list[str] = []
    dups: set[str] = set()
    n_dups = 0
    total = 0

    def flush() -> None:
        nonlocal n_dups
        if pending:
            repeats = with_retry(store.add_ids, batch_id, pending, what="recording custom_ids")
            n_dups += len(repeats)
            for cid in repeats:
                if len(dups) < _MAX_NAMED_DUPLICATES:
                    dups.add(cid)
            pending.clear()

    with open(path, "rb") as f, gc_paused():
        for n, raw in enumerate(f, start=1):
            if n % _MARK_EVERY == 1 and n > 1:
                marks.append((offset, n))
            offset += len(raw)
            digest.update(raw)
            if not raw.strip():
                continue
            total += 1
            cid = peek_custom_id(raw)
            if cid is not None:
                pending.append(cid)
                if len(pending) >= _PIPE:
                    flush()
    flush()
    store.r.expire(C.ids_key(batch_id), store.result_ttl_s)
    if dups:
        where: dict[str, list[int]] = {c: [] for c in dups}
        for n, raw in iter_lines(path):
            cid = peek_custom_id(raw)
            if cid in where:
                where[cid].append(n)
        raise DuplicateCustomIds(where, more=max(0, n_dups - sum(len(v) - 1 for v in where.values())))
    return Pass1(total, digest.hexdigest(), marks)


def enqueue(app, store: BatchStore, registry: Registry, batch_id: str, path: Path, chunk_size: int,
            report: IngestReport, span: tuple[int, int | None, int] = (0, None, 1), stride: int = 1,
            offset: int = 0, policy: Policy | None = None, max_line_bytes: int | None = None,
            chunk_max_bytes: int | None = None, endpoint: str | None = None, resume: bool = False,
            max_queued_lines: int = 0, on_wait: Callable[[str], None] | None = None) -> None:
    """Pass 2: validate each line; error lines to Redis, good lines to their queue in chunks of
    `chunk_size` lines, or fewer where their bytes reach `chunk_max_bytes`.

    `span` = (start byte, end byte, first line number) of the lines to take; the k-th chunk sent
    is numbered k * stride + offset, so parallel ranges never share a chunk number. Classification
    messages carry the batch's moderation `policy` (~1 kB), so workers apply what ingest checked.
    `endpoint`: lines for another url are errors. `resume`: the pass runs again after an ingest
    that stopped midway (its process died); the same file and settings make the same chunks, and
    those already written are not sent again (a chunk sent but not yet written may be: its second
    delivery writes nothing)."""
    done = {int(c) for c in store.r.smembers(C.chunks_done_key(batch_id))} if resume else set()
    hold = Backpressure(store.r, batch_id, max_queued_lines, chunk_size, on_wait=on_wait)
    buffers: dict[str, list[dict]] = {q: [] for q in C.QUEUES}
    held = dict.fromkeys(C.QUEUES, 0)  # bytes of the lines in each buffer
    max_bytes = chunk_max_bytes or 1 << 62
    errors: list[tuple[dict, bool]] = []
    extra = {C.CLASSIFY_QUEUE: {"policy": policy.wire()} if policy is not None else {}}

    def send(queue: str) -> None:
        items = buffers[queue]
        if items:
            chunk = report.chunks * stride + offset
            if chunk not in done:
                hold.before_send(queue)
                msg = {"task": C.QUEUE_TASK[queue], "queue": queue, "args": [batch_id, chunk, items],
                       "kwargs": {**extra.get(queue, {}), "sent_at": time.time()}}
                hold.write(store.keep_message, batch_id, chunk, msg)  # before sending: never missing
                hold.write(app.send_task, msg["task"], args=msg["args"], kwargs=msg["kwargs"], queue=queue,
                           task_id=C.chunk_task_id(batch_id, chunk))
                if store.min_replicas:
                    # a write of this connection after the message's (kombu's own connection), then
                    # WAIT: the message and its kept copy are on the replicas before the next
                    with_retry(store.mark_sent_again, batch_id, chunk, msg["kwargs"]["sent_at"])
                    with_retry(store.replicated, f"chunk {chunk} of {batch_id}")
            report.chunks += 1
            report.by_queue[queue] = report.by_queue.get(queue, 0) + len(items)
            buffers[queue] = []
            held[queue] = 0
            if report.chunks % 64 == 0 and store.status(batch_id) == C.CANCELLING:
                report.cancelled = True

    parts = 0

    def flush_errors() -> None:
        nonlocal parts
        if errors:
            hold.write(store.record, batch_id, None, errors, part=f"v{offset}.{parts}")
            parts += 1
            errors.clear()

    with gc_paused():
        for n, raw in iter_lines(path, *span):
            if report.cancelled:
                break
            result = validate_line(raw, n, registry, policy, max_line_bytes, endpoint)
            if isinstance(result, LineError):
                report.invalid += 1
                errors.append((error_line(result.custom_id, result.code, result.message, n), True))
                if len(errors) >= _PIPE:
                    flush_errors()
                continue
            assert isinstance(result, WorkItem)
            report.valid += 1
            queue = C.URL_QUEUE[result.url]
            buffers[queue].append(result.to_message())
            held[queue] += len(raw)
            if len(buffers[queue]) >= chunk_size or held[queue] >= max_bytes:
                send(queue)
    if not report.cancelled:
        for q in C.QUEUES:
            send(q)
    flush_errors()


def _enqueue_range(settings_json: str, redis_url: str, batch_id: str, path: str,
                   span: tuple[int, int | None, int], stride: int, offset: int, policy: dict | None = None,
                   endpoint: str | None = None, resume: bool = False) -> dict:
    """One pass-2 process: its own Settings, Redis connection and Celery producer."""
    from .app import make_app
    from .settings import Settings
    settings = Settings.model_validate_json(settings_json)
    r = connect(redis_url, master=settings.redis_master_name, decode_responses=True)
    report = IngestReport()
    enqueue(make_app(settings, redis_url), BatchStore(r, settings.result_ttl_s, settings.redis_min_replicas),
            settings.registry, batch_id,
            Path(path), settings.chunk_size, report, span, stride, offset,
            Policy.model_validate(policy) if policy is not None else None, settings.max_line_bytes,
            settings.chunk_max_bytes, endpoint, resume, settings.max_queued_lines)
    r.close()
    return dataclasses.asdict(report)


def enqueue_parallel(settings, redis_url: str, batch_id: str, path: Path, spans: list[tuple[int, int | None, int]],
                     report: IngestReport, policy: Policy | None = None, endpoint: str | None = None,
                     resume: bool = False) -> None:
    """Pass 2 over `spans`, one `python -m gristmill.producers.ingest` process each. Plain subprocesses, not
    multiprocessing: spawn would re-import the caller's __main__, which a user's script may not guard."""
    import json
    import subprocess

    from .runtime import python_module
    procs = []
    for i, span in enumerate(spans):
        job = json.dumps({"settings": settings.model_dump_json(), "redis_url": redis_url, "batch_id": batch_id,
                          "path": str(path), "span": span, "stride": len(spans), "offset": i,
                          "policy": policy.wire() if policy is not None else None, "endpoint": endpoint,
                          "resume": resume})
        procs.append(subprocess.Popen(python_module("gristmill.producers.ingest", job), stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    failures = []
    for p in procs:
        out, err = p.communicate()  # both pipes drained together: a chatty stderr cannot block the child
        if p.returncode != 0:
            failures.append(err.strip()[-2000:])
        else:
            report.add(json.loads(out.strip().splitlines()[-1]))
    if failures:
        raise RuntimeError("parallel ingest failed in %d of %d processes:\n%s" % (len(failures), len(procs),
                                                                                  "\n---\n".join(failures)))


if __name__ == "__main__":
    import json
    import sys
    job = json.loads(sys.argv[1])
    print(json.dumps(_enqueue_range(job["settings"], job["redis_url"], job["batch_id"], job["path"],
                                    tuple(job["span"]), job["stride"], job["offset"], job.get("policy"),
                                    job.get("endpoint"), job.get("resume", False))))
