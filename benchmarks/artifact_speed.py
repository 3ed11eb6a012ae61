"""Artifacts against fp32 and each other, timed in turns in one process: speed and agreement.

    python -m benchmarks.artifact_speed DIR [DIR ...] [--rounds N] [--texts FILE] [--traffic-share F] [--served]

Each DIR is a `gristmill optimize` artifact of the default classifier (say, the same student
quantized two ways, a compiled torch recipe, or a cascade), loaded as a worker loads it. Every round
times fp32 eager, bf16 where the CPU has it (what a worker serves without an artifact), and then
each artifact once over the held-out texts (workers/optimize.heldout_texts, or --texts; with
--traffic-share, the part benchmarks.engine_variants judges on), batch 64, sorted by characters;
with --served (implied by a cascade), every engine is timed as a worker runs it instead, through a
micro-batcher that gathers a cascade's escalated inputs into batches of their own (workers/host.py
`served_throughput`). The best round of each counts, so a burst of noise on a shared machine hits
every engine alike. Also: flags and texts identical against fp32, and against the engine's own
scores with the texts shuffled into other batches (benchmarks.engine_variants `batch_independence`).
Prints a table, then one JSON line: {"fp32": {"items_per_s"}, "NAME": {"speedup", "agreement", ...}},
each artifact named by its directory's name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import add_traffic_share_arg, table, traffic_split


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.artifact_speed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--texts", type=Path, help="held-out texts (plain lines or batch JSONL)")
    ap.add_argument("--served", action="store_true", help="time every engine as a worker runs it, through a "
                                                          "micro-batcher (implied where an artifact is a cascade)")
    add_traffic_share_arg(ap, "the held-out texts")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    from gristmill.kernels.onnx_engine import MANIFEST, read_manifest
    missing = [str(p) for p in args.artifacts if not (p / MANIFEST).is_file()]
    if missing:
        ap.error(f"not an artifact directory (no {MANIFEST}): {', '.join(missing)}")

    from gristmill.kernels.classify import ClassifierEngine
    from gristmill.kernels.loading import cpu_has_bf16
    from gristmill.kernels.optimize import agreement, throughput
    from gristmill.producers.registry import DEFAULT_CLASSIFIER
    from gristmill.producers.settings import Settings
    from gristmill.workers.host import served_throughput, timed_in_turns
    from gristmill.workers.loading import classifier_kwargs, load_optimized
    from gristmill.workers.optimize import decision_thresholds, heldout_texts

    from .engine_variants import batch_independence
    spec = DEFAULT_CLASSIFIER
    kw = classifier_kwargs(spec)
    heldout = traffic_split(heldout_texts(args.texts), args.traffic_share)[1]
    manifests = [read_manifest(p) for p in args.artifacts]
    served = args.served or any(m.get("kind") == "cascade" for m in manifests)
    engines = {"fp32": ClassifierEngine(spec.resolve_path(), cpu_precision="fp32", **kw)}
    if cpu_has_bf16():
        engines["bf16"] = ClassifierEngine(spec.resolve_path(), cpu_precision="bf16", **kw)
    settings = Settings()
    engines.update({name: load_optimized(p, m, kw, settings)
                    for name, p, m in zip(artifact_names(args.artifacts), args.artifacts, manifests)})
    thresholds = decision_thresholds(spec, engines["fp32"].labels)

    best, scores = timed_in_turns(engines, heldout, rounds=args.rounds,
                                  timer=served_throughput if served else throughput)
    if served:  # a cascade's rows also carry the stage that decided them
        scores = {name: [{k: r[k] for k in thresholds} for r in rows] for name, rows in scores.items()}
    out: dict[str, dict] = {"fp32": {"items_per_s": round(best["fp32"], 1)}}
    rows = [("fp32", engines["fp32"].variant, f"{best['fp32']:,.0f}", "1.00x", "100%", "100%", "-")]
    for name, engine in list(engines.items())[1:]:
        a = agreement(scores["fp32"], scores[name], thresholds)
        stable = batch_independence(engine, heldout, scores[name], thresholds)
        out[name] = {"variant": engine.variant, "items_per_s": round(best[name], 1),
                     "speedup": round(best[name] / best["fp32"], 2), "agreement": a, "batch_independence": stable}
        rows.append((name, engine.variant, f"{best[name]:,.0f}", f"{best[name] / best['fp32']:.2f}x",
                     f"{a['flags']:.3%}", f"{a['texts_identical']:.2%}", f"{stable['texts_identical']:.2%}"))
    how = "timed as a worker runs them, through a micro-batcher" if served else "batch 64, sorted by characters"
    print(f"{len(heldout):,} held-out texts, best of {args.rounds} rounds, {how}")
    print(table(rows, ("artifact", "engine", "items/s", "vs fp32", "flags", "texts identical",
                       "shuffled batches: texts identical")))
    print(json.dumps(out))
    return 0


def artifact_names(paths: list[Path]) -> list[str]:
    """Each artifact's row name: its directory's, with the parent's where two share it or it is a
    baseline's ("fp32", "bf16"), and a count where the same directory is given again (timed again)."""
    base = [p.name for p in paths]
    names = [n if base.count(n) == 1 and n not in ("fp32", "bf16") else f"{p.parent.name}/{n}"
             for n, p in zip(base, paths)]
    return [n if names[:i].count(n) == 0 else f"{n} #{names[:i].count(n) + 1}" for i, n in enumerate(names)]


if __name__ == "__main__":
    sys.exit(main())
