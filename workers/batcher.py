"""The micro-batcher: merges items from all in-flight messages into device batches.

`plan` is the policy, a pure function (tested without a broker, with hypothesis). `MicroBatcher`
is the runtime: task threads `submit` their items and wait on their `Slot`s; one engine thread plans
and runs batches, so one model sees items from many messages at once. Scheduling (plan) and
execution (the runner) meet only through `Pending` records and lists of indexes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..producers.errors import ConfigurationError

log = logging.getLogger(__name__)


# A batcher key is a model name, optionally followed by KEY_TAG and a tag: items with a tag batch
# only with items of the same tag (a chunk re-run line by line keeps its batches to itself).
KEY_TAG = "\x00"


def tagged(model: str, tag: str) -> str:
    return f"{model}{KEY_TAG}{tag}"


def model_of(key: str) -> str:
    """The model a batcher key runs."""
    return key.split(KEY_TAG, 1)[0]


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int
    token_budget: int  # padded tokens: len(batch) * longest item
    max_wait_s: float

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ConfigurationError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.token_budget < 1:
            raise ConfigurationError(f"token_budget must be >= 1, got {self.token_budget}")
        if self.max_wait_s < 0:
            raise ConfigurationError(f"max_wait_s must be >= 0, got {self.max_wait_s}")


class Requeue(NamedTuple):
    """A runner's result for an item that a second stage must finish: the item goes back in the
    queue under `key`, keeping its payload and its slot, and batches with that key's other items
    like any new work (a cascade's escalated inputs: workers/host.py)."""
    key: str


class Pending(NamedTuple):
    key: str  # items batch together only with the same key (the model)
    cost: int  # tokens this item occupies in a padded row
    arrived: float  # monotonic seconds


def pack(costs: Sequence[int], order: Sequence[int], policy: BatchPolicy) -> list[list[int]]:
    """Cut `order` (indexes sorted by cost) into consecutive batches within both budgets.
    A single item over the token budget still runs, alone."""
    batches: list[list[int]] = []
    cur: list[int] = []
    widest = 0
    for i in order:
        w = max(widest, costs[i])
        if cur and (len(cur) + 1 > policy.max_batch_size or (len(cur) + 1) * w > policy.token_budget):
            batches.append(cur)
            cur, w = [], costs[i]
        cur.append(i)
        widest = w
    if cur:
        batches.append(cur)
    return batches


def plan(pending: Sequence[Pending], policy: BatchPolicy, now: float, flush: bool = False) -> list[list[int]]:
    """Which pending items run now, as device batches of indexes into `pending`.

    Per key, items are sorted by cost (less padding) and packed. Full batches run at once; the
    last, partial batch waits until its key's oldest item has waited `max_wait_s` (or `flush`),
    so a trickle still runs promptly while a flood runs in full batches. Batches come oldest
    member first: a runner that takes the head and re-plans as items arrive never starves long
    items behind a stream of short ones.
    """
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(pending):
        groups.setdefault(p.key, []).append(i)
    out: list[list[int]] = []
    costs = [p.cost for p in pending]
    for idxs in groups.values():
        due = flush or now - min(pending[i].arrived for i in idxs) >= policy.max_wait_s
        order = sorted(idxs, key=lambda i: costs[i])
        batches = pack(costs, order, policy)
        last = batches[-1]
        last_full = len(last) == policy.max_batch_size or (len(last) + 1) * max(costs[i] for i in last) > policy.token_budget
        if not due and not last_full:
            batches = batches[:-1]
        out.extend(batches)
    out.sort(key=lambda b: min(pending[i].arrived for i in b))
    return out


def next_deadline(pending: Sequence[Pending], policy: BatchPolicy) -> float | None:
    if not pending:
        return None
    return min(p.arrived for p in pending) + policy.max_wait_s


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    padded_tokens: int = 0
    real_tokens: int = 0
    splits: int = 0
    busy_s: float = 0.0  # time inside the runner
    by_key: dict[str, int] = field(default_factory=dict)  # items
    batches_by_key: dict[str, int] = field(default_factory=dict)

    @property
    def mean_batch_size(self) -> float:
        return self.items / self.batches if self.batches else 0.0

    @property
    def padding_waste(self) -> float:
        return 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0


class _Group:
    """What the slots of one `submit` share: one condition, notified once per batch that finishes
    any of them. (A `concurrent.futures.Future` per item, each with its own condition, lock and
    wake-up, cost a worker ~3 us per item, and its engine thread a lock round per item.)"""
    __slots__ = ("cond",)

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())


