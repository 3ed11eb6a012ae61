"""The continuous loop on CUDA: graphed decode steps equal eager ones and HF generate (tiny Llama, fp32)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

from gristmill.kernels.generate import GenerationEngine, GenRequest  # noqa: E402


def test_cuda_graph_decode_equals_eager_and_hf(tiny_models_file, tmp_path):
    chat = tiny_models_file.parent / "weights" / "chat"
    kw = dict(cache_dir=tmp_path, device="cuda:0", dtype=torch.float32, max_context=64, max_slots=16,
              compile_decode=False)
    graphed = GenerationEngine(chat, **kw)
    eager = GenerationEngine(chat, cuda_graphs=False, **kw)
    assert graphed.variant.endswith("continuous+cudagraphs") and eager.variant.endswith("-continuous")
    words = "the quick brown fox jumps over a lazy dog while seven cats sleep".split()
    prompts = [graphed.encode_prompt(" ".join(words[: 1 + i % len(words)])) for i in range(40)]
    reqs = [GenRequest(p, graphed.budget(len(p), 3 + (7 * i) % 20), temperature=0) for i, p in enumerate(prompts)]
    a, b = graphed.run(reqs), eager.run(reqs)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert len(graphed.loop.graphed.graphs) >= 2, "several batch-size buckets were captured"
    for r, out in zip(reqs[:8], a[:8]):
        ids = torch.tensor([r.prompt_ids], device="cuda")
        ref = graphed.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=r.max_tokens,
                                     do_sample=False, eos_token_id=list(graphed.eos_ids), pad_token_id=graphed.pad_id)
        new = ref[0, len(r.prompt_ids):].tolist()
        new = new[: next((k for k, t in enumerate(new) if t in graphed.eos_ids), len(new))]
        assert out.token_ids == new


def test_compiled_graphed_decode_matches_eager(tiny_models_file, tmp_path):
    """The decode step with its per-layer work compiled (torch.compile inside the CUDA graphs), steps
    queued one ahead of reading them: one step's logits equal the modules' to fp32 rounding, and the
    greedy tokens are eager's (fused reductions round differently, so a near-tie may flip)."""
    chat = tiny_models_file.parent / "weights" / "chat"
    kw = dict(cache_dir=tmp_path, device="cuda:0", dtype=torch.float32, max_context=64, max_slots=16)
    compiled = GenerationEngine(chat, **kw)  # compiling is the default on CUDA
    eager = GenerationEngine(chat, cuda_graphs=False, compile_decode=False, **kw)
    assert compiled.variant.endswith("continuous+cudagraphs+compiled")
    words = "the quick brown fox jumps over a lazy dog while seven cats sleep".split()
    prompts = [compiled.encode_prompt(" ".join(words[: 1 + i % len(words)])) for i in range(40)]
    reqs = [GenRequest(p, compiled.budget(len(p), 3 + (7 * i) % 20), temperature=0) for i, p in enumerate(prompts)]
    a, b = compiled.run(reqs), eager.run(reqs)
    same = sum(x.token_ids == y.token_ids for x, y in zip(a, b))
    st = compiled.loop.stats
    assert st.decode_rows > st.new_tokens - len(reqs), "greedy steps ran one ahead of reading their tokens"

    stepper = compiled.loop.stepper
    cache = stepper.new_cache(8, 32, torch.device("cuda:0"), torch.float32)
    logits = {}
    for name, fns in (("modules", None), ("compiled", stepper.compiled)):
        stepper.compiled = fns
        cache.fill(0, torch.arange(5, 13, device="cuda"), torch.arange(8, device="cuda"))
        logits[name] = stepper.decode(cache, 8, 16)[0].clone()
    rel = ((logits["compiled"] - logits["modules"]).norm() / logits["modules"].norm()).item()
    print(f"compiled vs modules: logits rel. diff {rel:.2e}; {same}/{len(reqs)} requests' tokens equal")
    assert rel < 1e-5
    assert same >= 0.9 * len(reqs), f"{len(reqs) - same} of {len(reqs)} requests differ"


def test_sampled_steps_run_ahead_on_cuda_and_seeded_rows_match_eager(tiny_models_file, tmp_path):
    """Sampled rows draw on the device right behind each graphed step, so those steps also run one
    ahead; a seeded request's tokens are those of the eager loop (fp32), unseeded ones run to budget."""
    chat = tiny_models_file.parent / "weights" / "chat"
    kw = dict(cache_dir=tmp_path, device="cuda:0", dtype=torch.float32, max_context=64, max_slots=16,
              compile_decode=False)
    graphed = GenerationEngine(chat, **kw)
    eager = GenerationEngine(chat, cuda_graphs=False, **kw)
    words = "the quick brown fox jumps over a lazy dog while seven cats sleep".split()
    prompts = [graphed.encode_prompt(" ".join(words[: 1 + i % len(words)])) for i in range(24)]
    reqs = [GenRequest(p, graphed.budget(len(p), 4 + (5 * i) % 16), temperature=0.8, top_p=0.9,
                       seed=i if i % 2 else None) for i, p in enumerate(prompts)]
    a, b = graphed.run(reqs), eager.run(reqs)
    seeded = [k for k, r in enumerate(reqs) if r.seed is not None]
    assert [a[k].token_ids for k in seeded] == [b[k].token_ids for k in seeded]
    for r, res in zip(reqs, a):
        assert res.finish_reason == "stop" or res.completion_tokens == r.max_tokens
    st = graphed.loop.stats
    assert st.decode_rows > st.new_tokens - len(reqs), "sampled steps ran one ahead of reading their tokens"
