"""A cascade served by a real worker process: its student screens every input, and the inputs near
a threshold go back to the worker's batcher and through the full model in batches of their own."""

from __future__ import annotations

import json
import statistics

import pytest

from gristmill.kernels.cascade import _logit
from gristmill.producers.app import make_app
from gristmill.producers.client import Client
from gristmill.producers.redis_server import EmbeddedRedis
from gristmill.producers.settings import Settings
from tests.tinymodels import build_cascade

from .conftest import WorkerProcess, worker_env
from .helpers import moderation, read_results, write_jsonl

BASES = ["i will hurt you", "have a lovely day", "hello world", "the quick brown fox"]


def test_a_worker_serves_a_cascade_batching_its_escalated_inputs(tiny_models_file, tmp_path):
    from gristmill.workers.host import EngineHost
    _, out, models = build_cascade(tiny_models_file, tmp_path)
    texts = [f"{b} #{i}" for i in range(12) for b in BASES]  # distinct: none reused from the score cache
    # a band that escalates about half of these inputs: the median distance of the student's scores
    # from the thresholds it escalates near
    settings = Settings(models_file=models, builtin_models=False, home=tmp_path / "home", dedup_ttl_s=0)
    host = EngineHost(settings)
    cascade = host.engine("tiny-cascade")
    ids = cascade.encode(texts)
    student = cascade.student.run(ids)
    full = host.engine("tiny-moderation").run(ids)
    host.shutdown()
    manifest_file = out / "gristmill-artifact.json"
    manifest = json.loads(manifest_file.read_text())

    def distance(row: dict) -> float:
        return min(abs(_logit(row[k]) - _logit(t)) for k, ts in manifest["thresholds"].items() for t in ts)
    manifest["band"] = statistics.median(map(distance, student))
    manifest_file.write_text(json.dumps(manifest))

    with EmbeddedRedis(tmp_path / "redis") as server:
        url = server.url
        worker = WorkerProcess(worker_env(url, tmp_path / "home", models, GRISTMILL_MAX_WAIT_MS="50"),
                               tmp_path / "worker.log").wait_ready(url)
        try:
            client = Client(Settings(redis_url=url, home=tmp_path / "home", models_file=models, builtin_models=False,
                                     chunk_size=4))
            rows = [moderation(f"m{i}", t, model="tiny-cascade") for i, t in enumerate(texts)]
            b = client.wait(client.submit_file(write_jsonl(tmp_path / "in.jsonl", rows)).id, timeout=180)
            outs, errs = read_results(client, b.id, tmp_path)
            stats = make_app(Settings(redis_url=url), url).control.broadcast("gristmill_stats", reply=True, timeout=10)
            client.close()
        finally:
            worker.stop()
    assert not errs and len(outs) == len(texts)
    by_line = {int(o["custom_id"][1:]): o for o in outs}
    decided = [by_line[i]["provenance"]["decided_by"] for i in range(len(texts))]
    escalated = decided.count("full")
    assert 0 < escalated < len(texts), decided
    assert (b.cascade.inputs, b.cascade.escalated, b.cascade.to_full) == (len(texts), escalated, escalated)
    from gristmill.producers.cli import _details
    assert f"{escalated} of {len(texts)} classifier inputs escalated past the student" in _details(b)
    assert "middle stage" not in _details(b)  # two stages: the full model decided every escalated input
    for i, who in enumerate(decided):
        scores = by_line[i]["response"]["body"]["results"][0]["category_scores"]
        expected = full[i] if who == "full" else student[i]
        assert scores == pytest.approx(expected, abs=1e-3), (i, who)
    (reply,) = [next(iter(r.values())) for r in stats]
    keys = reply["batcher"]["by_key"]
    assert keys["tiny-cascade"]["items"] == len(texts)
    assert keys["tiny-cascade/escalated"]["items"] == escalated
    stages = reply["engines"]["tiny-cascade"]["stages"]
    assert stages["student"]["dtype"] == "onnx" and stages["full"]["device"] == "cpu"
