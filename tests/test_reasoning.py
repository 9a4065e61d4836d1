"""Tests for :mod:`dynamo_backend_common.frontend.reasoning`."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_backend_common.frontend.reasoning import (
    REASONING_PARSERS,
    ReasoningParser,
    TagReasoningParser,
    make_reasoning_parser,
    parse_reasoning,
)

Expected = tuple[str | None, str | None]


def _stream(name: str, deltas: list[str]) -> tuple[str, str]:
    parser = make_reasoning_parser(name)
    reasoning: list[str] = []
    content: list[str] = []
    for delta in deltas:
        r, c = parser.feed(delta)
        reasoning.append(r)
        content.append(c)
    r, c = parser.finish()
    reasoning.append(r)
    content.append(c)
    return "".join(reasoning), "".join(content)


def _joined(expected: Expected) -> tuple[str, str]:
    return expected[0] or "", expected[1] or ""


# (parser, output, (reasoning, content)) hand-written goldens.
GOLDEN: list[tuple[str, str, Expected]] = [
    # --- deepseek_r1: implicit start ---
    (
        "deepseek_r1",
        "Let me think.</think>\n\nThe answer is 4.",
        ("Let me think.", "\n\nThe answer is 4."),
    ),
    ("deepseek_r1", "<think>\nplan</think>answer", ("\nplan", "answer")),
    ("deepseek_r1", "\n<think>plan</think>answer", ("\nplan", "answer")),
    ("deepseek_r1", "no tags at all", ("no tags at all", None)),  # unterminated: all reasoning
    ("deepseek_r1", "<think>still thinking", ("still thinking", None)),
    ("deepseek_r1", "<think></think>just content", (None, "just content")),
    ("deepseek_r1", "</think>just content", (None, "just content")),
    ("deepseek_r1", "<think>a</think>b</think>c", ("a", "b</think>c")),
    ("deepseek_r1", "2 < 3 and a<b</think>x<y", ("2 < 3 and a<b", "x<y")),
    ("deepseek_r1", "think <think> again</think>ok", ("think <think> again", "ok")),
    ("deepseek_r1", "思考🤔é</think>答え✅", ("思考🤔é", "答え✅")),
    ("deepseek_r1", "ends in partial </thi", ("ends in partial </thi", None)),
    ("deepseek_r1", "<thi", ("<thi", None)),
    ("deepseek_r1", "<thinking>x</think>y", ("<thinking>x", "y")),  # not the tag
    ("deepseek_r1", "", (None, None)),
    ("deepseek_r1", "</think>", (None, None)),
    # --- step3: same semantics as deepseek_r1 ---
    ("step3", "r</think>c", ("r", "c")),
    ("step3", "r only", ("r only", None)),
    # --- qwen3 / basic: explicit start ---
    ("qwen3", "<think>\nplan\n</think>\n\nThe answer.", ("\nplan\n", "\n\nThe answer.")),
    ("qwen3", "Hello, no reasoning here.", (None, "Hello, no reasoning here.")),
    ("qwen3", "<think>unterminated", ("unterminated", None)),
    ("qwen3", "<think></think>content", (None, "content")),
    ("qwen3", "<think></think>", (None, None)),
    ("qwen3", "  \n<think>r</think>c", ("r", "  \nc")),  # whitespace before the tag is content
    ("qwen3", "<think>a</think>b</think>c", ("a", "b</think>c")),
    ("qwen3", "<think>1<2</think>3<4", ("1<2", "3<4")),
    ("qwen3", "a < b <think>x</think>", (None, "a < b <think>x</think>")),  # not leading
    ("qwen3", "reasoning</think>answer", (None, "reasoning</think>answer")),  # no <think>
    ("qwen3", "<think>🧠 ünïcödé</think>👍", ("🧠 ünïcödé", "👍")),
    ("qwen3", "<thi", (None, "<thi")),
    ("qwen3", "<think>x</th", ("x</th", None)),
    ("qwen3", "   ", (None, "   ")),
    ("qwen3", "", (None, None)),
    ("basic", "<think>r</think>c", ("r", "c")),
    ("basic", "plain", (None, "plain")),
    # --- mistral: [THINK]...[/THINK], explicit ---
    ("mistral", "[THINK]plan[/THINK]Answer.", ("plan", "Answer.")),
    ("mistral", "No thinking.", (None, "No thinking.")),
    ("mistral", "[THINK]unterminated", ("unterminated", None)),
    ("mistral", "[THINK][/THINK]x", (None, "x")),
    ("mistral", "[THINK]a[/THINK]b[/THINK]c", ("a", "b[/THINK]c")),
    ("mistral", "[THINK]list[0] [x][/THINK][1]", ("list[0] [x]", "[1]")),
    ("mistral", "<think>x</think>", (None, "<think>x</think>")),
    ("mistral", "[THINK]😀[/THINK]ß", ("😀", "ß")),
    ("mistral", "plan[/THINK]answer", (None, "plan[/THINK]answer")),
]


@pytest.mark.parametrize(("name", "text", "expected"), GOLDEN)
def test_golden_unary(name: str, text: str, expected: Expected) -> None:
    assert parse_reasoning(name, text) == expected


@pytest.mark.parametrize(("name", "text", "expected"), GOLDEN)
def test_golden_every_two_delta_split(name: str, text: str, expected: Expected) -> None:
    want = _joined(expected)
    for i in range(len(text) + 1):
        assert _stream(name, [text[:i], text[i:]]) == want, i


@pytest.mark.parametrize(("name", "text", "expected"), GOLDEN)
def test_golden_char_by_char(name: str, text: str, expected: Expected) -> None:
    assert _stream(name, list(text)) == _joined(expected)


@pytest.mark.parametrize(("name", "text", "expected"), GOLDEN)
def test_golden_with_empty_deltas(name: str, text: str, expected: Expected) -> None:
    deltas = [d for ch in text for d in ("", ch, "")]
    assert _stream(name, deltas) == _joined(expected)


def test_plain_text_passes_through_at_once() -> None:
    p = make_reasoning_parser("deepseek_r1")
    assert p.feed("thinking hard") == ("thinking hard", "")
    assert p.feed(" more</think>The") == (" more", "The")
    assert p.feed(" answer <think></think>") == ("", " answer <think></think>")
    assert p.finish() == ("", "")

    q = make_reasoning_parser("qwen3")
    assert q.feed("Hello") == ("", "Hello")
    assert q.feed(" <think>") == ("", " <think>")
    assert q.finish() == ("", "")


def test_partial_tags_are_held_until_decided() -> None:
    p = make_reasoning_parser("qwen3")
    assert p.feed("\n<th") == ("", "\n")
    assert p.feed("ink>ab</thi") == ("ab", "")
    assert p.feed("s is not it") == ("</this is not it", "")
    assert p.feed(" <") == (" ", "")
    assert p.feed("/think>\n\nOK") == ("", "\n\nOK")
    assert p.finish() == ("", "")

    m = make_reasoning_parser("mistral")
    assert m.feed("[THI") == ("", "")
    assert m.feed("NK]x[") == ("x", "")
    assert m.feed("/THINK]y") == ("", "y")


def test_finish_flushes_held_partial_tag() -> None:
    p = make_reasoning_parser("deepseek_r1")
    assert p.feed("abc</") == ("abc", "")
    assert p.finish() == ("</", "")

    q = make_reasoning_parser("qwen3")
    assert q.feed("<") == ("", "")
    assert q.finish() == ("", "<")


def test_newline_after_end_tag_is_kept() -> None:
    text = "<think>\nSo 2+2=4.\n</think>\n\n4"
    assert parse_reasoning("deepseek_r1", text) == ("\nSo 2+2=4.\n", "\n\n4")
    assert parse_reasoning("qwen3", text) == ("\nSo 2+2=4.\n", "\n\n4")


def test_held_back_is_bounded() -> None:
    # A long reasoning delta ending in '<' holds back one character, not the whole text.
    p = make_reasoning_parser("deepseek_r1")
    r, c = p.feed("x" * 10_000 + "<")
    assert (len(r), c) == (10_000, "")


def test_registry_and_errors() -> None:
    assert {"deepseek_r1", "qwen3", "basic", "mistral", "step3"} <= set(REASONING_PARSERS)
    for name, factory in REASONING_PARSERS.items():
        assert isinstance(factory(), ReasoningParser), name
        assert factory() is not factory()  # fresh state per call
    assert isinstance(make_reasoning_parser("DeepSeek-R1"), TagReasoningParser)
    with pytest.raises(ValueError, match=r"unknown reasoning parser 'nope'") as info:
        make_reasoning_parser("nope")
    for name in REASONING_PARSERS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        parse_reasoning("granite", "x")
    with pytest.raises(ValueError):
        TagReasoningParser("", "</think>", implicit_start=False)


def _reference(name: str, text: str) -> Expected:
    """The documented semantics, written the slow, obvious way."""
    parser = REASONING_PARSERS[name]()
    assert isinstance(parser, TagReasoningParser)
    start, end, implicit = parser.start_tag, parser.end_tag, parser.implicit_start
    rest = text.lstrip()
    lead = text[: len(text) - len(rest)]
    if rest.startswith(start):
        body = rest[len(start) :]
    elif implicit:
        body = rest
    else:
        return None, text or None
    reasoning, _, content = body.partition(end)
    if implicit:
        reasoning = lead + reasoning
    else:
        content = lead + content
    return reasoning or None, content or None


# Text built mostly from tag fragments so random splits land inside tags.
_PIECES = [
    "<think>",
    "</think>",
    "[THINK]",
    "[/THINK]",
    "<",
    "</",
    "<th",
    "</thi",
    "[",
    "[/TH",
    ">",
    "]",
    "think",
    "\n",
    "\n\n",
    " ",
    "a",
    "é",
    "🤔",
    "x<y",
]
_texts = st.lists(st.sampled_from(_PIECES) | st.text(max_size=3), max_size=12).map("".join)


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(sorted(REASONING_PARSERS)),
    text=_texts,
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
)
def test_random_splits_match_unary(name: str, text: str, cuts: list[int]) -> None:
    points = sorted({min(c, len(text)) for c in cuts})
    deltas = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    assert "".join(deltas) == text
    r, c = _stream(name, deltas)
    assert (r or None, c or None) == parse_reasoning(name, text) == _reference(name, text)
    # Nothing lost: only the tags themselves are removed.
    parser = REASONING_PARSERS[name]()
    assert isinstance(parser, TagReasoningParser)
    removed = len(text) - len(r) - len(c)
    assert removed in {
        0,
        len(parser.start_tag),
        len(parser.end_tag),
        len(parser.start_tag) + len(parser.end_tag),
    }
    assert not Counter(r + c) - Counter(text)


@pytest.mark.parametrize(("name", "text", "expected"), GOLDEN)
def test_golden_matches_reference(name: str, text: str, expected: Expected) -> None:
    assert _reference(name, text) == expected