class Slot:
    """The outcome of one submitted item: the part of a future the workers use (`result`,
    `exception`, `done`). Its value is written by the engine thread, then its group notified."""
    __slots__ = ("_group", "_value", "_exc", "_done")

    def __init__(self, group: _Group | None = None) -> None:
        self._group = group
        self._value: Any = None
        self._exc: BaseException | None = None
        self._done = False

    @classmethod
    def resolved(cls, value: Any) -> Slot:
        s = cls()
        s._value, s._done = value, True
        return s

    def done(self) -> bool:
        return self._done

    def _wait(self, timeout: float | None) -> None:
        if self._done:
            return
        if self._group is None:
            raise RuntimeError("a slot without a group is never finished")
        with self._group.cond:
            if not self._group.cond.wait_for(lambda: self._done, timeout):
                raise TimeoutError(f"no result within {timeout} s")

    def result(self, timeout: float | None = None) -> Any:
        self._wait(timeout)
        if self._exc is not None:
            raise self._exc
        return self._value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        return self._exc


def finish(outcomes: Iterable[tuple[Slot, Any, BaseException | None]]) -> None:
    """Set slots' values (or exceptions), then wake each group's waiters once. A waiter checks its
    slot under the group's lock before it sleeps and the notify takes that lock, so setting the
    values before taking it loses no wake-up."""
    groups: dict[int, _Group] = {}
    for slot, value, exc in outcomes:
        slot._value, slot._exc = value, exc
        slot._done = True
        g = slot._group
        if g is not None:
            groups[id(g)] = g
    for g in groups.values():
        with g.cond:
            g.cond.notify_all()


@dataclass(slots=True)
class _Entry:
    pending: Pending
    payload: Any
    slot: Slot


Runner = Callable[[str, list[Any]], list[Any]]
# A continuous runner: stream(key, payloads, pull, finish) runs the payloads and whatever it pulls
# while it runs, and calls finish(k, result) for each as soon as that one is done (k counts the
# payloads in the order given, then pulled). pull(n, accept) -> up to n payloads of the same key,
# oldest first, that accept(payload) admits; they leave the pending queue.
Stream = Callable[[str, list[Any], Callable[[int, Callable[[Any], bool]], list[Any]], Callable[[int, Any], None]], None]
# on_batch(key, size, real_tokens, padded_tokens, seconds); on_split(key)
BatchHook = Callable[[str, int, int, int, float], None]


