"""The `gristmill` command and `gristmill up`, as a user runs them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from producers.redis_server import free_port, ping

from .conftest import ROOT, clean, worker_env
from .helpers import chat, moderation, write_jsonl

GRISTMILL = [sys.executable, "-m", "producers.cli"]


def run(env, *args, check=True) -> subprocess.CompletedProcess:
    return subprocess.run([*GRISTMILL, *args], env=env, capture_output=True, text=True, cwd=ROOT, check=check,
                          timeout=120)


def test_cli_submit_status_results_cancel_models(redis_url, tiny_worker, home, tiny_models_file, tmp_path):
    clean(redis_url)
    env = worker_env(redis_url, home, tiny_models_file)
    f = write_jsonl(tmp_path / "in.jsonl", [chat("c1"), moderation("m1"), "not json"])
    p = run(env, "submit", str(f), "--wait")
    batch_id = p.stdout.strip().splitlines()[-1]
    assert batch_id.startswith("batch_"), p.stdout
    assert "completed" in p.stderr

    st = json.loads(run(env, "status", batch_id, "--json").stdout)
    assert st["status"] == "completed"
    assert st["request_counts"] == {"total": 3, "completed": 2, "failed": 1}

    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    r = run(env, "results", batch_id, "-o", str(out), "--errors", str(err))
    assert "2 output lines" in r.stdout
    assert {json.loads(x)["custom_id"] for x in out.read_text().splitlines()} == {"c1", "m1"}
    assert json.loads(err.read_text())["error"]["line"] == 3

    assert "completed" in run(env, "cancel", batch_id).stdout  # a finished batch stays finished
    models = run(env, "models").stdout
    assert "tiny-chat" in models and "tiny-moderation" in models

    bad = run(env, "status", "batch_missing", check=False)
    assert bad.returncode == 2 and "not found" in bad.stderr

    dup = write_jsonl(tmp_path / "dup.jsonl", [chat("x"), chat("x")])
    r = run(env, "submit", str(dup), check=False)
    assert r.returncode == 2 and "'x' on lines 1, 2" in r.stderr


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
    port = free_port()
    env["GRISTMILL_FLOWER_PORT"] = str(port)
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

        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=2) as r:
                    assert r.read() == b"OK"
                    break
            except OSError:
                assert time.monotonic() < deadline, "flower did not answer"
                time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/workers?refresh=1", timeout=10) as r:
            workers = json.loads(r.read())
        assert any(name.startswith("gristmill-cpu") for name in workers), workers
        with open(up_home / "redis" / "appendonly.aof", "rb") as aof:
            assert aof.read(1), "AOF persistence must be on"

        kids = _children(proc.pid)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(90) == 0
        for k in kids:
            assert not Path(f"/proc/{k}").exists() or "zombie" in Path(f"/proc/{k}/status").read_text(), \
                f"process {k} outlived `gristmill up`"
        assert not ping(url)
        assert not url_file.exists()
    finally:
        if proc.poll() is None:  # a failed assertion: Ctrl-C first, so `up` stops its children
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
