"""Leases: a worker killed without a clean shutdown gets its messages handed back in seconds.

With acks_late, a message a worker has taken stays in kombu's `unacked` hash until the worker
acks it. A clean stop hands those back at once; a SIGKILL (OOM killer, node loss) leaves them
until the visibility timeout, which must be long (hours) because it also bounds how long a slow
message may run. So each worker process
  - records, on receipt, which process holds each delivery (`gristmill:owners`: tag -> worker id),
  - keeps a heartbeat key alive (`gristmill:alive:<id>`, TTL `lease_ttl_s`, renewed every third of it),
  - and, every few seconds, restores the deliveries whose holder's heartbeat has lapsed, with
    kombu's own `restore_by_tag` (a WATCH transaction: of two reapers, one restores).
A worker also restores its own deliveries that no task of it holds any more: after a lost broker
connection (Redis restarted) Celery opens a new channel, and an ack of the old one can be lost,
leaving the message in `unacked` under a live worker's claim.
A worker that lost its lease while alive (frozen longer than the TTL) may run a chunk twice; the
per-chunk HSETNX write keeps the output to one line per input all the same.

The sweep closes the one gap leases cannot see. kombu's Redis transport takes a message off its
queue (BRPOP) and records it in `unacked` with a second command; a worker killed between the two,
or a BRPOP reply lost with a Redis that died, leaves the message nowhere. Ingest keeps every chunk's
message (`pending`, dropped by the chunk's result write) with the time it was sent. kombu's queues
are FIFO lists: a pending chunk sent before the message its queue hands out next (or any pending
chunk, once the queue is empty) is no longer queued. If no worker's `unacked` holds it either, in
two sweeps in a row (a take is recorded within milliseconds), it is sent again, by one worker (a
lock per chunk). A chunk sent twice by a rare race still writes its lines once.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import socket
import threading
import time
import uuid

import zstandard
from kombu import compression

from ..producers import constants as C
from ..producers.batches import BatchStore

log = logging.getLogger(__name__)

# A delivery nobody claimed (its receiver died between kombu's write to `unacked` and our claim)
# is restored after this many lease TTLs (at least 10 s); a live worker claims a delivery
# milliseconds after taking it, and a frozen one loses its lease sooner anyway.
ORPHAN_AFTER_TTLS = 3
# A worker's own delivery whose task ended this long ago and is still unacked lost its ack.
LOST_ACK_AFTER_S = 30.0
# A chunk sent again is not sent again for this long (the lock of the worker that sent it).
RESEND_LOCK_S = 120
# How far producers' clocks may disagree: a pending chunk counts as out of its queue only when it
# was sent this much before the message that queue hands out next.
SEND_SKEW_S = 5.0


class Lease:
    def __init__(self, app, redis, ttl_s: float, queues: list[str] | None = None):
        self.app = app
        self.r = redis
        self.ttl_s = ttl_s
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.member = f"{self.id}|{','.join(queues or C.QUEUES)}"  # in C.WORKERS_KEY
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._held: dict[str, str] = {}  # task id -> delivery tag, while its task has not ended
        self._ended: dict[str, float] = {}  # delivery tag -> when its task ended
        self._missing: set[tuple[str, int]] = set()  # pending chunks found nowhere by the last sweep
        self._store = BatchStore(redis)
        self.serving: dict[str, str] = {}  # model -> variant and reason; the engine host fills it

    def start(self) -> "Lease":
        self.beat()
        self._thread = threading.Thread(target=self._loop, name="gristmill-lease", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        try:
            self.r.delete(C.alive_key(self.id))
            self.r.zrem(C.WORKERS_KEY, self.member)
        except Exception:  # noqa: BLE001 - Redis may be gone at shutdown
            pass

    def beat(self) -> None:
        now = time.time()
        pipe = self.r.pipeline(transaction=False)
        pipe.set(C.alive_key(self.id), 1, px=int(self.ttl_s * 1000))
        pipe.zadd(C.WORKERS_KEY, {self.member: now + self.ttl_s})
        pipe.zremrangebyscore(C.WORKERS_KEY, "-inf", now - 3600)  # workers gone an hour: forgotten
        if self.serving:
            pipe.hset(C.serving_key(self.id), mapping=dict(self.serving))
            pipe.pexpire(C.serving_key(self.id), int(self.ttl_s * 1000))
        pipe.execute()

    def claim(self, delivery_tag: str, task_id: str) -> None:
        """Called as a message arrives (Celery's task_received, in the consumer thread)."""
        with self._lock:
            self._held[task_id] = delivery_tag
        try:
            self.r.hset(C.OWNERS_KEY, delivery_tag, self.id)
        except Exception:  # noqa: BLE001 - a missed claim only means the orphan path restores it later
            log.warning("could not record delivery %s", delivery_tag, exc_info=True)

    def release(self, task_id: str) -> None:
        """Called as a task ends (task_postrun); its ack follows."""
        now = time.monotonic()
        with self._lock:
            tag = self._held.pop(task_id, None)
            if tag is not None:
                self._ended[tag] = now
            for t in [t for t, at in self._ended.items() if now - at > 10 * LOST_ACK_AFTER_S]:
                del self._ended[t]

    def _lost_acks(self, mine: list[str]) -> list[str]:
        now = time.monotonic()
        with self._lock:
            held = set(self._held.values())
            return [t for t in mine if t not in held and now - self._ended.get(t, 0.0) > LOST_ACK_AFTER_S]

    def _loop(self) -> None:
        every = max(0.5, self.ttl_s / 3)
        while not self._stop.wait(every):
            try:
                self.beat()
                self.reap()
                self.sweep()
            except Exception:  # noqa: BLE001 - Redis down: the next round tries again
                log.warning("lease round failed", exc_info=True)

    def reap(self) -> list[str]:
        """Restore the deliveries held by dead workers (and old unclaimed ones); forget claims on
        deliveries already acked. Returns the restored tags."""
        with self.app.connection_for_write() as conn:
            channel = conn.default_channel
            qos = channel.qos
            # claims first: a claim is written after its delivery enters `unacked`, so a claimed
            # tag missing from the later read of `unacked` was acked (or restored), never "not yet"
            claimed = self.r.hgetall(C.OWNERS_KEY)
            unacked = self.r.hkeys(channel.unacked_key)
            pending = set(unacked)
            gone = [t for t in claimed if t not in pending]
            if gone:
                self.r.hdel(C.OWNERS_KEY, *gone)
            if not unacked:
                return []
            holders = sorted({claimed[t] for t in unacked if t in claimed})
            pipe = self.r.pipeline()
            for h in holders:
                pipe.exists(C.alive_key(h))
            alive = {h for h, ok in zip(holders, pipe.execute()) if ok}
            stale = [t for t in unacked if t in claimed and claimed[t] not in alive]
            stale += self._lost_acks([t for t in unacked if claimed.get(t) == self.id])
            unclaimed = [t for t in unacked if t not in claimed]
            if unclaimed:
                now = time.time()
                scores = self.r.zmscore(channel.unacked_index_key, unclaimed)
                orphan_after = max(10.0, ORPHAN_AFTER_TTLS * self.ttl_s)
                stale += [t for t, s in zip(unclaimed, scores) if s is not None and now - s > orphan_after]
            for tag in stale:
                log.warning("handing back %s (held by %s): %s", tag, claimed.get(tag, "nobody"), _describe(
                    self.r.hget(channel.unacked_key, tag)))
                qos.restore_by_tag(tag, leftmost=True)
                self.r.hdel(C.OWNERS_KEY, tag)
            if stale:
                log.warning("handed back %d message(s) of worker(s) that stopped without acking them", len(stale))
            return stale

    def sweep(self) -> list[tuple[str, int]]:
        """Send again the chunks lost between a take and its record (module docstring). Returns the
        (batch, chunk) pairs sent."""
        batches = sorted(self.r.smembers(C.SWEEP_KEY))
        if not batches:
            self._missing = set()
            return []
        fronts: dict[str, float | None] = {}
        held: set[tuple[str, int]] | None = None
        missing: set[tuple[str, int]] = set()
        for batch_id in batches:
            status, queues = self.r.hmget(C.batch_key(batch_id), "status", "queues")
            if status not in (C.IN_PROGRESS, C.CANCELLING) or not self.r.zcard(C.pending_at_key(batch_id)):
                self.r.srem(C.SWEEP_KEY, batch_id)  # ended, or every chunk written: nothing to watch
                continue
            names = [q for q in (queues or "").split(",") if q] or list(C.QUEUES)
            for q in names:
                if q not in fronts:
                    fronts[q] = self._front_sent_at(q)
            if any(fronts[q] is None for q in names):
                continue  # a queue's next message is not ours to read: no ordering to go by
            before = min(fronts[q] for q in names) - SEND_SKEW_S  # type: ignore[type-var]
            pending = self.r.zrangebyscore(C.pending_at_key(batch_id), "-inf", before)
            if not pending:
                continue
            if held is None:
                held = self._held_chunks()
            missing.update((batch_id, int(c)) for c in pending if (batch_id, int(c)) not in held)
        sent = []
        for batch_id, chunk in sorted(missing & self._missing):
            if self._resend(batch_id, chunk):
                sent.append((batch_id, chunk))
        self._missing = missing - set(sent)
        return sent

    def _front_sent_at(self, queue: str) -> float | None:
        """When the message a queue hands out next was sent (inf when the queue is empty; None when
        that message does not say). kombu pushes on the left and takes from the right, so every
        message still queued was sent after it, or was handed back (to the right end) and is older."""
        raw = self.r.lindex(queue, -1)
        if raw is None:
            return math.inf
        try:
            envelope = json.loads(raw)
            body = envelope["body"]
            if envelope.get("properties", {}).get("body_encoding") == "base64":
                body = base64.b64decode(body)
            packed = (envelope.get("headers") or {}).get("compression")
            if packed:  # task messages are compressed (producers/app.py)
                body = compression.decompress(body, packed)
            return float(json.loads(body)[1]["sent_at"])
        except (ValueError, KeyError, IndexError, TypeError, zstandard.ZstdError):
            return None

    def _held_chunks(self) -> set[tuple[str, int]]:
        """(batch, chunk) of every message taken and not yet acked, by any worker."""
        with self.app.connection_for_write() as conn:
            unacked = conn.default_channel.unacked_key
        out = set()
        for payload in self.r.hvals(unacked):
            try:
                found = C.chunk_of_task_id(json.loads(payload)[0]["headers"]["id"])
            except (ValueError, KeyError, IndexError, TypeError):
                continue
            if found is not None:
                out.add(found)
        return out

    def _resend(self, batch_id: str, chunk: int) -> bool:
        if not self.r.set(f"{C.pending_key(batch_id)}:resent:{chunk}", self.id, nx=True, ex=RESEND_LOCK_S):
            return False  # another worker sent it
        msg = self._store.kept_message(batch_id, chunk)
        if msg is None:
            return False  # written meanwhile
        now = time.time()
        self._store.mark_sent_again(batch_id, chunk, now)  # before the send: never older than its copy
        self.app.send_task(msg["task"], args=msg["args"], kwargs={**msg["kwargs"], "sent_at": now},
                           queue=msg["queue"], task_id=C.chunk_task_id(batch_id, chunk))
        self.r.hincrby(C.batch_key(batch_id), "resent", 1)
        log.warning("sent chunk %d of %s again: it had left its queue, yet no worker held it (a worker or Redis "
                    "died between kombu's take of the message and its record)", chunk, batch_id)
        return True


def _describe(payload: str | None) -> str:
    """Task name, id and the start of its arguments, for the log line of a restored message."""
    if not payload:
        return "(already gone)"
    try:
        headers = json.loads(payload)[0].get("headers", {})
        return f"{headers.get('task')}[{headers.get('id')}] {str(headers.get('argsrepr'))[:60]}"
    except (ValueError, AttributeError, IndexError, TypeError):
        return "(unreadable)"


def tolerate_kombu_close_race() -> None:
    """kombu's Redis channel, closed after a lost broker connection, restores its unacked messages
    through a connection object that may already be detached, and raises AttributeError ('NoneType'
    object has no attribute 'hostname'; kombu issues 582 and 970). Celery treats that as
    unrecoverable and the worker exits mid-outage. Skip the restore instead: those deliveries stay
    in `unacked` under this worker's claim, and `Lease._lost_acks` hands them back once no task
    of this worker holds them."""
    from kombu.transport import redis as kredis
    original = kredis.QoS.restore_unacked
    if getattr(original, "_gristmill", False):
        return

    def restore_unacked(self, client=None):
        try:
            return original(self, client)
        except AttributeError:
            log.warning("kombu could not restore this channel's unacked messages after a lost connection; "
                        "the lease hands them back")

    restore_unacked._gristmill = True  # type: ignore[attr-defined]
    kredis.QoS.restore_unacked = restore_unacked

    # The same race on the ack (and reject) of a message whose task finished during the outage:
    # the channel it came on has lost its connection, so removing it from `unacked` raises the
    # same AttributeError from the event loop, and the worker exits. Its lines are written by then
    # (acks come after writes), so forget the delivery here as kombu's own ack would; its entry
    # stays in `unacked` under this worker's claim, the lease hands it back, and the redelivery
    # writes no line twice (writes are idempotent by batch and custom_id).
    from kombu.transport import virtual

    def detached(name: str):
        original_op = getattr(kredis.QoS, name)

        def op(self, delivery_tag, *args, **kwargs):
            try:
                return original_op(self, delivery_tag, *args, **kwargs)
            except AttributeError:
                if getattr(getattr(self.channel, "connection", None), "client", None) is not None:
                    raise  # the channel still has its connection: not this race
                log.warning("kombu could not %s delivery %s: its channel lost its connection; the lease "
                            "hands it back", name, delivery_tag)
                virtual.QoS.ack(self, delivery_tag)
        return op

    kredis.QoS.ack = detached("ack")
    kredis.QoS.reject = detached("reject")
