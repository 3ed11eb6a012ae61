"""Files of the HTTP front door, as OpenAI's Files API describes them.

An upload's bytes go to a directory (GRISTMILL_FILES_DIR, default `$GRISTMILL_HOME/files`),
streamed there as they arrive and renamed into place when complete; its record (size, name,
purpose, owner, expiry) lives in Redis. Only the front door and ingest read these files (workers
get the lines in their messages), so every `gristmill serve` replica must see the same directory:
a shared filesystem (NFS, EFS, a shared volume) when there are several hosts. Redis holds no file
bytes: a 1 GB upload would be 1 GB of Redis memory.

A batch's output and error files are not copies: their ids name the batch's stored results, which
are streamed from Redis part by part when read, and they live as long as those results do.

Ids embed their creation time in fixed-width hex (`file-<ms><random>`), so an index of them sorted
by id is sorted by time, and a list cursor (`after=<id>`) stays valid when that file is deleted.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import constants as C
from .apikeys import Principal
from .batches import BatchStore
from .errors import GristmillError

PURPOSE_BATCH = "batch"
PURPOSE_OUTPUT = "batch_output"
OUTPUT, ERROR = "output", "error"


class FileNotFound(GristmillError):
    """Raised when a file id is unknown, expired, deleted, or another key's."""


class UploadTooLarge(GristmillError):
    """Raised when an upload passes GRISTMILL_MAX_UPLOAD_BYTES; nothing of it is kept."""


def time_ordered_id(prefix: str, random_hex: int = 12) -> str:
    """`prefix` + 12 hex digits of the time in ms + random hex: sorts by creation time."""
    return f"{prefix}{int(time.time() * 1000):012x}{secrets.token_hex(random_hex // 2)}"


@dataclass
class StoredFile:
    """One file's record. `path` is set for uploads; `batch_id` and `part` for a batch's output or
    error file, whose size comes from the batch's counters."""
    id: str
    owner: str
    purpose: str
    filename: str
    created_at: int
    bytes: int = 0
    expires_at: int | None = None
    path: str | None = None
    batch_id: str | None = None
    part: str | None = None

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "expires_at": self.expires_at, "status_details": None}

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class Upload:
    """An upload being received: bytes go to a temporary file beside its final place."""
    store: "FileStore"
    file: StoredFile
    tmp: Path
    handle: Any = field(default=None, repr=False)

    def write(self, data: bytes) -> None:
        self.file.bytes += len(data)
        if self.file.bytes > self.store.max_bytes:
            raise UploadTooLarge(f"the upload passed the server's limit of {self.store.max_bytes:,} bytes "
                                 f"(GRISTMILL_MAX_UPLOAD_BYTES)")
        self.handle.write(data)

    def commit(self) -> StoredFile:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        final = self.store.path_of(self.file.id)
        os.replace(self.tmp, final)
        self.file.path = str(final)
        self.store.save(self.file)
        return self.file

    def abort(self) -> None:
        if self.handle is not None and not self.handle.closed:
            self.handle.close()
        self.tmp.unlink(missing_ok=True)


