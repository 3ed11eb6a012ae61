"""Structured pruning, ONNX export / fusion / int8, the ONNX engine and the agreement report, on
tiny random BERTs (the real weights are checked by benchmarks/engine_variants.py)."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from gristmill.kernels import texts as builtin  # noqa: E402
from gristmill.kernels.classify import ClassifierEngine  # noqa: E402
from gristmill.kernels.onnx_engine import OnnxClassifierEngine, read_manifest  # noqa: E402
from gristmill.kernels.optimize import agreement, artifact_digest, build_artifact  # noqa: E402
from gristmill.kernels.prune import prune  # noqa: E402
from gristmill.producers.registry import DEFAULT_PROTOTYPES  # noqa: E402

TEXTS = ["hello world", "the quick brown fox jumps over the lazy dog", "i will hurt you", "a", "ok then " * 20]


def _batches(eng, texts):
    ids, mask = eng._pad(eng.encode(texts))
    return [(ids, mask)]


def test_prune_removes_heads_and_neurons_physically_and_still_runs(weights):
    from transformers import AutoModel
    model = AutoModel.from_pretrained(str(weights / "encoder"), attn_implementation="eager").eval()
    eng = ClassifierEngine(weights / "encoder", max_length=32, prototypes=DEFAULT_PROTOTYPES, neutral=["ok"])
    report = prune(model, _batches(eng, builtin.sentences(16)), 0.5, head_fraction=0.5)
    assert (report.heads_before, report.heads_after) == (4, 2)
    assert (report.ffn_before, report.ffn_after) == (128, 64)
    assert report.params_after < report.params_before
    assert sum(p.numel() for p in model.parameters()) == report.params_after
    ids, mask = _batches(eng, TEXTS)[0]
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert out.shape == (len(TEXTS), ids.shape[1], 32) and torch.isfinite(out).all()


def test_prune_keeps_the_most_important_neurons(weights):
    from transformers import AutoModel
    model = AutoModel.from_pretrained(str(weights / "encoder"), attn_implementation="eager").eval()
    layer = model.encoder.layer[0]
    with torch.no_grad():  # make neuron 5 dominant: it must survive a 90% cut
        layer.output.dense.weight[:, 5] *= 100
    kept = layer.intermediate.dense.weight[5].clone()
    eng = ClassifierEngine(weights / "encoder", max_length=32, prototypes=DEFAULT_PROTOTYPES, neutral=["ok"])
    prune(model, _batches(eng, builtin.sentences(16)), 0.9)
    assert any(torch.equal(row, kept) for row in model.encoder.layer[0].intermediate.dense.weight)


def test_distillation_brings_a_pruned_model_back_towards_the_original(weights):
    import copy

    from gristmill.kernels.prune import distill
    from transformers import AutoModel
    teacher = AutoModel.from_pretrained(str(weights / "encoder"), attn_implementation="eager").eval()
    student = copy.deepcopy(teacher)
    eng = ClassifierEngine(weights / "encoder", max_length=32, prototypes=DEFAULT_PROTOTYPES, neutral=["ok"])
    batches = _batches(eng, builtin.sentences(32))
    prune(student, batches, 0.75, head_fraction=0.5)
    losses = distill(student, teacher, batches, steps=200, lr=2e-3)
    assert losses[-1] < 0.75 * losses[0], losses
    assert not student.training


def test_the_command_offers_every_quantization_the_artifacts_build():
    from gristmill.kernels.optimize import ONNX_QUANTIZE, TORCH_QUANTIZE
    from gristmill.workers.optimize import QUANTIZE_CHOICES
    assert set(QUANTIZE_CHOICES) == {*ONNX_QUANTIZE, *TORCH_QUANTIZE, "none"}


def test_prune_rejects_a_bad_fraction(weights):
    from transformers import AutoModel
    model = AutoModel.from_pretrained(str(weights / "encoder"))
    with pytest.raises(ValueError, match="fraction"):
        prune(model, [], 1.0)


@pytest.mark.parametrize("zero_shot", [True, False])
def test_onnx_fp32_artifact_matches_torch_and_int8_stays_close(weights, tmp_path, zero_shot):
    name = "encoder" if zero_shot else "classifier"
    kw = dict(max_length=32, prototypes=DEFAULT_PROTOTYPES, neutral=["ok"]) if zero_shot else dict(max_length=32)
    ref = ClassifierEngine(weights / name, cpu_precision="fp32", **kw).run(
        ClassifierEngine(weights / name, cpu_precision="fp32", **kw).encode(TEXTS))
    for quantize, tol in [(None, 1e-4), ("int8", 0.2), ("int8-tensor", 0.2)]:
        out = tmp_path / f"{name}-{quantize}"
        m = build_artifact(weights / name, out, zero_shot=zero_shot, quantize=quantize, max_length=32)
        assert read_manifest(out)["digest"] == m["digest"]
        eng = OnnxClassifierEngine(out, **kw)
        assert eng.variant == f"ort-{quantize or 'fp32'}-cpu" and eng.labels == list(ref[0])
        got = eng.run(eng.encode(TEXTS))
        assert max(abs(a[k] - b[k]) for a, b in zip(ref, got) for k in a) < tol
        # its threads sleep when a run ends, leaving the cores to whatever the process runs next
        assert eng.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


@pytest.mark.parametrize("mode", ["head", "prototypes", "logits"])
def test_onnx_engine_numpy_scoring_equals_the_torch_scoring_around_the_same_session(weights, tmp_path, mode):
    """The ONNX engine pools and scores in numpy (torch's spinning threads slow ONNX Runtime down);
    the scores must be the ones the torch code computes from the same session outputs."""
    from gristmill.kernels.heads import save_head
    name = "classifier" if mode == "logits" else "encoder"
    kw: dict = {"max_length": 32}
    if mode == "prototypes":
        kw.update(prototypes=DEFAULT_PROTOTYPES, neutral=["ok"])
    if mode == "head":
        torch.manual_seed(0)
        save_head(tmp_path / "h.safetensors", torch.randn(3, 32) * 4, torch.randn(3), ["a", "b/c", "d"], {})
        kw.update(head=tmp_path / "h.safetensors")
    build_artifact(weights / name, tmp_path / "art", zero_shot=mode != "logits", quantize=None, max_length=32)
    eng = OnnxClassifierEngine(tmp_path / "art", **kw)
    ids = eng.encode(TEXTS)
    ours = eng.run(ids)
    theirs = ClassifierEngine.run(eng, ids)  # the base class's torch scoring over eng's _forward / embed
    assert [list(r) for r in ours] == [list(r) for r in theirs] == [eng.labels] * len(TEXTS)
    assert max(abs(a[k] - b[k]) for a, b in zip(ours, theirs) for k in a) < 1e-6
    # float32 values, the score cache's precision: a computed line and a cached one print the same
    assert all(float(np.float32(v)) == v for rows in (ours, theirs) for r in rows for v in r.values())
    if mode != "logits":  # and the numpy pooling is the torch pooling
        assert torch.allclose(eng.embed(ids), ClassifierEngine.embed(eng, ids), atol=1e-6)
    assert len({round(r[eng.labels[0]], 4) for r in ours}) > 1  # the texts score differently
    assert eng.run([]) == []


def test_artifact_kind_must_match_the_registration(weights, tmp_path):
    build_artifact(weights / "classifier", tmp_path / "a", zero_shot=False, quantize=None, max_length=32)
    with pytest.raises(ValueError, match="sequence"):
        OnnxClassifierEngine(tmp_path / "a", max_length=32, prototypes=DEFAULT_PROTOTYPES, neutral=["ok"])


def test_digest_names_what_shapes_the_artifact(weights):
    d = dict(zero_shot=True, quantize="int8", prune=0.0, calibration=[], max_length=32)
    base = artifact_digest(weights / "encoder", **d)
    assert base == artifact_digest(weights / "encoder", **d)
    assert base != artifact_digest(weights / "encoder", **{**d, "quantize": None})
    assert base != artifact_digest(weights / "encoder", **{**d, "quantize": "int8-tensor"})
    assert base != artifact_digest(weights / "encoder", **{**d, "prune": 0.3, "calibration": ["x"]})


def test_agreement_report():
    th = {"a": 0.5, "b": 0.5}
    ref = [{"a": 0.9, "b": 0.1}, {"a": 0.2, "b": 0.3}]
    new = [{"a": 0.8, "b": 0.1}, {"a": 0.4, "b": 0.3}]
    assert agreement(ref, new, th) == {"top_label": 0.5, "flags": 1.0, "texts_identical": 1.0,
                                       "max_score_delta": 0.2, "mean_score_delta": 0.075,
                                       "top_label_changes": 1, "near_ties": 0}
    # one flag of four differs: flags 0.75, and one text of two no longer identical
    flipped = agreement(ref, [{"a": 0.8, "b": 0.1}, {"a": 0.6, "b": 0.3}], th)
    assert (flipped["flags"], flipped["texts_identical"]) == (0.75, 0.5)
    ref.append({"a": 0.31, "b": 0.3})  # a change between scores 0.01 apart is a near-tie
    assert agreement(ref, [*new, {"a": 0.30, "b": 0.31}], th)["near_ties"] == 1
    with pytest.raises(ValueError):
        agreement(ref, new[:1], th)


def test_a_registered_artifact_runs_in_the_host_and_names_its_variant(weights, tmp_path):
    import gc

    from gristmill.producers import schemas as S
    from gristmill.producers.settings import Settings
    from gristmill.workers.host import EngineHost
    build_artifact(weights / "classifier", tmp_path / "art", zero_shot=False, quantize="int8", max_length=32)
    mf = tmp_path / "models.json"
    mf.write_text(json.dumps([{"name": "tiny-int8", "kind": "sequence_classifier", "path": str(tmp_path / "art"),
                               "max_input_tokens": 32}]))
    host = EngineHost(Settings(models_file=mf, builtin_models=False, home=tmp_path / "home"))
    gc.unfreeze()
    item = S.WorkItem(1, "c1", "/v1/classifications", "tiny-int8", {"input": "hello"}, "0" * 64)
    (prep,) = host.prepare([item])
    assert gc.get_freeze_count() > 0, "loading an engine moves the heap out of the collector's reach"
    line = host.format(item, host.run("tiny-int8", prep.payloads))
    assert line["provenance"]["engine_variant"] == "ort-int8-cpu"
    assert set(line["response"]["body"]["results"][0]["scores"]) == {"positive", "negative", "neutral"}
    host.shutdown()
    assert gc.get_freeze_count() == 0


def test_optimize_command_refuses_under_the_floor_then_forces_then_reuses(tiny_models_file, tmp_path):
    import json
    import os
    import subprocess
    from tests.commands import GRISTMILL, ROOT as root
    env = {**os.environ, "GRISTMILL_MODELS_FILE": str(tiny_models_file), "GRISTMILL_BUILTIN_MODELS": "false",
           "GRISTMILL_HOME": str(tmp_path / "home")}
    out = tmp_path / "art"

    def optimize(*extra):
        return subprocess.run([*GRISTMILL, "optimize", "tiny-moderation", "--out", str(out),
                               "--prune", "0.5", *extra], env=env, cwd=root, capture_output=True, text=True, timeout=300)

    refused = optimize("--min-flags", "1.01")
    assert refused.returncode == 3, refused.stderr
    assert "under the floor" in refused.stderr and not out.exists()
    forced = optimize("--min-flags", "1.01", "--force")
    assert forced.returncode == 0, forced.stderr
    manifest = json.loads((out / "gristmill-artifact.json").read_text())
    assert manifest["variant"] == "ort-int8-pruned50" and manifest["pruned"]["ffn_after"] == manifest["pruned"]["ffn_before"] // 2
    report = json.loads(forced.stdout.strip().splitlines()[-1])
    assert report == manifest["report"] and set(report["agreement"]) == {
        "flags", "texts_identical", "max_score_delta", "mean_score_delta", "top_label", "top_label_changes", "near_ties"}
    again = optimize("--min-flags", "1.01")
    assert again.returncode == 0 and "up to date" in again.stdout
    # the same artifact judged on other held-out texts is judged again, and says so in its report
    texts = tmp_path / "heldout.txt"
    texts.write_text("a first held-out text\nand a second one\n")
    rejudged = optimize("--min-flags", "1.01", "--force", "--texts", str(texts))
    assert rejudged.returncode == 0 and "up to date" not in rejudged.stdout, rejudged.stdout
    assert json.loads((out / "gristmill-artifact.json").read_text())["report"]["heldout_texts"] == 2
    missing = optimize("--texts", str(tmp_path / "missing.txt"))
    assert missing.returncode != 0 and f"{tmp_path / 'missing.txt'}: no such file" in missing.stderr
    assert "Traceback" not in missing.stderr
    unknown = subprocess.run([*GRISTMILL, "optimize", "nope", "--out", str(out)], env=env,
                             cwd=root, capture_output=True, text=True, timeout=120)
    assert unknown.returncode != 0 and "no model 'nope'" in unknown.stderr


def test_the_sensitivity_study_simulates_onnx_runtimes_dynamic_int8_exactly():
    """benchmarks/quant_sensitivity's per-tensor activations must be ONNX Runtime's own numerics
    (DynamicQuantizeLinear then DequantizeLinear), or its table would not explain the int8 engine."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from benchmarks.quant_sensitivity import fake_act
    g = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "dq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    torch.manual_seed(0)
    for x in (torch.randn(64, 384) * 3, torch.randn(8, 1536).abs() + 0.5, torch.randn(5, 7) - 4):
        x[0, 0] = 40.0  # an outlier widens the range, as MiniLM's outlier channels do
        ours = fake_act(x, per_row=False)
        theirs = torch.from_numpy(sess.run(None, {"x": x.numpy().astype(np.float32)})[0])
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-5), (ours - theirs).abs().max()
    x = torch.tensor([[0.5, 1.0, 2.0], [-3.0, 100.0, 200.0]])  # per row: each row on its own grid
    assert torch.equal(fake_act(x, per_row=True), torch.cat([fake_act(r[None], per_row=False) for r in x]))
    assert (fake_act(x, per_row=True)[0] - x[0]).abs().max() < (fake_act(x, per_row=False)[0] - x[0]).abs().max()


