"""What the host's CPUs allow before any model work: tokenizing and submitting 128-token texts.

    python -m benchmarks.host_limits [--items N] [--lines N]

(a) MiniLM's tokenizer (ids only, truncated to 128): the Rust one, the chunk cache over it, and
    the C++ path for ASCII texts beside it (kernels/tokenize.py), on 1 core and on every core (one
    process per core, one thread each), and the Rust one in one process with its own threads; then
    each, one process, on paragraphs of the installed packages' descriptions (open vocabulary: a
    first and a second pass; the share of them the ASCII path takes); and the rate of tiny torch
    ops in a thread beside a thread that tokenizes without pause, with no tokenizer, the Rust one
    (which releases the GIL), the chunk cache and the ASCII path (which hold it);
(b) `Client.submit_file` of a file of 128-token classification lines into an embedded Redis, with
    pass 2 in one process and in two (the baseline is the one-process run).
On the H100 host these bound the end-to-end rate of `benchmarks.queue_overhead --device cuda`.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from .common import random_minilm_classifier, table, texts, write_requests

_TOK = None


class _AsciiPath:
    """The C++ path for ASCII texts, the Rust tokenizer taking the rest (as in ClassifierEngine)."""

    def __init__(self, rust):
        from gristmill.kernels.tokenize import AsciiWordPiece, rust_ids
        self.fast, self.rest = AsciiWordPiece.build(rust, 128), rust_ids(rust)
        assert self.fast is not None, "flash-tokenizer is installed and agrees on MiniLM's tokenizer"

    def encode(self, chunk: list[str]) -> list[list[int]]:
        return self.fast.encode(chunk, self.rest)


def _tokenizer(kind: str = "rust"):
    """MiniLM's tokenizer truncating to 128: the Rust one (ids only), the chunk cache over it, or
    the C++ path for ASCII texts beside it."""
    from tokenizers import Tokenizer

    from gristmill.kernels.tokenize import ChunkCacheTokenizer
    from gristmill.producers.registry import DEFAULT_CLASSIFIER
    arch = os.environ.get("GRISTMILL_BENCH_ARCH_DIR")
    src = Path(arch) if arch else DEFAULT_CLASSIFIER.resolve_path()
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.enable_truncation(128)
    tok.no_padding()
    if kind == "rust":
        return tok
    if kind == "ascii_cpp":
        return _AsciiPath(tok)
    cached = ChunkCacheTokenizer.build(tok, 128)
    assert cached is not None, "MiniLM's tokenizer is eligible for the chunk cache"
    return cached


def _encode_with(tok, chunk: list[str]) -> int:
    from tokenizers import Tokenizer
    return len(tok.encode_batch_fast(chunk) if isinstance(tok, Tokenizer) else tok.encode(chunk))


def _init(kind: str) -> None:
    global _TOK
    _TOK = _tokenizer(kind)


def _encode(chunk: list[str]) -> int:
    return _encode_with(_TOK, chunk)


def _timed(chunk: list[str]) -> float:
    t = time.perf_counter()
    _encode(chunk)
    return time.perf_counter() - t


def natural_texts(n: int) -> list[str]:
    """Paragraphs of the installed packages' descriptions: open-vocabulary English with code and
    URLs, mostly ASCII, to show the cache's behaviour off the synthetic texts' 150 words."""
    from importlib.metadata import distributions
    out: list[str] = []
    for d in sorted(distributions(), key=lambda d: d.metadata["Name"] or ""):
        body = d.metadata.get_payload() or d.metadata.get("Description") or ""
        out += [p.strip() for p in body.split("\n\n") if len(p.strip()) > 40]
    return out[:n]


def _pool(kind: str, procs: int):
    # spawned workers with one tokenizer thread each (RAYON_NUM_THREADS is read at their start)
    os.environ["RAYON_NUM_THREADS"] = "1"
    try:
        return mp.get_context("spawn").Pool(procs, initializer=_init, initargs=(kind,))
    finally:
        del os.environ["RAYON_NUM_THREADS"]


def tokenize_rates(xs: list[str], natural: list[str]) -> dict[str, float]:
    cores = os.cpu_count() or 1
    parts = [xs[i: i + 256] for i in range(0, len(xs), 256)]
    out = {}
    for kind in ("rust", "chunk_cache", "ascii_cpp"):
        for procs in sorted({1, cores}):
            with _pool(kind, procs) as pool:
                pool.map(_encode, parts[:procs] * 4)  # warm-up: a few chunks per process
                t = time.perf_counter()
                n = sum(pool.map(_encode, parts))
                out[f"tokenize_{kind}_{procs}_processes_per_s"] = n / (time.perf_counter() - t)
        # open vocabulary, one process: its first pass (a cold cache) and its second
        with _pool(kind, 1) as pool:
            first, second = pool.map(_timed, [natural, natural], chunksize=1)
        out[f"natural_{kind}_cold_per_s"] = len(natural) / first
        out[f"natural_{kind}_warm_per_s"] = len(natural) / second
    tok = _tokenizer("rust")
    tok.encode_batch_fast(xs[:256])
    t = time.perf_counter()
    tok.encode_batch_fast(xs)
    out["tokenize_rust_1_process_threads_per_s"] = len(xs) / (time.perf_counter() - t)
    out["natural_texts"] = len(natural)
    out["natural_ascii_cpp_share"] = sum(map(_tokenizer("ascii_cpp").fast.takes, natural)) / len(natural)
    return out


def _small_ops(stop: threading.Event, out: list[float]) -> None:
    import torch
    x, n, t = torch.zeros(16), 0, time.perf_counter()
    while not stop.is_set():
        for _ in range(100):
            x = x + 1
        n += 100
    out.append(n / (time.perf_counter() - t))


def _tokenize_until(tok, xs: list[str], stop: threading.Event) -> None:
    while not stop.is_set():
        if tok is None:
            time.sleep(0.01)
        else:
            _encode_with(tok, xs)


def gil_convoy(xs: list[str], seconds: float = 2.0) -> dict[str, float]:
    """A thread issuing tiny torch ops, as a GPU engine thread issues kernel launches (each op
    gives up the GIL and must take it back), beside a thread tokenizing without pause: the op
    rate shows what a tokenizer that holds the GIL costs the engine thread."""
    import torch
    torch.set_num_threads(1)
    toks = {"none": None, "rust": _tokenizer("rust"), "chunk_cache": _tokenizer("chunk_cache"),
            "ascii_cpp": _tokenizer("ascii_cpp")}
    toks["chunk_cache"].encode(xs)
    out: dict[str, float] = {}
    for name, tok in [*toks.items(), *toks.items()]:  # twice, alternated; best of two
        stop, ops = threading.Event(), []
        threads = [threading.Thread(target=_small_ops, args=(stop, ops)),
                   threading.Thread(target=_tokenize_until, args=(tok, xs, stop))]
        for th in threads:
            th.start()
        time.sleep(seconds)
        stop.set()
        for th in threads:
            th.join()
        out[f"engine_ops_beside_{name}_per_s"] = max(out.get(f"engine_ops_beside_{name}_per_s", 0.0), ops[0])
    return out


def submit_rates(n: int, work: Path) -> dict[str, float]:
    path = random_minilm_classifier(work / "minilm-random")
    mf = work / "models.json"
    mf.write_text(json.dumps([{"name": "minilm-random", "kind": "sequence_classifier", "path": str(path),
                               "max_input_tokens": 128}]))
    os.environ.update(GRISTMILL_MODELS_FILE=str(mf), GRISTMILL_BUILTIN_MODELS="false", GRISTMILL_CHUNK_SIZE="2048",
                      GRISTMILL_HOME=str(work / "home"))
    os.environ.pop("GRISTMILL_REDIS_URL", None)
    from gristmill.producers.client import Client
    from gristmill.producers.redis_server import EmbeddedRedis
    from gristmill.producers.settings import Settings
    f = write_requests(work / "in.jsonl", texts(n, 126, 126), "/v1/classifications", "minilm-random")
    best: dict[int, float] = {}
    with EmbeddedRedis(work / "redis") as server:
        for procs in (1, 2, 1, 2):  # alternated; best of two each
            c = Client(Settings(redis_url=server.url, ingest_processes=procs))
            t = time.perf_counter()
            c.submit_file(f)
            best[procs] = max(best.get(procs, 0.0), n / (time.perf_counter() - t))
            c.redis.flushdb()
            c.close()
    return {"submit_1_process_lines_per_s": best[1], "submit_2_processes_lines_per_s": best[2]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.host_limits", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=16384, help="texts to tokenize")
    ap.add_argument("--lines", type=int, default=50000, help="lines to submit")
    args = ap.parse_args(argv)
    xs = texts(args.items, 126, 126)
    figures = {"cores": os.cpu_count(), **tokenize_rates(xs, natural_texts(args.items)), **gil_convoy(xs[:256]),
               **submit_rates(args.lines, Path(tempfile.mkdtemp(prefix="gristmill-host-")))}
    rows = [(k.removesuffix("_per_s").replace("_", " "), f"{v:,.2f}" if k.endswith("share") else f"{v:,.0f}")
            for k, v in figures.items() if k != "cores"]
    print(table(rows, ("128-token texts", "per s")))
    print(json.dumps({k: round(v, 3 if k.endswith("share") else 1) if isinstance(v, float) else v
                      for k, v in figures.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
