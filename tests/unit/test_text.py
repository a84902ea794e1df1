"""Tokeniser, sentence splitter and chunker: CoNLL conventions and the offset invariant."""

from __future__ import annotations

import random
import unicodedata

import pytest

from ner_stream.text import (
    Token,
    document_windows,
    split_sentences,
    tokenize,
    visible_form,
)


def _texts(text: str) -> list[str]:
    return [token.text for token in tokenize(text)]


def _assert_offsets(text: str, tokens: list[Token]) -> None:
    """Every token maps back to the text; tokens are ordered, disjoint and never whitespace."""
    previous_end = 0
    for token in tokens:
        assert text[token.start : token.end] == token.text
        assert token.text
        assert not any(ch.isspace() for ch in token.text)
        assert token.start >= previous_end
        previous_end = token.end


def _is_skippable(ch: str) -> bool:
    # Characters the tokeniser may leave out: whitespace, controls, invisible format characters.
    return ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "EU rejects German call to boycott British lamb.",
            "EU rejects German call to boycott British lamb .",
        ),
        ("He doesn't know.", "He does n't know ."),
        ("They can't, won't, aren't", "They ca n't , wo n't , are n't"),
        ("we're I'm you'll they've he'd", "we 're I 'm you 'll they 've he 'd"),
        (
            "Germany's and JONES'S and players' shirts",
            "Germany 's and JONES 'S and players ' shirts",
        ),
        ("O'Brien's rock'n'roll", "O'Brien 's rock'n'roll"),
        ("the German-born 1996-08-22 score 6-4", "the German-born 1996-08-22 score 6-4"),
        ("1,000 3.5 2:29.34 1/2 1996/97", "1,000 3.5 2:29.34 1/2 1996/97"),
        ("$1,000 and US$5 and C$10 and 5%", "$ 1,000 and US$ 5 and C$ 10 and 5 %"),
        ("(Reuters) said: yes; no?! ok", "( Reuters ) said : yes ; no ? ! ok"),
        ('He said "hello" and “bye” and ‘so’', 'He said " hello " and “ bye ” and ‘ so ’'),
        ("U.S. U.N. a.m. p.m. F.B.I.", "U.S. U.N. a.m. p.m. F.B.I."),
        (
            "Mr. Smith and Dr. Jones of Acme Inc. vs. Apex Corp.",
            "Mr. Smith and Dr. Jones of Acme Inc. vs. Apex Corp.",
        ),
        ("J. R. R. Tolkien wrote", "J. R. R. Tolkien wrote"),
        ("Plan B. and then", "Plan B . and then"),
        ("see https://example.com/a?b=1. Then", "see https://example.com/a?b=1 . Then"),
        ("(www.example.org/x)", "( www.example.org/x )"),
        ("mail j.doe+news@mail.example.co.uk, now", "mail j.doe+news@mail.example.co.uk , now"),
        ("@reuters_bot says #NLP2024 rocks", "@reuters_bot says #NLP2024 rocks"),
        ("S&P 500 and AT&T", "S&P 500 and AT&T"),
        ("wait... what -- really", "wait ... what -- really"),
        ("+44 20 and .500 average", "+44 20 and .500 average"),
        ("1. Sampras (U.S.)", "1. Sampras ( U.S. )"),
        ("in 1996.", "in 1996 ."),
        ("Iraq 's reply", "Iraq 's reply"),  # a clitic already split off by spaces
        ("does n't", "does n't"),
    ],
)
def test_conll_conventions(text: str, expected: str) -> None:
    assert _texts(text) == expected.split(" ")


