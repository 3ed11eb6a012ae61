"""Fuzzing the JSONL ingest and the body schemas (hypothesis): no crash, every line accounted for
exactly once, every error names its line."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gristmill.producers import constants as C
from gristmill.producers.ingest import IngestReport, enqueue
from gristmill.producers.schemas import LineError, WorkItem, error_line, validate_line

URLS = [C.CHAT_URL, C.COMPLETIONS_URL, C.MODERATIONS_URL, C.CLASSIFICATIONS_URL, "/v1/embeddings", None, 7]
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False),
                         st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                  st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "robot"]),
                                           "content": st.one_of(st.text(max_size=30), json_values)}), max_size=3)
bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({"messages": messages}, optional={"max_tokens": json_values, "temperature": json_values,
                                                            "stop": json_values, "model": json_values,
                                                            "n": json_values, "seed": json_values}),
    st.fixed_dictionaries({"input": st.one_of(st.text(max_size=40), st.lists(st.text(max_size=10), max_size=3),
                                              json_values)}, optional={"model": json_values}),
    st.fixed_dictionaries({"prompt": json_values}),
)
objects = st.fixed_dictionaries({}, optional={"custom_id": st.one_of(st.text(max_size=6), json_values),
                                              "method": st.sampled_from(["POST", "GET", 3]),
                                              "url": st.sampled_from(URLS), "body": bodies})
raw_lines = st.one_of(objects.map(json.dumps), st.text(max_size=60), st.binary(max_size=40),
                      json_values.map(json.dumps))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=raw_lines, line_no=st.integers(1, 10**7))
@example(raw='{"custom_id": "a\\ud800", "url": "/v1/moderations", "body": {"input": "x"}}', line_no=1)
@example(raw=b'{"custom_id": "a", "url": "/v1/moderations", "body": {"input": ["ok", "x\\udfff"]}}', line_no=2)
@example(raw='{"custom_id": "a", "url": "/v1/chat/completions", "body": {"messages": '
             '[{"role": "user", "content": "\ud800"}]}}', line_no=3)
def test_any_line_validates_to_an_item_or_an_error_naming_it(tiny_settings, raw, line_no):
    out = validate_line(raw, line_no, tiny_settings.registry, max_bytes=tiny_settings.max_line_bytes)
    assert isinstance(out, (WorkItem, LineError))
    assert out.line == line_no
    if isinstance(out, LineError):
        assert out.code in {C.E_INVALID_JSON, C.E_MISSING_CUSTOM_ID, C.E_INVALID_METHOD, C.E_INVALID_URL,
                            C.E_INVALID_BODY, C.E_MODEL_NOT_FOUND} and out.message
        # its error line is stored in Redis and written to the error file: UTF-8 JSON
        json.dumps(error_line(out.custom_id, out.code, out.message, out.line), ensure_ascii=False).encode("utf-8")
    else:
        # what travels in a message, is hashed and stored, is UTF-8 JSON (no lone surrogate)
        json.dumps(out.to_message(), ensure_ascii=False).encode("utf-8")


class _EmptyRedis:
    """The Redis calls pass 2's backpressure makes, answered as by a Redis with empty queues and
    no maxmemory."""

    def info(self, section):
        return {"used_memory": 0, "maxmemory": 0}

    def pipeline(self, transaction=False):
        return self

    def llen(self, key):
        pass

    def execute(self):
        return [0]


class _Store:
    """The slice of BatchStore that pass 2 uses, in memory."""
    min_replicas = 0

    def __init__(self):
        self.r = _EmptyRedis()
        self.parts: list[list] = []
        self.kept: dict[int, dict] = {}

    def keep_message(self, batch_id, chunk, message):
        self.kept[chunk] = json.loads(json.dumps(message))

    def record(self, batch_id, chunk, lines, part=None):
        self.parts.append(list(lines))

    def status(self, batch_id):
        return C.IN_PROGRESS


class _App:
    def __init__(self):
        self.sent: list[list[dict]] = []
        self.ids: list[str] = []

    def send_task(self, name, args, kwargs=None, queue=None, task_id=None):
        self.sent.append(args[2])
        self.ids.append(task_id)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(raw_lines.filter(lambda x: not isinstance(x, bytes)),
                                st.sampled_from(["", "   ", '{"custom_id": "ok", "url": "/v1/moderations", '
                                                 '"body": {"input": "fine"}}'])), max_size=40),
       chunk=st.integers(1, 7))
@example(lines=["\x1f", " \u00a0", "\x0b"], chunk=1)
def test_a_fuzzed_file_accounts_for_every_line_once(tiny_settings, tmp_path_factory, lines, chunk):
    path = Path(tmp_path_factory.mktemp("fuzz")) / "in.jsonl"
    path.write_text("".join(ln.replace("\n", " ").replace("\r", " ") + "\n" for ln in lines), encoding="utf-8")
    store, app, report = _Store(), _App(), IngestReport()
    enqueue(app, store, tiny_settings.registry, "b", path, chunk, report)  # type: ignore[arg-type]
    sent = [m["line"] for msg in app.sent for m in msg]
    errors = [e["error"]["line"] for part in store.parts for e, _ in part]
    # blank as ingest reads it: ASCII whitespace only (a line of U+001F is reported, not skipped)
    nonblank = [n for n, ln in enumerate(path.read_bytes().split(b"\n")[:-1], start=1) if ln.strip()]
    assert sorted(sent + errors) == nonblank, "each non-blank line is sent or reported, once"
    assert report.valid == len(sent) and report.invalid == len(errors)
    assert all(len(msg) <= chunk for msg in app.sent)
    # every message sent was kept first, the same, under the chunk its task id names
    assert [C.chunk_of_task_id(t) for t in app.ids] == [("b", k) for k in range(len(app.sent))]
    assert [store.kept[k]["args"][2] for k in range(len(app.sent))] == app.sent


def test_over_long_lines_and_inputs_are_refused_with_the_limit(tiny_settings):
    big = json.dumps({"custom_id": "big", "url": C.MODERATIONS_URL, "body": {"input": "x" * 5000}})
    err = validate_line(big, 3, tiny_settings.registry, max_bytes=4096)
    assert isinstance(err, LineError) and err.custom_id == "big" and "4,096" in err.message
    many = json.dumps({"custom_id": "many", "url": C.MODERATIONS_URL, "body": {"input": ["a"] * 5000}})
    err = validate_line(many, 4, tiny_settings.registry)
    assert isinstance(err, LineError) and err.code == C.E_INVALID_BODY and "at most 2048" in err.message
