"""The continuous-batching loop (kernels/decode.py) on a tiny random Llama, against HF generate and
against the static loop."""


import pytest
import torch

from gristmill.kernels.decode import supports
from gristmill.kernels.generate import GenerationEngine, GenRequest


@pytest.fixture(scope="module", params=[False, True], ids=["in-step", "run-ahead"])
def engines(request, tiny_models_file, tmp_path_factory) -> tuple[GenerationEngine, GenerationEngine]:
    """The continuous loop reading each step's tokens before the next (the CPU's way), and queueing
    greedy steps one ahead of reading them (CUDA's way, forced here so the CPU tests cover it)."""
    chat = tiny_models_file.parent / "weights" / "chat"
    cache = tmp_path_factory.mktemp("cache")
    cont = GenerationEngine(chat, cache_dir=cache, max_context=64, max_slots=3)
    cont.loop.run_ahead = request.param
    static = GenerationEngine(chat, cache_dir=cache, max_context=64, continuous=False)
    return cont, static


def _prompts(eng: GenerationEngine, n: int) -> list[list[int]]:
    words = "the quick brown fox jumps over a lazy dog while seven cats sleep in warm sun".split()
    return [eng.encode_prompt(" ".join(words[: 1 + (i * 5) % len(words)])) for i in range(n)]


def _hf_greedy(eng: GenerationEngine, ids: list[int], n: int) -> list[int]:
    out = eng.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=list(eng.eos_ids), pad_token_id=eng.pad_id)
    new = out[0, len(ids):].tolist()
    return new[: next((k for k, t in enumerate(new) if t in eng.eos_ids), len(new))]


def test_engine_picks_the_continuous_loop_for_llama(engines):
    cont, static = engines
    assert supports(cont.model) and cont.loop is not None and cont.variant.endswith("-continuous")
    assert static.loop is None and static.variant.endswith("-static")


def test_greedy_equals_hf_generate_with_slots_reused(engines):
    cont, _ = engines
    prompts = _prompts(cont, 8)
    limits = [3, 17, 5, 30, 1, 12, 25, 8]  # mixed lengths: slots free and refill mid-run
    ours = cont.run([GenRequest(p, n, temperature=0) for p, n in zip(prompts, limits)])
    for p, n, r in zip(prompts, limits, ours):
        n = cont.budget(len(p), n)  # clipped to the 64-token context, as a line would be
        assert r.token_ids == _hf_greedy(cont, p, n)
        assert r.completion_tokens == len(r.token_ids) <= n
    st = cont.loop.stats
    assert st.prefills >= 3, "8 requests through 3 slots need several admissions"
    assert st.mean_decode_batch <= 3
    assert st.new_tokens == sum(r.completion_tokens for r in ours) + sum(r.finish_reason == "stop" for r in ours)
    extra = st.decode_rows - (st.new_tokens - len(prompts))  # each request's first token comes from its prefill
    if cont.loop.run_ahead:
        assert 0 < extra <= len(prompts), "rows ran one step ahead of their finish, at most once each"
    else:
        assert extra == 0


def test_continuous_equals_static_for_seeded_sampling_and_stops(engines):
    cont, static = engines
    prompts = _prompts(cont, 6)
    reqs = [GenRequest(p, 6 + 3 * i, temperature=0.8 if i % 2 else 0, top_p=0.9, seed=i) for i, p in enumerate(prompts)]
    free = static.run(reqs)
    stop = next(r.text[2:4] for r in free if len(r.text) > 4)
    reqs[0].stop = [stop]
    a, b = cont.run(reqs), static.run(reqs)
    assert [(r.text, r.finish_reason, r.completion_tokens) for r in a] == \
        [(r.text, r.finish_reason, r.completion_tokens) for r in b]


def test_cache_is_allocated_once_and_grows_only_for_larger_work(tiny_models_file, tmp_path):
    eng = GenerationEngine(tiny_models_file.parent / "weights" / "chat", cache_dir=tmp_path, max_context=64, max_slots=4)
    p = _prompts(eng, 4)[:1] * 4
    eng.run([GenRequest(x, 4, temperature=0) for x in p[:2]])
    first = eng.loop.cache
    assert (first.slots, first.max_len) == (2, len(p[0]) + 4)
    eng.run([GenRequest(x, 2, temperature=0) for x in p[:2]])
    assert eng.loop.cache is first, "a run that fits must reuse the cache"
    eng.run([GenRequest(x, 4, temperature=0) for x in p])
    assert eng.loop.cache is not first and eng.loop.cache.slots == 4


def test_an_empty_prompt_is_refused_by_name(engines):
    cont, _ = engines
    with pytest.raises(ValueError, match="no tokens"):
        cont.run([GenRequest([], 4, temperature=0)])


