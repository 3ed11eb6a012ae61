"""How fast a full-depth int8 classifier could be on this host: a speed-of-light bound, measured.

    python -m benchmarks.int8_ceiling [--texts FILE] [--rounds N] [--batch 64]

A cascade that escalates only a few percent of its inputs needs a first stage whose scores near the
thresholds are about as close to fp32's as the full model quantized to int8 (`int8_rows`): on the
built-in held-out text the fp32 model's own scores put 6% of texts within 0.10 logit of a
threshold, so a 5% cap leaves a band under 0.1. Students with fewer layers are fast enough but err
by several times that. This asks the other side: how fast can a full-depth int8 model get here?

On the real all-MiniLM-L6-v2 encoder, over real batches of held-out text (sorted by token count,
`--batch` per batch, as a worker's batcher forms them), each the least of `--rounds` rounds in
which they take turns:

  fp32          the encoder in torch eager fp32, the baseline of every speedup gristmill reports
  fp32 compiled the same, torch.compile'd: Inductor fuses the work between the products
  int8_rows     the served int8 engine (the `int8-rows` recipe: compiled, a range per activation row)
  tokenize      the engine's tokenizer over the batch's texts, which every engine pays alike
  GEMMs fp32    the encoder's linear layers' products alone, each timed apart at its shape
  GEMMs int8    the same products as int8 x int8 -> int32 (`torch._int_mm`: oneDNN, VNNI where
                the CPU has it), with no quantizing, rescaling or bias

and three bounds on a full-depth int8 model against fp32, tokenizing included, "the rest" being
an engine's time less its linear products:
  GEMMs int8, the rest as fp32 runs it            quantizing free
  GEMMs int8, the rest as compiled fp32 runs it   quantizing free
  GEMMs int8, the rest free                       only the int8 products and tokenizing left

beside the speed a cascade's first stage needs for `--target` times fp32 while it escalates
`--escalated` of its inputs to the full model in fp32 (1 / (1 / target - escalated)), and the time
that leaves for everything but the int8 products (attention, LayerNorm, GELU, quantizing). The
attention's own products (q.k and the weighted sum of v) count as "the rest". Prints a table, then
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

from .common import table


def in_turns(measures: dict[str, list[tuple[Callable[[], object], int]]], rounds: int) -> dict[str, float]:
    """Seconds per measure: each measure is a list of (call, weight), and counts the sum over its
    calls of weight x the least time of that call. Every call runs once untimed, then the measures
    take turns for `rounds` rounds, so that a slow moment of a shared machine falls on all of them
    and not on whichever ran alone then (the bounds subtract one measure from another)."""
    least = {name: [float("inf")] * len(calls) for name, calls in measures.items()}
    for calls in measures.values():
        for call, _ in calls:
            call()
    for _ in range(rounds):
        for name, calls in measures.items():
            for i, (call, _) in enumerate(calls):
                start = time.perf_counter()
                call()
                least[name][i] = min(least[name][i], time.perf_counter() - start)
    return {name: sum(t * w for t, (_, w) in zip(least[name], calls)) for name, calls in measures.items()}


def gemm_shapes(model: torch.nn.Module, run) -> list[tuple[int, int, int]]:
    """(rows, in, out) of every encoder linear product one call of `run()` makes, in order."""
    from gristmill.kernels.quant import _encoder_linears
    shapes: list[tuple[int, int, int]] = []

    def record(module, args, _out):
        x = args[0]
        shapes.append((x.numel() // x.shape[-1], module.in_features, module.out_features))

    hooks = [lin.register_forward_hook(record) for _, _, lin in _encoder_linears(model)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return shapes


def gemm_calls(shapes: list[tuple[int, int, int]]) -> dict[str, list[tuple[Callable[[], object], int]]]:
    """The products of `shapes` on random operands, each distinct shape once with its count as the
    weight: fp32 (`torch.mm`) and int8 x int8 -> int32 (`torch._int_mm`)."""
    fp32, int8 = [], []
    for (m, k, n), count in Counter(shapes).items():
        m = max(m, 17)  # torch._int_mm takes more than 16 rows (the int8-rows layers pad to 17 too)
        x, w = torch.randn(m, k), torch.randn(k, n)
        xq = torch.randint(-128, 128, (m, k), dtype=torch.int8)
        wq = torch.randint(-128, 128, (k, n), dtype=torch.int8)
        fp32.append((lambda x=x, w=w: torch.mm(x, w), count))
        int8.append((lambda xq=xq, wq=wq: torch._int_mm(xq, wq), count))
    return {"gemm_fp32": fp32, "gemm_int8": int8}


def needed_speed(target: float, escalated: float) -> float:
    """The speed against fp32 a cascade's first stage needs for the cascade to run `target` times
    fp32 while `escalated` of its inputs also go through the full model in fp32."""
    if escalated >= 1 / target:
        raise ValueError(f"escalating {escalated:.0%} to fp32 alone costs more than 1/{target} of fp32's time")
    return 1 / (1 / target - escalated)


def ceiling(seconds: dict[str, float], target: float, escalated: float) -> tuple[dict, list[tuple]]:
    """(figures, table rows) from the measured `seconds`: speeds against fp32 with tokenizing
    counted in both, and the bounds of the module's docstring."""
    tok, gemm8 = seconds["tokenize"], seconds["gemm_int8"]
    base = tok + seconds["fp32"]
    rest = seconds["fp32"] - seconds["gemm_fp32"]
    needed = needed_speed(target, escalated)
    budget = base / needed - tok - gemm8

    def vs_fp32(encoder_seconds: float) -> float:
        return round(base / (tok + encoder_seconds), 2)

    figures: dict = {
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
        "gemm_share_of_fp32": round(seconds["gemm_fp32"] / seconds["fp32"], 3),
        "gemm_int8_vs_fp32": round(seconds["gemm_fp32"] / gemm8, 2),
        "rest_fp32_seconds": round(rest, 4),
        "bound_rest_as_fp32": vs_fp32(rest + gemm8),
        "bound_rest_free": vs_fp32(gemm8),
        "target": target, "escalated": escalated, "needed": round(needed, 2),
        "rest_budget_seconds": round(budget, 4),
    }
    rows = [("fp32 (encoder, eager)", f"{seconds['fp32']:.3f}", "1.00x", f"the rest: {rest:.3f} s"),
            ("tokenize", f"{tok:.3f}", "", "paid by every engine")]
    bounds = [("bound: GEMMs int8, the rest as fp32 runs it", "", f"{figures['bound_rest_as_fp32']:.2f}x",
               "quantizing free")]
    if "fp32_compiled" in seconds:
        fused_rest = seconds["fp32_compiled"] - seconds["gemm_fp32"]
        figures.update(fp32_compiled_vs_fp32=vs_fp32(seconds["fp32_compiled"]), rest_fused_seconds=round(fused_rest, 4),
                       bound_rest_fused=vs_fp32(fused_rest + gemm8))
        rows.append(("fp32, torch.compile'd", f"{seconds['fp32_compiled']:.3f}",
                     f"{figures['fp32_compiled_vs_fp32']:.2f}x", f"the rest fused: {fused_rest:.3f} s"))
        bounds.append(("bound: GEMMs int8, the rest as compiled fp32 runs it", "",
                       f"{figures['bound_rest_fused']:.2f}x", "quantizing free"))
    if "int8_rows" in seconds:
        figures["int8_rows_vs_fp32"] = vs_fp32(seconds["int8_rows"])
        rows.append(("int8_rows (served engine)", f"{seconds['int8_rows']:.3f}",
                     f"{figures['int8_rows_vs_fp32']:.2f}x", "measured"))
    rows += [("GEMMs fp32 (linear layers)", f"{seconds['gemm_fp32']:.3f}", "",
              f"{figures['gemm_share_of_fp32']:.0%} of fp32's encoder time"),
             ("GEMMs int8", f"{gemm8:.3f}", "", f"{figures['gemm_int8_vs_fp32']:.2f}x the fp32 GEMMs")]
    bounds += [("bound: GEMMs int8, the rest free", "", f"{figures['bound_rest_free']:.2f}x",
                "only products and tokenizing"),
               (f"needed: {target:g}x with {escalated:.0%} escalated to fp32", f"{base / needed - tok:.3f}",
                f"{needed:.2f}x", f"leaves {budget:.3f} s for the rest")]
    return figures, rows + bounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=Path, default=None, help="held-out texts (default: the built-in ones)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--target", type=float, default=3.0, help="the cascade's speed against fp32 (default 3.0)")
    ap.add_argument("--escalated", type=float, default=0.05, help="its share escalated to fp32 (default 0.05)")
    ap.add_argument("--no-compile", action="store_true",
                    help="skip the torch.compile'd engines (int8_rows and fp32 compiled; their compiles take a minute or two)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from gristmill.kernels.classify import ClassifierEngine
    from gristmill.kernels.optimize import torch_recipe_engine
    from gristmill.producers.registry import DEFAULT_CLASSIFIER
    from gristmill.workers.loading import classifier_kwargs
    from gristmill.workers.optimize import heldout_texts

    src, kw = DEFAULT_CLASSIFIER.resolve_path(), classifier_kwargs(DEFAULT_CLASSIFIER)
    texts = heldout_texts(args.texts)
    fp32 = ClassifierEngine(src, cpu_precision="fp32", **kw)
    by_length = sorted(zip(fp32.encode(texts), texts), key=lambda pair: len(pair[0]))
    spans = range(0, len(by_length), args.batch)
    batches = [[row for row, _ in by_length[i:i + args.batch]] for i in spans]
    text_batches = [[text for _, text in by_length[i:i + args.batch]] for i in spans]

    def each(engine_call, items):
        return [(lambda item=item: engine_call(item), 1) for item in items]

    measures = {"tokenize": each(fp32.encode, text_batches), "fp32": each(fp32.embed, batches)}
    if not args.no_compile:
        rows = ClassifierEngine(src, cpu_precision="auto", **torch_recipe_engine("int8-rows"), **kw)
        compiled = ClassifierEngine(src, cpu_precision="fp32", compile=True, **kw)
        measures.update(int8_rows=each(rows.embed, batches), fp32_compiled=each(compiled.embed, batches))
    shapes = [s for b in batches for s in gemm_shapes(fp32.model, lambda b=b: fp32.embed(b))]
    measures.update(gemm_calls(shapes))
    seconds = in_turns(measures, args.rounds)

    figures, rows_out = ceiling(seconds, args.target, args.escalated)
    figures.update(texts=len(texts), batches=len(batches), threads=torch.get_num_threads())
    print(f"{len(texts)} held-out texts in {len(batches)} batches of {args.batch}, {torch.get_num_threads()} threads; "
          f"least of {args.rounds} rounds")
    print(table(rows_out, ("", "seconds", "vs fp32", "")))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
