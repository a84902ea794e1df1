"""Span decoding (conlleval's rules) and tag-scheme conversion."""

from __future__ import annotations

import random

import pytest

from ner_stream.spans import (
    SCHEMES,
    Span,
    convert_tags,
    entity_types,
    spans_from_tags,
    split_tag,
    tags_from_spans,
    validate_scheme,
)


def _spans(tags: str, scheme: str = "iob2") -> list[tuple[int, int, str]]:
    return [(s.start, s.end, s.type) for s in spans_from_tags(tags.split(), scheme)]


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        ("", []),
        ("O O", []),
        ("B-PER I-PER O B-LOC", [(0, 2, "PER"), (3, 4, "LOC")]),
        # An entity opened by I- after O (or at the start) is a chunk.
        ("O I-PER I-PER O", [(1, 3, "PER")]),
        ("I-PER", [(0, 1, "PER")]),
        # A type change inside a run splits it, with or without B-.
        ("I-PER I-LOC", [(0, 1, "PER"), (1, 2, "LOC")]),
        ("B-PER I-LOC I-LOC", [(0, 1, "PER"), (1, 3, "LOC")]),
        # Adjacent entities of the same type.
        ("B-PER B-PER", [(0, 1, "PER"), (1, 2, "PER")]),
        ("B-PER I-PER B-PER", [(0, 2, "PER"), (2, 3, "PER")]),
        # An entity running to the end of the sentence is closed.
        ("O B-ORG I-ORG", [(1, 3, "ORG")]),
        # Types may contain hyphens (WNUT); the split is at the first one.
        ("B-creative-work I-creative-work O", [(0, 2, "creative-work")]),
        # Tags with no type prefix form untyped chunks, as in conlleval.
        ("B I O I", [(0, 2, ""), (3, 4, "")]),
        ("B-PER I O", [(0, 1, "PER"), (1, 2, "")]),
    ],
)
def test_spans_iob2(tags: str, expected: list[tuple[int, int, str]]) -> None:
    assert _spans(tags, "iob2") == expected


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        ("I-PER I-PER O I-LOC", [(0, 2, "PER"), (3, 4, "LOC")]),
        # IOB1: B- marks the second of two adjacent same-type entities.
        ("I-PER B-PER", [(0, 1, "PER"), (1, 2, "PER")]),
        ("I-PER I-PER B-PER I-PER", [(0, 2, "PER"), (2, 4, "PER")]),
        ("I-PER I-LOC", [(0, 1, "PER"), (1, 2, "LOC")]),
        # The CoNLL-2003 anomaly: B- after O still opens one entity continued by I-.
        ("O B-MISC I-MISC O", [(1, 3, "MISC")]),
    ],
)
def test_spans_iob1(tags: str, expected: list[tuple[int, int, str]]) -> None:
    assert _spans(tags, "iob1") == expected


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        ("B-PER I-PER E-PER O S-LOC", [(0, 3, "PER"), (4, 5, "LOC")]),
        ("S-PER S-PER", [(0, 1, "PER"), (1, 2, "PER")]),
        ("B-PER E-PER B-PER E-PER", [(0, 2, "PER"), (2, 4, "PER")]),
        ("B-PER E-PER S-PER", [(0, 2, "PER"), (2, 3, "PER")]),
        # Ill-formed output of a model without a CRF, decoded as conlleval does.
        ("E-PER", [(0, 1, "PER")]),
        ("O E-PER O", [(1, 2, "PER")]),
        ("I-PER E-PER", [(0, 2, "PER")]),
        ("S-PER I-PER", [(0, 1, "PER"), (1, 2, "PER")]),
        ("S-PER E-PER", [(0, 1, "PER"), (1, 2, "PER")]),
        ("E-PER I-PER E-PER", [(0, 1, "PER"), (1, 3, "PER")]),
        ("E-PER E-PER", [(0, 1, "PER"), (1, 2, "PER")]),
        ("B-PER I-PER O", [(0, 2, "PER")]),
        ("B-PER E-LOC", [(0, 1, "PER"), (1, 2, "LOC")]),
        ("B-PER B-PER E-PER", [(0, 1, "PER"), (1, 3, "PER")]),
        ("I-PER S-PER", [(0, 1, "PER"), (1, 2, "PER")]),
    ],
)
def test_spans_bioes(tags: str, expected: list[tuple[int, int, str]]) -> None:
    assert _spans(tags, "bioes") == expected


def test_span_is_frozen_and_hashable() -> None:
    span = Span(1, 3, "PER")
    assert {span, Span(1, 3, "PER")} == {span}
    with pytest.raises(AttributeError):
        span.start = 0  # type: ignore[misc]


def test_split_tag() -> None:
    assert split_tag("B-PER") == ("B", "PER")
    assert split_tag("I-creative-work") == ("I", "creative-work")
    assert split_tag("O") == ("O", "")
    assert split_tag("B") == ("B", "")


def test_entity_types_of_a_tag_set_well_formed_in_its_scheme() -> None:
    assert entity_types(["O", "B-PER", "E-PER", "S-LOC", "I-creative-work"], "bioes") == {
        "PER", "LOC", "creative-work"
    }  # fmt: skip
    assert entity_types(["B-PER", "I-PER"], "iob2") == {"PER"}  # no "O" is allowed


