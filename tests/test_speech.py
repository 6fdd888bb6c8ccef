"""Text for a voice: sentences cut from a token stream, and markdown, URLs and emoji kept out of speech."""

from __future__ import annotations

import pytest
from conftest import words
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

import speech

# ----------------------------------------------------------------------------- sentences (Gather mode)


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        (["Hello", " there.", " How", " are", " you?"], ["Hello there.", "How are you?"]),
        (["It costs 3", ".5 dollars.", " Next"], ["It costs 3.5 dollars.", "Next"]),
        (["Dr. Smith", " will see", " you. Ok"], ["Dr. Smith will see you.", "Ok"]),
        (["Wait... and", " then. Done"], ["Wait... and then.", "Done"]),
        (["Wait... Then", " go"], ["Wait...", "Then go"]),
        (["e.g. this", " one. Yes"], ["e.g. this one.", "Yes"]),
        (['He said "stop." Then', " left"], ['He said "stop."', "Then left"]),
        (["Line one\nLine two"], ["Line one", "Line two"]),
        (["Call Dr.", " Smith."], ["Call Dr. Smith."]),
        (["It is 3.", "5 miles."], ["It is 3.5 miles."]),
        (["Really?", " Yes."], ["Really?", "Yes."]),
    ],
)
def test_segmenter_cuts_at_sentence_ends_only(tokens: list[str], expected: list[str]) -> None:
    seg = speech.Segmenter()
    out = [s for t in tokens for s in seg.feed(t)] + seg.flush()
    assert out == expected


def test_a_sentence_is_known_complete_when_the_next_token_arrives() -> None:
    seg = speech.Segmenter()
    assert seg.feed("We open at nine.") == []  # maybe the reply's end: it waits, so a short reply stays whole
    assert seg.feed(" Mr.") == ["We open at nine."]
    assert seg.feed(" Smith is in.") == [] and seg.flush() == ["Mr. Smith is in."]


def test_segmenter_cuts_long_unpunctuated_speech_at_a_pause() -> None:
    seg = speech.Segmenter(max_len=60)
    text = "this sentence goes on and on without any end in sight, and it keeps going and going forever"
    out = seg.feed(text) + seg.flush()
    assert out == ["this sentence goes on and on without any end in sight,", "and it keeps going and going forever"]


@hsettings(max_examples=200, deadline=None)
@given(st.lists(st.text(st.sampled_from("ab .!?,\n3"), max_size=12), max_size=30))
def test_segmenter_never_loses_or_reorders_text(tokens: list[str]) -> None:
    seg = speech.Segmenter(max_len=40)
    out = [s for t in tokens for s in seg.feed(t)] + seg.flush()
    assert "".join(out).replace(" ", "").replace("\n", "") == "".join(tokens).replace(" ", "").replace("\n", "")
    assert all(s == s.strip() and s for s in out)


@pytest.mark.parametrize(
    ("raw", "spoken"),
    [
        ("**Bold** and _plain_ text", "Bold and _plain_ text"),
        ("## Heading", "Heading"),
        ("- first item", "first item"),
        ("See [the docs](https://example.com/docs) now", "See the docs now"),
        ("Visit https://example.com/x?y=1 today", "Visit today"),
        ("Great job 🎉👍", "Great job"),
        ("Use `code` here", "Use code here"),
    ],
)
def test_markdown_and_emoji_are_not_spoken(raw: str, spoken: str) -> None:
    assert speech.speakable(raw) == spoken


# ----------------------------------------------------------------------------- cleaning tokens (relay mode)


def clean(tokens: list[str]) -> str:
    cleaner = speech.TokenCleaner()
    return "".join(cleaner.feed(t) for t in tokens) + cleaner.flush()


@pytest.mark.parametrize(
    ("raw", "spoken"),
    [
        ("**Bold** and _plain_ text", "Bold and _plain_ text"),
        ("## Heading", "Heading"),
        ("- first item", "first item"),
        ("See [the docs](https://example.com/docs) now", "See the docs now"),
        ("Visit https://example.com/x?y=1 today", "Visit today"),
        ("Great job 🎉👍", "Great job"),
        ("Use `code` here", "Use code here"),
        ("Steps:\n1. Mix\n2) Bake\n- Eat", "Steps: Mix Bake Eat"),
        ("It is -5 degrees, 1.5 times\n10 apples", "It is -5 degrees, 1.5 times 10 apples"),
        ("> quoted\n#tag and C# and a > b", "quoted tag and C# and a > b"),
        ("~~old~~ new, ~5 min, snake_case, __strong__", "old new, ~5 min, snake_case, strong"),
        ("what www.example.com hello http", "what hello http"),
        ("Thumbs 👍🏽 up ❤️ ok", "Thumbs up ok"),
    ],
)
def test_tokens_lose_markdown_urls_and_emoji_however_they_are_cut(raw: str, spoken: str) -> None:
    assert clean([raw]) == spoken
    assert clean(list(raw)) == spoken  # one character per token
    assert clean(words(raw)) == spoken


_markdownish = st.lists(
    st.sampled_from(list("ab .,1-#>*_~`[]()\n:/hw") + ["http", "www.", "🎉", "  "]), max_size=40
).map("".join)


@hsettings(max_examples=400, deadline=None)
@given(_markdownish, st.lists(st.integers(min_value=0, max_value=60), max_size=12))
def test_cleaning_does_not_depend_on_where_the_tokens_are_cut(text: str, cuts: list[int]) -> None:
    points = sorted({min(c, len(text)) for c in cuts})
    tokens = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    assert clean(tokens) == clean([text])


@hsettings(max_examples=300, deadline=None)
@given(st.lists(st.from_regex(r"[A-Za-z0-9',.?!]{1,10}", fullmatch=True), min_size=1, max_size=20))
def test_plain_words_pass_through_untouched(ws: list[str]) -> None:
    ws = [w for w in ws if not w.lower().startswith(("http", "www.", "ht", "w")) or w.isalpha() and len(w) > 4]
    text = " ".join(ws)
    if not text or text[0].isdigit():  # "1." at the start of a line is a list marker
        return
    assert clean(words(text)) == text


@hsettings(max_examples=400, deadline=None)
@given(st.text(st.sampled_from(list("ab *`#-1.)~_\t+•")), max_size=40))
def test_token_cleaning_agrees_with_sentence_cleaning_on_a_line(text: str) -> None:
    # (across newlines speakable's `\s*` runs into the next line; the examples above cover newlines)
    assert clean(list(text)) == speech.speakable(text)
