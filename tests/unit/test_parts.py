"""Result parts: what a worker stores per chunk and what downloads read back."""

import json

import zstandard
from hypothesis import given
from hypothesis import strategies as st

from gristmill.producers.batches import decode_part, encode_part

line = st.fixed_dictionaries({"custom_id": st.text(min_size=1, max_size=20),
                              "text": st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40)})


@given(st.lists(st.tuples(line, st.booleans()), max_size=30))
def test_a_part_round_trips_outputs_and_errors_in_order(lines):
    part = encode_part(lines)
    out, err = decode_part(part.value)
    assert [json.loads(x) for x in out.split("\n")[:-1]] == [v for v, e in lines if not e]
    assert [json.loads(x) for x in err.split("\n")[:-1]] == [v for v, e in lines if e]
    assert (part.outputs, part.errors) == (sum(not e for _, e in lines), sum(e for _, e in lines))
    # the output and error files' sizes grow by these: UTF-8 bytes, as downloaded
    assert (part.output_bytes, part.error_bytes) == (len(out.encode()), len(err.encode()))


def test_parts_are_stored_compressed():
    scores = {f"category/{i}": i / 13 for i in range(13)}
    lines = [({"custom_id": f"r{i}", "scores": scores, "flags": dict.fromkeys(scores, False)}, False) for i in range(256)]
    value = encode_part(lines).value
    assert value[:4] == b"\x28\xb5\x2f\xfd"  # a zstd frame
    plain = sum(len(json.dumps(v, separators=(",", ":"))) + 1 for v, _ in lines)
    assert len(value) < plain / 5


def test_a_part_stored_as_plain_text_by_an_earlier_version_still_decodes():
    out, err = '{"custom_id":"a"}\n', '{"custom_id":"b"}\n'
    legacy = f"{len(out)}:{out}{err}"
    assert decode_part(legacy) == (out, err)
    assert decode_part(legacy.encode()) == (out, err)  # as read without decoding


def test_a_part_with_non_ascii_text_splits_on_characters_not_bytes():
    lines = [({"custom_id": "é", "t": "日本語 ✓"}, False), ({"custom_id": "ü", "t": "😀"}, True)]
    out, err = decode_part(encode_part(lines)[0])
    assert json.loads(out)["t"] == "日本語 ✓" and json.loads(err)["custom_id"] == "ü"
    assert zstandard.ZstdDecompressor().decompress(encode_part(lines)[0]).decode().startswith(f"{len(out)}:")
