"""Load: a very large submission with a tiny model on the CPU, watching memory.

    python -m benchmarks.load [--lines 1000000] [--quick] [--cache-redis 1gb]

A `gristmill submit --wait` process, one worker process (a 2-layer, 64-wide BERT classifier with
random weights and MiniLM's tokenizer, so the queue, not the model, is what is measured) and an
embedded Redis. Every second it samples the resident memory of the producer and the worker and
Redis's used memory; then it downloads the results (streamed) and checks one line per input, and
reports what the stored results hold in Redis (MEMORY USAGE of the batch's results hash) and the
Redis server's CPU per line over the run (INFO cpu, less its idle rate measured for 2 s first): one
server answers the producer and every worker, so 1e6 / that is the most lines/s one Redis serves.
With --cache-redis the score cache runs on a second server, as `gristmill up` runs it, and its
memory and CPU are reported apart. Prints a table, then one JSON line of the figures.
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

import psutil

from gristmill.producers.runtime import python_module

from .common import add_cache_redis_arg, cache_redis, redis_cpu_s, table, texts
from .queue_overhead import ROOT, stop


def tiny_models_file(work: Path) -> Path:
    """A models file registering `tiny_classifier` as the model "tiny", under `work`."""
    model = tiny_classifier(work / "tiny")
    mf = work / "models.json"
    mf.write_text(json.dumps([{"name": "tiny", "kind": "sequence_classifier", "path": str(model),
                               "max_input_tokens": 64}]))
    return mf


def tiny_classifier(out: Path) -> Path:
    import shutil

    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from gristmill.producers.registry import DEFAULT_CLASSIFIER
    src = DEFAULT_CLASSIFIER.resolve_path()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=128, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return out


def write_file(path: Path, n: int) -> int:
    pool = texts(4096, 4, 24, seed=5)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/classifications",
                                "body": {"input": pool[i % len(pool)] + f" {i}"}}) + "\n")
    return path.stat().st_size


class Sampler(threading.Thread):
    """RSS of the named processes and Redis's used memory, once a second."""

    def __init__(self, procs: dict[str, int], redis_client, cache_client=None):
        super().__init__(daemon=True)
        self.procs = {k: psutil.Process(pid) for k, pid in procs.items()}
        self.r = redis_client
        self.servers = {"redis": redis_client, **({"cache_redis": cache_client} if cache_client is not None else {})}
        self.samples: list[dict] = []
        self.halt = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.halt.wait(1.0):
            row = {"t": round(time.monotonic() - t0, 1)}
            for k, p in self.procs.items():
                try:
                    row[k] = p.memory_info().rss
                except psutil.Error:
                    row[k] = None
            for k, server in self.servers.items():
                try:
                    row[k] = int(server.info("memory")["used_memory"])
                except Exception:  # noqa: BLE001
                    row[k] = None
            self.samples.append(row)

    def peak(self, key: str) -> int:
        return max((s[key] for s in self.samples if s.get(key)), default=0)

    def at(self, key: str, frac: float) -> int | None:
        vals = [s[key] for s in self.samples if s.get(key)]
        return vals[min(len(vals) - 1, int(frac * len(vals)))] if vals else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=None, help="default 1,000,000 (--quick: 100,000)")
    ap.add_argument("--quick", action="store_true")
    add_cache_redis_arg(ap)
    args = ap.parse_args(argv)
    n = args.lines or (100_000 if args.quick else 1_000_000)
    work = Path(tempfile.mkdtemp(prefix="gristmill-load-"))
    os.environ.pop("GRISTMILL_REDIS_URL", None)
    os.environ.pop("GRISTMILL_DEDUP_REDIS_URL", None)
    os.environ["GRISTMILL_HOME"] = str(work / "home")
    mf = tiny_models_file(work)
    os.environ.update(GRISTMILL_MODELS_FILE=str(mf), GRISTMILL_BUILTIN_MODELS="false",
                      GRISTMILL_MAX_BATCH_SIZE="256", GRISTMILL_TOKEN_BUDGET=str(256 * 64))
    f = work / "in.jsonl"
    size = write_file(f, n)

    import redis as redis_lib

    import gristmill.producers.constants as C
    from gristmill.producers.app import make_app
    from gristmill.producers.client import Client
    from gristmill.producers.redis_server import EmbeddedRedis
    from gristmill.producers.settings import Settings
    from gristmill.workers.launcher import wait_for_workers
    with EmbeddedRedis(work / "redis") as server, cache_redis(work, args.cache_redis) as cache_server:
        os.environ["GRISTMILL_REDIS_URL"] = server.url
        if cache_server is not None:
            os.environ["GRISTMILL_DEDUP_REDIS_URL"] = cache_server.url
        cr = redis_lib.Redis.from_url(cache_server.url) if cache_server is not None else None
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        log = work / "worker.log"
        worker = subprocess.Popen(python_module("gristmill.workers", "worker", "--device", "cpu", "--queues", "gristmill.classify"), env=env, cwd=ROOT,
                                  stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        try:
            wait_for_workers(make_app(Settings()), [("worker", worker, log)])
            r = redis_lib.Redis.from_url(server.url)
            redis_pid = int(r.info("server")["process_id"])
            servers = [r] + ([cr] if cr is not None else [])
            idle0, idle_t0 = [redis_cpu_s(x) for x in servers], time.perf_counter()
            time.sleep(2.0)
            idle_per_s = [(redis_cpu_s(x) - i0) / (time.perf_counter() - idle_t0) for x, i0 in zip(servers, idle0)]
            cpu0 = [redis_cpu_s(x) for x in servers]
            t0 = time.perf_counter()
            producer = subprocess.Popen(python_module("gristmill", "submit", str(f), "--wait"), env=env,
                                        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            sampler = Sampler({"producer": producer.pid, "worker": worker.pid, "redis_rss": redis_pid}, r, cr)
            sampler.start()
            out, _ = producer.communicate()
            elapsed = time.perf_counter() - t0
            busy = [redis_cpu_s(x) - c0 - idle * elapsed for x, c0, idle in zip(servers, cpu0, idle_per_s)]
            redis_busy_s = busy[0]
            batch_id = out.strip().splitlines()[-1]
            client = Client(Settings())
            t1 = time.perf_counter()
            dl = Sampler({"downloader": os.getpid()}, r, None)
            dl.start()
            n_out, n_err = client.download(batch_id, work / "out.jsonl", work / "err.jsonl")
            dl.halt.set()
            sampler.halt.set()
            download_s = time.perf_counter() - t1
            b = client.get(batch_id)
            # what the results alone hold in Redis until RESULT_TTL_S (every field counted)
            results_bytes = int(r.memory_usage(C.results_key(batch_id), samples=0) or 0)
            client.close()
        finally:
            stop(worker)
    ids = set()
    with open(work / "out.jsonl") as fo:
        for line in fo:
            ids.add(json.loads(line)["custom_id"])
    mb = 1 / 2**20
    figures = {
        "lines": n, "file_mb": round(size * mb, 1), "status": b.status, "outputs": n_out, "errors": n_err,
        "unique_custom_ids": len(ids), "items_per_s": round(n / elapsed, 1), "elapsed_s": round(elapsed, 1),
        "download_s": round(download_s, 1),
        "producer_rss_mb": {k: round((sampler.at("producer", q) or 0) * mb, 1) for k, q in
                            (("p10", 0.1), ("p50", 0.5), ("p90", 0.9))},
        "producer_peak_rss_mb": round(sampler.peak("producer") * mb, 1),
        "worker_rss_mb": {k: round((sampler.at("worker", q) or 0) * mb, 1) for k, q in
                          (("p10", 0.1), ("p50", 0.5), ("p90", 0.9))},
        "worker_peak_rss_mb": round(sampler.peak("worker") * mb, 1),
        "downloader_peak_rss_mb": round(dl.peak("downloader") * mb, 1),
        "redis_used_peak_mb": round(sampler.peak("redis") * mb, 1),
        "redis_rss_peak_mb": round(sampler.peak("redis_rss") * mb, 1),
        "redis_cpu_us_per_line": round(redis_busy_s / n * 1e6, 1),
        "cache_redis": None if cr is None else {
            "max_memory": args.cache_redis, "used_peak_mb": round(sampler.peak("cache_redis") * mb, 1),
            "cpu_us_per_line": round(busy[1] / n * 1e6, 1)},
        "results_mb": round(results_bytes * mb, 1), "results_bytes_per_line": round(results_bytes / max(n_out + n_err, 1)),
    }
    print(table([("submit -> completed", f"{n:,}", f"{elapsed:.0f} s", f"{n / elapsed:,.0f}/s"),
                 ("producer RSS (10/50/90% of the run, peak)",
                  "/".join(f"{v:.0f}" for v in figures["producer_rss_mb"].values()), f"{figures['producer_peak_rss_mb']:.0f} MB", ""),
                 ("worker RSS (10/50/90%, peak)",
                  "/".join(f"{v:.0f}" for v in figures["worker_rss_mb"].values()), f"{figures['worker_peak_rss_mb']:.0f} MB", ""),
                 ("Redis used memory, peak", "", f"{figures['redis_used_peak_mb']:.0f} MB",
                  f"file {figures['file_mb']:.0f} MB"),
                 ("Redis CPU, submit -> completed", f"{figures['redis_cpu_us_per_line']} us a line", "",
                  f"one Redis: <= {1 / max(redis_busy_s / n, 1e-9):,.0f} lines/s"),
                 *([] if cr is None else [
                     ("score cache's Redis: used memory, peak", f"cap {args.cache_redis}",
                      f"{figures['cache_redis']['used_peak_mb']:.0f} MB", ""),
                     ("score cache's Redis: CPU", f"{figures['cache_redis']['cpu_us_per_line']} us a line", "",
                      f"<= {1 / max(busy[1] / n, 1e-9):,.0f} lines/s")]),
                 ("results held in Redis after the batch", f"{figures['results_bytes_per_line']} B a line",
                  f"{figures['results_mb']:.0f} MB", ""),
                 ("download (streamed), peak RSS", f"{n_out:,} lines", f"{figures['downloader_peak_rss_mb']:.0f} MB",
                  f"{download_s:.0f} s")],
                ("what", "detail", "value", "")))
    print(json.dumps(figures))
    return 0 if (b.status == "completed" and len(ids) == n_out == n and not n_err) else 1


if __name__ == "__main__":
    sys.exit(main())
