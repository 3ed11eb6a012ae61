import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gristmill.producers.errors import ConfigurationError
from gristmill.workers.batcher import (BatchPolicy, MicroBatcher, Pending, Requeue, Slot, _Group, finish, pack,
                                      plan)

policies = st.builds(BatchPolicy, max_batch_size=st.integers(1, 64), token_budget=st.integers(1, 4096),
                     max_wait_s=st.floats(0, 1))
pendings = st.lists(st.builds(Pending, key=st.sampled_from(["a", "b", "c"]), cost=st.integers(1, 600),
                              arrived=st.floats(0, 10)), max_size=200)


@given(pendings, policies, st.floats(0, 12), st.booleans())
@settings(max_examples=300, deadline=None)
def test_plan_never_loses_duplicates_or_breaks_budgets(pending, policy, now, flush):
    batches = plan(pending, policy, now, flush)
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat)), "an item was planned twice"
    assert all(0 <= i < len(pending) for i in flat)
    for b in batches:
        assert b, "empty batch"
        assert len({pending[i].key for i in b}) == 1, "batch mixes models"
        assert len(b) <= policy.max_batch_size
        width = max(pending[i].cost for i in b)
        assert len(b) == 1 or len(b) * width <= policy.token_budget
    if flush:
        assert sorted(flat) == list(range(len(pending))), "flush must take every item"


@given(pendings, policies)
@settings(max_examples=200, deadline=None)
def test_everything_runs_once_its_wait_is_over(pending, policy):
    now = max((p.arrived for p in pending), default=0) + policy.max_wait_s + 1e-6
    flat = sorted(i for b in plan(pending, policy, now) for i in b)
    assert flat == list(range(len(pending)))


def test_partial_batch_waits_but_full_batch_goes_at_once():
    policy = BatchPolicy(max_batch_size=4, token_budget=10_000, max_wait_s=1.0)
    few = [Pending("a", 10, 0.0)] * 3
    assert plan(few, policy, now=0.5) == []
    assert plan(few, policy, now=1.0) == [[0, 1, 2]]
    many = [Pending("a", 10, 0.0)] * 6
    assert plan(many, policy, now=0.5) == [[0, 1, 2, 3]]


def test_sorting_by_length_cuts_padding():
    costs = [100, 5, 100, 5, 100, 5, 100, 5]
    policy = BatchPolicy(max_batch_size=4, token_budget=10**6, max_wait_s=0)
    batches = plan([Pending("a", c, 0) for c in costs], policy, now=1)
    assert sorted(sorted(costs[i] for i in b) for b in batches) == [[5] * 4, [100] * 4]


def test_token_budget_splits_and_oversized_items_run_alone():
    assert pack([50, 50, 50, 500], [0, 1, 2, 3], BatchPolicy(8, 120, 0)) == [[0, 1], [2], [3]]


def test_policy_validates():
    with pytest.raises(ConfigurationError, match="max_batch_size"):
        BatchPolicy(0, 10, 0)


def _runner(log):
    def run(key, payloads):
        log.append(list(payloads))
        if any(p == "boom" for p in payloads):
            raise RuntimeError("bad item")
        return [f"{key}:{p}" for p in payloads]
    return run


def test_results_return_to_their_own_items_across_submitters():
    log = []
    mb = MicroBatcher(_runner(log), BatchPolicy(16, 10_000, 0.02))
    futs = {}
    def submit(tag):
        payloads = [f"{tag}{i}" for i in range(10)]
        futs[tag] = (payloads, mb.submit("m", payloads, [len(p) for p in payloads]))
    threads = [threading.Thread(target=submit, args=(t,)) for t in "xyz"]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for payloads, fs in futs.values():
        assert [f.result(timeout=5) for f in fs] == [f"m:{p}" for p in payloads]
    assert max(len(b) for b in log) > 10, "items of several submitters should share a batch"
    mb.shutdown()