@pytest.mark.parametrize(
    ("tags", "scheme", "problem"),
    [
        (["O", "S-PER"], "iob2", r"not allowed in the iob2 scheme: 'S-PER'"),
        (["O", "B-PER", "X-LOC"], "bioes", "'X-LOC'"),
        (["O", "B-"], "bioes", "'B-'"),
        (["O", "B-PER", "B-PER"], "iob1", "listed twice"),
        (["O"], "bioes", "no entity type"),
        (["O", "B-PER"], "bio", "unknown tag scheme"),
    ],
)
def test_entity_types_refuses_a_tag_set_not_of_its_scheme(tags, scheme, problem) -> None:
    with pytest.raises(ValueError, match=problem):
        entity_types(tags, scheme)


def test_validate_scheme() -> None:
    assert validate_scheme("IOB2") == "iob2"
    assert [validate_scheme(s) for s in SCHEMES] == list(SCHEMES)
    with pytest.raises(ValueError, match=r"'bio'.*iob1, iob2, bioes"):
        validate_scheme("bio")
    with pytest.raises(ValueError):
        spans_from_tags(["O"], "iobes")


@pytest.mark.parametrize(
    ("tags", "source", "target", "expected"),
    [
        ("I-PER I-PER B-PER O I-LOC", "iob1", "iob2", "B-PER I-PER B-PER O B-LOC"),
        ("B-PER I-PER B-PER O B-LOC B-ORG", "iob2", "iob1", "I-PER I-PER B-PER O I-LOC I-ORG"),
        # B- in IOB1 only where the previous token ends a same-type entity.
        ("B-PER B-LOC B-LOC", "iob2", "iob1", "I-PER I-LOC B-LOC"),
        ("B-PER I-PER I-PER O B-LOC B-LOC", "iob2", "bioes", "B-PER I-PER E-PER O S-LOC S-LOC"),
        ("B-PER I-PER E-PER O S-LOC S-LOC", "bioes", "iob2", "B-PER I-PER I-PER O B-LOC B-LOC"),
        ("S-PER S-PER", "bioes", "iob1", "I-PER B-PER"),
        ("I-PER B-PER", "iob1", "bioes", "S-PER S-PER"),
        # Ill-formed input is repaired into well-formed output.
        ("O I-PER I-PER", "iob2", "iob2", "O B-PER I-PER"),
        ("O E-PER I-PER", "bioes", "bioes", "O S-PER S-PER"),
        ("B I", "iob2", "bioes", "B E"),
        ("", "iob1", "bioes", ""),
    ],
)
def test_convert_tags(tags: str, source: str, target: str, expected: str) -> None:
    assert convert_tags(tags.split(), source, target) == expected.split()


def _tags(text: str) -> list[str]:
    return text.split()


def test_round_trip_iob1_iob2_bioes_iob2_iob1() -> None:
    iob1 = _tags("I-ORG O I-MISC O O O I-MISC O O I-PER I-PER B-PER O I-LOC I-LOC B-LOC I-ORG")
    iob2 = convert_tags(iob1, "iob1", "iob2")
    assert iob2 == _tags(
        "B-ORG O B-MISC O O O B-MISC O O B-PER I-PER B-PER O B-LOC I-LOC B-LOC B-ORG"
    )
    bioes = convert_tags(iob2, "iob2", "bioes")
    assert bioes == _tags(
        "S-ORG O S-MISC O O O S-MISC O O B-PER E-PER S-PER O B-LOC E-LOC S-LOC S-ORG"
    )
    assert convert_tags(bioes, "bioes", "iob2") == iob2
    assert convert_tags(iob2, "iob2", "iob1") == iob1


def _random_tags(rng: random.Random, length: int) -> list[str]:
    alphabet = ["O", "O", "O", "B", "I"] + [
        f"{prefix}-{kind}" for prefix in "BIES" for kind in ("PER", "LOC")
    ]
    return [rng.choice(alphabet) for _ in range(length)]


def test_conversion_preserves_spans_on_random_sequences() -> None:
    rng = random.Random(7)
    for _ in range(500):
        tags = _random_tags(rng, rng.randint(0, 12))
        spans = spans_from_tags(tags, "bioes")
        for target in SCHEMES:
            converted = convert_tags(tags, "bioes", target)
            assert len(converted) == len(tags)
            assert spans_from_tags(converted, target) == spans, (tags, target, converted)
            # Converting well-formed tags again is the identity.
            assert convert_tags(converted, target, target) == converted


def test_tags_from_spans_rejects_bad_spans() -> None:
    assert tags_from_spans([Span(2, 3, "LOC"), Span(0, 2, "PER")], 4) == [
        "B-PER",
        "I-PER",
        "B-LOC",
        "O",
    ]
    with pytest.raises(ValueError, match="overlap"):
        tags_from_spans([Span(0, 2, "PER"), Span(1, 3, "LOC")], 4)
    with pytest.raises(ValueError, match="does not fit"):
        tags_from_spans([Span(3, 5, "PER")], 4)