def test_curly_apostrophes_behave_like_straight_ones() -> None:
    assert _texts("doesn’t O’Brien’s") == ["does", "n’t", "O’Brien", "’s"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("São Paulo Zoë Ångström", ["São", "Paulo", "Zoë", "Ångström"]),
        ("cafe\u0301 noir", ["cafe\u0301", "noir"]),  # decomposed accent stays in its word
        ("हिन्दी भाषा", ["हिन्दी", "भाषा"]),  # vowel signs are combining marks
        # Marks outside the BMP too (Brahmi vowel sign, musical stem, variation selector 17)
        ("\U00011013\U00011038\U0001102b pad", ["\U00011013\U00011038\U0001102b", "pad"]),
        ("word\U0001d165 next", ["word\U0001d165", "next"]),
        ("#tag\U000e0100 x", ["#tag\U000e0100", "x"]),
        ("北京大学 in Tokyo", ["北", "京", "大", "学", "in", "Tokyo"]),
        ("서울 시청", ["서울", "시청"]),  # Korean separates words with spaces
        ("ok 👍🏽 👨\u200d👩\u200d👧 🇫🇷 ❤️", ["ok", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "❤️"]),
        # Format characters inside a word keep it whole; at its edges they are skipped.
        (
            "zero\u200bwidth soft\u00adhyphen \ufeffbom\x00nul",
            ["zero\u200bwidth", "soft\u00adhyphen", "bom", "nul"],
        ),
        # A subdivision flag: black flag, tag letters "gbsct", cancel tag.
        (
            "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f ok",
            ["\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f", "ok"],
        ),
    ],
)
def test_unicode(text: str, expected: list[str]) -> None:
    tokens = tokenize(text)
    _assert_offsets(text, tokens)
    assert [t.text for t in tokens] == expected


# Format characters that are invisible to the tokenizer, and those it reads as combining marks.
_INVISIBLES = ["\u00ad", "\u2060", "\u200b", "\ufeff", "\u200e", "\u202a", "\u2066", "\u180e"]
_JOINERS = ["\u200c", "\u200d"]


def test_soft_hyphens_keep_names_whole() -> None:
    text = "Chancellor Ange\u00adla Mer\u00adkel visited Ber\u00adlin"
    assert tokenize(text) == [
        Token("Chancellor", 0, 10),
        Token("Ange\u00adla", 11, 18),
        Token("Mer\u00adkel", 19, 26),
        Token("visited", 27, 34),
        Token("Ber\u00adlin", 35, 42),
    ]


@pytest.mark.parametrize("fmt", _INVISIBLES + _JOINERS)
def test_a_format_character_inside_a_word_stays_in_it(fmt: str) -> None:
    text = f"in Ber{fmt}lin{fmt}er {fmt}{fmt} Stra{fmt}{fmt}sse."
    tokens = tokenize(text)
    _assert_offsets(text, tokens)
    assert [t.text for t in tokens] == ["in", f"Ber{fmt}lin{fmt}er", f"Stra{fmt}{fmt}sse", "."]
    assert [visible_form(t.text) for t in tokens] == ["in", "Berliner", "Strasse", "."]


@pytest.mark.parametrize("fmt", _INVISIBLES)
def test_a_format_character_alone_or_at_a_word_edge_makes_no_token(fmt: str) -> None:
    assert tokenize(fmt) == []
    assert tokenize(f" {fmt} {fmt}{fmt}\n") == []
    text = f"{fmt}Paris{fmt} {fmt} ({fmt}Lyon{fmt}){fmt}.{fmt}"
    tokens = tokenize(text)
    _assert_offsets(text, tokens)
    assert [t.text for t in tokens] == ["Paris", "(", "Lyon", ")", "."]
    assert tokens[0] == Token("Paris", 1, 6)


def test_invisible_format_characters_do_not_change_the_tokens() -> None:
    # Sprinkled anywhere into texts, they leave the same tokens, each with its own format
    # characters inside (never at an edge) and the offsets still exact.
    rng = random.Random(11)
    texts = ["He doesn't know. Mr. Smith paid $1,000 (Reuters) at 10 a.m.",
             "1. Sampras (U.S.) -- see https://example.com/a?b=1. Then @bot #tag",
             "Grüße aus Zürich, sagte Peter zu 王小明 in 東京. 👍🏽 ok"]  # fmt: skip
    for _ in range(200):
        plain = rng.choice(texts)
        chars = list(plain)
        for _ in range(rng.randrange(1, 6)):
            chars.insert(rng.randrange(len(chars) + 1), rng.choice(_INVISIBLES))
        text = "".join(chars)
        tokens = tokenize(text)
        _assert_offsets(text, tokens)
        assert [visible_form(t.text) for t in tokens] == [t.text for t in tokenize(plain)]
        assert not any({t.text[0], t.text[-1]} & set(_INVISIBLES) for t in tokens)


def test_visible_form() -> None:
    assert visible_form("Ange\u00adla") == "Angela"
    assert visible_form("a\u200b\u200c\u200d\u2060\ufeff\u200e\u202ab") == "ab"
    assert visible_form("Angela") == "Angela"
    assert visible_form("Zürich") == "Zürich"
    assert visible_form("\u00ad") == "\u00ad"  # nothing visible: left as it is


