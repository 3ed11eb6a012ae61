"""Unlabelled English text that every gristmill install can build offline, for distillation (the
transfer set) and for agreement checks (held-out text), when the user gives none of their own.

Two sources, both fixed by what is installed:
- the docstrings of the Python standard library, read with `ast` (never imported), split into
  sentences: ~16,000 sentences of plain, varied English on CPython 3.11;
- the moderation-like sentences of `texts.py`: everyday sentences and sentences near each
  default category, in varied framings, with word-level variations (a span dropped, two
  sentences joined, a clause moved) so that the student sees text around those as well.

Sentences are split between transfer and held-out by a hash of their text (1 in 10 held out),
and the template sentences by their cores (as `texts.sentences` splits them), so no held-out
sentence is ever trained on. A deployment's own traffic is the better transfer set: `gristmill
optimize --distill FILE` takes it.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import random
import re
import sysconfig
from pathlib import Path

from . import texts as builtin

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_MARKUP = re.compile(r"[`<>{}\[\]|=#*\\]|::|\b(?:https?|www)\b|\w+\(\)|\w+_\w+")
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "__pycache__"}


@functools.cache
def stdlib_sentences() -> tuple[str, ...]:
    """Sentences of 5-40 words from the standard library's docstrings, mostly letters, no code or
    markup; sorted, so the same on every run of the same Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    out.update(_sentences(doc))
    return tuple(sorted(out))


def _sentences(doc: str):
    for para in re.split(r"\n\s*\n", doc):
        text = " ".join(para.split())
        for s in _SENTENCE_END.split(text):
            words = s.split()
            letters = sum(c.isalpha() for c in s)
            if 5 <= len(words) <= 40 and letters > 0.75 * len(s.replace(" ", "")) and not _MARKUP.search(s):
                yield s


def _held_out(text: str) -> bool:
    return hashlib.sha256(text.encode()).digest()[0] % 10 == 0


def _vary(rng: random.Random, sentence: str, other: str) -> str:
    """A word-level variation: drop a span, join with another sentence, or move a clause."""
    words = sentence.split()
    kind = rng.randrange(4)
    if kind == 0 and len(words) > 4:
        i = rng.randrange(len(words) - 2)
        del words[i: i + rng.randint(1, 2)]
        return " ".join(words)
    if kind == 1:
        return f"{sentence} {other}" if rng.random() < 0.5 else f"{other}, {sentence}"
    if kind == 2 and len(words) > 5:
        cut = rng.randrange(2, len(words) - 2)
        return " ".join(words[cut:] + words[:cut])
    return sentence.lower() if rng.random() < 0.5 else sentence.upper()


def vocabulary_words(vocab_file: Path) -> list[str]:
    """The whole words of a WordPiece vocabulary (vocab.txt): alphabetic, two letters or more."""
    words = []
    for line in Path(vocab_file).read_text(encoding="utf-8").splitlines():
        w = line.strip()
        if len(w) >= 2 and w.isalpha() and w.isascii():
            words.append(w)
    return words


def _word_salad(rng: random.Random, words: list[str], glue: list[str]) -> str:
    """A sequence of 4-24 vocabulary words with common function words between them: no grammar,
    but every word the model knows turns up, in many contexts, which is what the student must
    learn to embed like the teacher (data-free distillation)."""
    out = []
    for _ in range(rng.randint(4, 24)):
        out.append(rng.choice(words) if rng.random() < 0.6 else rng.choice(glue))
    return " ".join(out)


def embedding_neighbours(vocab_file: Path, embeddings, k: int = 8) -> dict[str, list[str]]:
    """Each whole vocabulary word's `k` nearest words by cosine of the model's input embeddings
    (`embeddings`: the [vocab, hidden] word-embedding matrix, rows in vocab.txt's order)."""
    import torch

    lines = Path(vocab_file).read_text(encoding="utf-8").splitlines()
    ids = [i for i, w in enumerate(lines) if len(w) >= 2 and w.isalpha() and w.isascii()]
    e = torch.nn.functional.normalize(embeddings[ids].float(), dim=-1)
    out: dict[str, list[str]] = {}
    for s in range(0, len(ids), 2048):
        sim = e[s: s + 2048] @ e.T
        sim[torch.arange(sim.shape[0]), torch.arange(s, s + sim.shape[0])] = -1.0  # not the word itself
        for row, top in zip(range(s, s + sim.shape[0]), sim.topk(k, dim=-1).indices.tolist()):
            out[lines[ids[row]]] = [lines[ids[j]] for j in top]
    return out


def substitute_words(rng: random.Random, sentence: str, neighbours: dict[str, list[str]], p: float = 0.3) -> str:
    """`sentence` with each word the table knows replaced, with probability `p`, by one of its
    embedding neighbours: a new sentence near the old one in meaning (TinyBERT's augmentation)."""
    def swap(m: re.Match) -> str:
        word = m.group(0)
        near = neighbours.get(word.lower())
        if not near or rng.random() >= p:
            return word
        return rng.choice(near)
    return re.sub(r"[A-Za-z]+", swap, sentence)


# The share of a built-in transfer set made of template sentences with words swapped for their
# embedding neighbours (in place of as many word sequences): a 3-of-6-layer student distilled with
# 15% kept 98.40% of the fp32 model's flags on held-out text against 98.16% without, 2,000 steps
# (benchmarks/README.md, "What holds the student back").
SUBSTITUTED_SHARE = 0.15


