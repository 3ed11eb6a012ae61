"""The distillation loop's step time with the teacher's layer states computed once against a
teacher forward in every step, in one process, on the same student, texts and schedule.

    python -m benchmarks.distill_step [--texts 6000] [--steps 60] [--repeats 2] [--threads N]

The real all-MiniLM-L6-v2 teacher and the default moderation head, the 3-of-6-layer student of
`gristmill optimize --prune 0.5 --distill builtin` (kernels/distill.py), the built-in transfer set.
Each mode trains a fresh student for --steps steps (bf16 autocast where the CPU has it, as the
build does); the figure is the mean time of steps 2..N (the first pays for warm-up, the one-off
teacher pass is reported apart). The loss after the last step says both modes learn the same
thing. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .common import table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.distill_step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--texts", type=int, default=6000)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.steps < 3 or args.texts < 64 or args.repeats < 1:
        ap.error("--steps must be at least 3, --texts at least 64, --repeats at least 1")

    import torch
    from transformers import AutoModel, AutoTokenizer

    from gristmill.kernels import corpus, distill, heads
    from gristmill.kernels.loading import cpu_has_bf16
    from gristmill.producers.registry import DEFAULT_CLASSIFIER
    from gristmill.workers.loading import classifier_kwargs
    from gristmill.workers.optimize import decision_thresholds

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = DEFAULT_CLASSIFIER
    src = spec.resolve_path()
    w, b, labels, _ = heads.load_head(classifier_kwargs(spec)["head"])
    thresholds = decision_thresholds(spec, labels)
    teacher = AutoModel.from_pretrained(str(src), attn_implementation="eager", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(src))
    shape = distill.StudentShape.for_fraction(0.5, teacher.config.num_hidden_layers)
    texts = corpus.transfer_set(args.texts, vocab_file=src / "vocab.txt")
    modes = {"teacher forward every step": 0, "teacher states computed once": distill.STATE_CACHE_BYTES}
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode, cache in modes.items():  # alternated, so drift on a shared machine hits both
            student = distill.make_student(teacher, shape)
            stamps: list[float] = []
            t0 = time.perf_counter()
            report = distill.distill_student(
                teacher, student, tok, texts, steps=args.steps, max_length=spec.max_input_tokens, head=(w, b),
                thresholds=[thresholds[k] for k in labels], bf16=cpu_has_bf16(), keep_layers=shape.keep_layers,
                state_cache_bytes=cache, on_step=lambda step: stamps.append(time.perf_counter()) and False)
            runs[mode].append({"step_s": (stamps[-1] - stamps[0]) / (len(stamps) - 1),
                               "setup_s": stamps[0] - t0, "loss": report.losses[-1]})
    best = {m: min(r["step_s"] for r in rs) for m, rs in runs.items()}
    base = best["teacher forward every step"]
    rows = [(m, f"{best[m] * 1000:.0f}", f"{base / best[m]:.2f}x", f"{min(r['setup_s'] for r in rs):.1f}",
             f"{rs[-1]['loss']:.5f}") for m, rs in runs.items()]
    print(f"3-of-6 student, {len(texts):,} transfer texts, batch 64, {args.steps} steps, best of {args.repeats}, "
          f"{torch.get_num_threads()} threads")
    print(table(rows, ("mode", "ms/step", "speedup", "teacher pass + step 1 (s)", f"loss at step {args.steps}")))
    print(json.dumps({"texts": len(texts), "steps": args.steps, "threads": torch.get_num_threads(),
                      "ms_per_step": {m: round(v * 1000, 1) for m, v in best.items()},
                      "speedup": round(base / best["teacher states computed once"], 3),
                      "loss": {m: rs[-1]["loss"] for m, rs in runs.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
