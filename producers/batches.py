"""Batch records and their lifecycle in Redis: create, count, record results, finalize, cancel.

Results live in one hash per batch, one field per part (a chunk's output and error lines,
zstd-compressed), written with HSETNX inside one Lua call per chunk: a redelivered message can never
add a second line for an item, and the counters move only for lines that are new. The same call
marks the chunk done and, when the last chunk is done, moves the batch to `finalizing` exactly
once, so only one writer finalizes.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
import zlib
from typing import Any, Iterable, Iterator, NamedTuple

import orjson
import redis as redis_lib
import zstandard
from pydantic import BaseModel
from redis.client import NEVER_DECODE

from . import constants as C
from .errors import BatchNotFound


class NotReplicated(redis_lib.ConnectionError):
    """Raised when a write was not acknowledged by GRISTMILL_REDIS_MIN_REPLICAS replicas in time.
    A ConnectionError, so that the retries for a Redis that is away (with_retry, kombu) retry it:
    the writes it guards are idempotent."""


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class DedupCounts(BaseModel):
    """Classifier inputs looked up in the score cache, and those answered without running the model
    (cached from an earlier chunk or batch, or repeated within one chunk)."""
    inputs: int = 0
    reused: int = 0

    @property
    def hit_rate(self) -> float:
        return self.reused / self.inputs if self.inputs else 0.0


class CascadeCounts(BaseModel):
    """Classifier inputs a cascade scored, those it escalated past its student, and those its full
    model decided (fewer than escalated where a middle stage decided some)."""
    inputs: int = 0
    escalated: int = 0
    to_full: int = 0

    @property
    def share(self) -> float:
        return self.escalated / self.inputs if self.inputs else 0.0


class ChunkCounts(BaseModel):
    """What a chunk's write adds to its batch's classifier counters."""
    dedup_inputs: int = 0
    dedup_reused: int = 0
    cascade_inputs: int = 0
    escalated: int = 0
    to_full: int = 0

    def __add__(self, other: "ChunkCounts") -> "ChunkCounts":
        return ChunkCounts(**{k: getattr(self, k) + getattr(other, k) for k in ChunkCounts.model_fields})


class Batch(BaseModel):
    """A batch as OpenAI describes one, plus the counts gristmill keeps."""
    id: str
    object: str = "batch"
    status: str
    input_file: str | None = None
    input_sha256: str | None = None
    completion_window: str = "24h"
    request_counts: RequestCounts
    created_at: int
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    expires_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    errors: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    # The moderation policy the batch runs under: {policy_version, model, thresholds_digest}.
    policy: dict[str, str] | None = None
    dedup: DedupCounts = DedupCounts()
    cascade: CascadeCounts = CascadeCounts()
    # Chunk messages sent again by the sweep (workers/reaper.py) after one was lost in transit.
    resent: int = 0
    # Set while ingest holds back (producers/ingest.py, Backpressure): since when, and why.
    ingest_waiting_since: int | None = None
    ingest_waiting_for: str | None = None
    # Batches created over HTTP: the key that owns it, its endpoint, and its files' ids. The output
    # and error file ids are given out once the batch has lines of that kind.
    owner: str | None = None
    endpoint: str | None = None
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None

    @property
    def done(self) -> bool:
        return self.status in C.TERMINAL

    def to_openai(self) -> dict[str, Any]:
        """The batch as the OpenAI API's Batch object."""
        errors = None
        if self.errors:
            errors = {"object": "list", "data": [{"code": e.get("code"), "message": e.get("message"),
                                                  "param": e.get("param"), "line": e.get("line")} for e in self.errors]}
        return {"id": self.id, "object": "batch", "endpoint": self.endpoint or "", "errors": errors,
                "input_file_id": self.input_file_id or "", "completion_window": self.completion_window,
                "status": self.status, "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
                "created_at": self.created_at, "in_progress_at": self.in_progress_at, "expires_at": self.expires_at,
                "finalizing_at": self.finalizing_at, "completed_at": self.completed_at, "failed_at": self.failed_at,
                "expired_at": self.expired_at, "cancelling_at": self.cancelling_at, "cancelled_at": self.cancelled_at,
                "request_counts": self.request_counts.model_dump(), "metadata": self.metadata, "model": None,
                "usage": None,
                # gristmill's own, beside OpenAI's fields: ingest holds back while the queues are full
                **({"ingest_waiting_since": self.ingest_waiting_since, "ingest_waiting_for": self.ingest_waiting_for}
                   if self.ingest_waiting_since else {})}


