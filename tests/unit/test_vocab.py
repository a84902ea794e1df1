"""Vocabularies: how tokens become word, character and casing ids."""

from __future__ import annotations

import pytest

from ner_stream.vocab import Vocab, Vocabularies, digit_form, word_key
from tests.fakes import CHARS

WORDS = ["<PAD>", "<UNK>", "angela", "merkel", "berlin"]


@pytest.fixture
def vocabs() -> Vocabularies:
    return Vocabularies(Vocab(WORDS), Vocab(CHARS), Vocab(["O", "S-PER"]))


@pytest.mark.parametrize(
    "fmt", ["\u00ad", "\u2060", "\u200b", "\u200c", "\u200d", "\ufeff", "\u200e", "\u202a"]
)
def test_a_word_with_format_characters_encodes_like_the_plain_word(vocabs, fmt):
    plain = ["Angela", "Merkel", "BERLIN", "x"]
    marked = [f"Ange{fmt}la", f"{fmt}Mer{fmt}{fmt}kel", f"BER{fmt}LIN", f"x{fmt}"]
    got, want = vocabs.encode(marked), vocabs.encode(plain)
    assert got.words == want.words == [2, 3, 4, 1]
    assert got.chars == want.chars
    assert got.cases == want.cases


def test_word_key_leaves_out_format_characters():
    assert word_key("Ange\u00adla") == "angela"
    assert word_key("Ange\u00adla", lowercase=False) == "Angela"
    assert word_key("Angela") == "angela"


def _backoff_vocabs(backoff: bool, lowercase: bool = True) -> Vocabularies:
    words = ["<PAD>", "<UNK>", "1996", "0000", "00:00", "berlin", "Berlin"]
    return Vocabularies(
        Vocab(words), Vocab(CHARS), Vocab(["O"]), lowercase=lowercase, backoff=backoff
    )


def test_an_unknown_number_reads_as_its_digit_form_and_a_known_one_as_itself():
    vocabs = _backoff_vocabs(backoff=True)
    ids = vocabs.encode(["1996", "2031", "12:45", "7", "Berlin"]).words
    assert ids == [2, 3, 4, 1, 5]  # "7" -> "0", which the vocabulary lacks: <UNK>


def test_a_cased_vocabulary_backs_off_to_the_lowercase_form_then_the_digit_form():
    vocabs = _backoff_vocabs(backoff=True, lowercase=False)
    assert vocabs.encode(["Berlin", "BERLIN", "berlin", "1999"]).words == [6, 5, 5, 3]


def test_without_back_off_unknown_words_stay_unknown_as_older_models_were_scored():
    vocabs = _backoff_vocabs(backoff=False)
    assert vocabs.encode(["2031", "12:45", "1996"]).words == [1, 1, 2]


def test_the_back_off_setting_survives_the_model_file_and_defaults_off_for_older_files():
    for backoff in (True, False):
        data = _backoff_vocabs(backoff=backoff).to_dict()
        assert Vocabularies.from_dict(data).backoff is backoff
    older = _backoff_vocabs(backoff=True).to_dict()
    del older["backoff"]
    assert Vocabularies.from_dict(older).backoff is False


def test_digit_form_replaces_every_decimal_digit():
    assert digit_form("12:45") == "00:00"
    assert digit_form("a1b2") == "a0b0"
    assert digit_form("abc") == "abc"
