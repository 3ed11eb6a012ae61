"""What the queue costs next to the model: the same engine, the same machine, one run, three ways.

  (a) engine   the engine called in-process on the texts, tokenization included, with the same
               batch policy the worker uses (sorted and packed within the same in-flight window);
               the ceiling.
  (b) naive    plain Celery, one task per item, a solo-pool worker calling the same engine, results
               through the Celery result backend.
  (c) gristmill  end to end: submit the JSONL file, worker micro-batches, download the results.

    python -m benchmarks.queue_overhead [--device cpu|cuda] [--quick] [--items N] [--model NAME | --tiny-minilm]

CPU: the default classifier (real all-MiniLM-L6-v2 weights), or `--model` (any registered
classifier; a tiny one makes the queue's own Python the bottleneck), or `--tiny-minilm` (MiniLM's
tokenizer over a tiny random BERT: the same, with the real tokenizer), inputs of 8-64 words.
CUDA: all-MiniLM-L6-v2's architecture with random weights, bf16, inputs of 128 tokens.
Engine and end-to-end passes alternate `--repeats` times and the best of each is compared (this
machine's run-to-run noise is +-5-10%); every pass is listed in the JSON line. Each round draws
fresh texts (the engine and gristmill passes of a round share them), so that gristmill's score
cache, which answers a text it has scored before without running the model, cannot answer a timed
pass; a pass whose worker engine ran fewer items than it submitted is refused. Prints a table,
then one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gristmill.producers.runtime import python_module
from gristmill.workers.launcher import share_cores, wait_for_workers

from .common import add_cache_redis_arg, cache_redis, random_minilm_classifier, table, texts, write_requests

ROOT = Path(__file__).resolve().parent.parent


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def engine_runner(settings, device: str, model: str):
    """A timed pass of the ceiling: (items/s, info) for a list of texts; engine loaded once."""
    from gristmill.workers.batcher import BatchPolicy, Pending, plan
    from gristmill.workers.host import EngineHost

    host = EngineHost(settings, device)
    eng = host.engine(model)
    policy = BatchPolicy(settings.max_batch_size, settings.token_budget, settings.max_wait_ms / 1000)
    window = settings.chunk_size * settings.worker_concurrency

    def once(xs: list[str]) -> dict:
        n = padded = real = batches = 0
        for start in range(0, len(xs), window):
            ids: list[list[int]] = []
            for c in range(start, min(start + window, len(xs)), settings.chunk_size):
                ids += eng.encode(xs[c: c + settings.chunk_size])
            for b in plan([Pending("m", len(x), 0.0) for x in ids], policy, now=0.0, flush=True):
                out = eng.run([ids[i] for i in b])
                assert len(out) == len(b)
                n += len(b)
                batches += 1
                padded += len(b) * max(len(ids[i]) for i in b)
                real += sum(len(ids[i]) for i in b)
        if device.startswith("cuda"):
            import torch
            torch.cuda.synchronize()
        return {"items": n, "batches": batches, "padding_waste": 1 - real / padded}

    def timed(items: list[str]) -> tuple[float, dict]:
        t = time.perf_counter()
        info = once(items)
        return len(items) / (time.perf_counter() - t), info

    once(["warm up"] * (2 * settings.max_batch_size))
    return timed, host


def run_naive(app, env, device: str, model: str, items: list[str], logdir: Path) -> float:
    from .naive_worker import NAIVE_QUEUE, NAIVE_TASK
    log = logdir / "naive.log"
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.naive_worker", "--device", device, "--model", model],
                            env=env, cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        wait_for_workers(app, [("naive worker", proc, log)], prefix="naive-")
        for r in [app.send_task(NAIVE_TASK, args=[t], queue=NAIVE_QUEUE) for t in items[:16]]:
            r.get(timeout=120)  # warm-up
        t = time.perf_counter()
        results = [app.send_task(NAIVE_TASK, args=[x], queue=NAIVE_QUEUE) for x in items]
        for r in results:
            r.get(timeout=600)
        return len(items) / (time.perf_counter() - t)
    finally:
        stop(proc)


def gristmill_pass(app, client, url_path: str, model: str | None, items: list[str], work: Path) -> tuple[float, dict]:
    """One timed end-to-end pass on a warm worker: submit the file, wait, download everything."""
    app.control.broadcast("gristmill_reset_stats", reply=True, timeout=2)
    f = write_requests(work / "in.jsonl", items, url_path, model)
    t = time.perf_counter()
    b = client.submit_file(f)
    b = client.wait(b.id, timeout=3600, poll_s=0.02)
    n_out, n_err = client.download(b.id, work / "out.jsonl", work / "err.jsonl")
    elapsed = time.perf_counter() - t
    if b.status != "completed" or n_out != len(items) or n_err:
        raise RuntimeError(f"gristmill run ended {b.status} with {n_out} outputs, {n_err} errors")
    replies = app.control.broadcast("gristmill_stats", reply=True, timeout=5)
    stats = merge_stats([next(iter(r.values()))["batcher"] for r in replies])
    if stats["items"] < len(items):
        raise RuntimeError(f"the workers' engines ran {stats['items']} of {len(items)} items: the rest were answered "
                           "without the model (score cache?), so this pass would not measure the queue")
    # the share of the pass the worker engines spent running batches (summed over processes)
    stats["busy_share"] = stats["busy_s"] / elapsed
    return len(items) / elapsed, stats


def merge_stats(parts: list[dict]) -> dict:
    """One batcher summary over the worker processes (several per GPU with --instances)."""
    tot = {k: sum(p[k] for p in parts) for k in ("batches", "items", "busy_s", "real_tokens", "padded_tokens")}
    return {"items": tot["items"], "mean_batch_size": tot["items"] / max(1, tot["batches"]),
            "padding_waste": 1 - tot["real_tokens"] / tot["padded_tokens"] if tot["padded_tokens"] else 0.0,
            # per process: the engine's rate while it ran (processes time-share one GPU)
            "items_per_busy_s": tot["items"] / tot["busy_s"] if tot["busy_s"] else 0.0, "busy_s": tot["busy_s"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.queue_overhead", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    ap.add_argument("--quick", action="store_true", help="fewer items (under 4 minutes on a 2-core CPU)")
    ap.add_argument("--items", type=int, default=None)
    ap.add_argument("--naive-items", type=int, default=None, help="items for the (slow) naive baseline")
    ap.add_argument("--instances", type=int, default=None,
                    help="gristmill worker processes on the device (default: GRISTMILL_INSTANCES_PER_GPU; 8 on cuda)")
    ap.add_argument("--model", default=None,
                    help="CPU: a registered classifier to run (default: the default moderation model, via /v1/moderations)")
    ap.add_argument("--tiny-minilm", action="store_true",
                    help="CPU: MiniLM's tokenizer over a 2-layer, 32-wide random BERT (registered as "
                         "minilm-tiny), so that the queue's own path, real tokenizer included, is the bottleneck")
    ap.add_argument("--repeats", type=int, default=None,
                    help="interleaved engine / end-to-end passes; the best of each is reported (default 2, 3 without --quick)")
    add_cache_redis_arg(ap)
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    from gristmill.workers.pinning import pin
    device = pin(args.device)  # same thread and device settings as a worker, before torch loads

    work = Path(tempfile.mkdtemp(prefix="gristmill-bench-"))
    os.environ.pop("GRISTMILL_REDIS_URL", None)
    os.environ.pop("GRISTMILL_DEDUP_REDIS_URL", None)
    os.environ["GRISTMILL_HOME"] = str(work / "home")
    if cuda:
        # DESIGN.md's reference point: MiniLM-L6 at 128 tokens; batches of 2048 fill an H100.
        n = args.items or (100_000 if args.quick else 400_000)
        naive_n = args.naive_items or 2000
        def items_for(k: int) -> list[str]:
            return texts(n, 126, 126, seed=k)  # 128 tokens each with [CLS] and [SEP]
        path = random_minilm_classifier(work / "minilm-random")
        mf = work / "models.json"
        mf.write_text(json.dumps([{"name": "minilm-random", "kind": "sequence_classifier", "path": str(path),
                                   "max_input_tokens": 128}]))
        os.environ.update(GRISTMILL_MODELS_FILE=str(mf), GRISTMILL_BUILTIN_MODELS="false")
        os.environ.setdefault("GRISTMILL_MAX_BATCH_SIZE", "2048")
        os.environ.setdefault("GRISTMILL_TOKEN_BUDGET", str(2048 * 128))
        os.environ.setdefault("GRISTMILL_CHUNK_SIZE", "2048")
        os.environ.setdefault("GRISTMILL_WORKER_CONCURRENCY", "4")
        os.environ.setdefault("GRISTMILL_INSTANCES_PER_GPU", "8")
        model, url_path, body_model = "minilm-random", "/v1/classifications", "minilm-random"
    else:
        n = args.items or (2000 if args.quick else 8000)
        naive_n = args.naive_items or (400 if args.quick else 1500)
        def items_for(k: int) -> list[str]:
            return texts(n, 8, 64, seed=k)
        from gristmill.producers.registry import DEFAULT_CLASSIFIER
        if args.tiny_minilm:
            mf = work / "models.json"
            mf.write_text(json.dumps([{"name": "minilm-tiny", "kind": "sequence_classifier", "max_input_tokens": 128,
                                       "path": str(random_minilm_classifier(work / "minilm-tiny", tiny=True))}]))
            os.environ.update(GRISTMILL_MODELS_FILE=str(mf), GRISTMILL_BUILTIN_MODELS="false")
            args.model = "minilm-tiny"
        if args.model:
            model, url_path, body_model = args.model, "/v1/classifications", args.model
        else:
            model, url_path, body_model = DEFAULT_CLASSIFIER.name, "/v1/moderations", None

    from gristmill.producers.app import make_app
    from gristmill.producers.redis_server import EmbeddedRedis
    from gristmill.producers.settings import Settings

    from gristmill.producers.client import Client

    repeats = args.repeats or (2 if args.quick else 3)
    t_all = time.perf_counter()
    with EmbeddedRedis(work / "redis") as server, cache_redis(work, args.cache_redis) as cache_server:
        os.environ["GRISTMILL_REDIS_URL"] = server.url
        if cache_server is not None:
            os.environ["GRISTMILL_DEDUP_REDIS_URL"] = cache_server.url
        settings = Settings()
        app = make_app(settings)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        naive_ips = run_naive(app, env, device, model, items_for(0)[:naive_n], work)

        # This machine is noisy: engine and end-to-end passes alternate, the worker stays warm
        # and idle during engine passes, and the best pass of each is compared.
        instances = args.instances or settings.instances_per_gpu
        procs = []
        for k in range(instances):
            log = work / f"gristmill-worker-{k}.log"
            procs.append((f"gristmill worker {k}", subprocess.Popen(
                python_module("gristmill.workers", "worker", "--device", device, "--queues", "gristmill.classify"),
                env=share_cores({**env, "GRISTMILL_METRICS_OFFSET": str(k)}, instances), cwd=ROOT, stdout=open(log, "wb"),
                stderr=subprocess.STDOUT), log))
        try:
            wait_for_workers(app, procs, want=instances, prefix="gristmill-")
            client = Client(settings)
            warm = write_requests(work / "warm.jsonl", items_for(repeats + 1)[: 2 * settings.max_batch_size], url_path,
                                  body_model)
            client.wait(client.submit_file(warm).id, timeout=600, poll_s=0.05)
            engine_timed, host = engine_runner(settings, device, model)
            engine_runs, grist_runs = [], []
            for k in range(1, repeats + 1):
                items = items_for(k)  # fresh texts each round: nothing in the score cache
                engine_runs.append(engine_timed(items))
                grist_runs.append(gristmill_pass(app, client, url_path, body_model, items, work))
            host.shutdown()
            client.close()
        finally:
            for _, p, _ in procs:
                stop(p)
    engine_ips, einfo = max(engine_runs, key=lambda r: r[0])
    grist_ips, stats = max(grist_runs, key=lambda r: r[0])
    figures = {
        "device": args.device, "model": model, "items": n, "naive_items": naive_n,
        "chunk_size": settings.chunk_size, "max_batch_size": settings.max_batch_size,
        "token_budget": settings.token_budget, "worker_concurrency": settings.worker_concurrency,
        "instances": instances, "cache_redis": args.cache_redis,
        "engine_items_per_s": round(engine_ips, 1), "naive_items_per_s": round(naive_ips, 1),
        "gristmill_items_per_s": round(grist_ips, 1),
        "e2e_vs_engine": round(grist_ips / engine_ips, 3), "e2e_vs_naive": round(grist_ips / naive_ips, 2),
        "mean_batch_size": round(stats["mean_batch_size"], 1), "padding_waste": round(stats["padding_waste"], 3),
        "worker_engine_items_per_busy_s": round(stats["items_per_busy_s"], 1),
        "engine_padding_waste": round(einfo["padding_waste"], 3), "repeats": repeats,
        "engine_runs": [round(r[0], 1) for r in engine_runs], "gristmill_runs": [round(r[0], 1) for r in grist_runs],
        # each round's gristmill pass over its own engine pass: the spread this machine's noise gives
        "e2e_vs_engine_rounds": [round(g[0] / e[0], 3) for e, g in zip(engine_runs, grist_runs)],
        "gristmill_busy_shares": [round(r[1]["busy_share"], 3) for r in grist_runs],
        "gristmill_busy_rates": [round(r[1]["items_per_busy_s"], 1) for r in grist_runs],
        "wall_s": round(time.perf_counter() - t_all, 1),
    }
    print(table([("engine, in-process (ceiling)", n, f"{engine_ips:,.0f}", "1.00"),
                 ("naive Celery, 1 task/item", naive_n, f"{naive_ips:,.0f}", f"{naive_ips / engine_ips:.2f}"),
                 ("gristmill, submit -> results", n, f"{grist_ips:,.0f}", f"{grist_ips / engine_ips:.2f}")],
                ("path", "items", "items/s", "vs engine")))
    print(f"gristmill: mean batch {stats['mean_batch_size']:.1f}, padding waste {stats['padding_waste']:.1%} "
          f"(engine ceiling {einfo['padding_waste']:.1%}); e2e/naive {grist_ips / naive_ips:.1f}x")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
