"""Tag schemes and entity-span decoding.

Decoding follows the chunk rules of ``conlleval`` (the CoNLL shared-task scorer), in the form
extended to BIOES by its Python port and by ``seqeval``: a chunk starts and ends according to
``_starts_chunk`` / ``_ends_chunk`` below. Those rules accept IOB1, IOB2 and BIOES alike and never
reject a sequence, so the spans of an ill-formed prediction (``I-`` after ``O``, ``E-`` without
``B-``, ...) are exactly the chunks conlleval would score.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

SCHEMES = ("iob1", "iob2", "bioes")

OUTSIDE = "O"
# The tags each scheme allows; a type is any non-empty run of non-blanks.
TAG_PATTERNS = {
    "iob1": re.compile(r"O|[BI]-\S+"),
    "iob2": re.compile(r"O|[BI]-\S+"),
    "bioes": re.compile(r"O|[BIES]-\S+"),
}


@dataclass(frozen=True)
class Span:
    """A typed entity over the tokens ``start`` .. ``end - 1`` of one sentence."""

    start: int  # first token index
    end: int  # one past the last token index
    type: str


def validate_scheme(scheme: str) -> str:
    """Return ``scheme`` lower-cased if it is one of :data:`SCHEMES`, else raise ``ValueError``."""
    normalised = scheme.lower() if isinstance(scheme, str) else scheme
    if normalised not in SCHEMES:
        raise ValueError(f"unknown tag scheme {scheme!r}: expected one of {', '.join(SCHEMES)}")
    return normalised


def entity_types(tags: Sequence[str], scheme: str) -> set[str]:
    """The entity types of a tag set (a model's tag vocabulary) written in ``scheme``.

    Raises ``ValueError`` for an unknown scheme, a tag the scheme does not allow (see
    :data:`TAG_PATTERNS`), a tag listed twice, or a tag set with no entity type at all.
    """
    pattern = TAG_PATTERNS[validate_scheme(scheme)]
    bad = [t for t in tags if not isinstance(t, str) or not pattern.fullmatch(t)]
    if bad:
        shown = ", ".join(repr(t) for t in bad[:5])
        raise ValueError(f"tags not allowed in the {scheme} scheme: {shown}")
    if len(set(tags)) != len(tags):
        raise ValueError("a tag is listed twice")
    types = {split_tag(t)[1] for t in tags if t != OUTSIDE}
    if not types:
        raise ValueError("no entity type among the tags")
    return types


def split_tag(tag: str) -> tuple[str, str]:
    """Split ``"B-PER"`` into ``("B", "PER")``; a tag without a hyphen has the empty type.

    Like conlleval's ``/^([^-]*)-(.*)$/`` the split is at the first hyphen, so a type may itself
    contain hyphens (WNUT's ``B-creative-work`` has type ``creative-work``).
    """
    prefix, hyphen, entity_type = tag.partition("-")
    return (prefix, entity_type) if hyphen else (tag, "")


def _ends_chunk(prev_prefix: str, prefix: str, prev_type: str, entity_type: str) -> bool:
    """conlleval's ``endOfChunk``: does the chunk holding the previous token end before this one?"""
    if prev_prefix in ("E", "S"):
        return True
    if prev_prefix in ("B", "I") and prefix in ("B", "S", OUTSIDE):
        return True
    # "." is conlleval's sentence-internal boundary tag; it behaves like O here.
    return prev_prefix not in (OUTSIDE, ".") and prev_type != entity_type


def _starts_chunk(prev_prefix: str, prefix: str, prev_type: str, entity_type: str) -> bool:
    """conlleval's ``startOfChunk``: does a chunk start at this token?"""
    if prefix in ("B", "S"):
        return True
    if prev_prefix in ("E", "S", OUTSIDE) and prefix in ("E", "I"):
        return True
    return prefix not in (OUTSIDE, ".") and prev_type != entity_type


def spans_from_tags(tags: Sequence[str], scheme: str = "iob2") -> list[Span]:
    """Decode the entity spans of one sentence's tags, leniently, with conlleval's rules.

    ``scheme`` is validated but does not change the result: conlleval's rules decode IOB1, IOB2
    and BIOES (and any ill-formed mix of their prefixes) the same way, which is what lets a
    model's raw output be scored without repairing it first.
    """
    validate_scheme(scheme)
    spans: list[Span] = []
    prev_prefix, prev_type = OUTSIDE, ""
    begin: int | None = None
    begin_type = ""
    # A trailing "O" closes a chunk that runs to the end, as conlleval's sentence boundary does.
    previous_tag = None
    for index, tag in enumerate([*tags, OUTSIDE]):
        # "O" after "O" neither ends nor starts a chunk and leaves the state as it was; most
        # tokens are such, so they skip the rules.
        if tag == OUTSIDE and previous_tag == OUTSIDE:
            continue
        previous_tag = tag
        prefix, entity_type = split_tag(tag)
        ends = _ends_chunk(prev_prefix, prefix, prev_type, entity_type)
        starts = _starts_chunk(prev_prefix, prefix, prev_type, entity_type)
        # With B/I/E/S/O tags a start inside an open chunk always comes with an end; only tags
        # with other prefixes can start without ending, and the open chunk is closed then too.
        if begin is not None and (ends or starts):
            spans.append(Span(begin, index, begin_type))
            begin = None
        if starts:
            begin, begin_type = index, entity_type
        prev_prefix, prev_type = prefix, entity_type
    if begin is not None:
        # Only reachable with non-standard prefixes, whose chunks the trailing O cannot end.
        spans.append(Span(begin, len(tags), begin_type))
    return spans


def _join_tag(prefix: str, entity_type: str) -> str:
    """Inverse of :func:`split_tag`; an untyped chunk keeps its bare prefix."""
    return f"{prefix}-{entity_type}" if entity_type else prefix


def _span_prefixes(span: Span, target: str, follows_same_type: bool) -> list[str]:
    """The prefixes of one span's tokens written in ``target``."""
    length = span.end - span.start
    if target == "bioes":
        if length == 1:
            return ["S"]
        return ["B", *(["I"] * (length - 2)), "E"]
    # IOB1 marks a start with B- only where it touches a same-type entity; IOB2 always does.
    first = "B" if target == "iob2" or follows_same_type else "I"
    return [first, *(["I"] * (length - 1))]


def tags_from_spans(spans: Sequence[Span], length: int, scheme: str = "iob2") -> list[str]:
    """Write non-overlapping ``spans`` as ``length`` tags in ``scheme``; other tokens are O."""
    target = validate_scheme(scheme)
    tags = [OUTSIDE] * length
    previous: Span | None = None
    for span in sorted(spans, key=lambda s: s.start):
        if span.start < 0 or span.end > length or span.start >= span.end:
            raise ValueError(f"span {span} does not fit in {length} tokens")
        if previous is not None and span.start < previous.end:
            raise ValueError(f"spans {previous} and {span} overlap")
        adjacent = (
            previous is not None and previous.end == span.start and previous.type == span.type
        )
        prefixes = _span_prefixes(span, target, adjacent)
        for offset, prefix in enumerate(prefixes):
            tags[span.start + offset] = _join_tag(prefix, span.type)
        previous = span
    return tags


def convert_tags(tags: Sequence[str], source: str, target: str) -> list[str]:
    """Convert one sentence's tags from scheme ``source`` to scheme ``target`` via its spans.

    The output is always well formed in ``target``: an ill-formed input is first decoded with
    conlleval's lenient rules, so e.g. IOB2 ``O I-PER`` becomes ``O B-PER``.
    """
    spans = spans_from_tags(tags, validate_scheme(source))
    return tags_from_spans(spans, len(tags), target)