# Record one part of a batch's results: the lines of one chunk (or one block of ingest errors),
# stored as one hash field; the chunk's kept message is dropped. KEYS: meta, results, chunks_done,
# pending, pending_at. ARGV: chunk (or ''), now, part field
# (or '' to only mark the chunk), value, completed, failed, dedup inputs, dedup reused, output
# bytes, error bytes, cascade inputs, escalated, decided by the full model. HSETNX on the part makes a redelivered chunk a no-op: its lines, and so its
# custom_ids, are fixed at ingest. Returns {completed, failed, transition}, counting only a part
# that was new.
_RECORD = """
local completed, failed = 0, 0
if ARGV[3] ~= '' and redis.call('HSETNX', KEYS[2], ARGV[3], ARGV[4]) == 1 then
  completed, failed = tonumber(ARGV[5]), tonumber(ARGV[6])
  if completed > 0 then redis.call('HINCRBY', KEYS[1], 'completed', completed) end
  if failed > 0 then redis.call('HINCRBY', KEYS[1], 'failed', failed) end
  if tonumber(ARGV[7]) > 0 then
    redis.call('HINCRBY', KEYS[1], 'dedup_inputs', ARGV[7])
    redis.call('HINCRBY', KEYS[1], 'dedup_reused', ARGV[8])
  end
  if tonumber(ARGV[9]) > 0 then redis.call('HINCRBY', KEYS[1], 'out_bytes', ARGV[9]) end
  if tonumber(ARGV[10]) > 0 then redis.call('HINCRBY', KEYS[1], 'err_bytes', ARGV[10]) end
  if tonumber(ARGV[11]) > 0 then
    redis.call('HINCRBY', KEYS[1], 'cascade_inputs', ARGV[11])
    redis.call('HINCRBY', KEYS[1], 'cascade_escalated', ARGV[12])
    redis.call('HINCRBY', KEYS[1], 'cascade_to_full', ARGV[13])
  end
end
if ARGV[1] ~= '' then
  redis.call('SADD', KEYS[3], ARGV[1])
  redis.call('HDEL', KEYS[4], ARGV[1])
  redis.call('ZREM', KEYS[5], ARGV[1])
end
local transition = ''
local chunks_total = redis.call('HGET', KEYS[1], 'chunks_total')
if chunks_total and redis.call('SCARD', KEYS[3]) >= tonumber(chunks_total) then
  local status = redis.call('HGET', KEYS[1], 'status')
  if status == 'in_progress' then
    redis.call('HSET', KEYS[1], 'status', 'finalizing', 'finalizing_at', ARGV[2])
    transition = 'finalizing'
  elseif status == 'cancelling' then
    redis.call('HSET', KEYS[1], 'status', 'cancelled', 'cancelled_at', ARGV[2])
    transition = 'cancelled'
  end
end
return {completed, failed, transition}
"""

# Cancel. KEYS: meta, chunks_done. ARGV: now. Returns the status after.
_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status == 'validating' or status == 'in_progress' then
  redis.call('HSET', KEYS[1], 'status', 'cancelling', 'cancelling_at', ARGV[1])
  status = 'cancelling'
  local chunks_total = redis.call('HGET', KEYS[1], 'chunks_total')
  if chunks_total and redis.call('SCARD', KEYS[2]) >= tonumber(chunks_total) then
    redis.call('HSET', KEYS[1], 'status', 'cancelled', 'cancelled_at', ARGV[1])
    status = 'cancelled'
  end
