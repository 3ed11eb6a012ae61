"""`gristmill up` and `gristmill demo`: Redis if needed, one worker per GPU (else one CPU worker),
Flower; everything stopped cleanly on Ctrl-C or exit."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..producers.client import Client
from ..producers.redis_server import EmbeddedRedis, redact
from ..producers.runtime import data_file, python_module
from ..producers.settings import Settings

from .pinning import visible_gpus

EXAMPLE = data_file("gristmill.producers", "examples", "demo.jsonl")


def parse_gpus(spec: str) -> list[int]:
    """'all' -> every visible GPU; 'none' -> []; '0,1' -> [0, 1]."""
    if spec == "all":
        return visible_gpus()
    if spec in ("none", "cpu", ""):
        return []
    try:
        return [int(x) for x in spec.split(",")]
    except ValueError:
        raise SystemExit(f"--gpus: write 'all', 'none' or indexes like '0,1', not {spec!r}")


def wait_for_workers(app, procs: list[tuple[str, subprocess.Popen, Path | None]], want: int = 1,
                     prefix: str = "", timeout: float = 600.0) -> None:
    """Until `want` workers whose hostname starts with `prefix` answer a ping (they load their
    models before consuming). Raises, with the tail of its log, if one of `procs` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, p, log in procs:
            if p.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
                raise RuntimeError(f"{name} exited with code {p.returncode} while starting\n{tail}")
        replies = app.control.ping(timeout=0.5) or []
        if sum(1 for r in replies if next(iter(r)).startswith(prefix)) >= want:
            return
    logs = [str(log) for _, _, log in procs if log is not None]
    raise TimeoutError(f"workers not ready after {timeout} s" + (f"; logs: {', '.join(logs)}" if logs else ""))


def worker_slots(gpus: list[int], instances: int) -> list[tuple[str, str, int]]:
    """(process name, device, metrics port offset) of each worker process: `instances` per GPU,
    or one CPU worker when there is no GPU."""
    if not gpus:
        return [("worker-cpu", "cpu", 0)]
    return [(f"worker-cuda:{g}" + (f"-{k}" if instances > 1 else ""), f"cuda:{g}", i * instances + k)
            for i, g in enumerate(gpus) for k in range(instances)]


