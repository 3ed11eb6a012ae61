"""`gristmill serve`: OpenAI's Files and Batches API over HTTP, so scripts written for OpenAI's
Batch API run against gristmill with another `base_url` and `api_key`, and nothing else changed.

FastAPI on uvicorn: a well-kept ASGI stack whose request models are pydantic's, like the rest of
gristmill's contract, with streaming request bodies (an upload is parsed as it arrives by
python-multipart and written straight to the file store) and streaming responses (a batch's
output file is read from Redis part by part). The server is stateless beyond Redis and the files
directory, so replicas can run side by side.

Every request needs `Authorization: Bearer KEY` (the batches page also takes the key as HTTP Basic
auth's password, so a browser can ask for it). What a key creates belongs to it; another key gets
404. Errors are OpenAI's `{"error": {"message", "type", "param", "code"}}` with the status codes
the `openai` SDK maps to its exceptions.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import anyio
import orjson
import redis
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import constants as C
from .apikeys import ApiKeys, Principal
from .batches import Batch, BatchStore, new_batch_id
from .client import Client, check_metadata
from .errors import BatchNotFound, GristmillError, SubmissionRejected
from .files import PURPOSE_BATCH, FileNotFound, FileStore, UploadTooLarge, lex_page
from .ingest import LeaseHeld
from .redis_server import connect, is_oom
from .settings import Settings, parse_window

log = logging.getLogger("gristmill.serve")

ENDPOINTS = (C.CHAT_URL, C.COMPLETIONS_URL, C.MODERATIONS_URL, C.CLASSIFICATIONS_URL)
_FIELD_LIMIT = 64 << 10  # bytes of a multipart form field other than the file
_WRITE_EVERY = 1 << 20  # upload bytes gathered before one write to the store
_IDEMPOTENCY_TTL_S = 24 * 3600


class ApiError(Exception):
    """Raised by a route for an answer in OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


