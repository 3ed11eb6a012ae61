"""Transfer text sampled from a chat model: moderation-like and everyday messages written by the
built-in generator (SmolLM2-135M-Instruct) on prompts over the default categories and benign
topics. It widens what a distilled student sees beyond `corpus.py`'s few template cores, offline.

Lines are cached under `cache_dir` in chunks of 1,000, named by the generator's weights, the seed,
the chunk and every sampling setting, so a second build reads them back, a larger sample reuses a
smaller one's lines, and an interrupted run resumes at its first missing chunk. 1 line in 10 is
held out by `corpus`'s text hash; `transfer_texts` gives the rest, each line whole and each of its
sentences alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import time
from pathlib import Path

from . import corpus

TOPICS = [
    "insults someone personally", "mocks a classmate cruelly", "tells someone they are worthless",
    "bullies a coworker", "expresses hatred of a religious group", "says immigrants are less than human",
    "insults people for their race", "demeans people for their sexuality", "threatens to hurt a neighbour",
    "warns someone they will be attacked", "threatens to kill someone", "says the writer wants to hurt themselves",
    "says the writer wants to end their life", "asks about ways to self-harm", "describes feeling hopeless and suicidal",
    "describes two adults having sex explicitly", "asks someone for nude photos", "is a sexual come-on",
    "describes a bloody fight in detail", "describes a shooting with injuries", "describes a brutal murder",
    "asks how to buy drugs online", "asks how to make a weapon at home", "asks how to steal a car",
    "explains how to commit fraud",
    "is about cooking dinner", "is about a football match", "is about a software bug", "is about a trip to the mountains",
    "is about gardening", "is about a new job", "asks for a book recommendation", "complains about a late train",
    "is about a pet dog", "is about a history lesson", "is about a video game", "reviews a restaurant",
    "discusses a news story about an election", "discusses a war documentary", "is about a doctor visit",
    "discusses a crime novel",
]
STYLES = ["a short social media post", "a one-sentence forum comment", "a text message", "a short chat message",
          "a one-line review", "a tweet"]
SAMPLING = {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": 36, "batch": 128, "version": 1}


def prompt(rng: random.Random) -> str:
    return f"Write {rng.choice(STYLES)} that {rng.choice(TOPICS)}. Reply with the message only."


CHUNK = 1000  # lines per cache file: a larger sample reuses a smaller one's chunks, and an interrupted run resumes


def cache_name(generator: Path, index: int, seed: int, chunk: int = CHUNK) -> str:
    """The file that holds chunk `index` (lines index*chunk onward) of the sample seeded `seed`."""
    from .loading import weights_revision
    key = json.dumps({"w": weights_revision(generator), "chunk": index, "size": chunk, "seed": seed,
                      "sampling": SAMPLING, "topics": TOPICS, "styles": STYLES}, sort_keys=True)
    return f"sampled-{hashlib.sha256(key.encode()).hexdigest()[:16]}.txt"


def sample_lines(n: int, *, generator: Path, cache_dir: Path, seed: int = 0, device: str = "cpu",
                 chunk: int = CHUNK, log=None) -> list[str]:
    """`n` messages sampled from the chat model at `generator` (a Hugging Face directory or GGUF
    file), one per line, whitespace collapsed. They are made and cached in chunks of `chunk` lines,
    each with its own seed, so the first `n` lines are the same whatever else was asked before."""
    if n < 0:
        raise ValueError(f"a sample of {n} lines: give 0 or more")
    cache_dir = Path(cache_dir)
    paths = [cache_dir / cache_name(generator, k, seed, chunk) for k in range(-(-n // chunk))]
    missing = [k for k, path in enumerate(paths) if not path.is_file()]
    if missing:
        sampler = _Sampler(generator, cache_dir, device)
        t0 = time.monotonic()
        for done, k in enumerate(missing):
            _write(paths[k], sampler.lines(chunk, seed=_chunk_seed(seed, k)))
            if log:
                log(f"sampled chunk {done + 1}/{len(missing)} ({chunk} lines) of the {n}-line transfer sample "
                    f"({time.monotonic() - t0:.0f} s)")
    lines = [line for path in paths for line in path.read_text(encoding="utf-8").splitlines()]
    return lines[:n]


def _chunk_seed(seed: int, index: int) -> int:
    """Chunk `index`'s own seed: chunks differ from each other, and from another seed's."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{index}".encode()).digest()[:4], "little")


def _write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".sampled-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


class _Sampler:
    """The chat model, loaded once, writing messages for random prompts."""

    def __init__(self, generator: Path, cache_dir: Path, device: str):
        from .loading import autocast_dtype, default_dtype, load_causal_lm, resolve_device
        self.generator = generator
        self.dev = resolve_device(device)
        dtype = autocast_dtype(self.dev, "auto") or default_dtype(self.dev)  # bf16 on GPUs and on CPUs with native bf16
        self.model, self.tok, _ = load_causal_lm(Path(generator), cache_dir, self.dev, dtype)
        self.tok.padding_side = "left"
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id

    def lines(self, n: int, *, seed: int) -> list[str]:
        import torch
        rng = random.Random(seed)
        torch.manual_seed(seed)
        lines: list[str] = []
        batches = 0
        while len(lines) < n:
            batches += 1
            if batches > 4 * (n // SAMPLING["batch"] + 1):
                raise RuntimeError(f"{self.generator}: {len(lines)} usable lines of {n} after {batches - 1} "
                                   "batches; is it a chat model?")
            chats = [self.tok.apply_chat_template([{"role": "user", "content": prompt(rng)}], tokenize=False,
                                                  add_generation_prompt=True) for _ in range(SAMPLING["batch"])]
            enc = self.tok(chats, return_tensors="pt", padding=True, add_special_tokens=False).to(self.dev)
            with torch.no_grad():
                out = self.model.generate(**enc, do_sample=True, temperature=SAMPLING["temperature"],
                                          top_p=SAMPLING["top_p"], max_new_tokens=SAMPLING["max_new_tokens"],
                                          pad_token_id=self.pad)
            for row in self.tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True):
                text = " ".join(row.replace('"', " ").split())
                if len(text.split()) >= 3:
                    lines.append(text)
        return lines[:n]


def transfer_texts(lines: list[str]) -> list[str]:
    """The lines not held out, each whole and each of its sentences (three words or more) alone."""
    out = []
    for line in lines:
        if corpus._held_out(line):
            continue
        out.append(line)
        parts = [s for s in corpus._SENTENCE_END.split(line) if len(s.split()) >= 3]
        if len(parts) > 1:
            out += parts
    return out


def heldout_texts(lines: list[str]) -> list[str]:
    return [line for line in lines if corpus._held_out(line)]
