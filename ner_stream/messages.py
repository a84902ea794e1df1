"""Decoding and validation of input records, and the output and dead-letter formats.

Input value: UTF-8 JSON ``{"id": str, "text": str, ...}``; any other fields are carried through
as ``meta``. A value that is not JSON at all is taken as the plain text of a document. See
:func:`decode` for the exact rules.

Output value: compact UTF-8 JSON (non-ASCII characters written as-is)::

    {"id": "...", "source": {"topic": "...", "partition": 0, "offset": 42},
     "model": {"name": "...", "version": "..."},
     "entities": [{"text": "...", "type": "PER", "start": 0, "end": 5, "score": 0.9731}],
     "meta": {...}}

``start``/``end`` are indices into the document text counted in Unicode code points (Python
``str`` indices), ``text == document_text[start:end]``; ``meta`` is present only when non-empty.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = [
    "Document",
    "Entity",
    "RejectReason",
    "Rejection",
    "Source",
    "OutRecord",
    "carried_headers",
    "dead_letter",
    "dead_letter_headers",
    "decode",
    "document_id",
    "encode_output",
    "output_object",
    "parse_json",
    "pass_through",
    "processing_error",
    "record_size",
]

HEADER_PREFIX = "ner_stream."
MAX_DETAIL_BYTES = 500
SCORE_DECIMALS = 4

# First characters of a JSON value other than an object; plain text starting with anything else
# cannot be JSON, so we do not try to parse it.
_JSON_VALUE_START = frozenset('["-0123456789tfn')
# A "\ud800"-style escape: the only way a JSON string can smuggle in an unpaired surrogate, which
# Python accepts but which cannot be encoded as UTF-8 when the output is written.
_SURROGATE_ESCAPE_RE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
# Deeper nesting is refused before parsing. Python's own limit (a RecursionError) differs
# between versions (3.11 stops near 1,000 levels, 3.12 parses far deeper), so a worker's verdict
# on a record would depend on the interpreter it runs under; and an output echoing such a
# document's fields could not be read back by a consumer with a lower limit.
MAX_JSON_DEPTH = 500
# A string (its escapes included) or a bracket: the tokens that decide the nesting depth.
_DEPTH_TOKEN_RE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


class RejectReason(StrEnum):
    """Why a record went to the dead-letter topic."""

    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_TEXT = "missing_text"
    TEXT_NOT_STRING = "text_not_string"
    TOO_LARGE = "too_large"
    ID_NOT_STRING = "id_not_string"
    PROCESSING_ERROR = "processing_error"
    OUTPUT_TOO_LARGE = "output_too_large"
    MODEL_CRASH = "model_crash"  # killed the model process twice, the second time alone


@dataclass(frozen=True)
class Source:
    """Where a record was read from."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class Document:
    """A valid input record."""

    id: str
    text: str
    meta: dict[str, Any]  # the input object's fields other than "id" and "text"
    source: Source


@dataclass(frozen=True)
class Rejection:
    """An input record that cannot be processed, bound for the dead-letter topic."""

    reason: RejectReason
    detail: str
    source: Source


@dataclass(frozen=True)
class Entity:
    """One recognised entity; ``start``/``end`` are ``str`` indices into the document text."""

    text: str
    type: str
    start: int
    end: int
    score: float


