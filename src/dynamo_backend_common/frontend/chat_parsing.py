"""Chat output parsing: ``tool_choice`` semantics and the per-choice parser chain.

A chat choice's text goes through a :class:`ChoiceParser`: first the reasoning parser (the
model's reasoning -> ``reasoning_content``), then the tool-call parser on what is left (tool
calls -> ``tool_calls``, the rest -> ``content``). Either stage may be absent; a request with
neither never builds a parser, so plain chat pays nothing.

``tool_choice`` (:func:`resolve_tool_choice`):

- ``"none"`` (the default without ``tools``): the output is content, never parsed for calls.
- ``"auto"`` (the default with ``tools``): the model's own tool-call syntax is parsed by the
  model's tool-call parser (``--tool-call-parser``, the worker's card, or detected from the chat
  template); without one the request is refused (400), since its calls would come back as text.
- ``"required"``: the output is constrained (guided decoding) to a JSON array of
  ``{"name", "parameters"}`` objects naming the request's tools, parsed into tool calls.
- ``{"type": "function", "function": {"name": N}}``: the output is constrained to N's
  ``parameters`` schema and returned as one call of N.

``parallel_tool_calls: false`` keeps at most the first call (the guided forms ask for one).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..protocols.common import GuidedDecodingOptions
from .openai_types import ChatCompletionRequest, FunctionCall, RequestError
from .reasoning import ReasoningParser
from .tool_calls import ToolCall, ToolCallParser

__all__ = ["ChoiceParser", "Parsed", "ToolChoice", "new_tool_call_id", "resolve_tool_choice"]


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """A validated ``tool_choice``: ``mode`` and, for ``named``, the function ``name``."""

    mode: Literal["none", "auto", "required", "named"]
    name: str | None = None
    #: The guided-decoding constraint ``required`` / ``named`` put on the output.
    guided: GuidedDecodingOptions | None = None


def _tool_names(tools: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """``name -> parameters schema`` of the request's tools; 400 on a malformed tool."""
    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not (
                isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]):
            raise RequestError(
                'each tool must be {"type": "function", "function": {"name": ..., '
                '"parameters": {...}}}', code="invalid_value", param=f"tools[{i}]")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise RequestError("function.parameters must be a JSON schema object",
                               code="invalid_type", param=f"tools[{i}].function.parameters")
        out[fn["name"]] = params if params is not None else {"type": "object"}
    return out


