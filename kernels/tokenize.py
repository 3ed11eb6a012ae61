"""Token ids for BERT-style tokenizers, faster than the Rust tokenizer and equal to it: through a
cache of whitespace-delimited chunks (`ChunkCacheTokenizer`, opt-in), and for pure-ASCII texts
through a C++ WordPiece tokenizer (`AsciiWordPiece`, below, on by default).

The chunk cache: a BERT tokenizer (BertNormalizer, then BertPreTokenizer, then any per-word model such as
WordPiece) treats the whitespace-separated chunks of a text independently: the normalizer works
character by character, the pre-tokenizer splits on whitespace and then isolates punctuation
inside each chunk, and the model sees one pre-token at a time. So the ids of a text are the ids of
its chunks, concatenated, and the ids of a chunk can be cached. Ordinary text repeats its chunks
(Zipf), so after a warm-up almost every chunk is a dictionary hit, and a text costs one
`str.split`, one `map` over the cache and one concatenation, all in C. Only the first `body`
chunks of a text are looked at: each chunk yields at least one token, so the rest would be
truncated away (the Rust tokenizer tokenizes the whole text and then truncates).

The only places where Python's `str.split` and BERT disagree are characters Python splits on but
BERT's text cleaning deletes (VT, FF, the C0 separators 0x1c-0x1f, NEL); a text containing one goes
to the Rust tokenizer whole. Added tokens ([CLS], [MASK], ...) are matched inside chunks exactly as
the Rust tokenizer matches them, as long as none contains whitespace or strips its neighbours:
`ChunkCacheTokenizer.build` refuses tokenizers where that does not hold, and any tokenizer whose
normalizer or pre-tokenizer is not BERT's, and it checks a probe set against the Rust tokenizer
before it is used. tests/unit/test_tokenize.py checks equality on generated text (hypothesis).

Measured with `python -m benchmarks.host_limits` (benchmarks/README.md, "Host limits"), one core: 8.4-10x
the Rust tokenizer's `encode_batch_fast` on 128-token synthetic texts; on open-vocabulary
paragraphs 1.2-1.3x with a cold cache and 4.8-6.4x on a second pass. But it runs in Python and holds
the GIL for its ~20 us per text, where the Rust call releases it while it tokenizes: beside a thread
tokenizing without pause, a thread issuing tiny torch ops (as a GPU engine thread issues kernel
launches, each giving up the GIL) ran 1.2k ops/s against 189k/s beside the Rust tokenizer. So it is
off by default (the worker setting TOKENIZER_CACHE) until the GPU queue benchmark says whether a
GPU worker gains more than it loses; on the CPU the queue benchmark showed no difference either way.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from itertools import chain

# Python's str.split() splits on these; BERT's clean_text deletes them (they are control characters).
_SPLIT_DISAGREES = re.compile("[\x0b\x0c\x1c-\x1f\x85]").search

# Probe strings checked against the Rust tokenizer before the cache is used.
_PROBES = [
    "", "   ", "Hello, World! It's 3:45pm.", "naïve café \u00e9t\u00e9 ÀÉÎ", "\u4e2d\u6587 mixed\u3000space",
    "[CLS] a [MASK]b [SEP][UNK]", "tab\there\nnew\rline", "zero\u200bwidth\u00a0nbsp", "a\x00b\x7fc",
    "x" * 150, "under_score-dash/slash (paren) {brace} 'quote' \"dq\" #hash $5 100%",
]

CACHE_LIMIT = 1 << 18  # chunks; cleared (not evicted one by one) when full
LONG_CHUNK = 64  # characters; longer chunks (URLs, base64) are tokenized but not cached


class ChunkCacheTokenizer:
    """`encode(texts)` -> ids per text, equal to the Rust tokenizer's with truncation to `max_length`."""

    def __init__(self, rust, max_length: int):
        self.rust = rust  # the full tokenizer, truncating: the fallback for whole texts
        self.words = _untruncated(rust)  # chunks: no truncation (nor special tokens, per call)
        self.prefix, self.suffix = _special_ends(self.words)
        self.body = max_length - len(self.prefix) - len(self.suffix)
        self.cache: dict[str, tuple[int, ...]] = {}
        self.hits = self.misses = 0

    @classmethod
    def build(cls, rust, max_length: int) -> ChunkCacheTokenizer | None:
        """The cache over `rust` (a `tokenizers.Tokenizer` truncating to max_length), or None where
        chunk-wise tokenizing would not be exact."""
        cfg = json.loads(rust.to_str())
        norm, pre = cfg.get("normalizer"), cfg.get("pre_tokenizer")
        if norm is not None and norm.get("type") != "BertNormalizer":
            return None
        if pre is None or pre.get("type") != "BertPreTokenizer":
            return None
        for tok in cfg.get("added_tokens") or []:
            if any(ch.isspace() for ch in tok["content"]) or tok.get("lstrip") or tok.get("rstrip") \
                    or tok.get("single_word"):
                return None
        trunc = cfg.get("truncation") or {}
        if trunc.get("direction", "Right") != "Right":
            return None
        try:
            me = cls(rust, max_length)
        except ValueError:
            return None
        if me.body < 1 or me.encode(_PROBES) != [e.ids for e in rust.encode_batch_fast(_PROBES)]:
            return None
        me.cache.clear()
        me.hits = me.misses = 0
        return me

    def encode(self, texts: list[str]) -> list[list[int]]:
        get, body, prefix = self.cache.get, self.body, self.prefix
        out: list[list[int] | None] = [None] * len(texts)
        missed: list[tuple[int, list[str], bool]] = []  # texts with a chunk not in the cache yet
        for i, t in enumerate(texts):
            chunks = t.split(None, body)
            cut = len(chunks) > body
            if cut:  # the last element is the unsplit rest, which truncation drops
                rest = chunks.pop()
                seen = t[: len(t) - len(rest)]
            else:
                seen = t
            if _SPLIT_DISAGREES(seen):
                continue  # left None: the Rust tokenizer takes it whole
            try:
                ids = [*prefix, *chain.from_iterable(map(get, chunks))]
            except TypeError:  # get returned None: looked up below, for all such texts at once
                missed.append((i, chunks, cut))
                continue
            self.hits += len(chunks)
            out[i] = self._finish(ids, cut)
        if missed:
            found = self._fill([c for _, chunks, _ in missed for c in chunks])
            for i, chunks, cut in missed:
                out[i] = self._finish([*prefix, *chain.from_iterable(found[c] for c in chunks)], cut)
        whole = [i for i, ids in enumerate(out) if ids is None]  # split disagreements and _finish's refusals
        if whole:
            for i, e in zip(whole, self.rust.encode_batch_fast([texts[i] for i in whole])):
                out[i] = e.ids
        return out  # type: ignore[return-value]

    def _finish(self, ids: list[int], cut: bool) -> list[int] | None:
        """Truncated ids with the special tokens, or None when only the whole text can tell."""
        end = len(self.prefix) + self.body
        if cut and len(ids) < end:
            # some chunk gave no token (only characters that cleaning deletes), so the rest that
            # was not looked at may hold tokens that truncation would keep
            return None
        del ids[end:]
        ids += self.suffix
        return ids

    def _fill(self, chunks: list[str]) -> dict[str, tuple[int, ...]]:
        """Ids of `chunks`, the missing ones tokenized in one call and cached. Safe against other
        threads (a worker's task threads share the engine): every cached value is read once, so a
        clear by another thread between two reads cannot lose it."""
        cache = self.cache
        known: dict[str, tuple[int, ...]] = {}
        new: list[str] = []
        for c in dict.fromkeys(chunks):
            ids = cache.get(c)
            if ids is None:
                new.append(c)
            else:
                known[c] = ids
        found = dict(zip(new, (tuple(e.ids) for e in self.words.encode_batch_fast(new, add_special_tokens=False))))
        if len(cache) + len(new) > CACHE_LIMIT:
            cache.clear()
        for c, ids in found.items():
            if len(c) <= LONG_CHUNK and len(cache) < CACHE_LIMIT:
                cache[c] = ids
        self.misses += len(new)
        self.hits += len(chunks) - len(new)
        known.update(found)
        return known


