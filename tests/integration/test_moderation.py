"""Moderation batches end to end: a policy per batch, provenance, dedup across batches, review export."""

from __future__ import annotations

import csv
import hashlib
import json

import pytest

from gristmill.producers import constants as C
from gristmill.producers.review import ReviewError, write_review

from .conftest import ROOT, worker_env
from .helpers import moderation, read_results, write_jsonl
from .test_cli_and_up import run


@pytest.fixture
def policy_file(tmp_path):
    f = tmp_path / "team.yaml"
    # tiny-moderation's scores sit near 0.5 (random weights): 0 and 1 make flags certain
    f.write_text("policy_version: team-2026-11-b\nmodel: tiny-moderation\n"
                 "default_threshold: 1.0\nthresholds:\n  hate: 0.0\n")
    return f


def test_batch_policy_decides_flags_and_provenance(client, tmp_path, policy_file):
    rows = [moderation("a", "you people are vermin"), moderation("b", ["first", "second"]),
            moderation("openai-name", "hello", model="omni-moderation-latest"),
            moderation("other-model", "hello", model="tiny-classifier")]
    b = client.wait(client.submit_file(write_jsonl(tmp_path / "in.jsonl", rows), policy=policy_file).id, timeout=120)
    assert b.policy["policy_version"] == "team-2026-11-b" and b.policy["model"] == "tiny-moderation"
    outs, errs = read_results(client, b.id, tmp_path)
    assert [(e["custom_id"], e["error"]["code"], e["error"]["line"]) for e in errs] == [("other-model", C.E_INVALID_BODY, 4)]
    assert "body.model" in errs[0]["error"]["message"]
    digest = b.policy["thresholds_digest"]
    for o in outs:
        prov = o["provenance"]
        assert (prov["model"], prov["policy_version"], prov["thresholds_digest"]) == ("tiny-moderation", "team-2026-11-b", digest)
        for r in o["response"]["body"]["results"]:
            assert r["policy_version"] == "team-2026-11-b"
            assert r["categories"]["hate"] and r["flagged"]
            assert not any(v for k, v in r["categories"].items() if k != "hate")
    by = {o["custom_id"]: o for o in outs}
    assert by["b"]["provenance"]["input_sha256"] == [hashlib.sha256(t.encode()).hexdigest() for t in ("first", "second")]

    # without a policy the shipped default applies; its model is not registered in this test
    # registry, so the url's default model runs under its registered thresholds
    b2 = client.wait(client.submit_file(write_jsonl(tmp_path / "in2.jsonl", rows[:1])).id, timeout=120)
    out2, _ = read_results(client, b2.id, tmp_path)
    assert out2[0]["provenance"]["policy_version"] == "tiny-mod-3" and b2.policy is None


def test_repeated_inputs_run_once_and_score_identically_across_batches(client, tmp_path):
    texts = ["spam spam spam", "a kind word", "spam spam spam", "another text"]
    rows = [moderation(f"r{i}", t) for i, t in enumerate(texts * 3)] + [moderation("list", texts)]
    f = write_jsonl(tmp_path / "rep.jsonl", rows)
    b1 = client.wait(client.submit_file(f).id, timeout=120)
    inputs = len(texts) * 3 + len(texts)
    assert b1.dedup.inputs == inputs
    # 3 distinct texts: whatever the chunking, everything else was reused
    assert b1.dedup.reused == inputs - 3, b1.dedup
    b2 = client.wait(client.submit_file(f).id, timeout=120)
    assert b2.dedup.reused == b2.dedup.inputs == inputs  # all from the cache
    scores: dict[str, set] = {}
    for b in (b1, b2):
        outs, _ = read_results(client, b.id, tmp_path)
        for o in outs:
            shas = o["provenance"]["input_sha256"]
            for sha, r in zip(shas if isinstance(shas, list) else [shas], o["response"]["body"]["results"]):
                scores.setdefault(sha, set()).add(json.dumps(r["category_scores"], sort_keys=True))
    assert len(scores) == 3 and all(len(v) == 1 for v in scores.values())
    # sharing the queues' server, which evicts nothing, entries expire after DEDUP_TTL_S
    import redis as redis_lib
    r = redis_lib.Redis.from_url(client.redis_url)
    ttls = {r.ttl(k) for k in r.keys(f"{C.PREFIX}:dedup:*")}
    assert ttls and all(0 < t <= client.settings.dedup_ttl_s for t in ttls)

    env = worker_env(client.redis_url, client.settings.home, client.settings.models_file)
    out = run(env, "status", b2.id).stdout
    assert f"{inputs} of {inputs} classifier inputs reused (100.0% hit rate)" in out


def test_review_export_joins_texts_in_input_order(client, tmp_path, policy_file):
    # a custom_id holding a line separator that JSON writes raw (U+2028): lines split on "\n" only
    rows = [moderation("a", "first text"), moderation("b\u2028c", ["second text", "third text"])]
    f = write_jsonl(tmp_path / "rev.jsonl", rows)
    b = client.wait(client.submit_file(f, policy=policy_file).id, timeout=120)
    out = tmp_path / "review.csv"
    n, joined = write_review(client, b.id, "0:1", out)
    got = list(csv.DictReader(open(out)))
    assert joined and n == len(got) == 3 * 13  # every label of every input lies in [0, 1]
    assert [r["custom_id"] for r in got[::13]] == ["a", "b\u2028c", "b\u2028c"]
    assert [r["text"] for r in got[::13]] == ["first text", "second text", "third text"]
    assert {r["policy_version"] for r in got} == {"team-2026-11-b"}
    assert all(r["flagged"] == str(r["label"] == "hate") for r in got)
    # the CLI, with a narrow band and text prefixes
    env = worker_env(client.redis_url, client.settings.home, client.settings.models_file)
    p = run(env, "review", b.id, "--band", "0:0.000001", "-o", str(tmp_path / "none.csv"))
    assert p.stdout.startswith("0 rows")
    # a changed input file is refused, and --input can point at the original
    f.write_text(f.read_text() + "\n")
    with pytest.raises(ReviewError, match="changed"):
        write_review(client, b.id, "0:1", out)
    assert ROOT.exists()
