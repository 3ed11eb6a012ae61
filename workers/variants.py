"""Which variant of a registered classifier a worker serves, and why.

With no configuration a worker serves the fastest variant whose stored agreement with the fp32
model meets the floor on its device:
- on a CPU, an artifact that `gristmill optimize MODEL` kept in the model's optimized directory
  ($GRISTMILL_HOME/models/optimized/<model>: a cascade, a plain student or int8 artifact, or a torch
  recipe such as compiled int8-rows, which needs a C++ compiler on the host) when the
  agreement it measured on held-out text meets GRISTMILL_VARIANT_MIN_FLAGS and
  GRISTMILL_VARIANT_MIN_TEXTS, and whose measured speed beats (GRISTMILL_VARIANT_MIN_GAIN times) that
  of the engine served without it, measured in the same build; the fastest of those that do;
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


@dataclass(frozen=True)
class StoredFigures:
    """What an artifact's build measured on held-out text against fp32 eager: per-label flag
    agreement, the share of texts whose flags are all identical, its speed, and the speed of the
    engine a worker serves without an artifact (absent from artifacts built before it was measured)."""
    flags: float
    texts: float
    speedup: float
    default_speedup: float | None
    default_variant: str


def _stored(manifest_file: Path) -> StoredFigures | None:
    """The figures an artifact's build measured, or None (also for a compiled torch recipe, or a
    cascade in front of one, on a host that cannot compile it)."""
    from ..kernels.cascade import MANIFEST_KIND as CASCADE
    m = _read(manifest_file)
    if m is None or _cannot_compile_here(m):
        return None
    if m.get("kind") == CASCADE:  # a cascade runs where its first stage (and middle stage) can
        stages = [m.get("student"), *([m["middle"].get("dir")] if isinstance(m.get("middle"), dict) else [])]
        for stage in stages:
            inner = _read(manifest_file.parent / str(stage) / manifest_file.name)
            if inner is None or _cannot_compile_here(inner):
                return None
    report = m.get("report") or {}
    a = report.get("agreement") or {}
    speed = report.get("speedup") or report.get("speedup_estimate")  # cascades built before it was measured: the estimate
    if "flags" not in a or "texts_identical" not in a or not speed:
        return None
    default = report.get("default") or {}
    return StoredFigures(float(a["flags"]), float(a["texts_identical"]), float(speed),
                         float(default["speedup"]) if default.get("speedup") else None, str(default.get("variant", "")))


def choose(spec: ModelSpec, device: str, settings: Settings) -> VariantChoice:
    from ..kernels.loading import cpu_has_bf16
    from ..kernels.onnx_engine import MANIFEST
    path = spec.resolve_path()
    if path.is_dir() and (path / MANIFEST).is_file():
        return VariantChoice(path, "registered as an optimized artifact", True)
    on_cpu = device == "cpu"
    passed_over: list[str] = []  # artifacts that meet the floors but are no faster than the default
    if on_cpu and settings.auto_variants and not spec.is_generator:
        best: tuple[float, Path, str] | None = None
        root = optimized_dir(settings, spec.name)
        for manifest in sorted(root.glob(f"*/{MANIFEST}")) if root.is_dir() else []:
            f = _stored(manifest)
            if f is None or f.flags < settings.variant_min_flags or f.texts < settings.variant_min_texts:
                continue
            name = manifest.parent.name
            if f.default_speedup is not None and f.speedup < settings.variant_min_gain * f.default_speedup:
                passed_over.append(f"{name} ({f.speedup:.2f}x fp32) is slower than {f.default_variant} "
                                   f"({f.default_speedup:.2f}x) by its build's measure")
                continue
            if best is None or f.speedup > best[0]:
                best = (f.speedup, manifest.parent,
                        f"{name}: its build measured flags {f.flags:.4%} and {f.texts:.2%} of texts identical to "
                        f"fp32 (floors {settings.variant_min_flags:.4%}, {settings.variant_min_texts:.2%}), "
                        f"{f.speedup:.2f}x fp32" + (f" ({f.default_variant} {f.default_speedup:.2f}x)"
                                                    if f.default_speedup is not None else ""))
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
    none = "; ".join(passed_over) if passed_over else "no optimized artifact meets the floors"
    return VariantChoice(path, f"torch {precision} ({why}); {none}", False)
