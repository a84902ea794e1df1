"""Labelled documents as raw text, the span scorer of the raw-text evaluation, merged training."""

from __future__ import annotations

import random

import pytest

from ner_stream.vocab import EncodedSentence
from training.datasets import Sentence, read_conll, read_conll_documents
from training.evaluate import span_scores
from training.raw_text import detokenize, paragraph_groups, render, wrap
from training.trainer import merged_epoch


def _sentence(text: str, tags: str = "") -> Sentence:
    tokens = text.split()
    return Sentence(tokens, tags.split() if tags else ["O"] * len(tokens))


@pytest.mark.parametrize(
    ("tokens", "text"),
    [
        ("He said , yes .", "He said, yes."),
        ("Germany 's team does n't know ( yet ) .", "Germany's team doesn't know (yet)."),
        ("up 5 % at $ 3.5 [ sic ]", "up 5% at $3.5 [sic]"),
        ('He said " we won " and " so " .', 'He said "we won" and "so".'),
        ("Really ? ! Wow ; then : no", "Really?! Wow; then: no"),
        ("JONES 'S it 'll we 're", "JONES'S it'll we're"),
    ],
)
def test_detokenize_joins_tokens_the_usual_way(tokens, text):
    joined, starts = detokenize(tokens.split())
    assert joined == text
    for token, start in zip(tokens.split(), starts, strict=True):
        assert joined[start : start + len(token)] == token


def test_wrap_is_greedy_keeps_offsets_and_never_breaks_a_word():
    rng = random.Random(5)
    words = ["x" * rng.randint(1, 12) for _ in range(400)] + ["y" * 90, "z"]
    text = " ".join(words)
    wrapped = wrap(text, 72)
    assert len(wrapped) == len(text)
    assert wrapped.replace("\n", " ") == text
    lines = wrapped.split("\n")
    for line, following in zip(lines, lines[1:], strict=False):
        assert len(line) <= 72 or " " not in line
        # Greedy: the next line's first word would not have fitted.
        assert len(line) + 1 + len(following.split(" ")[0]) > 72
    assert "y" * 90 in lines


DOCUMENT = [
    _sentence("SOCCER - JAPAN WIN .", "O O B-LOC O O"),
    _sentence("TOKYO 1996-08-30", "B-LOC O"),
    _sentence('Jane Roe said " New York " is far .', "B-PER I-PER O O B-LOC I-LOC O O O O"),
]


@pytest.mark.parametrize("layout", ["lines", "paragraph", "wrapped"])
def test_render_maps_every_gold_entity_to_its_characters(layout):
    doc = render(DOCUMENT * 6, layout)
    found = [(doc.text[e.start : e.end], e.type) for e in doc.entities]
    one = [("JAPAN", "LOC"), ("TOKYO", "LOC"), ("Jane Roe", "PER"), ("New York", "LOC")]
    assert found == one * 6
    if layout == "lines":
        assert doc.text.split("\n")[:3] == [
            "SOCCER - JAPAN WIN.", "TOKYO 1996-08-30", 'Jane Roe said "New York" is far.'
        ]  # fmt: skip
    elif layout == "paragraph":
        assert "\n" not in doc.text
    else:
        assert doc.text.count("\n") >= 3 and max(map(len, doc.text.split("\n"))) <= 72


def test_render_refuses_an_unknown_layout():
    with pytest.raises(ValueError, match="unknown layout 'columns'"):
        render(DOCUMENT, "columns")


def test_paragraph_groups_are_the_sentences_the_splitter_joins():
    # "TOKYO 1996-08-30" has no final period: the splitter joins it to the next sentence, as
    # it joins the table rows; the headline ends with one and stands alone.
    doc = [
        *DOCUMENT,
        _sentence("Results :"),
        _sentence("Oslo 3 Lima 1"),
        _sentence("Perth 2 Quito 2"),
        _sentence("Done ."),
    ]
    assert paragraph_groups(doc) == [[1, 2], [3, 4, 5, 6]]
    assert paragraph_groups(DOCUMENT[:1]) == []


def test_read_conll_documents_groups_sentences_at_each_docstart(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(
        "Lone NN O O\n\n-DOCSTART- -X- O O\n\nA NN O I-PER\n\nB NN O O\n\n"
        "-DOCSTART- -X- O O\n\n-DOCSTART- -X- O O\n\nC NN O I-LOC\nD NN O I-LOC\n",
        encoding="utf-8",
    )
    documents = read_conll_documents(path)
    assert [[s.tokens for s in d] for d in documents] == [[["Lone"]], [["A"], ["B"]], [["C", "D"]]]
    assert documents[1][0].tags == ["B-PER"]
    assert read_conll(path) == [s for d in documents for s in d]


def test_span_scores_count_exact_matches_and_name_each_error_kind():
    texts = ["Jane Roe met the New\nYork team in Paris", "Oslo"]
    gold = [[(0, 8, "PER"), (17, 25, "ORG"), (34, 39, "LOC")], [(0, 4, "LOC")]]
    pred = [
        [(0, 4, "PER"), (17, 25, "LOC"), (34, 39, "LOC"), (9, 12, "MISC")],
        [],
    ]
    report, errors = span_scores(gold, pred, texts)
    assert (report.micro.gold, report.micro.predicted, report.micro.correct) == (4, 4, 1)
    assert report.per_type["LOC"].correct == 1 and report.per_type["LOC"].predicted == 2
    assert errors.wrong_boundary == 1  # "Jane" for "Jane Roe"
    assert errors.wrong_type == 1  # "New\nYork team" as LOC
    assert errors.spurious == 1  # "met"
    assert errors.missed == 1  # Oslo
    assert errors.crossing_line_break == 1
    with pytest.raises(ValueError, match="2 gold, 1 predicted"):
        span_scores(gold, pred[:1], texts)


def _encoded(n: int, tag: int) -> EncodedSentence:
    return EncodedSentence(words=[tag] * n, chars=[[tag]] * n, cases=[0] * n, tags=[tag] * n)


def test_merged_epoch_joins_groups_within_the_token_limit():
    data = [_encoded(n, i) for i, n in enumerate([3, 4, 5, 6, 7])]
    assert merged_epoch(data, [[1, 2, 3]], 0.0, 128, random.Random(1)) == data
    out = merged_epoch(data, [[1, 2, 3]], 1.0, 128, random.Random(1))
    assert sorted(map(len, out)) == [3, 7, 15]
    joined = next(s for s in out if len(s) == 15)
    assert joined.tags == [1] * 4 + [2] * 5 + [3] * 6
    assert len(joined.chars) == len(joined.cases) == 15
    # At most 10 tokens: the run is cut at the sentence boundaries (4 + 5, then 6).
    out = merged_epoch(data, [[1, 2, 3]], 1.0, 10, random.Random(1))
    assert sorted(map(len, out)) == [3, 6, 7, 9]