@pytest.mark.parametrize("run_ahead", [False, True])
def test_requests_handed_over_mid_run_join_and_finish_early(tiny_models_file, tmp_path, run_ahead):
    """The loop asks for more work whenever slots free up; pulled requests get the same tokens as
    alone, and each request is reported the moment it finishes."""
    eng = GenerationEngine(tiny_models_file.parent / "weights" / "chat", cache_dir=tmp_path, max_context=64,
                           max_slots=3)
    eng.loop.run_ahead = run_ahead
    p = _prompts(eng, 8)  # lengths 2, 22, 40, 58, 19, 35, 54, 13
    first = [GenRequest(p[1], 30, temperature=0)]  # the run's cache: 22 + 30 = 52 positions
    later = [GenRequest(p[i], 3, temperature=0) for i in (0, 7, 4)]
    too_long = GenRequest(p[2], 20, temperature=0)  # 40 + 20 > 52: must wait for a batch of its own
    queue = [*later, too_long]
    done_order: list[int] = []

    def more(n, accept):
        take = [r for r in queue if accept(r)][:n]
        for r in take:
            queue.remove(r)
        return take

    out = eng.run(first, more=more, on_done=lambda k, r: done_order.append(k))
    assert len(out) == 4 and queue == [too_long]
    assert eng.loop.cache.max_len == 52 and eng.loop.stats.prefills >= 2
    assert set(done_order[:3]) == {1, 2, 3} and done_order[-1] == 0, "short requests finish first"
    for r, res in zip([*first, *later], out):
        alone = eng.run([GenRequest(r.prompt_ids, r.max_tokens, temperature=0)])[0]
        assert res.token_ids == alone.token_ids and res.completion_tokens == r.max_tokens


def test_plain_layer_functions_equal_the_model_modules(tiny_models_file, tmp_path):
    """The functions a decode step compiles on CUDA compute what the model's own modules do (run
    uncompiled here, in fp32): the same logits up to the stacked products' rounding, the same greedy tokens."""
    from gristmill.kernels import decode
    eng = GenerationEngine(tiny_models_file.parent / "weights" / "chat", cache_dir=tmp_path, max_context=64,
                           max_slots=4)
    reqs = [GenRequest(p, 12, temperature=0) for p in _prompts(eng, 6)]
    ref = eng.run(reqs)
    stepper = eng.loop.stepper
    cache = stepper.new_cache(2, 16, torch.device("cpu"), torch.float32)
    cache.fill(0, torch.tensor([5, 9]), torch.tensor([3, 7]))
    modules = stepper.decode(cache, 2, 8)[0]
    cache.fill(0, torch.tensor([5, 9]), torch.tensor([3, 7]))
    stepper.plain = decode._plain_layers(eng.model)
    assert stepper.plain is not None
    stepper.compiled = (decode._attention_in, decode._attention_out)
    functions = stepper.decode(cache, 2, 8)[0]
    torch.testing.assert_close(functions, modules, rtol=1e-5, atol=1e-5)
    assert [r.token_ids for r in eng.run(reqs)] == [r.token_ids for r in ref]


def test_sampling_draws_from_the_nucleus_and_seeded_rows_are_reproducible():
    from gristmill.kernels.generate import sample_tokens
    probs = torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04])
    logits = probs.log().expand(20000, 5).contiguous()
    n = logits.shape[0]
    # top_p 0.85: the nucleus is the first three tokens (0.4 + 0.3 < 0.85 <= 0.9), renormalized
    drawn = sample_tokens(logits, [1.0] * n, [0.85] * n, [None] * n)
    freq = torch.bincount(drawn, minlength=5).float() / n
    assert freq[3:].sum() == 0, "tokens outside the nucleus are never drawn"
    torch.testing.assert_close(freq[:3], probs[:3] / probs[:3].sum(), atol=0.015, rtol=0)
    # greedy rows take the argmax; a seeded row draws the same token whatever its batch
    mixed = sample_tokens(logits[:3], [0.0, 1.0, 1.0], [1.0] * 3,
                          [None, torch.Generator().manual_seed(7), None])
    assert mixed[0] == 0
    alone = [sample_tokens(logits[:1], [1.0], [1.0], [torch.Generator().manual_seed(7)])[0] for _ in range(3)]
    assert all(a == mixed[1] for a in alone)


@pytest.mark.parametrize("run_ahead", [False, True])
def test_unseeded_sampled_requests_run_to_their_budgets(tiny_models_file, tmp_path, run_ahead):
    eng = GenerationEngine(tiny_models_file.parent / "weights" / "chat", cache_dir=tmp_path, max_context=64,
                           max_slots=3)
    eng.loop.run_ahead = run_ahead
    reqs = [GenRequest(p, 4 + 3 * i, temperature=1.0, top_p=0.95) for i, p in enumerate(_prompts(eng, 6))]
    out = eng.run(reqs)
    for r, res in zip(reqs, out):
        assert res.finish_reason == "stop" or res.completion_tokens == eng.budget(len(r.prompt_ids), r.max_tokens)
        assert all(0 <= t < eng.model.config.vocab_size for t in res.token_ids)
    stops = sum(r.finish_reason == "stop" for r in out)
    assert eng.loop.stats.new_tokens == sum(r.completion_tokens for r in out) + stops