def share_cores(env: dict[str, str], processes: int) -> dict[str, str]:
    """Split this host's cores among `processes` GPU worker processes for their CPU work
    (tokenizer threads, torch's host ops) unless the caller already chose: sixteen processes each
    spawning a thread per core oversubscribe the host. Unchanged for a single process."""
    if processes <= 1:
        return env
    share = str(max(1, (os.cpu_count() or 1) // processes))
    return {"RAYON_NUM_THREADS": share, "OMP_NUM_THREADS": share, **env}


class Stack:
    """The processes of one `gristmill up`, started in order and stopped in reverse."""

    def __init__(self, settings: Settings, gpus: list[int], flower: bool, log_dir: Path | None = None,
                 instances_per_gpu: int | None = None, serve: bool = False):
        self.settings = settings
        self.gpus = gpus
        self.instances = instances_per_gpu or settings.instances_per_gpu
        self.flower = flower
        self.serve = serve
        self.workers = 0
        self.redis: EmbeddedRedis | None = None
        self.url = settings.redis_url
        self.cache_redis: EmbeddedRedis | None = None
        self.cache_url = settings.dedup_redis_url
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.log_dir = log_dir

    def start(self) -> "Stack":
        st = self.settings
        if not self.url:
            self.url, self.redis = self._embedded(EmbeddedRedis(st.redis_dir), f"AOF in {st.redis_dir}")
            if not self.cache_url and st.dedup_ttl_s > 0:
                # the score cache on a server of its own: capped, evicting, not persisted
                self.cache_url, self.cache_redis = self._embedded(
                    EmbeddedRedis(st.dedup_redis_dir, cache_max_memory=st.dedup_max_memory),
                    f"score cache, at most {st.dedup_max_memory}, least recently used evicted")
        env = {**os.environ, "GRISTMILL_REDIS_URL": self.url}
        if self.cache_url:
            env["GRISTMILL_DEDUP_REDIS_URL"] = self.cache_url
        slots = worker_slots(self.gpus, self.instances)
        for name, dev, offset in slots:
            self._spawn(name, python_module("gristmill.workers", "worker", "--device", dev),
                        share_cores({**env, "GRISTMILL_METRICS_OFFSET": str(offset)}, len(slots)))
        self.workers = len(slots)
        if self.serve:
            self._spawn("serve", python_module("gristmill", "serve"), env)
            print(f"HTTP API at http://{st.serve_host}:{st.serve_port}/v1 and its batches page at "
                  f"http://{st.serve_host}:{st.serve_port}/", file=sys.stderr)
        if self.flower:
            cmd, creds = self.settings.flower_command()
            self._spawn("flower", cmd, env)
            shown = creds if self.settings.flower_basic_auth is None else creds.split(":", 1)[0] + ":<GRISTMILL_FLOWER_BASIC_AUTH>"
            print(f"flower at http://{self.settings.flower_address}:{self.settings.flower_port} "
                  f"(basic auth {shown})", file=sys.stderr)
        return self

    @staticmethod
    def _embedded(server: EmbeddedRedis, what: str) -> tuple[str, EmbeddedRedis | None]:
        """(url, the server if this call started it): one already running on its directory is
        reused and left running."""
        url = server.running_url()
        if url is not None:
            return url, None
        url = server.start()
        print(f"redis-server started at {redact(url)} ({what})", file=sys.stderr)
        return url, server

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        out = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")
        self.procs.append((name, subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None)))

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Until every worker answers a ping (models are loaded before a worker consumes)."""
        from ..producers.app import make_app
        procs = [(name, p, self.log_dir / f"{name}.log" if self.log_dir else None) for name, p in self.procs]
        wait_for_workers(make_app(self.settings, self.url), procs, want=self.workers,
                         prefix="gristmill-", timeout=timeout)

    def stop(self) -> None:
        for _, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)  # Celery: warm shutdown, unacked work goes back to Redis
        for _, p in reversed(self.procs):
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        for server in (self.cache_redis, self.redis):
            if server is not None:
                server.stop()
        self.redis = self.cache_redis = None

    def __enter__(self) -> "Stack":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_on_signals() -> None:
    """SIGTERM (`kill`, `docker stop`, systemd, a supervisor) and SIGINT stop the stack as Ctrl-C
    does. Python's default for SIGTERM ends the process at once, with no cleanup: the workers,
    Flower and the embedded redis-server were left running without their launcher. And a process
    started in the background by a shell without job control inherits SIGINT ignored, so an
    explicit `kill -INT` did nothing."""
    def on_term(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second one must not cut the stop short
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def up_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="gristmill up")
    ap.add_argument("--gpus", default="all", help="all | none | 0,1,... (default: all visible; none -> one CPU worker)")
    ap.add_argument("--instances-per-gpu", type=int, default=None,
                    help="worker processes per GPU (default: GRISTMILL_INSTANCES_PER_GPU, 1)")
    ap.add_argument("--no-flower", action="store_true")
    ap.add_argument("--no-serve", action="store_true", help="do not start the HTTP API")
    args = ap.parse_args(argv)
    settings = Settings()
    stop_on_signals()
    with Stack(settings, parse_gpus(args.gpus), flower=not args.no_flower, serve=not args.no_serve,
               instances_per_gpu=args.instances_per_gpu) as stack:
        cache = f"; score cache {redact(stack.cache_url)}" if stack.cache_url else ""
        print(f"gristmill up: redis {redact(stack.url or '')}{cache}; Ctrl-C stops everything", file=sys.stderr)
        try:
            while all(p.poll() is None for _, p in stack.procs):
                time.sleep(0.5)
            dead = [n for n, p in stack.procs if p.poll() is not None]
            print(f"stopping: {', '.join(dead)} exited", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("stopping...", file=sys.stderr)
            return 0


# Example lines meant to fail (to show the error file) carry custom_ids with this prefix; a line that
# is not JSON at all cannot carry one and is meant to fail too.
EXPECTED_FAILURE_PREFIX = "bad-"


def expected_failures(path: Path) -> set[int]:
    """1-based numbers of the input lines that are meant to fail."""
    from ..producers.schemas import peek_custom_id
    meant = set()
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if raw.strip():
                cid = peek_custom_id(raw)
                if cid is None or cid.startswith(EXPECTED_FAILURE_PREFIX):
                    meant.add(number)
    return meant


def demo_verdict(batch, error_lines: list[dict], meant_to_fail: set[int]) -> tuple[int, list[str]]:
    """(exit status, lines to print): 0 only when the batch completed and every line that failed was
    meant to; else 1, naming the first line that should have succeeded and its error."""
    intended = [e for e in error_lines if e["error"].get("line") in meant_to_fail]
    unexpected = [e for e in error_lines if e["error"].get("line") not in meant_to_fail]
    report = [f"{len(intended)} failed as intended (deliberately bad example lines, custom_id "
              f"'{EXPECTED_FAILURE_PREFIX}...'):"] if intended else []
    for e in sorted(intended, key=lambda e: e["error"].get("line") or 0):
        report.append(f"  line {e['error'].get('line')} ({e['custom_id'] or 'no custom_id'}): "
                      f"{e['error']['code']}: {e['error']['message'][:160]}")
    if unexpected:
        first = min(unexpected, key=lambda e: e["error"].get("line") or 0)
        report.append(f"FAILED: {len(unexpected)} line(s) that should succeed failed; the first, line "
                      f"{first['error'].get('line')} ({first['custom_id']}): {first['error']['code']}: "
                      f"{first['error']['message']}")
    if batch.status != "completed":
        report.append(f"FAILED: the batch ended {batch.status}")
    return (0 if batch.status == "completed" and not unexpected else 1), report


def demo_main(argv: list[str]) -> int:
    from rich.console import Console
    from rich.markup import escape

    from ..producers.progress import watch

    ap = argparse.ArgumentParser(prog="gristmill demo")
    ap.add_argument("--input", type=Path, default=EXAMPLE,
                    help=f"batch input (default: the shipped example); lines whose custom_id starts with "
                         f"'{EXPECTED_FAILURE_PREFIX}' are meant to fail")
    ap.add_argument("--out-dir", type=Path, default=Path("out"))
    ap.add_argument("--gpus", default="all")
    args = ap.parse_args(argv)
    console = Console(stderr=True, soft_wrap=True)  # a summary line stays one line in logs and pipes
    settings = Settings()
    stop_on_signals()
    t_start = time.monotonic()
    with Stack(settings, parse_gpus(args.gpus), flower=False, log_dir=settings.home / "logs") as stack:
        console.print(f"[bold]gristmill demo[/]: starting a worker (logs in {settings.home / 'logs'})...")
        stack.wait_ready()
        client = Client(settings, redis_url=stack.url)
        t0 = time.monotonic()
        batch = client.submit_file(args.input, metadata={"source": "demo"})
        console.print(f"submitted {args.input} as {batch.id}: {batch.request_counts.total} lines")
        batch = watch(client, batch.id, console=console, poll_s=0.2, timeout=900)
        elapsed = time.monotonic() - t0
        args.out_dir.mkdir(parents=True, exist_ok=True)
        out, err = args.out_dir / "demo-results.jsonl", args.out_dir / "demo-errors.jsonl"
        n_out, n_err = client.download(batch.id, out, err)
        error_lines = list(client.iter_results(batch.id, errors=True))
        client.close()
    rc = batch.request_counts
    console.print(f"batch {batch.id} {batch.status}: {rc.completed} completed, {rc.failed} failed of {rc.total} "
                  f"in {elapsed:.1f} s ({rc.total / elapsed:.1f} items/s; {time.monotonic() - t_start:.1f} s "
                  f"with start-up)")
    status, report = demo_verdict(batch, error_lines, expected_failures(args.input))
    for line in report:
        console.print(("[bold red]" if line.startswith("FAILED") else "") + escape(line), highlight=False)
    console.print(f"results: {out.resolve()} ({n_out} lines)\nerrors:  {err.resolve()} ({n_err} lines)")
    return status