class _Invalid(Exception):
    """Raised inside this module to turn a validation failure into a Rejection."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _default_id(key: bytes | None, source: Source) -> str:
    """The id of a record that carries none: its key, else ``topic/partition/offset``."""
    if key:
        try:
            return key.decode("utf-8")
        except UnicodeDecodeError:
            pass  # a binary key is no use as an id; fall back to the position
    return f"{source.topic}/{source.partition}/{source.offset}"


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON; accepting them would make our own output invalid JSON.
    raise ValueError(f"invalid JSON constant {name}")


def _float_or_literal(literal: str) -> float | str:
    # A number a double cannot hold (1e309) would turn into inf and make our own output invalid
    # JSON; its literal is kept, as a string, so the record is still tagged and nothing is lost.
    value = float(literal)
    return value if math.isfinite(value) else literal


def _int_or_literal(literal: str) -> int | str:
    # Python refuses to convert integers of more than 4300 digits (a guard against quadratic
    # time); such an integer is kept as the string of its literal, like an out-of-range float.
    try:
        return int(literal)
    except ValueError:
        return literal


def parse_json(value: str) -> Any:
    """Parse strict JSON: no NaN or Infinity, no unpaired surrogate escapes, bounded nesting.

    Numbers that a double (or Python's integer conversion) cannot hold come back as the string
    of their literal. Raises ``ValueError`` saying why (with the position, for a syntax error)
    when it is not JSON, or when arrays and objects nest more than `MAX_JSON_DEPTH` levels.
    """
    if nested_deeper_than(value, MAX_JSON_DEPTH):
        raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep")
    try:
        parsed = json.loads(
            value,
            parse_constant=_reject_constant,
            parse_float=_float_or_literal,
            parse_int=_int_or_literal,
        )
    except json.JSONDecodeError as exc:
        raise ValueError(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if _SURROGATE_ESCAPE_RE.search(value) and _has_lone_surrogate(parsed):
        raise ValueError("string with an unpaired surrogate escape")
    return parsed


def nested_deeper_than(value: str, limit: int) -> bool:
    """Whether the arrays and objects of JSON text `value` nest more than `limit` levels deep
    (brackets inside strings do not count). Text that is not JSON gets an answer too, which is
    harmless: the parser refuses it next.

    Linear in the length; the exact scan runs only when the text has more opening brackets than
    `limit`, which bounds the depth from above.
    """
    if value.count("[") + value.count("{") <= limit:
        return False
    depth = 0
    for token in _DEPTH_TOKEN_RE.finditer(value):
        c = token.group()
        if c in "[{":
            depth += 1
            if depth > limit:
                return True
        elif c in "]}":
            depth -= 1
    return False


def _has_lone_surrogate(value: Any) -> bool:
    """Whether any string inside a parsed JSON value holds an unpaired surrogate."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE_RE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def document_id(raw: Any) -> str | None:
    """The id an input object's ``id`` field (``raw``) gives, or None for the caller's default.

    A string is the id; an integer is written in decimal; absent (None), null or "" -> None.
    Raises ``ValueError`` ("id is a JSON <type>") for any other value.
    """
    if raw is None or raw == "":
        return None
    if isinstance(raw, str):
        return raw
    # Integer ids are common (database keys) and convert without ambiguity. bool is an int
    # subclass but is no id; floats would round-trip ambiguously ("1.0" vs "1").
    if isinstance(raw, int) and not isinstance(raw, bool):
        return str(raw)
    raise ValueError(f"id is a JSON {_json_type(raw)}")


def _json_type(value: Any) -> str:
    match value:
        case bool():
            return "boolean"
        case int() | float():
            return "number"
        case str():
            return "string"
        case list():
            return "array"
        case dict():
            return "object"
        case _:
            return "null"


def pass_through(obj: dict[str, Any]) -> dict[str, Any]:
    """The fields of an input object other than ``id`` and ``text``: its output's ``meta``."""
    return {name: field for name, field in obj.items() if name not in ("id", "text")}


def _from_object(obj: dict[str, Any], key: bytes | None, source: Source) -> Document:
    if "text" not in obj:
        raise _Invalid(RejectReason.MISSING_TEXT, 'no "text" field')
    text = obj["text"]
    if text is None:
        raise _Invalid(RejectReason.MISSING_TEXT, '"text" is null')
    if not isinstance(text, str):
        raise _Invalid(RejectReason.TEXT_NOT_STRING, f"text is a JSON {_json_type(text)}")
    try:
        doc_id = document_id(obj.get("id"))
    except ValueError as exc:
        raise _Invalid(RejectReason.ID_NOT_STRING, str(exc)) from None
    if doc_id is None:
        doc_id = _default_id(key, source)
    meta = pass_through(obj)
    return Document(id=doc_id, text=text, meta=meta, source=source)


def _decode(value: bytes | None, key: bytes | None, source: Source, max_bytes: int) -> Document:
    if value is None:
        raise _Invalid(RejectReason.MISSING_TEXT, "null value (tombstone)")
    if len(value) > max_bytes:
        raise _Invalid(RejectReason.TOO_LARGE, f"value is {len(value)} bytes, limit {max_bytes}")
    try:
        decoded = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Invalid(RejectReason.INVALID_UTF8, f"{exc.reason} at byte {exc.start}") from None
    # A byte-order mark is not part of the content (and json.loads refuses it).
    decoded = decoded.removeprefix("\ufeff")
    head = decoded.lstrip()[:1]
    if head == "{":
        try:
            parsed = parse_json(decoded)
        except ValueError as exc:
            raise _Invalid(RejectReason.INVALID_JSON, str(exc)) from None
        # A value that starts with "{" and parses completely is an object.
        return _from_object(parsed, key, source)
    if head in _JSON_VALUE_START:
        try:
            parsed = parse_json(decoded)
        except ValueError:
            pass  # not JSON: plain text that happens to start like a JSON value
        else:
            raise _Invalid(RejectReason.NOT_AN_OBJECT, f"JSON {_json_type(parsed)}, not an object")
    return Document(id=_default_id(key, source), text=decoded, meta={}, source=source)


def decode(
    value: bytes | None, key: bytes | None, source: Source, max_bytes: int
) -> Document | Rejection:
    """Turn a record's value (and key) into a :class:`Document`, or say why it cannot be one.

    Rules, in order:

    - ``None`` value (a tombstone): ``MISSING_TEXT``.
    - More than ``max_bytes`` bytes: ``TOO_LARGE`` (checked before decoding anything).
    - Not valid UTF-8: ``INVALID_UTF8``. A leading byte-order mark is dropped.
    - Starts (after whitespace) with ``{``: must be a strict JSON object (no NaN/Infinity, no
      unpaired surrogate escapes), else ``INVALID_JSON``. In the object, ``text`` must be present
      and not null (``MISSING_TEXT``) and a string (``TEXT_NOT_STRING``); an empty string is a
      valid text. ``id`` may be a string or an integer (converted with ``str``); other types are
      ``ID_NOT_STRING``; when absent, null or empty the id defaults as for plain text. All other
      fields go to ``meta`` unchanged, so none can shadow an output field. A number that a
      double cannot hold (``1e309``) or an integer of more than 4300 digits is kept as the
      string of its literal. Duplicate keys: the last one wins.
    - Any other JSON value (array, number, quoted string, true/false/null): ``NOT_AN_OBJECT``.
    - Anything else is plain text: the whole decoded value is the document text, and the id is the
      key decoded as UTF-8 if there is a (valid, non-empty) key, else ``"topic/partition/offset"``.
    """
    try:
        return _decode(value, key, source, max_bytes)
    except _Invalid as invalid:
        return Rejection(reason=invalid.reason, detail=invalid.detail, source=source)


def processing_error(source: Source, error: BaseException) -> Rejection:
    """A ``PROCESSING_ERROR`` rejection for a record whose processing raised ``error``."""
    return Rejection(
        reason=RejectReason.PROCESSING_ERROR,
        detail=f"{type(error).__name__}: {error}",
        source=source,
    )


def _entity_json(entity: Entity) -> dict[str, Any]:
    if not math.isfinite(entity.score):
        raise ValueError(f"entity score is not finite: {entity.score!r}")
    return {
        "text": entity.text,
        "type": entity.type,
        "start": entity.start,
        "end": entity.end,
        "score": round(entity.score, SCORE_DECIMALS),
    }


def output_object(
    doc_id: str,
    entities: Sequence[Entity],
    meta: dict[str, Any],
    source: Source | None = None,
    model: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """The output object of one document: ``{"id", "source"?, "model"?, "entities", "meta"?}``.

    ``source`` and ``model`` (name, version) are included when given; ``meta`` (the input's
    pass-through fields) only when non-empty, always nested, so that no input field can shadow
    the others. Scores are rounded to 4 decimals. Raises ``ValueError`` if a score is NaN or
    infinite.
    """
    payload: dict[str, Any] = {"id": doc_id}
    if source is not None:
        payload["source"] = {
            "topic": source.topic,
            "partition": source.partition,
            "offset": source.offset,
        }
    if model is not None:
        payload["model"] = {"name": model[0], "version": model[1]}
    payload["entities"] = [_entity_json(entity) for entity in entities]
    if meta:
        payload["meta"] = meta
    return payload


def encode_output(
    doc: Document, entities: list[Entity], model_name: str, model_version: str
) -> bytes:
    """The output record value for ``doc``: compact UTF-8 JSON (format in the module docstring).

    Scores are rounded to 4 decimals. Raises ``ValueError`` if a score is NaN or infinite.
    """
    payload = output_object(doc.id, entities, doc.meta, doc.source, (model_name, model_version))
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8")


def _truncate_utf8(text: str, limit: int) -> bytes:
    """``text`` as UTF-8, cut to at most ``limit`` bytes on a character boundary."""
    data = text.encode("utf-8", errors="replace")
    if len(data) <= limit:
        return data
    marker = "…".encode()
    # errors="ignore" drops the partial character left at the cut.
    kept = data[: limit - len(marker)].decode("utf-8", errors="ignore").encode("utf-8")
    return kept + marker


# Kafka's record format v2 (KIP-98): a batch header of 61 bytes, at most 21 bytes of per-record
# fields (length, attributes, timestamp and offset deltas as varints), then key, value and each
# header with a varint length of at most 5 bytes in front.
_BATCH_OVERHEAD = 61 + 21
_VARINT_MAX = 5


def record_size(
    key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes | None]]
) -> int:
    """An upper bound, in bytes, of the size of one uncompressed record in a batch of its own.

    This is the size that the producer's ``max.request.size`` and the topic's
    ``max.message.bytes`` are checked against (kafka-python's own estimate is never larger).
    """
    size = _BATCH_OVERHEAD + 3 * _VARINT_MAX + len(key or b"") + len(value or b"")
    for name, data in headers:
        size += 2 * _VARINT_MAX + len(name.encode("utf-8", errors="replace")) + len(data or b"")
    return size