class MicroBatcher:
    """Thread-safe front of the engine thread. `runner(key, payloads) -> results` (same length)."""

    def __init__(self, runner: Runner, policy: BatchPolicy, name: str = "gristmill-batcher",
                 on_batch: BatchHook | None = None, on_split: Callable[[str], None] | None = None,
                 streamer: Callable[[str], Stream | None] | None = None):
        self.runner = runner
        # streamer(key): a continuous runner for that key (generation on the continuous loop), or
        # None. With one, requests that arrive while a batch runs join it instead of waiting.
        self.streamer = streamer
        self.policy = policy
        self.on_batch = on_batch
        self.on_split = on_split
        self.stats = BatchStats()
        self._entries: list[_Entry] = []
        # The current plan, as entry lists. Re-planned only when items arrive (or time passes with
        # nothing runnable), so a chunk that lands while a batch runs joins the length sort of
        # everything pending instead of being packed on its own.
        self._planned: list[list[_Entry]] = []
        self._dirty = False
        self._cv = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, key: str, payloads: Sequence[Any], costs: Sequence[int]) -> list[Slot]:
        if len(payloads) != len(costs):
            raise ValueError(f"submit: {len(payloads)} payloads but {len(costs)} costs")
        now = time.monotonic()
        group = _Group()
        slots = [Slot(group) for _ in payloads]
        entries = [_Entry(Pending(key, max(1, int(cost)), now), payload, slot)
                   for payload, cost, slot in zip(payloads, costs, slots)]
        with self._cv:
            if self._stopped:
                raise RuntimeError("the micro-batcher is shut down")
            self._entries += entries
            self._dirty = True
            self._cv.notify()
        return slots

    def shutdown(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout)

    def _take(self) -> list[_Entry] | None:
        """The next batch to run: the head of the current plan, re-planned if items arrived."""
        with self._cv:
            while True:
                if self._stopped and not self._entries:
                    return None
                if self._entries:
                    if self._dirty or not self._planned:
                        now = time.monotonic()
                        pend = [e.pending for e in self._entries]
                        self._planned = [[self._entries[i] for i in b]
                                         for b in plan(pend, self.policy, now, flush=self._stopped)]
                        self._dirty = False
                    if self._planned:
                        batch = self._planned.pop(0)
                        taken = {id(e) for e in batch}
                        self._entries = [e for e in self._entries if id(e) not in taken]
                        return batch
                    now = time.monotonic()
                    deadline = next_deadline([e.pending for e in self._entries], self.policy)
                    self._cv.wait(timeout=max(0.0, (deadline or now) - now) + 1e-4)
                else:
                    self._cv.wait()

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            self._execute(batch)

    def _execute(self, batch: list[_Entry]) -> None:
        stream = self.streamer(batch[0].pending.key) if self.streamer else None
        if stream is not None:
            batch = self._stream(stream, batch)
        if batch:
            self._run_batch(batch)

    def _stream(self, stream: Stream, batch: list[_Entry]) -> list[_Entry]:
        """Runs a continuous batch; returns the entries left unfinished by a failure (the plain path
        then isolates the failing ones by splitting)."""
        key = batch[0].pending.key
        entries = list(batch)
        finished: set[int] = set()

        def pull(n: int, accept: Callable[[Any], bool]) -> list[Any]:
            with self._cv:
                got = [e for e in self._entries if e.pending.key == key and accept(e.payload)][:n]
                if got:
                    taken = {id(e) for e in got}
                    self._entries = [e for e in self._entries if id(e) not in taken]
                    self._dirty = True  # the plan may hold them: re-plan before the next take
            entries.extend(got)
            return [e.payload for e in got]

        def done(k: int, result: Any) -> None:
            finished.add(k)
            finish([(entries[k].slot, result, None)])

        t0 = time.perf_counter()
        try:
            stream(key, [e.payload for e in batch], pull, done)
        except BaseException as exc:  # noqa: BLE001
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            log.warning("continuous batch for %s failed (%s: %s); re-running its %d unfinished items", key,
                        type(exc).__name__, exc, len(entries) - len(finished))
            return [e for k, e in enumerate(entries) if k not in finished]
        cost = sum(e.pending.cost for e in entries)  # no padding between requests in continuous batching
        self._record(key, len(entries), cost, cost, time.perf_counter() - t0)
        finish((e.slot, None, RuntimeError(f"the continuous runner for {key!r} returned without finishing "
                                           f"item {k}; a streaming runner must finish every item"))
               for k, e in enumerate(entries) if k not in finished)
        return []

    def _run_batch(self, batch: list[_Entry]) -> None:
        key = batch[0].pending.key
        t0 = time.perf_counter()
        try:
            results = self.runner(key, [e.payload for e in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"engine for {key!r} returned {len(results)} results for {len(batch)} "
                                   f"items; a batch function must return one result per input, in order")
        except BaseException as exc:  # noqa: BLE001 - isolate: bisect down to the failing items
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            if len(batch) == 1:
                finish([(batch[0].slot, None, exc)])
                return
            self.stats.splits += 1
            if self.on_split:
                self.on_split(key)
            log.warning("batch of %d for %s failed (%s: %s); splitting", len(batch), key, type(exc).__name__, exc)
            mid = len(batch) // 2
            self._run_batch(batch[:mid])
            self._run_batch(batch[mid:])
            return
        padded = max(e.pending.cost for e in batch) * len(batch)
        self._record(key, len(batch), sum(e.pending.cost for e in batch), padded, time.perf_counter() - t0)
        finish((e.slot, r, None) for e, r in zip(batch, results) if not isinstance(r, Requeue))
        again = [(e, r.key) for e, r in zip(batch, results) if isinstance(r, Requeue)]
        if again:
            self._requeue(key, again)

    def _requeue(self, key: str, items: list[tuple[_Entry, str]]) -> None:
        now = time.monotonic()  # a partial batch of them waits max_wait_s for more, as new work does
        entries = [_Entry(Pending(to, e.pending.cost, now), e.payload, e.slot) for e, to in items if to != key]
        with self._cv:
            self._entries += entries
            self._dirty = True
            self._cv.notify()
        finish((e.slot, None, RuntimeError(f"the runner for {key!r} requeued an item under its own key; a second "
                                           f"stage needs a key of its own")) for e, to in items if to == key)

    def _record(self, key: str, size: int, real: int, padded: int, seconds: float) -> None:
        self.stats.busy_s += seconds
        self.stats.batches += 1
        self.stats.items += size
        self.stats.padded_tokens += padded
        self.stats.real_tokens += real
        self.stats.by_key[key] = self.stats.by_key.get(key, 0) + size
        self.stats.batches_by_key[key] = self.stats.batches_by_key.get(key, 0) + 1
        if self.on_batch:
            self.on_batch(key, size, real, padded, seconds)