def builtin_transfer_set(n: int, model_dir: Path, *, sampled: list[str] | None = None,
                         substituted: float = SUBSTITUTED_SHARE, seed: int = 0) -> list[str]:
    """`transfer_set` for the encoder at `model_dir`: with a WordPiece vocabulary (vocab.txt), its
    word sequences and, neighbours taken from the model's input embeddings, `substituted` template
    sentences with words swapped."""
    vocab = Path(model_dir) / "vocab.txt"
    if not vocab.is_file():
        return transfer_set(n, seed=seed, sampled=sampled)
    neighbours = _model_neighbours(str(model_dir)) if substituted else None
    return transfer_set(n, seed=seed, vocab_file=vocab, sampled=sampled, neighbours=neighbours,
                        substituted=substituted)


@functools.lru_cache(maxsize=2)
def _model_neighbours(model_dir: str) -> dict[str, list[str]]:
    from transformers import AutoModel
    embeddings = AutoModel.from_pretrained(model_dir).get_input_embeddings().weight.detach()
    return embedding_neighbours(Path(model_dir) / "vocab.txt", embeddings)


# A second draw of the built-in transfer set (this seed, the distillation's is 0) is what a student
# distilled on the built-in set fits its own head on: sentences and word sequences it did not train
# on, apart from the standard-library sentences, which every draw uses all of.
HEAD_DRAW_SEED = 1


def builtin_head_texts(model_dir: Path, n: int | None = None, traffic: list[str] | None = None) -> list[str]:
    """`n` texts (default: as many as a head refit fits and checks on) of a second draw of
    `builtin_transfer_set` (HEAD_DRAW_SEED), then the lines of `traffic`, once each, where they
    were mixed into the transfer set (`with_traffic`): the head is then fit on the traffic too."""
    if n is None:
        from .distill import HEAD_CHECK_TEXTS, HEAD_FIT_TEXTS
        n = HEAD_FIT_TEXTS + HEAD_CHECK_TEXTS
    return builtin_transfer_set(n, model_dir, seed=HEAD_DRAW_SEED) + list(traffic or [])


# A file of the user's own traffic mixed into the built-in transfer set (`gristmill optimize
# --distill FILE --with-builtin N`) is repeated to weigh about this share of the built-in texts.
TRAFFIC_SHARE = 0.15


def with_traffic(builtin_texts: list[str], lines: list[str], share: float = TRAFFIC_SHARE) -> list[str]:
    """`builtin_texts`, then the traffic's `lines`, each repeated round(share * len(builtin_texts) /
    len(lines)) times (at least once): a few thousand lines of the traffic still steer a student
    that also learns from tens of thousands of built-in texts."""
    if not lines:
        return list(builtin_texts)
    repeat = max(1, round(share * len(builtin_texts) / len(lines)))
    return list(builtin_texts) + list(lines) * repeat


def sampled_share(n: int) -> int:
    """The most sampled texts a transfer set of `n` takes: half, the rest built in."""
    return n // 2


def transfer_set(n: int, *, seed: int = 0, vocab_file: Path | None = None, sampled: list[str] | None = None,
                 neighbours: dict[str, list[str]] | None = None, substituted: float = 0.0) -> list[str]:
    """`n` transfer sentences, none of them held out: half from the standard library's docstrings,
    a fifth moderation-like (template sentences and their variations), and, given the model's
    WordPiece vocabulary, the rest word sequences over it (else more of the first two). `sampled`
    texts (`sampled.transfer_texts`, up to `sampled_share(n)`) take the place of as many of those.
    Given `neighbours` (`embedding_neighbours`), a `substituted` share of `n` is template sentences
    with words swapped for their neighbours (`substitute_words`), in place of as many word sequences."""
    if sampled:
        first = list(sampled[: sampled_share(n)])
        out = first + transfer_set(n - len(first), seed=seed, vocab_file=vocab_file, neighbours=neighbours,
                                   substituted=substituted)
        random.Random(seed + 1).shuffle(out)
        return out
    rng = random.Random(seed)
    docs = [s for s in stdlib_sentences() if not _held_out(s)]
    domain = builtin.sentences(max(256, n), seed=seed)
    out = rng.sample(docs, min(len(docs), n // 2))
    if vocab_file is not None:
        words = vocabulary_words(vocab_file)
        glue = [w for s in docs[:3000] for w in s.lower().split() if w.isalpha() and len(w) <= 4]
        swapped = int(n * substituted) if neighbours else 0
        out += [_word_salad(rng, words, glue) for _ in range(max(0, n * 3 // 10 - swapped))]
        for _ in range(swapped):
            a = rng.choice(domain)
            out.append(substitute_words(rng, a if rng.random() < 0.5 else _vary(rng, a, rng.choice(domain)),
                                        neighbours))
    while len(out) < n:
        a, b = rng.choice(domain), rng.choice(domain + docs[:2000])
        out.append(a if rng.random() < 0.4 else _vary(rng, a, b))
    rng.shuffle(out)
    return out


def heldout_set(n: int, *, seed: int = 0) -> list[str]:
    """`n` held-out sentences: half the standard library's held-out docstring sentences, half the
    held-out template sentences (cores and framings the transfer and calibration sets never use)."""
    rng = random.Random(seed + 7)
    docs = [s for s in stdlib_sentences() if _held_out(s)]
    out = rng.sample(docs, min(len(docs), n // 2))
    out += builtin.sentences(n - len(out), heldout=True, seed=seed)
    rng.shuffle(out)
    return out
