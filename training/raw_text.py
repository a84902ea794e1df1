"""Labelled documents written out as the raw text users send, with gold entity character spans.

A CoNLL document (the sentences between two ``-DOCSTART-`` lines) is detokenized sentence by
sentence and laid out in one of `LAYOUTS`:

- ``lines``: one sentence per line, a single ``\\n`` between them (news feeds, OCR output);
- ``paragraph``: the sentences joined by one space (a web article body);
- ``wrapped``: the ``paragraph`` text hard-wrapped at `WRAP_WIDTH` columns (e-mail, bulletins).

Detokenizing follows the usual rules (those of the Moses detokenizer, reduced to English): no
space before ``, . ; : ? ! ) ] } %`` and the clitics ``'s n't 're 've 'll 'm 'd``, none after
``( [ { $``, and straight double quotes alternate between opening (no space after) and closing (no
space before) within a sentence. Every gold token keeps its exact characters, so each gold entity
maps to a character span whose text is the entity's tokens joined as above.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from ner_stream.spans import spans_from_tags
from ner_stream.text import split_sentences, tokenize
from training.datasets import Sentence

LAYOUTS = ("lines", "paragraph", "wrapped")
WRAP_WIDTH = 72

_NO_SPACE_BEFORE = frozenset({",", ".", ";", ":", "?", "!", ")", "]", "}", "%", "..."})
_CLITICS = frozenset({"'s", "n't", "'re", "'ve", "'ll", "'m", "'d"})
_NO_SPACE_AFTER = frozenset({"(", "[", "{", "$"})


@dataclass(frozen=True)
class GoldSpan:
    """A gold entity: characters ``start`` .. ``end - 1`` of its document's text, and its type."""

    start: int
    end: int
    type: str


@dataclass
class RawDocument:
    """A document as raw text, with its gold entities as character spans (ascending)."""

    text: str
    entities: list[GoldSpan]


def detokenize(tokens: Sequence[str]) -> tuple[str, list[int]]:
    """Join one sentence's tokens the usual way; returns the text and each token's start offset.

    ``text[starts[i]:starts[i] + len(tokens[i])] == tokens[i]`` for every token.
    """
    parts: list[str] = []
    starts: list[int] = []
    length = 0
    glue_next = True  # no space before the first token
    quotes = 0
    for token in tokens:
        opening_quote = closing_quote = False
        if token == '"':
            quotes += 1
            opening_quote, closing_quote = quotes % 2 == 1, quotes % 2 == 0
        glue = glue_next or closing_quote or token in _NO_SPACE_BEFORE or token.lower() in _CLITICS
        if not glue:
            parts.append(" ")
            length += 1
        starts.append(length)
        parts.append(token)
        length += len(token)
        glue_next = opening_quote or token in _NO_SPACE_AFTER
    return "".join(parts), starts


def wrap(text: str, width: int = WRAP_WIDTH) -> str:
    """``text`` hard-wrapped greedily at ``width`` columns: some single spaces become ``\\n``.

    Only spaces are replaced (one character by one), so every offset into ``text`` stays valid. A
    word longer than ``width`` gets a line of its own; it is never broken.
    """
    out = list(text)
    line = 0  # characters on the current line
    at = 0  # offset of the current word
    for i, word in enumerate(text.split(" ")):
        if i and line and line + 1 + len(word) > width:
            out[at - 1] = "\n"  # the space before the word
            line = len(word)
        else:
            line += (1 if i else 0) + len(word)
        at += len(word) + 1
    return "".join(out)


def render(sentences: Sequence[Sentence], layout: str) -> RawDocument:
    """One document's sentences (IOB2 tags) as raw text in ``layout`` with gold spans.

    Raises ``ValueError`` for an unknown layout.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    separator = "\n" if layout == "lines" else " "
    pieces: list[str] = []
    entities: list[GoldSpan] = []
    offset = 0
    for sentence in sentences:
        if pieces:
            pieces.append(separator)
            offset += len(separator)
        text, starts = detokenize(sentence.tokens)
        for span in spans_from_tags(sentence.tags, "iob2"):
            last = span.end - 1
            end = starts[last] + len(sentence.tokens[last])
            entities.append(GoldSpan(offset + starts[span.start], offset + end, span.type))
        pieces.append(text)
        offset += len(text)
    text = "".join(pieces)
    if layout == "wrapped":
        text = wrap(text)
    return RawDocument(text, entities)


def paragraph_groups(sentences: Sequence[Sentence]) -> list[list[int]]:
    """Runs of one document's sentences that the text path tags as one sequence in ``paragraph``.

    The document is rendered in the ``paragraph`` layout and split as the worker splits a
    message (`ner_stream.text.split_sentences`); consecutive sentences joined by one sentence of
    the splitter form one group (a headline and its dateline, the rows of a results table, ...).
    Returns the groups of two sentences or more, as ascending indices into ``sentences``.
    """
    text_of = [detokenize(s.tokens)[0] for s in sentences]
    text = " ".join(text_of)
    starts: list[int] = []  # of each splitter token, ascending
    numbers: list[int] = []  # the splitter sentence each token is in
    for number, split in enumerate(split_sentences(tokenize(text), text)):
        for token in split:
            starts.append(token.start)
            numbers.append(number)
    groups: list[list[int]] = []
    previous_last: int | None = None  # splitter sentence of the previous gold sentence's end
    at = 0
    for index, piece in enumerate(text_of):
        first = bisect.bisect_left(starts, at)
        last = bisect.bisect_left(starts, at + len(piece)) - 1
        at += len(piece) + 1
        if first > last:  # no token: nothing to join
            previous_last = None
            continue
        if previous_last == numbers[first]:
            if groups and groups[-1][-1] == index - 1:
                groups[-1].append(index)
            else:
                groups.append([index - 1, index])
        previous_last = numbers[last]
    return groups