end
return status
"""

# Add custom_ids to a batch's id set. KEYS: ids. ARGV: ids. Returns the ids that were already
# there (from earlier blocks, or earlier in this one): one round trip and, as a file without
# repeats is the rule, an empty reply, where a pipelined SADD per id costs a reply per line.
_ADD_IDS = """
local repeats = {}
for i = 1, #ARGV do
  if redis.call('SADD', KEYS[1], ARGV[i]) == 0 then repeats[#repeats + 1] = ARGV[i] end
end
return repeats
"""

_INT_FIELDS = ("created_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
               "expires_at", "cancelling_at", "cancelled_at")


def new_batch_id() -> str:
    """`batch_` + the time in ms (12 hex digits) + 20 random hex digits: ids sort by creation time,
    which the HTTP API's list cursor relies on."""
    return f"batch_{int(time.time() * 1000):012x}{secrets.token_hex(10)}"


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _decompress(data: bytes) -> bytes:
    """A kept message: zstd, or zlib as kept by earlier versions (a batch that ingested before an
    upgrade still has its lost chunks sent again)."""
    if data[:4] == _ZSTD_MAGIC:
        return zstandard.ZstdDecompressor().decompress(data)
    return zlib.decompress(data)


def dumps_line(value: dict[str, Any]) -> str:
    """One result or error line as compact UTF-8 JSON. orjson writes a moderation line in ~2 us
    against the standard library's ~24 (its 13 float scores dominate: shortest round-trip digits
    either way, so both parse to the same numbers). What orjson refuses (integers beyond 64 bits,
    lone surrogates, non-string keys) goes to the standard library, so whatever encoded before
    still encodes."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class EncodedPart(NamedTuple):
    """A part as stored, its line counts, and the UTF-8 size of its output and error JSONL (the
    sizes of the batch's output and error files grow by these)."""
    value: bytes
    outputs: int
    errors: int
    output_bytes: int
    error_bytes: int


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def encode_part(lines: list[tuple[dict[str, Any], bool]]) -> EncodedPart:
    """The stored value for (line, is_error) pairs: "<len of outputs>:" then the output JSONL, then
    the error JSONL, so downloads copy whole parts without parsing lines; zstd-compressed (level 1).
    A moderation line is ~1.7 kB of JSON, most of it the same category names three times over:
    compressed, a part of 256 such lines keeps ~190 bytes a line, so a batch's results take a ninth
    of the Redis memory and AOF writes, for ~3.7 us a line of worker time."""
    out = "".join(dumps_line(v) + "\n" for v, e in lines if not e)
    err = "".join(dumps_line(v) + "\n" for v, e in lines if e)
    n_err = sum(1 for _, e in lines if e)
    # one compressor per call: instances are not safe to share between the worker's threads
    value = zstandard.ZstdCompressor(level=1).compress(f"{len(out)}:{out}{err}".encode())
    return EncodedPart(value, len(lines) - n_err, n_err, _utf8_len(out), _utf8_len(err))


def decode_part(value: bytes | str) -> tuple[str, str]:
    """(output JSONL, error JSONL) of a stored part: zstd-compressed, or the plain text that earlier
    versions stored (a batch written before an upgrade still downloads)."""
    if isinstance(value, bytes):
        if value[:4] == _ZSTD_MAGIC:
            value = zstandard.ZstdDecompressor().decompress(value)
        value = value.decode("utf-8")
    head, _, rest = value.partition(":")
    n = int(head)
    return rest[:n], rest[n:]


class BatchStore:
    """All reads and writes of batch state. Thin over a redis-py client (decode_responses=True)."""

    def __init__(self, redis, result_ttl_s: int = 7 * 24 * 3600, min_replicas: int = 0,
                 replica_timeout_ms: int = 2000):
        """`min_replicas` > 0: a chunk's results, and each message ingest sends, count as written
        only once that many replicas acknowledged them (Redis WAIT), so a failover to a replica
        loses none of them (replication is asynchronous otherwise)."""
        self.r = redis
        self.result_ttl_s = result_ttl_s
        self.min_replicas = min_replicas
        self.replica_timeout_ms = replica_timeout_ms
        self._replicas_seen: tuple[float, int] = (float("-inf"), 0)  # (when, connected replicas)
        self._record = redis.register_script(_RECORD)
        self._cancel = redis.register_script(_CANCEL)
        self._add_ids = redis.register_script(_ADD_IDS)

    # -- creation and reads
    def create(self, batch_id: str, *, input_file: str | None, completion_window: str, window_s: int,
               metadata: dict[str, str] | None = None, policy=None, plan: dict[str, Any] | None = None,
               owner: str | None = None, endpoint: str | None = None, files: dict[str, str] | None = None) -> None:
        """`plan`: what ingest needs to run the batch again from its record (`Client.ingest`);
        `files`: the HTTP API's input, output and error file ids."""
        now = int(time.time())
        meta = {"status": C.VALIDATING, "created_at": now, "expires_at": now + window_s,
                "completion_window": completion_window, "total": 0, "completed": 0, "failed": 0,
                "input_file": input_file or "", "metadata": json.dumps(metadata or {})}
        if policy is not None:
            meta["policy"] = json.dumps({"policy_version": policy.policy_version, "model": policy.model,
                                         "thresholds_digest": policy.thresholds_digest})
        if plan is not None:
            meta["plan"] = json.dumps(plan)
        meta.update({k: v for k, v in (("owner", owner), ("endpoint", endpoint)) if v})
        meta.update(files or {})
        pipe = self.r.pipeline()
        pipe.hset(C.batch_key(batch_id), mapping=meta)
        pipe.zadd(C.BATCH_INDEX, {batch_id: now})
        pipe.zadd(C.BATCHES_BY_ID, {batch_id: 0})
        if owner:
            pipe.zadd(C.batches_index_key(owner), {batch_id: 0})
        pipe.execute()

    def plan(self, batch_id: str) -> dict[str, Any] | None:
        raw = self.r.hget(C.batch_key(batch_id), "plan")
        return json.loads(raw) if raw else None

    def raw(self, batch_id: str) -> dict[str, str]:
        meta = self.r.hgetall(C.batch_key(batch_id))
        if not meta:
            raise BatchNotFound(f"batch {batch_id!r} not found (unknown id, or its records expired)")
        return meta

    def get(self, batch_id: str) -> Batch:
        m = self.raw(batch_id)
        fields: dict[str, Any] = {k: int(m[k]) for k in _INT_FIELDS if m.get(k)}
        errors = json.loads(m["errors"]) if m.get("errors") else None
        return Batch(id=batch_id, status=m["status"], input_file=m.get("input_file") or None,
                     input_sha256=m.get("input_sha256") or None,
                     completion_window=m.get("completion_window", "24h"),
                     request_counts=RequestCounts(total=int(m.get("total", 0)), completed=int(m.get("completed", 0)),
                                                  failed=int(m.get("failed", 0))),
                     errors=errors, metadata=json.loads(m.get("metadata") or "{}") or None,
                     policy=json.loads(m["policy"]) if m.get("policy") else None,
                     dedup=DedupCounts(inputs=int(m.get("dedup_inputs", 0)), reused=int(m.get("dedup_reused", 0))),
                     cascade=CascadeCounts(inputs=int(m.get("cascade_inputs", 0)),
                                           escalated=int(m.get("cascade_escalated", 0)),
                                           to_full=int(m.get("cascade_to_full", 0))),
                     resent=int(m.get("resent", 0)), owner=m.get("owner") or None, endpoint=m.get("endpoint") or None,
                     ingest_waiting_since=int(m["ingest_waiting_since"]) if m.get("ingest_waiting_since") else None,
                     ingest_waiting_for=m.get("ingest_waiting_for") or None,
                     input_file_id=m.get("input_file_id") or None,
                     output_file_id=(m.get("output_file_id") or None) if int(m.get("out_bytes", 0)) else None,
                     error_file_id=(m.get("error_file_id") or None) if int(m.get("err_bytes", 0)) else None,
                     **fields)

    def add_ids(self, batch_id: str, ids: list[str]) -> list[str]:
        """Record custom_ids for duplicate detection; returns those seen before (repeats)."""
        return list(self._add_ids(keys=[C.ids_key(batch_id)], args=ids)) if ids else []

    def status(self, batch_id: str) -> str | None:
        return self.r.hget(C.batch_key(batch_id), "status")

    def live_workers(self) -> dict[str, list[str]]:
        """Worker process id -> the queues it consumes, for each worker whose heartbeat is current."""
        out: dict[str, list[str]] = {}
        for member in self.r.zrangebyscore(C.WORKERS_KEY, time.time(), "+inf"):
            member = member.decode() if isinstance(member, bytes) else member
            worker, _, queues = member.partition("|")
            out[worker] = [q for q in queues.split(",") if q]
        return out

    def serving(self) -> dict[str, dict[str, str]]:
        """Live worker process -> {model: the variant it serves and why}, for models it has loaded."""
        return {w: self.r.hgetall(C.serving_key(w)) for w in self.live_workers()}

    def unserved_queues(self, batch_id: str) -> list[str]:
        """The queues holding this batch's work that no live worker consumes."""
        queues = [q for q in (self.raw(batch_id).get("queues") or "").split(",") if q]
        served = {q for qs in self.live_workers().values() for q in qs}
        return [q for q in queues if q not in served]

    def list_ids(self, limit: int = 20) -> list[str]:
        return list(self.r.zrevrange(C.BATCH_INDEX, 0, limit - 1))

    # -- lifecycle
    def mark_in_progress(self, batch_id: str, total: int, input_sha256: str,
                         spans: list[tuple[int, int | None, int]] | None = None) -> None:
        """Pass 1 is done. `spans`: the byte ranges pass 2 runs in (one process each), kept so that
        a pass 2 run again numbers its chunks the same way."""
        self.r.hset(C.batch_key(batch_id), mapping={"status": C.IN_PROGRESS, "in_progress_at": int(time.time()),
                                                      "total": total, "input_sha256": input_sha256,
                                                      "spans": json.dumps(spans or [(0, None, 1)])})

    def spans(self, batch_id: str) -> list[tuple[int, int | None, int]]:
        raw = self.r.hget(C.batch_key(batch_id), "spans")
        return [tuple(s) for s in json.loads(raw)] if raw else [(0, None, 1)]  # type: ignore[misc]

    def sent_chunks(self, batch_id: str) -> int:
        """Chunks sent so far: those written and those still kept for sending again."""
        pipe = self.r.pipeline()
        pipe.smembers(C.chunks_done_key(batch_id))
        pipe.hkeys(C.pending_key(batch_id))
        done, pending = pipe.execute()
        return len(set(map(str, done)) | set(map(str, pending)))

    def fail(self, batch_id: str, errors: list[dict[str, Any]]) -> None:
        now = int(time.time())
        self.r.hset(C.batch_key(batch_id), mapping={"status": C.FAILED, "failed_at": now,
                                                      "errors": json.dumps(errors)})
        self._expire(batch_id)

    def set_chunks_total(self, batch_id: str, n: int, queues: Iterable[str] = ()) -> str:
        """Called once enqueueing ends; finalizes at once if every chunk is already done. The batch
        joins the sweep's list: its chunks were all sent to `queues`."""
        pipe = self.r.pipeline()
        pipe.hset(C.batch_key(batch_id), mapping={"chunks_total": n, "queues": ",".join(sorted(queues))})
        pipe.sadd(C.SWEEP_KEY, batch_id)
        pipe.execute()
        return self.record(batch_id, None, [])

    # -- chunk messages kept until their lines are written (workers/reaper.py sends lost ones again)
    def keep_message(self, batch_id: str, chunk: int, message: dict[str, Any]) -> None:
        """message: {task, queue, args, kwargs}, stored compressed (zstd level 1: JSON lines shrink
        3-5x, at ~3 us per 700-byte line where zlib's fastest level took ~9)."""
        packed = base64.b64encode(zstandard.ZstdCompressor(level=1).compress(dumps_line(message).encode())).decode()
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(C.pending_key(batch_id), chunk, packed)
        pipe.zadd(C.pending_at_key(batch_id), {str(chunk): message["kwargs"].get("sent_at", time.time())})
        pipe.execute()

    def mark_sent_again(self, batch_id: str, chunk: int, at: float) -> None:
        """A pending chunk sent again at `at` (XX: a chunk written meanwhile stays gone)."""
        self.r.zadd(C.pending_at_key(batch_id), {str(chunk): at}, xx=True)

    def kept_message(self, batch_id: str, chunk: int) -> dict[str, Any] | None:
        packed = self.r.hget(C.pending_key(batch_id), chunk)
        return json.loads(_decompress(base64.b64decode(packed))) if packed else None

    def record(self, batch_id: str, chunk: int | None, lines: list[tuple[dict[str, Any], bool]],
               part: str | None = None, counts: ChunkCounts | None = None) -> str:
        """Write (line, is_error) pairs as one part, once: a worker's part is its chunk ("c<chunk>"),
        so a redelivered chunk writes nothing; ingest names its own parts. Marks `chunk` done and
        finalizes the batch after its last chunk. Returns the transition made ('' when none)."""
        if part is None:
            part = "" if chunk is None else f"c{chunk}"
        enc = encode_part(lines) if lines else EncodedPart(b"", 0, 0, 0, 0)
        c = counts or ChunkCounts()
        argv: list[Any] = ["" if chunk is None else chunk, int(time.time()), part if lines else "", enc.value,
                           enc.outputs, enc.errors, c.dedup_inputs, c.dedup_reused, enc.output_bytes, enc.error_bytes,
                           c.cascade_inputs, c.escalated, c.to_full]
        keys = [C.batch_key(batch_id), C.results_key(batch_id), C.chunks_done_key(batch_id), C.pending_key(batch_id),
                C.pending_at_key(batch_id)]
        _, _, transition = self._record(keys=keys, args=argv)
        self.replicated(f"the results of chunk {chunk} of {batch_id}")
        if transition == C.FINALIZING:
            self.finalize(batch_id)
        elif transition == C.CANCELLED:
            self._expire(batch_id)
        return transition

    def replicated(self, what: str) -> None:
        """Wait until `min_replicas` replicas hold every write this connection made (a no-op
        without replicas asked for). Raises NotReplicated, which callers retry, if connected
        replicas do not in time: the write is then not known to survive a failover. While fewer
        replicas are connected than asked for (one died, and the primary runs alone), writes go on:
        there is then no replica a failover could promote, and one that connects later copies the
        whole data set before it can be."""
        if self.min_replicas <= 0:
            return
        need = min(self.min_replicas, self._connected_replicas())
        if need == 0:
            return
        acked = int(self.r.execute_command("WAIT", need, self.replica_timeout_ms))
        if acked < need:
            if acked < min(self._connected_replicas(fresh=True), self.min_replicas):
                raise NotReplicated(f"{what}: {acked} of {self.min_replicas} replicas acknowledged it within "
                                    f"{self.replica_timeout_ms} ms")

    def _connected_replicas(self, fresh: bool = False) -> int:
        """The primary's connected replicas, looked up at most once a second (a WAIT for more
        replicas than are connected would block for its whole timeout on every write)."""
        now = time.monotonic()
        if fresh or now - self._replicas_seen[0] > 1.0:
            self._replicas_seen = (now, int(self.r.info("replication").get("connected_slaves", 0)))
        return self._replicas_seen[1]

    def finalize(self, batch_id: str) -> None:
        """The one writer that moved the batch to `finalizing` settles its final state and TTLs."""
        m = self.raw(batch_id)
        now = int(time.time())
        if m.get("valid", "1") == "0" and int(m.get("total", 0)):
            status, extra = C.FAILED, {"failed_at": now, "errors": json.dumps(
                [{"code": "no_valid_lines", "message": "no input line passed validation; see the error file"}])}
        elif m.get("has_expired"):
            status, extra = C.EXPIRED, {"expired_at": now}
        else:
            status, extra = C.COMPLETED, {"completed_at": now}
        self.r.hset(C.batch_key(batch_id), mapping={"status": status, **extra})
        self._expire(batch_id)

    def cancel(self, batch_id: str) -> str:
        status = self._cancel(keys=[C.batch_key(batch_id), C.chunks_done_key(batch_id)], args=[int(time.time())])
        if status is None:
            raise BatchNotFound(f"batch {batch_id!r} not found (unknown id, or its records expired)")
        if status == C.CANCELLED:
            self._expire(batch_id)
        return status

    def _expire(self, batch_id: str) -> None:
        pipe = self.r.pipeline()
        for key in C.batch_keys(batch_id):
            pipe.expire(key, self.result_ttl_s)
        pipe.execute()

    # -- worker side
    def begin_chunk(self, batch_id: str, chunk: int) -> tuple[str | None, int, bool, bool]:
        """(status, delivery attempt number, expired?, already written?) for a chunk a worker is
        about to run. A chunk is written already when this delivery is a second sending of it (the
        lost-chunk sweep, or an ingest resumed after its process died)."""
        pipe = self.r.pipeline()
        pipe.hget(C.batch_key(batch_id), "status")
        pipe.hget(C.batch_key(batch_id), "expires_at")
        pipe.sismember(C.chunks_done_key(batch_id), chunk)
        pipe.hincrby(C.attempts_key(batch_id), chunk, 1)
        status, expires_at, written, attempts = pipe.execute()
        expired = bool(expires_at) and time.time() > int(expires_at)
        return status, int(attempts), expired, bool(written)

    # -- a chunk re-run one item at a time (workers/tasks.py, _isolate)
    def kept_lines(self, batch_id: str, chunk: int) -> dict[str, tuple[dict[str, Any], bool]]:
        return {k: tuple(json.loads(v)) for k, v in self.r.hgetall(C.kept_key(batch_id, chunk)).items()}  # type: ignore[misc]

    def suspects(self, batch_id: str, chunk: int) -> dict[str, int]:
        return {k: int(v) for k, v in self.r.hgetall(C.suspects_key(batch_id, chunk)).items()}

    def mark_running(self, batch_id: str, chunk: int, line: int) -> None:
        """Count a death against `line` in advance; keep_line settles it."""
        pipe = self.r.pipeline()
        pipe.hincrby(C.suspects_key(batch_id, chunk), line, 1)
        pipe.expire(C.suspects_key(batch_id, chunk), self.result_ttl_s)
        pipe.execute()

    def keep_line(self, batch_id: str, chunk: int, line: int, value: dict[str, Any], is_error: bool) -> None:
        pipe = self.r.pipeline()
        pipe.hset(C.kept_key(batch_id, chunk), line, json.dumps([value, is_error]))
        pipe.expire(C.kept_key(batch_id, chunk), self.result_ttl_s)
        pipe.hincrby(C.suspects_key(batch_id, chunk), line, -1)  # it finished: no death to count
        pipe.execute()

    def mark_expired(self, batch_id: str) -> None:
        self.r.hset(C.batch_key(batch_id), "has_expired", 1)

    # -- results
    def iter_parts(self, batch_id: str, count: int = 16) -> Iterator[tuple[str, str]]:
        """(output JSONL, error JSONL) of every part written so far; works while the batch runs."""
        self.raw(batch_id)
        key, cursor = C.results_key(batch_id), 0
        while True:
            # parts are compressed bytes: read undecoded, whatever the client's decode_responses
            cursor, parts = self.r.execute_command("HSCAN", key, cursor, "COUNT", count, **{NEVER_DECODE: []})
            for value in parts.values():
                yield decode_part(value)
            if cursor == 0:
                return

    def count_lines(self, batch_id: str) -> int:
        """Output plus error lines stored so far."""
        return sum(out.count("\n") + err.count("\n") for out, err in self.iter_parts(batch_id))