def carried_headers(headers: list[tuple[str, bytes | None]]) -> list[tuple[str, bytes]]:
    """Input headers as they are carried to an output or dead letter.

    A header whose value is null (legal in the protocol, written by Java clients) is carried
    with an empty value: kafka-python can only write bytes values. Order and duplicate names
    are kept.
    """
    if all(data is not None for _, data in headers):
        return headers  # type: ignore[return-value]
    return [(name, b"" if data is None else data) for name, data in headers]


@dataclass(frozen=True)
class OutRecord:
    """A record to produce: value, key and headers as kafka-python's ``send`` takes them."""

    value: bytes | None
    key: bytes | None
    headers: list[tuple[str, bytes]]

    @property
    def size(self) -> int:
        """See :func:`record_size`."""
        return record_size(self.key, self.value, self.headers)


# A dead letter too large for its topic keeps this much of the original value and key; headers
# of the original are kept as long as they fit in the header budget.
DEAD_LETTER_PREFIX_BYTES = 65_536
DEAD_LETTER_KEY_BYTES = 1_024
DEAD_LETTER_HEADER_BYTES = 16_384


def dead_letter(
    rejection: Rejection,
    value: bytes | None,
    key: bytes | None,
    headers: list[tuple[str, bytes | None]],
    limit: int,
) -> OutRecord:
    """The dead-letter record for a rejected input, never larger than ``limit`` bytes.

    The dead letter is the original value, key and headers (see :func:`carried_headers`) plus
    the headers of :func:`dead_letter_headers`, when that fits in ``limit`` (the smaller of the
    producer's ``max.request.size`` and the dead-letter topic's ``max.message.bytes``, as
    measured by :func:`record_size`). Otherwise it is *bounded*: the value is cut to a prefix of
    at most 64 KiB, the key to 1 KiB, the original headers are kept only when they fit in
    16 KiB, all within ``limit``; ``ner_stream.truncated`` says so. The original's size and
    SHA-256 are in the headers either way, with its topic, partition and offset, so that an
    operator can find the original.

    A null value with a null key, which kafka-python cannot send, becomes an empty value (the
    header ``ner_stream.original.size`` is ``-1`` for a null value, as in Kafka's own format).
    Raises ``ValueError`` when even the headers alone exceed ``limit``.
    """
    carried = carried_headers(headers)
    ours = dead_letter_headers(rejection, carried, value)
    if value is None and key is None:
        value = b""
    whole = OutRecord(value, key, ours)
    if whole.size <= limit:
        return whole
    mark = [(HEADER_PREFIX + "truncated", b"true")]
    own = [(name, data) for name, data in ours if name.startswith(HEADER_PREFIX)] + mark
    kept_headers = [(name, data) for name, data in ours if not name.startswith(HEADER_PREFIX)]
    if record_size(None, None, kept_headers) > DEAD_LETTER_HEADER_BYTES:
        kept_headers = []
    short_key = key[:DEAD_LETTER_KEY_BYTES] if key is not None else None
    base = OutRecord(None, short_key, kept_headers + own)
    if base.size > limit:
        base = OutRecord(None, short_key, own)
    room = limit - base.size
    if room < 0:
        raise ValueError(f"a dead letter needs more than the {limit}-byte limit")
    prefix = (value or b"")[: min(DEAD_LETTER_PREFIX_BYTES, room)]
    return OutRecord(prefix, base.key, base.headers)


