"""Input decoding and validation, output JSON and dead-letter headers."""

from __future__ import annotations

import hashlib
import json

import pytest
from kafka.record.default_records import DefaultRecordBatchBuilder

from ner_stream.messages import (
    MAX_JSON_DEPTH,
    Document,
    Entity,
    Rejection,
    RejectReason,
    Source,
    carried_headers,
    dead_letter,
    dead_letter_headers,
    decode,
    encode_output,
    nested_deeper_than,
    parse_json,
    processing_error,
    record_size,
)

SOURCE = Source(topic="news", partition=3, offset=1234)
MAX_BYTES = 1000


def _decode(value: bytes | None, key: bytes | None = None) -> Document | Rejection:
    return decode(value, key, SOURCE, MAX_BYTES)


def _document(value: bytes | None, key: bytes | None = None) -> Document:
    result = _decode(value, key)
    assert isinstance(result, Document), result
    assert result.source == SOURCE
    return result


def _reason(value: bytes | None, key: bytes | None = None) -> RejectReason:
    result = _decode(value, key)
    assert isinstance(result, Rejection), result
    assert result.source == SOURCE
    assert result.detail
    return result.reason


# --- valid input ---------------------------------------------------------------------------------


def test_json_object_with_id_text_and_extra_fields() -> None:
    value = json.dumps(
        {"id": "doc-1", "text": "Zoë went to São Paulo.", "lang": "en", "tags": [1, {"a": None}]},
        ensure_ascii=False,
    ).encode()
    doc = _document(value, key=b"ignored-key")
    assert doc.id == "doc-1"
    assert doc.text == "Zoë went to São Paulo."
    assert doc.meta == {"lang": "en", "tags": [1, {"a": None}]}


def test_escaped_json_and_surrogate_pairs_decode() -> None:
    doc = _document(b'{"id": "x", "text": "caf\\u00e9 \\ud83d\\ude00"}')
    assert doc.text == "café 😀"


@pytest.mark.parametrize(
    ("key", "expected_id"),
    [
        (b"key-7", "key-7"),
        (None, "news/3/1234"),
        (b"", "news/3/1234"),
        (b"\xff\xfe", "news/3/1234"),  # a binary key is no id
    ],
)
def test_missing_id_defaults_to_key_then_position(key: bytes | None, expected_id: str) -> None:
    assert _document(b'{"text": "t"}', key).id == expected_id
    assert _document(b'{"id": null, "text": "t"}', key).id == expected_id
    assert _document(b'{"id": "", "text": "t"}', key).id == expected_id
    assert _document(b"plain text", key).id == expected_id


def test_integer_id_is_converted() -> None:
    assert _document(b'{"id": 42, "text": "t"}').id == "42"
    assert _document(b'{"id": -7, "text": "t"}').id == "-7"


@pytest.mark.parametrize(
    "value",
    [
        b"Plain text from a producer that does not speak JSON.",
        b"  leading spaces kept",
        b"[Reuters] is not JSON",  # starts like a JSON array but is not one
        b"2024 was a leap year",
        b"true story",
        b"null and void",
        b'"Quoted" words then more',
        "Grüße aus Köln 😀".encode(),
        b"",
        b"   ",
    ],
)
def test_non_json_value_is_plain_text(value: bytes) -> None:
    doc = _document(value, key=b"k")
    assert doc.text == value.decode()
    assert doc.id == "k"
    assert doc.meta == {}


def test_empty_text_is_valid() -> None:
    assert _document(b'{"id": "e", "text": ""}').text == ""


def test_byte_order_mark_is_dropped() -> None:
    assert _document(b'\xef\xbb\xbf{"id": "b", "text": "t"}').text == "t"
    assert _document(b"\xef\xbb\xbfplain").text == "plain"


def test_value_of_exactly_max_bytes_is_accepted() -> None:
    assert _document(b"a" * MAX_BYTES).text == "a" * MAX_BYTES


