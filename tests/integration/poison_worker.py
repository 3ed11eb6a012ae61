"""A real worker process in which any line containing "POISON" kills the process mid-batch
(os._exit, as a segfault or the OOM killer would), for the poison-input test."""

from __future__ import annotations

import json
import os
import sys

from gristmill.workers import host
from gristmill.workers.records import Prepared

_prepare, _run = host.EngineHost.prepare, host.EngineHost.run


def prepare(self, items):
    out = _prepare(self, items)
    for it, p in zip(items, out):
        if isinstance(p, Prepared) and "POISON" in json.dumps(it.body):
            p.payloads = [[-1] for _ in p.payloads]
            if p.inputs is not None:  # it runs, whatever the score cache knew
                p.inputs.known = [None] * len(p.payloads)
                p.inputs.reused = [False] * len(p.payloads)
    return out


def run(self, key, payloads):
    if any(isinstance(p, list) and -1 in p for p in payloads):
        os._exit(139)
    return _run(self, key, payloads)


host.EngineHost.prepare, host.EngineHost.run = prepare, run

if __name__ == "__main__":
    from gristmill.workers.__main__ import worker
    sys.exit(worker(sys.argv[1:]))
