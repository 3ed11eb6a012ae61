"""What a worker spends per item around the model: its task path measured in-process, no Celery.

    python -m benchmarks.worker_path [--url moderations|classifications] [--model NAME] [--chunks N]
                                     [--cache-redis 1gb]

Runs `workers.tasks.process_chunk` (the body of the Celery task: begin the chunk, prepare and
tokenize, score-cache lookup, micro-batcher, settle, format, write the part to Redis) on chunks of
validated lines, one chunk at a time on one thread, against an embedded Redis, plus the Celery
message's JSON decode, and times each step where the task calls it. The engine's own time (the
micro-batcher's busy seconds) is subtracted: what is left is the queue's per-item cost, the budget
a worker process's GIL spends per item. Steps are medians over chunks; the totals also as means,
which include the odd chunk a full garbage collection lands in.
On a GPU host, where the model costs microseconds per item, this bounds one worker process's
rate (1e6 / path us per item). The Redis server's own CPU time over the timed chunks (user + system,
AOF writes included, from INFO cpu; less its idle rate, measured for 2 s before, times the timed
seconds: on a CPU a chunk takes seconds of model time) bounds what one Redis can serve: every
worker process shares it. That figure is the workers' side only: ingest and the broker's message traffic come on top.

Lines: `/v1/moderations` (default; under the configured or shipped policy, or the model's own
thresholds where that policy's model is not registered) or `/v1/classifications`, for the url's
default model or `--model NAME` (a tiny registered model keeps the engine's share small, e.g.
GRISTMILL_MODELS_FILE from tests/tinymodels.py with GRISTMILL_BUILTIN_MODELS=false). Every chunk
has fresh texts, so the score cache answers none of them.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .common import add_cache_redis_arg, cache_redis, redis_cpu_s, request_line, table, texts

STEPS = ("prepare", "submit", "settle", "format", "write")
LABELS = (("decode", "message decode (task JSON)"),
          ("prepare", "  prepare: SHA-256, score-cache lookup, tokenize"),
          ("submit", "  submit to the micro-batcher"),
          ("settle", "  settle: score-cache publish"),
          ("format", "  format result lines"),
          ("write", "  write the part (JSON, Redis)"),
          ("other", "  other: begin chunk, waiting beyond the engine"),
          ("task", "task path, engine excluded"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.worker_path", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", choices=("moderations", "classifications"), default="moderations")
    ap.add_argument("--model", default=None, help="a registered classifier (default: the url's default model)")
    ap.add_argument("--chunks", type=int, default=40, help="timed chunks (default 40)")
    ap.add_argument("--chunk-size", type=int, default=256)
    add_cache_redis_arg(ap)
    args = ap.parse_args(argv)

    from gristmill.workers.pinning import pin
    device = pin("cpu")
    work = Path(tempfile.mkdtemp(prefix="gristmill-path-"))
    os.environ.pop("GRISTMILL_REDIS_URL", None)
    os.environ["GRISTMILL_HOME"] = str(work / "home")
    os.environ.setdefault("GRISTMILL_MAX_WAIT_MS", "1")  # one thread submits: nothing else would fill a batch

    from kombu import serialization

    from gristmill.producers.app import SERIALIZER

    import gristmill.producers.constants as C
    from gristmill.producers.redis_server import EmbeddedRedis
    from gristmill.producers.schemas import WorkItem, validate_line
    from gristmill.producers.settings import Settings
    from gristmill.workers import tasks

    with EmbeddedRedis(work / "redis") as server, cache_redis(work, args.cache_redis) as cache_server:
        settings = Settings(redis_url=server.url, dedup_redis_url=cache_server.url if cache_server else None)
        registry = settings.registry
        if args.url == "classifications":
            url, policy = C.CLASSIFICATIONS_URL, None
        else:
            url, policy = C.MODERATIONS_URL, settings.policy()
        wire = policy.wire() if policy is not None else None
        st = tasks.WorkerState(settings, server.url, device)
        try:
            def chunk_message(k: int) -> str:
                items = []
                for i, t in enumerate(texts(args.chunk_size, 8, 64, seed=1000 + k)):
                    it = validate_line(request_line(f"r{k}-{i}", t, url, args.model), i + 1, registry, policy)
                    assert isinstance(it, WorkItem), it
                    items.append(it.to_message())
                # the task's arguments as kombu carries them
                return serialization.dumps([["b", k, items, C.CLASSIFY_QUEUE, wire, time.time()], {}, {}],
                                           serializer=SERIALIZER)

            # Each step of the task timed where run_items calls it (benchmark-only wrappers).
            spent: dict[str, float] = dict.fromkeys(STEPS, 0.0)

            def timed(name: str, fn):
                def wrapper(*a, **kw):
                    t = time.perf_counter()
                    try:
                        return fn(*a, **kw)
                    finally:
                        spent[name] += time.perf_counter() - t
                return wrapper

            st.host.prepare = timed("prepare", st.host.prepare)
            tasks.submit_chunk = timed("submit", tasks.submit_chunk)
            st.host.settle = timed("settle", st.host.settle)
            st.host.format_many = timed("format", st.host.format_many)
            st.store.record = timed("write", st.store.record)

            batch_id = "batch_path"
            st.store.create(batch_id, input_file=None, completion_window="24h", window_s=86400, policy=policy)
            messages = [chunk_message(k) for k in range(args.chunks + 2)]
            rows: list[dict[str, float]] = []
            servers = [st.redis] + ([st.host.cache.r] if cache_server is not None else [])
            cpu0, t_cpu0 = [0.0] * len(servers), 0.0
            idle0, idle_t0 = [redis_cpu_s(x) for x in servers], time.perf_counter()
            time.sleep(2.0)
            idle_per_s = [(redis_cpu_s(x) - i0) / (time.perf_counter() - idle_t0) for x, i0 in zip(servers, idle0)]
            for k, msg in enumerate(messages):
                busy0 = st.batcher.stats.busy_s
                for name in spent:
                    spent[name] = 0.0
                t0 = time.perf_counter()
                ctype, encoding, payload = msg
                (b, chunk, raw_items, queue, pol, sent_at), _, _ = serialization.loads(payload, ctype, encoding)
                t1 = time.perf_counter()
                out = tasks.process_chunk(st, batch_id, chunk, raw_items, queue, pol)
                t2 = time.perf_counter()
                assert out.get("completed") == args.chunk_size, out
                if k < 2:
                    cpu0, t_cpu0 = [redis_cpu_s(x) for x in servers], time.perf_counter()
                    continue  # warm-up
                busy = st.batcher.stats.busy_s - busy0
                row = {"decode": t1 - t0, **spent, "engine": busy}
                row["task"] = t2 - t1 - busy
                row["other"] = row["task"] - sum(spent.values())
                rows.append(row)
            timed_s = time.perf_counter() - t_cpu0
            busy_cpu = [redis_cpu_s(x) - c0 - idle * timed_s for x, c0, idle in zip(servers, cpu0, idle_per_s)]
            # None: below the idle rate's noise (a CPU model's seconds a chunk dwarf a few ms of Redis)
            redis_us, *cache_us = [b / (len(rows) * args.chunk_size) * 1e6 if b > 0 else None for b in busy_cpu]
        finally:
            st.shutdown()

    n = args.chunk_size
    us = {name: statistics.median(r[name] for r in rows) / n * 1e6 for name in rows[0]}
    # The median hides the rare chunk that a full garbage collection lands in; throughput pays for
    # it, so the bound below uses the mean.
    mean_us = {name: statistics.fmean(r[name] for r in rows) / n * 1e6 for name in ("decode", "task", "engine")}
    queue_us = mean_us["decode"] + mean_us["task"]
    model = registry.resolve(url, args.model).name if policy is None else policy.model
    figures = {"url": url, "model": model, "policy": policy.policy_version if policy else None, "chunk_size": n,
               "chunks": args.chunks, "tokenizer_cache": settings.tokenizer_cache,
               "fast_tokenizer": settings.fast_tokenizer,
               **{f"{k}_us_per_item": round(v, 1) for k, v in us.items()},
               "task_mean_us_per_item": round(mean_us["task"], 1),
               "queue_mean_us_per_item": round(queue_us, 1), "queue_bound_items_per_s": round(1e6 / queue_us),
               "queue_share": round(queue_us / (queue_us + mean_us["engine"]), 3),
               "redis_cpu_us_per_item": _round(redis_us), "redis_bound_items_per_s": _round(redis_us and 1e6 / redis_us, 0),
               "cache_redis_cpu_us_per_item": _round(cache_us[0]) if cache_us else None}
    print(table([(label, f"{us[name]:.1f}", f"{mean_us[name]:.1f}" if name in mean_us else "")
                 for name, label in LABELS] +
                [("queue total (decode + task)", f"{us['decode'] + us['task']:.1f}", f"{queue_us:.1f}"),
                 ("engine (micro-batcher busy)", f"{us['engine']:.1f}", f"{mean_us['engine']:.1f}")],
                ("per item", "median over chunks, us", "mean, us")))
    print(f"one worker process's queue path alone: {1e6 / queue_us:,.0f} items/s")
    if redis_us is None:
        print("Redis server CPU for the workers' side: below what its idle rate lets this run measure")
    else:
        print(f"Redis server CPU for the workers' side: {redis_us:.1f} us per item, so one Redis serves at most "
              f"{1e6 / redis_us:,.0f} items/s across all worker processes")
    if cache_us:
        print(f"the score cache's own Redis: {_round(cache_us[0])} us per item")
    print(json.dumps(figures))
    return 0


def _round(v: float | None, digits: int = 1) -> float | None:
    return None if v is None else round(v, digits)


if __name__ == "__main__":
    sys.exit(main())
