"""The real default models (SmolLM2-135M-Instruct, all-MiniLM-L6-v2) through a real worker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from openai.types import ModerationCreateResponse
from openai.types.chat import ChatCompletion

from gristmill.producers import constants as C
from gristmill.producers.client import Client
from gristmill.producers.policy import DEFAULT_POLICY_FILE, load_policy
from gristmill.producers.registry import MODERATION_CATEGORIES
from gristmill.producers.settings import Settings

from .conftest import ROOT, WorkerProcess, clean, worker_env
from .helpers import chat, moderation, read_results, write_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_home() -> Path:
    # The converted GGUF is cached here between local runs (~25 s to convert, 0.3 s to reload).
    h = Path(os.environ.get("GRISTMILL_TEST_HOME", ROOT / ".state" / "test-home"))
    h.mkdir(parents=True, exist_ok=True)
    return h


def test_default_models_answer_sensibly(redis_url, real_home, tmp_path):
    # its own database: the session's tiny-model worker must not take these lines
    redis_url = redis_url.rsplit("/", 1)[0] + "/5"
    clean(redis_url)
    w = WorkerProcess(worker_env(redis_url, real_home, None), tmp_path / "real.log").wait_ready(redis_url, timeout=300)
    try:
        c = Client(Settings(redis_url=redis_url, home=real_home, chunk_size=2))
        rows = [chat("capital", "What is the capital of France?", max_tokens=24),
                chat("stop", "What is the capital of France?", max_tokens=24, stop=[" is"]),
                moderation("threat", "I will find you and kill you."),
                moderation("benign", "Thank you for the lovely dinner last night."),
                moderation("pair", ["I am going to kill myself tonight.", "The report is due on Friday."])]
        b = c.wait(c.submit_file(write_jsonl(tmp_path / "in.jsonl", rows)).id, timeout=300)
        assert b.status == C.COMPLETED and b.request_counts.completed == len(rows)
        outs, errs = read_results(c, b.id, tmp_path)
        assert not errs
        by = {o["custom_id"]: o for o in outs}
        cap = ChatCompletion.model_validate(by["capital"]["response"]["body"])
        assert "Paris" in cap.choices[0].message.content
        assert cap.model == "SmolLM2-135M-Instruct"
        stop = ChatCompletion.model_validate(by["stop"]["response"]["body"]).choices[0]
        assert stop.finish_reason == "stop" and " is" not in stop.message.content
        assert cap.choices[0].message.content.startswith(stop.message.content)

        threat = ModerationCreateResponse.model_validate(by["threat"]["response"]["body"]).results[0]
        benign = ModerationCreateResponse.model_validate(by["benign"]["response"]["body"]).results[0]
        assert threat.flagged and not benign.flagged
        assert threat.category_scores.harassment_threatening > 0.5 > benign.category_scores.harassment_threatening
        pair = ModerationCreateResponse.model_validate(by["pair"]["response"]["body"]).results
        assert pair[0].categories.self_harm_intent and not pair[1].flagged
        prov = by["threat"]["provenance"]
        assert prov["model"] == "all-MiniLM-L6-v2-moderation" and prov["engine_variant"] in ("torch-float32-cpu", "torch-bf16-autocast-cpu")
        shipped = load_policy(DEFAULT_POLICY_FILE)
        assert prov["policy_version"] == shipped.policy_version == by["threat"]["response"]["body"]["results"][0]["policy_version"]
        assert prov["thresholds_digest"] == shipped.thresholds_digest
        c.close()
    finally:
        w.stop()


def test_the_default_head_builds_from_the_seed_set_the_same_way_twice(tmp_path):
    """The default classifier's head is trained from kernels/moderation/seed.jsonl at first load:
    two builds give the same tensors and name, and the head separates the examples it learned."""
    import torch

    from gristmill.kernels import heads
    from gristmill.producers.registry import DEFAULT_CLASSIFIER
    enc, seed = DEFAULT_CLASSIFIER.resolve_path(), DEFAULT_CLASSIFIER.resolve_head()
    a = heads.ensure_head(enc, seed, tmp_path / "a")
    b = heads.ensure_head(enc, seed, tmp_path / "b")
    assert a.name == b.name and heads.ensure_head(enc, seed, tmp_path / "a") == a  # cached
    wa, ba, labels, meta = heads.load_head(a)
    wb, bb, _, _ = heads.load_head(b)
    assert torch.equal(wa, wb) and torch.equal(ba, bb)
    assert set(labels) == set(MODERATION_CATEGORIES) and meta["source_digest"] in a.name
    examples = heads.load_seed()
    probs = torch.sigmoid(heads.embed([e.text for e in examples], enc) @ wa.T + ba)
    assert float(((probs >= 0.5) == (heads.targets_of(examples, labels) == 1)).float().mean()) > 0.95
