"""The HTTP front door against the command line, on the same large file: `files.create` +
`batches.create` + polling + `files.content` with the official `openai` SDK against
`gristmill serve`, and `gristmill submit --wait` + `gristmill results`, end to end.

    python -m benchmarks.http_front_door [--lines 1000000] [--quick] [--upload-gb 1]

One worker process (the 2-layer, 64-wide classifier of benchmarks.load, so the queue, not the
model, is measured), an embedded Redis and a score-cache Redis as `gristmill up` runs them, and one
`gristmill serve`. Each path gets a file of its own texts (the score cache answers neither), and
the paths alternate (`--rounds`). The server's RSS is sampled every 0.1 s, during the upload and
over the whole run. `--upload-gb N` also uploads an N GB file alone and reports the server's RSS
before and at its peak: uploads stream to disk, so it should not grow with the file.
Prints a table, then one JSON line of the figures.
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

from .common import table, write_classification_file
from .load import tiny_models_file
from .queue_overhead import ROOT, stop

KEY = "gm-bench-0123456789abcdefghijklmnop"


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every_s: float = 0.1):
        super().__init__(daemon=True)
        self.proc, self.every_s = psutil.Process(pid), every_s
        self.peak = self.first = self.proc.memory_info().rss
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.every_s):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return

    def __enter__(self) -> "RssSampler":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.halt.set()
        self.join()


def count_lines(path: Path) -> tuple[int, set[str]]:
    ids = set()
    with open(path) as f:
        for line in f:
            ids.add(json.loads(line)["custom_id"])
    return len(ids), ids


def via_cli(f: Path, out: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(python_module("gristmill", "submit", str(f), "--wait"), env=env, cwd=ROOT,
                       capture_output=True, text=True, check=True)
    batch_id = p.stdout.strip().splitlines()[-1]
    subprocess.run(python_module("gristmill", "results", batch_id, "-o", str(out)), env=env, cwd=ROOT,
                   capture_output=True, text=True, check=True)
    return time.perf_counter() - t0


def via_http(client, f: Path, out: Path, server_pid: int) -> tuple[float, float, int]:
    """(seconds end to end, seconds of the upload, the server's peak RSS during the upload)."""
    t0 = time.perf_counter()
    with RssSampler(server_pid) as rss, open(f, "rb") as fh:
        up = client.files.create(file=fh, purpose="batch")
    upload_s = time.perf_counter() - t0
    b = client.batches.create(input_file_id=up.id, endpoint="/v1/classifications", completion_window="24h")
    while b.status not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(0.5)
        b = client.batches.retrieve(b.id)
    if b.status != "completed":
        raise RuntimeError(f"batch {b.id} ended {b.status}: {b.errors}")
    with client.files.with_streaming_response.content(b.output_file_id) as resp, open(out, "wb") as fo:
        for block in resp.iter_bytes():
            fo.write(block)
    return time.perf_counter() - t0, upload_s, rss.peak


def big_upload(client, path: Path, gb: float, server_pid: int) -> dict:
    row = (json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/classifications",
                       "body": {"input": "y" * 900}}) + "\n").encode()
    with open(path, "wb") as f:
        block = row * 1024
        for _ in range(int(gb * (1 << 30)) // len(block)):
            f.write(block)
    size = path.stat().st_size
    with RssSampler(server_pid) as rss, open(path, "rb") as fh:
        t0 = time.perf_counter()
        up = client.files.create(file=fh, purpose="batch")
        elapsed = time.perf_counter() - t0
    client.files.delete(up.id)
    path.unlink()
    assert up.bytes == size
    return {"bytes": size, "seconds": round(elapsed, 1), "mb_per_s": round(size / elapsed / 2**20),
            "server_rss_before_mb": round(rss.first / 2**20, 1), "server_rss_peak_mb": round(rss.peak / 2**20, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.http_front_door", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=None, help="default 1,000,000 (--quick: 50,000)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=1, help="alternations of the two paths (default 1)")
    ap.add_argument("--upload-gb", type=float, default=0.0, help="also upload a file of this many GB alone")
    args = ap.parse_args(argv)
    n = args.lines or (50_000 if args.quick else 1_000_000)

    import openai

    from gristmill.producers.app import make_app
    from gristmill.producers.redis_server import EmbeddedRedis, free_port
    from gristmill.producers.settings import Settings
    from gristmill.workers.launcher import wait_for_workers

    work = Path(tempfile.mkdtemp(prefix="gristmill-http-"))
    mf = tiny_models_file(work)
    base = {k: v for k, v in os.environ.items() if not k.startswith("GRISTMILL_")}
    rows, figures = [], {"lines": n, "rounds": []}
    with EmbeddedRedis(work / "redis") as server, \
            EmbeddedRedis(work / "redis-cache", cache_max_memory="1gb") as cache:
        env = {**base, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               "GRISTMILL_HOME": str(work / "home"), "GRISTMILL_REDIS_URL": server.url,
               "GRISTMILL_DEDUP_REDIS_URL": cache.url, "GRISTMILL_MODELS_FILE": str(mf),
               "GRISTMILL_BUILTIN_MODELS": "false", "GRISTMILL_MAX_BATCH_SIZE": "256",
               "GRISTMILL_TOKEN_BUDGET": str(256 * 64), "GRISTMILL_API_KEYS": KEY,
               "GRISTMILL_FILES_DIR": str(work / "files"), "GRISTMILL_METRICS_PORT": "0"}
        port = free_port()
        worker = subprocess.Popen(python_module("gristmill.workers", "worker", "--device", "cpu", "--queues",
                                                "gristmill.classify"), env=env, cwd=ROOT,
                                  stdout=open(work / "worker.log", "wb"), stderr=subprocess.STDOUT)
        serve = subprocess.Popen(python_module("gristmill", "serve", "--port", str(port), "--log-level", "warning"),
                                 env=env, cwd=ROOT, stdout=open(work / "serve.log", "wb"), stderr=subprocess.STDOUT)
        try:
            wait_for_workers(make_app(Settings(redis_url=server.url), server.url), [("worker", worker, work / "worker.log")])
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=3600)
            deadline = time.monotonic() + 60
            while True:
                try:
                    client.batches.list(limit=1)
                    break
                except openai.APIConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.3)
            server_rss = RssSampler(serve.pid, every_s=0.5)
            server_rss.start()
            for k in range(args.rounds):
                f_cli, f_http = work / f"cli{k}.jsonl", work / f"http{k}.jsonl"
                size = write_classification_file(f_cli, n, f"cli{k}")
                write_classification_file(f_http, n, f"http{k}")
                cli_s = via_cli(f_cli, work / "cli-out.jsonl", env)
                cli_n, _ = count_lines(work / "cli-out.jsonl")
                http_s, upload_s, upload_peak = via_http(client, f_http, work / "http-out.jsonl", serve.pid)
                http_n, _ = count_lines(work / "http-out.jsonl")
                if cli_n != n or http_n != n:
                    raise RuntimeError(f"results: {cli_n} by the command line, {http_n} over HTTP, of {n}")
                f_cli.unlink()
                f_http.unlink()
                figures["file_mb"] = round(size / 2**20, 1)
                figures["rounds"].append({"cli_s": round(cli_s, 1), "http_s": round(http_s, 1),
                                          "http_vs_cli": round(http_s / cli_s, 3), "upload_s": round(upload_s, 1),
                                          "server_rss_peak_during_upload_mb": round(upload_peak / 2**20, 1)})
                rows += [(f"round {k + 1}: gristmill submit --wait + results", f"{cli_s:.1f} s", f"{n / cli_s:,.0f}/s", ""),
                         (f"round {k + 1}: files.create + batches.create + poll + files.content", f"{http_s:.1f} s",
                          f"{n / http_s:,.0f}/s", f"{http_s / cli_s:.2f}x the command line"),
                         (f"round {k + 1}: of which the upload", f"{upload_s:.1f} s",
                          f"{size / upload_s / 2**20:,.0f} MB/s", f"server peak RSS {upload_peak / 2**20:.0f} MB")]
            server_rss.halt.set()
            figures["server_rss_first_mb"] = round(server_rss.first / 2**20, 1)
            figures["server_rss_peak_mb"] = round(server_rss.peak / 2**20, 1)
            rows.append(("server RSS: at start, peak over the runs", f"{server_rss.first / 2**20:.0f} MB",
                         f"{server_rss.peak / 2**20:.0f} MB", ""))
            if args.upload_gb:
                big = big_upload(client, work / "big.jsonl", args.upload_gb, serve.pid)
                figures["big_upload"] = big
                rows.append((f"a {big['bytes'] / 2**30:.1f} GB upload alone", f"{big['seconds']} s",
                             f"{big['mb_per_s']} MB/s", f"server RSS {big['server_rss_before_mb']:.0f} -> peak "
                             f"{big['server_rss_peak_mb']:.0f} MB"))
        finally:
            stop(serve)
            stop(worker)
    figures["http_vs_cli"] = max(r["http_vs_cli"] for r in figures["rounds"])  # the worst round
    print(f"{n:,} classification lines ({figures['file_mb']} MB), one CPU worker with a tiny classifier")
    print(table(rows, ("path", "seconds", "rate", "")))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
