"""Corpus readers: CoNLL-2003, the Kaggle GMB csv and WNUT-17, all returned with IOB2 tags.

Every reader validates each line and raises :class:`DatasetError` naming the file and the 1-based
line, so a corrupt corpus stops training at once instead of silently teaching wrong labels.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from ner_stream.spans import TAG_PATTERNS, convert_tags, validate_scheme

FORMATS = ("conll", "gmb", "wnut")

PathLike = str | os.PathLike[str]

DOCSTART = "-DOCSTART-"
GMB_HEADER = ["Sentence #", "Word", "POS", "Tag"]
_GMB_SENTENCE = re.compile(r"Sentence: \d+")


@dataclass
class Sentence:
    """One sentence: its tokens and their IOB2 tags, of equal length."""

    tokens: list[str]
    tags: list[str]


class DatasetError(ValueError):
    """A malformed corpus line; the message names the file and the 1-based line number."""

    def __init__(self, path: PathLike, line: int, reason: str) -> None:
        self.path = str(path)
        self.line = line
        self.reason = reason
        super().__init__(f"{self.path}:{line}: {reason}")

    def __reduce__(self) -> tuple[type[DatasetError], tuple[str, int, str]]:
        # The default reduce would pass only the message back to __init__.
        return (type(self), (self.path, self.line, self.reason))


@dataclass
class _Builder:
    """Accumulates the tokens of the sentence being read, in the corpus's own scheme."""

    scheme: str
    tokens: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)

    def add(self, token: str, tag: str) -> None:
        self.tokens.append(token)
        self.tags.append(tag)

    def flush(self, into: list[Sentence]) -> None:
        """Append the pending sentence (if any) to ``into`` as IOB2, and start a new one."""
        if self.tokens:
            into.append(Sentence(self.tokens, convert_tags(self.tags, self.scheme, "iob2")))
        self.tokens, self.tags = [], []


def _check_tag(path: PathLike, line_no: int, tag: str, scheme: str) -> None:
    if not TAG_PATTERNS[scheme].fullmatch(tag):
        raise DatasetError(path, line_no, f"invalid {scheme.upper()} tag {tag!r}")


def _numbered_lines(path: PathLike, encoding: str) -> Iterator[tuple[int, str]]:
    """Yield ``(1-based line number, line without its end-of-line)``; CRLF is accepted too."""
    with open(path, encoding=encoding) as handle:
        for line_no, line in enumerate(handle, start=1):
            yield line_no, line.rstrip("\r\n")


def read_conll(path: PathLike, scheme: str = "iob1") -> list[Sentence]:
    """Read a CoNLL-2003 style file: one token per line, token first and NER tag last.

    Columns are whitespace-separated and every token line must have as many as the first one.
    Blank lines end sentences and ``-DOCSTART-`` lines are skipped. Tags are read in ``scheme``
    and returned as IOB2 (because conlleval's decoding reads IOB1 and IOB2 alike, an IOB2 file
    read with the default ``"iob1"`` comes out unchanged).
    """
    return [sentence for document in read_conll_documents(path, scheme) for sentence in document]


def read_conll_documents(path: PathLike, scheme: str = "iob1") -> list[list[Sentence]]:
    """`read_conll`, with the sentences grouped into documents at each ``-DOCSTART-`` line.

    Sentences before the first marker form a document of their own; a marker followed by no
    sentence gives no document. Raises :class:`DatasetError` as `read_conll` does.
    """
    scheme = validate_scheme(scheme)
    documents: list[list[Sentence]] = [[]]
    pending = _Builder(scheme)
    width: int | None = None
    for line_no, line in _numbered_lines(path, "utf-8"):
        columns = line.split()
        if not columns or columns[0] == DOCSTART:
            # A document marker also ends a sentence that was not closed by a blank line.
            pending.flush(documents[-1])
            if columns and documents[-1]:
                documents.append([])
            continue
        if width is None:
            if len(columns) < 2:
                raise DatasetError(path, line_no, "expected a token and a tag, found one column")
            width = len(columns)
        if len(columns) != width:
            raise DatasetError(path, line_no, f"expected {width} columns, found {len(columns)}")
        _check_tag(path, line_no, columns[-1], scheme)
        pending.add(columns[0], columns[-1])
    pending.flush(documents[-1])
    return [document for document in documents if document]


