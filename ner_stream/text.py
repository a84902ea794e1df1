"""Tokenisation, sentence splitting and windows (what the tagger tags as one sequence), with
character offsets.

The tagger is trained on CoNLL-2003 English, so tokens follow its conventions: punctuation,
quotes and brackets are split off; possessive ``'s`` and the contractions ``n't``, ``'re``,
``'ll``, ``'ve``, ``'m``, ``'d`` become tokens of their own ("doesn't" -> "does" "n't");
hyphenated words, dates, scores and numbers with ``,`` ``.`` ``:`` ``/`` stay whole
("German-born", "1996-08-22", "6-4", "1,000", "3.5", "2:29.34", "1/2"); abbreviations with
periods stay whole ("U.S.", "a.m.", "Mr.", "Inc.", initials such as "J."); ``$`` is split from an
amount but letter-prefixed currencies stay whole ("US$", "C$"). On top of that, URLs, e-mail
addresses, @handles and #hashtags are single tokens, Chinese/Japanese characters are one token
each (those scripts do not separate words with spaces), and emoji sequences and flags are kept
together.

Invisible format characters (Unicode category Cf: soft hyphen U+00AD, zero-width space U+200B,
word joiner U+2060, BOM U+FEFF, direction marks and embeddings, ...) never split a word and never
make a token of their own. The text is tokenized as if they were absent, and a token covers its
characters from its first visible one to its last: a format character between two of them stays
inside the token ("Ange\\u00adla", "Mer\\u200bkel" are one token each, as web text breaks long
words with them), one at a token's edge or standing between spaces is skipped like whitespace.
Two kinds of format character are read like combining marks instead and stay with the character
before them: the zero-width (non-)joiners U+200C and U+200D (emoji sequences, Indic and Persian
words) and the emoji tag characters U+E0020 to U+E007F (subdivision flags). The vocabularies look a
token up without any of its format characters (`visible_form`), so "Ange\\u00adla" encodes like
"Angela".

Line breaks are evidence of a document's structure (`sentence_line_breaks`): a blank line or a
paragraph separator always ends a sentence, and with ``line_breaks="auto"`` (the default) so does a
single line break unless it looks like the wrap of hard-wrapped prose. ``"sentence"`` makes every
line break end a sentence, ``"space"`` reads a single one as a space.

Offsets are Python ``str`` indices (code points) into the original document, and
``document[token.start:token.end] == token.text`` always holds. Tokenising is a single pass of one
compiled regular expression (plus, for a text with format characters, one to remove them and one
over the tokens to map them back), so it runs in time linear in the document size.
"""

from __future__ import annotations

import bisect
import itertools
import operator
import re
import unicodedata
from typing import NamedTuple

__all__ = [
    "LINE_BREAK_MODES",
    "Token",
    "document_windows",
    "has_line_break",
    "sentence_line_breaks",
    "split_sentences",
    "tokenize",
    "visible_form",
]

LINE_BREAK_MODES = ("auto", "sentence", "space")


class Token(NamedTuple):
    """One token; ``text == document[start:end]``.

    A named tuple rather than a frozen dataclass: every token of every document is one of these,
    and a tuple is built in half the time and is not tracked by the garbage collector.
    """

    text: str
    start: int  # char offset in the original document
    end: int


# Tokens are built with tuple.__new__ directly: the named tuple's own __new__ is a Python
# function, and tokenizing builds one per token.
_new_tuple = tuple.__new__


def _class_body(codepoints: list[int]) -> tuple[str, str]:
    """Regex class bodies for ascending ``codepoints``, as ranges: the BMP part, the astral part."""
    ranges: list[list[int]] = []
    for cp in codepoints:
        # A range never crosses from the BMP into the astral planes.
        if ranges and ranges[-1][1] == cp - 1 and cp != 0x10000:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp])
    bmp, astral = [], []
    for lo, hi in ranges:
        part = rf"\U{lo:08x}-\U{hi:08x}" if lo != hi else rf"\U{lo:08x}"
        (bmp if hi < 0x10000 else astral).append(part)
    return "".join(bmp), "".join(astral)


# Format characters the tokenizer reads like combining marks rather than as invisible: the zero-
# width (non-)joiners, which join emoji sequences and occur inside Indic and Persian words, and the
# emoji tag characters that spell out a subdivision flag after its black flag.
_JOINERS_AS_MARKS = frozenset([0x200C, 0x200D, *range(0xE0020, 0xE0080)])


