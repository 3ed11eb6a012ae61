"""The chunk-cache tokenizer and the C++ ASCII path give exactly the Rust tokenizer's ids (real MiniLM
WordPiece vocabulary)."""

import functools
import platform
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from gristmill.kernels import tokenize
from gristmill.kernels.tokenize import AsciiWordPiece, ChunkCacheTokenizer
from gristmill.producers.registry import DEFAULT_CLASSIFIER


def rust(max_length: int) -> Tokenizer:
    tok = Tokenizer.from_file(str(DEFAULT_CLASSIFIER.resolve_path() / "tokenizer.json"))
    tok.enable_truncation(max_length)
    tok.no_padding()
    return tok


@pytest.fixture(scope="module")
def pair():
    r = rust(16)
    cached = ChunkCacheTokenizer.build(r, 16)
    assert cached is not None, "MiniLM's BERT tokenizer is eligible"
    return r, cached


def expect(r: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in r.encode_batch_fast(texts)]


# Words, punctuation, whitespace of every kind Python or BERT treats specially, accents, CJK,
# control and zero-width characters, special-token text, and over-long words.
PIECES = st.sampled_from([
    "the", "The", "QUICK", "fox", "naïve", "café", "Ünïcödé", "\u4e2d\u6587", "unbelievable", "x" * 120,
    "don't", "e-mail", "3.14", "100%", "(a)", "[CLS]", "[MASK]", "[SEP][UNK]", "[mask]", "[", "]", "##ing",
    " ", "  ", "\t", "\n", "\r\n", "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\xa0", "\u3000", "\u2028",
    "\x00", "\x7f", "\u200b", "\ufffd", "\u0301", "e\u0301", "\U0001F600", ".", ",", "!?", "@user", "#tag",
])
TEXTS = st.lists(PIECES, max_size=40).map("".join)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(TEXTS, min_size=1, max_size=8))
def test_ids_equal_the_rust_tokenizer(pair, texts):
    r, cached = pair
    assert cached.encode(texts) == expect(r, texts)
    assert cached.encode(texts) == expect(r, texts), "the same again, now from the cache"


def test_truncation_keeps_what_rust_keeps(pair):
    r, cached = pair
    texts = ["word " * 40, "a " * 14, "a " * 15, "a\x00 " * 30 + "b c d e f", "\u200b " * 20 + "real words here",
             "one " * 13 + "\x0b two three", "antidisestablishmentarianism " * 10]
    assert cached.encode(texts) == expect(r, texts)
    assert all(len(ids) <= 16 for ids in cached.encode(texts))


@pytest.mark.parametrize("max_length", [3, 8, 128, 512])
def test_every_length_and_the_shipped_sentences(max_length):
    from gristmill.kernels.texts import sentences
    r = rust(max_length)
    cached = ChunkCacheTokenizer.build(r, max_length)
    texts = sentences(256, heldout=True) + [" ".join(sentences(64))]
    assert cached.encode(texts) == expect(r, texts)


def test_cache_is_bounded(pair, monkeypatch):
    r, _ = pair
    cached = ChunkCacheTokenizer.build(r, 16)
    monkeypatch.setattr(tokenize, "CACHE_LIMIT", 50)
    texts = [" ".join(f"w{i}x{j}" for j in range(10)) for i in range(30)]
    assert cached.encode(texts) == expect(r, texts)
    assert 0 < len(cached.cache) <= 50
    assert cached.misses >= 300 and cached.hits >= 0


def test_refuses_tokenizers_where_chunks_are_not_independent(tiny_models_file):
    # the tests' tiny models share a byte-level BPE tokenizer: spaces belong to its tokens
    tok = Tokenizer.from_file(str(tiny_models_file.parent / "weights" / "classifier" / "tokenizer.json"))
    tok.enable_truncation(16)
    assert ChunkCacheTokenizer.build(tok, 16) is None