class AsciiWordPiece:
    """Ids of pure-ASCII texts from a C++ BERT tokenizer (flash-tokenizer), equal to the Rust
    tokenizer's; every other text goes to a fallback (the Rust tokenizer, or the chunk cache).

    On the 2-core AVX2 test machine the Rust tokenizer took ~100 us per 160-character text on one
    core (most of it in its normalizer's and pre-tokenizer's per-character alignment bookkeeping);
    this one takes ~6 us, holding the GIL for one text at a time. But it agrees with the Rust
    tokenizer only where it was checked to: fuzzing found it differs on non-ASCII text (accents,
    CJK, combining marks, private-use characters), on added-token text such as "[CLS]" (matched
    as special by the Rust tokenizer only), on words past WordPiece's `max_input_chars_per_word`
    (the Rust tokenizer gives [UNK]), and where its own truncation cuts a word. So only ASCII texts
    with no added-token text and no run of more than `max_input_chars_per_word` characters between
    spaces or punctuation come here, they are tokenized whole and truncated here as the Rust
    tokenizer truncates. `build` refuses tokenizers that are not BERT WordPiece, and checks a probe
    set against the Rust tokenizer; tests/unit/test_tokenize.py checks equality on generated text.
    """

    def __init__(self, flash, max_length: int, suffix: list[int], specials: list[str], max_word: int):
        self.flash = flash
        self.max_length, self.suffix = max_length, suffix  # the ids the post-processor appends
        by_first: dict[str, list[str]] = {}
        for sp in specials:
            by_first.setdefault(sp[:1], []).append(sp)
        self._specials_by_first = list(by_first.items())
        self.max_word = max_word
        # a run of characters that are neither BERT whitespace nor ASCII punctuation: an upper
        # bound on a word's length (control characters inside it are deleted by BERT's cleaning)
        self._long_word = re.compile(r"[^ \t\n\r!-/:-@\[-`{-~]{%d,}" % (max_word + 1)).search
        self.routed = self.passed = 0

    @classmethod
    def build(cls, rust, max_length: int) -> AsciiWordPiece | None:
        """The fast path over `rust` (a `tokenizers.Tokenizer` truncating to max_length), or None
        where flash-tokenizer is not installed or would not give the same ids."""
        try:
            from flash_tokenizer._core import FlashBertTokenizer
        except ImportError:
            return None
        cfg = json.loads(rust.to_str())
        norm, pre, model = cfg.get("normalizer") or {}, cfg.get("pre_tokenizer") or {}, cfg.get("model") or {}
        if norm.get("type") != "BertNormalizer" or not norm.get("clean_text", True) \
                or pre.get("type") != "BertPreTokenizer" or model.get("type") != "WordPiece" \
                or model.get("continuing_subword_prefix") != "##" or model.get("unk_token") != "[UNK]":
            return None
        if (cfg.get("truncation") or {}).get("direction", "Right") != "Right":
            return None
        added = cfg.get("added_tokens") or []
        if any(tok.get("normalized") or tok.get("lstrip") or tok.get("rstrip") or tok.get("single_word")
               for tok in added):
            return None
        vocab = rust.get_vocab(with_added_tokens=False)
        if sorted(vocab.values()) != list(range(len(vocab))) or any("\n" in t or "\r" in t for t in vocab):
            return None
        try:
            _, suffix = _special_ends(_untruncated(rust))
        except ValueError:
            return None
        fd, path = tempfile.mkstemp(suffix=".txt", prefix="vocab-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.writelines(t + "\n" for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]))
            # tokenizing whole texts: its own truncation is not the Rust tokenizer's
            flash = FlashBertTokenizer(path, bool(norm.get("lowercase", True)), 1 << 20, True)
        finally:
            os.unlink(path)
        me = cls(flash, max_length, suffix, [t["content"] for t in added],
                 int(model.get("max_input_chars_per_word", 100)))
        if me.encode(_PROBES + _ASCII_PROBES, rust_ids(rust)) != rust_ids(rust)(_PROBES + _ASCII_PROBES):
            return None
        me.routed = me.passed = 0
        return me

    def takes(self, text: str) -> bool:
        # cheapest tests first: a text no longer than a word cannot hold an over-long one, and
        # added-token text needs its first character (BERT's all start with "[")
        return text.isascii() and not (len(text) > self.max_word and self._long_word(text)) \
            and not any(c in text and any(s in text for s in group) for c, group in self._specials_by_first)

    def encode(self, texts: list[str], fallback) -> list[list[int]]:
        """Ids per text; `fallback(texts)` gives those of the texts this path does not take."""
        out: list[list[int] | None] = [None] * len(texts)
        rest: list[int] = []
        enc, takes = self.flash.encode, self.takes
        end, suffix = self.max_length - len(self.suffix), self.suffix
        for i, t in enumerate(texts):
            if takes(t):
                ids = enc(t, "longest", 1 << 20)
                if len(ids) > self.max_length:  # truncated as the Rust tokenizer truncates
                    ids = ids[:end] + suffix
                out[i] = ids
            else:
                rest.append(i)
        self.routed += len(texts) - len(rest)
        self.passed += len(rest)
        if rest:
            for i, ids in zip(rest, fallback([texts[i] for i in rest])):
                out[i] = ids
        return out  # type: ignore[return-value]


# Probes for the C++ path: ASCII punctuation, control characters, truncation, long words.
_ASCII_PROBES = [
    "don't stop-believing: U.S.A. e-mail@x.com 12,345.67%", "a\x00b\x7fc\x1fd\x0be\x0cf", "\t\r\n  ",
    "word " * 300, "z" * 100, "y" * 101, "unaffable antidisestablishmentarianism ##ing ##", "[cls] [Mask]",
]


def rust_ids(rust):
    return lambda texts: [e.ids for e in rust.encode_batch_fast(texts)]


def _untruncated(rust):
    from tokenizers import Tokenizer
    words = Tokenizer.from_str(rust.to_str())
    words.no_truncation()
    words.no_padding()
    words.encode_special_tokens = rust.encode_special_tokens  # not part of the serialized form
    return words


def _special_ends(words) -> tuple[list[int], list[int]]:
    """The ids that an untruncated tokenizer's post-processor puts before and after a text's own."""
    probe = "hello world"
    full = words.encode(probe).ids
    bare = words.encode(probe, add_special_tokens=False).ids
    at = next((i for i in range(len(full) - len(bare) + 1) if full[i: i + len(bare)] == bare), None)
    if not bare or at is None:
        raise ValueError("the special tokens do not wrap the text's own ids")
    return full[:at], full[at + len(bare):]
