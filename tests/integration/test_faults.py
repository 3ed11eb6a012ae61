"""Faults with real processes: workers killed with SIGKILL mid-batch; nothing lost, nothing doubled."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import redis

from gristmill.producers import constants as C
from gristmill.producers.client import Client
from gristmill.producers.settings import Settings

from .conftest import WorkerProcess, clean, worker_env
from .helpers import completion, moderation, read_results, write_jsonl


def _own_db(redis_url: str, db: int) -> str:
    # a database of its own: the session's tiny-model worker must not take these messages
    return redis_url.rsplit("/", 1)[0] + f"/{db}"


def _kill(w: WorkerProcess) -> None:
    """SIGKILL: no warm shutdown, no message handed back, like the OOM killer."""
    os.kill(w.proc.pid, signal.SIGKILL)
    w.proc.wait(10)


def _wait_done(c: Client, batch_id: str, at_least: int, timeout: float = 240) -> int:
    deadline = time.monotonic() + timeout
    while True:
        rc = c.get(batch_id).request_counts
        done = rc.completed + rc.failed
        if done >= at_least:
            return done
        assert time.monotonic() < deadline, f"stuck at {done} of {rc.total}"
        time.sleep(0.05)


def test_workers_killed_twice_mid_batch_lose_and_double_nothing(redis_url, home, tiny_models_file, tmp_path):
    url = _own_db(redis_url, 6)
    clean(url)
    # Four messages in flight per worker (the default): a kill may land in kombu's take-then-record
    # window (BRPOP, then the unacked write), and the sweep must then send that chunk again.
    env = worker_env(url, home, tiny_models_file, GRISTMILL_LEASE_TTL_S="2", GRISTMILL_CHUNK_SIZE="10")
    n = 3000
    rows = [completion(f"r{i}", f"line {i} of the batch", max_tokens=12, temperature=0) for i in range(n)]
    c = Client(Settings(redis_url=url, home=home, models_file=tiny_models_file, builtin_models=False, chunk_size=10))
    workers = [WorkerProcess(env, tmp_path / "w0.log").wait_ready(url)]
    try:
        b = c.submit_file(write_jsonl(tmp_path / "in.jsonl", rows))
        kills = []
        for at in (n // 10, n // 2):
            done = _wait_done(c, b.id, at)
            assert done < n, "the batch finished before the kill: make it slower"
            _kill(workers[-1])
            kills.append(done)
            workers.append(WorkerProcess(env, tmp_path / f"w{len(workers)}.log").wait_ready(url))
        final = c.wait(b.id, timeout=200)
        assert final.status == C.COMPLETED, final
        outs, errs = read_results(c, b.id, tmp_path)
        ids = Counter(o["custom_id"] for o in outs + errs)
        assert not errs, errs[:3]
        assert len(ids) == n and set(ids.values()) == {1}, "every custom_id exactly once"
        assert final.request_counts.completed == n and final.request_counts.failed == 0
        # the killed workers' messages came back through their lapsed leases, not the 2 h timeout
        logs = "".join((tmp_path / f"w{i}.log").read_text() for i in range(len(workers)))
        assert "handed back" in logs, kills
    finally:
        for w in workers:
            w.stop()
        c.close()


def test_redis_killed_mid_batch_and_restarted_on_its_aof_loses_and_doubles_nothing(home, tiny_models_file, tmp_path):
    from gristmill.producers.redis_server import EmbeddedRedis, free_port
    port, data = free_port(), tmp_path / "redis"
    server = EmbeddedRedis(data, port=port)
    url = server.start()
    # Four messages in flight: a BRPOP whose reply is lost with the connection takes a message off
    # its queue with no record of it (seen here), which the sweep sends again.
    env = worker_env(url, home, tiny_models_file, GRISTMILL_LEASE_TTL_S="5")
    n = 2000
    rows = [completion(f"r{i}", f"line {i} of the batch", max_tokens=12, temperature=0) for i in range(n)]
    c = Client(Settings(redis_url=url, home=home, models_file=tiny_models_file, builtin_models=False, chunk_size=10))
    w = WorkerProcess(env, tmp_path / "w.log").wait_ready(url)
    restarted = None
    try:
        b = c.submit_file(write_jsonl(tmp_path / "in.jsonl", rows))
        done = _wait_done(c, b.id, n // 5)
        assert done < n, "the batch finished before the kill: make it slower"
        server.proc.kill()  # SIGKILL: no SHUTDOWN, no final AOF flush
        server.proc.wait(10)
        time.sleep(3)  # workers and this client see connection errors meanwhile
        restarted = EmbeddedRedis(data, port=port, password=server.password)
        assert restarted.start() == url
        final = c.wait(b.id, timeout=240)  # the client rides out the outage on its own
        assert final.status == C.COMPLETED, final
        assert w.proc.poll() is None, "the worker reconnected instead of dying"
        outs, errs = read_results(c, b.id, tmp_path)
        ids = Counter(o["custom_id"] for o in outs + errs)
        assert not errs, errs[:3]
        assert len(ids) == n and set(ids.values()) == {1}, "every custom_id exactly once"
        assert final.request_counts.completed == n
        assert server.password not in (tmp_path / "w.log").read_text(), "no secrets in logs"
    finally:
        w.stop()
        c.close()
        (restarted or server).stop()


def test_a_poison_line_fails_alone_and_the_rest_of_its_chunk_completes(redis_url, home, tiny_models_file, tmp_path):
    import subprocess
    import sys

    from .conftest import ROOT
    url = _own_db(redis_url, 7)
    clean(url)
    # One message in flight per worker: the deaths are then all the poison line's, and their count
    # is exact (the other fault tests run four in flight).
    env = worker_env(url, home, tiny_models_file, GRISTMILL_LEASE_TTL_S="2", GRISTMILL_WORKER_CONCURRENCY="1")
    rows = [moderation(f"m{i}", "POISON" if i == 5 else f"ordinary text {i}") for i in range(40)]
    c = Client(Settings(redis_url=url, home=home, models_file=tiny_models_file, builtin_models=False, chunk_size=10))

    def start(k: int) -> WorkerProcess:
        # not waited for: the redelivered poison chunk may kill it before it answers a ping
        w = WorkerProcess.__new__(WorkerProcess)
        w.log, w.env = tmp_path / f"p{k}.log", env
        w.proc = subprocess.Popen([sys.executable, "-m", "tests.integration.poison_worker", "--device", "cpu"], env=env,
                                  stdout=open(w.log, "ab"), stderr=subprocess.STDOUT, cwd=ROOT)
        return w

    workers = [start(0).wait_ready(url)]
    try:
        b = c.submit_file(write_jsonl(tmp_path / "in.jsonl", rows))
        deadline = time.monotonic() + 240
        while not c.get(b.id).done:
            assert time.monotonic() < deadline, c.get(b.id)
            if workers[-1].proc.poll() is not None:  # a supervisor's job: start another
                workers.append(start(len(workers)))
            time.sleep(0.2)
        final = c.get(b.id)
        outs, errs = read_results(c, b.id, tmp_path)
        assert final.status == C.COMPLETED
        assert [(e["custom_id"], e["error"]["code"], e["error"]["line"]) for e in errs] == [("m5", C.E_WORKER_CRASHED, 6)]
        assert "died 2 times" in errs[0]["error"]["message"]
        assert sorted(o["custom_id"] for o in outs) == sorted(f"m{i}" for i in range(40) if i != 5)
        assert len(workers) - 1 == 3, "deaths: the batched run, then two with the line running alone"
    finally:
        for w in workers:
            w.stop()
        c.close()


def test_a_message_taken_but_never_recorded_is_sent_again(redis_url, home, tiny_models_file, tmp_path):
    """What a worker killed between kombu's BRPOP and its unacked write leaves: a chunk message gone
    from its queue and held by no one. Taken here by hand, deterministically; the sweep sends the
    kept copy again once the queue is empty, and the batch completes with every line once."""
    import json

    import redis
    url = _own_db(redis_url, 8)
    clean(url)
    rows = [moderation(f"m{i}", f"ordinary text {i}") for i in range(60)]
    c = Client(Settings(redis_url=url, home=home, models_file=tiny_models_file, builtin_models=False, chunk_size=10))
    r = redis.Redis.from_url(url, decode_responses=True)
    b = c.submit_file(write_jsonl(tmp_path / "in.jsonl", rows))  # no worker yet: all 6 chunks queued
    assert r.llen(C.CLASSIFY_QUEUE) == 6 and r.hlen(C.pending_key(b.id)) == 6
    taken = json.loads(r.rpop(C.CLASSIFY_QUEUE))["headers"]["id"]
    assert C.chunk_of_task_id(taken) == (b.id, 0)
    w = WorkerProcess(worker_env(url, home, tiny_models_file, GRISTMILL_LEASE_TTL_S="2"), tmp_path / "w.log")
    try:
        w.wait_ready(url)
        final = c.wait(b.id, timeout=120)
        assert final.status == C.COMPLETED, final
        outs, errs = read_results(c, b.id, tmp_path)
        assert not errs and sorted(o["custom_id"] for o in outs) == sorted(f"m{i}" for i in range(60))
        assert final.resent == 1
        assert r.hlen(C.pending_key(b.id)) == 0, "written chunks leave no kept message behind"
        assert f"sent chunk 0 of {b.id} again" in w.log.read_text()
    finally:
        w.stop()
        c.close()
        r.close()


def test_the_sweep_finds_a_lost_chunk_while_its_queue_is_still_busy(redis_url, home, tiny_models_file, tmp_path):
    """The queue is FIFO: a pending chunk sent well before the message the queue hands out next is
    no longer in it. The sweep (called here directly, no worker running) sends such a chunk again
    on its second sighting, and leaves chunks sent after the front of the queue alone."""
    import json

    import redis

    from gristmill.producers.app import make_app
    from gristmill.workers.reaper import SEND_SKEW_S, Lease
    url = _own_db(redis_url, 9)
    clean(url)
    settings = Settings(redis_url=url, home=home, models_file=tiny_models_file, builtin_models=False, chunk_size=10)
    c = Client(settings)
    r = redis.Redis.from_url(url, decode_responses=True)
    lease = Lease(make_app(settings, url), r, ttl_s=30)
    try:
        b = c.submit_file(write_jsonl(tmp_path / "in.jsonl", [moderation(f"m{i}", f"text {i}") for i in range(60)]))
        raw = r.rpop(C.CLASSIFY_QUEUE)
        taken = json.loads(raw)["headers"]["id"]
        assert C.chunk_of_task_id(taken) == (b.id, 0)
        assert r.llen(C.CLASSIFY_QUEUE) == 5
        # sent milliseconds before the queue's front: within the clocks' skew, so not yet judged
        assert lease.sweep() == [] and lease.sweep() == []
        # as if chunk 0 had been sent ten minutes ago, and a worker held it as kombu records one
        r.zadd(C.pending_at_key(b.id), {"0": time.time() - 600})
        with lease.app.connection_for_write() as conn:
            unacked = conn.default_channel.unacked_key
        r.hset(unacked, "tag-0", json.dumps([json.loads(raw), "", C.CLASSIFY_QUEUE]))
        assert lease.sweep() == [] and lease.sweep() == [], "a held chunk is not lost"
        r.hdel(unacked, "tag-0")  # its worker died in the window: nobody holds it
        assert lease.sweep() == [], "a first sighting is not enough"
        assert lease.sweep() == [(b.id, 0)]
        assert r.llen(C.CLASSIFY_QUEUE) == 6 and c.get(b.id).resent == 1
        assert json.loads(r.lindex(C.CLASSIFY_QUEUE, 0))["headers"]["id"] == taken, "sent again, to the back"
        assert r.zscore(C.pending_at_key(b.id), "0") > time.time() - SEND_SKEW_S
        assert lease.sweep() == [] and lease.sweep() == [], "queued again now: not sent a second time"
    finally:
        c.close()
        r.close()


def test_the_score_cache_on_its_own_server_and_a_dead_one_costs_no_line(redis_url, home, tiny_models_file, tmp_path):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from gristmill.producers.redis_server import EmbeddedRedis, free_port
    url = _own_db(redis_url, 11)
    clean(url)
    cache_server = EmbeddedRedis(tmp_path / "cache", cache_max_memory="64mb")
    cache_url = cache_server.start()
    port = free_port()
    w = WorkerProcess(worker_env(url, home, tiny_models_file, GRISTMILL_DEDUP_REDIS_URL=cache_url,
                                 GRISTMILL_METRICS_PORT=str(port)), tmp_path / "w.log").wait_ready(url)
    c = Client(Settings(redis_url=url, home=home, models_file=tiny_models_file, builtin_models=False, chunk_size=8))
    try:
        first = [moderation(f"a{i}", f"first text {i}") for i in range(20)]
        b1 = c.wait(c.submit_file(write_jsonl(tmp_path / "a.jsonl", first)).id, timeout=120)
        assert b1.request_counts.completed == 20
        main, cache = redis.Redis.from_url(url), redis.Redis.from_url(cache_url)
        keys = cache.keys(f"{C.PREFIX}:dedup:*")
        assert len(keys) == 20 and not main.keys(f"{C.PREFIX}:dedup:*")
        # an evicting server bounds the entries itself: they are written without an expiry
        assert {cache.ttl(k) for k in keys} == {-1}

        cache_server.stop()  # lookups and publishes now fail: the lines run and are written anyway
        second = [moderation(f"b{i}", f"second text {i}") for i in range(20)]
        b2 = c.wait(c.submit_file(write_jsonl(tmp_path / "b.jsonl", second)).id, timeout=120)
        outs, errs = read_results(c, b2.id, tmp_path)
        assert (b2.status, len(outs), errs) == (C.COMPLETED, 20, [])
        assert "score cache lookup failed" in (tmp_path / "w.log").read_text()
        # and the operator sees it: the failed calls are counted
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        failed = {s.labels["op"]: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                  if s.name == "gristmill_score_cache_errors_total"}
        assert failed.get("lookup", 0) >= 1 and failed.get("publish", 0) >= 1, failed
        # the worker is listed with its queues while it runs, and not once it has stopped
        assert list(c.workers().values()) == [list(C.QUEUES)]
        w.stop()
        assert c.workers() == {}
    finally:
        w.stop()
        cache_server.stop()
        c.close()


def test_a_model_that_cannot_load_fails_its_own_lines_only(redis_url, home, tiny_models_file, tmp_path):
    import json

    from .helpers import classification
    url = _own_db(redis_url, 12)
    clean(url)
    (tmp_path / "empty-model").mkdir()
    models = json.loads(tiny_models_file.read_text()) + [
        {"name": "broken", "kind": "sequence_classifier", "path": str(tmp_path / "empty-model")}]
    mf = tmp_path / "models.json"
    mf.write_text(json.dumps(models))
    w = WorkerProcess(worker_env(url, home, mf), tmp_path / "w.log").wait_ready(url)
    c = Client(Settings(redis_url=url, home=home, models_file=mf, builtin_models=False, chunk_size=4))
    try:
        # two chunks, each with lines for the broken model beside lines for working ones
        rows = [classification("b0", model="broken"), moderation("m0"), classification("k0", model="tiny-classifier"),
                classification("b1", model="broken"), classification("b2", model="broken"), moderation("m1"),
                completion("p0", max_tokens=2), classification("b3", model="broken")]
        b = c.wait(c.submit_file(write_jsonl(tmp_path / "in.jsonl", rows)).id, timeout=120)
        outs, errs = read_results(c, b.id, tmp_path)
        assert sorted(o["custom_id"] for o in outs) == ["k0", "m0", "m1", "p0"]
        assert sorted(e["custom_id"] for e in errs) == ["b0", "b1", "b2", "b3"]
        for e in errs:
            assert e["error"]["code"] == C.E_ENGINE and "model 'broken' failed to load" in e["error"]["message"], e
        # the failure is remembered for a while: the second chunk did not load it again
        assert (tmp_path / "w.log").read_text().count("loading broken") == 1
    finally:
        w.stop()
        c.close()
