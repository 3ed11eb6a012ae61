"""`gristmill optimize MODEL [--quantize int8] [--prune F] [--calibration FILE] --out DIR`.

Builds an ONNX Runtime artifact of a registered classifier, then judges it against the fp32 eager
reference on held-out text: size, speed, agreement (top label, per-label flags, max score delta).
Under the agreement floor nothing is written unless --force. An artifact whose digest matches is
reused, not rebuilt. Register the directory as a model's `path` and workers load it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def read_texts(path: Path) -> list[str]:
    """Plain lines, or batch-input JSONL lines whose body.input (string or list) is taken."""
    out: list[str] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            body = obj.get("body")
            value = body.get("input") if isinstance(body, dict) else None
            if value is None:
                raise SystemExit(f"{path}:{n}: a JSON line needs body.input (or write plain text lines)")
            out += [value] if isinstance(value, str) else list(value)
        else:
            out.append(line)
    if not out:
        raise SystemExit(f"{path}: no texts")
    return out


def judge(spec, src: Path, artifact: Path, heldout: list[str]) -> dict:
    from ..kernels.classify import ClassifierEngine
    from ..kernels.onnx_engine import OnnxClassifierEngine
    from ..kernels.optimize import agreement, throughput
    from .host import classifier_kwargs
    kw = classifier_kwargs(spec)
    ref = ClassifierEngine(src, cpu_precision="fp32", **kw)
    new = OnnxClassifierEngine(artifact, **kw)
    ref_ips, ref_scores = throughput(ref, heldout)
    new_ips, new_scores = throughput(new, heldout)
    size_ref = sum(f.stat().st_size for f in Path(src).glob("*.safetensors")) or None
    return {"heldout_texts": len(heldout), "fp32_items_per_s": round(ref_ips, 1),
            "items_per_s": round(new_ips, 1), "speedup": round(new_ips / ref_ips, 2),
            "size_bytes": (artifact / "model.onnx").stat().st_size, "fp32_size_bytes": size_ref,
            "agreement": agreement(ref_scores, new_scores, {k: spec.threshold(k) for k in ref.labels})}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="gristmill optimize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a registered classifier (name or alias)")
    ap.add_argument("--quantize", choices=["int8", "none"], default="int8")
    ap.add_argument("--prune", type=float, default=0.0, help="fraction of FFN neurons to remove (half as many heads)")
    ap.add_argument("--distill-steps", type=int, default=0,
                    help="after pruning, train the pruned model this many steps to match the unpruned one on the "
                         "calibration text (default 0: it did not help on the built-in sentences; try it with "
                         "thousands of lines of your own traffic)")
    ap.add_argument("--calibration", type=Path, help="texts for pruning importance (default: built-in sentences)")
    ap.add_argument("--texts", type=Path, help="held-out texts for the agreement check (default: built-in)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--min-agreement", type=float, default=0.97, help="top-label agreement floor (default 0.97)")
    ap.add_argument("--force", action="store_true", help="write the artifact even under the floor")
    args = ap.parse_args(argv)

    from ..kernels import texts as builtin
    from ..kernels.optimize import NEAR_TIE, artifact_digest, build_artifact
    from ..kernels.onnx_engine import read_manifest
    from ..producers.errors import GristmillError
    from ..producers.registry import POOLED_KINDS
    from ..producers.settings import Settings
    try:
        specs = Settings().registry.specs
    except GristmillError as e:
        raise SystemExit(str(e))
    spec = specs.get(args.model) or next((s for s in specs.values() if args.model in s.aliases), None)
    if spec is None:
        raise SystemExit(f"no model {args.model!r}; registered: {', '.join(specs)}")
    if spec.is_generator:
        raise SystemExit(f"{spec.name} is a generator; optimize handles classifiers")
    if not 0 <= args.prune < 1:
        raise SystemExit(f"--prune must be in [0, 1), got {args.prune}")
    src = spec.resolve_path()
    quantize = None if args.quantize == "none" else args.quantize
    calibration = read_texts(args.calibration) if args.calibration else builtin.sentences(256)
    heldout = read_texts(args.texts) if args.texts else builtin.sentences(512, heldout=True)
    zero_shot = spec.kind in POOLED_KINDS  # the artifact is the encoder; the head or prototypes stay outside
    digest = artifact_digest(src, zero_shot=zero_shot, quantize=quantize, prune=args.prune,
                             calibration=calibration, max_length=spec.max_input_tokens,
                             distill_steps=args.distill_steps)
    existing = read_manifest(args.out)
    if existing and existing.get("digest") == digest and existing.get("report"):
        print(f"{args.out}: up to date (digest {digest}); reusing it")
        print(json.dumps(existing["report"]))
        return 0
    staging = args.out.with_name(args.out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    manifest = build_artifact(src, staging, zero_shot=zero_shot, quantize=quantize, prune=args.prune,
                              calibration=calibration, max_length=spec.max_input_tokens,
                              distill_steps=args.distill_steps)
    report = judge(spec, src, staging, heldout)
    manifest["report"] = report
    (staging / "gristmill-artifact.json").write_text(json.dumps(manifest, indent=2))
    a = report["agreement"]
    print(f"{manifest['variant']}: {report['speedup']}x fp32 eager ({report['items_per_s']:.0f} vs "
          f"{report['fp32_items_per_s']:.0f} items/s), {report['size_bytes'] / 1e6:.1f} MB; agreement on "
          f"{report['heldout_texts']} held-out texts: top label {a['top_label']:.1%}, flags {a['flags']:.1%}, "
          f"max score delta {a['max_score_delta']:.3f}; {a['top_label_changes']} top-label changes, "
          f"{a['near_ties']} of them near-ties (fp32's two highest scores within {NEAR_TIE})")
    if a["top_label"] < args.min_agreement and not args.force:
        shutil.rmtree(staging, ignore_errors=True)
        print(f"refused: top-label agreement {a['top_label']:.1%} is under the floor {args.min_agreement:.1%}; "
              f"nothing written. Prune less, give calibration text like your traffic, or pass --force.",
              file=sys.stderr)
        return 3
    shutil.rmtree(args.out, ignore_errors=True)
    staging.rename(args.out)
    print(f"wrote {args.out} (digest {digest}); register it as a model path to use it")
    print(json.dumps(report))
    return 0
