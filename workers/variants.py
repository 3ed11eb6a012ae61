"""Which variant of a registered classifier a worker serves, and why.

With no configuration a worker serves the fastest variant whose stored agreement with the fp32
model meets the floor on its device:
- on a CPU, an artifact that `gristmill optimize MODEL` kept in the model's optimized directory
  ($GRISTMILL_HOME/models/optimized/<model>: a cascade, a plain student or int8 artifact, or a torch
  recipe such as compiled int8-rows, which needs a C++ compiler on the host) when the
  agreement it measured on held-out text meets GRISTMILL_VARIANT_MIN_FLAGS and
  GRISTMILL_VARIANT_MIN_TEXTS; the fastest of those that do;
- else the torch engine in bf16 where the device has native bf16 (every GPU; CPUs with AVX-512
  BF16 or AMX), which measured 100% flag agreement with fp32 (benchmarks/README.md), else fp32.
A registration whose path is itself an artifact is served as registered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..producers.registry import ModelSpec
from ..producers.settings import Settings


@dataclass(frozen=True)
class VariantChoice:
    """What to load for a model, and the reason a person reads in `gristmill models`."""
    path: Path
    reason: str
    artifact: bool  # an optimized artifact (ONNX Runtime, maybe a cascade), not the torch engine


def optimized_dir(settings: Settings, model: str) -> Path:
    return settings.model_cache_dir / "optimized" / model


def _read(manifest_file: Path) -> dict | None:
    try:
        m = json.loads(manifest_file.read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def _cannot_compile_here(m: dict) -> bool:
    """A compiled torch recipe on a host without the C++ compiler that torch.compile needs on a CPU."""
    from ..kernels.loading import cpu_compiler
    from ..kernels.optimize import TORCH_RECIPE
    return m.get("kind") == TORCH_RECIPE and bool((m.get("engine") or {}).get("compile")) and cpu_compiler() is None


def _stored(manifest_file: Path) -> tuple[float, float, float] | None:
    """(flags, texts identical, speedup) an artifact's build measured, or None (also for a compiled
    torch recipe, or a cascade in front of one, on a host that cannot compile it)."""
    from ..kernels.cascade import MANIFEST_KIND as CASCADE
    m = _read(manifest_file)
    if m is None or _cannot_compile_here(m):
        return None
    if m.get("kind") == CASCADE:  # a cascade runs where its first stage can
        first = _read(manifest_file.parent / str(m.get("student")) / manifest_file.name)
        if first is None or _cannot_compile_here(first):
            return None
    report = m.get("report") or {}
    a = report.get("agreement") or {}
    speed = report.get("speedup_estimate") or report.get("speedup")
    if "flags" not in a or "texts_identical" not in a or not speed:
        return None
    return float(a["flags"]), float(a["texts_identical"]), float(speed)


def choose(spec: ModelSpec, device: str, settings: Settings) -> VariantChoice:
    from ..kernels.loading import cpu_has_bf16
    from ..kernels.onnx_engine import MANIFEST
    path = spec.resolve_path()
    if path.is_dir() and (path / MANIFEST).is_file():
        return VariantChoice(path, "registered as an optimized artifact", True)
    on_cpu = device == "cpu"
    if on_cpu and settings.auto_variants and not spec.is_generator:
        best: tuple[float, Path, str] | None = None
        root = optimized_dir(settings, spec.name)
        for manifest in sorted(root.glob(f"*/{MANIFEST}")) if root.is_dir() else []:
            stored = _stored(manifest)
            if stored is None:
                continue
            flags, texts, speed = stored
            if flags >= settings.variant_min_flags and texts >= settings.variant_min_texts and \
                    (best is None or speed > best[0]):
                best = (speed, manifest.parent, f"{manifest.parent.name}: its build measured flags {flags:.4%} and "
                                                f"{texts:.2%} of texts identical to fp32 (floors "
                                                f"{settings.variant_min_flags:.4%}, {settings.variant_min_texts:.2%}), "
                                                f"{speed:.2f}x fp32")
        if best is not None:
            return VariantChoice(best[1], best[2], True)
    if not on_cpu:
        return VariantChoice(path, f"torch bf16 on {device}", False)
    precision = settings.cpu_precision
    if precision == "auto":
        precision = "bf16" if cpu_has_bf16() else "fp32"
        why = "the CPU has native bf16" if precision == "bf16" else "the CPU has no native bf16"
    else:
        why = "GRISTMILL_CPU_PRECISION"
    return VariantChoice(path, f"torch {precision} ({why}); no optimized artifact meets the floors", False)
