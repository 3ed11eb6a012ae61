"""Where a generation run's time goes: torch profiler over one engine run (the generation benchmark's
requests), CPU and device time per operator.

    python -m benchmarks.profile_decode [--device cuda] [--requests N] [--slots N]
"""

from __future__ import annotations

import argparse
import sys

from .generation import add_request_args, load_engine, make_requests


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile_decode")
    add_request_args(ap, device="cuda", requests=256, slots=256)
    args = ap.parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from gristmill.kernels.generate import GenRequest
    eng = load_engine(args)
    prompts, limits = make_requests(eng, args)
    eng.run([GenRequest(p, n, temperature=0) for p, n in zip(prompts, limits)])  # capture graphs first
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if eng.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        eng.run([GenRequest(p, n, temperature=0) for p, n in zip(prompts, limits)])
        if eng.device.type == "cuda":
            torch.cuda.synchronize()
    print(eng.loop.stats if eng.loop else "static loop")
    key = "self_cuda_time_total" if eng.device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
    print(prof.key_averages().table(sort_by=key, row_limit=12))
    return 0


if __name__ == "__main__":
    sys.exit(main())
