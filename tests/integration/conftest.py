"""Integration fixtures: a real redis-server for the session, real worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import redis

from gristmill.producers import constants as C
from gristmill.producers.app import make_app
from gristmill.producers.client import Client
from gristmill.producers.redis_server import EmbeddedRedis
from gristmill.producers.settings import Settings
from gristmill.workers.launcher import wait_for_workers
from tests.commands import GRISTMILL, ROOT  # noqa: F401  (ROOT: the tests' working directory)



@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    url = server.start()
    yield url
    server.stop()


def clean(url: str) -> None:
    """Remove gristmill's keys and queued messages. Not FLUSHDB: that would also drop kombu's queue
    bindings, which running workers and cached producers declared once and do not declare again.
    Running workers' heartbeats stay: they are the workers', not a test's."""
    r = redis.Redis.from_url(url)
    alive = C.alive_key("").encode()
    keys = [k for k in r.scan_iter(f"{C.PREFIX}:*") if k != C.WORKERS_KEY.encode() and not k.startswith(alive)]
    keys += [q.encode() for q in C.QUEUES]
    if keys:
        r.delete(*keys)


@pytest.fixture(scope="session")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


def worker_env(url: str, home: Path, models_file: Path | None, **extra: str) -> dict[str, str]:
    env = {**os.environ, "GRISTMILL_REDIS_URL": url, "GRISTMILL_HOME": str(home), "PYTHONUNBUFFERED": "1",
           "GRISTMILL_METRICS_PORT": "0"}
    if models_file is not None:
        env.update(GRISTMILL_MODELS_FILE=str(models_file), GRISTMILL_BUILTIN_MODELS="false")
    env.update(extra)
    return env


class WorkerProcess:
    def __init__(self, env: dict[str, str], log: Path, *args: str):
        self.log = log
        self.env = env
        self.proc = subprocess.Popen([*GRISTMILL, "worker", "--device", "cpu", *args],
                                     env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=ROOT)

    def wait_ready(self, url: str, timeout: float = 180) -> "WorkerProcess":
        wait_for_workers(make_app(Settings(redis_url=url), url), [("worker", self.proc, self.log)], timeout=timeout)
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def metrics_port() -> int:
    from gristmill.producers.redis_server import free_port
    return free_port()


@pytest.fixture(scope="session")
def tiny_worker(redis_url, home, tiny_models_file, tmp_path_factory, metrics_port):
    log = tmp_path_factory.mktemp("logs") / "tiny-worker.log"
    w = WorkerProcess(worker_env(redis_url, home, tiny_models_file, GRISTMILL_MAX_WAIT_MS="20"), log,
                      "--metrics-port", str(metrics_port))
    try:
        yield w.wait_ready(redis_url)
    finally:
        w.stop()


@pytest.fixture
def settings_for(home, tiny_models_file):
    def make(url: str, **kw) -> Settings:
        return Settings(redis_url=url, home=home, models_file=tiny_models_file, builtin_models=False, **kw)
    return make


@pytest.fixture
def client(redis_url, tiny_worker, settings_for):
    clean(redis_url)
    c = Client(settings_for(redis_url, chunk_size=2))
    yield c
    c.close()
