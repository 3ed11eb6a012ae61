import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gristmill.producers import constants as C
from gristmill.producers.schemas import (LineError, WorkItem, classification_body, error_line, moderation_body, peek_custom_id,
                               output_line, provenance, validate_line)


def line(**kw):
    base = {"custom_id": "a", "method": "POST", "url": C.CHAT_URL,
            "body": {"messages": [{"role": "user", "content": "hi"}]}}
    base.update(kw)
    return json.dumps(base)


@pytest.fixture(scope="module")
def registry(tiny_settings):
    return tiny_settings.registry


def test_valid_chat_line_resolves_default_model(registry):
    item = validate_line(line(), 3, registry)
    assert isinstance(item, WorkItem)
    assert (item.line, item.custom_id, item.model) == (3, "a", "tiny-chat")
    assert item.body["temperature"] == 1.0 and len(item.input_sha256) == 64


def test_alias_resolves_to_registered_name(registry):
    item = validate_line(line(body={"model": "tiny-lm", "messages": [{"role": "user", "content": "x"}]}), 1, registry)
    assert item.model == "tiny-chat"


def test_same_body_same_digest_regardless_of_key_order(registry):
    a = validate_line('{"custom_id":"a","method":"POST","url":"/v1/completions","body":{"prompt":"x","model":"tiny-chat"}}', 1, registry)
    b = validate_line('{"custom_id":"b","method":"POST","url":"/v1/completions","body":{"model":"tiny-chat","prompt":"x"}}', 2, registry)
    assert a.input_sha256 == b.input_sha256 and len(a.input_sha256) == 64


