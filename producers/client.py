"""The Python front door: submit JSONL files, watch progress, download results, cancel."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import constants as C
from .batches import Batch, BatchStore, new_batch_id
from .errors import DuplicateCustomIds, SubmissionRejected
from .policy import Policy
from .ingest import (AUTO_PARALLEL_LINES, IngestLease, IngestPlan, IngestReport, LeaseHeld, check_unique, enqueue,
                     enqueue_parallel, ranges, wait_for_memory)
from .redis_server import connect, resolve_redis_url, with_retry
from .registry import ModelSpec
from .schemas import loads_line
from .settings import Settings, parse_window


_COMPRESSED = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
               b"PK\x03\x04": "zip"}


def check_compressed(path: Path) -> None:
    """Raises SubmissionRejected for a compressed file, which would otherwise fail line by line as
    invalid JSON."""
    with open(path, "rb") as f:
        head = f.read(8)
    for magic, kind in _COMPRESSED.items():
        if head.startswith(magic):
            raise SubmissionRejected(f"input file {path} is {kind}-compressed; decompress it first "
                                     f"(the input is JSONL text, one request a line)")


# OpenAI's limits on a batch's metadata
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512


def check_metadata(metadata: dict[str, str] | None) -> None:
    """Raises SubmissionRejected unless metadata is at most 16 string pairs, keys of at most 64
    characters and values of at most 512 (OpenAI's limits)."""
    if metadata is None:
        return
    if not isinstance(metadata, dict) or len(metadata) > MAX_METADATA_PAIRS:
        raise SubmissionRejected(f"metadata: give at most {MAX_METADATA_PAIRS} key-value pairs")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise SubmissionRejected(f"metadata: keys and values must be strings; fix {k!r}")
        if not 0 < len(k) <= MAX_METADATA_KEY or len(v) > MAX_METADATA_VALUE:
            raise SubmissionRejected(f"metadata: key {k[:80]!r} must have 1-{MAX_METADATA_KEY} characters and its "
                                     f"value at most {MAX_METADATA_VALUE}")


class Client:
    """Talks to Redis and the Celery broker; never imports torch.

    >>> c = Client()                       # GRISTMILL_REDIS_URL, or the running `gristmill up`
    >>> b = c.submit_file("jobs.jsonl")
    >>> c.wait(b.id); c.download(b.id, "out.jsonl", "errors.jsonl")
    """

    def __init__(self, settings: Settings | None = None, redis_url: str | None = None):
        self.settings = settings or Settings()
        self.redis_url = redis_url or resolve_redis_url(self.settings)
        self.redis = connect(self.redis_url, master=self.settings.redis_master_name, decode_responses=True)
        self.store = BatchStore(self.redis, self.settings.result_ttl_s, self.settings.redis_min_replicas)
        self._app = None

    @property
    def app(self):
        if self._app is None:
            from .app import make_app
            self._app = make_app(self.settings, self.redis_url)
        return self._app

    def submit_file(self, path: str | Path, *, completion_window: str | None = None,
                    metadata: dict[str, str] | None = None, policy: str | Path | Policy | None = None,
                    on_wait: Callable[[str], None] | None = None) -> Batch:
        """Validate and enqueue every line of `path`. Raises SubmissionRejected (nothing enqueued)
        for whole-file problems such as duplicate custom_ids; bad lines become error lines.
        `policy` (a Policy or its YAML/JSON file) governs the batch's moderation lines; default:
        GRISTMILL_MODERATION_POLICY, else the shipped policy. `on_wait(why)` is told when ingest
        holds back for the workers to drain the queues (GRISTMILL_MAX_QUEUED_LINES) or for Redis
        to have memory to spare."""
        wait_for_memory(self.redis, on_wait)
        batch = self.create_batch(path, completion_window=completion_window, metadata=metadata, policy=policy)
        return self.ingest(batch.id, on_wait=on_wait)

    def create_batch(self, path: str | Path, *, completion_window: str | None = None,
                     metadata: dict[str, str] | None = None, policy: str | Path | Policy | None = None,
                     endpoint: str | None = None, owner: str | None = None,
                     files: dict[str, str] | None = None, batch_id: str | None = None) -> Batch:
        """Check the file and the batch's options and record the batch (`validating`), with the
        plan its ingest follows: `ingest` runs it, and runs it again after a process died midway.
        `endpoint`, `owner` and `files` are the HTTP API's."""
        path = Path(path)
        if not path.is_file():
            raise SubmissionRejected(f"input file {path} does not exist")
        check_compressed(path)
        check_metadata(metadata)
        if policy is None or not isinstance(policy, Policy):
            policy = self.settings.policy(Path(policy) if policy is not None else None)
        else:
            policy = self.settings.checked_policy(policy)
        window = completion_window or self.settings.completion_window
        batch_id = batch_id or new_batch_id()
        plan = IngestPlan(path=str(path.resolve()), policy=policy.wire() if policy is not None else None,
                          endpoint=endpoint, chunk_size=self.settings.chunk_size,
                          chunk_max_bytes=self.settings.chunk_max_bytes, max_line_bytes=self.settings.max_line_bytes)
        self.store.create(batch_id, input_file=str(path), completion_window=window, window_s=parse_window(window),
                          metadata=metadata, policy=policy, plan=dataclasses.asdict(plan), owner=owner,
                          endpoint=endpoint, files=files)
        self.redis.sadd(C.INGESTS_KEY, batch_id)
        return self.store.get(batch_id)

    def ingest(self, batch_id: str, on_wait: Callable[[str], None] | None = None) -> Batch:
        """Run (or run again) a recorded batch's ingest: pass 1 (duplicates, hash), then pass 2
        (validate, send chunks), holding the batch's ingest lease all along, so that if this process
        dies a `gristmill serve` takes over (`resume_ingests`). Run again, it repeats pass 1 only if
        pass 1 had not finished, and sends only the chunks not yet written: the same file and plan
        make the same chunks, so nothing is sent twice that was written, and nothing is lost."""
        plan = IngestPlan(**self.store.plan(batch_id))
        with IngestLease(self.redis, batch_id, self.settings.lease_ttl_s):
            batch = self.store.get(batch_id)
            if batch.done or batch.status == C.CANCELLING:
                if batch.status == C.CANCELLING:  # cancelled while its ingest was away: no more chunks
                    self.store.set_chunks_total(batch_id, self.store.sent_chunks(batch_id))
                self.redis.srem(C.INGESTS_KEY, batch_id)
                return self.store.get(batch_id)
            policy = Policy.model_validate(plan.policy) if plan.policy is not None else None
            path = Path(plan.path)
            resume = batch.status != C.VALIDATING or self.redis.exists(C.ids_key(batch_id))
            try:
                if not path.is_file():
                    raise SubmissionRejected(f"input file {path} is gone")
                if batch.status == C.VALIDATING:
                    self.redis.delete(C.ids_key(batch_id))  # a pass 1 cut short starts over
                    pass1 = check_unique(self.store, batch_id, path)
                    cap = self.settings.max_batch_lines
                    if cap and pass1.total > cap:
                        raise SubmissionRejected(f"the file has {pass1.total:,} requests; this deployment takes at "
                                                 f"most {cap:,} a batch (GRISTMILL_MAX_BATCH_LINES)")
                    spans = ranges(pass1.marks, self._ingest_processes(pass1.total))
                    self.store.mark_in_progress(batch_id, pass1.total, pass1.sha256, spans)
                    # the custom_id set served pass 1 alone: ~60 bytes a line that would otherwise
                    # stay in Redis as long as the results (UNLINK: freed off the main thread)
                    self.redis.unlink(C.ids_key(batch_id))
                else:
                    spans = self.store.spans(batch_id)
            except SubmissionRejected as e:
                self.store.fail(batch_id, [{"code": "duplicate_custom_id" if isinstance(e, DuplicateCustomIds)
                                            else "invalid_file", "message": str(e), "param": "input_file_id"}])
                self.redis.srem(C.INGESTS_KEY, batch_id)
                raise
            report = IngestReport()
            settings = self.settings.model_copy(update={"chunk_size": plan.chunk_size,
                                                        "chunk_max_bytes": plan.chunk_max_bytes,
                                                        "max_line_bytes": plan.max_line_bytes})
            if len(spans) > 1:
                enqueue_parallel(settings, self.redis_url, batch_id, path, spans, report, policy, plan.endpoint,
                                 resume)
            else:
                enqueue(self.app, self.store, settings.registry, batch_id, path, plan.chunk_size, report,
                        policy=policy, max_line_bytes=plan.max_line_bytes, chunk_max_bytes=plan.chunk_max_bytes,
                        endpoint=plan.endpoint, resume=resume, max_queued_lines=self.settings.max_queued_lines,
                        on_wait=on_wait)
            if report.valid == 0:
                self.redis.hset(C.batch_key(batch_id), "valid", 0)
            self.store.set_chunks_total(batch_id, report.chunks, [q for q, n in report.by_queue.items() if n])
            self.redis.srem(C.INGESTS_KEY, batch_id)
        return self.store.get(batch_id)

    def resume_ingests(self) -> list[str]:
        """Batches whose ingest stopped without ending (its process died: no lease), taken over
        here one by one; returns their ids. `gristmill serve` calls this periodically; the input
        file must be readable from here (the HTTP API's uploads are)."""
        resumed = []
        for batch_id in list(self.redis.smembers(C.INGESTS_KEY)):
            if self.redis.exists(C.ingest_lease_key(batch_id)):
                continue
            created = self.redis.hget(C.batch_key(batch_id), "created_at")
            if created is None or self.store.plan(batch_id) is None:
                self.redis.srem(C.INGESTS_KEY, batch_id)
                continue
            if time.time() - int(created) < self.settings.lease_ttl_s:
                continue  # just created: its ingest is about to take the lease

            try:
                self.ingest(batch_id)
                resumed.append(batch_id)
            except LeaseHeld:
                continue
            except SubmissionRejected:
                resumed.append(batch_id)  # failed, and recorded so
        return resumed

    def _ingest_processes(self, lines: int) -> int:
        n = self.settings.ingest_processes
        if n:
            return n
        cores = os.cpu_count() or 1
        # On 2 cores two processes ran no faster (29k vs 29-31k lines/s): pass 1 and the Redis
        # server hold the other core. So auto mode waits for a host with cores to spare.
        return min(8, cores) if lines >= AUTO_PARALLEL_LINES and cores >= 4 else 1

    def get(self, batch_id: str) -> Batch:
        return self.store.get(batch_id)

    def list(self, limit: int = 20) -> list[Batch]:
        return [self.store.get(b) for b in self.store.list_ids(limit) if self.redis.exists(C.batch_key(b))]

    def cancel(self, batch_id: str) -> Batch:
        self.store.cancel(batch_id)
        return self.store.get(batch_id)

    def wait(self, batch_id: str, *, timeout: float | None = None, poll_s: float = 0.5,
             on_progress: Callable[[Batch], None] | None = None) -> Batch:
        """Block until the batch reaches a terminal state (or `timeout` seconds pass)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            # a Redis restart mid-batch is waited out (up to `timeout`, else 5 minutes)
            left = 300.0 if deadline is None else max(0.0, deadline - time.monotonic())
            batch = with_retry(self.store.get, batch_id, deadline_s=left, what=f"reading batch {batch_id}")
            if on_progress:
                on_progress(batch)
            if batch.done:
                return batch
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"batch {batch_id} still {batch.status} after {timeout} s "
                                   f"({batch.request_counts.completed + batch.request_counts.failed}"
                                   f"/{batch.request_counts.total} done)")
            time.sleep(poll_s)

    def download(self, batch_id: str, out: str | Path, errors: str | Path | None = None) -> tuple[int, int]:
        """Write the output lines (and error lines, if `errors` is given) written so far.
        Returns (outputs, errors) counted. Safe while the batch runs: partial results."""
        n_out = n_err = 0
        out_f = open(out, "w", encoding="utf-8")
        err_f = open(errors, "w", encoding="utf-8") if errors else None
        try:
            for out_lines, err_lines in self.store.iter_parts(batch_id):
                n_out += out_lines.count("\n")
                n_err += err_lines.count("\n")
                out_f.write(out_lines)
                if err_f:
                    err_f.write(err_lines)
        finally:
            out_f.close()
            if err_f:
                err_f.close()
        return n_out, n_err

    def iter_results(self, batch_id: str, *, errors: bool = False) -> Iterator[dict[str, Any]]:
        """The batch's output lines (or its error lines, with errors=True) written so far, parsed,
        one part at a time: memory stays flat however large the batch. In no particular order, as
        in the files; match lines by custom_id. Safe while the batch runs."""
        for out_lines, err_lines in self.store.iter_parts(batch_id):
            text = err_lines if errors else out_lines
            # split on "\n" only: JSON keeps U+2028 and NEL raw, which splitlines() would break at
            for line in text.split("\n")[:-1]:
                yield loads_line(line)  # as the standard library parses it (integers of any size)

    def workers(self) -> dict[str, list[str]]:
        """The worker processes whose heartbeat is current (host:pid:tag) and the queues each consumes."""
        return self.store.live_workers()

    def unserved_queues(self, batch_id: str) -> list[str]:
        """The batch's queues that no running worker consumes: its work there waits until one starts."""
        return self.store.unserved_queues(batch_id)

    def models(self) -> list[ModelSpec]:
        return list(self.settings.registry.specs.values())

    def close(self) -> None:
        self.redis.close()
