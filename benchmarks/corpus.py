"""A fixed, seeded synthetic corpus of news-like documents, shared by every benchmark.

Documents are built from word lists in this file only (no data from outside the repository):
people, places, organisations, numbers, dates, quotes and punctuation, in sentences of 4 to about
60 tokens and documents of 1 to 30 sentences, most of them short, as in a news feed. The same
seed always gives the same documents, so every benchmark (the model core, end to end, spaCy)
sees the same texts. Standard library only: the spaCy benchmark imports it from its own venv.

    python -m benchmarks.corpus --docs 1000 --out docs.jsonl   # JSONL for `ner-stream produce`

Two kinds: `short` (the feed above, about 70 words per document) and `long`: news articles of
about 180 words (150 to 210), a dateline and paragraphs of two or three sentences separated by a
blank line, drawn from the same word lists.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterator

DEFAULT_SEED = 20240601
MAX_SENTENCES = 30

FIRST_NAMES = (
    "Angela", "Boris", "Carlos", "Daniela", "Emeka", "Fatima", "Gerhard", "Hiroshi", "Ingrid",
    "Jacques", "Kofi", "Lucia", "Mikhail", "Nadia", "Oliver", "Priya", "Rafael", "Sofia", "Tomas",
    "Ursula", "Viktor", "Wei", "Xavier", "Yasmin", "Zoltan", "Margaret", "Ahmed", "Elena", "Paolo",
    "Kwame", "Ana", "Hans", "Chen", "Olga", "Juan", "Aisha", "Pieter", "Marta", "Ivan", "Leila",
)  # fmt: skip
LAST_NAMES = (
    "Schmidt", "Okafor", "Tanaka", "Moreau", "Petrov", "Silva", "Johansson", "Nakamura", "Rossi",
    "Kowalski", "Haddad", "Fernandez", "Mensah", "Novak", "Andersen", "Gupta", "Dubois", "Yilmaz",
    "Papadopoulos", "Lindqvist", "Mbeki", "Castillo", "Weber", "Hoffmann", "Kim", "Nguyen",
    "O'Brien", "van der Berg", "Al-Masri", "Kuznetsova", "Bauer", "Costa", "Eriksen", "Horvath",
)  # fmt: skip
TITLES = (
    "President", "Prime Minister", "Minister", "Chancellor", "Senator", "Governor", "Mayor",
    "coach", "striker", "chief executive", "spokesman", "spokeswoman", "analyst", "Judge",
)  # fmt: skip
CITIES = (
    "London", "Paris", "Berlin", "Madrid", "Rome", "Moscow", "Tokyo", "Beijing", "Cairo",
    "Nairobi", "Lagos", "Sydney", "Toronto", "Chicago", "New York", "Los Angeles", "Sao Paulo",
    "Buenos Aires", "Mumbai", "Jakarta", "Istanbul", "Warsaw", "Vienna", "Prague", "Brussels",
    "Amsterdam", "Stockholm", "Oslo", "Helsinki", "Dublin", "Lisbon", "Athens", "Seoul", "Manila",
    "Frankfurt", "Geneva", "Zurich", "Johannesburg", "Mexico City", "Bangkok",
)  # fmt: skip
COUNTRIES = (
    "Germany", "France", "Spain", "Italy", "Russia", "Japan", "China", "Egypt", "Kenya",
    "Nigeria", "Australia", "Canada", "Brazil", "Argentina", "India", "Indonesia", "Turkey",
    "Poland", "Austria", "Belgium", "the Netherlands", "Sweden", "Norway", "Finland", "Ireland",
    "Portugal", "Greece", "South Korea", "the Philippines", "Switzerland", "South Africa",
    "Mexico", "Thailand", "the United States", "Britain", "Ukraine", "Chile", "Peru", "Ghana",
)  # fmt: skip
ORGS = (
    "the United Nations", "the European Union", "NATO", "the World Bank", "the IMF", "Reuters",
    "Siemens", "Volkswagen", "Toyota", "Deutsche Bank", "Barclays", "Nestle", "Shell", "BP",
    "Microsoft", "Apple", "Boeing", "Airbus", "Fiat", "Unilever", "Philips", "Ericsson", "Nokia",
    "Manchester United", "Real Madrid", "Bayern Munich", "Ajax", "Juventus", "the Red Cross",
    "Greenpeace", "the Bundesbank", "the Federal Reserve", "OPEC", "FIFA", "UEFA", "Interpol",
    "General Motors", "Samsung", "Sony", "Petrobras", "Gazprom", "the World Health Organisation",
)  # fmt: skip
NATIONALITIES = (
    "German", "French", "Spanish", "Italian", "Russian", "Japanese", "Chinese", "Egyptian",
    "Kenyan", "Nigerian", "Australian", "Canadian", "Brazilian", "Indian", "Turkish", "Polish",
    "Dutch", "Swedish", "Norwegian", "Irish", "Greek", "Korean", "Swiss", "Mexican", "British",
    "American", "European", "African", "Asian",
)  # fmt: skip
EVENTS = (
    "the Olympic Games", "the World Cup", "the Champions League", "Wimbledon", "the Tour de France",
    "the G7 summit", "the Davos forum", "the Frankfurt motor show", "the Cannes film festival",
)  # fmt: skip
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)  # fmt: skip
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
SAID = ("said", "told reporters", "announced", "confirmed", "added", "warned", "wrote")
VERBS = (
    "met", "criticised", "praised", "visited", "signed a deal with", "held talks with",
    "beat", "lost to", "drew with", "bought", "sold", "sued", "joined", "left", "called on",
    "appointed", "rejected an offer from", "agreed to buy", "welcomed",
)  # fmt: skip
NOUNS = (
    "profit", "shares", "talks", "elections", "growth", "inflation", "exports", "spending",
    "sales", "turnover", "output", "demand", "earnings", "wages", "prices", "attendance",
    "investment", "orders", "revenue", "debt", "unemployment",
)  # fmt: skip
ADJECTIVES = (
    "strong", "weak", "unexpected", "record", "slow", "sharp", "modest", "narrow", "key",
    "final", "first", "new", "joint", "annual", "quarterly", "surprise", "long-awaited",
)  # fmt: skip
FILLERS = (
    "on the other hand", "according to officials", "in a statement", "earlier this year",
    "for the third time", "despite heavy rain", "after a long delay", "in the second half",
    "by a wide margin", "at the end of the week", "as expected", "in early trading",
)  # fmt: skip


class _Writer:
    """Sentence pieces drawn from the word lists with one seeded random generator."""

    def __init__(self, rng: random.Random) -> None:
        self.r = rng

    def person(self) -> str:
        r = self.r
        name = f"{r.choice(FIRST_NAMES)} {r.choice(LAST_NAMES)}"
        roll = r.random()
        if roll < 0.3:
            return f"{r.choice(TITLES)} {name}"
        if roll < 0.4:
            return f"{name[0]}. {r.choice(LAST_NAMES)}"
        return name

    def place(self) -> str:
        return self.r.choice(CITIES) if self.r.random() < 0.55 else self.r.choice(COUNTRIES)

    def org(self) -> str:
        return self.r.choice(ORGS)

    def entity(self) -> str:
        roll = self.r.random()
        if roll < 0.4:
            return self.person()
        if roll < 0.7:
            return self.org()
        if roll < 0.95:
            return self.place()
        return self.r.choice(EVENTS)

    def number(self) -> str:
        r = self.r
        roll = r.random()
        if roll < 0.25:
            return f"{r.randint(2, 99)}"
        if roll < 0.45:
            return f"{r.randint(1, 999)},{r.randint(0, 999):03d}"
        if roll < 0.6:
            return f"{r.randint(0, 99)}.{r.randint(0, 99):02d} percent"
        if roll < 0.75:
            return f"${r.randint(1, 900)} million"
        if roll < 0.85:
            return f"{r.randint(0, 6)}-{r.randint(0, 6)}"
        return f"{r.randint(1, 28)} {r.choice(MONTHS)} {r.randint(1990, 2024)}"

    def when(self) -> str:
        r = self.r
        roll = r.random()
        if roll < 0.4:
            return f"on {r.choice(DAYS)}"
        if roll < 0.7:
            return f"in {r.choice(MONTHS)}"
        return f"on {r.choice(MONTHS)} {r.randint(1, 28)}"

    def clause(self) -> str:
        r = self.r
        kind = r.randrange(7)
        if kind == 0:
            return f"{self.entity()} {r.choice(VERBS)} {self.entity()} in {self.place()}"
        if kind == 1:
            return f"{r.choice(ADJECTIVES)} {r.choice(NOUNS)} rose to {self.number()} {self.when()}"
        if kind == 2:
            return f"the {r.choice(NATIONALITIES)} side {r.choice(VERBS)} {self.entity()}"
        if kind == 3:
            return (
                f"{self.org()} reported {r.choice(ADJECTIVES)} {r.choice(NOUNS)} of {self.number()}"
            )
        if kind == 4:
            return (
                f"{self.person()} {r.choice(SAID)} {self.when()} that {r.choice(NOUNS)} would fall"
            )
        if kind == 5:
            return f"{r.choice(FILLERS)}, {self.entity()} {r.choice(VERBS)} {self.entity()}"
        return f"{r.choice(NOUNS)} in {self.place()} {self.when()} were {r.choice(ADJECTIVES)}"

    def sentence(self) -> str:
        r = self.r
        # 1 clause most of the time, up to 5 joined: about 6 to 60 tokens.
        n = min(5, 1 + int(r.expovariate(1.0)))
        parts = [self.clause() for _ in range(n)]
        joiners = (", and ", ", while ", "; ", ", but ", " after ", " because ")
        text = parts[0]
        for p in parts[1:]:
            text += r.choice(joiners) + p
        roll = r.random()
        if roll < 0.15:
            text = f'"{text[0].upper()}{text[1:]}," {self.person()} {r.choice(SAID)}'
        elif roll < 0.22:
            text = f"{text} ({self.org()})"
        end = "?" if r.random() < 0.03 else "."
        return text[0].upper() + text[1:] + end

    def headline(self) -> str:
        r = self.r
        date = f"{r.randint(1990, 2024)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}"
        return f"{self.place().upper()} {date} -"


def num_sentences(rng: random.Random) -> int:
    """1 to 30, skewed to short documents (mean about 5)."""
    return min(MAX_SENTENCES, 1 + int(rng.expovariate(1 / 4.0)))


def document(index: int, seed: int = DEFAULT_SEED) -> dict:
    """Document number `index` of the corpus with `seed`: {"id", "text"}. Independent of others."""
    rng = random.Random(seed * 1_000_003 + index)
    w = _Writer(rng)
    sentences = [w.sentence() for _ in range(num_sentences(rng))]
    if rng.random() < 0.3:
        sentences[0] = f"{w.headline()} {sentences[0]}"
    sep = "\n" if rng.random() < 0.2 else " "
    return {"id": f"bench-{seed}-{index:07d}", "text": sep.join(sentences)}


def article(index: int, seed: int = DEFAULT_SEED) -> dict:
    """Article number `index` of the long corpus with `seed`: {"id", "text"}, about 180 words
    (sentences are added until a length drawn from 150 to 210 words is reached)."""
    rng = random.Random(seed * 1_000_033 + index)
    w = _Writer(rng)
    target = rng.randint(150, 210)
    paragraphs: list[list[str]] = [[]]
    words = 0
    while words < target:
        sentence = w.sentence()
        if not paragraphs[-1]:
            sentence = f"{w.headline()} {sentence}" if len(paragraphs) == 1 else sentence
        paragraphs[-1].append(sentence)
        words += len(sentence.split())
        if len(paragraphs[-1]) >= rng.randint(2, 3):
            paragraphs.append([])
    text = "\n\n".join(" ".join(p) for p in paragraphs if p)
    return {"id": f"article-{seed}-{index:07d}", "text": text}


KINDS = {"short": document, "long": article}


def documents(n: int, seed: int = DEFAULT_SEED, start: int = 0, kind: str = "short") -> list[dict]:
    """Documents `start` .. `start + n - 1` of the corpus of `kind` (`KINDS`)."""
    return list(iter_documents(n, seed, start, kind))


def iter_documents(
    n: int, seed: int = DEFAULT_SEED, start: int = 0, kind: str = "short"
) -> Iterator[dict]:
    make = KINDS[kind]
    for i in range(start, start + n):
        yield make(i, seed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--docs", type=int, default=1000)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--kind", choices=sorted(KINDS), default="short")
    p.add_argument("--out", default="-", help="JSONL file (default: stdout)")
    args = p.parse_args(argv)
    out = sys.stdout if args.out == "-" else open(args.out, "w", encoding="utf-8")  # noqa: SIM115
    try:
        for doc in iter_documents(args.docs, args.seed, kind=args.kind):
            out.write(json.dumps(doc, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
