"""Vocabularies: how tokens become word, character and casing ids."""

from __future__ import annotations

import pytest

from ner_stream.vocab import Vocab, Vocabularies, word_key
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
