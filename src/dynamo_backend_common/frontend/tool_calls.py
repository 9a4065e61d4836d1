"""Model output text -> OpenAI tool calls, streamed or whole (``--tool-call-parser``).

Engines such as vLLM (``vllm/entrypoints/openai/tool_parsers``) and NVIDIA Dynamo
(``lib/parsers/src/tool_calling``) turn the text a model writes to call a tool into
``tool_calls``. This module does the same as a pure text state machine:
:func:`make_tool_call_parser` gives a per-choice streaming parser whose
:meth:`~ToolCallParser.feed` takes each text delta and returns ``(content, calls)`` to emit now
and whose :meth:`~ToolCallParser.finish` flushes what it held back at the end of the stream;
:func:`parse_tool_calls` parses a whole output at once.

Formats (names as vLLM and Dynamo register them):

* ``hermes`` (Hermes 2 Pro / 3, Qwen2.5, QwQ, Qwen3): any number of
  ``<tool_call>{"name": "f", "arguments": {...}}</tool_call>`` blocks, with content before,
  between and after them. A block is a call when its body is one JSON object with a non-empty
  string ``name`` and an ``arguments`` (or ``parameters``) object; it is returned at its
  ``</tool_call>``.
* ``mistral``: content, then ``[TOOL_CALLS]`` and either a JSON array of such objects (or one
  object; tokenizers before v11) or ``name{...}`` / ``name[ARGS]{...}`` (v11+, one call per
  ``[TOOL_CALLS]``; ``[CALL_ID]id`` after the name is ignored). Everything after the first
  ``[TOOL_CALLS]`` is calls: each segment is returned when the next ``[TOOL_CALLS]`` starts
  or at :meth:`~ToolCallParser.finish`.
* ``llama3_json`` = ``llama4_json``: the whole output (after leading whitespace) is an optional
  ``<|python_tag|>``, then one or more ``{"name": ..., "parameters": {...}}`` objects
  (``arguments`` also accepted) separated by ``;``. Output not starting with ``{`` or
  ``<|python_tag|>`` is content, passed through at once.
* ``pythonic`` = ``llama4_pythonic`` (Llama 3.2 / 4, ToolACE): the whole output (after
  whitespace, an optional ``<|python_start|>`` ... ``<|python_end|>`` around it) is a Python
  list of keyword-only calls with literal values: ``[f(city="Paris"), g()]``. It must start
  with ``[``, an identifier and ``(``; anything else is content, decided as soon as it cannot
  match (``[1]``, ``[Paris](url)`` stream at once).

Calls of these two whole-output formats come back at :meth:`~ToolCallParser.finish`: a later
part that fails to parse makes the whole output content, as vLLM does, so none can be returned
early. For ``llama3_json`` the first object is checked as soon as it closes, and an output whose
first object is no call (a JSON answer) is released as content then, not at the end.

Rules:

* Split invariance: for every way of cutting an output into deltas, the concatenated content and
  the list of calls equal :func:`parse_tool_calls` of the whole text (one ``feed`` plus
  ``finish``). Content that may be the start of a marker (``<tool_call>``, ``[TOOL_CALLS]``,
  ``<|python_tag|>``, ``<|python_start|>``) is held back until the next delta decides it, as a
  stop-string matcher does; other content is emitted at once, so plain text with no ``<`` or
  ``[`` passes straight through on the same ``feed`` call.
* Nothing lost: text that does not parse as a call (bad JSON, no name, arguments that are no
  object, a ``<tool_call>`` still open at the end, a whole-output format that fails anywhere)
  is content, verbatim. The one thing dropped besides consumed markers is whitespace-only text
  between the start of the output or a returned call and the next call or the end of the output
  (``"\\n"`` between ``</tool_call>`` and ``<tool_call>``). So an output with no call comes back
  as content exactly. Nothing raises on model output.
* ``ToolCall.arguments`` is the JSON text of an object, ``json.dumps(obj, ensure_ascii=False)``
  (``"{}"`` when absent, null or ``""``); arguments written as a JSON string holding an object
  are kept as that string. NaN / Infinity are not JSON: such a call is content.
* Cheap: a ``feed`` looks at the delta plus at most a marker's length of held text (a ``find``
  per delta in content); only the current call is buffered (hermes, mistral), or the whole
  output once it started as a call (llama3_json, pythonic), in a list joined once.
"""