def read_wnut(path: PathLike) -> list[Sentence]:
    """Read a WNUT-17 file: ``token<TAB>tag`` lines in IOB2.

    A line holding only whitespace separates sentences: the training file uses a lone tab as
    often as an empty line there.
    """
    sentences: list[Sentence] = []
    pending = _Builder("iob2")
    for line_no, line in _numbered_lines(path, "utf-8"):
        if not line.strip():
            pending.flush(sentences)
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise DatasetError(path, line_no, f"expected token<TAB>tag, found {len(fields)} fields")
        token, tag = fields[0], fields[1].strip()
        if not token.strip():
            raise DatasetError(path, line_no, "empty token")
        _check_tag(path, line_no, tag, "iob2")
        pending.add(token, tag)
    pending.flush(sentences)
    return sentences


def _csv_rows(path: PathLike) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(1-based line number, fields)`` of a Latin-1 csv file."""
    # newline="" lets the csv module handle CRLF and quoted fields itself.
    with open(path, encoding="latin-1", newline="") as handle:
        reader = csv.reader(handle)
        for row in reader:
            # line_num counts physical lines read so far: the row's last line.
            yield reader.line_num, row


def _gmb_row(path: PathLike, line_no: int, row: list[str]) -> tuple[str, str, str]:
    """Validate one GMB data row and return its sentence marker, word and tag."""
    if len(row) != len(GMB_HEADER):
        raise DatasetError(path, line_no, f"expected {len(GMB_HEADER)} fields, found {len(row)}")
    marker, word, _pos, tag = row
    if marker and not _GMB_SENTENCE.fullmatch(marker):
        raise DatasetError(path, line_no, f"expected 'Sentence: N' or an empty field: {marker!r}")
    if not word:
        raise DatasetError(path, line_no, "empty word")
    _check_tag(path, line_no, tag, "iob2")
    return marker, word, tag


def read_gmb(path: PathLike) -> list[Sentence]:
    """Read the Kaggle GMB ``ner_dataset.csv`` layout (Latin-1, CRLF, IOB2).

    The header must be ``Sentence #,Word,POS,Tag``. A row whose first field is ``Sentence: N``
    starts a sentence and rows with an empty first field continue it.
    """
    sentences: list[Sentence] = []
    pending = _Builder("iob2")
    rows = _csv_rows(path)
    header_line, header = next(rows, (1, []))
    if header != GMB_HEADER:
        raise DatasetError(path, header_line, f"expected the header {','.join(GMB_HEADER)}")
    for line_no, row in rows:
        if not row:
            continue  # a blank line carries nothing in csv
        marker, word, tag = _gmb_row(path, line_no, row)
        if marker:
            pending.flush(sentences)
        elif not pending.tokens:
            raise DatasetError(path, line_no, "token row before the first 'Sentence: N' row")
        pending.add(word, tag)
    pending.flush(sentences)
    return sentences


_READERS: dict[str, Callable[[PathLike], list[Sentence]]] = {
    "conll": read_conll,
    "gmb": read_gmb,
    "wnut": read_wnut,
}


def load_corpus(path: PathLike, fmt: str) -> list[Sentence]:
    """Read ``path`` with the reader for ``fmt`` (one of :data:`FORMATS`)."""
    reader = _READERS.get(fmt)
    if reader is None:
        raise ValueError(f"unknown corpus format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return reader(path)


def corpus_stats(sentences: Iterable[Sentence]) -> dict[str, int]:
    """Counts for logging: sentences, tokens and IOB2 entities."""
    n_sentences = n_tokens = n_entities = 0
    for sentence in sentences:
        n_sentences += 1
        n_tokens += len(sentence.tokens)
        n_entities += sum(tag.startswith("B-") for tag in sentence.tags)
    return {"sentences": n_sentences, "tokens": n_tokens, "entities": n_entities}
