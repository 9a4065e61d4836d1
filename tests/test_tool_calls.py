"""Tool-call parsers: golden outputs per format, split invariance, streaming latency, registry."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_backend_common.frontend.tool_calls import (
    TOOL_CALL_PARSERS,
    ToolCall,
    ToolCallParser,
    detect_tool_call_parser,
    make_tool_call_parser,
    parse_tool_calls,
)


def tc(name: str, **arguments: object) -> ToolCall:
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def stream(name: str, deltas: list[str]) -> tuple[str, list[ToolCall], ToolCallParser]:
    parser = make_tool_call_parser(name)
    content: list[str] = []
    calls: list[ToolCall] = []
    for delta in deltas:
        text, new = parser.feed(delta)
        content.append(text)
        calls += new
    text, new = parser.finish()
    return "".join(content) + text, calls + new, parser


# (parser, model output, content, calls)
GOLDEN: list[tuple[str, str, str, list[ToolCall]]] = [
    # --- hermes ---
    ("hermes", "The sky is blue.", "The sky is blue.", []),
    ("hermes", "", "", []),
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        "",
        [tc("get_weather", city="Paris")],
    ),
    (
        "hermes",
        '<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>',
        "",
        [tc("a", x=1), tc("b")],
    ),
    (
        "hermes",
        'Let me check.\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>',
        "Let me check.\n",
        [tc("f")],
    ),
    (
        "hermes",
        '<tool_call>{"name": "f", "arguments": {}}</tool_call>\nDone, see above.',
        "\nDone, see above.",
        [tc("f")],
    ),
    (
        "hermes",
        'A <tool_call>{"name": "f"}</tool_call> B <tool_call>{"name": "g"}</tool_call> C',
        "A  B  C",
        [tc("f"), tc("g")],
    ),
    (
        "hermes",
        '<tool_call>{"name": "translate", "arguments": {"text": "日本語 ☃ é", "to": "中文"}}'
        "</tool_call>",
        "",
        [tc("translate", text="日本語 ☃ é", to="中文")],
    ),
    (
        "hermes",
        '<tool_call>{"name": "q", "arguments": {"filter": {"and": [{"a": [1, 2]}, {"b": null}]},'
        ' "s": "}</tool"}}</tool_call>',
        "",
        [tc("q", filter={"and": [{"a": [1, 2]}, {"b": None}]}, s="}</tool")],
    ),
    (  # arguments as a JSON string holding an object: kept as that string
        "hermes",
        '<tool_call>{"name": "f", "arguments": "{\\"a\\":1}"}</tool_call>',
        "",
        [ToolCall("f", '{"a":1}')],
    ),
    (  # "parameters" accepted, "arguments": null -> {}
        "hermes",
        '<tool_call>{"name": "f", "parameters": {"k": true}}</tool_call>'
        '<tool_call>{"name": "g", "arguments": null}</tool_call>',
        "",
        [tc("f", k=True), tc("g")],
    ),
    (  # malformed JSON -> verbatim content; the good call still counts
        "hermes",
        '<tool_call>{"name": "f", "arguments": {</tool_call> x '
        '<tool_call>{"name": "g"}</tool_call>',
        '<tool_call>{"name": "f", "arguments": {</tool_call> x ',
        [tc("g")],
    ),
    (  # missing name, arguments no object -> content
        "hermes",
        '<tool_call>{"arguments": {}}</tool_call>\n<tool_call>{"name": "f", "arguments": [1]}'
        "</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>\n<tool_call>{"name": "f", "arguments": [1]}'
        "</tool_call>",
        [],
    ),
    (  # NaN is not JSON
        "hermes",
        '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>',
        '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>',
        [],
    ),
    (  # unterminated at the end (truncated output) -> content, with the space before it
        "hermes",
        'Sure.\n\n<tool_call>\n{"name": "f", "argum',
        'Sure.\n\n<tool_call>\n{"name": "f", "argum',
        [],
    ),
    (
        "hermes",
        '<tool_call>{"name": "f"}</tool_call>\n<tool_call>{"name": "g", ',
        '\n<tool_call>{"name": "g", ',
        [tc("f")],
    ),
    ("hermes", "if a < b and c <tool or <x>: [1] <", "if a < b and c <tool or <x>: [1] <", []),
    ("hermes", "partial marker at the end <tool_ca", "partial marker at the end <tool_ca", []),
    ("hermes", "closing only </tool_call> text", "closing only </tool_call> text", []),
    ("hermes", "  \n", "  \n", []),
    (  # whitespace-only gaps around calls are dropped
        "hermes",
        '\n\n<tool_call>{"name": "f"}</tool_call>\n\n<tool_call>{"name": "g"}</tool_call>\n',
        "",
        [tc("f"), tc("g")],
    ),
    (
        "hermes",
        '<tool_call>{"name": "f"}</tool_call>\n<tool_',
        "\n<tool_",
        [tc("f")],
    ),
    # --- mistral ---
    ("mistral", "No tools needed [see 1].", "No tools needed [see 1].", []),
    (
        "mistral",
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]',
        "",
        [tc("get_weather", city="Paris")],
    ),
    (
        "mistral",
        '[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]',
        "",
        [tc("a", x=1), tc("b")],
    ),
    (
        "mistral",
        'I will look that up.[TOOL_CALLS][{"name": "f", "arguments": {"q": "ü"}, '
        '"id": "abc123XYZ"}]',
        "I will look that up.",
        [tc("f", q="ü")],
    ),
    (
        "mistral",
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Zürich", "opts": {"days": [1, 2]}}',
        "",
        [tc("get_weather", city="Zürich", opts={"days": [1, 2]})],
    ),
    (
        "mistral",
        'Checking.[TOOL_CALLS]a{"x": 1}[TOOL_CALLS]b[ARGS]{}',
        "Checking.",
        [tc("a", x=1), tc("b")],
    ),
    (
        "mistral",
        '[TOOL_CALLS]f[CALL_ID]a1b2c3d4e[ARGS]{"k": "v"}',
        "",
        [tc("f", k="v")],
    ),
    (  # malformed: content, verbatim
        "mistral",
        'Hmm [TOOL_CALLS][{"name": "f", "arguments": {]',
        'Hmm [TOOL_CALLS][{"name": "f", "arguments": {]',
        [],
    ),
    (  # one bad segment among good ones
        "mistral",
        '[TOOL_CALLS]a{"x": 1}[TOOL_CALLS]not a call[TOOL_CALLS]c{}',
        "[TOOL_CALLS]not a call",
        [tc("a", x=1), tc("c")],
    ),
    (
        "mistral",
        '[TOOL_CALLS][{"name": "f", "arguments": {}}] and then text',
        '[TOOL_CALLS][{"name": "f", "arguments": {}}] and then text',
        [],
    ),
    ("mistral", "ends with a marker prefix [TOOL_", "ends with a marker prefix [TOOL_", []),
    ("mistral", "[TOOL_CALLS]", "[TOOL_CALLS]", []),
    # --- llama3_json ---
    ("llama3_json", "Paris is the capital of France.", "Paris is the capital of France.", []),
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        "",
        [tc("get_weather", city="Paris")],
    ),
    (
        "llama3_json",
        '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "arguments": {}}',
        "",
        [tc("a", x=1), tc("b")],
    ),
    (
        "llama3_json",
        '\n  {"name": "t", "parameters": {"text": "Ça va? 🙂", "n": {"deep": [{"x": "}"}]}}}\n',
        "",
        [tc("t", text="Ça va? 🙂", n={"deep": [{"x": "}"}]})],
    ),
    (  # a JSON answer that is no call: content, verbatim
        "llama3_json",
        '{"answer": 42, "note": "no name"}',
        '{"answer": 42, "note": "no name"}',
        [],
    ),
    (  # any failing part makes all of it content
        "llama3_json",
        '{"name": "a", "parameters": {}}; oops',
        '{"name": "a", "parameters": {}}; oops',
        [],
    ),
    (
        "llama3_json",
        '{"name": "a", "parameters": {"x": "\\"quoted\\" \\\\"}}',
        "",
        [tc("a", x='"quoted" \\')],
    ),
    (
        "llama3_json",
        '{"name": "a", "parameters": {"x": 1',
        '{"name": "a", "parameters": {"x": 1',
        [],
    ),
    (
        "llama3_json",
        "Use a <b>tag</b> or {braces} later.",
        "Use a <b>tag</b> or {braces} later.",
        [],
    ),
    ("llama3_json", "<|python_ta", "<|python_ta", []),
    (
        "llama3_json",
        "<|python_tag|>brave_search.call(q=1)",
        "<|python_tag|>brave_search.call(q=1)",
        [],
    ),
    ("llama3_json", " \n", " \n", []),
    # --- pythonic ---
    ("pythonic", "The answer is 4.", "The answer is 4.", []),
    (
        "pythonic",
        '[get_weather(city="Paris", unit="celsius")]',
        "",
        [tc("get_weather", city="Paris", unit="celsius")],
    ),
    (
        "pythonic",
        "[get_weather(city='Paris'), get_time(tz=\"Europe/Paris\", exact=True, n=None)]",
        "",
        [tc("get_weather", city="Paris"), tc("get_time", tz="Europe/Paris", exact=True, n=None)],
    ),
    (
        "pythonic",
        "  [search(q='naïve café ☕', filters={'year': [2020, 2021], 'tags': ('a', 'b')},"
        " k=-3.5)]\n",
        "",
        [
            tc(
                "search",
                q="naïve café ☕",
                filters={"year": [2020, 2021], "tags": ["a", "b"]},
                k=-3.5,
            )
        ],
    ),
    ("pythonic", "[ping()]", "", [tc("ping")]),
    (
        "pythonic",
        "<|python_start|>[f(a=1)]<|python_end|>",
        "",
        [tc("f", a=1)],
    ),
    ("pythonic", "[f('positional')]", "[f('positional')]", []),
    ("pythonic", "[f(a=x)]", "[f(a=x)]", []),  # not a literal
    ("pythonic", "[f(a={1, 2})]", "[f(a={1, 2})]", []),  # a set is no JSON
    ("pythonic", "[f(a=1), 3]", "[f(a=1), 3]", []),
    ("pythonic", "[f(a=1)] and some text", "[f(a=1)] and some text", []),
    ("pythonic", "[f(a=1", "[f(a=1", []),
    ("pythonic", "[1] Reference one", "[1] Reference one", []),
    ("pythonic", "[Paris](https://x.org) is nice", "[Paris](https://x.org) is nice", []),
    ("pythonic", "[]", "[]", []),
    ("pythonic", "Lists like [a, b] are fine", "Lists like [a, b] are fine", []),
    ("pythonic", "<|python_sta", "<|python_sta", []),
    ("pythonic", "<b>bold</b>", "<b>bold</b>", []),
]


def _ids() -> list[str]:
    return [f"{name}-{i}" for i, (name, *_rest) in enumerate(GOLDEN)]


@pytest.mark.parametrize(("name", "text", "content", "calls"), GOLDEN, ids=_ids())
def test_golden(name: str, text: str, content: str, calls: list[ToolCall]) -> None:
    assert parse_tool_calls(name, text) == (content, calls)
    for i in range(len(text) + 1):
        got_content, got_calls, parser = stream(name, [text[:i], text[i:]])
        assert (got_content, got_calls) == (content, calls), f"split at {i}"
        assert parser.saw_tool_call == bool(calls)
    assert stream(name, list(text))[:2] == (content, calls)
    for call in calls:
        assert isinstance(json.loads(call.arguments), dict)


@given(
    case=st.sampled_from(GOLDEN),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12),
)
@settings(max_examples=300, deadline=None)
def test_random_splits_of_golden(
    case: tuple[str, str, str, list[ToolCall]], cuts: list[int]
) -> None:
    name, text, content, calls = case
    points = sorted({min(c, len(text)) for c in cuts})
    deltas = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    assert stream(name, deltas)[:2] == (content, calls)


_PIECES = [
    "<tool_call>",
    "</tool_call>",
    "<tool_",
    "[TOOL_CALLS]",
    "[TOOL_",
    "[ARGS]",
    "<|python_tag|>",
    "<|python_start|>",
    "<|python_end|>",
    "<",
    "[",
    "]",
    "{",
    "}",
    "(",
    ")",
    '"',
    "\\",
    ";",
    ",",
    " ",
    "\n",
    "=",
    ":",
    "a",
    "é",
    '"name"',
    '"arguments"',
    '"parameters"',
    '"f"',
    "f",
    "x=1",
    '{"name": "f", "arguments": {}}',
    '{"name": "g", "parameters": {"a": [1, "}"]}}',
    "1",
    "'s'",
    "[f(a=1)",
    ", g()",
    "f{}",
]


@given(
    name=st.sampled_from(sorted(TOOL_CALL_PARSERS)),
    pieces=st.lists(st.sampled_from(_PIECES), max_size=25),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=10),
)
@settings(max_examples=1500, deadline=None)
def test_split_invariance_and_nothing_lost(name: str, pieces: list[str], cuts: list[int]) -> None:
    text = "".join(pieces)
    content, calls = parse_tool_calls(name, text)
    points = sorted({min(c, len(text)) for c in cuts})
    deltas = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    assert stream(name, deltas)[:2] == (content, calls)
    assert stream(name, list(text))[:2] == (content, calls)
    if not calls:
        assert content == text
    for call in calls:
        assert isinstance(json.loads(call.arguments), dict)


@pytest.mark.parametrize("name", sorted(TOOL_CALL_PARSERS))
def test_plain_text_passes_straight_through(name: str) -> None:
    parser = make_tool_call_parser(name)
    assert parser.feed("Hello world") == ("Hello world", [])
    assert parser.feed(", more text.\n") == (", more text.\n", [])
    assert parser.finish() == ("", [])
    assert not parser.saw_tool_call


def test_hermes_streaming_timing() -> None:
    parser = make_tool_call_parser("hermes")
    assert parser.feed("Let me check <tool") == ("Let me check ", [])
    assert parser.feed('_call>\n{"name": "f", ') == ("", [])
    assert not parser.saw_tool_call
    assert parser.feed('"arguments": {"a": 1}}\n</tool_') == ("", [])
    assert parser.feed("call>\nafter") == ("\nafter", [tc("f", a=1)])
    assert parser.saw_tool_call
    assert parser.feed(" <b>") == (" <b>", [])
    assert parser.finish() == ("", [])


def test_hermes_lone_angle_bracket_is_decided_by_next_char() -> None:
    parser = make_tool_call_parser("hermes")
    assert parser.feed("a <") == ("a ", [])
    assert parser.feed("= b") == ("<= b", [])


def test_mistral_streaming_timing() -> None:
    parser = make_tool_call_parser("mistral")
    assert parser.feed("Sure [TOOL") == ("Sure ", [])
    assert parser.feed('_CALLS]a{"x": 1}') == ("", [])
    assert parser.feed("[TOOL_CALLS]b{}") == ("", [tc("a", x=1)])
    assert parser.finish() == ("", [tc("b")])


def test_llama3_json_answer_released_when_first_object_closes() -> None:
    parser = make_tool_call_parser("llama3_json")
    assert parser.feed('{"answer": {"v": "}"}') == ("", [])
    assert parser.feed('}, "more": 1') == ('{"answer": {"v": "}"}}, "more": 1', [])
    assert parser.feed("}") == ("}", [])
    assert parser.finish() == ("", [])


def test_llama3_json_calls_come_at_finish() -> None:
    parser = make_tool_call_parser("llama3_json")
    assert parser.feed('<|python_tag|>{"name": "f", "parameters": {}}') == ("", [])
    assert parser.finish() == ("", [tc("f")])
    assert parser.saw_tool_call


def test_pythonic_not_a_call_released_early() -> None:
    parser = make_tool_call_parser("pythonic")
    assert parser.feed("[Par") == ("", [])
    assert parser.feed("is](url)") == ("[Paris](url)", [])
    assert parser.feed(" rest") == (" rest", [])


def test_long_output_is_linear() -> None:
    body = "word " * 20000
    text = (
        f'{body}<tool_call>{{"name": "f", "arguments": {{"s": "{"x" * 20000}"}}}}</tool_call>{body}'
    )
    deltas = [text[i : i + 3] for i in range(0, len(text), 3)]
    content, calls, _ = stream("hermes", deltas)
    assert content == body + body
    assert calls == [tc("f", s="x" * 20000)]


def test_detect_tool_call_parser() -> None:
    qwen = '{%- if tools %}<tools>{{ tool | tojson }}</tools> ... <tool_call>\\n{"name": ...'
    assert detect_tool_call_parser(qwen) == "hermes"
    assert detect_tool_call_parser("{{ '[AVAILABLE_TOOLS]' }} ... [TOOL_CALLS]") == "mistral"
    llama31 = "{%- if builtin_tools %}<|python_tag|>{{ tool_call.name }}.call("
    assert detect_tool_call_parser(llama31) == "llama3_json"
    llama32 = (
        "<|start_header_id|>ipython<|end_header_id|> Respond in the format "
        '{"name": function name, "parameters": dictionary of argument name and its value}.'
    )
    assert detect_tool_call_parser(llama32) == "llama3_json"
    pythonic = (
        "If you decide to invoke any of the function(s), you MUST put it in the format of "
        "[func_name1(params_name1=params_value1, params_name2=params_value2...), "
        "func_name2(params)] <|start_header_id|>ipython<|end_header_id|> parameters"
    )
    assert detect_tool_call_parser(pythonic) == "pythonic"
    assert detect_tool_call_parser("{{ messages[0]['content'] }}") is None
    assert detect_tool_call_parser("") is None
    assert detect_tool_call_parser(None) is None


def test_registry() -> None:
    assert set(TOOL_CALL_PARSERS) == {
        "hermes",
        "llama3_json",
        "llama4_json",
        "llama4_pythonic",
        "mistral",
        "pythonic",
    }
    for name, factory in TOOL_CALL_PARSERS.items():
        assert isinstance(factory(), ToolCallParser), name
    with pytest.raises(ValueError, match="nope") as info:
        make_tool_call_parser("nope")
    assert "hermes" in str(info.value) and "pythonic" in str(info.value)
