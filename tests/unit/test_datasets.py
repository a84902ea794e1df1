"""Corpus readers on tiny hand-made files, including each corpus's quirks."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from training.datasets import (
    FORMATS,
    DatasetError,
    Sentence,
    load_corpus,
    read_conll,
    read_gmb,
    read_wnut,
)

CONLL = (
    "-DOCSTART- -X- O O\n"
    "\n"
    "EU NNP I-NP I-ORG\n"
    "rejects VBZ I-VP O\n"
    "German JJ I-NP I-MISC\n"
    "\n"
    "Peter NNP I-NP I-PER\n"
    "Blackburn NNP I-NP I-PER\n"
    "Smith NNP I-NP B-PER\n"
    "\n"
    "-DOCSTART- -X- O O\n"
    "\n"
    "BRUSSELS NNP I-NP I-LOC\n"
    "\n"
    "\n"
)


def _write(tmp_path: Path, name: str, text: str, newline: str = "\n") -> Path:
    path = tmp_path / name
    path.write_bytes(text.replace("\n", newline).encode("utf-8"))
    return path


def test_read_conll_converts_iob1_to_iob2(tmp_path: Path) -> None:
    sentences = read_conll(_write(tmp_path, "train.txt", CONLL))
    assert sentences == [
        Sentence(["EU", "rejects", "German"], ["B-ORG", "O", "B-MISC"]),
        Sentence(["Peter", "Blackburn", "Smith"], ["B-PER", "I-PER", "B-PER"]),
        Sentence(["BRUSSELS"], ["B-LOC"]),
    ]


def test_read_conll_accepts_crlf_and_two_columns(tmp_path: Path) -> None:
    crlf = read_conll(_write(tmp_path, "crlf.txt", CONLL, newline="\r\n"))
    assert crlf == read_conll(_write(tmp_path, "lf.txt", CONLL))
    two = read_conll(_write(tmp_path, "two.txt", "a B-X\nb I-X\n\nc O\n"), scheme="iob2")
    assert two == [Sentence(["a", "b"], ["B-X", "I-X"]), Sentence(["c"], ["O"])]


def test_read_conll_bioes(tmp_path: Path) -> None:
    path = _write(tmp_path, "bioes.txt", "a S-X\nb B-Y\nc E-Y\nd O\n")
    assert read_conll(path, scheme="bioes")[0].tags == ["B-X", "B-Y", "I-Y", "O"]


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        # Wrong column count against the first token line.
        ("a NN I-NP O\nb NN O\n", 2, "expected 4 columns, found 3"),
        # A stray one-column line.
        ("a NN I-NP O\n\nstray\n", 3, "expected 4 columns, found 1"),
        ("stray\n", 1, "found one column"),
        ("a NN I-NP O\nb NN I-NP X-PER\n", 2, "invalid IOB1 tag 'X-PER'"),
        ("a NN I-NP O\nb NN I-NP B-\n", 2, "invalid IOB1 tag 'B-'"),
        ("a NN I-NP O\nb NN I-NP S-PER\n", 2, "invalid IOB1 tag 'S-PER'"),
    ],
)
def test_read_conll_errors_name_file_and_line(
    tmp_path: Path, text: str, line: int, reason: str
) -> None:
    path = _write(tmp_path, "bad.txt", text)
    with pytest.raises(DatasetError) as caught:
        read_conll(path)
    assert caught.value.line == line
    assert str(caught.value).startswith(f"{path}:{line}: ")
    assert reason in str(caught.value)


def test_read_conll_rejects_unknown_scheme(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tag scheme"):
        read_conll(_write(tmp_path, "x.txt", "a O\n"), scheme="bilou")


def test_read_wnut_lone_tab_and_whitespace_separators(tmp_path: Path) -> None:
    text = (
        "@paulwalk\tO\n"
        "Empire\tB-location\n"
        "State\tI-location\n"
        "\t\n"  # the training file's lone-tab separator
        "Cats\tB-creative-work\n"
        "2\tI-creative-work\n"
        " \n"
        "zero\u200bwidth\tO\n"
        "\n"
    )
    sentences = read_wnut(_write(tmp_path, "wnut.conll", text))
    assert sentences == [
        Sentence(["@paulwalk", "Empire", "State"], ["O", "B-location", "I-location"]),
        Sentence(["Cats", "2"], ["B-creative-work", "I-creative-work"]),
        Sentence(["zero\u200bwidth"], ["O"]),
    ]


def test_read_wnut_normalises_entity_opened_by_i(tmp_path: Path) -> None:
    sentences = read_wnut(_write(tmp_path, "w.conll", "a\tO\nb\tI-person\nc\tI-person\n"))
    assert sentences[0].tags == ["O", "B-person", "I-person"]


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("a\tO\nb O\n", 2, "found 1 fields"),
        ("a\tO\n\nb\tO\textra\n", 3, "found 3 fields"),
        ("a\tO\nb\tE-person\n", 2, "invalid IOB2 tag 'E-person'"),
        ("\tO\n", 1, "empty token"),
    ],
)
def test_read_wnut_errors(tmp_path: Path, text: str, line: int, reason: str) -> None:
    path = _write(tmp_path, "bad.conll", text)
    with pytest.raises(DatasetError, match=reason) as caught:
        read_wnut(path)
    assert caught.value.line == line
    assert str(caught.value).startswith(f"{path}:{line}: ")


HEAD = b"Sentence #,Word,POS,Tag\r\nSentence: 1,a,DT,O\r\n"  # a header and a one-token sentence

GMB_BYTES = (
    b"Sentence #,Word,POS,Tag\r\n"
    b"Sentence: 1,Thousands,NNS,O\r\n"
    b",in,IN,O\r\n"
    b",Caf\xe9,NNP,B-geo\r\n"  # a Latin-1 byte, invalid as UTF-8
    b",Paris,NNP,I-geo\r\n"
    b',",",",",O\r\n'  # a quoted comma as the word
    b',"""",``,O\r\n'  # a quoted double quote
    b"Sentence: 2,Bush,NNP,B-per\r\n"
    b",spoke,VBD,O\r\n"
)


