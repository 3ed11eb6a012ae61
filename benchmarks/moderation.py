"""Moderation runs: the default classifier's cross-validated precision/recall, and what the score
cache (dedup) saves on a run with repeated inputs, against the same run with the cache off.

    python -m benchmarks.moderation [--quick] [--lines N] [--repeat-fraction F]

One real worker (the default all-MiniLM-L6-v2 moderation model) on an embedded Redis; three
passes over the same file of moderation lines, where a fraction of the lines repeat earlier texts:
  off     GRISTMILL_DEDUP_TTL_S=0: every input runs;
  first   cache on, first submission: repeats within the batch run once;
  again   the same file resubmitted: every input comes from the cache.
Prints tables, then one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gristmill.producers.runtime import python_module
from gristmill.workers.launcher import wait_for_workers

from .common import table, texts, write_requests
from .queue_overhead import ROOT, stop


def seed_set_figures() -> dict:
    from gristmill.kernels import heads
    from gristmill.producers.registry import DEFAULT_CLASSIFIER
    _, _, _, meta = heads.train(DEFAULT_CLASSIFIER.resolve_path(), heads.SEED_SET)
    return {"examples": meta["examples"], "per_label": meta["cv"]}


def run_pass(client, f: Path, work: Path) -> dict:
    t = time.perf_counter()
    b = client.wait(client.submit_file(f).id, timeout=3600, poll_s=0.05)
    out = work / f"out-{b.id}.jsonl"
    n_out, n_err = client.download(b.id, out)
    elapsed = time.perf_counter() - t
    if b.status != "completed" or n_err:
        raise RuntimeError(f"moderation pass ended {b.status} with {n_err} errors")
    scores = {}
    for line in out.read_text().splitlines():
        o = json.loads(line)
        scores[o["provenance"]["input_sha256"]] = o["response"]["body"]["results"][0]["category_scores"]
    return {"lines": n_out, "items_per_s": n_out / elapsed, "inputs": b.dedup.inputs, "reused": b.dedup.reused,
            "hit_rate": b.dedup.hit_rate, "scores": scores}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.moderation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer lines (about 2 minutes on a 2-core CPU)")
    ap.add_argument("--lines", type=int, default=None)
    ap.add_argument("--repeat-fraction", type=float, default=0.5,
                    help="share of lines whose text repeats an earlier line's (default 0.5)")
    args = ap.parse_args(argv)
    n = args.lines or (2000 if args.quick else 8000)
    rng = random.Random(7)
    unique = texts(n, 8, 64, seed=3)
    lines: list[str] = []
    for i in range(n):
        lines.append(rng.choice(lines) if lines and rng.random() < args.repeat_fraction else unique[i])
    distinct = len(set(lines))

    t_all = time.perf_counter()
    cv = seed_set_figures()
    work = Path(tempfile.mkdtemp(prefix="gristmill-bench-mod-"))
    os.environ.pop("GRISTMILL_REDIS_URL", None)
    os.environ["GRISTMILL_HOME"] = str(work / "home")
    from gristmill.producers.app import make_app
    from gristmill.producers.client import Client
    from gristmill.producers.redis_server import EmbeddedRedis
    from gristmill.producers.settings import Settings
    f = write_requests(work / "in.jsonl", lines, "/v1/moderations")
    passes: dict[str, dict] = {}
    with EmbeddedRedis(work / "redis") as server:
        os.environ["GRISTMILL_REDIS_URL"] = server.url
        settings = Settings()
        app = make_app(settings)
        client = Client(settings)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        warm = write_requests(work / "warm.jsonl", [f"warm up {i}" for i in range(128)], "/v1/moderations")
        for mode, ttl in (("off", "0"), ("on", str(settings.dedup_ttl_s or 86400))):
            log = work / f"worker-{mode}.log"
            proc = subprocess.Popen(python_module("gristmill.workers", "worker", "--device", "cpu", "--queues", "gristmill.classify"), env={**env, "GRISTMILL_DEDUP_TTL_S": ttl},
                                    cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
            try:
                wait_for_workers(app, [(f"worker ({mode})", proc, log)])
                client.wait(client.submit_file(warm).id, timeout=600, poll_s=0.05)
                if mode == "off":
                    passes["off"] = run_pass(client, f, work)
                else:
                    passes["first"] = run_pass(client, f, work)
                    passes["again"] = run_pass(client, f, work)
            finally:
                stop(proc)
        client.close()
    same = all(passes["again"]["scores"][k] == v for k, v in passes["first"]["scores"].items())
    drift = max(abs(passes["off"]["scores"][k][c] - v[c]) for k, v in passes["first"]["scores"].items() for c in v)
    base = passes["off"]["items_per_s"]
    figures = {
        "lines": n, "distinct_texts": distinct, "repeat_fraction": args.repeat_fraction,
        **{f"{k}_items_per_s": round(p["items_per_s"], 1) for k, p in passes.items()},
        **{f"{k}_hit_rate": round(p["hit_rate"], 4) for k, p in passes.items()},
        "first_vs_off": round(passes["first"]["items_per_s"] / base, 2),
        "again_vs_off": round(passes["again"]["items_per_s"] / base, 2),
        "identical_scores_across_batches": same, "max_score_delta_vs_uncached": round(drift, 6),
        "seed_examples": cv["examples"],
        "cv_macro_precision": round(sum(r["precision"] for r in cv["per_label"].values()) / len(cv["per_label"]), 3),
        "cv_macro_recall": round(sum(r["recall"] for r in cv["per_label"].values()) / len(cv["per_label"]), 3),
        "cv": {k: {m: round(v, 3) if isinstance(v, float) else v for m, v in r.items()}
               for k, r in cv["per_label"].items()},
        "wall_s": round(time.perf_counter() - t_all, 1),
    }
    print(f"default classifier, {cv['examples']} seed examples, 4-fold cross-validation, threshold 0.5:")
    print(table([(k, f"{r['precision']:.2f}", f"{r['recall']:.2f}", r["support"]) for k, r in cv["per_label"].items()],
                ("label", "precision", "recall", "support")))
    print()
    print(f"{n} moderation lines, {distinct} distinct texts:")
    print(table([("cache off", f"{passes['off']['items_per_s']:,.0f}", "-", "1.00"),
                 ("cache on, first batch", f"{passes['first']['items_per_s']:,.0f}",
                  f"{passes['first']['hit_rate']:.1%}", f"{figures['first_vs_off']:.2f}"),
                 ("cache on, same file again", f"{passes['again']['items_per_s']:,.0f}",
                  f"{passes['again']['hit_rate']:.1%}", f"{figures['again_vs_off']:.2f}")],
                ("pass", "lines/s", "dedup hit rate", "vs off")))
    print(f"scores identical across the two cached batches: {same}; max delta vs uncached run: {drift:.2e}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
