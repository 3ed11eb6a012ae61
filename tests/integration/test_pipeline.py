"""Submit -> real worker process -> results, against a real redis-server, on tiny models."""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest
import redis
from openai.types import Completion, ModerationCreateResponse
from openai.types.chat import ChatCompletion

from gristmill.producers import constants as C
from gristmill.producers.errors import DuplicateCustomIds
from gristmill.producers.schemas import validate_line

from .helpers import chat, classification, completion, moderation, read_results, write_jsonl


def test_mixed_file_runs_end_to_end_with_one_line_per_input(client, tmp_path):
    long_prompt = "the quick brown fox " * 60  # > 128 tokens: tiny-chat's context
    rows = [chat("c1"), chat("c2", "what is the capital of france", temperature=0.7, seed=3, top_p=0.9),
            chat("c3", max_completion_tokens=3), completion("p1", stop=["zzz"]), completion("p2", max_tokens=4),
            moderation("m1"), moderation("m2", ["have a lovely day", "i will hurt you"]),
            classification("k1"), classification("k2", ["a", "b", "c"]),
            "{broken json",
            {"method": "POST", "url": C.CHAT_URL, "body": {}},
            {"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {}},
            chat("bad-temp", temperature=9),
            chat("bad-model", model="gpt-9"),
            chat("too-long", long_prompt),
            # a lone surrogate escape: refused alone (it once failed the whole file when its chunk was kept)
            '{"custom_id": "lone", "method": "POST", "url": "/v1/moderations", "body": {"input": "x \\ud800"}}',
            # empty text: the tiny tokenizers give it no ids (these lines used to fail as engine errors)
            moderation("m3", ["have a lovely day", ""]), completion("p3", "", max_tokens=3)]
    f = write_jsonl(tmp_path / "in.jsonl", rows)
    batch = client.submit_file(f)
    assert batch.status == C.IN_PROGRESS and batch.request_counts.total == len(rows)
    assert batch.input_sha256 and len(batch.input_sha256) == 64
    done = client.wait(batch.id, timeout=120)
    assert done.status == C.COMPLETED
    assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at
    outs, errs = read_results(client, batch.id, tmp_path)

    # exactly one output-or-error line per input line
    assert len(outs) + len(errs) == len(rows)
    # the same lines, parsed, without files
    assert sorted(map(json.dumps, client.iter_results(batch.id))) == sorted(map(json.dumps, outs))
    assert sorted(map(json.dumps, client.iter_results(batch.id, errors=True))) == sorted(map(json.dumps, errs))
    assert done.request_counts.model_dump() == {"total": len(rows), "completed": len(outs), "failed": len(errs)}
    by_id = {o["custom_id"]: o for o in outs}
    assert set(by_id) == {"c1", "c2", "c3", "p1", "p2", "p3", "m1", "m2", "m3", "k1", "k2"}
    errors = {(e["custom_id"], e["error"]["code"], e["error"]["line"]) for e in errs}
    assert errors == {(None, "invalid_json", 10), (None, "missing_custom_id", 11), ("bad-url", "invalid_url", 12),
                      ("bad-temp", "invalid_body", 13), ("bad-model", "model_not_found", 14),
                      ("too-long", "context_length_exceeded", 15), (None, "invalid_json", 16)}

    for cid in ("c1", "c2", "c3"):
        cc = ChatCompletion.model_validate(by_id[cid]["response"]["body"])
        assert cc.choices[0].message.role == "assistant" and cc.choices[0].finish_reason in ("stop", "length")
        assert cc.usage.total_tokens == cc.usage.prompt_tokens + cc.usage.completion_tokens
    assert ChatCompletion.model_validate(by_id["c3"]["response"]["body"]).usage.completion_tokens <= 3
    assert Completion.model_validate(by_id["p2"]["response"]["body"]).usage.completion_tokens <= 4
    mod = ModerationCreateResponse.model_validate(by_id["m2"]["response"]["body"])
    assert len(mod.results) == 2
    assert len(ModerationCreateResponse.model_validate(by_id["m3"]["response"]["body"]).results) == 2
    assert Completion.model_validate(by_id["p3"]["response"]["body"]).usage.prompt_tokens == 1  # BOS
    for r in mod.results:
        for v in r.category_scores.model_dump(by_alias=True).values():
            assert v is None or 0 <= v <= 1
    assert all(r["policy_version"] == "tiny-mod-3" for r in by_id["m2"]["response"]["body"]["results"]), by_id["m2"]
    k2 = by_id["k2"]["response"]["body"]
    assert len(k2["results"]) == 3 and all(r["policy_version"] == "tiny-policy-7" for r in k2["results"])
    assert all(r["thresholds"]["negative"] == 0.2 for r in k2["results"])

    for o in outs:
        prov = o["provenance"]
        assert prov["model"] in ("tiny-chat", "tiny-moderation", "tiny-classifier")
        if prov["model"] == "tiny-chat":  # a Llama: the continuous-batching loop
            assert prov["engine_variant"] == "torch-float32-cpu-continuous"
        else:
            assert prov["engine_variant"] in ("torch-float32-cpu", "torch-bf16-autocast-cpu")
        assert len(prov["model_revision"]) == 12
        if prov["model"] != "tiny-chat":  # classifier lines: the policy, and a digest per input text
            assert prov["policy_version"] in ("tiny-mod-3", "tiny-policy-7") and len(prov["thresholds_digest"]) == 16
    k1_row = next(r for r in rows if isinstance(r, dict) and r.get("custom_id") == "k1")
    assert by_id["k1"]["provenance"]["input_sha256"] == hashlib.sha256(k1_row["body"]["input"].encode()).hexdigest()
    assert by_id["m2"]["provenance"]["input_sha256"] == [hashlib.sha256(t.encode()).hexdigest()
                                                         for t in ("have a lovely day", "i will hurt you")]
    c1_row = next(r for r in rows if isinstance(r, dict) and r.get("custom_id") == "c1")
    assert by_id["c1"]["provenance"]["input_sha256"] == validate_line(json.dumps(c1_row), 1,
                                                                      client.settings.registry).input_sha256


def test_each_queue_has_its_own_binding_and_stale_ones_are_dropped(client, redis_url, tmp_path):
    """A message routed through one queue's exchange lands in that queue only; the binding earlier
    releases left (the generate queue bound under the classify key) is removed by workers."""
    from gristmill.producers.app import drop_stale_bindings
    b = client.wait(client.submit_file(write_jsonl(tmp_path / "in.jsonl", [chat("c"), moderation("m")])).id, timeout=120)
    assert b.status == C.COMPLETED
    r = redis.Redis.from_url(redis_url)
    sep = b"\x06\x16"
    for q in C.QUEUES:
        assert r.smembers(f"_kombu.binding.{q}") == {q.encode() + sep + sep + q.encode()}, q
    stale = C.CLASSIFY_QUEUE.encode() + sep + sep + C.GENERATE_QUEUE.encode()
    r.sadd(f"_kombu.binding.{C.CLASSIFY_QUEUE}", stale)
    assert drop_stale_bindings(r) == 1 and stale not in r.smembers(f"_kombu.binding.{C.CLASSIFY_QUEUE}")
    assert drop_stale_bindings(r) == 0


def test_duplicate_custom_ids_reject_the_whole_submission(client, tmp_path):
    f = write_jsonl(tmp_path / "dup.jsonl", [chat("a"), chat("b"), moderation("a"), chat("c"), chat("b")])
    with pytest.raises(DuplicateCustomIds) as exc:
        client.submit_file(f)
    msg = str(exc.value)
    assert "'a' on lines 1, 3" in msg and "'b' on lines 2, 5" in msg
    r = client.redis
    assert all(r.llen(q) == 0 for q in C.QUEUES), "nothing may be enqueued"
    (batch,) = client.list()
    assert batch.status == C.FAILED and "duplicate" in batch.errors[0]["message"]
    assert not r.exists(C.results_key(batch.id))


def test_a_duplicate_in_a_later_block_of_ids_is_found(client, tmp_path):
    rows = [moderation(f"m{i}") for i in range(2500)] + [moderation("m10")]  # ids are checked 1,000 at a time
    with pytest.raises(DuplicateCustomIds) as exc:
        client.submit_file(write_jsonl(tmp_path / "dup.jsonl", rows))
    assert "'m10' on lines 11, 2501" in str(exc.value)
    assert all(client.redis.llen(q) == 0 for q in C.QUEUES), "nothing may be enqueued"


def test_a_redelivered_chunk_writes_no_second_line(client, tmp_path):
    rows = [moderation(f"m{i}") for i in range(3)]
    f = write_jsonl(tmp_path / "in.jsonl", rows)
    batch = client.wait(client.submit_file(f).id, timeout=60)
    assert batch.request_counts.completed == 3
    # the same message again, as Redis would redeliver it after a lost ack
    items = [validate_line(json.dumps(r), i + 1, client.settings.registry).to_message() for i, r in enumerate(rows[:2])]
    client.app.send_task(C.CLASSIFY_TASK, args=[batch.id, 0, items], queue=C.CLASSIFY_QUEUE)
    deadline = time.time() + 30
    while int(client.redis.hget(C.attempts_key(batch.id), 0) or 0) < 2:
        assert time.time() < deadline, "the redelivered chunk was never processed"
        time.sleep(0.1)
    time.sleep(0.3)
    after = client.get(batch.id)
    assert after.request_counts == batch.request_counts
    assert client.store.count_lines(batch.id) == 3


def test_partial_results_while_running_then_cancel(redis_url, tiny_worker, settings_for, tmp_path):
    from .conftest import clean
    from gristmill.producers.client import Client
    clean(redis_url)
    c = Client(settings_for(redis_url, chunk_size=1))
    rows = [chat(f"c{i}", max_tokens=60, temperature=1.0) for i in range(150)]
    batch = c.submit_file(write_jsonl(tmp_path / "in.jsonl", rows))
    deadline = time.time() + 60
    while c.get(batch.id).request_counts.completed < 2:
        assert time.time() < deadline
        time.sleep(0.05)
    n_out, _ = c.download(batch.id, tmp_path / "partial.jsonl")
    assert 2 <= n_out < len(rows), "partial results are readable while the batch runs"
    assert c.cancel(batch.id).status in (C.CANCELLING, C.CANCELLED)
    final = c.wait(batch.id, timeout=120)
    assert final.status == C.CANCELLED and final.cancelled_at and final.cancelling_at
    assert final.request_counts.completed < len(rows)
    time.sleep(0.5)
    assert c.store.count_lines(batch.id) == final.request_counts.completed + final.request_counts.failed
    c.close()


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['GRISTMILL_PICKLE_MARKER']}",))


