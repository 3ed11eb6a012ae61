"""Backpressure: several large files submitted at once, with and without the bound on queued lines.

    python -m benchmarks.backpressure [--files 5] [--lines 1000000] [--quick]

One CPU worker (the tiny classifier of benchmarks.load, so the queue, not the model, is measured),
an embedded Redis and a score-cache Redis as `gristmill up` runs them. `--files` `gristmill submit
--wait` processes start together, first with GRISTMILL_MAX_QUEUED_LINES=0 (no bound: each ingest
queues its whole file), then with the default bound, each run on fresh texts. Redis's used memory is
sampled every 0.25 s; each run's peak is reported above the memory Redis held before it, against
one file's size, with the lines per second of the whole run (all files, submit to completed).
The batches' records and results are deleted between runs. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from gristmill.producers.runtime import python_module

from .common import table, write_classification_file
from .load import tiny_models_file
from .queue_overhead import ROOT, stop


class MemorySampler(threading.Thread):
    def __init__(self, r, every_s: float = 0.25):
        super().__init__(daemon=True)
        self.r, self.every_s = r, every_s
        self.base = int(r.info("memory")["used_memory"])
        self.peak = self.base
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.every_s):
            try:
                self.peak = max(self.peak, int(self.r.info("memory")["used_memory"]))
            except Exception:  # noqa: BLE001 - a busy moment: the next sample
                pass


def one_run(files: list[Path], env: dict[str, str], r, bound: int) -> dict:
    run_env = {**env, "GRISTMILL_MAX_QUEUED_LINES": str(bound)}
    sampler = MemorySampler(r)
    sampler.start()
    t0 = time.perf_counter()
    procs = [subprocess.Popen(python_module("gristmill", "submit", str(f), "--wait"), env=run_env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for f in files]
    outs = [p.communicate() for p in procs]
    elapsed = time.perf_counter() - t0
    sampler.halt.set()
    sampler.join()
    failed = [err[-500:] for p, (_, err) in zip(procs, outs) if p.returncode != 0]
    if failed:
        raise RuntimeError(f"a submit failed: {failed[0]}")
    waited = sum("ingest waiting" in err for _, err in outs)
    return {"bound": bound, "elapsed_s": round(elapsed, 1), "peak_above_base_bytes": sampler.peak - sampler.base,
            "submits_that_waited": waited, "batches": [o.strip().splitlines()[-1] for o, _ in outs]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.backpressure", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=5)
    ap.add_argument("--lines", type=int, default=None, help="lines a file (default 1,000,000; --quick: 100,000)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--bound", type=int, default=None, help="GRISTMILL_MAX_QUEUED_LINES (default: the setting's)")
    args = ap.parse_args(argv)
    n = args.lines or (100_000 if args.quick else 1_000_000)

    import redis as redis_lib

    import gristmill.producers.constants as C
    from gristmill.producers.app import make_app
    from gristmill.producers.redis_server import EmbeddedRedis
    from gristmill.producers.settings import Settings
    from gristmill.workers.launcher import wait_for_workers
    bound = args.bound if args.bound is not None else Settings.model_fields["max_queued_lines"].default
    work = Path(tempfile.mkdtemp(prefix="gristmill-backpressure-"))
    mf = tiny_models_file(work)
    base = {k: v for k, v in os.environ.items() if not k.startswith("GRISTMILL_")}
    runs = []
    with EmbeddedRedis(work / "redis") as server, EmbeddedRedis(work / "redis-cache", cache_max_memory="1gb") as cache:
        env = {**base, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               "GRISTMILL_HOME": str(work / "home"), "GRISTMILL_REDIS_URL": server.url,
               "GRISTMILL_DEDUP_REDIS_URL": cache.url, "GRISTMILL_MODELS_FILE": str(mf),
               "GRISTMILL_BUILTIN_MODELS": "false", "GRISTMILL_MAX_BATCH_SIZE": "256",
               "GRISTMILL_TOKEN_BUDGET": str(256 * 64), "GRISTMILL_METRICS_PORT": "0"}
        worker = subprocess.Popen(python_module("gristmill.workers", "worker", "--device", "cpu", "--queues",
                                                "gristmill.classify"), env=env, cwd=ROOT,
                                  stdout=open(work / "worker.log", "wb"), stderr=subprocess.STDOUT)
        r = redis_lib.Redis.from_url(server.url)
        try:
            wait_for_workers(make_app(Settings(redis_url=server.url), server.url), [("worker", worker, work / "worker.log")])
            size = 0
            for k, b in enumerate((0, bound)):
                files = [work / f"run{k}-file{i}.jsonl" for i in range(args.files)]
                for i, f in enumerate(files):
                    size = write_classification_file(f, n, f"run{k}-{i}")
                run = one_run(files, env, r, b)
                for f in files:
                    f.unlink()
                for batch_id in run.pop("batches"):  # their results go before the next run
                    r.delete(*C.batch_keys(batch_id))
                runs.append(run)
        finally:
            stop(worker)
    total = n * args.files
    rows = []
    for run in runs:
        run["lines_per_s"] = round(total / run["elapsed_s"], 1)
        run["peak_vs_one_file"] = round(run["peak_above_base_bytes"] / size, 2)
        rows.append(("no bound" if not run["bound"] else f"bound {run['bound']:,} lines", f"{run['elapsed_s']:.0f} s",
                     f"{run['lines_per_s']:,.0f}", f"{run['peak_above_base_bytes'] / 2**20:,.0f} MB",
                     f"{run['peak_vs_one_file']:.2f}x", str(run["submits_that_waited"])))
    figures = {"files": args.files, "lines_per_file": n, "file_mb": round(size / 2**20, 1), "runs": runs,
               "lines_per_s_bounded_vs_unbounded": round(runs[1]["lines_per_s"] / runs[0]["lines_per_s"], 3),
               "bounded_peak_vs_one_file": runs[1]["peak_vs_one_file"]}
    print(f"{args.files} files of {n:,} classification lines ({size / 2**20:.0f} MB each) submitted at once; "
          f"one CPU worker with a tiny classifier")
    print(table(rows, ("ingest", "all completed", "lines/s", "Redis peak above start", "vs one file",
                       "submits that waited")))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
