"""Where int8 loses the default classifier's agreement: simulated quantization schemes, one run.

    python -m benchmarks.quant_sensitivity [--quick] [--texts FILE]

The real all-MiniLM-L6-v2 weights and trained moderation head, in fp32 on the CPU, with the
encoder's linear layers replaced by fake-quantized ones (int8 values, computed in fp32), so that
each scheme's numerics can be judged apart from any kernel's speed:

  weights only      int8 weights per output channel, fp32 activations
  per-tensor        + activations as uint8 with one scale and zero point per tensor, computed per
                    batch: the numerics of ONNX Runtime's dynamic int8 (DynamicQuantizeMatMul,
                    QAttention), the `int8-tensor` artifacts
  per-row           + one scale and zero point per token row instead: the `int8` artifacts
                    (kernels/onnx_rowwise.py) and the torch engine's int8-rows
  smooth a          per-tensor after SmoothQuant-style rescaling (activation channel maxima from
                    the calibration text, migration strength a)
  only GROUP        per-tensor on one group of layers (qkv, attention output, FFN in, FFN out),
                    the rest fp32

Agreement with fp32 as `gristmill optimize` reports it (top label, per-label flags, max score
delta), plus how many top-label changes are near-ties (fp32's two highest scores within 0.05).
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from .common import table

GROUPS = ("qkv", "attn_out", "ffn_in", "ffn_out")


def fake_weight(w: torch.Tensor) -> torch.Tensor:
    from gristmill.kernels.quant import quantize_per_channel
    q, scale = quantize_per_channel(w)
    return q.float() * scale[:, None]


def fake_act(x: torch.Tensor, per_row: bool) -> torch.Tensor:
    """Asymmetric uint8 round trip, the range widened to hold 0 (as DynamicQuantizeLinear does)."""
    if per_row:
        lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    else:
        lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
    scale = ((hi - lo) / 255).clamp(min=1e-12)
    zero = torch.round(-lo / scale)
    return (torch.round(x / scale) + zero).clamp(0, 255).sub(zero) * scale


class FakeQuantLinear(nn.Module):
    def __init__(self, lin: nn.Linear, acts: str | None, smooth: torch.Tensor | None):
        super().__init__()
        w = lin.weight.detach().float()
        self.smooth = smooth
        self.weight = fake_weight(w * smooth[None, :] if smooth is not None else w)
        self.bias, self.acts = lin.bias, acts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth is not None:
            x = x / self.smooth
        if self.acts is not None:
            x = fake_act(x, per_row=self.acts == "row")
        return nn.functional.linear(x, self.weight, self.bias)


def group_of(parent: nn.Module, attr: str) -> str:
    kind = type(parent).__name__
    if attr in ("query", "key", "value"):
        return "qkv"
    if "SelfOutput" in kind:
        return "attn_out"
    return "ffn_in" if "Intermediate" in kind else "ffn_out"


def input_maxima(engine, linears, calibration: list[str]) -> dict[int, torch.Tensor]:
    """Per input channel, the largest |activation| each linear sees on the calibration text."""
    seen: dict[int, torch.Tensor] = {}
    hooks = []
    for _, _, lin in linears:
        def hook(module, inputs, output, key=id(lin)):
            m = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(0)
            seen[key] = torch.maximum(seen[key], m) if key in seen else m
        hooks.append(lin.register_forward_hook(hook))
    ids = engine.encode(calibration)
    for s in range(0, len(ids), 64):
        engine.run(ids[s:s + 64])
    for h in hooks:
        h.remove()
    return seen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quant_sensitivity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="256 held-out texts instead of 512")
    ap.add_argument("--texts", type=Path, help="held-out texts (plain lines or batch JSONL)")
    args = ap.parse_args(argv)
    from gristmill.kernels import texts as builtin
    from gristmill.kernels.classify import ClassifierEngine
    from gristmill.kernels.optimize import agreement, throughput
    from gristmill.kernels.quant import _encoder_linears
    from gristmill.producers.registry import DEFAULT_CLASSIFIER as spec
    from gristmill.workers.loading import classifier_kwargs
    from gristmill.workers.optimize import read_texts

    t0 = time.perf_counter()
    src, kw = spec.resolve_path(), classifier_kwargs(spec)
    heldout = read_texts(args.texts) if args.texts else builtin.sentences(256 if args.quick else 512, heldout=True)
    calibration = builtin.sentences(256)
    ref_engine = ClassifierEngine(src, cpu_precision="fp32", **kw)
    thresholds = {k: spec.threshold(k) for k in ref_engine.labels}
    _, ref = throughput(ref_engine, heldout, repeats=1)
    schemes: dict[str, tuple[dict[str, str | None], float | None]] = {
        "weights only": ({g: None for g in GROUPS}, None),
        "per-tensor": ({g: "tensor" for g in GROUPS}, None),
        "per-row": ({g: "row" for g in GROUPS}, None),
        "smooth 0.5": ({g: "tensor" for g in GROUPS}, 0.5),
        "smooth 0.7": ({g: "tensor" for g in GROUPS}, 0.7),
        **{f"only {g}": ({g: "tensor"}, None) for g in GROUPS},
    }
    results: dict[str, dict] = {}
    for name, (acts, alpha) in schemes.items():
        engine = ClassifierEngine(src, cpu_precision="fp32", **kw)
        linears = list(_encoder_linears(engine.model))
        maxima = input_maxima(engine, linears, calibration) if alpha is not None else {}
        for parent, attr, lin in linears:
            g = group_of(parent, attr)
            if g not in acts:
                continue
            smooth = None
            if alpha is not None:
                a = maxima[id(lin)].clamp(min=1e-5)
                w = lin.weight.detach().abs().amax(0).clamp(min=1e-5)
                smooth = (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)
            setattr(parent, attr, FakeQuantLinear(lin, acts[g], smooth))
        _, new = throughput(engine, heldout, repeats=1)
        results[name] = agreement(ref, new, thresholds)
    rows = [(k, f"{v['top_label']:.1%}", f"{v['flags']:.2%}", f"{v['max_score_delta']:.3f}",
             f"{v['top_label_changes']} ({v['near_ties']} near-ties)") for k, v in results.items()]
    print(table(rows, ("scheme", "top label", "flags", "max delta", "top-label changes")))
    print(json.dumps({"texts": len(heldout), "schemes": results, "wall_s": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