def test_the_engine_uses_it_when_asked():
    from gristmill.kernels.classify import ClassifierEngine
    path = DEFAULT_CLASSIFIER.resolve_path()
    on = ClassifierEngine(path, max_length=32, pooled=True, cpu_precision="fp32", chunk_cache=True)
    off = ClassifierEngine(path, max_length=32, pooled=True, cpu_precision="fp32")
    assert isinstance(on._chunks, ChunkCacheTokenizer) and off._chunks is None and off._fast is not None
    texts = ["Is this text harmful?", "a " * 100, ""]
    assert on.encode(texts) == off.encode(texts) == on.tokenizer(texts, truncation=True, max_length=32)["input_ids"]


def test_threads_sharing_one_cache_get_their_own_ids(pair, monkeypatch):
    # a worker's task threads tokenize through one engine; clears (a tiny limit) race with lookups
    from concurrent.futures import ThreadPoolExecutor
    r, _ = pair
    cached = ChunkCacheTokenizer.build(r, 16)
    monkeypatch.setattr(tokenize, "CACHE_LIMIT", 40)
    jobs = [[" ".join(f"t{k}w{(i * 7 + j) % 53}" for j in range(12)) for i in range(20)] for k in range(16)]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            assert list(pool.map(cached.encode, jobs)) == [expect(r, texts) for texts in jobs]


def scraped_after_encoding(texts: list[str], **engine_kw) -> str:
    """The worker's metrics page after a MiniLM engine (as model "minilm") encoded `texts`."""
    from prometheus_client import generate_latest

    from gristmill.kernels.classify import ClassifierEngine
    from gristmill.workers import metrics

    eng = ClassifierEngine(DEFAULT_CLASSIFIER.resolve_path(), max_length=32, pooled=True, cpu_precision="fp32",
                           **engine_kw)

    class Host:
        def loaded(self):
            return {"minilm": eng}
    metrics.watch_tokenizers(Host())
    try:
        eng.encode(texts)
        return generate_latest().decode()
    finally:
        metrics.watch_tokenizers(None)


def test_worker_metrics_report_the_cache():
    text = scraped_after_encoding(["one two three", "two three four"], chunk_cache=True)
    assert 'gristmill_tokenizer_chunks_total{model="minilm",outcome="miss"} 4.0' in text
    assert 'gristmill_tokenizer_chunks_total{model="minilm",outcome="hit"} 2.0' in text
    assert 'gristmill_tokenizer_cache_chunks{model="minilm"} 4.0' in text


# -- the C++ path for ASCII texts (flash-tokenizer)

# a dependency on x86-64 Linux only (pyproject.toml): there it must be installed, and these run
needs_flash = pytest.mark.skipif(not (sys.platform == "linux" and platform.machine() == "x86_64"),
                                 reason="flash-tokenizer is a dependency on x86-64 Linux only")

# ASCII words, punctuation, control characters, added-token text and words around WordPiece's
# 100-character limit, with and without control characters inside (which BERT deletes)
ASCII_PIECES = st.sampled_from([
    "the", "QUICK", "fox", "unbelievable", "antidisestablishmentarianism", "don't", "e-mail", "3.14", "100%",
    "U.S.A.", "http://x.co/a?b=c&d", "[CLS]", "[MASK]", "[SEP][UNK]", "[PAD]", "[cls]", "[", "]", "##ing", "##",
    " ", "  ", "\t", "\n", "\r\n", "\x0b", "\x0c", "\x1c", "\x1f", "\x00", "\x7f", "\x1b", ".", ",", "!?",
    "a" * 99, "b" * 100, "c" * 101, "d" * 150, "e" * 60 + "\x00" * 41, "f" * 50 + "\x00" + "f" * 50,
])
ASCII_TEXTS = st.lists(ASCII_PIECES, max_size=60).map("".join)


@functools.cache
def ascii_pair(max_length: int) -> tuple[Tokenizer, AsciiWordPiece]:
    r = rust(max_length)
    return r, AsciiWordPiece.build(r, max_length)


@needs_flash
def test_ascii_path_is_built_for_minilm():
    # not None: the library is installed and agrees with the Rust tokenizer on every probe
    assert AsciiWordPiece.build(rust(16), 16) is not None


