"""Vocabularies: words, characters and tags become integer ids.

Index 0 is always `<PAD>` and index 1 `<UNK>` for words and characters, as in the classic recipe.
The tag vocabulary has no specials: padded positions are masked out of loss and metrics, so they
never need a tag of their own.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ner_stream.text import visible_form

PAD = "<PAD>"
UNK = "<UNK>"
PAD_ID = 0
UNK_ID = 1

# Casing classes, looked up per token. The word embeddings are lowercase (GloVe), so casing reaches
# the model through the characters and through this small feature.
CASES = ("<PAD>", "other", "numeric", "mostly_numeric", "lower", "upper", "title", "has_digit")

# Characters past this many are not seen by the character encoder: long URLs and hashes would
# otherwise blow up the padded character tensor of a whole batch.
MAX_WORD_CHARS = 20

# Distinct tokens remembered by `Vocabularies.encode` (a few MB at most).
ENCODE_CACHE_SIZE = 50_000


@dataclass
class Vocab:
    """A bidirectional map between strings and ids."""

    itos: list[str]
    stoi: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary has duplicate entries")

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, item: str) -> bool:
        return item in self.stoi

    def id(self, item: str, default: int = UNK_ID) -> int:
        """The id of `item`, or `default` when it is unknown."""
        return self.stoi.get(item, default)

    @classmethod
    def build(
        cls,
        counts: Counter[str],
        min_count: int = 1,
        extra: Iterable[str] = (),
        specials: Sequence[str] = (PAD, UNK),
    ) -> Vocab:
        """Specials first, then items seen `min_count` times (most frequent first), then `extra`."""
        itos = list(specials)
        seen = set(itos)
        for item, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            if n >= min_count and item not in seen:
                itos.append(item)
                seen.add(item)
        for item in extra:
            if item not in seen:
                itos.append(item)
                seen.add(item)
        return cls(itos)


def word_key(token: str, lowercase: bool = True) -> str:
    """The form under which a token is looked up in the word vocabulary.

    Format characters (soft hyphens, zero-width spaces, ...) are left out: "Ange\\u00adla" is
    looked up as "angela".
    """
    token = visible_form(token)
    return token.lower() if lowercase else token


_DIGIT = re.compile(r"\d")


def digit_form(key: str) -> str:
    """`key` with every decimal digit replaced by "0" ("12:45" -> "00:00"): the back-off under
    which a number the vocabulary does not hold is looked up (Lample et al. 2016, section 4)."""
    return _DIGIT.sub("0", key)


def case_id(token: str) -> int:
    """The casing class of a token (index into CASES)."""
    digits = sum(c.isdigit() for c in token)
    if token.isdigit():
        return 2
    if digits / max(len(token), 1) > 0.5:
        return 3
    if token.islower():
        return 4
    if token.isupper():
        return 5
    if token[:1].isupper():
        return 6
    if digits:
        return 7
    return 1


@dataclass
class EncodedSentence:
    """One sentence as ids, ready to be padded into a batch."""

    words: list[int]
    chars: list[list[int]]
    cases: list[int]
    tags: list[int] | None = None

    def __len__(self) -> int:
        return len(self.words)


@dataclass
class Vocabularies:
    """Everything needed to turn tokens into ids and tag ids back into tags."""

    words: Vocab
    chars: Vocab
    tags: Vocab
    # Lowercase word lookup suits lowercase pretrained vectors, with casing carried by the
    # character and casing features; the classic recipe looks words up as they are.
    lowercase: bool = True
    # A word not in the vocabulary is looked up again lowercased, then with its digits as "0"
    # (`lookup`). Off for models trained before the back-off existed: their vocabularies hold
    # no digit forms, and their numbers read as <UNK> as they did when they were scored.
    backoff: bool = False
    # Token -> (word id, character ids, casing id). Text repeats its words, and encoding one
    # costs several microseconds of Python; the cache is dropped whole when it fills up.
    _cache: dict[str, tuple[int, list[int], int]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def encode(self, tokens: Sequence[str], tags: Sequence[str] | None = None) -> EncodedSentence:
        """Tokens (and optionally their tags) as ids; unknown tags are an error.

        Each token is read without its format characters (see `word_key`).

        The character id lists of equal tokens are one shared list: treat them as read-only.
        """
        cache = self._cache
        encoded = []
        for t in tokens:
            entry = cache.get(t)
            if entry is None:
                entry = self._encode_token(t)
                if len(cache) >= ENCODE_CACHE_SIZE:
                    cache.clear()
                cache[t] = entry
            encoded.append(entry)
        return EncodedSentence(
            words=[e[0] for e in encoded],
            chars=[e[1] for e in encoded],
            cases=[e[2] for e in encoded],
            tags=None if tags is None else [self.tags.stoi[t] for t in tags],
        )

    def _encode_token(self, token: str) -> tuple[int, list[int], int]:
        chars = self.chars.stoi
        # The word, its characters and its casing all without format characters, so that a word
        # with a soft hyphen or a zero-width space in it reads as the plain word.
        token = visible_form(token)
        return (
            self.word_id(token),
            [chars.get(c, UNK_ID) for c in token[:MAX_WORD_CHARS]],
            case_id(token),
        )

    def word_id(self, token: str) -> int:
        """The word id of a token: its key (`word_key`); with `backoff`, failing that its
        lowercase form, then that form with its digits as "0" (`digit_form`); else `UNK_ID`."""
        stoi = self.words.stoi
        key = word_key(token, self.lowercase)
        found = stoi.get(key)
        if found is not None or not self.backoff:
            return UNK_ID if found is None else found
        lower = key.lower()
        found = stoi.get(lower)
        if found is None:
            found = stoi.get(digit_form(lower), UNK_ID)
        return found

    def to_dict(self) -> dict:
        """Plain values, for the model file."""
        return {
            "words": self.words.itos,
            "chars": self.chars.itos,
            "tags": self.tags.itos,
            "lowercase": self.lowercase,
            "backoff": self.backoff,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Vocabularies:
        """Inverse of `to_dict`."""
        return cls(
            Vocab(data["words"]),
            Vocab(data["chars"]),
            Vocab(data["tags"]),
            lowercase=data.get("lowercase", True),
            backoff=data.get("backoff", False),
        )
