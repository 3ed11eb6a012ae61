"""Engine throughput against max_batch_size (and the padding the token budget leaves), in-process.
The worker defaults (Settings.max_batch_size, token_budget) rest on this table.

    python -m benchmarks.batch_sweep [--device cpu|cuda] [--items N] [--sizes 1,8,16,32,64,128,256]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .common import table, texts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.batch_sweep")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--items", type=int, default=768)
    ap.add_argument("--sizes", default="1,8,16,32,64,128,256")
    ap.add_argument("--precision", default="auto", help="cpu precision: auto, bf16, fp32")
    args = ap.parse_args(argv)

    from gristmill.kernels.classify import ClassifierEngine
    from gristmill.producers.registry import DEFAULT_CLASSIFIER
    from gristmill.workers.batcher import BatchPolicy, Pending, plan
    from gristmill.workers.loading import classifier_kwargs

    eng = ClassifierEngine(DEFAULT_CLASSIFIER.resolve_path(), device=args.device, cpu_precision=args.precision,
                           **classifier_kwargs(DEFAULT_CLASSIFIER))
    ids = eng.encode(texts(args.items, 8, 64, seed=1))
    rows, figures = [], {"device": args.device, "variant": eng.variant, "items": args.items, "by_batch_size": {}}
    base = None
    for size in [int(s) for s in args.sizes.split(",")]:
        policy = BatchPolicy(size, 10**9, 0.0)
        batches = plan([Pending("m", len(x), 0.0) for x in ids], policy, now=0.0, flush=True)
        for b in batches[:2]:
            eng.run([ids[i] for i in b])  # warm-up
        if size == 1:  # one at a time is slow: time every 4th input, spread over all lengths
            batches = batches[::4]
        t = time.perf_counter()
        done = 0
        for b in batches:
            eng.run([ids[i] for i in b])
            done += len(b)
        ips = done / (time.perf_counter() - t)
        base = base or ips
        rows.append((size, f"{ips:,.0f}", f"{ips / base:.2f}"))
        figures["by_batch_size"][size] = round(ips, 1)
    print(f"{eng.variant}, {args.items} inputs of 8-64 words, sorted by length")
    print(table(rows, ("max_batch_size", "items/s", "vs batch 1")))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
