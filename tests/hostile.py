"""Seeded corpora of records that Kafka accepts as legal, hostile ones mixed with valid documents.

Each record says what the worker must make of it: an output, or a dead letter with a reason.
The kinds come from bug reports against Kafka clients and stream processors: null and binary
keys and values, null, binary and duplicate headers, invalid UTF-8, JSON at the edges of the
standard (non-finite and huge numbers, deep nesting, duplicate keys, lone surrogate escapes, a
byte-order mark), values over the size limit, and outputs larger than their input.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field

OUTPUT = "output"  # the expectation for a record that must be tagged

# Text the rigged test tagger and the packaged model both find entities in.
NAMES = ["Peter", "Paris", "Angela Merkel", "Berlin", "Oskar Lund", "Malmo"]
SENTENCE = "Peter went to Paris ."


@dataclass
class HostileRecord:
    """A record to produce and what must come of it (`OUTPUT` or a dead-letter reason)."""

    kind: str
    value: bytes | None
    expect: str
    key: bytes | None = None
    headers: list[tuple[str, bytes | None]] = field(default_factory=list)


def _doc(rng: random.Random, **extra: object) -> dict:
    text = " ".join(rng.choice([SENTENCE, "and the .", "Paris and Peter ."]) for _ in range(3))
    return {"id": f"d{rng.randrange(10**9)}", "text": text, **extra}


def _json(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


def _valid(rng: random.Random) -> HostileRecord:
    return HostileRecord("valid", _json(_doc(rng)), OUTPUT, key=b"k%d" % rng.randrange(1000))


def _output_too_large(rng: random.Random, max_doc: int, out_limit: int) -> HostileRecord:
    """A valid document whose output is over `out_limit`: a pass-through field does it when
    the input may be that large (whatever the model finds), else many entities."""
    if max_doc > out_limit + 1_000:
        value = _json({"text": SENTENCE, "blob": "b" * (out_limit + 100)})
    else:
        value = _json({"text": (SENTENCE + " ") * max(1, min(out_limit // 50, max_doc // 30))})
    return HostileRecord("output_too_large", value, "output_too_large")


# Each maker takes (rng, max_doc_bytes, output_limit) and returns one record of its kind.
Maker = Callable[[random.Random, int, int], HostileRecord]


def _makers() -> dict[str, Maker]:
    def out(kind: str, value: bytes | None, **kw: object) -> Maker:
        return lambda rng, _m, _o: HostileRecord(kind, value, OUTPUT, **kw)  # type: ignore[arg-type]

    def dead(kind: str, value: bytes | None, reason: str, **kw: object) -> Maker:
        return lambda rng, _m, _o: HostileRecord(kind, value, reason, **kw)  # type: ignore[arg-type]

    return {
        "plain_text": out("plain_text", f"{SENTENCE} plain".encode()),
        "empty_value": out("empty_value", b""),
        "empty_text": out("empty_text", b'{"text": ""}'),
        "bom": out("bom", b"\xef\xbb\xbf" + _json({"id": "bom", "text": SENTENCE})),
        "huge_float": out("huge_float", b'{"text": "Peter .", "w": 1e309, "v": -1e999}'),
        "huge_int": out("huge_int", b'{"text": "Peter .", "n": ' + b"7" * 5000 + b"}"),
        "duplicate_keys": out("duplicate_keys", b'{"text": 1, "text": "Peter .", "id": "a"}'),
        "shadowing": out(
            "shadowing",
            _json({"text": "Paris .", "entities": [1], "model": 2, "source": 3, "meta": 4}),
        ),  # fmt: skip
        "format_chars": out("format_chars", _json({"text": "Pe\u00adter went to Pa\u2060ris ."})),
        "astral_text": out("astral_text", _json({"text": "😀 Peter 𝔘 Paris 東京 ."})),
        "integer_id": out("integer_id", b'{"id": 12345678901234567890123, "text": "Peter ."}'),
        "binary_key": lambda rng, _m, _o: HostileRecord(
            "binary_key", _json(_doc(rng)), OUTPUT, key=rng.randbytes(rng.randrange(1, 64))
        ),
        "huge_key": lambda rng, _m, out_limit: HostileRecord(
            "huge_key", _json(_doc(rng)), OUTPUT, key=b"K" * (out_limit // 4)
        ),
        "many_headers": lambda rng, _m, _o: HostileRecord(
            "many_headers",
            _json(_doc(rng)),
            OUTPUT,
            headers=[(f"h{i % 50}", rng.randbytes(rng.randrange(0, 16))) for i in range(300)],
        ),  # fmt: skip
        "binary_header": lambda rng, _m, _o: HostileRecord(
            "binary_header",
            _json(_doc(rng)),
            OUTPUT,
            headers=[("bin", b"\x00\xff\xfe"), ("bin", b"")],
        ),  # fmt: skip
        "null_value": dead("null_value", None, "missing_text", key=b"tombstone"),
        "invalid_utf8": dead("invalid_utf8", b"\xff\xfe Peter \xc3", "invalid_utf8"),
        "broken_json": dead("broken_json", b'{"text": "Peter', "invalid_json"),
        "nan": dead("nan", b'{"text": "Peter .", "w": NaN}', "invalid_json"),
        "lone_surrogate": dead("lone_surrogate", b'{"text": "Peter \\ud800 ."}', "invalid_json"),
        # Deeper than any JSON parser's stack, and within the size limit.
        "deep_nesting": lambda rng, max_doc, _o: HostileRecord(
            "deep_nesting",
            b'{"text": "x", "d": '
            + b"[" * ((max_doc - 40) // 2)
            + b"]" * ((max_doc - 40) // 2)
            + b"}",
            "invalid_json",
        ),  # fmt: skip
        "array": dead("array", b'[{"text": "Peter ."}]', "not_an_object"),
        "number": dead("number", b"42", "not_an_object"),
        "no_text": dead("no_text", b'{"id": "x", "body": "Peter ."}', "missing_text"),
        "text_not_string": dead("text_not_string", b'{"text": ["Peter"]}', "text_not_string"),
        "float_id": dead("float_id", b'{"id": 1.5, "text": "Peter ."}', "id_not_string"),
        "too_large": lambda rng, max_doc, _o: HostileRecord(
            "too_large", b"Peter " * (max_doc // 6 + 10), "too_large"
        ),
        "output_too_large": _output_too_large,
    }


MAKERS = _makers()
# Records the Java client writes but kafka-python cannot (the worker must still handle them).
NULL_KINDS = {
    "null_key_and_value": lambda rng, _m, _o: HostileRecord(
        "null_key_and_value", None, "missing_text"
    ),
    "null_header": lambda rng, _m, _o: HostileRecord(
        "null_header", _json(_doc(rng)), OUTPUT, headers=[("n", None), ("n", b"1")]
    ),
}


def corpus(
    seed: int,
    n: int,
    max_doc_bytes: int,
    output_limit: int,
    valid_share: float = 0.5,
    null_kinds: bool = True,
) -> list[HostileRecord]:
    """`n` records in a seeded random order: about `valid_share` plain valid documents, the rest
    hostile, every kind at least once when `n` allows.

    `max_doc_bytes` and `output_limit` size the `too_large` and `output_too_large` kinds;
    `null_kinds` adds the records kafka-python cannot write (null key and value, null header
    values).
    """
    rng = random.Random(seed)
    makers = dict(MAKERS)
    if null_kinds:
        makers.update(NULL_KINDS)
    kinds = sorted(makers)
    # The big kinds are rare: each costs megabytes or a long tagging pass.
    weights = [
        0.1 if k in ("too_large", "output_too_large", "deep_nesting") else 1.0 for k in kinds
    ]
    records = [makers[k](rng, max_doc_bytes, output_limit) for k in kinds[: max(0, n)]]
    while len(records) < n:
        if rng.random() < valid_share:
            records.append(_valid(rng))
        else:
            kind = rng.choices(kinds, weights)[0]
            records.append(makers[kind](rng, max_doc_bytes, output_limit))
    rng.shuffle(records)
    return records