def _marks_and_format_characters() -> tuple[list[int], list[int]]:
    """Code points of the combining marks and of the format characters (category Cf), ascending.

    Marks are Unicode categories Mn, Mc, Me. Python's ``\\w`` leaves them out, which would cut
    decomposed accents ("e" + U+0301) and Indic vowel signs out of their words, and the stdlib
    ``re`` has no ``\\p{M}``, so the classes are derived once from ``unicodedata``. No marks or
    format characters exist between U+20000 and U+E0000.
    """
    marks: list[int] = []
    formats: list[int] = []
    for block in (range(0x20000), range(0xE0000, 0xE0200)):
        for cp in block:
            category = unicodedata.category(chr(cp))
            if category in ("Mn", "Mc", "Me"):
                marks.append(cp)
            elif category == "Cf":
                formats.append(cp)
    return marks, formats


_MARK_CODEPOINTS, _FORMAT_CODEPOINTS = _marks_and_format_characters()
# The two planes of marks are kept apart because ``re`` checks the BMP part of a class with one
# table look-up but the astral ranges (about 200 of them) one by one (see `_mark`).
_MARKS_BMP, _MARKS_ASTRAL = _class_body(
    sorted({*_MARK_CODEPOINTS, *_JOINERS_AS_MARKS.intersection(_FORMAT_CODEPOINTS)})
)
# Invisible format characters: soft hyphen, zero-width space, word joiner, direction marks and
# embeddings, BOM... (rules in the module docstring).
_INVISIBLE = "".join(_class_body(sorted(set(_FORMAT_CODEPOINTS) - _JOINERS_AS_MARKS)))
_INVISIBLE_RE = re.compile(f"[{_INVISIBLE}]++")
# For str.translate: every format character, those read as marks included, maps to nothing.
_FORMAT_DELETIONS = dict.fromkeys(_FORMAT_CODEPOINTS)


def _mark(extra_astral: str = "") -> str:
    """A regex for one combining mark (or one of `extra_astral`, a class body of astral ranges).

    The astral ranges are tried only for an astral character: every word end and every
    punctuation token asks "is the next character a mark?", and for the usual answer (a space,
    a letter) the BMP table says no at once instead of after some 200 range comparisons, which
    took about half of the tokenizer's time.
    """
    return rf"(?:[{_MARKS_BMP}]|(?=[\U00010000-\U0010ffff])[{_MARKS_ASTRAL}{extra_astral}])"