def resolve_tool_choice(req: ChatCompletionRequest) -> ToolChoice:
    """Validate ``tools`` / ``tool_choice`` / ``parallel_tool_calls``; see the module doc.

    Raises :class:`RequestError` for a malformed tool, a ``tool_choice`` other than the four
    forms, a named function that is not in ``tools``, or ``required`` / named without tools.
    """
    tools = req.tools or []
    names = _tool_names(tools) if tools else {}
    tc = req.tool_choice
    if tc is None:
        return ToolChoice("auto" if tools else "none")
    if tc in ("none", "auto", "required"):
        if tc != "none" and not tools:
            raise RequestError(f"tool_choice {tc!r} needs tools", code="invalid_value",
                               param="tool_choice")
        if tc == "required":
            return ToolChoice("required", guided=GuidedDecodingOptions(
                json=_required_schema(names, one=req.parallel_tool_calls is False)))
        return ToolChoice(tc)
    fn = tc.get("function") if isinstance(tc, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(tc, dict) or tc.get("type") != "function" or not isinstance(name, str):
        raise RequestError('tool_choice must be "none", "auto", "required" or {"type": '
                           '"function", "function": {"name": ...}}', code="invalid_value",
                           param="tool_choice")
    if name not in names:
        raise RequestError(f"tool_choice names {name!r}, which is not in tools "
                           f"({sorted(names) or 'none'})", code="invalid_value",
                           param="tool_choice")
    return ToolChoice("named", name=name, guided=GuidedDecodingOptions(json=names[name]))


def _required_schema(names: dict[str, dict[str, Any]], *, one: bool) -> dict[str, Any]:
    # vLLM's form: an array of {"name", "parameters"}, each item one of the tools.
    items = [{"type": "object",
              "properties": {"name": {"type": "string", "enum": [n]}, "parameters": p},
              "required": ["name", "parameters"]} for n, p in names.items()]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": items[0] if len(items) == 1 else {"anyOf": items}}
    if one:
        schema["maxItems"] = 1
    return schema


def new_tool_call_id() -> str:
    """A fresh ``call_...`` id, unique per call."""
    return "call_" + uuid.uuid4().hex[:24]


class _WholeOutputParser(ToolCallParser):
    """Base of the guided forms: the whole output is held and parsed at the end."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._saw = False

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._parts.append(text)
        return "", []

    @property
    def saw_tool_call(self) -> bool:
        return self._saw

    def finish(self) -> tuple[str, list[ToolCall]]:
        text = "".join(self._parts)
        self._parts.clear()
        calls = self._calls(text)
        if calls is None:
            return text, []  # not what the constraint promised: the text, verbatim
        self._saw = bool(calls)
        return "", calls

    def _calls(self, text: str) -> list[ToolCall] | None:
        raise NotImplementedError


class NamedToolParser(_WholeOutputParser):
    """``tool_choice`` naming a function: the output is that function's arguments object."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def _calls(self, text: str) -> list[ToolCall] | None:
        try:
            obj = json.loads(text)
        except ValueError:
            return None
        if not isinstance(obj, dict):
            return None
        return [ToolCall(name=self.name, arguments=json.dumps(obj, ensure_ascii=False))]


class RequiredToolParser(_WholeOutputParser):
    """``tool_choice: "required"``: the output is ``[{"name", "parameters"}, ...]``."""

    def _calls(self, text: str) -> list[ToolCall] | None:
        try:
            items = json.loads(text)
        except ValueError:
            return None
        if not isinstance(items, list) or not items:
            return None
        calls = []
        for it in items:
            if not (isinstance(it, dict) and isinstance(it.get("name"), str)
                    and isinstance(it.get("parameters", {}), dict)):
                return None
            calls.append(ToolCall(name=it["name"], arguments=json.dumps(
                it.get("parameters", {}), ensure_ascii=False)))
        return calls


@dataclass(slots=True)
class Parsed:
    """What one step of a :class:`ChoiceParser` yields for the client."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


class ChoiceParser:
    """Reasoning parser, then tool-call parser, over one choice's text deltas.

    ``feed`` returns the step's content as a plain ``str`` when that is all it holds (the
    common case, kept cheap), else a :class:`Parsed`; ``finish`` always a :class:`Parsed`.
    Concatenating every step's fields gives the same result however the text was split.
    ``max_calls`` (1 for ``parallel_tool_calls: false``) drops the calls after the first ones;
    ``tool_calls_made`` counts those returned.
    """

    __slots__ = ("_max_calls", "_reasoning", "_tools", "tool_calls_made")

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolCallParser | None, *,
                 max_calls: int | None = None) -> None:
        self._reasoning = reasoning
        self._tools = tools
        self._max_calls = max_calls
        self.tool_calls_made = 0

    def feed(self, text: str) -> Parsed | str:
        if not text:
            return ""
        reasoning = ""
        content = text
        if self._reasoning is not None:
            reasoning, content = self._reasoning.feed(text)
        tp = self._tools
        calls: list[ToolCall] = []
        if tp is not None and content:
            content, calls = tp.feed(content)
        if not reasoning and not calls:
            return content
        return Parsed(reasoning, content, self._limit(calls))

    def finish(self) -> Parsed:
        reasoning, content = self._reasoning.finish() if self._reasoning is not None else ("", "")
        calls: list[ToolCall] = []
        tp = self._tools
        if tp is not None:
            if content:
                content, calls = tp.feed(content)
            more, tail = tp.finish()
            content += more
            calls += tail
        return Parsed(reasoning, content, self._limit(calls))

    def _limit(self, calls: list[ToolCall]) -> list[ToolCall]:
        if self._max_calls is not None:
            calls = calls[: max(0, self._max_calls - self.tool_calls_made)]
        self.tool_calls_made += len(calls)
        return calls


def function_call(call: ToolCall) -> FunctionCall:
    """The OpenAI ``function`` object of a parsed call."""
    return FunctionCall(name=call.name, arguments=call.arguments)
