"""Backpressure: ingest holds back while a queue is full or Redis is at its maxmemory, says so,
and resumes as workers drain the queue; nothing is lost or doubled."""

from __future__ import annotations

import json
import threading
import time
import traceback

import redis

from gristmill.producers import constants as C
from gristmill.producers.client import Client
from gristmill.producers.ingest import queued_messages
from gristmill.producers.redis_server import EmbeddedRedis

from .conftest import WorkerProcess, clean, worker_env
from .helpers import classification, read_results, write_jsonl


def _submit_in_background(client: Client, path, said: list[str]) -> dict:
    done: dict = {}

    def run():
        try:
            done["batch"] = client.submit_file(path, on_wait=said.append)
        except BaseException as e:  # noqa: BLE001 - the test reads it
            done["error"] = e
            done["traceback"] = traceback.format_exc()
    threading.Thread(target=run, daemon=True).start()
    return done


def test_ingest_waits_while_the_queue_is_over_the_bound_then_resumes(redis_url, home, tiny_models_file, settings_for,
                                                                     tmp_path):
    # a database no worker consumes yet: ingest fills the queue to the bound and waits there
    url = redis_url.rsplit("/", 1)[0] + "/11"
    clean(url)
    r = redis.Redis.from_url(url, decode_responses=True)
    n = 400
    f = write_jsonl(tmp_path / "in.jsonl", [classification(f"r{i}", f"text {i}") for i in range(n)])
    client = Client(settings_for(url, chunk_size=4, max_queued_lines=40))
    said: list[str] = []
    done = _submit_in_background(client, f, said)
    deadline = time.monotonic() + 60
    batch_id = None
    while not (said and batch_id):
        assert time.monotonic() < deadline and "error" not in done, done
        ids = r.zrange(C.BATCH_INDEX, 0, -1)
        batch_id = ids[0] if ids else None
        time.sleep(0.05)
    time.sleep(1.0)  # it stays held back: the queue stays near the bound
    queued = queued_messages(r, C.CLASSIFY_QUEUE)
    assert 10 <= queued <= 10 + 4, queued  # 40 lines / 4 a chunk, loose by the check interval
    b = client.get(batch_id)
    assert b.ingest_waiting_since and "GRISTMILL_MAX_QUEUED_LINES" in b.ingest_waiting_for
    assert "GRISTMILL_MAX_QUEUED_LINES" in said[0] and "batch" not in done
    # a worker starts: the queue drains, ingest resumes and ends, every line once
    w = WorkerProcess(worker_env(url, home, tiny_models_file), tmp_path / "w.log").wait_ready(url)
    try:
        deadline = time.monotonic() + 120
        while "batch" not in done:
            assert time.monotonic() < deadline and "error" not in done, done
            time.sleep(0.1)
        b = client.wait(batch_id, timeout=120)
        assert b.status == C.COMPLETED and b.request_counts.completed == n and not b.ingest_waiting_since
        assert not r.exists(C.ids_key(batch_id)), "the custom_id set outlived validation"
        outs, errs = read_results(client, batch_id, tmp_path)
        assert sorted(o["custom_id"] for o in outs) == sorted(f"r{i}" for i in range(n)) and not errs
    finally:
        w.stop()
        client.close()
        clean(url)


def test_an_ingest_into_a_redis_at_its_maxmemory_waits_instead_of_failing(home, tiny_models_file, settings_for,
                                                                         tmp_path):
    """A Redis (noeviction) filled to its maxmemory by other data: ingest's writes are refused, so
    it waits and says so instead of failing; once memory is freed it resumes, and the batch
    completes with every line once. (Ingest also holds back above 80% of maxmemory by itself: at
    the limit Redis refuses a worker's ack too.)"""
    with EmbeddedRedis(tmp_path / "small") as server:
        r = redis.Redis.from_url(server.url, decode_responses=True)
        w = WorkerProcess(worker_env(server.url, home, tiny_models_file), tmp_path / "w.log").wait_ready(server.url)
        client = Client(settings_for(server.url, chunk_size=8, max_queued_lines=0))
        try:
            n = 2000
            f = write_jsonl(tmp_path / "in.jsonl", [classification(f"r{i}", f"text {i}") for i in range(n)])
            r.config_set("maxmemory-policy", "noeviction")
            r.config_set("maxmemory", str(int(r.info("memory")["used_memory"]) + (4 << 20)))
            filler = 0
            while True:  # other data up to the limit
                try:
                    r.set(f"filler:{filler}", "x" * (64 << 10))
                    filler += 1
                except redis.RedisError:
                    break
            said: list[str] = []
            done = _submit_in_background(client, f, said)
            deadline = time.monotonic() + 60
            while not said:
                assert time.monotonic() < deadline and not done, done
                time.sleep(0.05)
            assert "maxmemory" in said[0]
            time.sleep(2.0)
            assert not done, "ingest went on while Redis refused its writes"
            r.delete(*[f"filler:{k}" for k in range(filler)])  # memory comes back
            deadline = time.monotonic() + 120
            while "batch" not in done:
                assert time.monotonic() < deadline and "error" not in done, done
                time.sleep(0.1)
            b = client.wait(done["batch"].id, timeout=120)
            assert b.status == C.COMPLETED and b.request_counts.completed == n, json.dumps(b.model_dump())
            outs, errs = read_results(client, b.id, tmp_path)
            assert len({o["custom_id"] for o in outs}) == n and len(outs) == n and not errs
            assert w.proc.poll() is None, "the worker died"
        finally:
            r.config_set("maxmemory", "0")
            w.stop()
            client.close()
