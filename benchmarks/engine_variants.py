"""Engine variants of the default classifier against fp32 eager, in one run: speed and agreement.

    python -m benchmarks.engine_variants [--device cpu|cuda] [--quick] [--texts FILE] [--prune F]

CPU: the real all-MiniLM-L6-v2 weights. Variants: fp32 eager (reference), bf16 autocast (on CPUs
with native bf16), ONNX Runtime fp32 (fused), `int8` (the engine's CPU int8 path: fused, dynamic
int8) and `int8_pruned` (the same after structured pruning). Agreement with fp32 on held-out text
(built-in sentences unless --texts): top label, per-label flags, max score delta.
Without --quick it also measures, on the CPU and the real weights, the agreement of the GPU variants'
numerics (int8 weight-only, W8A8, fp8, 2:4), whose speed only counts on a GPU.
CUDA: MiniLM's architecture with random weights, 128-token inputs at batch 512: torch fp32, bf16,
fp16 eager, torch.compile, int8 weight-only (Triton), W8A8 (torch._int_mm), fp8 (torch._scaled_mm),
2:4 sparsity, each timed with CUDA events over four rotating input sets; logits' relative error
against fp32 on the same inputs.
Prints a table, then one JSON line: {"variants": {"fp32": {...}, "int8": {"speedup", "agreement"}, ...}}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from .common import random_minilm_classifier, table, texts


def cpu_variants(args) -> dict[str, dict]:
    from gristmill.kernels import texts as builtin
    from gristmill.kernels.classify import ClassifierEngine
    from gristmill.kernels.loading import cpu_has_bf16
    from gristmill.kernels.onnx_engine import OnnxClassifierEngine
    from gristmill.kernels.optimize import agreement, build_artifact, throughput
    from gristmill.producers.registry import DEFAULT_CLASSIFIER
    from gristmill.workers.host import classifier_kwargs
    from gristmill.workers.optimize import read_texts

    spec = DEFAULT_CLASSIFIER
    src = spec.resolve_path()
    heldout = read_texts(args.texts) if args.texts else builtin.sentences(256 if args.quick else 1024, heldout=True)
    calibration = builtin.sentences(256)
    kw = classifier_kwargs(spec)
    ref = ClassifierEngine(src, cpu_precision="fp32", **kw)
    thresholds = {k: spec.threshold(k) for k in ref.labels}
    ref_ips, ref_scores = throughput(ref, heldout, repeats=args.repeats)
    out = {"fp32": {"variant": ref.variant, "items_per_s": round(ref_ips, 1), "speedup": 1.0,
                    "agreement": agreement(ref_scores, ref_scores, thresholds)}}

    def add(name: str, engine, extra: dict | None = None) -> None:
        ips, scores = throughput(engine, heldout, repeats=args.repeats)
        out[name] = {"variant": engine.variant, "items_per_s": round(ips, 1), "speedup": round(ips / ref_ips, 2),
                     "agreement": agreement(ref_scores, scores, thresholds), **(extra or {})}

    if cpu_has_bf16():
        add("bf16", ClassifierEngine(src, cpu_precision="bf16", **kw))
    work = Path(tempfile.mkdtemp(prefix="gristmill-variants-"))
    for name, quantize, prune in [("ort_fp32", None, 0.0), ("int8", "int8", 0.0), ("int8_pruned", "int8", args.prune)]:
        m = build_artifact(src, work / name, zero_shot=True, quantize=quantize, prune=prune, calibration=calibration,
                           max_length=spec.max_input_tokens)
        add(name, OnnxClassifierEngine(work / name, **kw),
            {"size_mb": round(m["size_bytes"] / 1e6, 1), "prune": prune})
    if not args.quick:
        for name, extra in GPU_NUMERICS_ON_CPU.items():
            add(f"gpu_{name}", ClassifierEngine(src, cpu_precision="fp32", **extra, **kw), {"numerics_only": True})
    return out


# GPU variants of the torch engine (kernels/quant.py): name -> ClassifierEngine keywords.
GPU_VARIANTS = {
    "fp32": {"dtype": "float32"},
    "bf16": {},
    "fp16": {"dtype": "float16"},
    "bf16_compiled": {"compile": True},
    "int8wo": {"quantize": "int8-weight-only"},
    "w8a8": {"quantize": "int8-dynamic"},
    "w8a8_compiled": {"quantize": "int8-dynamic", "compile": True},
    "fp8": {"quantize": "fp8-dynamic"},
    "fp8_compiled": {"quantize": "fp8-dynamic", "compile": True},
    "fp8s": {"quantize": "fp8-static"},
    "fp8s_compiled": {"quantize": "fp8-static", "compile": True},
    "bf16_autotune": {"compile": "max-autotune-no-cudagraphs"},
    "fp8s_autotune": {"quantize": "fp8-static", "compile": "max-autotune-no-cudagraphs"},
    "sparse24": {"sparsity": "2:4"},
    "sparse24_compiled": {"sparsity": "2:4", "compile": True},
}
# The same numerics on the CPU, on the real weights, for agreement (speed there means nothing).
GPU_NUMERICS_ON_CPU = {"int8wo": {"quantize": "int8-weight-only"}, "w8a8": {"quantize": "int8-dynamic"},
                       "fp8": {"quantize": "fp8-dynamic"}, "fp8s": {"quantize": "fp8-static"},
                       "sparse24": {"sparsity": "2:4"}}


def cuda_variants(args) -> dict[str, dict]:
    import torch

    from gristmill.kernels.classify import ClassifierEngine
    path = random_minilm_classifier(Path(tempfile.mkdtemp(prefix="gristmill-variants-")) / "minilm-random")
    names = args.only.split(",") if args.only else list(GPU_VARIANTS)
    ids_all = None
    ref_logits = None
    out: dict[str, dict] = {}
    for name in ["fp32", *[n for n in names if n != "fp32"]]:
        kw = dict(GPU_VARIANTS[name])
        dtype = getattr(torch, kw.pop("dtype", "bfloat16"))
        try:
            eng = ClassifierEngine(path, device="cuda:0", max_length=128, dtype=dtype, **kw)
            if ids_all is None:
                ids_all = eng.encode(texts(args.batch * 8, 126, 126))
            # four input sets in rotation, so that no run re-reads the previous run's inputs from L2
            sets = [eng._pad(ids_all[i * args.batch:(i + 1) * args.batch]) for i in range(4)]
            with torch.inference_mode():
                t_warm = time.perf_counter()
                for i in range(3 if kw.get("compile") else 5):
                    logits = eng._forward(*sets[i % 4])
                torch.cuda.synchronize()
                warm_s = time.perf_counter() - t_warm
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for i in range(args.iters):
                    eng._forward(*sets[i % 4])
                stop.record()
                torch.cuda.synchronize()
                ms = start.elapsed_time(stop) / args.iters
                logits = eng._forward(*sets[0])
            if ref_logits is None:
                ref_logits = logits
            rel = float((logits - ref_logits).norm() / ref_logits.norm())
            out[name] = {"variant": eng.variant, "items_per_s": round(args.batch / ms * 1e3, 1),
                         "ms_per_batch": round(ms, 3), "logits_rel_err_vs_fp32": round(rel, 5),
                         "warmup_s": round(warm_s, 1)}
            del eng
            torch.cuda.empty_cache()
        except Exception as e:  # one variant that cannot run here must not hide the others
            out[name] = {"variant": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    base = out.get("bf16", {}).get("items_per_s")
    for v in out.values():
        if "items_per_s" in v:
            v["speedup"] = round(v["items_per_s"] / out["fp32"]["items_per_s"], 2)
            if base:
                v["speedup_vs_bf16"] = round(v["items_per_s"] / base, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.engine_variants", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--texts", type=Path, help="held-out texts (plain lines or batch JSONL) for agreement")
    ap.add_argument("--prune", type=float, default=0.5, help="pruning fraction of int8_pruned (default 0.5)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch", type=int, default=512, help="cuda: batch size")
    ap.add_argument("--iters", type=int, default=50, help="cuda: timed batches")
    ap.add_argument("--only", help=f"cuda: comma-separated variants (default all: {', '.join(GPU_VARIANTS)})")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    variants = cuda_variants(args) if args.device.startswith("cuda") else cpu_variants(args)
    rows = []
    for name, v in variants.items():
        if "error" in v:
            rows.append((name, v["error"][:60], "-", "-", "-", "-", "-", "-", "-"))
            continue
        a = v.get("agreement") or {}
        rows.append((name, v["variant"], f"{v['items_per_s']:,.0f}", f"{v['speedup']:.2f}x",
                     f"{v['speedup_vs_bf16']:.2f}x" if "speedup_vs_bf16" in v else "-",
                     f"{a['top_label']:.1%}" if a else f"rel err {v.get('logits_rel_err_vs_fp32', 0):.1e}",
                     f"{a['flags']:.1%}" if a else "-", f"{a['max_score_delta']:.3f}" if a else "-",
                     f"{a['top_label_changes']} ({a['near_ties']})" if a else "-"))
    print(table(rows, ("variant", "engine", "items/s", "vs fp32", "vs bf16", "top label", "flags", "max delta",
                       "top-label changes (near-ties)")))
    summary: dict = {"device": args.device, "variants": variants, "wall_s": round(time.perf_counter() - t0, 1)}
    timed = {k: v for k, v in variants.items() if "speedup_vs_bf16" in v and k != "fp32"}
    if timed:
        best = max(timed, key=lambda k: timed[k]["speedup_vs_bf16"])
        summary["best"] = {"variant": best, "speedup_vs_bf16": timed[best]["speedup_vs_bf16"]}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
