"""Moderation policies, the score cache's packing, review bands and the trained-head engine (no Redis)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
from openai.types import ModerationCreateResponse

from gristmill.kernels import heads
from gristmill.producers import constants as C
from gristmill.producers.errors import ConfigurationError
from gristmill.producers.policy import DEFAULT_POLICY_FILE, Policy, load_policy, model_policy
from gristmill.producers.registry import MODERATION_CATEGORIES
from gristmill.producers.review import ReviewError, band_rows, parse_band
from gristmill.producers.schemas import LineError, moderation_body, validate_line
from gristmill.workers import dedup


def test_shipped_policy_loads_and_covers_every_category():
    p = load_policy(DEFAULT_POLICY_FILE)
    assert set(p.labels) == set(MODERATION_CATEGORIES)
    assert p.threshold("sexual/minors") == 0.3 and p.threshold("hate") == p.default_threshold == 0.5
    assert len(p.thresholds_digest) == 16


def test_thresholds_digest_follows_thresholds_only():
    a = Policy(policy_version="v1", model="m", thresholds={"hate": 0.4})
    assert a.thresholds_digest == Policy(policy_version="v2", model="other", thresholds={"hate": 0.4}).thresholds_digest
    assert a.thresholds_digest != Policy(policy_version="v1", model="m", thresholds={"hate": 0.41}).thresholds_digest
    # the same effective thresholds written two ways digest the same
    assert Policy(policy_version="v", model="m", default_threshold=0.4).thresholds_digest == \
        Policy(policy_version="v", model="m", thresholds=dict.fromkeys(MODERATION_CATEGORIES, 0.4)).thresholds_digest


def test_cached_thresholds_follow_copies_and_resist_callers():
    a = Policy(policy_version="v1", model="m", thresholds={"hate": 0.4})
    digest, resolved = a.thresholds_digest, a.resolved_thresholds()  # both cached now
    resolved["hate"] = 0.9  # a caller editing its copy changes nothing
    assert a.resolved_thresholds()["hate"] == 0.4 and a.thresholds_digest == digest
    b = a.model_copy(update={"thresholds": {"hate": 0.3}})
    assert b.resolved_thresholds()["hate"] == 0.3 and b.thresholds_digest != digest
    assert b.thresholds_digest == Policy(policy_version="v1", model="m", thresholds={"hate": 0.3}).thresholds_digest
    assert a.model_copy(update={"model": "n"}).thresholds_digest == digest
    assert "thresholds_digest" not in a.model_dump() and Policy.model_validate(a.wire()) == a


def test_apply_takes_the_highest_source_score():
    p = Policy(policy_version="v", model="m", labels=("hate", "violence"),
               label_map={"toxic": "hate", "insult": "hate"})
    sources = p.sources(["toxic", "insult", "violence"])
    assert p.apply({"toxic": 0.2, "insult": 0.7, "violence": 0.1}, sources) == {"hate": 0.7, "violence": 0.1}


@pytest.mark.parametrize("body,needle", [
    ({"model": "m"}, "policy_version"),
    ({"policy_version": "v", "model": "m", "thresholds": {"hatred": 0.5}}, "hatred"),
    ({"policy_version": "v", "model": "m", "thresholds": {"hate": 1.5}}, "thresholds"),
    ({"policy_version": "v", "model": "m", "label_map": {"toxic": "rude"}}, "rude"),
    ({"policy_version": "v", "model": "m", "labels": []}, "labels"),
    ({"policy_version": "v", "model": "m", "colour": "red"}, "colour"),
])
def test_bad_policies_name_the_field(tmp_path, body, needle):
    f = tmp_path / "p.json"
    f.write_text(json.dumps(body))
    with pytest.raises(ConfigurationError, match=needle):
        load_policy(f)


def test_policy_files_in_yaml_and_unreadable_ones(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("policy_version: team-7\nmodel: m\nlabels: [toxic, spam]\nthresholds:\n  spam: 0.9\n")
    p = load_policy(f)
    assert p.labels == ("toxic", "spam") and p.threshold("spam") == 0.9
    f.write_text("policy_version: [unclosed\n")
    with pytest.raises(ConfigurationError, match="not valid YAML"):
        load_policy(f)
    with pytest.raises(ConfigurationError, match="cannot read"):
        load_policy(tmp_path / "missing.yaml")


def test_label_map_feeds_policy_labels_and_missing_sources_are_named():
    p = Policy(policy_version="v", model="toxic-bert", labels=("harassment", "hate"),
               label_map={"insult": "harassment", "threat": "harassment", "identity_hate": "hate"})
    src = p.sources(["insult", "threat", "identity_hate", "obscene"])
    assert src == {"harassment": ["insult", "threat"], "hate": ["identity_hate"]}
    assert p.apply({"insult": 0.2, "threat": 0.7, "identity_hate": 0.1, "obscene": 0.9}, src) == \
        {"harassment": 0.7, "hate": 0.1}
    with pytest.raises(ValueError, match=r"feeds \['hate'\]"):
        p.sources(["insult"])


def test_moderation_body_flags_from_the_policy_and_parses_with_openai():
    p = Policy(policy_version="v9", model="m", labels=("hate", "violence"), thresholds={"hate": 0.2})
    body = moderation_body("m", [{"hate": 0.25, "violence": 0.45}], p.resolved_thresholds(), p.policy_version)
    r = ModerationCreateResponse.model_validate(body).results[0]
    assert r.categories.hate and not r.categories.violence and r.flagged
    # categories the policy does not score are present, 0 and unflagged
    assert r.category_scores.sexual == 0.0 and not r.categories.sexual
    assert body["results"][0]["policy_version"] == "v9"


def test_model_policy_keeps_registered_thresholds_for_known_labels(tiny_settings):
    spec = tiny_settings.registry.get("tiny-classifier")
    p = model_policy(spec, ["positive", "negative", "neutral"])
    assert p.policy_version == "tiny-policy-7" and p.threshold("negative") == 0.2 and p.threshold("positive") == 0.5


def test_moderation_lines_run_the_policy_model(tiny_settings):
    reg = tiny_settings.registry
    pol = Policy(policy_version="v", model="tiny-classifier", labels=("positive", "negative"))

    def line(**body):
        return json.dumps({"custom_id": "x", "url": C.MODERATIONS_URL, "body": {"input": "hi", **body}})
    assert validate_line(line(), 1, reg, pol).model == "tiny-classifier"
    assert validate_line(line(model="omni-moderation-latest"), 1, reg, pol).model == "tiny-classifier"
    err = validate_line(line(model="tiny-moderation"), 4, reg, pol)
    assert isinstance(err, LineError) and err.code == C.E_INVALID_BODY and "body.model" in err.message
    assert validate_line(line(), 1, reg, None).model == "tiny-moderation"  # no policy: the url's default


def test_settings_policy_checks_the_model(tiny_settings, tmp_path):
    assert tiny_settings.policy() is None  # the shipped policy's model is not registered here
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"policy_version": "v", "model": "nope"}))
    with pytest.raises(ConfigurationError, match="model"):
        tiny_settings.policy(f)
    f.write_text(json.dumps({"policy_version": "v", "model": "tiny-moderation"}))
    assert tiny_settings.policy(f).model == "tiny-moderation"


@pytest.mark.parametrize("model,labels,label_map,ok", [
    ("tiny-moderation", ["harassment", "nosuch"], {}, False),    # zero-shot: labels from its prototypes
    ("tiny-classifier", ["harassment"], {}, False),              # sequence classifier: from config.json
    ("tiny-classifier", ["harassment"], {"negative": "harassment"}, True),
])
def test_settings_policy_checks_labels_the_model_can_feed_at_submit(tiny_settings, tmp_path, model, labels,
                                                                    label_map, ok):
    # these used to pass at submit and fail every moderation line in the worker
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"policy_version": "v", "model": model, "labels": labels, "label_map": label_map}))
    if ok:
        assert tiny_settings.policy(f).labels == tuple(labels)
    else:
        with pytest.raises(ConfigurationError, match=r"labels: .*feeds \['(nosuch|harassment)'\]"):
            tiny_settings.policy(f)


def test_labels_known_without_loading_the_model(tiny_settings):
    specs = tiny_settings.registry.specs
    assert specs["tiny-classifier"].known_labels() == ["positive", "negative", "neutral"]
    assert specs["tiny-moderation"].known_labels() == list(specs["tiny-moderation"].prototypes)
    assert specs["tiny-chat"].known_labels() is None


def test_score_packing_is_exact_for_float32():
    labels = ["a", "b", "c"]
    s = {"a": 0.1, "b": 0.5, "c": 1e-7}
    c = dedup.canonical(s, labels)
    assert dedup.unpack(dedup.pack(c, labels), labels) == c
    assert all(abs(c[k] - s[k]) < 1e-7 for k in labels)
    with pytest.raises(ValueError):
        dedup.unpack(dedup.pack(s, labels), labels[:2])
    assert dedup.model_key("m", "r", "v", labels) != dedup.model_key("m", "r", "v2", labels)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(width=64) | st.floats(width=32) | st.integers(-2**40, 2**40), min_size=1, max_size=20))
def test_score_packing_is_numpys_float32(values):
    import base64

    import numpy as np
    labels = [f"l{i}" for i in range(len(values))]
    with np.errstate(over="ignore"):
        want = np.asarray(values, dtype="<f4")
    packed = dedup.pack(dict(zip(labels, values)), labels)
    # numpy's float32 values, overflow to inf included (NaN payloads aside)
    assert np.array_equal(np.frombuffer(base64.b64decode(packed), dtype="<f4"), want, equal_nan=True)
    got = dedup.unpack(packed, labels)
    assert np.array_equal(np.asarray(list(got.values()), dtype=np.float64), want.astype(np.float64), equal_nan=True)
    assert all(type(v) is float for v in got.values())


@pytest.mark.parametrize("band", ["0.3", "a:b", "0.8:0.2", "-1:0.5", "0.5:1.5"])
def test_bad_review_bands_are_refused(band):
    with pytest.raises(ReviewError):
        parse_band(band)


def test_band_rows_pick_labels_inside_the_band():
    mod = {"custom_id": "m", "provenance": {"input_sha256": ["s0", "s1"]}, "response": {"body": {"results": [
        {"categories": {"hate": True, "sexual": False}, "category_scores": {"hate": 0.6, "sexual": 0.1},
         "policy_version": "v"},
        {"categories": {"hate": False, "sexual": False}, "category_scores": {"hate": 0.35, "sexual": 0.9},
         "policy_version": "v"}]}}}
    clf = {"custom_id": "k", "provenance": {"input_sha256": "s"}, "response": {"body": {"results": [
        {"scores": {"pos": 0.5, "neg": 0.5}, "flagged_labels": ["neg"], "policy_version": "w"}]}}}
    gen = {"custom_id": "g", "response": {"body": {"choices": []}}}
    rows = band_rows([json.dumps(x) for x in (mod, clf, gen)], 0.3, 0.6)
    got = sorted((r["custom_id"], r["input_index"], r["label"], r["flagged"], r["input_sha256"])
                 for v in rows.values() for r in v)
    assert got == [("k", 0, "neg", True, "s"), ("k", 0, "pos", False, "s"),
                   ("m", 0, "hate", True, "s0"), ("m", 1, "hate", False, "s1")]


def test_seed_set_labels_imply_parents_and_folds_hold_every_label():
    ex = heads.load_seed()
    assert len(ex) >= 300
    threat = next(e for e in ex if e.primary == "harassment/threatening")
    assert {"harassment", "violence"} <= threat.labels
    fold = heads.folds(ex)
    for f in range(heads.FOLDS):
        assert {e.primary for e, k in zip(ex, fold) if k == f} == {e.primary for e in ex}


def test_fit_separates_separable_data():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(200, 16, generator=g), dim=-1)
    y = torch.stack([(x[:, 0] > 0).float(), (x[:, 1] > 0.3).float()], dim=1)
    w, b = heads.fit(x, y)
    assert float(((torch.sigmoid(x @ w.T + b) >= 0.5) == (y == 1)).float().mean()) > 0.95


def test_head_engine_scores_are_the_head_over_pooled_embeddings(weights, tmp_path):
    from gristmill.kernels.classify import ClassifierEngine
    enc = ClassifierEngine(weights / "encoder", max_length=32, pooled=True, cpu_precision="fp32")
    w, b = torch.randn(3, enc.config.hidden_size), torch.randn(3)
    heads.save_head(tmp_path / "h.safetensors", w, b, ["x", "y", "z"], {})
    eng = ClassifierEngine(weights / "encoder", max_length=32, head=tmp_path / "h.safetensors", cpu_precision="fp32")
    ids = eng.encode(["hello there", "a longer sentence with more words in it"])
    got = eng.run(ids)
    want = torch.sigmoid(enc.embed(ids) @ w.T + b)
    assert [list(r) for r in got] == [["x", "y", "z"]] * 2
    assert torch.allclose(torch.tensor([list(r.values()) for r in got]), want, atol=1e-5)
    assert "+" in eng.revision  # encoder weights + head digest
    with pytest.raises(ValueError, match="expects"):
        heads.save_head(tmp_path / "bad.safetensors", torch.randn(3, 7), b, ["x", "y", "z"], {})
        ClassifierEngine(weights / "encoder", max_length=32, head=tmp_path / "bad.safetensors")


@pytest.mark.parametrize("labels,label_map,model_labels", [
    (("hate", "violence"), {"toxic": "hate", "insult": "hate"}, ["toxic", "insult", "violence"]),  # max of two
    (("hate", "violence"), {}, ["violence", "hate", "spam"]),  # one source each, in another order
    (("hate",), {"toxic": "hate"}, ["toxic", "other"]),  # a single label
])
def test_applier_is_apply_with_its_sources_bound(labels, label_map, model_labels):
    import random
    p = Policy(policy_version="v", model="m", labels=labels, label_map=label_map)
    sources = p.sources(model_labels)
    apply = p.applier(sources)
    rng = random.Random(0)
    for _ in range(50):
        scores = {m: rng.random() for m in model_labels}
        got = apply(scores)
        assert got == p.apply(scores, sources) and list(got) == list(labels)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(MODERATION_CATEGORIES + ("extra",)), st.floats(0, 1), min_size=1),
       st.dictionaries(st.sampled_from(MODERATION_CATEGORIES + ("unscored",)), st.floats(0, 1)))
def test_moderation_body_is_its_definition(scores, thresholds):
    # every OpenAI category is reported (0 and unflagged where unscored); a category is flagged
    # where its score reaches its threshold; the line is flagged where any category is
    (r,) = moderation_body("m", [scores], thresholds, "v")["results"]
    full = {**dict.fromkeys(MODERATION_CATEGORIES, 0.0), **scores}
    want = {k: k in thresholds and v >= thresholds[k] for k, v in full.items()}
    assert r["categories"] == want and r["flagged"] == any(want.values())
    assert r["category_scores"] == full and list(r["category_scores"]) == list(full)
    assert r["category_applied_input_types"] == {k: ["text"] for k in full} and r["policy_version"] == "v"


def test_a_policy_object_is_checked_as_a_policy_file_is(tiny_settings):
    # Client.submit_file(policy=Policy(...)) goes through the same checks as --policy FILE
    from gristmill.producers.policy import Policy
    from gristmill.producers.settings import PolicyModelNotFound
    ok = tiny_settings.checked_policy(Policy(policy_version="v", model="tiny-moderation", labels=("harassment",)))
    assert ok.model == "tiny-moderation"
    with pytest.raises(ConfigurationError, match=r"labels: .*feeds \['nosuch'\]"):
        tiny_settings.checked_policy(Policy(policy_version="v", model="tiny-moderation", labels=("nosuch",)))
    with pytest.raises(PolicyModelNotFound, match="nope"):
        tiny_settings.checked_policy(Policy(policy_version="v", model="nope"))