from __future__ import annotations

import ast
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Final

__all__ = [
    "KEEPS_SPECIAL_TOKENS",
    "TOOL_CALL_PARSERS",
    "ToolCall",
    "ToolCallParser",
    "detect_tool_call_parser",
    "make_tool_call_parser",
    "parse_tool_calls",
]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One complete tool call: the function name and its arguments as JSON object text."""

    name: str
    arguments: str


class ToolCallParser(ABC):
    """Incremental: feed text deltas, get ``(content_to_emit_now, completed_tool_calls)``.

    One instance per choice; call :meth:`finish` once, after the last :meth:`feed`.
    """

    def __init__(self) -> None:
        self._saw_tool_call = False

    @abstractmethod
    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """Take the next delta; return the content and the calls that are decided now."""

    @abstractmethod
    def finish(self) -> tuple[str, list[ToolCall]]:
        """End of stream: return what was held back (as content or calls)."""

    @property
    def saw_tool_call(self) -> bool:
        """True once any tool call was returned."""
        return self._saw_tool_call


# --- JSON helpers ---------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"not JSON: {name}")


_DECODER: Final = json.JSONDecoder(parse_constant=_reject_constant)


def _loads(text: str) -> Any:
    """``json.loads`` without NaN / Infinity; raises ``ValueError`` / ``RecursionError``."""
    return _DECODER.decode(text)


def _dumps(obj: Any) -> str | None:
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return None


def _arguments_json(value: Any) -> str | None:
    """The ``arguments`` text for a parsed arguments value, ``None`` when it is no object."""
    if value is None:
        return "{}"
    if isinstance(value, dict):
        return _dumps(value)
    if isinstance(value, str):
        if not value.strip():
            return "{}"
        try:
            parsed = _loads(value)
        except (ValueError, RecursionError):
            return None
        return value if isinstance(parsed, dict) else None
    return None


def _call_from_object(obj: Any) -> ToolCall | None:
    """``{"name": str, "arguments" | "parameters": object}`` -> call, else ``None``."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return None
    args = obj["arguments"] if "arguments" in obj else obj.get("parameters")
    arguments = _arguments_json(args)
    return None if arguments is None else ToolCall(name, arguments)