def dead_letter_headers(
    rejection: Rejection,
    original_headers: list[tuple[str, bytes]],
    value: bytes | None,
) -> list[tuple[str, bytes]]:
    """Headers for the dead-letter copy of a record: the original ones plus why and where from.

    Adds ``ner_stream.reason``, ``ner_stream.detail`` (at most 500 bytes),
    ``ner_stream.source.topic``, ``ner_stream.source.partition``,
    ``ner_stream.source.offset``, ``ner_stream.original.size`` (bytes of the original value,
    ``-1`` when null) and, for a non-null value, ``ner_stream.original.sha256`` (hex), all
    UTF-8. Original headers under the ``ner_stream.`` prefix (left by an earlier dead-lettering
    of a replayed record) are dropped so that each key appears once and describes this rejection.
    """
    kept = [(name, data) for name, data in original_headers if not name.startswith(HEADER_PREFIX)]
    source = rejection.source
    added = [
        ("reason", str(rejection.reason).encode("utf-8")),
        ("detail", _truncate_utf8(rejection.detail, MAX_DETAIL_BYTES)),
        ("source.topic", source.topic.encode("utf-8", errors="replace")),
        ("source.partition", str(source.partition).encode("utf-8")),
        ("source.offset", str(source.offset).encode("utf-8")),
        ("original.size", str(-1 if value is None else len(value)).encode("utf-8")),
    ]
    if value is not None:
        added.append(("original.sha256", hashlib.sha256(value).hexdigest().encode("ascii")))
    return kept + [(HEADER_PREFIX + name, data) for name, data in added]
