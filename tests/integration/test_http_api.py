"""`gristmill serve` driven by the official `openai` SDK, unchanged but for base_url and api_key: a
real server process, the session's real Redis and real worker, whole batch lifecycles."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import psutil
import pytest
import redis
from openai.types import Batch, FileObject, ModerationCreateResponse
from openai.types.chat import ChatCompletion

from gristmill.producers import constants as C
from gristmill.producers.redis_server import free_port
from tests.commands import GRISTMILL

from .conftest import ROOT, clean, worker_env
from .helpers import ARTIFACTS, browse, chat, classification, moderation, write_jsonl

ALICE = "gm-test-alice-0123456789abcdef"
BOB = "gm-test-bob-0123456789abcdefghij"
ADMIN = "gm-test-admin-0123456789abcdefg"
MAX_UPLOAD = 96 << 20


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path, files: Path):
        self.proc, self.port, self.log, self.files = proc, port, log, files
        self.url = f"http://127.0.0.1:{port}"

    def client(self, key: str = ALICE) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, _strict_response_validation=True)

    def raw(self, method: str, path: str, key: str | None = ALICE, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        if key is not None:
            req.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()


def start_server(env: dict[str, str], log: Path, *args: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([*GRISTMILL, "serve", "--port", str(port), *args], env=env, cwd=ROOT,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                return proc, port
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)


@pytest.fixture(scope="module")
def server(redis_url, home, tiny_models_file, tmp_path_factory, tiny_worker):
    d = tmp_path_factory.mktemp("serve")
    # moderation batches made over HTTP run under the server's policy
    (d / "policy.yaml").write_text("policy_version: page-policy-1\nmodel: tiny-moderation\n")
    env = worker_env(redis_url, home, tiny_models_file, GRISTMILL_API_KEYS=f"{ALICE},{BOB}",
                     GRISTMILL_ADMIN_API_KEYS=ADMIN, GRISTMILL_FILES_DIR=str(d / "files"),
                     GRISTMILL_MAX_UPLOAD_BYTES=str(MAX_UPLOAD), GRISTMILL_LEASE_TTL_S="3", GRISTMILL_CHUNK_SIZE="4",
                     GRISTMILL_MODERATION_POLICY=str(d / "policy.yaml"))
    proc, port = start_server(env, d / "serve.log")
    yield Server(proc, port, d / "serve.log", d / "files")
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    log = (d / "serve.log").read_text()
    for key in (ALICE, BOB, ADMIN):
        assert key not in log, "an API key reached the server's log"


@pytest.fixture
def api(server, redis_url):
    clean(redis_url)
    return server


def upload(client: openai.OpenAI, path: Path) -> FileObject:
    with open(path, "rb") as f:
        return client.files.create(file=f, purpose="batch")


def wait(client: openai.OpenAI, batch_id: str, timeout: float = 120) -> Batch:
    deadline = time.monotonic() + timeout
    while True:
        b = client.batches.retrieve(batch_id)
        if b.status in ("completed", "failed", "expired", "cancelled"):
            return b
        assert time.monotonic() < deadline, b
        time.sleep(0.2)


def lines(client: openai.OpenAI, file_id: str) -> list[dict]:
    return [json.loads(x) for x in client.files.content(file_id).text.split("\n") if x]


def test_a_chat_batch_end_to_end_with_the_openai_sdk(api, tmp_path):
    c = api.client()
    rows = [chat(f"c{i}") for i in range(6)] + ["not json", moderation("wrong-url"), chat("c6")]
    f = upload(c, write_jsonl(tmp_path / "chat.jsonl", rows))
    assert f.purpose == "batch" and f.bytes == (tmp_path / "chat.jsonl").stat().st_size
    assert f.filename == "chat.jsonl" and f.expires_at is not None and f.expires_at > f.created_at
    assert c.files.retrieve(f.id) == f
    assert c.files.content(f.id).content == (tmp_path / "chat.jsonl").read_bytes()

    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                         metadata={"team": "search"})
    assert b.status in ("validating", "in_progress") and b.input_file_id == f.id and b.metadata == {"team": "search"}
    b = wait(c, b.id)
    assert b.status == "completed", b
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (9, 7, 2)
    assert b.in_progress_at and b.finalizing_at and b.completed_at and b.endpoint == "/v1/chat/completions"

    outs = lines(c, b.output_file_id)
    assert sorted(o["custom_id"] for o in outs) == [f"c{i}" for i in range(7)]
    for o in outs:
        ChatCompletion.model_validate(o["response"]["body"])
    errs = {e["error"]["line"]: e for e in lines(c, b.error_file_id)}
    assert errs[7]["error"]["code"] == "invalid_json" and errs[7]["custom_id"] is None
    assert errs[8]["error"]["code"] == "invalid_url" and errs[8]["custom_id"] == "wrong-url"
    assert "differs from the batch's endpoint" in errs[8]["error"]["message"]

    out_file = c.files.retrieve(b.output_file_id)
    assert out_file.purpose == "batch_output" and out_file.bytes == len(c.files.content(b.output_file_id).content)
    assert out_file.expires_at is not None and out_file.expires_at > b.completed_at
    assert {x.id for x in c.files.list()} >= {f.id, b.output_file_id, b.error_file_id}
    assert [x.id for x in c.files.list(purpose="batch")] == [f.id]


def test_a_moderation_batch_parses_as_openai_moderations(api, tmp_path):
    c = api.client()
    rows = [moderation("m1"), moderation("m2", ["have a nice day", "i will hurt you"])]
    f = upload(c, write_jsonl(tmp_path / "mod.jsonl", rows))
    b = wait(c, c.batches.create(input_file_id=f.id, endpoint="/v1/moderations", completion_window="24h").id)
    assert b.status == "completed" and b.error_file_id is None and b.request_counts.completed == 2
    for o in lines(c, b.output_file_id):
        ModerationCreateResponse.model_validate(o["response"]["body"])


def test_lists_walk_to_the_end_one_item_at_a_time(api, tmp_path):
    c = api.client()
    made = []
    for i in range(3):
        f = upload(c, write_jsonl(tmp_path / f"in{i}.jsonl", [classification(f"x{i}")]))
        made.append(c.batches.create(input_file_id=f.id, endpoint="/v1/classifications",
                                     completion_window="24h").id)
    walked = [b.id for b in c.batches.list(limit=1)]  # the SDK follows `after` while has_more
    assert walked == made[::-1]  # newest first, each once, and the walk ends
    page = c.batches.list(limit=2)
    assert page.has_more and [b.id for b in page.data] == made[:0:-1]
    last = c.batches.list(limit=2, after=page.data[-1].id)
    assert not last.has_more and [b.id for b in last.data] == [made[0]]
    files = [x.id for x in c.files.list(limit=1, purpose="batch")]
    assert len(files) == 3 and files == sorted(files, reverse=True)
    assert [x.id for x in c.files.list(limit=1, order="asc", purpose="batch")] == files[::-1]
    for b in made:
        wait(c, b)


def test_cancel_a_running_batch_and_a_finished_one(api, tmp_path):
    c = api.client()
    f = upload(c, write_jsonl(tmp_path / "long.jsonl", [chat(f"c{i}", max_tokens=24) for i in range(400)]))
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 60
    while c.batches.retrieve(b.id).request_counts.completed == 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    cancelled = c.batches.cancel(b.id)
    assert cancelled.status in ("cancelling", "cancelled") and cancelled.cancelling_at
    done = wait(c, b.id)
    assert done.status == "cancelled" and done.request_counts.completed < 400
    with pytest.raises(openai.ConflictError) as e:
        c.batches.cancel(b.id)
    assert e.value.response.headers["x-should-retry"] == "false"
    assert e.value.body["code"] == "batch_not_cancellable"


def test_keys_and_ownership(api, tmp_path):
    alice, bob, admin = api.client(ALICE), api.client(BOB), api.client(ADMIN)
    f = upload(alice, write_jsonl(tmp_path / "a.jsonl", [classification("a1")]))
    b = alice.batches.create(input_file_id=f.id, endpoint="/v1/classifications", completion_window="24h")
    with pytest.raises(openai.AuthenticationError):
        api.client("gm-wrong-key-0123456789abcdef").batches.list()
    status, headers, body = api.raw("GET", "/v1/batches", key=None)
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    for call in (lambda: bob.batches.retrieve(b.id), lambda: bob.files.retrieve(f.id),
                 lambda: bob.files.content(f.id), lambda: bob.batches.cancel(b.id), lambda: bob.files.delete(f.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert [x.id for x in bob.batches.list()] == [] and [x.id for x in bob.files.list()] == []
    with pytest.raises(openai.NotFoundError):  # another key's file is no input either
        bob.batches.create(input_file_id=f.id, endpoint="/v1/classifications", completion_window="24h")
    assert b.id in [x.id for x in admin.batches.list()] and admin.batches.retrieve(b.id).id == b.id
    wait(alice, b.id)
    deleted = alice.files.delete(f.id)
    assert deleted.deleted and deleted.id == f.id
    with pytest.raises(openai.NotFoundError):
        alice.files.retrieve(f.id)


def test_bad_requests_name_their_parameter(api, tmp_path):
    c = api.client()
    f = upload(c, write_jsonl(tmp_path / "in.jsonl", [chat("c1")]))
    cases = [({"endpoint": "/v1/embeddings"}, "endpoint"), ({"completion_window": "soon"}, "completion_window"),
             ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"), ({"input_file_id": "file-nope"}, None)]
    for extra, param in cases:
        kw = {"input_file_id": f.id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **extra}
        error = openai.NotFoundError if param is None else openai.BadRequestError
        with pytest.raises(error) as e:
            c.batches.create(**kw)
        if param:
            assert e.value.body["param"] == param, e.value.body
    for limit in (0, 101):
        status, _, body = api.raw("GET", f"/v1/batches?limit={limit}")
        assert status == 400 and json.loads(body)["error"]["param"] == "limit"
    with pytest.raises(openai.BadRequestError):
        with open(tmp_path / "in.jsonl", "rb") as fh:
            c.files.create(file=fh, purpose="fine-tune")
    dup = upload(c, write_jsonl(tmp_path / "dup.jsonl", [chat("same"), chat("other"), chat("same")]))
    b = wait(c, c.batches.create(input_file_id=dup.id, endpoint="/v1/chat/completions", completion_window="24h").id)
    assert b.status == "failed" and "'same' on lines 1, 3" in b.errors.data[0].message
    assert b.errors.data[0].code == "duplicate_custom_id"


def test_an_upload_over_the_limit_is_refused_and_leaves_nothing(api, tmp_path):
    big = tmp_path / "big.jsonl"
    row = json.dumps(classification("x", "y" * 1000)) + "\n"
    with open(big, "w") as fh:
        fh.write(row * (MAX_UPLOAD // len(row) + 10))
    with pytest.raises(openai.APIStatusError) as e:
        upload(api.client(), big)
    assert e.value.status_code == 413 and "GRISTMILL_MAX_UPLOAD_BYTES" in e.value.message
    assert [x.id for x in api.client().files.list()] == []
    assert not [p for p in api.files.iterdir() if p.name.endswith(".part")], "a partial upload was left behind"


def test_an_upload_streams_to_disk_with_the_servers_memory_flat(api, tmp_path):
    big = tmp_path / "big.jsonl"
    row = json.dumps(classification("x", "z" * 2000)) + "\n"
    with open(big, "w") as fh:
        fh.write(row * (80 * (1 << 20) // len(row)))
    proc = psutil.Process(api.proc.pid)
    before = proc.memory_info().rss
    f = upload(api.client(), big)
    grown = proc.memory_info().rss - before
    assert f.bytes == big.stat().st_size
    assert grown < 24 << 20, f"the server grew by {grown >> 20} MB for an 80 MB upload"


def test_idempotency_key_returns_the_first_batch(api, tmp_path):
    c = api.client()
    f = upload(c, write_jsonl(tmp_path / "in.jsonl", [classification("i1")]))
    kw = {"input_file_id": f.id, "endpoint": "/v1/classifications", "completion_window": "24h"}
    first = c.batches.create(**kw, extra_headers={"Idempotency-Key": "retry-me"})
    again = c.batches.create(**kw, extra_headers={"Idempotency-Key": "retry-me"})
    other = c.batches.create(**kw, extra_headers={"Idempotency-Key": "another"})
    assert again.id == first.id and other.id != first.id
    assert len(c.batches.list().data) == 2
    # the same key from another API key is another request
    bob = api.client(BOB)
    g = upload(bob, write_jsonl(tmp_path / "b.jsonl", [classification("i2")]))
    assert bob.batches.create(input_file_id=g.id, endpoint="/v1/classifications", completion_window="24h",
                              extra_headers={"Idempotency-Key": "retry-me"}).id != first.id
    for b in (first.id, other.id):
        wait(c, b)


def test_the_batches_page_in_a_browser(api, tmp_path):
    c = api.client()
    f = upload(c, write_jsonl(tmp_path / "mod.jsonl", [moderation("m1"), "broken"]))
    b = wait(c, c.batches.create(input_file_id=f.id, endpoint="/v1/moderations", completion_window="24h").id)
    status, headers, _ = api.raw("GET", "/", key=None)
    assert status == 401 and headers.get("www-authenticate", "").startswith("Basic")
    dom = browse(f"http://user:{ALICE}@127.0.0.1:{api.port}/", ARTIFACTS / "batches-page.png")
    assert b.id in dom and "completed" in dom and "page-policy-1" in dom
    assert f"/v1/files/{b.output_file_id}/content" in dom and f"/v1/files/{b.error_file_id}/content" in dom
    assert "1 / 2" not in dom and "2 / 2" in dom


def test_refuses_a_public_address_without_keys(home, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRISTMILL_")}
    p = subprocess.run([*GRISTMILL, "serve", "--host", "0.0.0.0", "--port", str(free_port())],
                       env={**env, "GRISTMILL_HOME": str(tmp_path)}, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "without API keys" in p.stderr


def test_a_dead_ingest_is_taken_over_and_nothing_is_lost_or_doubled(api, redis_url, home, tiny_models_file, tmp_path):
    """`gristmill submit` is SIGKILLed midway through sending its chunks; the running server takes
    the ingest over (its lease lapsed) and the batch completes with every custom_id once."""
    n = 3000
    f = write_jsonl(tmp_path / "in.jsonl", [classification(f"r{i}", f"text {i}") for i in range(n)])
    env = worker_env(redis_url, home, tiny_models_file, GRISTMILL_CHUNK_SIZE="2", GRISTMILL_LEASE_TTL_S="3")
    proc = subprocess.Popen([*GRISTMILL, "submit", str(f)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    deadline = time.monotonic() + 60
    batch_id = None
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "the submit ended before it could be stopped"
        ids = list(r.smembers(C.INGESTS_KEY))
        if ids and r.hget(C.batch_key(ids[0]), "status") == "in_progress" and r.hlen(C.pending_key(ids[0])) > 50:
            batch_id = ids[0]
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not r.hget(C.batch_key(batch_id), "chunks_total"), "the submit finished sending before it was stopped"
    from gristmill.producers.client import Client
    from gristmill.producers.settings import Settings
    client = Client(Settings(redis_url=redis_url, home=home, models_file=tiny_models_file, builtin_models=False))
    b = client.wait(batch_id, timeout=180)
    assert b.status == "completed" and b.request_counts.total == n and b.request_counts.completed == n
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    client.download(batch_id, out, err)
    got = [json.loads(x)["custom_id"] for x in out.read_text().split("\n") if x]
    assert len(got) == n and set(got) == {f"r{i}" for i in range(n)}
    assert "took over the ingest of " + batch_id in api.log.read_text()
    client.close()