def test_offsets_of_a_simple_text() -> None:
    text = "  Hi,\tJöhn!\n"
    assert tokenize(text) == [
        Token("Hi", 2, 4),
        Token(",", 4, 5),
        Token("Jöhn", 6, 10),
        Token("!", 10, 11),
    ]


def test_empty_and_blank_texts() -> None:
    assert tokenize("") == []
    assert tokenize(" \t\n\r\u00a0\u3000 ") == []
    assert document_windows("") == []
    assert document_windows("   \n\n  ") == []


# Characters for generated texts: ASCII, punctuation the rules care about, accents, combining marks,
# CJK, Hangul, Devanagari, emoji parts, whitespace of all kinds, controls and format characters.
_ALPHABET = (
    "aAzZ09 .,;:!?'\"-/&$%@#+()[]{}*_=~<>"
    "éÅøßñçŁ\u0301\u0308ǅ"
    "北京東ひカ서울हि\u093f\u094d"
    "😀👍\U0001f3fd\u200d\ufe0f🇫🇷\u20e3"
    "\t\n\r\x0b\x0c \u00a0\u2028\u2029\u3000"
    "\x00\x07\x1f\x7f\u00ad\u200b\u200e\ufeff’‘“”…–—"
)
_WORDS = ["http://x.org/a.b", "www.ex.com", "a@b.co", "U.S.", "Mr.", "doesn't", "1,000.5", "J."]


def _random_text(rng: random.Random, length: int) -> str:
    parts: list[str] = []
    while len(parts) < length:
        if rng.random() < 0.1:
            parts.append(rng.choice(_WORDS))
        elif rng.random() < 0.05:
            parts.append(chr(rng.randrange(0x20, 0x30000)))  # anything, incl. unassigned/surrogate
        else:
            parts.append(rng.choice(_ALPHABET))
    return "".join(parts)


def test_offset_invariant_on_random_texts() -> None:
    rng = random.Random(20240501)
    for _ in range(2000):
        text = _random_text(rng, rng.randrange(0, 80))
        tokens = tokenize(text)
        _assert_offsets(text, tokens)
        covered = {i for token in tokens for i in range(token.start, token.end)}
        # Nothing visible is dropped: what no token covers is whitespace or invisible.
        assert all(_is_skippable(ch) for i, ch in enumerate(text) if i not in covered)


def test_chunks_cover_all_tokens_in_order_on_random_texts() -> None:
    rng = random.Random(7)
    for _ in range(500):
        text = _random_text(rng, rng.randrange(0, 200))
        max_tokens = rng.randrange(1, 12)
        chunks = document_windows(text, max_tokens=max_tokens)
        assert all(1 <= len(chunk) <= max_tokens for chunk in chunks)
        assert [t for chunk in chunks for t in chunk] == tokenize(text)


def _sentences(text: str) -> list[str]:
    return [
        " ".join(t.text for t in sentence) for sentence in split_sentences(tokenize(text), text)
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("One. Two! Three? Four", ["One .", "Two !", "Three ?", "Four"]),
        (
            "Mr. Smith went to the U.S. Open. He won.",
            ["Mr. Smith went to the U.S. Open .", "He won ."],
        ),
        ("J. Smith came. Dr. Who left.", ["J. Smith came .", "Dr. Who left ."]),
        ('He said "Go." Then he left.', ['He said " Go . "', "Then he left ."]),
        ("It rose (sharply.) Then fell.", ["It rose ( sharply . )", "Then fell ."]),
        ('Done. "Really?" she asked.', ["Done .", '" Really ? " she asked .']),
        ("And then... he left. Next", ["And then ... he left .", "Next"]),
        ("Wow?! Yes.", ["Wow ? !", "Yes ."]),
        ("Headline without stop\n\nBody text here", ["Headline without stop", "Body text here"]),
        ("line one\r\n\r\nline two\nsame", ["line one", "line two same"]),
        ("Version 2.5 is out. ok", ["Version 2.5 is out . ok"]),
        ("東京に行った。大阪も。", ["東 京 に 行 っ た 。", "大 阪 も 。"]),
    ],
)
def test_split_sentences(text: str, expected: list[str]) -> None:
    assert _sentences(text) == expected


def test_split_sentences_of_nothing() -> None:
    assert split_sentences([], "") == []