class FileStore:
    def __init__(self, redis, directory: Path, batches: BatchStore, *, ttl_s: int, max_bytes: int):
        self.r = redis
        self.dir = Path(directory)
        self.batches = batches
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes

    def path_of(self, file_id: str) -> Path:
        return self.dir / f"{file_id}.jsonl"

    # -- writes
    def begin_upload(self, principal: Principal, filename: str, purpose: str,
                     expires_after_s: int | None = None) -> Upload:
        self.dir.mkdir(parents=True, exist_ok=True)
        now = int(time.time())
        f = StoredFile(id=time_ordered_id("file-"), owner=principal.owner, purpose=purpose,
                       filename=filename or "upload.jsonl", created_at=now,
                       expires_at=now + (expires_after_s or self.ttl_s))
        tmp = self.dir / f".{f.id}.part"
        return Upload(self, f, tmp, open(tmp, "wb"))

    def save(self, f: StoredFile) -> None:
        pipe = self.r.pipeline()
        pipe.hset(C.file_key(f.id), mapping=f.record())
        for index in (C.FILES_INDEX, C.files_index_key(f.owner)):
            pipe.zadd(index, {f.id: 0})
        if f.expires_at is not None and f.path is not None:
            pipe.zadd(C.FILES_EXPIRY, {f.id: f.expires_at})
        pipe.execute()

    def register_outputs(self, batch_id: str, owner: str) -> tuple[str, str]:
        """The ids of a batch's output and error files, recorded now so that they list in time
        order; they show (in lists and on the batch) once the batch has such lines."""
        ids = []
        for part in (OUTPUT, ERROR):
            f = StoredFile(id=time_ordered_id("file-"), owner=owner, purpose=PURPOSE_OUTPUT,
                           filename=f"{batch_id}_{part}.jsonl", created_at=int(time.time()),
                           batch_id=batch_id, part=part)
            self.save(f)
            ids.append(f.id)
        return ids[0], ids[1]

    def delete(self, file_id: str, principal: Principal) -> None:
        f = self.get(file_id, principal)
        self._remove(f)

    def _remove(self, f: StoredFile) -> None:
        pipe = self.r.pipeline()
        pipe.delete(C.file_key(f.id))
        for index in (C.FILES_INDEX, C.files_index_key(f.owner)):
            pipe.zrem(index, f.id)
        pipe.zrem(C.FILES_EXPIRY, f.id)
        pipe.execute()
        if f.path:
            Path(f.path).unlink(missing_ok=True)

    def sweep_expired(self, now: float | None = None) -> int:
        """Delete uploads past their expires_at; returns how many."""
        gone = 0
        for file_id in self.r.zrangebyscore(C.FILES_EXPIRY, "-inf", now or time.time(), start=0, num=1000):
            f = self._load(file_id)
            if f is None:
                self.r.zrem(C.FILES_EXPIRY, file_id)
                continue
            self._remove(f)
            gone += 1
        return gone

    # -- reads
    def _load(self, file_id: str) -> StoredFile | None:
        m = self.r.hgetall(C.file_key(file_id))
        if not m:
            return None
        ints = {k: int(m[k]) for k in ("created_at", "bytes", "expires_at") if m.get(k) not in (None, "")}
        f = StoredFile(id=m["id"], owner=m["owner"], purpose=m["purpose"], filename=m["filename"],
                       path=m.get("path"), batch_id=m.get("batch_id"), part=m.get("part"), **ints)
        if f.batch_id is not None:
            return self._with_results(f)
        return f

    def _with_results(self, f: StoredFile) -> StoredFile | None:
        """An output or error file's size and expiry from its batch; None once the batch's records
        are gone."""
        meta = self.r.hmget(C.batch_key(f.batch_id), "status", "out_bytes", "err_bytes", "completed_at", "failed_at",
                            "expired_at", "cancelled_at")
        if meta[0] is None:
            return None
        f.bytes = int(meta[1 if f.part == OUTPUT else 2] or 0)
        ended = [int(t) for t in meta[3:] if t]
        f.expires_at = max(ended) + self.batches.result_ttl_s if ended else None
        return f

    def get(self, file_id: str, principal: Principal) -> StoredFile:
        f = self._load(file_id) if file_id.startswith("file-") else None
        if f is None or not (principal.admin or f.owner == principal.owner) or \
                (f.batch_id is not None and f.bytes == 0):
            raise FileNotFound(f"No such File object: {file_id}")
        if f.expires_at is not None and f.path is not None and f.expires_at <= time.time():
            self._remove(f)
            raise FileNotFound(f"No such File object: {file_id} (it expired)")
        return f

    def list(self, principal: Principal, *, after: str | None, limit: int, order: str = "desc",
             purpose: str | None = None) -> tuple[list[StoredFile], bool]:
        """Up to `limit` files after the cursor, and whether more follow."""
        index = C.FILES_INDEX if principal.admin else C.files_index_key(principal.owner)
        out: list[StoredFile] = []
        more = False
        for file_id in lex_page(self.r, index, after, order):
            f = self._load(file_id)
            if f is None:
                self.r.zrem(index, file_id)
                continue
            if f.path is not None and f.expires_at is not None and f.expires_at <= time.time():
                self._remove(f)  # expired, not yet swept
                continue
            if (f.batch_id is not None and f.bytes == 0) or (purpose and f.purpose != purpose):
                continue
            if len(out) == limit:
                more = True
                break
            out.append(f)
        return out, more

    def content(self, f: StoredFile) -> Iterator[bytes]:
        """The file's bytes, streamed: an upload from disk, a batch's results from Redis part by part."""
        if f.path is not None:
            with open(f.path, "rb") as fh:
                while block := fh.read(1 << 20):
                    yield block
            return
        for out, err in self.batches.iter_parts(f.batch_id):  # type: ignore[arg-type]
            text = out if f.part == OUTPUT else err
            if text:
                yield text.encode("utf-8")


def lex_page(r, index: str, after: str | None, order: str = "desc", page: int = 100) -> Iterator[str]:
    """Members of a sorted set whose scores are all 0, in id order (`desc`: newest first for
    time-ordered ids), strictly after `after`, fetched `page` at a time. The cursor is the member
    itself, so it stays valid when that member is removed."""
    desc = order == "desc"
    bound = f"({after}" if after else ("+" if desc else "-")
    while True:
        if desc:
            ids = r.zrevrangebylex(index, bound, "-", start=0, num=page)
        else:
            ids = r.zrangebylex(index, bound, "+", start=0, num=page)
        yield from ids
        if len(ids) < page:
            return
        bound = f"({ids[-1]}"