@pytest.mark.parametrize("raw,code,cid", [
    ("{not json", C.E_INVALID_JSON, None),
    ("[1, 2]", C.E_INVALID_JSON, None),
    (json.dumps({"method": "POST", "url": C.CHAT_URL, "body": {}}), C.E_MISSING_CUSTOM_ID, None),
    (json.dumps({"custom_id": "", "url": C.CHAT_URL, "body": {}}), C.E_MISSING_CUSTOM_ID, None),
    (line(method="GET"), C.E_INVALID_METHOD, "a"),
    (line(url="/v1/embeddings"), C.E_INVALID_URL, "a"),
    (line(body="text"), C.E_INVALID_BODY, "a"),
    (line(body={"messages": []}), C.E_INVALID_BODY, "a"),
    (line(body={"messages": [{"role": "user", "content": "x"}], "temperature": 3}), C.E_INVALID_BODY, "a"),
    (line(body={"messages": [{"role": "user", "content": "x"}], "n": 2}), C.E_INVALID_BODY, "a"),
    (line(body={"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}), C.E_INVALID_BODY, "a"),
    (line(body={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}), C.E_MODEL_NOT_FOUND, "a"),
    (line(url=C.MODERATIONS_URL, body={"input": []}), C.E_INVALID_BODY, "a"),
    (line(url=C.MODERATIONS_URL, body={"model": "gpt-9", "input": "x"}), C.E_MODEL_NOT_FOUND, "a"),
    (line(url=C.COMPLETIONS_URL, body={"prompt": ["a", "b"]}), C.E_INVALID_BODY, "a"),
    # beyond what a torch generator takes: this used to fail in the worker as an engine_error
    (line(body={"messages": [{"role": "user", "content": "x"}], "seed": 2**64}), C.E_INVALID_BODY, "a"),
    (line(body={"messages": [{"role": "user", "content": "x"}], "seed": -(2**63) - 1}), C.E_INVALID_BODY, "a"),
])
def test_bad_lines_name_code_line_and_custom_id(registry, raw, code, cid):
    err = validate_line(raw, 7, registry)
    assert isinstance(err, LineError), err
    assert (err.code, err.line, err.custom_id) == (code, 7, cid)
    assert err.message


_HI = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize("extra", [{"logprobs": True}, {"top_logprobs": 2}, {"presence_penalty": 0.5},
                                   {"frequency_penalty": -1}, {"logit_bias": {"50256": -100}},
                                   {"tools": [{"type": "function", "function": {"name": "f"}}]},
                                   {"response_format": {"type": "json_object"}}, {"best_of": 3}])
def test_parameters_that_would_change_the_answer_are_refused_by_name(registry, extra):
    # answered as if they were absent, such lines used to come back without what they asked for
    err = validate_line(line(body={"messages": _HI, **extra}), 1, registry)
    assert isinstance(err, LineError) and err.code == C.E_INVALID_BODY
    assert err.message.startswith(f"body.{next(iter(extra))}: "), err.message


def test_their_default_values_and_harmless_parameters_pass(registry):
    # files written for OpenAI often carry the defaults
    body = {"messages": _HI, "logprobs": False, "top_logprobs": 0, "presence_penalty": 0, "frequency_penalty": 0.0,
            "logit_bias": {}, "tools": [], "response_format": {"type": "text"}, "user": "u", "store": False,
            "metadata": {"k": "v"}, "tool_choice": "none", "parallel_tool_calls": True, "service_tier": "auto"}
    assert isinstance(validate_line(line(body=body), 1, registry), WorkItem)
    assert isinstance(validate_line(line(url=C.COMPLETIONS_URL, body={"prompt": "x", "echo": False, "suffix": None,
                                                                        "best_of": 1}), 1, registry), WorkItem)
    err = validate_line(line(url=C.COMPLETIONS_URL, body={"prompt": "x", "echo": True}), 1, registry)
    assert isinstance(err, LineError) and err.message.startswith("body.echo: ")


def test_model_level_errors_name_the_field_once(registry):
    err = validate_line(line(body={"messages": _HI, "n": 2}), 1, registry)
    assert err.message == "body.n: only n=1 is supported"
    err = validate_line(line(body={"messages": _HI, "temperature": 9, "top_p": 0}), 1, registry)
    assert err.message.startswith("body.temperature: ") and "; body.top_p: " in err.message


@pytest.mark.parametrize("seed", [-(2**63), -1, 0, 2**63 - 1, 2**64 - 1])
def test_every_seed_a_torch_generator_takes_is_accepted(registry, seed):
    import torch
    assert isinstance(validate_line(line(body={"messages": [{"role": "user", "content": "x"}], "seed": seed}),
                                    1, registry), WorkItem)
    torch.Generator().manual_seed(seed)


def test_body_error_names_the_field(registry):
    err = validate_line(line(body={"messages": [{"role": "user", "content": "x"}], "top_p": 0}), 1, registry)
    assert "top_p" in err.message


def test_moderation_body_shape_parses_with_openai_sdk():
    from openai.types import ModerationCreateResponse
    from gristmill.producers.registry import MODERATION_CATEGORIES
    scores = [{k: 0.9 if k == "violence" else 0.1 for k in MODERATION_CATEGORIES}]
    body = moderation_body("m", scores, {k: 0.5 for k in MODERATION_CATEGORIES}, "v1")
    parsed = ModerationCreateResponse.model_validate(body)
    r = parsed.results[0]
    assert r.flagged and r.categories.violence and not r.categories.hate
    assert body["results"][0]["policy_version"] == "v1"


def test_classification_body_applies_per_label_thresholds():
    body = classification_body("m", [{"a": 0.6, "b": 0.3}], {"a": 0.7, "b": 0.25}, "p9")
    r = body["results"][0]
    assert r["label"] == "a" and r["flagged_labels"] == ["b"] and r["flagged"] and r["policy_version"] == "p9"


def test_output_and_error_lines_follow_openai_shape():
    out = output_line("x", {"k": 1}, provenance("m", "r", "v", "s"))
    assert out["response"]["status_code"] == 200 and out["error"] is None
    assert set(out["provenance"]) == {"model", "model_revision", "engine_variant", "input_sha256"}
    err = error_line(None, "invalid_json", "bad", 4)
    assert err["response"] is None and err["error"] == {"code": "invalid_json", "message": "bad", "line": 4}


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(), _json_values, max_size=6))
def test_result_lines_encode_to_one_line_that_parses_back_exactly(value):
    from gristmill.producers.batches import dumps_line
    text = dumps_line(value)
    assert "\n" not in text and "\r" not in text
    assert json.loads(text) == value  # floats to the same double, big integers and surrogates included


def test_result_lines_match_the_standard_library_where_both_encode():
    from gristmill.producers.batches import dumps_line
    body = moderation_body("m", [{"hate": 0.30000001192092896, "violence": 2.5e-05}], {"hate": 0.3}, "v1")
    value = output_line("c-\u00e9\u4e2d", body, provenance("m", "r", "fp32", "0" * 64))
    text = dumps_line(value)
    assert json.loads(text) == json.loads(json.dumps(value)) == value
    assert "\u00e9\u4e2d" in text  # UTF-8 as is, not \\u escapes
    # what orjson refuses falls back to the standard library rather than failing the chunk
    assert json.loads(dumps_line({"n": 2**70, "s": "\ud800"})) == {"n": 2**70, "s": "\ud800"}


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**80, 2**80) | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES, st.booleans(), st.booleans())
def test_input_lines_parse_as_the_standard_library_parses_them(value, ascii_only, as_bytes):
    from gristmill.producers.schemas import loads_line
    text = json.dumps(value, ensure_ascii=ascii_only)  # NaN, big integers and lone surrogates included
    raw = text.encode("utf-8", "surrogatepass") if as_bytes else text
    try:
        want = json.loads(raw)
    except ValueError:
        with pytest.raises(ValueError):
            loads_line(raw)
        return
    got = loads_line(raw)
    assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40) | st.text(max_size=40)
       | st.text(alphabet='[]{}":,0123456789.eE-+ntrufalsN\\u ', max_size=30))
