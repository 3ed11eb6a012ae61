"""Shared pieces of the benchmarks: synthetic inputs, random-weight models, a results table."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
from pathlib import Path

WORDS = ("the a of to and in is it you that he was for on are with as his they be at one have this from "
         "or had by hot word but what some we can out other were all there when up use your how said an each "
         "she which do their time if will way about many then them write would like so these her long make "
         "thing see him two has look more day could go come did number sound no most people my over know "
         "water than call first who may down side been now find any new work part take get place made live "
         "where after back little only round man year came show every good me give our under name very").split()


def traffic_split(texts: list[str], share: float) -> tuple[list[str], list[str]]:
    """(about `share` of `texts`, the rest), by a hash of each text: copies of a text fall on one side."""
    cut = round(share * 2**32)
    side = [int.from_bytes(hashlib.sha256(b"traffic\0" + t.encode()).digest()[:4], "little") < cut for t in texts]
    return [t for t, s in zip(texts, side) if s], [t for t, s in zip(texts, side) if not s]


def texts(n: int, min_words: int, max_words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


def request_line(custom_id: str, text: str, url: str, model: str | None = None) -> str:
    """One classification or moderation input line (the url's default model when `model` is None)."""
    body = {"input": text} if model is None else {"model": model, "input": text}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def write_requests(path: Path, items: list[str], url: str, model: str | None = None) -> Path:
    with open(path, "w") as f:
        for i, t in enumerate(items):
            f.write(request_line(f"r{i}", t, url, model) + "\n")
    return path


def write_classification_file(path: Path, n: int, tag: str) -> int:
    """`n` distinct /v1/classifications lines (texts made distinct by their number and `tag`, so a
    run never hits another run's score cache); returns the file's size in bytes."""
    pool = texts(4096, 4, 24, seed=5)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/classifications",
                                "body": {"input": f"{pool[i % len(pool)]} {i} {tag}"}}) + "\n")
    return path.stat().st_size


def random_minilm_classifier(out: Path, num_labels: int = 2, tiny: bool = False) -> Path:
    """all-MiniLM-L6-v2's architecture and tokenizer with random weights and a classification head
    (the GPU host cannot take the weights package; throughput does not depend on the weights).
    `tiny`: its tokenizer over 2 layers 32 wide, so that a worker's own path is what is measured."""
    import shutil

    import torch
    from transformers import AutoConfig, BertForSequenceClassification

    from gristmill.producers.registry import DEFAULT_CLASSIFIER
    # Hosts without the weights package (a GPU host) point this at a copy of its config and tokenizer.
    arch = os.environ.get("GRISTMILL_BENCH_ARCH_DIR")
    src = Path(arch) if arch else DEFAULT_CLASSIFIER.resolve_path()
    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    cfg = AutoConfig.from_pretrained(str(src), num_labels=num_labels)
    if tiny:
        cfg.update(dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return out


def redis_cpu_s(r) -> float:
    """CPU seconds a Redis server has used (user + system, AOF writes included; not forked children)."""
    cpu = r.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def table(rows: list[tuple], headers: tuple) -> str:
    cells = [tuple(str(c) for c in r) for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(c.ljust(w) for c, w in zip(cells[0], widths)), line]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells[1:]]
    return "\n".join(out)


def add_cache_redis_arg(ap) -> None:
    ap.add_argument("--cache-redis", metavar="MAXMEMORY", default=None,
                    help="the score cache on a second embedded Redis capped at MAXMEMORY (e.g. 1gb), as "
                         "`gristmill up` runs it (default: one Redis for both)")


def add_traffic_share_arg(ap, judged: str) -> None:
    """--traffic-share F: F of `judged` given to the student as a sample of the traffic (traffic_split)."""
    def share(value: str) -> float:
        f = float(value)
        if not 0.0 <= f < 1.0:
            raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
        return f
    ap.add_argument("--traffic-share", type=share, default=0.0, metavar="F",
                    help=f"give this share of {judged} (split by a hash of each) to the student as transfer text, "
                         "mixed as `gristmill optimize --with-builtin` mixes a file, and judge on the rest "
                         "(default 0: the built-in transfer set alone)")


def cache_redis(work: Path, max_memory: str | None):
    """The score cache's own embedded Redis (a context giving the server) for --cache-redis, else
    a context giving None."""
    from gristmill.producers.redis_server import EmbeddedRedis
    return EmbeddedRedis(work / "redis-cache", cache_max_memory=max_memory) if max_memory else contextlib.nullcontext()