def test_int8_rows_recipe_is_judged_then_picked_by_a_worker_only_where_it_can_compile(tiny_models_file, tmp_path,
                                                                                       monkeypatch):
    """`optimize --quantize int8-rows` writes a torch recipe (a manifest over the source weights,
    no ONNX file) with its measured report into the model's optimized directory; a worker's loader
    then serves it, compiled, and says why; on a host without a C++ compiler it serves the torch
    engine instead."""
    import json
    import os
    import shutil
    import subprocess

    from gristmill.kernels import loading as kloading
    from gristmill.producers import schemas as S
    from gristmill.producers.settings import Settings
    from gristmill.workers.host import EngineHost
    from tests.commands import GRISTMILL, ROOT as root
    from tests.tinymodels import through_batcher
    if kloading.cpu_compiler() is None:
        pytest.skip("torch.compile on a CPU needs a C++ compiler (g++)")
    home = tmp_path / "home"
    env = {**os.environ, "GRISTMILL_MODELS_FILE": str(tiny_models_file), "GRISTMILL_BUILTIN_MODELS": "false",
           "GRISTMILL_HOME": str(home)}
    texts = tmp_path / "heldout.txt"
    texts.write_text("\n".join(["i will hurt you", "have a lovely day", "hello world", "the quick brown fox"] * 20))
    p = subprocess.run([*GRISTMILL, "optimize", "tiny-moderation", "--quantize", "int8-rows", "--texts", str(texts),
                        "--force"], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    art = home / "models" / "optimized" / "tiny-moderation" / "torch-int8-rows"
    manifest = read_manifest(art)
    assert manifest["kind"] == "torch"
    assert manifest["engine"] == {"quantize": "int8-rows", "compile": True, "attention": "eager"}
    assert not list(art.glob("*.onnx")) and manifest["report"]["size_bytes"] is None
    # timed beside it: the engine a worker serves without an artifact, which it must beat
    assert manifest["report"]["default"]["variant"].startswith("torch-") and manifest["report"]["default"]["speedup"] > 0
    assert json.loads(p.stdout.strip().splitlines()[-1]) == manifest["report"]
    bad = subprocess.run([*GRISTMILL, "optimize", "tiny-moderation", "--quantize", "int8-rows", "--prune", "0.5"],
                         env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--prune needs" in bad.stderr

    settings = Settings(models_file=tiny_models_file, builtin_models=False, home=home, variant_min_flags=0.0,
                        variant_min_texts=0.0, variant_min_gain=0.0, dedup_ttl_s=0)  # tiny: speeds are noise
    host = EngineHost(settings)
    item = S.WorkItem(1, "c1", "/v1/moderations", "tiny-moderation", {"input": ["i will hurt you", "hello"]}, "0" * 64)
    (prep,) = host.prepare([item])
    line = host.format(item, host.run("tiny-moderation", prep.payloads))
    assert line["provenance"]["engine_variant"].endswith("+w8a8rows+compiled+attn-eager")
    assert "torch-int8-rows: its build measured" in host.serving["tiny-moderation"]
    host.shutdown()
    monkeypatch.setattr(kloading, "cpu_compiler", lambda: None)
    host = EngineHost(settings)
    assert "+w8a8rows" not in host.engine("tiny-moderation").variant
    assert "no optimized artifact meets the floors" in host.serving["tiny-moderation"]
    host.shutdown()
    monkeypatch.undo()

    # int8-rows as a cascade's first stage, the full model again near a threshold
    p = subprocess.run([*GRISTMILL, "optimize", "tiny-moderation", "--quantize", "int8-rows", "--cascade",
                        "--texts", str(texts), "--force"], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    cascade = home / "models" / "optimized" / "tiny-moderation" / "cascade-int8-rows"
    manifest = read_manifest(cascade)
    assert manifest["kind"] == "cascade" and read_manifest(cascade / manifest["student"])["kind"] == "torch"
    assert 0.0 <= manifest["report"]["escalated"] <= 1.0 and "full_model_near" in manifest["report"]
    assert manifest["report"]["default"]["variant"].startswith("torch-")
    assert manifest["report"]["speedup"] > 0 and manifest["report"]["items_per_s"] > 0  # timed end to end
    assert "measured end to end" in p.stdout
    shutil.rmtree(art)  # the plain recipe out of the way: the cascade is the one artifact left
    host = EngineHost(settings)
    eng = host.engine("tiny-moderation")
    assert eng.variant.startswith("cascade(") and "+w8a8rows+compiled+attn-eager>" in eng.variant
    assert "cascade-int8-rows: its build measured" in host.serving["tiny-moderation"]
    eng.band = 100.0  # every input escalates
    line = host.format(item, through_batcher(host, "tiny-moderation", prep.payloads))
    assert line["provenance"]["decided_by"] == ["full", "full"]
    host.shutdown()
    monkeypatch.setattr(kloading, "cpu_compiler", lambda: None)  # no compiler: not its first stage either
    host = EngineHost(settings)
    assert not host.engine("tiny-moderation").variant.startswith("cascade(")
    host.shutdown()


def test_a_cascade_counts_only_where_each_of_its_stages_can_run(tmp_path, monkeypatch):
    """A three-stage cascade whose middle stage is a compiled torch recipe is passed over on a host
    without a C++ compiler, as one whose first stage is; a missing stage also passes it over."""
    from gristmill.kernels import loading as kloading
    from gristmill.workers.variants import _stored
    art = tmp_path / "cascade"
    for stage, kind in (("student", "onnx"), ("middle", "torch")):
        (art / stage).mkdir(parents=True)
        (art / stage / "gristmill-artifact.json").write_text(json.dumps({"kind": kind, "engine": {"compile": True}}))
    report = {"agreement": {"flags": 0.9999, "texts_identical": 0.999}, "speedup": 2.5}
    manifest = {"kind": "cascade", "student": "student", "middle": {"dir": "middle", "band": 0.05}, "report": report}
    (art / "gristmill-artifact.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(kloading, "cpu_compiler", lambda: "g++")
    assert _stored(art / "gristmill-artifact.json").speedup == 2.5
    monkeypatch.setattr(kloading, "cpu_compiler", lambda: None)
    assert _stored(art / "gristmill-artifact.json") is None
    monkeypatch.setattr(kloading, "cpu_compiler", lambda: "g++")
    (art / "gristmill-artifact.json").write_text(json.dumps({**manifest, "middle": {"dir": "gone", "band": 0.05}}))
    assert _stored(art / "gristmill-artifact.json") is None


def test_a_worker_serves_the_fastest_artifact_that_meets_the_floors_and_beats_the_default(tiny_models_file, tmp_path):
    """The choice reads each artifact's stored report: an artifact under a floor, or one its build
    measured slower than the engine served without it, is passed over, and the reason says so."""
    import json

    from gristmill.producers.settings import Settings
    from gristmill.workers.variants import choose, optimized_dir
    settings = Settings(models_file=tiny_models_file, builtin_models=False, home=tmp_path)
    spec = settings.registry.specs["tiny-moderation"]
    bf16 = {"variant": "torch-bf16-autocast-cpu", "speedup": 1.7}

    def artifact(name: str, flags: float, texts: float, speedup: float, default: dict | None) -> None:
        d = optimized_dir(settings, spec.name) / name
        d.mkdir(parents=True)
        report = {"speedup": speedup, "agreement": {"flags": flags, "texts_identical": texts}}
        if default is not None:
            report["default"] = default
        (d / "gristmill-artifact.json").write_text(json.dumps({"kind": "onnx", "report": report}))

    artifact("int8", 0.997, 0.96, 2.6, bf16)  # fast, under the floors
    artifact("slow", 0.99999, 0.9999, 1.5, bf16)  # meets the floors, slower than bf16
    choice = choose(spec, "cpu", settings)
    assert not choice.artifact
    assert "slow (1.50x fp32) is slower than torch-bf16-autocast-cpu (1.70x)" in choice.reason
    assert choose(spec, "cpu", settings.model_copy(update={"variant_min_gain": 0.0})).path.name == "slow"
    artifact("good", 0.9999, 0.999, 2.0, bf16)
    artifact("older", 0.9999, 0.999, 1.9, None)  # built before the default was timed: judged on its floors
    choice = choose(spec, "cpu", settings)
    assert choice.artifact and choice.path.name == "good"
    assert "2.00x fp32 (torch-bf16-autocast-cpu 1.70x)" in choice.reason
    assert choose(spec, "cpu", settings.model_copy(update={"variant_min_gain": 1.2})).path.name == "older"
    assert not choose(spec, "cuda:0", settings).artifact  # artifacts are for CPU workers


def test_sampled_transfer_text_is_cached_and_its_held_out_lines_stay_out(weights, tmp_path):
    from gristmill.kernels import corpus, sampled
    chat = weights / "chat"
    lines = sampled.sample_lines(40, generator=chat, cache_dir=tmp_path, seed=3, chunk=16)
    assert len(lines) == 40 and all(len(line.split()) >= 3 for line in lines)
    chunks = [tmp_path / sampled.cache_name(chat, k, 3, 16) for k in range(3)]
    assert sorted(chunks) == sorted(tmp_path.glob("sampled-*.txt"))
    assert [line for p in chunks for line in p.read_text().splitlines()][:40] == lines
    assert sampled.sample_lines(40, generator=chat, cache_dir=tmp_path, seed=3, chunk=16) == lines
    assert sampled.cache_name(chat, 0, 4) != sampled.cache_name(chat, 0, 3) != sampled.cache_name(chat, 1, 3)
    # a larger sample begins with the smaller one; a lost chunk is sampled again, the same
    chunks[1].unlink()
    more = sampled.sample_lines(70, generator=chat, cache_dir=tmp_path, seed=3, chunk=16)
    assert more[:40] == lines and len(more) == 70 and len(list(tmp_path.glob("sampled-*.txt"))) == 5
    with pytest.raises(ValueError, match="-1 lines"):
        sampled.sample_lines(-1, generator=chat, cache_dir=tmp_path)

    made = [f"Message number {i} is short. It has two sentences here." for i in range(60)]
    held = sampled.heldout_texts(made)
    assert held and len(held) < len(made)
    transfer = sampled.transfer_texts(made)
    assert not set(held) & set(transfer)
    assert "It has two sentences here." in transfer and len(transfer) == 3 * (len(made) - len(held))
    mixed = corpus.transfer_set(100, sampled=transfer)
    sampled_set = set(transfer)
    assert len(mixed) == 100 and sum(t in sampled_set for t in mixed) == min(50, len(transfer))


def test_sample_lines_belong_to_the_built_in_transfer_set_and_a_chat_model(tiny_models_file, tmp_path):
    import os
    import subprocess
    from tests.commands import GRISTMILL, ROOT as root
    env = {**os.environ, "GRISTMILL_MODELS_FILE": str(tiny_models_file), "GRISTMILL_BUILTIN_MODELS": "false",
           "GRISTMILL_HOME": str(tmp_path / "home")}
    base = [*GRISTMILL, "optimize", "tiny-moderation", "--out", str(tmp_path / "art"), "--prune", "0.5"]

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), env=env, cwd=root, capture_output=True, text=True, timeout=120)

    own = run(*base, "--distill", str(tmp_path / "mine.txt"), "--sample-lines", "10")
    assert own.returncode != 0 and "use it with --distill builtin" in own.stderr
    wrong = run(*base, "--distill", "builtin", "--sample-lines", "10", "--sampler", "tiny-classifier")
    assert wrong.returncode != 0 and "--sampler needs a chat model" in wrong.stderr
    negative = run(*base, "--distill", "builtin", "--sample-lines", "-5")
    assert negative.returncode != 0 and "--sample-lines must be 0 or more, got -5" in negative.stderr
    sized = run(*base, "--distill", str(tmp_path / "mine.txt"), "--transfer-lines", "500")
    assert sized.returncode != 0 and "use it with --distill builtin" in sized.stderr
    mixed = run(*base, "--distill", "builtin", "--with-builtin", "500")
    assert mixed.returncode != 0 and "use it with --distill FILE" in mixed.stderr
    below = run(*base, "--distill", str(tmp_path / "mine.txt"), "--with-builtin", "-1")
    assert below.returncode != 0 and "--with-builtin must be 0 or more, got -1" in below.stderr
    lone = run(*base, "--distill", str(tmp_path / "mine.txt"), "--middle", "int8")
    assert lone.returncode != 0 and "use it with --distill and --cascade" in lone.stderr
    usage = run(*GRISTMILL, "optimize", "--help")
    assert usage.returncode == 0 and "--sample-lines N" in usage.stdout and "--cascade-flags" in usage.stdout
    assert "--with-builtin N" in usage.stdout


def test_a_file_of_traffic_is_repeated_to_weigh_a_share_of_the_built_in_texts():
    from gristmill.kernels import corpus
    builtin = [f"built-in {i}" for i in range(60_000)]
    lines = [f"traffic {i}" for i in range(1134)]
    mixed = corpus.with_traffic(builtin, lines)
    assert mixed[:60_000] == builtin and mixed[60_000:] == lines * 8  # 0.15 * 60,000 / 1,134 = 7.9
    assert corpus.with_traffic(builtin[:100], lines) == builtin[:100] + lines  # a large file: each line once
    assert corpus.with_traffic(builtin, []) == builtin


def test_template_sentences_with_embedding_neighbours_swapped_in(tmp_path):
    import random

    from gristmill.kernels import corpus
    words = ["[PAD]", "kill", "murder", "slay", "bread", "cake", "##s", "a"]  # "a" and "##s": not whole words
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n")
    emb = torch.tensor([[0, 0, 0], [1, 0.1, 0], [1, 0.2, 0], [1, 0.3, 0], [0, 1, 0.1], [0, 1, 0.2], [0, 0, 1],
                        [0, 0, 1]], dtype=torch.float32)
    near = corpus.embedding_neighbours(vocab, emb, k=2)
    assert set(near) == {"kill", "murder", "slay", "bread", "cake"}
    assert set(near["kill"]) == {"murder", "slay"} and near["bread"][0] == "cake"
    rng = random.Random(0)
    swapped = corpus.substitute_words(rng, "Kill the bread, now!", near, p=1.0)
    first, _, rest = swapped.partition(" the ")
    assert first in near["kill"] and rest.split(",")[0] in near["bread"] and swapped.endswith(", now!")
    assert corpus.substitute_words(rng, "Kill the bread", near, p=0.0) == "Kill the bread"
    # a share of the transfer set, in place of as many word sequences; nothing held out gets in
    plain = corpus.transfer_set(400, vocab_file=vocab)
    mixed = corpus.transfer_set(400, vocab_file=vocab, neighbours=near, substituted=0.1)
    assert len(mixed) == len(plain) == 400 and mixed != plain
    held = set(corpus.heldout_set(200))
    assert not held & set(mixed)


def test_flag_errors_are_counted_by_the_template_core_they_came_from():
    from benchmarks.engine_variants import by_core
    from gristmill.kernels import texts as builtin
    cores = builtin.cores(heldout=True)
    assert not set(cores) & set(builtin.cores()) and len(cores) == len(builtin.CORES) // 2
    held = builtin.sentences(40, heldout=True) + ["a docstring sentence with no core in it"]
    thresholds = {"a": 0.5, "b": 0.3}
    ref = [{"a": 0.8, "b": 0.1} for _ in held]
    new = [dict(r) for r in ref]
    first = next(i for i, t in enumerate(held) if cores[0] in t)
    new[first] = {"a": 0.4, "b": 0.35}  # both flags flip
    new[-1] = {"a": 0.4, "b": 0.1}  # one flips, on a text of no core
    out = by_core(ref, new, held, thresholds)
    assert out["flag_errors"] == 3 and out["labels"] == 2 and out["texts"] == len(held)
    top = out["cores"][0]
    assert top["core"] == cores[0] and top["flag_errors"] == 2
    assert top["texts"] == sum(cores[0] in t for t in held)
    assert top["full_model_near"] == 0.0  # 0.8 and 0.1 lie over 0.5 logit from 0.5 and 0.3
    ref[first] = {"a": 0.55, "b": 0.1}
    assert by_core(ref, new, held, thresholds)["cores"][0]["full_model_near"] == round(1 / top["texts"], 4)
    assert sum(c["texts"] for c in out["cores"]) == 40 and sum(c["flag_errors"] for c in out["cores"]) == 2


def test_traffic_split_is_a_stable_disjoint_split_by_text():
    from benchmarks.common import traffic_split
    texts = [f"line {i}" for i in range(2000)] + ["a copy", "a copy"]
    traffic, judged = traffic_split(texts, 0.5)
    assert len(traffic) + len(judged) == len(texts) and not set(traffic) & set(judged)
    assert 900 < len(traffic) < 1100 and (traffic, judged) == traffic_split(texts, 0.5)
    assert texts.count("a copy") in (traffic.count("a copy"), judged.count("a copy"))  # copies on one side
    assert traffic_split(texts, 0.0) == ([], texts)
    assert set(traffic_split(texts, 0.2)[0]) <= set(traffic)  # a smaller share is a subset of a larger one


def test_a_student_of_a_traffic_file_mixed_into_the_built_in_set(tiny_models_file, tmp_path):
    import json
    import os
    import subprocess

    import torch

    from gristmill.kernels.heads import save_head
    from tests.commands import GRISTMILL, ROOT as root
    # the tiny encoder with a trained head of its own, as the default moderation classifier has
    specs = json.loads(tiny_models_file.read_text())
    encoder = next(m for m in specs if m["name"] == "tiny-moderation")["path"]
    save_head(tmp_path / "head.safetensors", torch.randn(3, 32, generator=torch.Generator().manual_seed(0)),
              torch.zeros(3), ["a", "b", "c"], {})
    models = tmp_path / "models.json"
    models.write_text(json.dumps(specs + [{"name": "tiny-headed", "kind": "embedding_classifier", "path": encoder,
                                           "max_input_tokens": 64, "head": str(tmp_path / "head.safetensors")}]))
    traffic = tmp_path / "traffic.txt"
    traffic.write_text("\n".join(f"message {i}: or i will hurt you" for i in range(40)) + "\n")
    held = tmp_path / "heldout.txt"
    held.write_text("\n".join(["i will hurt you", "have a lovely day", "hello world"] * 10) + "\n")
    env = {**os.environ, "GRISTMILL_MODELS_FILE": str(models), "GRISTMILL_BUILTIN_MODELS": "false",
           "GRISTMILL_HOME": str(tmp_path / "home")}
    p = subprocess.run([*GRISTMILL, "optimize", "tiny-headed", "--prune", "0.5", "--distill", str(traffic),
                        "--with-builtin", "800", "--steps", "3", "--texts", str(held), "--out", str(tmp_path / "art"),
                        "--force"], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    manifest = json.loads((tmp_path / "art" / "gristmill-artifact.json").read_text())
    assert manifest["student"]["transfer_texts"] == 800 + 40 * 3  # each line 3x: 0.15 * 800 / 40
    assert manifest["head"]["fit_on"] == "other texts and the file's lines"  # its own head: a built-in draw, the lines


def test_the_student_ablation_refuses_a_traffic_weight_without_a_traffic_share():
    import subprocess
    import sys
    from tests.commands import ROOT as root
    run = [sys.executable, "-m", "benchmarks.student_ablation"]
    alone = subprocess.run([*run, "--traffic-weight", "0.5"], cwd=root, capture_output=True, text=True, timeout=60)
    assert alone.returncode == 2 and "--traffic-weight must be above 0, and needs --traffic-share" in alone.stderr
    zero = subprocess.run([*run, "--traffic-share", "0.5", "--traffic-weight", "0"], cwd=root, capture_output=True,
                          text=True, timeout=60)
    assert zero.returncode == 2 and "--traffic-weight must be above 0" in zero.stderr


def test_the_artifact_timer_refuses_a_directory_that_is_not_an_artifact(tmp_path):
    import subprocess
    import sys
    from tests.commands import ROOT as root
    run = subprocess.run([sys.executable, "-m", "benchmarks.artifact_speed", str(tmp_path)], cwd=root,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and f"not an artifact directory (no gristmill-artifact.json): {tmp_path}" in run.stderr


def test_artifact_speed_names_every_artifact_apart_from_the_reference():
    from pathlib import Path

    from benchmarks.artifact_speed import artifact_names
    paths = [Path("/a/student/fp32"), Path("/a/x/int8"), Path("/a/y/int8"), Path("/a/mixed"), Path("/a/mixed"),
             Path("/a/torch/bf16")]
    assert artifact_names(paths) == ["student/fp32", "x/int8", "y/int8", "a/mixed", "a/mixed #2", "torch/bf16"]


def test_what_a_build_is_judged_on_is_part_of_whether_it_is_up_to_date(tmp_path, monkeypatch):
    """The held-out texts, the floors and, for a cascade, the band rule: a cascade's band is chosen
    on those texts to those floors, so a build with any of them changed is not reused."""
    from argparse import Namespace

    from gristmill.workers import optimize
    texts = tmp_path / "texts.txt"
    texts.write_text("one\ntwo\n")
    base = dict(texts=texts, min_flags=0.995, cascade=True, cascade_flags=0.9995, cascade_texts=0.995)

    def digest(**change) -> str:
        return optimize.Judging.of(Namespace(**{**base, **change})).digest

    first = digest()
    assert optimize.Judging.of(Namespace(**base)).texts == ["one", "two"] and digest() == first
    assert digest(cascade_texts=0.999) != first and digest(cascade_flags=0.999) != first
    assert digest(min_flags=0.99) != first
    other = tmp_path / "other.txt"
    other.write_text("one\nthree\n")
    assert digest(texts=other) != first
    monkeypatch.setattr(optimize, "CASCADE_RULE", optimize.CASCADE_RULE + 1)
    assert digest() != first
    # a plain artifact's judgement does not depend on the cascade's floors
    assert digest(cascade=False) == digest(cascade=False, cascade_texts=0.5)