_MARK = _mark()
# Han ideographs and kana: written without spaces, so each character is a token of its own.
_CJK = (
    r"\u3005\u3007\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
    r"\uff66-\uff9f\U00020000-\U0003134f"
)
_UPPER = r"A-ZÀ-ÖØ-Þ"
_LETTER = r"[^\W\d_]"
# A character that continues a word: a word character that is not CJK, or a combining mark.
_WORD_CHAR = rf"(?:[^\W{_CJK}]|{_MARK})"
# Word-internal joiners: hyphens, apostrophes and slashes between word characters, "," "." ":"
# between digits ("1,000", "3.5", "2:29.34"), "&" between letters ("S&P", "AT&T").
_JOINER = rf"(?:[-\u2010\u2011'’/]|(?<=\d)[.,:](?=\d)|(?<={_LETTER})&(?={_LETTER}))"
# Title-case and lower-case abbreviations that keep their period. Ambiguous words that often end a
# sentence ("Co", "No", "Mass", "Ill") are left out, as in CoNLL, where "Co ." is common.
# They are joined with their period after the regex pass: a set lookup is much cheaper than a
# long alternation tried at every token.
_ABBREVIATIONS = frozenset(
    word
    for group in (
        "Mr Mrs Ms Messrs Dr Prof Sr Jr St Mt Ft Rev Hon",  # titles, saints, places
        "Gen Gov Sen Rep Lt Col Capt Cmdr Sgt Maj Adm",  # ranks and offices
        "Inc Corp Ltd Bros",  # companies
        "Jan Feb Apr Aug Sep Sept Oct Nov Dec",  # months
        "Calif Fla Ariz Conn Penn Tenn Okla",  # U.S. states
        "vs etc approx Nos Vol vol Ave Blvd",
    )
    for word in group.split()
)
# Skipped between tokens: whitespace, control characters, and the format characters read as marks
# where there is nothing for them to join. Invisible format characters never reach the regex.
_SKIP = r"\s\x00-\x1f\x7f-\x9f" + "".join(_class_body(sorted(_JOINERS_AS_MARKS)))
# A combining mark or an emoji skin-tone modifier: stays with the symbol before it.
_EMOJI_MODIFIER = _mark(r"\U0001F3FB-\U0001F3FF")
# One alternation, tried at each token start after skipping whitespace. Possessive quantifiers
# (Python 3.11+) and bounded repeats keep every branch from backtracking far, so a pass over the
# text stays linear even on adversarial input.
_TOKEN_RE = re.compile(
    rf"""
    ([{_SKIP}]*+)                                                    # skipped: group 1
    (?:(?P<tok>
    # Fast paths, tried first because they cover most tokens: an ASCII word followed by nothing
    # that could make it part of a longer token, a symbol that starts no other kind of token, and
    # a CJK character. They yield the same tokens the general branches below would.
      [A-Za-z]++(?![\w.@'’&/:$+\-\u2010\u2011]|{_EMOJI_MODIFIER})
    | [^\w{_SKIP}@#+.'’\-\U0001F1E6-\U0001F1FF](?!{_EMOJI_MODIFIER})
    | [{_CJK}]                                                       # one CJK character
    | (?i:https?://|ftp://|www\.)[^\s<>"“”]*[^\s<>"“”'’.,;:!?)\]}}]     # URL, minus end punct
    | \w[\w.+-]{{0,63}}+@(?:[\w-]{{1,63}}\.){{1,8}}{_LETTER}{{2,63}}   # e-mail address
    | (?<!\w)[@#]\w(?:\w|{_MARK})*+                                    # @handle, #hashtag
    | (?:{_LETTER}\.){{2,}}(?:{_LETTER}(?!\w))?                     # U.S., a.m., F.B.I., U.S.A
    | [{_UPPER}]\.(?=\s*[{_UPPER}])                                  # initial: J. Smith
    | (?<!\w)[A-Z]{{1,3}}\$                                          # US$, C$, HK$
    | (?<!\w)\+(?=\d){_WORD_CHAR}++(?:{_JOINER}{_WORD_CHAR}++)*     # +44, +0.05
    | (?<![^\n])\d{{1,3}}\.(?=[ \t])                                  # "1. " item at line start
    | (?<!\w)['’](?i:s|re|ll|ve|m|d)(?!\w)                           # clitic after a space
    | (?<![\w.])\.\d++                                               # .500
    | (?P<word>[^\W{_CJK}]{_WORD_CHAR}*+(?:{_JOINER}{_WORD_CHAR}++)*) # word / number
    | \.{{2,}}+ | -{{2,}}+                                           # ... --
    | [\U0001F1E6-\U0001F1FF]{{2}}                                   # flag (regional indicators)
    # Any other visible character, with the modifiers, variation selectors and ZWJ-joined
    # symbols of an emoji sequence.
    | [^\w{_SKIP}](?:\u200d[^\w{_SKIP}]|{_EMOJI_MODIFIER})*+
    # Every character is either skipped or starts a token, so the only failure is at the end.
    ) | \Z)
    """,
    re.VERBOSE,
)
_CLITIC_RE = re.compile(r"(?:n['’]t|['’](?:s|re|ll|ve|m|d))\Z", re.IGNORECASE)

# "..." and longer runs of periods are terminal too; they are the only tokens starting "..".
_TERMINALS = frozenset({".", "!", "?", "…", "。", "！", "？"})
_CLOSERS = frozenset({")", "]", "}", "”", "’", "»"})
_AMBIGUOUS_QUOTES = frozenset({'"', "'"})


def _split_clitic(text: str, start: int) -> list[Token]:
    """Split a trailing clitic off a word, the Penn Treebank way used by CoNLL."""
    match = _CLITIC_RE.search(text)
    # "n't" alone (or "'s" alone) is already a clitic; only split when a stem is left.
    if match is None or match.start() == 0:
        return [Token(text, start, start + len(text))]
    cut = match.start()
    return [
        Token(text[:cut], start, start + cut),
        Token(text[cut:], start + cut, start + len(text)),
    ]