# --- rejections ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"\xff\xfe not utf-8", RejectReason.INVALID_UTF8),
        (b"caf\xc3", RejectReason.INVALID_UTF8),  # truncated multi-byte character
        (b"\xed\xa0\x80", RejectReason.INVALID_UTF8),  # an encoded surrogate
        (b'{"id": "x", "text": ', RejectReason.INVALID_JSON),
        (b"{not json}", RejectReason.INVALID_JSON),
        (b'  {"text": "a"} trailing', RejectReason.INVALID_JSON),
        (b'{"text": NaN}', RejectReason.INVALID_JSON),
        (b'{"text": "a", "score": Infinity}', RejectReason.INVALID_JSON),
        (b'{"text": "lone \\ud800 surrogate"}', RejectReason.INVALID_JSON),
        (b'{"text": "t", "meta": {"\\udc00": 1}}', RejectReason.INVALID_JSON),
        (b"{" * 100_000, RejectReason.INVALID_JSON),  # would overflow the parser's recursion
        (b"[1, 2, 3]", RejectReason.NOT_AN_OBJECT),
        (b"42", RejectReason.NOT_AN_OBJECT),
        (b"-1.5e3", RejectReason.NOT_AN_OBJECT),
        (b'"just a string"', RejectReason.NOT_AN_OBJECT),
        (b"true", RejectReason.NOT_AN_OBJECT),
        (b"null", RejectReason.NOT_AN_OBJECT),
        (b"{}", RejectReason.MISSING_TEXT),
        (b'{"id": "x", "body": "t"}', RejectReason.MISSING_TEXT),
        (b'{"id": "x", "text": null}', RejectReason.MISSING_TEXT),
        (None, RejectReason.MISSING_TEXT),  # tombstone
        (b'{"text": 5}', RejectReason.TEXT_NOT_STRING),
        (b'{"text": ["a"]}', RejectReason.TEXT_NOT_STRING),
        (b'{"text": {"en": "a"}}', RejectReason.TEXT_NOT_STRING),
        (b'{"text": true}', RejectReason.TEXT_NOT_STRING),
        (b'{"id": 1.5, "text": "t"}', RejectReason.ID_NOT_STRING),
        (b'{"id": true, "text": "t"}', RejectReason.ID_NOT_STRING),
        (b'{"id": ["a"], "text": "t"}', RejectReason.ID_NOT_STRING),
        (b'{"id": {}, "text": "t"}', RejectReason.ID_NOT_STRING),
        (b"a" * (MAX_BYTES + 1), RejectReason.TOO_LARGE),
    ],
)
def test_rejections(value: bytes | None, reason: RejectReason) -> None:
    if value is not None and len(value) > MAX_BYTES and reason is not RejectReason.TOO_LARGE:
        assert decode(value, None, SOURCE, len(value)).reason is reason
    else:
        assert _reason(value) is reason


def test_size_is_checked_before_decoding() -> None:
    assert _reason(b"\xff" * (MAX_BYTES + 1)) is RejectReason.TOO_LARGE


def test_rejection_detail_gives_position_not_content() -> None:
    rejection = _decode(b'{"text": "secret", oops}')
    assert isinstance(rejection, Rejection)
    assert "column" in rejection.detail
    assert "secret" not in rejection.detail


def _nested(levels: int) -> bytes:
    return b'{"text": "Peter .", "d": ' + b"[" * (levels - 1) + b"]" * (levels - 1) + b"}"


def test_nesting_up_to_the_limit_is_tagged_and_deeper_is_invalid_json_on_every_python() -> None:
    # Python's own recursion limit would let 3.12 parse what 3.11 refuses; the verdict must not
    # depend on the interpreter (the object itself is the first level).
    at_limit = _nested(MAX_JSON_DEPTH)
    accepted = decode(at_limit, None, SOURCE, len(at_limit))
    assert isinstance(accepted, Document), accepted
    assert accepted.text == "Peter ."
    # ... and its output, which echoes the nested field, is JSON a reader can parse back.
    echoed = json.loads(encode_output(accepted, [], "m", "v"))["meta"]["d"]
    assert echoed == json.loads(at_limit)["d"]
    deep = b'{"text": "Peter .", "d": ' + b"[" * 3000 + b"]" * 3000 + b"}"
    for value in (_nested(MAX_JSON_DEPTH + 1), deep):
        rejection = decode(value, None, SOURCE, len(value))
        assert isinstance(rejection, Rejection)
        assert rejection.reason is RejectReason.INVALID_JSON
        assert rejection.detail == f"nested more than {MAX_JSON_DEPTH} levels deep"


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    text = json.dumps({"text": "[" * 2000 + '{\\"[' * 100, "d": [[1]]})
    assert not nested_deeper_than(text, 3)
    assert nested_deeper_than(text, 2)
    assert parse_json(text)["d"] == [[1]]


