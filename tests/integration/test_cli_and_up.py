"""The `gristmill` command and `gristmill up`, as a user runs them."""

from __future__ import annotations

import base64
import json
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis

from gristmill.producers.redis_server import free_port, ping
from tests.commands import GRISTMILL

from .conftest import ROOT, clean, worker_env
from .helpers import ARTIFACTS, browse, chat, moderation, write_jsonl


def run(env, *args, check=True) -> subprocess.CompletedProcess:
    return subprocess.run([*GRISTMILL, *args], env=env, capture_output=True, text=True, cwd=ROOT, check=check,
                          timeout=120)


def test_cli_submit_status_results_cancel_models(redis_url, tiny_worker, home, tiny_models_file, tmp_path):
    clean(redis_url)
    env = worker_env(redis_url, home, tiny_models_file)
    f = write_jsonl(tmp_path / "in.jsonl", [chat("c1"), moderation("m1"), "not json"])
    p = run(env, "submit", str(f), "--wait", "--metadata", "team=search", "-m", "run=7=b")
    batch_id = p.stdout.strip().splitlines()[-1]
    assert batch_id.startswith("batch_"), p.stdout
    assert "completed" in p.stderr

    assert "lines/s" in p.stderr and "eta" in p.stderr and "3/3" in p.stderr, p.stderr  # the progress bar
    assert "no running worker" not in p.stderr
    watched = run(env, "status", batch_id, "--watch")
    assert "3/3" in watched.stderr and "completed" in watched.stdout

    st = json.loads(run(env, "status", batch_id, "--json").stdout)
    assert st["status"] == "completed"
    assert st["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    assert st["metadata"] == {"team": "search", "run": "7=b"}
    assert "metadata: team=search, run=7=b" in run(env, "status", batch_id).stdout
    for bad_meta in ("novalue", "=v", "k=" + "v" * 513):
        r = run(env, "submit", str(f), "--metadata", bad_meta, check=False)
        assert r.returncode == 2 and "metadata" in r.stderr.lower(), (bad_meta, r.stderr)

    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    r = run(env, "results", batch_id, "-o", str(out), "--errors", str(err))
    assert "2 output lines" in r.stdout
    assert {json.loads(x)["custom_id"] for x in out.read_text().splitlines()} == {"c1", "m1"}
    assert json.loads(err.read_text())["error"]["line"] == 3

    assert "completed" in run(env, "cancel", batch_id).stdout  # a finished batch stays finished
    models = run(env, "models").stdout
    assert "tiny-chat" in models and "tiny-moderation" in models
    # what the running worker serves, and why (no optimized artifact in its home: the torch engine);
    # clean() above wiped the worker's registration: its next heartbeat (LEASE_TTL_S / 3) restores it
    deadline = time.monotonic() + 30
    while True:
        served = json.loads(run(env, "models", "--json").stdout)["workers"]
        if any("no optimized artifact meets the floors" in how for w in served.values() for how in w.values()):
            break
        assert time.monotonic() < deadline, served
        time.sleep(1)

    bad = run(env, "status", "batch_missing", check=False)
    assert bad.returncode == 2 and "not found" in bad.stderr

    # a Redis database no worker consumes: the batch would wait silently; submit and status say so
    lonely = redis_url.rsplit("/", 1)[0] + "/13"
    clean(lonely)
    env13 = {**env, "GRISTMILL_REDIS_URL": lonely}
    p = run(env13, "submit", str(f))
    assert "warning: no running worker consumes gristmill.classify, gristmill.generate" in p.stderr, p.stderr
    assert "no running worker consumes" in run(env13, "status", p.stdout.strip().splitlines()[-1]).stderr
    clean(lonely)

    dup = write_jsonl(tmp_path / "dup.jsonl", [chat("x"), chat("x")])
    r = run(env, "submit", str(dup), check=False)
    assert r.returncode == 2 and "'x' on lines 1, 2" in r.stderr


def wait_for_flower(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=2) as r:
                assert r.read() == b"OK"
                return
        except OSError:
            assert time.monotonic() < deadline, "flower did not answer"
            time.sleep(0.5)


def flower_get(port: int, path: str, creds: str | None, raw: bool = False):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if creds:
        req.add_header("Authorization", "Basic " + base64.b64encode(creds.encode()).decode())
    with urllib.request.urlopen(req, timeout=10) as r:
        body = r.read()
    return body.decode() if raw else json.loads(body)


def test_flower_needs_credentials_and_lists_the_worker_and_its_tasks(redis_url, tiny_worker, home, tiny_models_file,
                                                                     tmp_path):
    clean(redis_url)
    env = worker_env(redis_url, home, tiny_models_file)
    port = free_port()
    log = open(tmp_path / "flower.log", "wb")
    proc = subprocess.Popen([*GRISTMILL, "flower", "--port", str(port), "--basic-auth", "ops:pw-123"], env=env,
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_for_flower(port)
        for creds in (None, "ops:wrong"):
            try:
                flower_get(port, "/api/workers", creds)
                raise AssertionError(f"Flower answered without valid credentials ({creds})")
            except urllib.error.HTTPError as e:
                assert e.code == 401
        # a batch running while we look: its chunk tasks appear under gristmill's task names
        f = write_jsonl(tmp_path / "in.jsonl", [chat(f"c{i}", max_tokens=24) for i in range(400)])
        p = subprocess.Popen([*GRISTMILL, "submit", str(f), "--wait"], env={**env, "GRISTMILL_CHUNK_SIZE": "4"},
                             stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT)
        deadline = time.monotonic() + 60
        tasks: dict = {}
        while not tasks and time.monotonic() < deadline:
            tasks = flower_get(port, "/api/tasks", "ops:pw-123")
            time.sleep(0.3)
        assert {t["name"] for t in tasks.values()} <= {"gristmill.generate", "gristmill.classify"} and tasks
        workers = flower_get(port, "/api/workers?refresh=1", "ops:pw-123")
        assert any(name.startswith("gristmill-cpu-") for name in workers), workers
        page = flower_get(port, "/workers", "ops:pw-123", raw=True)
        assert "gristmill-cpu-" in page  # the dashboard table is rendered on the server
        # the page as a person sees it, in headless Chromium, while the batch runs
        dom = browse(f"http://ops:pw-123@127.0.0.1:{port}/workers", ARTIFACTS / "flower-workers.png")
        assert "gristmill-cpu-" in dom and "Online" in dom, dom[-2000:]
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and "completed" in err
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def test_flower_without_credentials_makes_a_password_and_prints_it(redis_url, home, tiny_models_file, tmp_path):
    env = worker_env(redis_url, home, tiny_models_file)
    port = free_port()
    proc = subprocess.Popen([*GRISTMILL, "flower", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = proc.stderr.readline()  # type: ignore[union-attr]
        m = re.search(r"user (\S+), password (\S+)", line)
        assert m, line
        wait_for_flower(port)
        assert isinstance(flower_get(port, "/api/workers", f"{m.group(1)}:{m.group(2)}"), dict)
    finally:
        proc.terminate()
        proc.wait(30)


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def test_up_starts_redis_worker_and_flower_and_ctrl_c_stops_them(home, tiny_models_file, tmp_path):
    up_home = tmp_path / "uphome"
    env = worker_env("", up_home, tiny_models_file)
    env.pop("GRISTMILL_REDIS_URL")
    port, api_port = free_port(), free_port()
    env.update(GRISTMILL_FLOWER_PORT=str(port), GRISTMILL_SERVE_PORT=str(api_port))
    log = open(tmp_path / "up.log", "wb")
    proc = subprocess.Popen([*GRISTMILL, "up", "--gpus", "none"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        url_file = up_home / "redis" / "url"
        deadline = time.monotonic() + 120
        while not url_file.exists():
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "up.log").read_text()
            time.sleep(0.2)
        url = url_file.read_text().strip()
        assert ping(url)
        kids = _children(proc.pid)
        redis_pid = [k for k in kids if "redis-server" in Path(f"/proc/{k}/cmdline").read_bytes().decode()]
        assert redis_pid, "redis-server must be started by `up`"

        # the embedded server is found by other commands through the state directory
        env2 = {**env}
        f = write_jsonl(tmp_path / "in.jsonl", [moderation("m1"), chat("c1")])
        p = run(env2, "submit", str(f), "--wait")
        assert "completed" in p.stderr

        # the HTTP API runs too; with no keys configured, on loopback, its key is in the state directory
        key = (up_home / "api-key").read_text().strip()
        req = urllib.request.Request(f"http://127.0.0.1:{api_port}/v1/batches", headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert json.loads(r.read())["object"] == "list"
        assert key not in (tmp_path / "up.log").read_text()

        creds = re.search(r"basic auth (\S+:\S+)\)", (tmp_path / "up.log").read_text()).group(1)
        wait_for_flower(port)
        workers = flower_get(port, "/api/workers?refresh=1", creds)
        assert any(name.startswith("gristmill-cpu") for name in workers), workers
        with open(up_home / "redis" / "appendonly.aof", "rb") as aof:
            assert aof.read(1), "AOF persistence must be on"
        # the score cache lives on a second server: capped, evicting, not persisted
        cache_url_file = up_home / "redis-cache" / "url"
        cache_url = cache_url_file.read_text().strip()
        main, cache = redis.Redis.from_url(url), redis.Redis.from_url(cache_url)
        assert cache.keys("gristmill:dedup:*") and not main.keys("gristmill:dedup:*")
        assert cache.config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"
        assert int(cache.config_get("maxmemory")["maxmemory"]) == 1 << 30
        # a worker started by hand on this `up`'s Redis finds the same cache server
        from gristmill.producers.redis_server import resolve_dedup_redis_url
        from gristmill.producers.settings import Settings
        assert resolve_dedup_redis_url(Settings(home=up_home)) == cache_url
        assert resolve_dedup_redis_url(Settings(home=up_home, redis_url=url)) is None
        assert cache.config_get("appendonly")["appendonly"] == "no"

        kids = _children(proc.pid)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(90) == 0
        _assert_gone(kids)
        assert not ping(url) and not ping(cache_url)
        assert not url_file.exists() and not cache_url_file.exists()
    finally:
        _stop_up(proc)
        log.close()


def _assert_gone(pids: list[int]) -> None:
    for k in pids:
        assert not Path(f"/proc/{k}").exists() or "zombie" in Path(f"/proc/{k}/status").read_text(), \
            f"process {k} outlived `gristmill up`"


def _stop_up(proc: subprocess.Popen) -> None:
    """After a failed assertion: SIGTERM first, so `up` stops its children."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("sig,preexec", [(signal.SIGTERM, None), (signal.SIGINT, _ignore_sigint)],
                         ids=["sigterm", "sigint-started-ignored"])
def test_up_stops_its_children_on_sigterm_and_sigint(home, tiny_models_file, tmp_path, sig, preexec):
    """`kill`, `docker stop` and supervisors send SIGTERM: `up` must not leave its worker and
    redis-server behind (Python's default SIGTERM ends a process with no cleanup). A background
    job of a shell without job control starts with SIGINT ignored; `kill -INT` must still stop it."""
    up_home = tmp_path / "uphome"
    env = worker_env("", up_home, tiny_models_file, GRISTMILL_SERVE_PORT=str(free_port()))
    env.pop("GRISTMILL_REDIS_URL")
    log = open(tmp_path / "up.log", "wb")
    proc = subprocess.Popen([*GRISTMILL, "up", "--gpus", "none", "--no-flower"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT, preexec_fn=preexec)
    try:
        url_file = up_home / "redis" / "url"
        deadline = time.monotonic() + 120
        kids: list[int] = []
        while not (url_file.exists() and len(kids) >= 4):  # two redis-servers (queues, score cache), worker, API
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "up.log").read_text()
            time.sleep(0.2)
            kids = _children(proc.pid)
        url = url_file.read_text().strip()
        assert ping(url)
        proc.send_signal(sig)
        assert proc.wait(90) == 0, (tmp_path / "up.log").read_text()
        _assert_gone(kids)
        assert not ping(url)
    finally:
        _stop_up(proc)
        log.close()