@pytest.mark.parametrize("seed", range(5))
def test_slots_wake_every_waiter_when_finished_in_batches(seed):
    """Threads wait on slots of one group while another finishes them in random batches (as the
    engine thread does); each waiter gets its own slot's value, none misses its wake-up."""
    import random
    rnd = random.Random(seed)
    group = _Group()
    slots = [Slot(group) for _ in range(300)]
    got: dict[int, object] = {}

    def wait(i: int) -> None:
        got[i] = slots[i].result(timeout=60)
    waiters = [threading.Thread(target=wait, args=(i,), daemon=True) for i in rnd.sample(range(300), 60)]
    for t in waiters:
        t.start()
    order = rnd.sample(range(300), 300)
    while order:
        n = rnd.randint(1, 40)
        finish((slots[i], i * 7, None) for i in order[:n])
        order = order[n:]
        time.sleep(rnd.random() / 1000)
    deadline = time.monotonic() + 10  # woken, not timed out: a missed wake-up sleeps the full 60 s
    for t in waiters:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in waiters), "a waiter missed its wake-up"
    assert got == {i: i * 7 for i in got} and len(got) == 60
    assert [s.result() for s in slots] == [i * 7 for i in range(300)]


def test_slot_outcomes():
    group = _Group()
    ok, bad, never = Slot(group), Slot(group), Slot(group)
    assert not ok.done()
    boom = ValueError("boom")
    finish([(ok, 3, None), (bad, None, boom)])
    assert ok.done() and ok.result() == 3 and ok.exception() is None
    assert bad.exception() is boom
    with pytest.raises(ValueError, match="boom"):
        bad.result()
    with pytest.raises(TimeoutError):
        never.result(timeout=0.05)
    assert Slot.resolved({"a": 1.0}).result() == {"a": 1.0}


def test_a_failing_item_fails_alone_after_splitting():
    log = []
    mb = MicroBatcher(_runner(log), BatchPolicy(8, 10_000, 0.0))
    payloads = ["a", "b", "boom", "c", "d", "e", "f", "g"]
    fs = mb.submit("m", payloads, [1] * 8)
    outcomes = []
    for p, f in zip(payloads, fs):
        exc = f.exception(timeout=5)
        outcomes.append(exc if exc else f.result())
    assert isinstance(outcomes[2], RuntimeError)
    assert [o for i, o in enumerate(outcomes) if i != 2] == [f"m:{p}" for p in payloads if p != "boom"]
    assert mb.stats.splits >= 3  # 8 -> 4 -> 2 -> 1
    mb.shutdown()


def test_out_of_memory_batches_are_split_until_they_fit():
    sizes = []
    def run(key, payloads):
        sizes.append(len(payloads))
        if len(payloads) > 2:
            raise MemoryError("CUDA out of memory (simulated by batch size)")
        return payloads
    mb = MicroBatcher(run, BatchPolicy(8, 10_000, 0.0))
    fs = mb.submit("m", list(range(8)), [1] * 8)
    assert [f.result(timeout=5) for f in fs] == list(range(8))
    assert sizes[0] == 8 and max(sizes[1:]) <= 4 and 2 in sizes
    mb.shutdown()


def test_wrong_result_count_is_an_error_not_a_silent_misalignment():
    mb = MicroBatcher(lambda k, p: p[:-1], BatchPolicy(4, 100, 0.0))
    fs = mb.submit("m", [1], [1])
    assert "returned 0 results for 1" in str(fs[0].exception(timeout=5))
    mb.shutdown()


def test_requeued_items_batch_among_themselves_across_batches():
    """A two-stage runner: the first stage finishes even payloads and requeues odd ones to a second
    key, where they batch together from many first-stage batches (the way a cascade's escalated
    inputs reach the full model), each back to its own slot."""
    log = []

    def run(key, payloads):
        log.append((key, list(payloads)))
        if key == "m":
            return [f"first:{p}" if p % 2 == 0 else Requeue("m\x00second") for p in payloads]
        return [f"second:{p}" for p in payloads]
    mb = MicroBatcher(run, BatchPolicy(4, 10_000, 0.01))
    fs = mb.submit("m", list(range(16)), [1] * 16)
    assert [f.result(timeout=5) for f in fs] == [f"{'first' if p % 2 == 0 else 'second'}:{p}" for p in range(16)]
    first = [b for k, b in log if k == "m"]
    second = [b for k, b in log if k != "m"]
    assert len(first) == 4 and sorted(p for b in second for p in b) == list(range(1, 16, 2))
    assert [len(b) for b in second] == [4, 4], "requeued items should fill the second stage's batches"
    assert mb.stats.items == 16 + 8
    mb.shutdown()


