"""The continuous loop on CUDA: graphed decode steps equal eager ones and HF generate (tiny Llama, fp32)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

from kernels.generate import GenerationEngine, GenRequest  # noqa: E402


def test_cuda_graph_decode_equals_eager_and_hf(tiny_models_file, tmp_path):
    chat = tiny_models_file.parent / "weights" / "chat"
    kw = dict(cache_dir=tmp_path, device="cuda:0", dtype=torch.float32, max_context=64, max_slots=16)
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
