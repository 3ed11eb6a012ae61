"""GPU tests: skipped without CUDA; run on a GPU host with `pytest tests/gpu`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

from gristmill.producers.app import make_app  # noqa: E402
from gristmill.producers.client import Client  # noqa: E402
from gristmill.producers.redis_server import EmbeddedRedis  # noqa: E402
from gristmill.producers.settings import Settings  # noqa: E402
from tests.commands import GRISTMILL, ROOT  # noqa: E402
from tests.integration.helpers import chat, classification, write_jsonl  # noqa: E402


def test_one_worker_per_gpu_each_on_its_own_device(tiny_models_file, tmp_path):
    n = torch.cuda.device_count()
    with EmbeddedRedis(tmp_path / "redis") as server:
        env = {**os.environ, "GRISTMILL_REDIS_URL": server.url, "GRISTMILL_HOME": str(tmp_path / "home"),
               "GRISTMILL_MODELS_FILE": str(tiny_models_file), "GRISTMILL_BUILTIN_MODELS": "false",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        up = subprocess.Popen([*GRISTMILL, "up", "--gpus", "all", "--no-flower"], env=env, cwd=ROOT)
        try:
            app = make_app(Settings(redis_url=server.url), server.url)
            deadline = time.monotonic() + 300
            while len(app.control.ping(timeout=0.5) or []) < n:
                assert time.monotonic() < deadline and up.poll() is None
            c = Client(Settings(redis_url=server.url, models_file=tiny_models_file, builtin_models=False, chunk_size=1))
            rows = [chat(f"c{i}") for i in range(4 * n)] + [classification(f"k{i}") for i in range(4 * n)]
            b = c.wait(c.submit_file(write_jsonl(tmp_path / "in.jsonl", rows)).id, timeout=300)
            assert b.status == "completed" and b.request_counts.failed == 0
            replies = app.control.broadcast("gristmill_stats", reply=True, timeout=5)
            infos = [next(iter(r.values())) for r in replies]
            assert len(infos) == n
            physical = sorted(int(i["physical_gpu"]) for i in infos)
            assert physical == list(range(n)), "one worker per GPU"
            for info in infos:
                assert info["cuda_visible_devices"] == info["physical_gpu"]
                assert info["engines"], "the worker ran no engine"
                for e in info["engines"].values():
                    assert e["device"] == "cuda:0" and e["dtype"] == "torch.bfloat16"
            buses = {e["pci_bus_id"] for i in infos for e in i["engines"].values()}
            assert len(buses) == n, f"workers share a GPU: {json.dumps(infos)}"
        finally:
            up.send_signal(signal.SIGINT)
            up.wait(120)