def tokenize(text: str) -> list[Token]:
    """Split ``text`` into CoNLL-2003-style tokens with character offsets.

    Returns the tokens in document order; ``text[t.start:t.end] == t.text`` for each. Whitespace
    and control characters are never part of a token; invisible format characters are part of one
    only between two of its visible characters (rules in the module docstring). Linear in
    ``len(text)``: one regex pass, plus one to find format characters in non-ASCII text.
    """
    # str.isascii is a flag look-up, and a search for the class costs little next to the regex
    # pass; only the rare text with format characters pays for removing and mapping them.
    if text.isascii() or _INVISIBLE_RE.search(text) is None:
        return _tokenize(text)
    return _tokenize_without_invisibles(text)


def _tokenize(text: str) -> list[Token]:
    """`tokenize` for a text that holds no invisible format characters."""
    tokens: list[Token] = []
    append = tokens.append
    # findall hands over the groups' strings without a match object per token, and the matches
    # tile the text (every character is skipped or starts a token), so offsets are running sums.
    end = 0
    for skipped, value, word in _TOKEN_RE.findall(text):
        start = end + len(skipped)
        end = start + len(value)
        if not value:  # the empty match at the end of the text
            continue
        if (
            value == "."
            and tokens
            and tokens[-1].end == start
            and tokens[-1].text in _ABBREVIATIONS
        ):
            tokens[-1] = Token(tokens[-1].text + ".", tokens[-1].start, end)
        # Only plain words with an internal apostrophe can carry a clitic (not URLs, handles).
        elif ("'" in value or "’" in value) and word:
            tokens.extend(_split_clitic(value, start))
        else:
            append(_new_tuple(Token, (value, start, end)))
    return tokens


def _tokenize_without_invisibles(text: str) -> list[Token]:
    """`tokenize` for a text with invisible format characters: tokenized as if they were absent.

    The tokens of the visible text are mapped back: a token starts at its first visible character
    and ends after its last, so format characters between those are inside it and those at its
    edges are not.
    """
    pieces: list[str] = []
    run_at: list[int] = []  # index into the visible text at which each run was removed
    removed: list[int] = []  # characters removed up to and including each run
    total = last = 0
    for match in _INVISIBLE_RE.finditer(text):
        start, end = match.span()
        pieces.append(text[last:start])
        run_at.append(start - total)
        total += end - start
        removed.append(total)
        last = end
    pieces.append(text[last:])
    run_at.append(len(text))  # a sentinel: no run lies past the end
    tokens = []
    append = tokens.append
    i = shift = 0  # runs passed so far (tokens come in order), and the characters they removed
    for value, start, end in _tokenize("".join(pieces)):
        while run_at[i] <= start:
            shift = removed[i]
            i += 1
        start_shift = shift
        # The runs before the token's last character are inside it; those after, outside.
        while run_at[i] < end:
            shift = removed[i]
            i += 1
        start, end = start + start_shift, end + shift
        if shift != start_shift:
            value = text[start:end]
        append(_new_tuple(Token, (value, start, end)))
    return tokens


def visible_form(word: str) -> str:
    """``word`` without its format characters (category Cf: soft hyphens, zero-width spaces and
    joiners, direction marks, ...), as it is looked up in the vocabularies; a word made only of
    format characters is returned unchanged. Cheap for an ASCII word, which has none.
    """
    if word.isascii():
        return word
    visible = word.translate(_FORMAT_DELETIONS)
    return visible or word


