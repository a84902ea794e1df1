"""The packaged model through the worker's text path on small invented documents of each kind.

Each document is laid out as users send it (a byline and a dateline over a body, a headline, a
results table, a bulleted list, a hard-wrapped e-mail with a name across the wrap), and the test
asserts the entity spans found, the offset invariant, and that no entity runs across a line break
that is not a wrap.
"""

from __future__ import annotations

import pytest

from ner_stream.tagger import Tagger, TaggerOptions

BYLINE_AND_DATELINE = (
    "By Jane Roe\n"
    "LONDON 1996-08-30\n"
    "Shares of Example Group rose on Friday after the company said it would buy a rival."
)
HEADLINE_OVER_BODY = (
    "SOCCER - GERMANY BEAT ITALY IN FRIENDLY\n"
    "BERLIN 1996-08-30\n"
    "Germany beat Italy 2-1 in a friendly in Berlin on Wednesday."
)
RESULTS_TABLE = (
    "Results of the men's marathon in Berlin on Sunday:\n"
    "1. Paul Tergat (Kenya) 2:10.05\n"
    "2. Haile Gebrselassie (Ethiopia) 2:10.47\n"
    "3. Stefano Baldini (Italy) 2:11.02"
)
BULLETED_LIST = (
    "Speakers at the conference in Geneva:\n"
    "- Kofi Annan, United Nations\n"
    "- Bill Gates, Microsoft\n"
    "- Angela Merkel, Germany"
)
# Wrapped at 66 columns, as a mail client does: "New York" is cut by the wrap.
WRAPPED_EMAIL = (
    "Hello team,\n\n"
    "The quarterly review with our colleagues from the regional New\n"
    "York office will take place in Frankfurt, and Michael Schumacher\n"
    "will present the results of the Ferrari sponsorship.\n\n"
    "Best regards,\nJohn"
)

EXPECTED = {
    "byline": (BYLINE_AND_DATELINE, {("Jane Roe", "PER"), ("LONDON", "LOC"),
                                     ("Example Group", "ORG")}),
    "headline": (HEADLINE_OVER_BODY, {("GERMANY", "LOC"), ("ITALY", "LOC"), ("BERLIN", "LOC"),
                                      ("Germany", "LOC"), ("Italy", "LOC"), ("Berlin", "LOC")}),
    "table": (RESULTS_TABLE, {("Berlin", "LOC"), ("Paul Tergat", "PER"), ("Kenya", "LOC"),
                              ("Haile Gebrselassie", "PER"), ("Ethiopia", "LOC"),
                              ("Stefano Baldini", "PER"), ("Italy", "LOC")}),
    "list": (BULLETED_LIST, {("Geneva", "LOC"), ("Kofi Annan", "PER"), ("United Nations", "ORG"),
                             ("Bill Gates", "PER"), ("Microsoft", "ORG"),
                             ("Angela Merkel", "PER"), ("Germany", "LOC")}),
    "e-mail": (WRAPPED_EMAIL, {("New\nYork", "LOC"), ("Frankfurt", "LOC"),
                               ("Michael Schumacher", "PER"), ("Ferrari", "ORG")}),
}  # fmt: skip


@pytest.fixture(scope="module")
def tagger() -> Tagger:
    return Tagger.from_file(None, TaggerOptions(device="cpu", precision="fp32"))


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_entities_of_each_kind_of_document(tagger, kind):
    text, expected = EXPECTED[kind]
    entities = tagger.tag([text])[0]
    for e in entities:
        assert text[e.start : e.end] == e.text
    if kind == "e-mail":
        # Only the wrapped paragraph: salutations ("Hello team,", "Best regards,") are outside
        # the news the model was trained on, and it tags some of them as names.
        body = range(text.index("The quarterly"), text.index("\n\nBest"))
        entities = [e for e in entities if e.start in body]
    assert {(e.text, e.type) for e in entities} == expected
    if kind != "e-mail":  # only the e-mail has wraps; every other line break ends a sentence
        assert not any("\n" in e.text for e in entities)


def test_reading_line_breaks_as_spaces_runs_lines_together(tagger):
    # What `--line-breaks space` (the behaviour before line breaks were read) does to a byline
    # over a dateline: the two lines become one sequence.
    space = Tagger.from_file(None, TaggerOptions(device="cpu", line_breaks="space"))
    chunks = space.prepare(BYLINE_AND_DATELINE).windows
    assert [t.text for t in chunks[0]][:5] == ["By", "Jane", "Roe", "LONDON", "1996-08-30"]
    assert [t.text for t in tagger.prepare(BYLINE_AND_DATELINE).windows[0]] == ["By", "Jane", "Roe"]
