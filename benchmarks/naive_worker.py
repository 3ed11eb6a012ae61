"""The naive baseline: a plain Celery worker with one task per item, calling the same engine.

    python -m benchmarks.naive_worker --device cpu --model NAME
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

NAIVE_TASK = "bench.naive_classify"
NAIVE_QUEUE = "bench.naive"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", required=True)
    args = ap.parse_args()
    from gristmill.workers.pinning import pin
    device = pin(args.device)

    from kombu import Queue

    from gristmill.producers.app import make_app
    from gristmill.producers.settings import Settings
    from gristmill.workers.host import EngineHost

    settings = Settings()
    app = make_app(settings)
    app.conf.task_queues = [Queue(NAIVE_QUEUE)]
    host = EngineHost(settings, device)
    engine = host.engine(args.model)  # loaded once, before consuming

    @app.task(name=NAIVE_TASK, ignore_result=False)
    def naive_classify(text: str) -> dict[str, float]:
        return engine.run(engine.encode([text]))[0]

    app.worker_main(["worker", "--pool=solo", f"--queues={NAIVE_QUEUE}", "--without-gossip", "--without-mingle",
                     f"--hostname=naive-{os.getpid()}@{socket.gethostname()}", "--loglevel=WARNING"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