def test_an_item_requeued_under_its_own_key_fails_alone():
    mb = MicroBatcher(lambda k, p: [Requeue(k) if x == 2 else x for x in p], BatchPolicy(4, 100, 0.0))
    fs = mb.submit("m", [1, 2, 3], [1] * 3)
    assert fs[0].result(timeout=5) == 1 and fs[2].result(timeout=5) == 3
    assert "requeued an item under its own key" in str(fs[1].exception(timeout=5))
    mb.shutdown()


def test_max_wait_bounds_latency_of_a_lone_item():
    mb = MicroBatcher(lambda k, p: p, BatchPolicy(64, 10_000, 0.05))
    t = time.monotonic()
    (f,) = mb.submit("m", [1], [1])
    f.result(timeout=5)
    assert time.monotonic() - t < 2.0
    mb.shutdown()


@given(pendings, policies, st.floats(0, 12))
@settings(max_examples=200, deadline=None)
def test_batches_come_oldest_member_first(pending, policy, now):
    heads = [min(pending[i].arrived for i in b) for b in plan(pending, policy, now)]
    assert heads == sorted(heads)


def test_items_arriving_while_a_batch_runs_are_sorted_together():
    """Two chunks, each half short and half long: re-planning on arrival packs short with short."""
    gate = threading.Event()
    seen = []
    def run(key, payloads):
        seen.append(sorted(payloads))
        gate.wait(5)
        return payloads
    mb = MicroBatcher(run, BatchPolicy(4, 10**6, 0.0))
    first = mb.submit("m", [1, 1, 100, 100], [1, 1, 100, 100])  # runs at once, holding the engine
    time.sleep(0.1)
    second = mb.submit("m", [1, 100, 1, 100, 1, 100, 1, 100], [1, 100, 1, 100, 1, 100, 1, 100])
    gate.set()
    [f.result(timeout=5) for f in first + second]
    assert seen[1:] == [[1, 1, 1, 1], [100, 100, 100, 100]]
    mb.shutdown()


def test_a_chunk_submitted_per_model_returns_results_to_their_items():
    from gristmill.producers.schemas import LineError, WorkItem
    from gristmill.workers.records import Prepared
    from gristmill.workers.tasks import submit_chunk
    calls = []

    def runner(key, payloads):
        calls.append((key, len(payloads)))
        return [f"{key}:{p}" for p in payloads]

    b = MicroBatcher(runner, BatchPolicy(max_batch_size=64, token_budget=10_000, max_wait_s=0.05))
    try:
        def item(i, model):
            return WorkItem(i, f"c{i}", "/v1/classifications", model, {}, "")
        prepared = [Prepared(item(0, "a"), ["x", "y"], [2, 3]), LineError(2, "c1", "invalid_body", "bad"),
                    Prepared(item(2, "b"), ["z"], [1]), Prepared(item(3, "a"), ["w"], [4])]
        waiting = submit_chunk(b, prepared)
        got = {p.item.custom_id: [f.result(timeout=5) for f in futures] for p, futures in waiting}
    finally:
        b.shutdown()
    assert got == {"c0": ["a:x", "a:y"], "c3": ["a:w"], "c2": ["b:z"]}
    assert sorted(calls) == [("a", 3), ("b", 1)], "one batch per model: the chunk arrived in one call per model"