def test_a_recursion_error_while_parsing_is_invalid_json(monkeypatch) -> None:
    # Within the limit, but on a stack already too deep for the parser (a caller's own
    # recursion, a lowered recursion limit): still a verdict, not a crash.
    import ner_stream.messages as messages

    def too_deep(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(messages.json, "loads", too_deep)
    rejection = _decode(b'{"text": "Peter ."}')
    assert isinstance(rejection, Rejection)
    assert rejection.reason is RejectReason.INVALID_JSON
    assert rejection.detail == "nested too deeply"


def test_every_reason_is_reachable() -> None:
    # PROCESSING_ERROR comes from the worker, through processing_error(), not from decode();
    # MODEL_CRASH from the worker too (tests/unit/test_worker.py reaches it).
    rejection = processing_error(SOURCE, RuntimeError("tagger exploded"))
    assert rejection == Rejection(
        RejectReason.PROCESSING_ERROR, "RuntimeError: tagger exploded", SOURCE
    )
    assert {reason.value for reason in RejectReason} == {
        "invalid_utf8",
        "invalid_json",
        "not_an_object",
        "missing_text",
        "text_not_string",
        "too_large",
        "id_not_string",
        "processing_error",
        "output_too_large",
        "model_crash",
    }


# --- output --------------------------------------------------------------------------------------


def _doc(meta: dict | None = None) -> Document:
    return Document(id="doc-1", text="Zoë Ångström visited Zürich.", meta=meta or {}, source=SOURCE)


def test_output_shape() -> None:
    entities = [
        Entity(text="Zoë Ångström", type="PER", start=0, end=12, score=0.987654321),
        Entity(text="Zürich", type="LOC", start=21, end=27, score=1.0),
    ]
    value = encode_output(_doc({"lang": "de"}), entities, "conll-lstm", "1.2.0")
    payload = json.loads(value.decode("utf-8"))
    assert list(payload) == ["id", "source", "model", "entities", "meta"]
    assert payload == {
        "id": "doc-1",
        "source": {"topic": "news", "partition": 3, "offset": 1234},
        "model": {"name": "conll-lstm", "version": "1.2.0"},
        "entities": [
            {"text": "Zoë Ångström", "type": "PER", "start": 0, "end": 12, "score": 0.9877},
            {"text": "Zürich", "type": "LOC", "start": 21, "end": 27, "score": 1.0},
        ],
        "meta": {"lang": "de"},
    }
    for entity in payload["entities"]:
        assert _doc().text[entity["start"] : entity["end"]] == entity["text"]


def test_output_is_compact_utf8_without_escapes() -> None:
    entity = Entity(text="Zürich", type="LOC", start=21, end=27, score=0.5)
    value = encode_output(_doc(), [entity], "m", "v")
    assert "Zürich".encode() in value
    assert b"\\u" not in value
    assert b": " not in value and b", " not in value
    assert b'"meta"' not in value  # left out when empty
    assert json.loads(value)["entities"][0]["score"] == 0.5


def test_output_without_entities() -> None:
    payload = json.loads(encode_output(_doc(), [], "m", "v"))
    assert payload["entities"] == []


def test_output_rejects_non_finite_scores() -> None:
    entity = Entity(text="Zürich", type="LOC", start=21, end=27, score=float("nan"))
    with pytest.raises(ValueError):
        encode_output(_doc(), [entity], "m", "v")


def test_decoded_meta_round_trips_to_output() -> None:
    doc = _document('{"id": "r", "text": "t", "nested": {"ü": [1, 2.5, null]}}'.encode())
    assert json.loads(encode_output(doc, [], "m", "v"))["meta"] == {"nested": {"ü": [1, 2.5, None]}}


# --- dead-letter headers -------------------------------------------------------------------------


def test_dead_letter_headers() -> None:
    rejection = Rejection(RejectReason.INVALID_JSON, "Expecting value at line 1 column 9", SOURCE)
    original = [("trace-id", b"abc"), ("content-type", b"application/json")]
    headers = dead_letter_headers(rejection, original, b'{"id": }')
    assert headers[:2] == original
    assert dict(headers[2:]) == {
        "ner_stream.reason": b"invalid_json",
        "ner_stream.detail": b"Expecting value at line 1 column 9",
        "ner_stream.source.topic": b"news",
        "ner_stream.source.partition": b"3",
        "ner_stream.source.offset": b"1234",
        "ner_stream.original.size": b"8",
        "ner_stream.original.sha256": hashlib.sha256(b'{"id": }').hexdigest().encode(),
    }
    assert original == [("trace-id", b"abc"), ("content-type", b"application/json")]


def test_dead_letter_headers_replace_earlier_ones() -> None:
    rejection = Rejection(RejectReason.TOO_LARGE, "big", SOURCE)
    original = [("ner_stream.reason", b"invalid_json"), ("ner_stream.detail", b"old"), ("x", b"1")]
    headers = dead_letter_headers(rejection, original, b"x")
    names = [name for name, _ in headers]
    assert len(names) == len(set(names))
    assert dict(headers)["ner_stream.reason"] == b"too_large"
    assert ("x", b"1") in headers


@pytest.mark.parametrize("char", ["a", "é", "😀", "東"])
def test_dead_letter_detail_is_truncated_on_a_character_boundary(char: str) -> None:
    rejection = Rejection(RejectReason.PROCESSING_ERROR, char * 2000, SOURCE)
    detail = dict(dead_letter_headers(rejection, [], None))["ner_stream.detail"]
    assert 400 < len(detail) <= 500
    text = detail.decode("utf-8")  # still valid UTF-8
    assert text.endswith("…")
    assert set(text[:-1]) == {char}


# --- numbers a double cannot hold -------------------------------------------------------------


@pytest.mark.parametrize(
    ("literal", "kept"),
    [("1e309", "1e309"), ("-1E+400", "-1E+400"), ("1.5", 1.5), ("1e-400", 0.0), ("7", 7)],
)
def test_numbers_are_kept_or_passed_as_their_literal(literal: str, kept: object) -> None:
    document = _document(f'{{"text": "t", "n": {literal}}}'.encode())
    assert document.meta == {"n": kept}
    encode_output(document, [], "m", "1")  # and the output is valid JSON


def test_an_integer_too_long_for_python_is_kept_as_its_literal() -> None:
    digits = "1" * 4301
    value = f'{{"id": {digits}, "text": "t", "n": [{digits}]}}'.encode()
    document = decode(value, None, SOURCE, max_bytes=len(value))
    assert isinstance(document, Document)
    assert document.id == digits and document.meta == {"n": [digits]}


# --- record sizes and bounded dead letters ----------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "headers"),
    [
        (None, None, []),
        (b"k", b"v" * 1000, [("a", b"1"), ("b", b"")]),
        (b"k" * 300, b"v" * 70_000, [("h" * 200, b"x" * 20_000)] * 3),
    ],
)
def test_record_size_is_never_below_kafka_pythons_estimate(key, value, headers) -> None:
    assert record_size(key, value, headers) >= DefaultRecordBatchBuilder.estimate_size_in_bytes(
        key, value, headers
    )