def test_read_gmb_latin1_crlf_and_quoting(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_bytes(GMB_BYTES)
    sentences = read_gmb(path)
    assert sentences == [
        Sentence(
            ["Thousands", "in", "Café", "Paris", ",", '"'],
            ["O", "O", "B-geo", "I-geo", "O", "O"],
        ),
        Sentence(["Bush", "spoke"], ["B-per", "O"]),
    ]


@pytest.mark.parametrize(
    ("data", "line", "reason"),
    [
        (b"Sentence,Word,POS,Tag\r\nSentence: 1,a,DT,O\r\n", 1, "expected the header"),
        (b"", 1, "expected the header"),
        # A stray continuation row before any sentence.
        (b"Sentence #,Word,POS,Tag\r\n,a,DT,O\r\n", 2, "before the first"),
        (HEAD + b",b,NN\r\n", 3, "expected 4 fields, found 3"),
        (HEAD + b",b,NN,geo\r\n", 3, "tag 'geo'"),
        (HEAD + b",b,NN,S-geo\r\n", 3, "S-geo"),
        (HEAD + b"Sentence 2,b,NN,O\r\n", 3, "Sentence"),
        (HEAD + b",,NN,O\r\n", 3, "empty word"),
    ],
)
def test_read_gmb_errors(tmp_path: Path, data: bytes, line: int, reason: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(data)
    with pytest.raises(DatasetError) as caught:
        read_gmb(path)
    assert caught.value.line == line
    assert str(caught.value).startswith(f"{path}:{line}: ")
    assert reason in str(caught.value)


def test_load_corpus_dispatch(tmp_path: Path) -> None:
    gmb = tmp_path / "g.csv"
    gmb.write_bytes(GMB_BYTES)
    conll = _write(tmp_path, "c.txt", CONLL)
    wnut = _write(tmp_path, "w.conll", "a\tB-person\n")
    assert FORMATS == ("conll", "gmb", "wnut")
    assert load_corpus(gmb, "gmb") == read_gmb(gmb)
    assert load_corpus(str(conll), "conll") == read_conll(conll)
    assert load_corpus(wnut, "wnut") == [Sentence(["a"], ["B-person"])]
    with pytest.raises(ValueError, match="'json'.*conll, gmb, wnut"):
        load_corpus(wnut, "json")


def test_dataset_error_is_value_error_and_pickles() -> None:
    error = DatasetError("data/x.txt", 12, "bad tag")
    assert isinstance(error, ValueError)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.path, copy.line, copy.reason, str(copy)) == (
        "data/x.txt",
        12,
        "bad tag",
        "data/x.txt:12: bad tag",
    )
