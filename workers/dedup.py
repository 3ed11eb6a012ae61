"""The classifier score cache: identical inputs run once and score identically.

An entry maps (model, weights revision, engine variant, labels) + SHA-256 of the UTF-8 text to
the model's scores, packed as float32 in label order (the engines compute float32, so packing
loses nothing). Thresholds are not part of the key: a policy turns scores into flags afterwards,
so batches under different policies share entries. Entries expire after GRISTMILL_DEDUP_TTL_S.

Within a worker process, `Recent` shares the pending or finished result of an input among the
chunks in flight, so a text repeated across concurrent chunks runs once. Across processes, two that
miss on the same text at once both compute it; `publish` keeps the first writer's scores (SET NX)
and hands them to the second, so every line reports the same numbers.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import struct
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from ..producers import constants as C

from .batcher import Slot

# KEYS: entry keys. ARGV: ttl seconds (0: none), then one packed value per key. Sets each key that
# is absent; returns, per key, the earlier writer's value where one stood, else false (nil to the
# client), so the usual reply, where every value is new, is a list of nils rather than the values sent.
_PUBLISH = """
local out = {}
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS do
  local set
  if ttl > 0 then
    set = redis.call('SET', KEYS[i], ARGV[i + 1], 'NX', 'EX', ttl)
  else
    set = redis.call('SET', KEYS[i], ARGV[i + 1], 'NX')
  end
  if set then
    out[i] = false
  else
    out[i] = redis.call('GET', KEYS[i]) or false
  end
end
return out
"""


def evicts_any_key(redis) -> bool:
    """Whether the server evicts keys of its own accord when full (an allkeys-* maxmemory policy,
    as the cache server `gristmill up` starts has); False where it cannot tell (CONFIG disabled)."""
    try:
        policy = redis.config_get("maxmemory-policy").get("maxmemory-policy", "")
    except Exception:  # noqa: BLE001 - managed Redis often renames or disables CONFIG
        return False
    return str(policy).startswith("allkeys-")


# Bumped when the same text can tokenize differently (2: special-token text in an input is read as
# text), so that scores computed the earlier way are not served for it.
INPUT_ENCODING = "2"


def model_key(model: str, revision: str, variant: str, labels: Sequence[str]) -> str:
    blob = "\x1f".join([model, revision, variant, INPUT_ENCODING, *labels])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=64)
def _f32(n: int) -> struct.Struct:
    return struct.Struct(f"<{n}f")


# struct rather than numpy: for a dozen floats its call costs less than building an array
# (pack 1.4 against 2.4 us, unpack 3.2 against 4.6 us), with the same bytes and values.
def pack(scores: dict[str, float], labels: Sequence[str]) -> str:
    values = [scores[k] for k in labels]
    try:
        raw = _f32(len(values)).pack(*values)
    except OverflowError:  # finite beyond float32: numpy's cast gives inf, as before
        with np.errstate(over="ignore"):
            raw = np.asarray(values, dtype="<f4").tobytes()
    return base64.b64encode(raw).decode()


def unpack(value: str, labels: Sequence[str]) -> dict[str, float]:
    raw = base64.b64decode(value)
    if len(raw) != 4 * len(labels):
        raise ValueError(f"cached scores hold {len(raw) / 4:g} labels, the model has {len(labels)}")
    return dict(zip(labels, _f32(len(labels)).unpack(raw)))


def canonical(scores: dict[str, float], labels: Sequence[str]) -> dict[str, float]:
    """The scores as a cache round trip returns them (float32), so a computed line and a cached
    line for the same text print the same digits."""
    return unpack(pack(scores, labels), labels)


class ScoreCache:
    def __init__(self, redis, ttl_s: int):
        self.r = redis
        self.ttl_s = ttl_s
        self._publish = redis.register_script(_PUBLISH) if ttl_s > 0 else None
        # On a server that evicts the least recently used keys when full (the cache's own), entries
        # need no expiry to stay bounded, and a SET NX without EX costs ~25% less server CPU and
        # ~14% less memory an entry (docs/moderation.md, "The cache's own server"). Elsewhere the TTL is what bounds them.
        self.write_ttl_s = 0 if ttl_s > 0 and evicts_any_key(redis) else ttl_s

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0

    def lookup(self, mkey: str, shas: Sequence[str]) -> list[str | None]:
        if not self.enabled or not shas:
            return [None] * len(shas)
        return self.r.mget([C.dedup_key(mkey, s) for s in shas])

    def publish(self, mkey: str, shas: Sequence[str], values: Sequence[str]) -> list[str | None]:
        """Store computed values where absent. Returns, per sha, the value another writer stored
        first (which stands), or None where this one's now stands."""
        if not self.enabled or not shas:
            return [None] * len(shas)
        keys = [C.dedup_key(mkey, s) for s in shas]
        return list(self._publish(keys=keys, args=[self.write_ttl_s, *values]))


class Recent:
    """The slots of recently submitted classifier inputs, by (model key, sha): a chunk whose input
    is already running, or ran moments ago, takes that result instead of running it again. Bounded
    (least recently used out); a slot that fails is dropped, so a retry runs afresh."""

    def __init__(self, capacity: int = 16384):
        self.capacity = capacity
        self.lock = threading.Lock()  # held by the caller across get/put and the batcher submit
        self._slots: OrderedDict[tuple[str, str], Slot] = OrderedDict()

    def get(self, key: tuple[str, str]) -> Slot | None:
        f = self._slots.get(key)
        if f is None:
            return None
        if f.done() and f.exception() is not None:
            del self._slots[key]  # failed: the caller runs the input afresh
            return None
        self._slots.move_to_end(key)
        return f

    def put(self, key: tuple[str, str], slot: Slot) -> None:
        # A failed slot is dropped when next looked up, not by a done-callback: adding one per
        # input cost ~7% of a worker's task threads at thousands of items/s.
        self._slots[key] = slot
        while len(self._slots) > self.capacity:
            self._slots.popitem(last=False)
