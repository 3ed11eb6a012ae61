"""`python -m gristmill.workers worker|up|demo ...`: the process entry points behind `gristmill worker/up/demo`."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from .pinning import pin


def worker(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="gristmill worker")
    ap.add_argument("--device", default="cpu", help="cpu or cuda:N (default: cpu)")
    ap.add_argument("--queues", default=None, help="comma-separated queues (default: all)")
    ap.add_argument("--concurrency", type=int, default=None, help="messages in flight (default: settings)")
    ap.add_argument("--no-preload", action="store_true", help="load models on first use, not at start")
    ap.add_argument("--metrics-port", type=int, default=None,
                    help="serve Prometheus metrics on this port (default: GRISTMILL_METRICS_PORT + slot; 0: off)")
    ap.add_argument("--metrics-address", default="127.0.0.1", help="bind address of the metrics server")
    ap.add_argument("--loglevel", default="INFO")
    args = ap.parse_args(argv)
    inner = pin(args.device)  # before anything imports torch

    from celery import signals

    from ..producers import constants as C
    from ..producers.app import make_app
    from ..producers.redis_server import resolve_dedup_redis_url, resolve_redis_url
    from ..producers.settings import Settings

    from . import control  # noqa: F401  (registers the gristmill_stats remote-control command)
    from . import metrics
    from .reaper import tolerate_kombu_close_race
    from .tasks import init_state, register_tasks

    tolerate_kombu_close_race()
    settings = Settings()
    settings = settings.model_copy(update={"dedup_redis_url": resolve_dedup_redis_url(settings)})
    url = resolve_redis_url(settings)
    app = make_app(settings, url)
    register_tasks(app)
    queues = args.queues.split(",") if args.queues else list(C.QUEUES)
    label = "cpu" if inner == "cpu" else f"gpu{os.environ['GRISTMILL_PHYSICAL_GPU']}"

    @signals.worker_init.connect
    def _load(**_):  # before the consumer starts: no message waits on a model load
        if args.metrics_port is not None:
            port = args.metrics_port
        else:
            # the launcher gives each worker process its own offset (GPU index x instances + instance)
            offset = os.environ.get("GRISTMILL_METRICS_OFFSET") or os.environ.get("GRISTMILL_PHYSICAL_GPU") or "0"
            port = settings.metrics_port + int(offset) if settings.metrics_port else 0
        if port:
            try:
                metrics.serve(port, args.metrics_address)
            except OSError as e:
                logging.getLogger("gristmill").warning("metrics port %d unavailable (%s); metrics off", port, e)
        if inner != "cpu":
            metrics.watch_gpu_memory()
        st = init_state(settings, url, inner, app, queues)
        if not args.no_preload:
            st.host.preload(queues)

    @signals.task_received.connect
    def _claim(request=None, **_):
        from .tasks import _state
        tag = getattr(getattr(request, "message", None), "delivery_tag", None)
        if _state is not None and _state.lease is not None and tag:
            _state.lease.claim(tag, request.id)

    @signals.task_postrun.connect
    def _release(task_id=None, **_):
        from .tasks import _state
        if _state is not None and _state.lease is not None and task_id:
            _state.lease.release(task_id)

    @signals.worker_shutdown.connect
    def _stop(**_):
        from .tasks import _state
        if _state is not None:
            _state.shutdown()

    concurrency = args.concurrency or settings.worker_concurrency
    app.worker_main(["worker", "--pool=threads", f"--concurrency={concurrency}", f"--queues={','.join(queues)}",
                     f"--hostname=gristmill-{label}-{os.getpid()}@{socket.gethostname()}",
                     "--without-gossip", "--without-mingle", "-E", f"--loglevel={args.loglevel}"])
    return 0


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(sys.argv) < 2:
        print("usage: python -m gristmill.workers worker|up|demo|optimize [options]", file=sys.stderr)
        return 2
    cmd, rest = sys.argv[1], sys.argv[2:]
    if cmd == "worker":
        return worker(rest)
    if cmd == "optimize":
        logging.getLogger().setLevel(logging.WARNING)  # the quantizer logs every tensor at INFO
        from .optimize import main as optimize_main
        return optimize_main(rest)
    from . import launcher
    if cmd == "up":
        return launcher.up_main(rest)
    if cmd == "demo":
        return launcher.demo_main(rest)
    print(f"unknown command {cmd!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
