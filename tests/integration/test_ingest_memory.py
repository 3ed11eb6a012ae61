"""Ingest streams: the client's memory does not grow with the file."""

from __future__ import annotations

import json
import tracemalloc

import redis

from gristmill.producers import constants as C
from gristmill.producers.client import Client


def _file(path, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"custom_id": f"id-{i}", "method": "POST", "url": C.MODERATIONS_URL,
                                "body": {"input": f"line number {i} of a long file"}}) + "\n")
    return path


def test_client_memory_is_flat_in_the_number_of_lines(redis_url, settings_for, tmp_path):
    url = redis_url.rsplit("/", 1)[0] + "/7"  # no worker watches this database
    redis.Redis.from_url(url).flushdb()
    c = Client(settings_for(url, chunk_size=256))
    c.submit_file(_file(tmp_path / "warm.jsonl", 300))  # first-use caches stay out of the peaks
    c.redis.delete(C.CLASSIFY_QUEUE)
    peaks = {}
    for n in (10_000, 50_000):
        f = _file(tmp_path / f"{n}.jsonl", n)
        tracemalloc.start()
        b = c.submit_file(f)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert c.get(b.id).request_counts.total == n
        assert c.redis.llen(C.CLASSIFY_QUEUE) > 0
        c.redis.delete(C.CLASSIFY_QUEUE)
    assert peaks[50_000] < 1.5 * peaks[10_000], f"ingest memory grows with the file: {peaks}"
    assert peaks[50_000] < 16 * 2**20, peaks
    c.close()