def test_a_pickled_message_is_never_executed(client, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("GRISTMILL_PICKLE_MARKER", str(marker))
    client.app.send_task(C.CLASSIFY_TASK, args=[_Evil()], queue=C.CLASSIFY_QUEUE, serializer="pickle")
    assert not marker.exists(), "pickling must not run the payload on this side either"
    # the worker keeps serving JSON work after refusing the pickled message
    f = write_jsonl(tmp_path / "in.jsonl", [moderation("after")])
    assert client.wait(client.submit_file(f).id, timeout=60).status == C.COMPLETED
    assert not marker.exists(), "the worker deserialized a pickled message"
    assert client.redis.llen(C.CLASSIFY_QUEUE) == 0


def test_expiry_and_the_requeue_cap(redis_url, home, tiny_models_file, settings_for, tmp_path):
    """On a database no worker watches: one batch outlives its window, one chunk is over its
    delivery cap; then a worker starts and must answer both with error lines, not run them."""
    from gristmill.producers.client import Client
    from .conftest import WorkerProcess, worker_env
    url = redis_url.rsplit("/", 1)[0] + "/3"
    redis.Redis.from_url(url).flushdb()
    c = Client(settings_for(url, chunk_size=2))
    late = c.submit_file(write_jsonl(tmp_path / "a.jsonl", [moderation("a1"), moderation("a2")]), completion_window="1s")
    poison = c.submit_file(write_jsonl(tmp_path / "b.jsonl", [moderation(f"b{i}") for i in range(4)]))
    # chunk 0 (2 lines) crashed workers before, past the cap of max_attempts + its lines
    c.redis.hset(C.attempts_key(poison.id), 0, c.settings.max_attempts + 2)
    time.sleep(1.2)
    w = WorkerProcess(worker_env(url, home, tiny_models_file), tmp_path / "w.log").wait_ready(url)
    try:
        a = c.wait(late.id, timeout=60)
        b = c.wait(poison.id, timeout=60)
    finally:
        w.stop()
    assert a.status == C.EXPIRED and a.expired_at and a.request_counts.failed == 2
    _, errs = read_results(c, late.id, tmp_path)
    assert {e["error"]["code"] for e in errs} == {C.E_EXPIRED}
    assert b.status == C.COMPLETED and b.request_counts.model_dump() == {"total": 4, "completed": 2, "failed": 2}
    outs, errs = read_results(c, poison.id, tmp_path)
    assert {e["custom_id"] for e in errs} == {"b0", "b1"} and {e["error"]["code"] for e in errs} == {C.E_WORKER_CRASHED}
    c.close()


def test_all_invalid_file_fails_with_an_error_file(client, tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", ["nope", chat("x", model="gpt-9")])
    b = client.get(client.submit_file(f).id)
    assert b.status == C.FAILED and b.request_counts.failed == 2 and b.errors
    _, errs = read_results(client, b.id, tmp_path)
    assert len(errs) == 2


def test_unknown_batch_is_an_error_not_pending_forever(client):
    from gristmill.producers.errors import BatchNotFound
    with pytest.raises(BatchNotFound, match="batch_nope"):
        client.get("batch_nope")


def test_a_model_the_worker_lacks_is_a_clear_per_line_error(redis_url, tiny_worker, home, tmp_path):
    """Producer and worker registries disagree: the line fails with model_not_found, the rest run."""
    import json as _json

    from gristmill.producers.client import Client
    from gristmill.producers.settings import Settings
    from .conftest import clean
    clean(redis_url)
    extra = tmp_path / "models.json"
    from gristmill.producers.registry import DEFAULT_CLASSIFIER
    extra.write_text(_json.dumps([DEFAULT_CLASSIFIER.model_dump(mode="json") | {"name": "only-here", "aliases": []}]))
    c = Client(Settings(redis_url=redis_url, home=home, models_file=extra, builtin_models=False))
    b = c.wait(c.submit_file(write_jsonl(tmp_path / "in.jsonl", [moderation("x", model="only-here")])).id, timeout=60)
    _, errs = read_results(c, b.id, tmp_path)
    assert [e["error"]["code"] for e in errs] == [C.E_MODEL_NOT_FOUND]
    assert "GRISTMILL_MODELS_FILE" in errs[0]["error"]["message"]
    c.close()


def test_worker_exports_prometheus_metrics(client, metrics_port, tmp_path):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    f = write_jsonl(tmp_path / "in.jsonl", [moderation(f"m{i}") for i in range(5)] + [chat("c0", "x " * 400)])
    client.wait(client.submit_file(f).id, timeout=60)
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("gristmill_items_total", (("model", "tiny-moderation"), ("outcome", "completed")))] >= 5
    assert samples[("gristmill_items_total", (("model", "tiny-chat"), ("outcome", "failed")))] >= 1
    assert samples[("gristmill_batch_size_count", (("model", "tiny-moderation"),))] >= 1
    assert samples[("gristmill_engine_busy_seconds_total", (("model", "tiny-moderation"),))] > 0
    assert samples[("gristmill_message_seconds_count", (("queue", C.CLASSIFY_QUEUE),))] >= 1
    assert samples[("gristmill_queue_wait_seconds_count", (("queue", C.CLASSIFY_QUEUE),))] >= 1
    assert samples[("gristmill_engine_seconds_count", (("model", "tiny-moderation"),))] >= 1
    assert not any(name == "gristmill_gpu_memory_bytes" for name, _ in samples)  # a CPU worker has none
    looked_up = sum(samples.get(("gristmill_score_cache_inputs_total", (("model", "tiny-moderation"), ("outcome", o))), 0)
                    for o in ("hit", "miss"))
    assert looked_up >= 5


def test_parallel_ingest_over_byte_ranges_matches_one_process(redis_url, tiny_worker, settings_for, tmp_path,
                                                              monkeypatch):
    from gristmill.producers import ingest
    from gristmill.producers.client import Client

    from .conftest import clean
    clean(redis_url)
    monkeypatch.setattr(ingest, "_MARK_EVERY", 40)  # 130 lines -> marks at lines 41, 81, 121
    rows = [moderation(f"m{i}") if i % 3 else classification(f"k{i}") for i in range(130)]
    rows[45] = "not json"
    rows[95] = {"custom_id": "bad", "method": "POST", "url": "/v1/nope", "body": {}}
    f = write_jsonl(tmp_path / "in.jsonl", rows)
    c = Client(settings_for(redis_url, chunk_size=16, ingest_processes=3))
    batch = c.wait(c.submit_file(f).id, timeout=120)
    assert batch.status == C.COMPLETED
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (130, 128, 2)
    n_out, n_err = c.download(batch.id, tmp_path / "out.jsonl", tmp_path / "err.jsonl")
    assert (n_out, n_err) == (128, 2)
    outs = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(o["custom_id"] for o in outs) == sorted(f"m{i}" if i % 3 else f"k{i}" for i in range(130)
                                                          if i not in (45, 95))
    errs = {e["error"]["line"]: e for e in map(json.loads, (tmp_path / "err.jsonl").read_text().splitlines())}
    assert set(errs) == {46, 96} and errs[96]["custom_id"] == "bad", "line numbers survive the split"
    done = c.redis.smembers(C.chunks_done_key(batch.id))
    assert len(done) == int(c.redis.hget(C.batch_key(batch.id), "chunks_total"))
    assert {int(x) % 2 for x in done} == {0, 1}, "two ranges, chunk numbers interleaved (stride 2)"
    c.close()


def test_long_lines_end_a_message_before_its_line_count(redis_url, tiny_worker, settings_for, tmp_path):
    from gristmill.producers.client import Client
    from .conftest import clean
    clean(redis_url)
    c = Client(settings_for(redis_url, chunk_size=100, chunk_max_bytes=4096))
    rows = [moderation(f"m{i}", f"text {i} " + "long " * 300) for i in range(10)]  # ~1.6 kB a line
    sizes = [len(json.dumps(r)) + 1 for r in rows]
    b = c.wait(c.submit_file(write_jsonl(tmp_path / "in.jsonl", rows)).id, timeout=120)
    outs, errs = read_results(c, b.id, tmp_path)
    assert (b.status, len(outs), errs) == (C.COMPLETED, 10, [])
    per_chunk = -(-4096 // sizes[0])  # lines until their bytes reach the cap
    assert int(c.store.raw(b.id)["chunks_total"]) == -(-10 // per_chunk) > 1
    c.close()