def test_null_header_values_are_carried_as_empty_ones() -> None:
    assert carried_headers([("a", None), ("a", b"1")]) == [("a", b""), ("a", b"1")]
    headers = [("a", b"1")]
    assert carried_headers(headers) is headers  # nothing copied when nothing is null


def test_a_dead_letter_that_fits_is_the_original() -> None:
    rejection = Rejection(RejectReason.INVALID_JSON, "bad", SOURCE)
    record = dead_letter(rejection, b"{x", b"key", [("h", None)], limit=10_000)
    assert (record.value, record.key) == (b"{x", b"key")
    assert record.headers[0] == ("h", b"")
    assert dict(record.headers)["ner_stream.original.size"] == b"2"
    assert "ner_stream.truncated" not in dict(record.headers)


@pytest.mark.parametrize("limit", [3_000, 100_000, 1_048_588])
def test_a_dead_letter_too_large_is_bounded_and_says_where_the_original_is(limit: int) -> None:
    value = bytes(range(256)) * 8_000  # 2 MB
    key = b"k" * 5_000
    headers = [("trace", b"t" * 100), ("big", b"b" * 20_000)]
    rejection = Rejection(RejectReason.TOO_LARGE, "value is 2048000 bytes", SOURCE)
    record = dead_letter(rejection, value, key, headers, limit)
    assert record.size <= limit
    assert record_size(record.key, record.value, record.headers) <= limit
    found = dict(record.headers)
    assert found["ner_stream.truncated"] == b"true"
    assert found["ner_stream.reason"] == b"too_large"
    assert found["ner_stream.original.size"] == b"2048000"
    assert found["ner_stream.original.sha256"] == hashlib.sha256(value).hexdigest().encode()
    assert found["ner_stream.source.offset"] == b"1234"
    assert value.startswith(record.value) and len(record.value) <= 65_536
    assert key.startswith(record.key) and len(record.key) <= 1_024
    # The original headers (20 kB) exceed the 16 kB kept for them.
    assert "big" not in found and "trace" not in found


def test_a_null_key_and_value_becomes_an_empty_value() -> None:
    rejection = Rejection(RejectReason.MISSING_TEXT, "null value (tombstone)", SOURCE)
    record = dead_letter(rejection, None, None, [], limit=10_000)
    assert record.value == b"" and record.key is None
    assert dict(record.headers)["ner_stream.original.size"] == b"-1"
    assert "ner_stream.original.sha256" not in dict(record.headers)
    tombstone = dead_letter(rejection, None, b"k", [], limit=10_000)
    assert tombstone.value is None and tombstone.key == b"k"


def test_a_limit_below_the_headers_alone_is_an_error() -> None:
    rejection = Rejection(RejectReason.INVALID_UTF8, "x" * 400, SOURCE)
    with pytest.raises(ValueError, match="limit"):
        dead_letter(rejection, b"\xff", None, [], limit=200)


def test_the_readme_lists_every_dead_letter_reason() -> None:
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("| reason | the record |") :]
    missing = [str(r) for r in RejectReason if f"| `{r}` |" not in table]
    assert not missing, f"README's dead-letter reasons lack {missing}"