def test_long_sentence_is_windowed_with_offsets_into_the_document() -> None:
    words = [f"W{i}" for i in range(300)]
    text = "Intro. " + " ".join(words) + ". Outro."
    chunks = document_windows(text, max_tokens=128)
    assert [len(c) for c in chunks] == [2, 128, 128, 45, 2]
    for chunk in chunks:
        _assert_offsets(text, chunk)
    assert [t.text for t in chunks[1]] == words[:128]


def test_window_prefers_a_cut_after_a_comma() -> None:
    words = [f"w{i}" for i in range(20)]
    words[6] = ","
    chunks = document_windows(" ".join(words), max_tokens=8)
    assert [len(c) for c in chunks] == [7, 8, 5]
    assert chunks[0][-1].text == ","


def test_invalid_max_tokens() -> None:
    with pytest.raises(ValueError):
        document_windows("text", max_tokens=0)


@pytest.mark.parametrize(
    "unit",
    [
        "The European Commission said on Thursday it disagreed with German advice, "
        "doesn't it? U.S. shares rose 1.5% to $1,000 (Reuters). ",
        "Paragraph\n\n",  # many tiny sentences
        "x" * 999 + " ",  # long words
    ],
)
def test_one_megabyte_document(unit: str) -> None:
    text = (unit * (1_000_000 // len(unit) + 1))[:1_000_000]
    chunks = document_windows(text, max_tokens=128)
    assert chunks
    assert all(1 <= len(chunk) <= 128 for chunk in chunks)
    _assert_offsets(text, [token for chunk in chunks for token in chunk])


# Inputs that would be slow with a backtracking-prone pattern. Sizes are kept moderate so that the
# suite stays quick: one token per character costs about as much as a large document.
@pytest.mark.parametrize(
    "text",
    [
        "a@" + "b" * 200_000,  # e-mail prefix without a domain
        "http://" + "a." * 200_000,  # URL ending in punctuation
        "a." * 200_000,
        "1," * 200_000,
        "-a" * 200_000,
        "'a" * 200_000,
        ("x" * 60 + "@") * 5_000,
        "@" * 200_000,  # one token per character, one sentence
        "北京" * 100_000,
        "A. " * 70_000,
        "a\u00ad" * 200_000,  # one word broken by format characters everywhere
        "a \u200b" * 70_000,  # format characters between the words
    ],
)
def test_pathological_inputs_finish(text: str) -> None:
    chunks = document_windows(text)
    assert chunks
    assert all(len(chunk) <= 128 for chunk in chunks)
    _assert_offsets(text, [token for chunk in chunks for token in chunk])


def _sentence_texts(text: str, line_breaks: str = "auto") -> list[str]:
    """Each sentence as the text it covers, for asserting where sentences end."""
    sentences = split_sentences(tokenize(text), text, line_breaks)
    for sentence in sentences:
        _assert_offsets(text, sentence)
    return [text[s[0].start : s[-1].end] for s in sentences]


BYLINE_AND_DATELINE = "Jane Roe\nLONDON 1996-08-30\nShares of Example Group rose on Friday."
HEADLINE_OVER_BODY = (
    "EXAMPLE BANK PROFIT RISES\nFRANKFURT (Reuters) - Example Bank said on Tuesday its profit rose."
)
RESULTS_TABLE = (
    "Results of the men's marathon on Sunday:\n1. Jane Roe (Kenya) 2:10.05\n"
    "2. John Doe (Ethiopia) 2:10.47\n3. Max Mustermann (Germany) 2:11.02"
)
BULLETED_LIST = (
    "Attendees:\n- Jane Roe, Example Group\n- John Doe, Acme Corp\n* Max Mustermann\n"
    "• Erika Musterfrau"
)
# Wrapped at 66 columns by a mail client (textwrap.fill): "New\nYork" is cut by the wrap.
WRAPPED_EMAIL = (
    "Hello team,\n\nThe quarterly review with our colleagues from the regional New\n"
    "York office will take place in the main building in Jane Roe's\n"
    "conference room on Thursday, and the minutes will be sent to\n"
    "everyone who could not attend in person.\n\n"
    "Best regards,\nJohn"
)


def test_each_line_of_a_byline_dateline_and_body_is_a_sentence():
    assert _sentence_texts(BYLINE_AND_DATELINE) == BYLINE_AND_DATELINE.split("\n")
    assert _sentence_texts(HEADLINE_OVER_BODY) == HEADLINE_OVER_BODY.split("\n")


def test_table_rows_and_list_items_are_sentences_of_their_own():
    assert _sentence_texts(RESULTS_TABLE) == RESULTS_TABLE.split("\n")
    assert _sentence_texts(BULLETED_LIST) == BULLETED_LIST.split("\n")


def test_hard_wrapped_prose_reads_as_one_sentence_across_the_wraps():
    sentences = _sentence_texts(WRAPPED_EMAIL)
    assert sentences[0] == "Hello team,"
    assert sentences[1].startswith("The quarterly review") and "New\nYork" in sentences[1]
    assert sentences[1].endswith("in person.") and sentences[1].count("\n") == 3
    # Short lines after the wrapped paragraph are not wraps: a closing and a signature.
    assert sentences[2:] == ["Best regards,", "John"]


def test_a_list_inside_wrapped_prose_keeps_its_items():
    text = (
        "We agreed on the following points during the call with the team in\n"
        "Berlin and the colleagues who joined from the office in Madrid today:\n"
        "- Jane Roe leads the project\n- John Doe reviews the budget"
    )
    items = ["- Jane Roe leads the project", "- John Doe reviews the budget"]
    assert _sentence_texts(text)[1:] == items
    assert "in\nBerlin" in _sentence_texts(text)[0]


def test_a_line_starting_lower_case_continues_the_sentence_outside_wrapped_text():
    assert _sentence_texts("We met Jane Roe\nand John Doe in Paris") == [
        "We met Jane Roe\nand John Doe in Paris"
    ]
    # Unless the line before ends a clause.
    assert _sentence_texts("Agenda:\nbudget") == ["Agenda:", "budget"]


def test_line_break_modes_sentence_and_space():
    assert _sentence_texts(WRAPPED_EMAIL, "sentence")[1:3] == [
        "The quarterly review with our colleagues from the regional New",
        "York office will take place in the main building in Jane Roe's",
    ]
    assert _sentence_texts(BYLINE_AND_DATELINE, "space") == [BYLINE_AND_DATELINE]
    # A blank line ends a sentence in every mode.
    assert _sentence_texts("Jane Roe\n\nLONDON", "space") == ["Jane Roe", "LONDON"]


@pytest.mark.parametrize("newline", ["\r\n", "\r", "\u2028", "\x85"])
def test_every_kind_of_line_break_counts(newline):
    text = BYLINE_AND_DATELINE.replace("\n", newline)
    assert _sentence_texts(text) == text.split(newline)


def test_sentence_line_breaks_lists_offsets_and_refuses_an_unknown_mode():
    from ner_stream.text import sentence_line_breaks

    assert sentence_line_breaks("a\nb\r\nc", "sentence") == [1, 3]
    assert sentence_line_breaks("a\nb", "space") == []
    assert sentence_line_breaks("no breaks at all", "auto") == []
    with pytest.raises(ValueError, match="unknown line-break mode 'never'"):
        sentence_line_breaks("a\nb", "never")
    with pytest.raises(ValueError, match="unknown line-break mode"):
        document_windows("a\nb", line_breaks="lines")


def test_a_line_break_never_joins_two_chunks_of_lines_text():
    # Each line ends without a period: as one sequence the tagger would read "Roe LONDON".
    chunks = document_windows(BYLINE_AND_DATELINE)
    assert [[t.text for t in c] for c in chunks[:2]] == [["Jane", "Roe"], ["LONDON", "1996-08-30"]]


def test_a_list_of_title_case_headlines_keeps_each_headline_apart():
    # Lines of like length near the longest look like a greedy wrap by their lengths alone; no
    # line reads on into the next (lower-case word, comma), so they are not prose wraps.
    headlines = [
        "Merkel Meets Obama At The White House In Washington",
        "Deutsche Bank Shares Fall After Profit Warning In Frankfurt",
        "Goldman Sachs Hires Former European Central Bank Official",
        "Manchester United Beat Real Madrid In Champions League Final",
    ]
    assert _sentence_texts("\n".join(headlines)) == headlines
    two = ["Chancellor Angela Merkel Meets President Barack Obama At The White House", "Reuters"]
    assert _sentence_texts("\n".join(two)) == two


# A paragraph wrapped at 72 columns (textwrap.fill), with a name cut by the first wrap.
BODY = (
    "I spoke with the people at the International Monetary Fund office in New\n"
    "York this morning about the loan, and they told me that the terms would\n"
    "be agreed with the finance ministry before the end of the month."
)


def test_a_wrap_in_prose_survives_a_signature_a_header_block_a_url_and_a_quote():
    signed = (
        BODY + "\n\nBest regards,\nAngela Merkel, Chancellor of the Federal Republic of Germany\n"
    )
    signed += "Bundeskanzleramt, Berlin\n"
    assert _sentence_texts(signed) == [
        BODY, "Best regards,", "Angela Merkel, Chancellor of the Federal Republic of Germany",
        "Bundeskanzleramt, Berlin",
    ]  # fmt: skip
    subject = "Subject: Re: Expansion plans for the New York and San Francisco offices of Acme"
    headers = f"From: Alice\nTo: Bob\n{subject}\nDate: Mon, 3 Mar 2025 10:02:11 +0100\n\n{BODY}"
    assert _sentence_texts(headers)[-1] == BODY
    assert _sentence_texts(headers)[2] == subject
    url = BODY + "\nSee https://www.example.com/news/2024/08/imf-loan-talks-with-the-ministry.html"
    assert _sentence_texts(url)[0] == BODY
    quoted = (
        BODY + "\n\n> We met the people from the International Monetary Fund office in\n> Berlin"
    )
    assert _sentence_texts(quoted)[0] == BODY


def test_a_long_first_line_over_a_second_is_two_lines_not_a_wrap():
    # Alone, a long line sets the width it fills: a sentence-case headline over a dateline, a
    # byline, tweets or headlines one per line are not wraps. (A paragraph of exactly two lines
    # whose wrap falls between two capitalised words is read the same way.)
    for text in (
        "Toyota to recall 1.2 million vehicles sold in the United States\n"
        "TOKYO (Reuters) - Toyota Motor Corp said on Tuesday it would recall vehicles.",
        "Merkel meets Macron for talks on the future of Europe in Berlin\n"
        "London Stock Exchange halts trading after glitch\nFord to close plant in Belgium",
        "Written by Michael Johnson for the Financial Times in Washington\n"
        "London, March 3 - Shares of Deutsche Bank fell sharply on Monday.",
    ):
        assert _sentence_texts(text) == text.split("\n")


def test_table_cells_are_sentences_of_their_own_except_in_space_mode():
    tsv = "Company\tCity\nDeutsche Bank\tFrankfurt\nGoldman Sachs\tNew York"
    assert _sentence_texts(tsv) == ["Company", "City", "Deutsche Bank", "Frankfurt",
                                    "Goldman Sachs", "New York"]  # fmt: skip
    aligned = "Deutsche Bank    Frankfurt\nGoldman Sachs    New York"
    assert _sentence_texts(aligned, "sentence") == [
        "Deutsche Bank", "Frankfurt", "Goldman Sachs", "New York"
    ]  # fmt: skip
    assert _sentence_texts("Deutsche Bank\tFrankfurt", "space") == ["Deutsche Bank\tFrankfurt"]


@pytest.mark.parametrize("blank", ["\r\r", "\u2028\u2028", "\x85\x85", "\r \r", "\r\u200b\n"])
def test_a_blank_line_of_any_kind_of_break_ends_a_sentence_in_every_mode(blank):
    text = f"Talks with the European Central Bank{blank}Deutsche Bank shares rose"
    for mode in ("auto", "sentence", "space"):
        assert _sentence_texts(text, mode) == [
            "Talks with the European Central Bank", "Deutsche Bank shares rose"
        ]  # fmt: skip


def test_paragraph_separators_do_not_stretch_the_wrap_width():
    paragraph = (
        "We will meet the colleagues from the regional office in the city of New\n"
        "York next week to discuss the plan for the coming year with all of them."
    )
    text = "\u2029".join([paragraph, paragraph])
    assert _sentence_texts(text) == [paragraph, paragraph]


@pytest.mark.parametrize(
    "ch", ["\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
)
def test_has_line_break_knows_every_kind_of_break(ch):
    from ner_stream.text import has_line_break

    assert has_line_break(f"New{ch}York")
    assert has_line_break(f"é{ch}")
    assert has_line_break(f"é{ch}", newline=False) == (ch != "\n")
    assert not has_line_break("New York\t\u200b é")