@needs_flash
@settings(max_examples=300, deadline=None)
@given(st.lists(ASCII_TEXTS | TEXTS, min_size=1, max_size=8), st.sampled_from([3, 8, 16, 128]))
def test_ascii_path_ids_equal_the_rust_tokenizer(texts, max_length):
    r, fast = ascii_pair(max_length)
    fast.routed = fast.passed = 0
    seen: list[str] = []

    def fallback(xs):
        seen.extend(xs)
        return expect(r, xs)
    assert fast.encode(texts, fallback) == expect(r, texts)
    assert all(not fast.takes(t) for t in seen)
    assert fast.routed + fast.passed == len(texts) and fast.passed == len(seen)


@needs_flash
def test_ascii_path_takes_only_what_it_was_checked_on():
    fast = AsciiWordPiece.build(rust(128), 128)
    assert fast.takes("Plain text, with punctuation: 1,234.5% (ok)!") and fast.takes("") and fast.takes("a" * 100)
    assert fast.takes("a" * 100 + "." + "b" * 100)  # two words of 100
    assert not fast.takes("café")  # not ASCII
    assert not fast.takes("say [MASK] here")  # added-token text, matched as special by the Rust tokenizer
    assert not fast.takes("a" * 101)  # over WordPiece's limit: [UNK] in the Rust tokenizer
    assert not fast.takes("a" * 60 + "\x00" * 41)  # deleted by BERT's cleaning, counted here: judged long


@needs_flash
def test_ascii_path_truncates_as_the_rust_tokenizer_does():
    from gristmill.kernels.texts import sentences
    for max_length in (3, 8, 128, 512):
        r = rust(max_length)
        fast = AsciiWordPiece.build(r, max_length)
        texts = sentences(256, heldout=True) + [" ".join(sentences(64)), "tokenization " * 200]
        assert fast.encode(texts, lambda xs: expect(r, xs)) == expect(r, texts)


def test_ascii_path_refuses_other_tokenizers_and_needs_its_library(tiny_models_file, monkeypatch):
    tok = Tokenizer.from_file(str(tiny_models_file.parent / "weights" / "classifier" / "tokenizer.json"))
    tok.enable_truncation(16)
    assert AsciiWordPiece.build(tok, 16) is None  # byte-level BPE, not BERT WordPiece
    monkeypatch.setitem(sys.modules, "flash_tokenizer._core", None)  # as if not installed
    assert AsciiWordPiece.build(rust(16), 16) is None


@needs_flash
def test_the_engine_uses_the_ascii_path_by_setting(monkeypatch):
    from gristmill.producers.settings import Settings
    from gristmill.workers.host import EngineHost
    monkeypatch.setenv("GRISTMILL_AUTO_VARIANTS", "false")  # the torch engine, whatever the home has built
    on = EngineHost(Settings()).engine("all-MiniLM-L6-v2-moderation")
    monkeypatch.setenv("GRISTMILL_FAST_TOKENIZER", "false")
    off = EngineHost(Settings()).engine("all-MiniLM-L6-v2-moderation")
    assert isinstance(on.ascii_tokenizer, AsciiWordPiece) and off.ascii_tokenizer is None
    texts = ["Is this text harmful?", "naïve " * 100, "[MASK] me", "x" * 300, ""]
    # "[MASK]" in a text is text: the model's mask token is not in its ids
    assert on.encode(texts) == off.encode(texts) == on.tokenizer(texts, truncation=True, max_length=on.max_length,
                                                                  split_special_tokens=True)["input_ids"]
    assert (on.ascii_tokenizer.routed, on.ascii_tokenizer.passed) == (2, 3)
    assert on.tokenizer.mask_token_id not in on.encode(["[MASK] me"])[0]


@needs_flash
def test_worker_metrics_report_the_ascii_path():
    text = scraped_after_encoding(["plain text", "more plain text", "café"], fast_tokenizer=True)
    assert 'gristmill_tokenizer_texts_total{model="minilm",path="ascii"} 2.0' in text
    assert 'gristmill_tokenizer_texts_total{model="minilm",path="other"} 1.0' in text