def test_anything_else_fails_as_the_standard_library_fails(raw):
    from gristmill.producers.schemas import loads_line
    try:
        want = json.loads(raw)
    except ValueError:
        with pytest.raises(ValueError):
            loads_line(raw)
    else:
        assert json.dumps(loads_line(raw), sort_keys=True) == json.dumps(want, sort_keys=True)


def test_deeply_nested_lines_fail_alone(registry):
    deep = b"[" * 5000 + b"]" * 5000
    err = validate_line(deep, 7, registry)
    assert isinstance(err, LineError) and err.code == C.E_INVALID_JSON and "nested too deeply" in err.message
    from gristmill.producers.schemas import peek_custom_id
    assert peek_custom_id(b'{"custom_id": "x", "a": ' + b"[" * 5000 + b"]" * 5000 + b"}") is None


@settings(max_examples=300, deadline=None)
@given(st.lists(_json_values, max_size=4), st.dictionaries(st.text(), _json_values, max_size=4))
def test_task_messages_round_trip_exactly(args, kwargs):
    """Task bodies go out through gristmill's serializer and come back as kombu's JSON would give
    them: big integers stay integers, floats the same doubles."""
    from kombu import serialization
    from kombu.utils import json as kombu_json
    from gristmill.producers.app import SERIALIZER, make_app
    body = (args, kwargs, {"callbacks": None})
    ctype, encoding, payload = serialization.dumps(body, serializer=SERIALIZER)
    accept = serialization.prepare_accept_content(make_app(redis_url="redis://127.0.0.1:9/0").conf.accept_content)
    got = serialization.loads(payload, ctype, encoding, accept=accept)
    assert got == kombu_json.loads(kombu_json.dumps(body)) == [args, kwargs, {"callbacks": None}]


def test_task_messages_keep_what_orjson_refuses_and_workers_accept_plain_json():
    from kombu import serialization
    from gristmill.producers.app import CONTENT_TYPE, SERIALIZER, make_app
    # as a worker reads them (the app connects to nothing here)
    accept = serialization.prepare_accept_content(make_app(redis_url="redis://127.0.0.1:9/0").conf.accept_content)
    body = [["b", 3, [{"body": {"input": "\ud800 x", "metadata": {"n": 2**70, "m": -(2**64)}}}]], {}, {}]
    ctype, encoding, payload = serialization.dumps(body, serializer=SERIALIZER)
    assert ctype == CONTENT_TYPE
    assert serialization.loads(payload, ctype, encoding, accept=accept) == body
    # messages from plain-JSON clients (and queued before this serializer) are still accepted
    ctype, encoding, payload = serialization.dumps(body, serializer="json")
    assert serialization.loads(payload, ctype, encoding, accept=accept) == body
    with pytest.raises(serialization.ContentDisallowed):
        serialization.loads(b"\x80\x04N.", "application/x-python-serialize", "binary", accept=accept)


def test_task_messages_go_out_zstd_compressed_and_any_zstd_frame_comes_back():
    import zstandard
    from kombu import compression

    from gristmill.producers.app import make_app
    app = make_app(redis_url="redis://127.0.0.1:9/0")
    assert app.conf.task_compression == "zstd"
    raw = b'[["b", 0, [{"body": {"input": "' + b"same words again " * 200 + b'"}}]], {}, {}]'
    packed, ctype = compression.compress(raw, "zstd")
    assert ctype == "application/zstd" and packed[:4] == b"\x28\xb5\x2f\xfd" and len(packed) < len(raw) / 10
    assert compression.decompress(packed, ctype) == raw
    # a frame without its content size, as a streaming writer (another client) leaves it
    streamed = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    frame = streamed.compress(raw) + streamed.flush()
    assert compression.decompress(frame, ctype) == raw