# A line break: what str.splitlines splits on, "\r\n" counting as one. The paragraph separator
# U+2029 is one too, and always ends a sentence (a blank line of its own).
_LINE_BREAK_RE = re.compile(r"\r\n|[\n\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
# A list item, a quoted or Markdown line at the start of a line: "- ", "* ", "• ", "1. ", "2) ",
# "a) ", "(a) ", "iv. ", "> " (a quoted e-mail), "# " (a heading), "|" (a table row). A capital
# and a period is left out: at the start of a wrapped line it is more often an initial ("J. Roe").
_ITEM_RE = re.compile(
    r"(?:[-*+•·‣◦▪–—>#]|\d{1,3}[.)]|[a-z][.)]|[ivx]{1,4}[.)]|\((?:\d{1,3}|[A-Za-z]|[ivxIVX]{1,4})\))"
    r"(?:\s|\Z)|\|"
)
_TERMINALS_AND_COLONS = _TERMINALS | {":", ";"}
# The first characters of `_ITEM_RE` other than digits and letters.
_ITEM_FIRST = frozenset("-*+•·‣◦▪–—>#|(")
# Columns of a table or a results list: a tab, or a run of three spaces or more inside a line.
_COLUMNS_RE = re.compile(r"\S(?:\t| {3,})\S")
# Hard-wrapped prose is wrapped at a width of at least this many characters (e-mail clients use
# 72 to 78, plain-text bulletins 60 to 80); shorter lines are a list, a table, an address, verse.
MIN_WRAP_WIDTH = 40


def sentence_line_breaks(text: str, mode: str = "auto") -> list[int]:
    """Offsets (ascending) of the line breaks of ``text`` that end a sentence under ``mode``.

    ``"space"``: none (a single line break reads as a space); ``"sentence"``: every one;
    ``"auto"``: every one except a wrap. A break is a wrap when neither line around it is a list
    item or a table row (`_ITEM_RE`, a tab or three spaces between words), the line before does
    not end with terminal punctuation, a colon or a semicolon, and either the next line starts
    with a lower-case letter, or the line before is a full line of a hard-wrapped paragraph.
    Paragraphs (runs of lines between blank lines) are judged each on its own. A full line has at
    least `MIN_WRAP_WIDTH` characters and the next line's first word would not have fitted on it
    within the paragraph's width (its longest line that could have been wrapped: not ending a
    sentence, holding a space, not a quoted "> " line). A paragraph is hard-wrapped when most of
    its long lines are full and one of them reads on into the next (a lower-case word on either
    side of the break, or a comma), or when two of its lines or more are full lines of prose
    (`_is_prose`). One long line alone sets the width it fills, so a headline over a dateline is
    two lines. This is plain-text reflow (what RFC 3676 marks with trailing spaces), inferred
    from the text; terminal punctuation inside a wrapped sentence still ends it.

    Line breaks are those of `str.splitlines`, ``"\r\n"`` one break at the offset of its
    ``"\r"``; a paragraph separator (U+2029) is listed too (it always ends a sentence). Raises
    ``ValueError`` for an unknown mode.
    """
    if mode not in LINE_BREAK_MODES:
        raise ValueError(f"unknown line-break mode {mode!r}: use {', '.join(LINE_BREAK_MODES)}")
    if mode == "space" or not has_line_break(text):
        return []
    # Lines and the offset of the break after each. The usual text breaks with "\n" alone, and
    # str.split is much cheaper than a regex pass. The per-line work below is done in
    # comprehensions: in a hard-wrapped document it runs for every line.
    if not has_line_break(text, newline=False):
        raw = text.split("\n")
        # The break after line i is at the lengths of lines 0..i plus the i breaks before it.
        offsets = list(
            map(operator.add, itertools.accumulate(map(len, raw[:-1])), itertools.count())
        )
    else:
        matches = list(_LINE_BREAK_RE.finditer(text))
        offsets = [m.start() for m in matches]
        starts = [0, *(m.end() for m in matches)]
        raw = [text[a:b] for a, b in zip(starts, [*offsets, len(text)], strict=True)]
    if mode == "sentence":
        return offsets
    # Indentation is left out of a line's length: an indented wrapped block is wrapped too.
    lines = list(map(str.strip, raw))
    # Breaks that may be wraps: text on both sides, and no sentence or clause ended before.
    open_breaks = [
        i
        for i, (before, after) in enumerate(zip(lines, lines[1:], strict=False))
        if before and after and before[-1] not in _TERMINALS_AND_COLONS
    ]
    if not open_breaks:
        return offsets
    # Each paragraph (a run of lines between blank lines) is judged on its own: a header block,
    # a signature or a quoted reply does not set the width of the body.
    paragraph_of = list(itertools.accumulate(map(operator.not_, lines)))  # blank lines counted
    paragraphs: dict[int, list[int]] = {}
    for i in open_breaks:
        paragraphs.setdefault(paragraph_of[i], []).append(i)
    wrapped: set[int] = set()  # breaks after a full line of a hard-wrapped paragraph
    for members in paragraphs.values():
        # The wrap width: the longest line that could have been wrapped (a quoted line, whose
        # "> " adds to it, left out).
        width = max(
            (len(lines[i]) for i in members if " " in lines[i] and lines[i][0] != ">"),
            default=0,
        )
        if width < MIN_WRAP_WIDTH:
            continue
        # Full lines: long enough, and the next line's first word would not have fitted on them.
        here = []
        for i in members:
            before, after = lines[i], lines[i + 1]
            if len(before) >= MIN_WRAP_WIDTH:
                space = after.find(" ")
                if len(before) + (space if space >= 0 else len(after)) >= width:
                    here.append(i)
        # Hard-wrapped: most long lines are full, and some full line reads on into the next (a
        # lower-case word on either side of the break, or a comma), which a list of headlines of
        # like length never does. Or at least two lines are full lines of prose: one alone (the
        # first of two lines, a headline over a dateline) sets the width it fills.
        long_lines = sum(1 for i in members if len(lines[i]) >= MIN_WRAP_WIDTH)
        reads_on = any(
            lines[i + 1][0].islower() or lines[i][-1] == "," or _last_word_lower(lines[i])
            for i in here
        )
        if 2 * len(here) > long_lines and reads_on:
            wrapped.update(here)
        elif len(here) >= 2:
            wrapped.update(i for i in here if _is_prose(lines[i]))
    columns = "\t" in text or "   " in text
    wraps = set()
    for i in open_breaks:
        before, after = lines[i], lines[i + 1]
        first = after[0]
        if not (first.islower() or i in wrapped):
            continue
        if (
            first in _ITEM_FIRST or first.isdigit() or first in "ivx" or after[1:2] in ".)"
        ) and _ITEM_RE.match(after):
            continue
        if columns and (_COLUMNS_RE.search(before) or _COLUMNS_RE.search(after)):
            continue
        wraps.add(i)
    if not wraps:
        return offsets
    return [offset for i, offset in enumerate(offsets) if i not in wraps]


def _last_word_lower(line: str) -> bool:
    """Whether the last word of ``line`` (with text) starts lower-case."""
    return line[line.rfind(" ") + 1].islower()


def _is_prose(line: str) -> bool:
    """Whether a line (with text) reads as running prose rather than a title or a name list: it
    ends with a lower-case word or a comma, or a third of its words or more start lower-case
    (sentence case; a Title Case headline has none but its short function words).
    """
    if line[-1] == "," or _last_word_lower(line):
        return True
    words = line.split()
    return 3 * sum(1 for word in words if word[0].islower()) >= len(words)


def has_line_break(text: str, newline: bool = True) -> bool:
    """Whether ``text`` holds a line break (`_LINE_BREAK_RE`); with ``newline=False``, whether it
    holds one other than ``"\\n"``.

    One substring test per kind of break: each is a memchr-like scan, many times faster than
    the regex engine trying a character class at every position, and most texts have none.
    """
    return (
        (newline and "\n" in text)
        or "\r" in text
        or "\x0b" in text
        or "\x0c" in text
        or "\x1c" in text
        or "\x1d" in text
        or "\x1e" in text
        or (not text.isascii() and ("\x85" in text or "\u2028" in text or "\u2029" in text))
    )


def _is_closer(token: Token, previous: Token) -> bool:
    # A straight quote right after a word closes a quotation; after a space it opens one.
    if token.text in _AMBIGUOUS_QUOTES:
        return token.start == previous.end
    return token.text in _CLOSERS


def _has_blank_line(text: str, start: int, end: int) -> bool:
    """Whether a gap of two characters or more between two tokens ends a paragraph: it holds two
    line breaks of any kind (`_LINE_BREAK_RE`; "\\r\\n" is one) or a paragraph separator.
    """
    if text.count("\n", start, end) >= 2 or text.find("\u2029", start, end) != -1:
        return True
    return len(_LINE_BREAK_RE.findall(text, start, end)) >= 2


def split_sentences(tokens: list[Token], text: str, line_breaks: str = "auto") -> list[list[Token]]:
    """Group ``tokens`` (from ``tokenize(text)``) into sentences.

    A sentence ends after a run of ``.``, ``!``, ``?`` or ellipsis tokens, together with any
    closing quotes and brackets that follow, unless the next token starts with a lower-case letter
    ("... and then... he left"). Abbreviations and initials ("U.S.", "Mr.", "J.") are single tokens
    that keep their period, so they never end a sentence. A blank line always ends one, and so
    does a single line break that `sentence_line_breaks` picks under the ``line_breaks`` mode
    (``"auto"``, ``"sentence"`` or ``"space"``), and, except in ``"space"`` mode, a table cell
    boundary: a tab, or three spaces or more, between two tokens of one line. Raises
    ``ValueError`` for an unknown mode.
    """
    breaks = sentence_line_breaks(text, line_breaks)
    hard = set(breaks)  # offsets of the line breaks that end a sentence
    # Table cells: a tab, or three spaces or more, between two tokens of one line.
    cells = line_breaks != "space" and ("\t" in text or "   " in text)
    sentences: list[list[Token]] = []
    current: list[Token] = []
    previous: Token | None = None
    after_terminal = False  # only terminals and closers since the last terminal token
    previous_end = 0
    for token in tokens:
        word, start = token.text, token.start
        terminal = word in _TERMINALS or word[:2] == ".."
        gap = start - previous_end
        if previous is None:
            after_terminal = terminal
        # Most gaps are empty or one space: looked at here, without a call (this runs per token).
        elif (
            gap == 1
            and (ch := text[previous_end]) != " "
            and (ch == "\u2029" or previous_end in hard or (ch == "\t" and cells))
        ) or (gap > 1 and _ends_sentence(text, previous_end, start, breaks, cells)):
            sentences.append(current)
            current = []
            after_terminal = terminal
        elif after_terminal:
            if not (terminal or _is_closer(token, previous)):
                after_terminal = False
                if not word[0].islower():
                    sentences.append(current)
                    current = []
        else:
            after_terminal = terminal
        current.append(token)
        previous = token
        previous_end = token.end
    if current:
        sentences.append(current)
    return sentences


def _ends_sentence(text: str, start: int, end: int, breaks: list[int], cells: bool) -> bool:
    """Whether the gap ``text[start:end]`` between two tokens (two characters or more) ends a
    sentence: a blank line, a paragraph separator, one of the line breaks ``breaks``, or, with
    ``cells``, a table cell boundary (a tab, or three spaces or more, within one line).
    """
    if _has_blank_line(text, start, end):
        return True
    if breaks:
        at = bisect.bisect_left(breaks, start)
        if at < len(breaks) and breaks[at] < end:
            return True
    if cells:
        gap = text[start:end]
        return ("\t" in gap or "   " in gap) and not has_line_break(gap)
    return False


# Punctuation after which a window may be cut when a sentence is too long: cutting there is
# less likely to split an entity than cutting at an arbitrary token.
_SOFT_BREAKS = frozenset({",", ";", ":", "--", "-", ")", "…", "..."})


def _windows(sentence: list[Token], max_tokens: int) -> list[list[Token]]:
    """Cut a sentence into consecutive windows of at most ``max_tokens`` tokens."""
    if len(sentence) <= max_tokens:
        return [sentence]
    windows: list[list[Token]] = []
    begin = 0
    while len(sentence) - begin > max_tokens:
        end = begin + max_tokens
        # Prefer a soft break in the last quarter of the window.
        for cut in range(end, end - max_tokens // 4, -1):
            if sentence[cut - 1].text in _SOFT_BREAKS:
                end = cut
                break
        windows.append(sentence[begin:end])
        begin = end
    windows.append(sentence[begin:])
    return windows


def document_windows(
    text: str, max_tokens: int = 128, line_breaks: str = "auto"
) -> list[list[Token]]:
    """Tokenise ``text`` and cut it into windows, what the tagger tags as one sequence, in
    document order.

    Each sentence (`split_sentences` with ``line_breaks``) is a window; a sentence longer than
    ``max_tokens`` is cut into consecutive windows of at most ``max_tokens`` tokens (preferring a
    cut after a comma or similar). Token offsets stay relative to the whole ``text``. Returns
    ``[]`` for a text without tokens. Raises ``ValueError`` when ``max_tokens`` is below 1 or
    ``line_breaks`` is unknown.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    windows: list[list[Token]] = []
    for sentence in split_sentences(tokenize(text), text, line_breaks):
        windows.extend(_windows(sentence, max_tokens))
    return windows
