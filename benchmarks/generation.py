"""Our generation engine (continuous batching, slot KV cache) against Hugging Face `generate` with
static batching, on the same prompts with mixed output lengths, in one run.

    python -m benchmarks.generation [--device cpu|cuda] [--quick] [--prompts FILE] [--requests N]
                                    [--temperature T [--top-p P] [--seeded]]

CPU: the real SmolLM2-135M-Instruct weights in fp32, chat prompts (built-in, or one per line of
--prompts), greedy. CUDA: SmolLM2-135M's architecture with random weights in bf16 (speed does not
depend on the weights), 128-token prompts of random ids. `--weights PATH` (a GGUF file or a Hugging
Face directory) runs real weights on either device, with chat prompts: the way to judge bf16
agreement on a host that lacks the weights package, given a copy of its GGUF file; `--dtype`
overrides the precision (fp32 on the CPU, bf16 on CUDA by default).
Each request asks for its own number of new tokens, uniform in [--min-new, --max-new].

The baseline runs `generate` over consecutive groups of --slots requests, each group left-padded and
decoded until its longest request is done (what static batching does); our engine gets all requests
at once with --slots slots. Both count only the tokens each request asked for (up to its own limit
or end of sequence). greedy_match: the fraction of requests whose new tokens are identical;
first32_match: the same over the first 32 tokens. Below fp32, rounding depends on batch shapes,
so `--consistency` measures how far HF agrees with itself (its batches regrouped) and
`--fp32-reference` how often each side's first 32 tokens equal fp32 HF generate's.
Prints a table, then one JSON line with hf_tok_per_s, engine_tok_per_s, speedup, greedy_match.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from .common import table

TOPICS = ["a lighthouse keeper", "the history of bread", "a robot learning to paint", "how volcanoes form",
          "a trip to the mountains", "the life of honeybees", "a detective in a small town", "why the sky is blue",
          "a dragon who is afraid of fire", "the first day at a new school", "how computers store numbers",
          "a ship lost at sea", "the rules of chess", "a garden in winter", "an old map found in an attic",
          "the water cycle", "a city built underground", "how to bake sourdough bread", "a friendship between a "
          "cat and a crow", "the invention of the printing press"]
ASKS = ["Write a long story about {}.", "Explain {} in detail.", "Tell me everything you know about {}.",
        "Write a detailed essay on {}."]


def add_request_args(ap: argparse.ArgumentParser, *, device: str, requests: int | None = None,
                     slots: int | None = None) -> None:
    """The engine and request options that this benchmark and benchmarks.profile_decode share."""
    ap.add_argument("--device", default=device)
    ap.add_argument("--prompts", type=Path, help="real weights: one user message per line")
    ap.add_argument("--requests", type=int, default=requests,
                    help="requests (default cpu 64 / 24 quick, cuda 512 / 256 quick)")
    ap.add_argument("--slots", type=int, default=slots, help="concurrent requests (default cpu 16, cuda 256)")
    ap.add_argument("--min-new", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=128, help="random weights: prompt length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", default=None,
                    help="'random', 'default' (the registry's SmolLM2 package) or a GGUF file / HF directory "
                         "(default: cpu 'default', cuda 'random'); real weights get chat prompts, random ones random ids")
    ap.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                    help="engine and HF precision (default: cpu fp32, cuda bf16)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="compile the decode step's per-layer work (cuda; default: the engine's default)")


def load_engine(args):
    import torch

    from gristmill.kernels.generate import GenerationEngine
    kw = {} if args.compile is None else {"compile_decode": args.compile}
    cache = Path(os.environ.get("GRISTMILL_HOME", Path(tempfile.gettempdir()) / "gristmill-bench")) / "models"
    gpu = args.device.startswith("cuda")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype or ("bf16" if gpu else "fp32")]
    if real_weights(args) and args.weights in (None, "default"):
        from gristmill.producers.registry import DEFAULT_GENERATOR
        path = DEFAULT_GENERATOR.resolve_path()
    elif real_weights(args):
        path = Path(args.weights)
        if not path.exists():
            raise SystemExit(f"--weights: {path} does not exist")
    else:
        path = random_smollm2(Path(tempfile.mkdtemp(prefix="gristmill-gen-")) / "smollm2-random")
    return GenerationEngine(path, cache_dir=cache, device=args.device, dtype=dtype, max_slots=args.slots, **kw)


def real_weights(args) -> bool:
    return args.weights != "random" and not (args.weights is None and args.device.startswith("cuda"))


def random_smollm2(out: Path) -> Path:
    """SmolLM2-135M's config and tokenizer with random weights. GRISTMILL_BENCH_GEN_ARCH_DIR points at
    a directory holding them (a host without the weights package); else the converted default model."""
    import shutil

    import torch
    from transformers import AutoConfig, LlamaForCausalLM
    src = os.environ.get("GRISTMILL_BENCH_GEN_ARCH_DIR")
    if src is None:
        from gristmill.kernels.loading import gguf_to_hf_dir
        from gristmill.producers.registry import DEFAULT_GENERATOR
        src = gguf_to_hf_dir(DEFAULT_GENERATOR.resolve_path(), Path(tempfile.gettempdir()) / "gristmill-bench")
    src = Path(src)
    cfg = AutoConfig.from_pretrained(str(src))
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "vocab.json", "merges.txt", "chat_template.jinja"):
        if (src / name).exists() and not (out / name).exists():
            shutil.copy(src / name, out / name)
    return out


def make_requests(eng, args) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(args.seed)
    if not real_weights(args):
        vocab = eng.model.config.vocab_size
        prompts = [[rng.randrange(100, vocab) for _ in range(args.prompt_tokens)] for _ in range(args.requests)]
    else:
        if args.prompts:
            lines = [ln.strip() for ln in args.prompts.read_text().splitlines() if ln.strip()]
        else:
            lines = [ASKS[i % len(ASKS)].format(TOPICS[(i * 7) % len(TOPICS)]) for i in range(args.requests)]
        prompts = [eng.encode_chat([{"role": "user", "content": lines[i % len(lines)]}]) for i in range(args.requests)]
    limits = [rng.randint(args.min_new, args.max_new) for _ in prompts]
    return prompts, limits


def _sync(eng) -> None:
    import torch
    if eng.device.type == "cuda":
        torch.cuda.synchronize()


def _hf_sampling(sampling: tuple[float, float]) -> dict:
    temperature, top_p = sampling
    return {"do_sample": False} if temperature == 0 else {"do_sample": True, "temperature": temperature, "top_p": top_p,
                                                          "top_k": 0}


def run_hf(eng, prompts, limits, slots, sampling: tuple[float, float] = (0.0, 1.0)) -> tuple[list[list[int]], float]:
    import torch
    outs: list[list[int]] = []
    _sync(eng)
    t = time.perf_counter()
    with torch.inference_mode():
        for g in range(0, len(prompts), slots):
            group, lim = prompts[g:g + slots], limits[g:g + slots]
            width = max(map(len, group))
            ids = torch.full((len(group), width), eng.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(group):
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            gen = eng.model.generate(ids.to(eng.device), attention_mask=mask.to(eng.device), **_hf_sampling(sampling),
                                     max_new_tokens=max(lim), eos_token_id=list(eng.eos_ids), pad_token_id=eng.pad_id)
            for i, row in enumerate(gen[:, width:].tolist()):
                cut = next((k for k, tok in enumerate(row) if tok in eng.eos_ids), len(row))
                outs.append(row[:min(cut, eng.budget(len(group[i]), lim[i]))])
    _sync(eng)
    return outs, time.perf_counter() - t


def run_hf_grouped(eng, prompts, limits, slots, grouping: str,
                   sampling: tuple[float, float] = (0.0, 1.0)) -> tuple[list[list[int]], float]:
    """run_hf with its static batches in input order or grouped longest max_tokens first; outputs in
    input order."""
    order = list(range(len(prompts)))
    if grouping == "longest":
        order.sort(key=lambda i: -limits[i])
    outs, seconds = run_hf(eng, [prompts[i] for i in order], [limits[i] for i in order], slots, sampling)
    back: list[list[int]] = [[] for _ in prompts]
    for i, out in zip(order, outs):
        back[i] = out
    return back, seconds


def agreement(a: list[list[int]], b: list[list[int]], first: int | None = None) -> float:
    """The fraction of requests whose tokens (the first `first` of them) are identical."""
    return round(sum(x[:first] == y[:first] for x, y in zip(a, b)) / len(a), 4)


def run_engine(eng, prompts, limits, sampling: tuple[float, float] = (0.0, 1.0),
               seeded: bool = False) -> tuple[list[list[int]], float]:
    from gristmill.kernels.generate import GenRequest
    temperature, top_p = sampling
    _sync(eng)
    t = time.perf_counter()
    res = eng.run([GenRequest(p, n, temperature=temperature, top_p=top_p, seed=i if seeded else None)
                   for i, (p, n) in enumerate(zip(prompts, limits))])
    _sync(eng)
    return [r.token_ids for r in res], time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.generation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer requests (cpu: 24, cuda: 256)")
    ap.add_argument("--hf-order", choices=("input", "longest"), default="input",
                    help="HF generate's static batches: in input order (default), or grouped longest max_tokens "
                         "first, the same order our engine admits requests in")
    ap.add_argument("--consistency", action="store_true",
                    help="also run HF generate with its batches grouped the other way: how far HF agrees with itself "
                         "(below fp32, batch shapes change rounding)")
    ap.add_argument("--fp32-reference", action="store_true",
                    help="also run HF generate in fp32 and report how often each side's first 32 tokens equal it")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="> 0: both sides sample (HF with do_sample, top_k off) instead of taking the argmax; the "
                         "speed of sampled decoding (match figures are then meaningless and left out)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seeded", action="store_true",
                    help="with --temperature: each of our requests gets its own seed, so draws row by row with "
                         "its own generator (the unseeded rows draw together)")
    add_request_args(ap, device="cpu")
    args = ap.parse_args(argv)
    sampling = (args.temperature, args.top_p)
    if args.temperature > 0 and (args.consistency or args.fp32_reference):
        ap.error("--consistency and --fp32-reference compare greedy tokens; drop --temperature")
    gpu = args.device.startswith("cuda")
    args.requests = args.requests or (256 if gpu else 24) if args.quick else args.requests or (512 if gpu else 64)
    args.slots = args.slots or (256 if gpu else 16)
    t0 = time.perf_counter()
    eng = load_engine(args)
    prompts, limits = make_requests(eng, args)
    # warm-up: first-call allocations and kernel selection stay out of both timings
    run_hf(eng, prompts[:2], [4, 4], 2)
    run_engine(eng, prompts[:2], [4, 4])
    warm_s = None
    if gpu:  # capture every (batch, length) bucket's CUDA graph, and compile: once per worker process
        warm_s = run_engine(eng, prompts, limits, sampling, args.seeded)[1]
    hf_out, hf_s = run_hf_grouped(eng, prompts, limits, args.slots, args.hf_order, sampling)
    our_out, our_s = run_engine(eng, prompts, limits, sampling, args.seeded)
    hf_tok, our_tok = sum(map(len, hf_out)), sum(map(len, our_out))
    sampled = args.temperature > 0
    match, first32 = (None, None) if sampled else (agreement(hf_out, our_out), agreement(hf_out, our_out, 32))
    extra: dict = {}
    if args.consistency:  # HF against itself, its static batches grouped the other way
        other, _ = run_hf_grouped(eng, prompts, limits, args.slots, "input" if args.hf_order == "longest" else "longest")
        extra.update(hf_self_match=agreement(hf_out, other), hf_self_first32=agreement(hf_out, other, 32))
    if args.fp32_reference:  # both against fp32 HF generate, the closest thing to the exact answer
        args.dtype = "fp32"
        ref_eng = load_engine(args)
        ref, _ = run_hf_grouped(ref_eng, prompts, limits, args.slots, args.hf_order)
        extra.update(engine_vs_fp32_first32=agreement(ref, our_out, 32), hf_vs_fp32_first32=agreement(ref, hf_out, 32))
        del ref_eng
    st = eng.loop.stats if eng.loop else None
    figures = {
        "device": args.device, "model": eng.variant, "weights": "real" if real_weights(args) else "random",
        "hf_order": args.hf_order, "requests": len(prompts), "temperature": args.temperature, "top_p": args.top_p,
        "seeded": args.seeded,
        "slots": args.slots,
        "new_tokens_asked": sum(limits), "hf_tokens": hf_tok, "engine_tokens": our_tok,
        "hf_s": round(hf_s, 2), "engine_s": round(our_s, 2),
        "hf_tok_per_s": round(hf_tok / hf_s, 1), "engine_tok_per_s": round(our_tok / our_s, 1),
        "speedup": round((our_tok / our_s) / (hf_tok / hf_s), 2),
        "greedy_match": match, "first32_match": first32, **extra,
        "engine_mean_decode_batch": round(st.mean_decode_batch, 1) if st else None,
        "engine_decode_steps": st.decode_steps if st else None,
        "engine_first_run_s": round(warm_s, 2) if warm_s is not None else None,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(table([("HF generate, static batches", f"{hf_tok:,}", f"{hf_s:.1f}", f"{hf_tok / hf_s:,.0f}", "1.00x"),
                 ("gristmill continuous", f"{our_tok:,}", f"{our_s:.1f}", f"{our_tok / our_s:,.0f}",
                  f"{figures['speedup']:.2f}x")],
                ("engine", "new tokens", "seconds", "tokens/s", "speedup")))
    if sampled:
        print(f"sampled at temperature {args.temperature}, top_p {args.top_p}"
              f"{', a seed per request' if args.seeded else ''}: no match figures")
    else:
        print(f"greedy match {match:.1%} (first 32 tokens {first32:.1%}) over {len(prompts)} requests")
    if "hf_self_first32" in extra:
        print(f"HF against itself, batches regrouped: {extra['hf_self_match']:.1%} "
              f"(first 32 tokens {extra['hf_self_first32']:.1%})")
    if "engine_vs_fp32_first32" in extra:
        print(f"first 32 tokens equal to fp32 HF generate: ours {extra['engine_vs_fp32_first32']:.1%}, "
              f"HF {extra['hf_vs_fp32_first32']:.1%}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