def test_kept_messages_read_back_from_zstd_and_from_earlier_zlib():
    import zlib

    import zstandard

    from gristmill.producers.batches import _decompress, dumps_line
    raw = dumps_line({"task": "t", "args": ["b", 0, [{"body": {"input": "x" * 300}}]]}).encode()
    assert _decompress(zstandard.ZstdCompressor(level=1).compress(raw)) == raw
    assert _decompress(zlib.compress(raw, 1)) == raw  # kept before the switch to zstd


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=3), JSON_VALUES, max_size=4), JSON_VALUES, st.booleans(), st.booleans())
def test_custom_id_peek_matches_the_standard_library(rest, cid, ascii_only, dup):
    """Pass 1's duplicate check reads custom_id through orjson alone; whatever else the line holds
    (big integers, NaN, surrogates, a repeated key), it finds what json.loads finds."""
    from gristmill.producers.schemas import peek_custom_id
    text = json.dumps({**rest, "custom_id": cid}, ensure_ascii=ascii_only)
    if dup:  # a repeated key: the last one counts, in both parsers
        text = text[:-1] + (", " if len(text) > 2 else "") + '"custom_id": "last"}'
    raw = text.encode("utf-8", "surrogatepass")
    try:
        obj = json.loads(raw)
    except ValueError:
        assert peek_custom_id(raw) is None
        return
    want = obj.get("custom_id")
    assert peek_custom_id(raw) == (want if isinstance(want, str) and want else None)


def test_a_lone_surrogate_fails_its_line_alone(registry):
    """JSON's \\ud800 escape without its pair parses, but UTF-8 cannot hold it: the line is refused
    at ingest (pass 1 leaves it out of the duplicate check), instead of failing the file when its
    message is kept or the chunk when a worker hashes its text."""
    from gristmill.producers.schemas import peek_custom_id
    for raw in (b'{"custom_id": "a", "url": "/v1/moderations", "body": {"input": "x \\udc00"}}',
                b'{"custom_id": "a\\ud800", "url": "/v1/moderations", "body": {"input": "x"}}',
                '{"custom_id": "a", "url": "/v1/moderations", "body": {"input": "x \ud800"}}'):
        err = validate_line(raw, 4, registry)
        assert isinstance(err, LineError) and err.code == C.E_INVALID_JSON and "surrogate" in err.message
        assert err.custom_id is None and err.line == 4
    assert peek_custom_id(b'{"custom_id": "a\\ud800"}') is None
    pair = validate_line(b'{"custom_id": "e", "url": "/v1/moderations", "body": {"input": "x \\ud83d\\ude00"}}', 5,
                         registry)
    assert isinstance(pair, WorkItem) and pair.body["input"] == "x \U0001F600"


def test_a_byte_order_mark_and_crlf_line_ends_are_accepted(registry):
    raw = line().encode()
    for variant in (b"\xef\xbb\xbf" + raw + b"\n", raw + b"\r\n", b"\xef\xbb\xbf" + raw + b"\r\n"):
        item = validate_line(variant, 1, registry)
        assert isinstance(item, WorkItem) and item.custom_id == "a", variant
        assert peek_custom_id(variant) == "a"


def test_batch_metadata_follows_openais_limits():
    from gristmill.producers.client import check_metadata
    from gristmill.producers.errors import SubmissionRejected
    check_metadata(None)
    check_metadata({f"k{i}": "v" * 512 for i in range(16)})
    for bad in ({f"k{i}": "v" for i in range(17)}, {"k" * 65: "v"}, {"": "v"}, {"k": "v" * 513}, {"k": 1}, ["k"]):
        with pytest.raises(SubmissionRejected, match="metadata"):
            check_metadata(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["gzip", "zstd", "bzip2", "xz", "zip"])
def test_a_compressed_input_file_is_refused_up_front(tmp_path, kind):
    import bz2
    import gzip
    import lzma
    import zipfile

    import zstandard

    from gristmill.producers.client import check_compressed
    from gristmill.producers.errors import SubmissionRejected
    data = (line() + "\n").encode()
    f = tmp_path / "in.jsonl.x"
    if kind == "zip":
        with zipfile.ZipFile(f, "w") as z:
            z.writestr("in.jsonl", data)
    else:
        pack = {"gzip": gzip.compress, "zstd": zstandard.ZstdCompressor().compress, "bzip2": bz2.compress,
                "xz": lzma.compress}[kind]
        f.write_bytes(pack(data))
    with pytest.raises(SubmissionRejected, match=f"{kind}-compressed"):
        check_compressed(f)
    f.write_bytes(data)
    check_compressed(f)  # plain JSONL passes