def test_repeated_inputs_share_one_run_within_and_across_chunks():
    from gristmill.producers.schemas import WorkItem
    from gristmill.workers.dedup import Recent
    from gristmill.workers.records import ClassifierInputs, Prepared
    from gristmill.workers.tasks import submit_chunk
    calls = []

    def runner(key, payloads):
        calls.append(list(payloads))
        if "boom" in payloads:
            raise RuntimeError("boom")
        return [p.upper() for p in payloads]

    def prep(i, shas, payloads, known=None):
        n = len(shas)
        return Prepared(WorkItem(i, f"c{i}", "/v1/moderations", "m", {}, ""), payloads, [1] * n,
                        ClassifierInputs("mk", shas, known or [None] * n, [p is None for p in payloads]))

    b = MicroBatcher(runner, BatchPolicy(max_batch_size=64, token_budget=10_000, max_wait_s=0.01))
    recent = Recent(capacity=8)
    try:
        # chunk 1: "x" twice (the repeat has no payload), and a cached "y"
        one = submit_chunk(b, [prep(0, ["sx", "sx"], ["x", None]), prep(1, ["sy"], [None], [{"k": 1.0}])], recent)
        # chunk 2, concurrently: "x" again shares chunk 1's run
        two = submit_chunk(b, [prep(2, ["sx"], ["x"])], recent)
        got = [[f.result(timeout=5) for f in fs] for _, fs in one + two]
        assert got == [["X", "X"], [{"k": 1.0}], ["X"]]
        assert calls == [["x"]], "x ran once"
        assert two[0][0].inputs.reused == [True] and one[0][0].inputs.reused == [False, True]
        # a failed run is not shared with later chunks: they run it again
        bad = submit_chunk(b, [prep(3, ["sb"], ["boom"])], recent)
        with pytest.raises(RuntimeError):
            bad[0][1][0].result(timeout=5)
        again = submit_chunk(b, [prep(4, ["sb"], ["boom"])], recent)
        with pytest.raises(RuntimeError):
            again[0][1][0].result(timeout=5)
        assert calls.count(["boom"]) == 2
    finally:
        b.shutdown()


def _streaming_batcher(started: threading.Event, go: threading.Event, fail_after: int | None = None):
    """A batcher whose stream runner doubles payloads, pulls every pending item of its key, finishes
    items one by one, and (optionally) raises after `fail_after` finishes."""
    calls = []

    def stream(key, payloads, pull, finish):
        started.set()
        go.wait(5)
        items = list(payloads) + pull(100, lambda p: p != 13)  # 13 never fits: it must wait for its own batch
        calls.append(items)
        for k, p in enumerate(items):
            if fail_after is not None and k == fail_after:
                raise RuntimeError("device fault")
            finish(k, p * 2)

    b = MicroBatcher(lambda key, ps: [p * 3 for p in ps], BatchPolicy(2, 10_000, 0.0),
                     streamer=lambda key: stream if key == "gen" else None)
    return b, calls


def test_items_arriving_during_a_streaming_batch_join_it():
    started, go = threading.Event(), threading.Event()
    b, calls = _streaming_batcher(started, go)
    try:
        first = b.submit("gen", [1, 2], [1, 1])
        assert started.wait(5)
        later = b.submit("gen", [3, 4, 13], [1, 1, 1]) + b.submit("clf", [5], [1])
        go.set()
        assert [f.result(5) for f in first + later[:2]] == [2, 4, 6, 8]
        assert later[3].result(5) == 15, "another key runs on the plain runner"
        assert later[2].result(5) == 26, "an item the running batch cannot take gets a batch of its own"
        assert calls[0] == [1, 2, 3, 4] and calls[1] == [13]
        assert b.stats.items == 6
    finally:
        b.shutdown()


def test_a_failing_streaming_batch_reruns_only_its_unfinished_items():
    started, go = threading.Event(), threading.Event()
    go.set()
    b, calls = _streaming_batcher(started, go, fail_after=1)
    try:
        futs = b.submit("gen", [1, 2], [1, 1])
        assert futs[0].result(5) == 2, "finished before the fault: kept, not run twice"
        assert futs[1].result(5) == 6, "unfinished: re-run on the plain runner, which splits to isolate"
        assert len(calls) == 1
    finally:
        b.shutdown()