def _partial_marker_len(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    first = marker[0]
    i = text.find(first, max(0, len(text) - len(marker) + 1))
    while i != -1:
        if marker.startswith(text[i:]):
            return len(text) - i
        i = text.find(first, i + 1)
    return 0


# --- marker-delimited formats (hermes, mistral) ---------------------------------------------


class _DelimitedParser(ToolCallParser):
    """Content with calls that open at ``_START`` and close at ``_END``.

    With ``_END = None`` a call runs to the next ``_START`` (which opens the next call) or to the
    end of the output, so once the first call opens, all the rest is calls.
    """

    _START: ClassVar[str]
    _END: ClassVar[str | None]

    def __init__(self) -> None:
        super().__init__()
        self._pending = ""  # content held back: a possible partial marker (or boundary space)
        self._boundary = True  # at output start / after a call: whitespace-only gap is dropped
        self._in_call = False
        self._lead = ""  # whitespace dropped before the open call's marker
        self._parts: list[str] = []  # the open call's body
        self._tail = ""  # the body's last len(delimiter) - 1 characters

    @abstractmethod
    def _parse_body(self, body: str) -> list[ToolCall] | None:
        """The calls a closed call's body holds, ``None`` when it is malformed."""

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        if not (self._in_call or self._pending or self._boundary) and self._START[0] not in text:
            return text, []
        content: list[str] = []
        calls: list[ToolCall] = []
        while text:
            if self._in_call:
                text = self._feed_call(text, content, calls)
            else:
                text = self._feed_content(text, content)
        return "".join(content), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        content: list[str] = []
        calls: list[ToolCall] = []
        if self._in_call:
            body = "".join(self._parts)
            if self._END is None:
                self._close_call(body, content, calls)
            else:  # unterminated: the model's text, as written
                content.append(self._lead + self._START + body)
            self._in_call = False
        elif self._pending and not (
            self._boundary and self._saw_tool_call and not self._pending.strip()
        ):
            content.append(self._pending)
        self._pending = ""
        return "".join(content), calls

    def _feed_content(self, delta: str, content: list[str]) -> str:
        """Emit content from ``pending + delta``; return the text after a start marker."""
        text = self._pending + delta if self._pending else delta
        self._pending = ""
        start = self._START
        if self._boundary:
            rest = text.lstrip()
            if rest.startswith(start):
                self._open_call(text[: len(text) - len(rest)])
                return rest[len(start) :]
            if not rest or start.startswith(rest):
                self._pending = text
                return ""
            self._boundary = False
        i = text.find(start)
        if i >= 0:
            if i:
                content.append(text[:i])
            self._open_call("")
            return text[i + len(start) :]
        hold = _partial_marker_len(text, start)
        if hold:
            self._pending = text[-hold:]
            text = text[:-hold]
        if text:
            content.append(text)
        return ""

    def _feed_call(self, delta: str, content: list[str], calls: list[ToolCall]) -> str:
        """Buffer the open call's body; at its delimiter close it, return the text after."""
        delim = self._END or self._START
        window = self._tail + delta
        j = window.find(delim)
        if j < 0:
            self._parts.append(delta)
            keep = len(delim) - 1
            self._tail = window[-keep:] if len(window) > keep else window
            return ""
        cut = j - len(self._tail)  # delimiter start, relative to delta (may be negative)
        if cut >= 0:
            self._parts.append(delta[:cut])
            body = "".join(self._parts)
        else:
            body = "".join(self._parts)[:cut]
        rest = delta[cut + len(delim) :]
        self._parts = []
        self._tail = ""
        self._close_call(body, content, calls)
        if self._END is None:
            self._open_call("")
        else:
            self._in_call = False
        return rest

    def _open_call(self, lead: str) -> None:
        self._in_call = True
        self._lead = lead
        self._parts = []
        self._tail = ""

    def _close_call(self, body: str, content: list[str], calls: list[ToolCall]) -> None:
        parsed = self._parse_body(body)
        if parsed:
            calls.extend(parsed)
            self._saw_tool_call = True
            self._boundary = True
        else:
            content.append(self._lead + self._START + body + (self._END or ""))
            self._boundary = False
        self._lead = ""


class HermesToolCallParser(_DelimitedParser):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks among content."""

    _START = "<tool_call>"
    _END = "</tool_call>"

    def _parse_body(self, body: str) -> list[ToolCall] | None:
        try:
            call = _call_from_object(_loads(body.strip()))
        except (ValueError, RecursionError):
            return None
        return None if call is None else [call]


_MISTRAL_NAME: Final = re.compile(r"[\w.\-]+")


class MistralToolCallParser(_DelimitedParser):
    """Content, then ``[TOOL_CALLS]`` + a JSON array of calls or ``name[ARGS]{...}`` each."""

    _START = "[TOOL_CALLS]"
    _END = None

    def _parse_body(self, body: str) -> list[ToolCall] | None:
        text = body.strip()
        if not text:
            return None
        if text[0] in "[{":  # before v11: [{"name": ..., "arguments": {...}}, ...]
            try:
                value = _loads(text)
            except (ValueError, RecursionError):
                return None
            items = value if isinstance(value, list) else [value]
            calls = [_call_from_object(item) for item in items]
            if not calls or None in calls:
                return None
            return [call for call in calls if call is not None]
        brace = text.find("{")  # v11+: name[ARGS]{...}, maybe name[CALL_ID]id[ARGS]{...}
        if brace < 0:
            return None
        name = text[:brace].partition("[CALL_ID]")[0].replace("[ARGS]", "").strip()
        if not _MISTRAL_NAME.fullmatch(name):
            return None
        try:
            args = _loads(text[brace:])
        except (ValueError, RecursionError):
            return None
        arguments = _dumps(args) if isinstance(args, dict) else None
        return None if arguments is None else [ToolCall(name, arguments)]


# --- whole-output formats (llama3_json, pythonic) -------------------------------------------

_DECIDING: Final = 0
_CONTENT: Final = 1
_CALLS: Final = 2


class _WholeOutputParser(ToolCallParser):
    """Output that is all calls (told by its first non-space characters) or all content."""

    _TAG: ClassVar[str]  # optional special token before the calls
    _OPEN: ClassVar[str]  # first character of the calls

    def __init__(self) -> None:
        super().__init__()
        self._mode = _DECIDING
        self._parts: list[str] = []  # all text so far, unless in content mode
        self._head = ""  # text from the first non-space character, while deciding

    @abstractmethod
    def _check(self, text: str) -> bool:
        """Take text after the tag; ``False`` once the output can no longer be calls."""

    @abstractmethod
    def _parse(self, text: str) -> list[ToolCall] | None:
        """The calls of the whole output, ``None`` when it is not (all) calls."""

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        if self._mode == _CONTENT:
            return text, []
        self._parts.append(text)
        if self._mode == _CALLS:
            return ("", []) if self._check(text) else self._release()
        if not self._head:
            text = text.lstrip()
            if not text:
                return "", []
        self._head += text
        head = self._head
        if head[0] == self._OPEN:
            rest = head
        elif head.startswith(self._TAG):
            rest = head[len(self._TAG) :]
        elif self._TAG.startswith(head):
            return "", []
        else:
            return self._release()
        self._mode = _CALLS
        self._head = ""
        return ("", []) if self._check(rest) else self._release()

    def finish(self) -> tuple[str, list[ToolCall]]:
        if self._mode == _CONTENT:
            return "", []
        text = "".join(self._parts)
        self._parts = []
        calls = self._parse(text) if self._mode == _CALLS else None
        self._mode = _CONTENT
        if calls:
            self._saw_tool_call = True
            return "", calls
        return text, []

    def _release(self) -> tuple[str, list[ToolCall]]:
        """Not calls: everything held is content, and so is all that follows."""
        text = "".join(self._parts)
        self._parts = []
        self._head = ""
        self._mode = _CONTENT
        return text, []


_JSON_SPECIAL: Final = re.compile(r'[{}"\\]')
_SEMICOLON: Final = re.compile(r"\s*;")


class Llama3JsonToolCallParser(_WholeOutputParser):
    """``<|python_tag|>``? ``{"name": ..., "parameters": {...}}`` (``; {...}``)* as the output."""

    _TAG = "<|python_tag|>"
    _OPEN = "{"

    def __init__(self) -> None:
        super().__init__()
        self._phase = 0  # 0: before the first object, 1: in it, 2: it was a call
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._first: list[str] = []  # the first object's text

    def _check(self, text: str) -> bool:
        if self._phase == 0:
            text = text.lstrip()
            if not text:
                return True
            if text[0] != "{":
                return False
            self._phase = 1
        if self._phase == 1:
            end = self._scan(text)
            if end is None:
                self._first.append(text)
                return True
            self._first.append(text[:end])
            self._phase = 2
            try:
                return _call_from_object(_loads("".join(self._first))) is not None
            except (ValueError, RecursionError):
                return False
        return True

    def _scan(self, text: str) -> int | None:
        """Where the first object ends in ``text`` (index after its ``}``), if it does."""
        pos = 0
        if self._escape:
            if not text:
                return None
            self._escape = False
            pos = 1
        while (m := _JSON_SPECIAL.search(text, pos)) is not None:
            char = m.group()
            pos = m.end()
            if self._in_string:
                if char == '"':
                    self._in_string = False
                elif char == "\\":
                    if pos == len(text):
                        self._escape = True
                        return None
                    pos += 1
            elif char == '"':
                self._in_string = True
            elif char == "{":
                self._depth += 1
            elif char == "}":
                self._depth -= 1
                if self._depth == 0:
                    return pos
        return None

    def _parse(self, text: str) -> list[ToolCall] | None:
        text = text.lstrip()
        if text.startswith(self._TAG):
            text = text[len(self._TAG) :]
        text = text.rstrip()
        calls: list[ToolCall] = []
        pos = 0
        while True:
            rest = text[pos:].lstrip()
            pos = len(text) - len(rest)
            if not rest:
                return calls or None
            if rest[0] != "{":
                return None
            try:
                obj, pos = _DECODER.raw_decode(text, pos)
            except (ValueError, RecursionError):
                return None
            call = _call_from_object(obj)
            if call is None:
                return None
            calls.append(call)
            if pos == len(text):
                return calls
            m = _SEMICOLON.match(text, pos)
            if m is None:
                return None
            pos = m.end()


class PythonicToolCallParser(_WholeOutputParser):
    """``[f(a=1, b="x"), g()]`` as the output, maybe in ``<|python_start|>...<|python_end|>``."""

    _TAG = "<|python_start|>"
    _END_TAG: ClassVar[str] = "<|python_end|>"
    _OPEN = "["

    def __init__(self) -> None:
        super().__init__()
        # 0: before "[", 1: after "[", 2: in the first name, 3: after it, 4: saw "(" (committed)
        self._phase = 0

    def _check(self, text: str) -> bool:
        phase = self._phase
        for char in text:
            if phase == 4:
                break
            if char.isspace():
                phase = 3 if phase == 2 else phase
            elif phase == 0:
                if char != "[":
                    return False
                phase = 1
            elif phase == 1:
                if not char.isidentifier():
                    return False
                phase = 2
            elif char == "(":
                phase = 4
            elif phase == 3 or not ("_" + char).isidentifier():
                return False
        self._phase = phase
        return True

    def _parse(self, text: str) -> list[ToolCall] | None:
        text = text.strip()
        if text.startswith(self._TAG):
            text = text[len(self._TAG) :]
        if text.endswith(self._END_TAG):
            text = text[: -len(self._END_TAG)]
        self._phase = 0
        if not self._check(text) or self._phase != 4:
            return None
        try:
            tree = ast.parse(text.strip(), mode="eval")
        except Exception:  # SyntaxError, ValueError (NUL), RecursionError, MemoryError
            return None
        if not isinstance(tree.body, ast.List) or not tree.body.elts:
            return None
        calls: list[ToolCall] = []
        for node in tree.body.elts:
            call = _pythonic_call(node)
            if call is None:
                return None
            calls.append(call)
        return calls


def _pythonic_call(node: ast.expr) -> ToolCall | None:
    """``name(key=literal, ...)`` -> call; positional or ``**`` arguments -> ``None``."""
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
        return None
    args: dict[str, Any] = {}
    for keyword in node.keywords:
        if keyword.arg is None or keyword.arg in args:
            return None
        try:
            args[keyword.arg] = ast.literal_eval(keyword.value)
        except Exception:  # ValueError, TypeError, SyntaxError, RecursionError, MemoryError
            return None
    arguments = _dumps(args)
    return None if arguments is None else ToolCall(node.func.id, arguments)


# --- registry -------------------------------------------------------------------------------

TOOL_CALL_PARSERS: Final[Mapping[str, Callable[[], ToolCallParser]]] = MappingProxyType(
    {
        "hermes": HermesToolCallParser,
        "llama3_json": Llama3JsonToolCallParser,
        "llama4_json": Llama3JsonToolCallParser,
        "llama4_pythonic": PythonicToolCallParser,
        "mistral": MistralToolCallParser,
        "pythonic": PythonicToolCallParser,
    }
)


#: Parsers whose markers are special tokens (Mistral's ``[TOOL_CALLS]``): the text they read
#: must keep special tokens (``skip_special_tokens`` false), as vLLM does for them.
KEEPS_SPECIAL_TOKENS: Final = frozenset({"mistral"})


def make_tool_call_parser(name: str) -> ToolCallParser:
    """A new streaming parser for the format ``name``; ``ValueError`` for an unknown name."""
    factory = TOOL_CALL_PARSERS.get(name)
    if factory is None:
        known = ", ".join(sorted(TOOL_CALL_PARSERS))
        raise ValueError(f"unknown tool call parser {name!r} (known: {known})")
    return factory()


def detect_tool_call_parser(chat_template: str | None) -> str | None:
    """The parser a chat template's tool-call format implies, ``None`` when it shows none."""
    if not chat_template:
        return None
    if "<tool_call>" in chat_template:
        return "hermes"
    if "[TOOL_CALLS]" in chat_template:
        return "mistral"
    if "[func_name1(" in chat_template:  # Llama 3.2 / 4 pythonic system prompt
        return "pythonic"
    if "<|python_tag|>" in chat_template or (
        "ipython" in chat_template and "parameters" in chat_template
    ):
        return "llama3_json"
    return None


def parse_tool_calls(name: str, text: str) -> tuple[str, list[ToolCall]]:
    """Parse a whole output: ``feed(text)`` then ``finish()``, concatenated."""
    parser = make_tool_call_parser(name)
    content, calls = parser.feed(text)
    tail, more = parser.finish()
    return content + tail, calls + more
