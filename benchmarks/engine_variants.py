"""Engine variants of the default classifier against fp32 eager, in one run: speed and agreement.

    python -m benchmarks.engine_variants [--device cpu|cuda] [--quick] [--texts FILE] [--prune F]

CPU: the real all-MiniLM-L6-v2 weights. Variants: fp32 eager (reference), bf16 autocast (on CPUs
with native bf16), ONNX Runtime fp32 (fused), `int8` (the engine's CPU int8 path: fused, dynamic
int8) and `int8_pruned` (the same after structured pruning). Agreement with fp32 on held-out text
(built-in sentences unless --texts): top label, per-label flags, max score delta.
CUDA: MiniLM's architecture, 128-token inputs at batch 512; torch fp32, bf16 and fp16 eager.
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
    from kernels import texts as builtin
    from kernels.classify import ClassifierEngine
    from kernels.loading import cpu_has_bf16
    from kernels.onnx_engine import OnnxClassifierEngine
    from kernels.optimize import agreement, build_artifact, throughput
    from producers.registry import DEFAULT_CLASSIFIER
    from workers.host import classifier_kwargs
    from workers.optimize import read_texts

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
    return out


def cuda_variants(args) -> dict[str, dict]:
    import torch

    from kernels.classify import ClassifierEngine
    path = random_minilm_classifier(Path(tempfile.mkdtemp(prefix="gristmill-variants-")) / "minilm-random")
    ids_all = None
    out: dict[str, dict] = {}
    for name, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)]:
        eng = ClassifierEngine(path, device="cuda:0", max_length=128, dtype=dtype)
        if ids_all is None:
            ids_all = eng.encode(texts(args.batch * 8, 126, 126))
        ids, mask = eng._pad(ids_all[: args.batch])
        with torch.inference_mode():
            for _ in range(5):
                eng._forward(ids, mask)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(args.iters):
                eng._forward(ids, mask)
            torch.cuda.synchronize()
        out[name] = {"variant": eng.variant, "items_per_s": round(args.batch * args.iters / (time.perf_counter() - t), 1)}
    base = out["bf16"]["items_per_s"]
    for v in out.values():
        v["speedup_vs_bf16"] = round(v["items_per_s"] / base, 2)
        v["speedup"] = round(v["items_per_s"] / out["fp32"]["items_per_s"], 2)
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
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    variants = cuda_variants(args) if args.device.startswith("cuda") else cpu_variants(args)
    rows = []
    for name, v in variants.items():
        a = v.get("agreement") or {}
        rows.append((name, v["variant"], f"{v['items_per_s']:,.0f}", f"{v['speedup']:.2f}x",
                     f"{a['top_label']:.1%}" if a else "-", f"{a['flags']:.1%}" if a else "-",
                     f"{a['max_score_delta']:.3f}" if a else "-"))
    print(table(rows, ("variant", "engine", "items/s", "vs fp32", "top label", "flags", "max delta")))
    print(json.dumps({"device": args.device, "variants": variants, "wall_s": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