def _error(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _list_page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


class FrontDoor:
    """What the routes share: settings, Redis, the stores, the keys, and the threads that ingest
    batches and sweep expired files and orphaned ingests."""

    def __init__(self, settings: Settings, redis_url: str, keys: ApiKeys):
        self.settings = settings
        self.redis_url = redis_url
        self.keys = keys
        self.redis = connect(redis_url, master=settings.redis_master_name, decode_responses=True)
        self.batches = BatchStore(self.redis, settings.result_ttl_s)
        self.files = FileStore(self.redis, settings.files_path, self.batches, ttl_s=settings.file_ttl_s,
                               max_bytes=settings.max_upload_bytes)
        self.ingests = ThreadPoolExecutor(max_workers=settings.serve_ingest_threads,
                                          thread_name_prefix="gristmill-ingest")
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    # -- background work
    def start(self) -> None:
        self._sweeper = threading.Thread(target=self._sweep, name="gristmill-serve-sweep", daemon=True)
        self._sweeper.start()

    def stop(self) -> None:
        self._stop.set()
        self.ingests.shutdown(wait=False, cancel_futures=True)
        if self._sweeper is not None:
            self._sweeper.join(timeout=5)

    def _sweep(self) -> None:
        """Expired uploads go; ingests whose process died are taken over (their lease lapsed)."""
        while not self._stop.wait(self.settings.lease_ttl_s / 3):
            try:
                self.files.sweep_expired()
                client = Client(self.settings, redis_url=self.redis_url)
                try:
                    for batch_id in client.resume_ingests():
                        log.warning("took over the ingest of %s, whose process had stopped", batch_id)
                finally:
                    client.close()
            except Exception:  # noqa: BLE001 - Redis away: the next round tries again
                log.exception("sweep failed")

    def ingest(self, batch_id: str) -> None:
        self.ingests.submit(self._ingest, batch_id)

    def _ingest(self, batch_id: str) -> None:
        client = Client(self.settings, redis_url=self.redis_url)
        try:
            client.ingest(batch_id)
        except (SubmissionRejected, LeaseHeld):
            pass  # recorded on the batch as its errors; or another server runs this ingest
        except Exception as exc:  # noqa: BLE001 - the batch says why instead of waiting forever
            log.exception("ingest of %s failed", batch_id)
            try:
                self.batches.fail(batch_id, [{"code": "ingest_failed", "message": f"{type(exc).__name__}: {exc}"}])
                self.redis.srem(C.INGESTS_KEY, batch_id)
            except redis.RedisError:
                pass  # the lease lapses and a sweep takes the ingest over
        finally:
            client.close()

    # -- authentication
    def principal(self, request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        key = None
        if scheme.lower() == "bearer":
            key = value.strip()
        elif scheme.lower() == "basic":  # the batches page in a browser: the key is the password
            try:
                key = base64.b64decode(value.strip()).decode("utf-8").partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                key = None
        who = self.keys.authenticate(key)
        if who is None:
            challenge = 'Basic realm="gristmill"' if request.url.path == "/" else "Bearer"
            raise ApiError(401, "Incorrect API key provided. Pass it as `Authorization: Bearer KEY`."
                           if key else "Missing API key. Pass it as `Authorization: Bearer KEY`.",
                           code="invalid_api_key", headers={"WWW-Authenticate": challenge})
        return who

    # -- batches
    def batch(self, batch_id: str, who: Principal) -> Batch:
        try:
            b = self.batches.get(batch_id) if batch_id.startswith("batch_") else None
        except BatchNotFound:
            b = None
        if b is None or not (who.admin or b.owner == who.owner):
            raise ApiError(404, f"No such Batch object: {batch_id}", param="batch_id")
        return b

    def list_batches(self, who: Principal, after: str | None, limit: int) -> tuple[list[Batch], bool]:
        index = C.BATCHES_BY_ID if who.admin else C.batches_index_key(who.owner)
        out: list[Batch] = []
        for batch_id in lex_page(self.redis, index, after, "desc"):
            try:
                b = self.batches.get(batch_id)
            except BatchNotFound:
                self.redis.zrem(index, batch_id)
                continue
            if len(out) == limit:
                return out, True
            out.append(b)
        return out, False


def _idempotency_digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()[:32]


async def _receive_upload(request: Request, door: FrontDoor, who: Principal) -> dict[str, Any]:
    """Parse a multipart upload as it arrives: the `file` part streams to the file store (RSS stays
    flat however large it is), the other fields (`purpose`, `expires_after[...]`) are kept."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise ApiError(400, "send the file as multipart/form-data with fields `file` and `purpose`", param="file")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > door.files.max_bytes + _FIELD_LIMIT:
        await _drain(request)
        raise ApiError(413, f"the upload is {int(length):,} bytes; this server takes at most "
                            f"{door.files.max_bytes:,} (GRISTMILL_MAX_UPLOAD_BYTES)", param="file")
    fields: dict[str, bytearray] = {}
    state: dict[str, Any] = {"name": None, "filename": None, "header": b"", "headers": {}}
    upload = None
    pending = bytearray()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["header"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["headers"][state["header"].lower()] = state["headers"].get(state["header"].lower(), b"") + data[start:end]

    def on_header_end() -> None:
        state["header"] = b""

    def on_headers_finished() -> None:
        nonlocal upload
        _, disp = parse_options_header(state["headers"].get(b"content-disposition", b""))
        state["name"] = disp.get(b"name", b"").decode("utf-8", "replace")
        if state["name"] == "file":
            if upload is not None:
                raise ApiError(400, "send one file per upload", param="file")
            filename = disp.get(b"filename", b"upload.jsonl").decode("utf-8", "replace")
            upload = door.files.begin_upload(who, filename.rsplit("/", 1)[-1], PURPOSE_BATCH)
        else:
            fields[state["name"]] = bytearray()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["name"] == "file":
            pending.extend(data[start:end])
        else:
            field = fields[state["name"]]
            field.extend(data[start:end])
            if len(field) > _FIELD_LIMIT:
                raise ApiError(400, f"form field {state['name']!r} is too long", param=state["name"])

    def on_part_begin() -> None:
        state["headers"], state["name"] = {}, None

    parser = MultipartParser(params[b"boundary"], {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data})
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            if upload is not None and len(pending) >= _WRITE_EVERY:
                data = bytes(pending)
                pending.clear()
                await anyio.to_thread.run_sync(upload.write, data)
        parser.finalize()
        if upload is None:
            raise ApiError(400, "the upload has no `file` field", param="file")
        if pending:
            await anyio.to_thread.run_sync(upload.write, bytes(pending))
        purpose = fields.get("purpose", b"").decode("utf-8", "replace")
        if purpose != PURPOSE_BATCH:
            raise ApiError(400, f"purpose: {purpose!r} is not supported here; upload batch input with purpose=batch",
                           param="purpose")
        upload.file.purpose = purpose
        expires = _expires_after(fields)
        if expires is not None:
            upload.file.expires_at = upload.file.created_at + expires
        stored = await anyio.to_thread.run_sync(upload.commit)
    except UploadTooLarge as e:
        upload.abort()  # type: ignore[union-attr]
        await _drain(request)
        raise ApiError(413, str(e), param="file") from None
    except BaseException:
        if upload is not None:
            upload.abort()
        raise
    return stored.to_openai()


async def _drain(request: Request) -> None:
    """Read and drop the rest of a refused request's body: an HTTP/1.1 client still sending it
    would otherwise see a reset connection instead of the 413."""
    try:
        async for _ in request.stream():
            pass
    except Exception:  # noqa: BLE001 - the body was already read, or the client went away
        pass


def _expires_after(fields: dict[str, bytearray]) -> int | None:
    anchor = fields.get("expires_after[anchor]")
    seconds = fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    if bytes(anchor or b"") != b"created_at" or not bytes(seconds or b"").isdigit() \
            or not 3600 <= int(seconds) <= 30 * 86400:  # type: ignore[arg-type]
        raise ApiError(400, "expires_after: anchor must be 'created_at' and seconds between 3600 and 2592000",
                       param="expires_after")
    return int(seconds)  # type: ignore[arg-type]


def create_app(settings: Settings | None = None, redis_url: str | None = None, keys: ApiKeys | None = None) -> FastAPI:
    from .redis_server import resolve_redis_url
    settings = settings or Settings()
    door = FrontDoor(settings, redis_url or resolve_redis_url(settings), keys or settings.load_api_keys())

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        door.start()
        yield
        door.stop()

    app = FastAPI(title="gristmill", description="OpenAI's Files and Batches API, served by gristmill.",
                  version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.door = door

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        headers = dict(exc.headers)
        if exc.status == 409:
            headers.setdefault("x-should-retry", "false")
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code, headers)

    @app.exception_handler(redis.RedisError)
    async def _redis_unavailable(_request: Request, exc: redis.RedisError):
        # Redis at its maxmemory, or away (a failover under way): the request did not happen; the
        # openai SDK retries a 503 by itself, after Retry-After.
        why = ("Redis is at its maxmemory and refuses writes" if is_oom(exc)
               else f"Redis is unavailable ({type(exc).__name__})")
        log.warning("answering 503: %s: %s", why, exc)
        return _error(503, f"{why}; retry later", type="server_error", code="service_unavailable",
                      headers={"retry-after": "5"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path")]
        param = ".".join(loc) or None
        return _error(400, f"{param or 'request'}: {first.get('msg', 'invalid')}", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), code=None)

    def who(request: Request) -> Principal:
        return door.principal(request)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, bool]:
        return {"ok": bool(door.redis.ping())}

    # ---- files
    @app.post("/v1/files")
    async def create_file(request: Request, principal: Principal = Depends(who)):
        return await _receive_upload(request, door, principal)

    @app.get("/v1/files")
    def list_files(principal: Principal = Depends(who), after: str | None = None,
                   limit: int = Query(10000, ge=1, le=10000), order: str = Query("desc", pattern="^(asc|desc)$"),
                   purpose: str | None = None):
        files, more = door.files.list(principal, after=after, limit=limit, order=order, purpose=purpose)
        return _list_page([f.to_openai() for f in files], more)

    @app.get("/v1/files/{file_id}")
    def retrieve_file(file_id: str, principal: Principal = Depends(who)):
        return _file(file_id, principal).to_openai()

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str, principal: Principal = Depends(who)):
        f = _file(file_id, principal)
        door.files.delete(f.id, principal)
        return {"id": f.id, "object": "file", "deleted": True}

    @app.get("/v1/files/{file_id}/content")
    def file_content(file_id: str, principal: Principal = Depends(who)):
        f = _file(file_id, principal)
        return StreamingResponse(door.files.content(f), media_type="application/jsonl",
                                 headers={"content-disposition": f'attachment; filename="{f.filename}"'})

    def _file(file_id: str, principal: Principal):
        try:
            return door.files.get(file_id, principal)
        except FileNotFound as e:
            raise ApiError(404, str(e), param="file_id") from None

    # ---- batches
    @app.post("/v1/batches")
    async def create_batch(request: Request, principal: Principal = Depends(who)):
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            raise ApiError(400, "the request body must be a JSON object") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        idem = request.headers.get("idempotency-key")
        if not idem:
            return await anyio.to_thread.run_sync(_create_batch, body, principal)
        slot = C.idempotency_key(principal.owner, _idempotency_digest(idem))
        deadline = time.monotonic() + 30
        while not door.redis.set(slot, "pending", nx=True, ex=_IDEMPOTENCY_TTL_S):
            held = door.redis.get(slot)
            if held and held != "pending":
                return door.batch(held, principal).to_openai()  # the first request's batch
            if time.monotonic() > deadline:
                raise ApiError(409, "a request with this Idempotency-Key is still being processed",
                               code="idempotency_key_in_use", headers={"x-should-retry": "true"})
            await anyio.sleep(0.1)
        try:
            made = await anyio.to_thread.run_sync(_create_batch, body, principal)
        except BaseException:
            door.redis.delete(slot)
            raise
        door.redis.set(slot, made["id"], ex=_IDEMPOTENCY_TTL_S)
        return made

    def _create_batch(body: dict[str, Any], principal: Principal) -> dict[str, Any]:
        endpoint = body.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise ApiError(400, f"endpoint: {endpoint!r} is not supported; use one of {', '.join(ENDPOINTS)}",
                           param="endpoint")
        window = body.get("completion_window", "24h")
        try:
            if not isinstance(window, str):
                raise GristmillError("a string such as '24h' is required")
            parse_window(window)
        except GristmillError as e:
            raise ApiError(400, f"completion_window: {e}", param="completion_window") from None
        metadata = body.get("metadata")
        try:
            check_metadata(metadata)
        except SubmissionRejected as e:
            raise ApiError(400, str(e), param="metadata") from None
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str):
            raise ApiError(400, "input_file_id: the id of a file uploaded with purpose=batch is required",
                           param="input_file_id")
        f = _file(file_id, principal)
        if f.purpose != PURPOSE_BATCH or f.path is None:
            raise ApiError(400, f"input_file_id: {file_id} has purpose {f.purpose!r}; upload the input with "
                                f"purpose=batch", param="input_file_id")
        unknown = set(body) - {"input_file_id", "endpoint", "completion_window", "metadata"}
        if unknown:
            raise ApiError(400, f"{sorted(unknown)[0]}: not a parameter of batches.create", param=sorted(unknown)[0])
        batch_id = new_batch_id()
        out_id, err_id = door.files.register_outputs(batch_id, principal.owner)
        client = Client(door.settings, redis_url=door.redis_url)
        try:
            batch = client.create_batch(f.path, completion_window=window, metadata=metadata, endpoint=endpoint,
                                        owner=principal.owner, batch_id=batch_id,
                                        files={"input_file_id": f.id, "output_file_id": out_id, "error_file_id": err_id})
        except SubmissionRejected as e:
            raise ApiError(400, str(e), param="input_file_id") from None
        finally:
            client.close()
        door.ingest(batch.id)
        return batch.to_openai()

    @app.get("/v1/batches")
    def list_batches(principal: Principal = Depends(who), after: str | None = None,
                     limit: int = Query(20, ge=1, le=100)):
        batches, more = door.list_batches(principal, after, limit)
        return _list_page([b.to_openai() for b in batches], more)

    @app.get("/v1/batches/{batch_id}")
    def retrieve_batch(batch_id: str, principal: Principal = Depends(who)):
        return door.batch(batch_id, principal).to_openai()

    @app.post("/v1/batches/{batch_id}/cancel")
    def cancel_batch(batch_id: str, principal: Principal = Depends(who)):
        b = door.batch(batch_id, principal)
        status = b.status if b.done else door.batches.cancel(b.id)
        if b.done or status not in (C.CANCELLING, C.CANCELLED):
            raise ApiError(409, f"Cannot cancel a batch with status '{status}'.", param="batch_id",
                           code="batch_not_cancellable")
        return door.batches.get(b.id).to_openai()

    # ---- the batches page
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(principal: Principal = Depends(who)):
        from .pages import batches_page
        batches, _ = door.list_batches(principal, None, 100)
        return HTMLResponse(batches_page(batches, principal))

    @app.get("/v1/{rest:path}", include_in_schema=False)
    def unknown(rest: str, _principal: Principal = Depends(who)) -> Response:
        raise ApiError(404, f"Unknown request URL: GET /v1/{rest}. gristmill serves /v1/files and /v1/batches.",
                       code="unknown_url")

    return app
