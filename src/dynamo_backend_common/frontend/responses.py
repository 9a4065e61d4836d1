"""Builds OpenAI response bodies and SSE events from :class:`StreamDelta` s.

:class:`ChatRenderer` and :class:`CompletionRenderer` share one interface, used by the HTTP
layer for both streamed and unary responses:

- ``start()``: the SSE events that open a stream (chat: one ``role`` chunk per choice;
  completions with ``echo``: the prompt text per choice), possibly ``b""``.
- ``event(delta)``: the SSE event for one delta of choice ``delta.index`` (``b""`` when it adds
  nothing a client can see).
- ``usage_event(usage)``: the final ``choices: []`` chunk of ``stream_options.include_usage``.
- ``add(delta)`` / ``response(usage)``: accumulate deltas into one unary response body.

Streams follow OpenAI: every chunk repeats ``id``, ``created`` and ``model``; the finish chunk
carries an empty ``delta``; with ``include_usage`` every chunk has ``"usage": null`` and one last
chunk with empty ``choices`` carries the usage.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
from msgspec import UNSET
from tokenizers import Tokenizer

from ..protocols.common import CompletionUsage
from .chat_parsing import ChoiceParser, Parsed, function_call, new_tool_call_id
from .openai_types import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatResponseMessage,
    ChatTokenLogprob,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    ToolCallDelta,
    ToolCallItem,
    TopLogprob,
    Usage,
)
from .postprocess import StreamDelta
from .tool_calls import ToolCall

__all__ = ["DONE", "ChatRenderer", "CompletionRenderer", "Renderer", "sse"]

DONE: Final = b"data: [DONE]\n\n"
_encode = msgspec.json.Encoder().encode


def sse(obj: Any) -> bytes:
    """One ``data:`` event (JSON never contains a raw newline, so one line suffices)."""
    return b"data: " + _encode(obj) + b"\n\n"


def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    text: str = tokenizer.decode([token_id], skip_special_tokens=False)
    return text


def _top(tokenizer: Tokenizer, entries: list[dict[str, Any]]) -> list[TopLogprob]:
    out = []
    for e in entries:
        tok = e.get("token")
        if not isinstance(tok, str):
            tid = e.get("token_id")
            tok = _token_text(tokenizer, tid) if isinstance(tid, int) else ""
        lp = e.get("logprob")
        out.append(TopLogprob(token=tok, logprob=float(lp) if lp is not None else 0.0,
                              bytes=list(tok.encode())))
    return out


class _Base:
    # One renderer lives per request in flight: slots, and what only a unary response needs
    # (the accumulated text, the finish reasons) made at its first use, never for a stream.
    __slots__ = ("_chunk_usage", "_finish_reasons", "_splits", "_text_parts", "created",
                 "include_usage", "logprobs", "model", "n", "rid", "tokenizer")

    def __init__(self, rid: str, created: int, model: str, *, include_usage: bool,
                 tokenizer: Tokenizer, logprobs: bool, n: int) -> None:
        self.rid = rid
        self.created = created
        self.model = model
        self.include_usage = include_usage
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self.n = n
        self._chunk_usage: Any = None if include_usage else UNSET
        self._text_parts: list[list[str]] | None = None
        self._finish_reasons: list[str | None] | None = None
        # Per choice index: the encoded per-token event split around its text.
        self._splits: list[tuple[bytes, bytes] | None] = [None] * n

    @property
    def text_parts(self) -> list[list[str]]:
        """Per choice index: the accumulated text (unary responses)."""
        if self._text_parts is None:
            self._text_parts = self._first_parts()
        return self._text_parts

    def _first_parts(self) -> list[list[str]]:
        return [[] for _ in range(self.n)]

    @property
    def finish_reasons(self) -> list[str | None]:
        """Per choice index: the finish reason (unary responses)."""
        if self._finish_reasons is None:
            self._finish_reasons = [None] * self.n
        return self._finish_reasons


def _tool_call_item(call: ToolCall) -> ToolCallItem:
    """A parsed call as OpenAI's ``tool_calls`` item, under a fresh ``call_`` id."""
    return ToolCallItem(id=new_tool_call_id(), function=function_call(call))


class ChatRenderer(_Base):
    """``chat.completion`` / ``chat.completion.chunk`` bodies for ``n`` choices.

    With ``parsers`` (one :class:`ChoiceParser` per choice) each choice's text is split into
    ``reasoning_content``, ``content`` and ``tool_calls``; a choice that returned tool calls and
    ended normally finishes with ``"tool_calls"``. Each call is sent whole, in one chunk, with
    a fresh ``call_`` id. Without parsers the text is ``content`` as is (the fast path).
    """

    __slots__ = ("_calls_acc", "_lp_acc", "_reasoning_acc", "parsers")

    def __init__(self, rid: str, created: int, model: str, *, include_usage: bool = False,
                 tokenizer: Tokenizer, logprobs: bool = False, n: int = 1,
                 parsers: list[ChoiceParser] | None = None) -> None:
        super().__init__(rid, created, model, include_usage=include_usage,
                         tokenizer=tokenizer, logprobs=logprobs, n=n)
        self.parsers = parsers
        # Per choice index, made at first use: log probabilities and reasoning (unary
        # responses), tool calls (also streams, to number them).
        self._lp_acc: list[list[ChatTokenLogprob]] | None = None
        self._reasoning_acc: list[list[str]] | None = None
        self._calls_acc: list[list[ToolCallItem]] | None = None

    @property
    def _lp(self) -> list[list[ChatTokenLogprob]]:
        if self._lp_acc is None:
            self._lp_acc = [[] for _ in range(self.n)]
        return self._lp_acc

    @property
    def _reasoning(self) -> list[list[str]]:
        if self._reasoning_acc is None:
            self._reasoning_acc = [[] for _ in range(self.n)]
        return self._reasoning_acc

    @property
    def _calls(self) -> list[list[ToolCallItem]]:
        if self._calls_acc is None:
            self._calls_acc = [[] for _ in range(self.n)]
        return self._calls_acc

    def _parse(self, d: StreamDelta) -> Parsed | str:
        """The delta through its choice's parser: a ``str`` when it is plain content."""
        assert self.parsers is not None
        p = self.parsers[d.index]
        step = p.feed(d.text)
        if d.finish_reason is None:
            return step
        tail = p.finish()
        if isinstance(step, str):
            tail.content = step + tail.content
        else:
            tail.reasoning = step.reasoning + tail.reasoning
            tail.content = step.content + tail.content
            tail.tool_calls = step.tool_calls + tail.tool_calls
        return tail

    def _finish_reason(self, d: StreamDelta) -> str | None:
        fr = d.finish_reason
        if fr == "stop" and self.parsers is not None and self.parsers[d.index].tool_calls_made:
            return "tool_calls"
        return fr

    def _parsed_event(self, d: StreamDelta) -> bytes:
        parsed = self._parse(d)
        if isinstance(parsed, str):
            if not self.logprobs:
                # Plain content (most chunks, also with a parser on): the spliced event.
                return self._text_event(parsed, d.index) if parsed else b""
            parsed = Parsed(content=parsed)
        lp = self._logprobs(d)
        out = b""
        if parsed.reasoning or parsed.content or lp:
            out = self._chunk([ChunkChoice(
                index=d.index,
                delta=ChatDelta(content=parsed.content or None,
                                reasoning_content=parsed.reasoning or None),
                logprobs=ChatChoiceLogprobs(content=lp) if lp else None)])
        if parsed.tool_calls:
            calls = self._calls[d.index]
            deltas = []
            for c in parsed.tool_calls:
                item = _tool_call_item(c)
                deltas.append(ToolCallDelta(index=len(calls), id=item.id,
                                            function=item.function))
                calls.append(item)
            out += self._chunk([ChunkChoice(index=d.index, delta=ChatDelta(tool_calls=deltas))])
        if d.finish_reason is not None:
            out += self._chunk([ChunkChoice(index=d.index, delta=ChatDelta(),
                                            finish_reason=self._finish_reason(d))])
        return out

    def _chunk(self, choice: list[ChunkChoice]) -> bytes:
        return sse(ChatCompletionChunk(id=self.rid, created=self.created, model=self.model,
                                       choices=choice, usage=self._chunk_usage))

    def _text_event(self, text: str, index: int) -> bytes:
        # The per-token event: everything but the text is the same for the whole stream, so it
        # is encoded once and the text spliced in (JSON escaping keeps the split unambiguous).
        split = self._splits[index]
        if split is None:
            tmpl = self._chunk([ChunkChoice(index=index, delta=ChatDelta(content=""))])
            i = tmpl.index(b'"content":""') + len(b'"content":')
            split = self._splits[index] = (tmpl[:i], tmpl[i + 2:])
        return split[0] + _encode(text) + split[1]

    def _logprobs(self, d: StreamDelta) -> list[ChatTokenLogprob]:
        if not self.logprobs or d.log_probs is None:
            return []
        tops = d.top_logprobs or []
        out = []
        for i, (tid, lp) in enumerate(zip(d.token_ids, d.log_probs, strict=False)):
            tok = _token_text(self.tokenizer, tid)
            top = _top(self.tokenizer, tops[i]) if i < len(tops) else []
            out.append(ChatTokenLogprob(token=tok, logprob=lp, bytes=list(tok.encode()),
                                        top_logprobs=top))
        return out

    def start(self) -> bytes:
        return b"".join(
            self._chunk([ChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
            for i in range(self.n))

    def event(self, d: StreamDelta) -> bytes:
        if self.parsers is not None:
            return self._parsed_event(d)
        if d.finish_reason is None and not self.logprobs:
            return self._text_event(d.text, d.index) if d.text else b""
        lp = self._logprobs(d)
        out = b""
        if d.text or lp:
            out = self._chunk([ChunkChoice(
                index=d.index, delta=ChatDelta(content=d.text),
                logprobs=ChatChoiceLogprobs(content=lp) if lp else None)])
        if d.finish_reason is not None:
            out += self._chunk([ChunkChoice(index=d.index, delta=ChatDelta(),
                                            finish_reason=d.finish_reason)])
        return out

    def usage_event(self, usage: CompletionUsage) -> bytes:
        return sse(ChatCompletionChunk(id=self.rid, created=self.created, model=self.model,
                                       choices=[], usage=Usage.from_completion_usage(usage)))

    def add(self, d: StreamDelta) -> None:
        if self.parsers is not None:
            step = self._parse(d)
            parsed = Parsed(content=step) if isinstance(step, str) else step
            if parsed.content:
                self.text_parts[d.index].append(parsed.content)
            if parsed.reasoning:
                self._reasoning[d.index].append(parsed.reasoning)
            self._calls[d.index].extend(
                _tool_call_item(c)
                for c in parsed.tool_calls)
        elif d.text:
            self.text_parts[d.index].append(d.text)
        if self.logprobs:
            self._lp[d.index].extend(self._logprobs(d))
        if d.finish_reason is not None:
            self.finish_reasons[d.index] = self._finish_reason(d)

    def _message(self, i: int) -> ChatResponseMessage:
        content = "".join(self.text_parts[i])
        if self.parsers is None:
            return ChatResponseMessage(content=content)
        calls = self._calls[i]
        reasoning = "".join(self._reasoning[i])
        return ChatResponseMessage(
            content=content or (None if calls or reasoning else ""),
            tool_calls=calls if calls else UNSET,
            reasoning_content=reasoning if reasoning else UNSET)

    def response(self, usage: CompletionUsage | None) -> ChatCompletion:
        return ChatCompletion(
            id=self.rid, created=self.created, model=self.model,
            choices=[ChatChoice(
                index=i,
                message=self._message(i),
                # An engine that sent no log probabilities gets null, not an empty list
                # that would claim a reply of no tokens.
                logprobs=ChatChoiceLogprobs(content=self._lp[i]) if self._lp[i] else None,
                finish_reason=self.finish_reasons[i],
            ) for i in range(self.n)],
            usage=Usage.from_completion_usage(usage) if usage is not None else None,
        )


class CompletionRenderer(_Base):
    """``text_completion`` bodies for ``n`` choices; ``echo_text`` (the prompt) starts each
    choice when set."""

    __slots__ = ("_lp", "_offsets", "echo_text")

    def __init__(self, rid: str, created: int, model: str, *, include_usage: bool = False,
                 tokenizer: Tokenizer, logprobs: bool = False,
                 echo_text: str | None = None, n: int = 1) -> None:
        super().__init__(rid, created, model, include_usage=include_usage,
                         tokenizer=tokenizer, logprobs=logprobs, n=n)
        self.echo_text = echo_text
        self._lp = [CompletionLogprobs() for _ in range(n)] if logprobs else None
        self._offsets = [len(echo_text) if echo_text else 0] * n

    def _first_parts(self) -> list[list[str]]:
        return [[self.echo_text] if self.echo_text else [] for _ in range(self.n)]

    def _chunk(self, index: int, text: str, finish: str | None,
               lp: CompletionLogprobs | None) -> bytes:
        if finish is None and lp is None and text:
            split = self._splits[index]
            if split is None:  # see ChatRenderer._text_event
                tmpl = sse(CompletionChunk(
                    id=self.rid, created=self.created, model=self.model,
                    choices=[CompletionChoice(index=index, text="")], usage=self._chunk_usage))
                i = tmpl.index(b'"text":""') + len(b'"text":')
                split = self._splits[index] = (tmpl[:i], tmpl[i + 2:])
            return split[0] + _encode(text) + split[1]
        return sse(CompletionChunk(
            id=self.rid, created=self.created, model=self.model,
            choices=[CompletionChoice(index=index, text=text, logprobs=lp,
                                      finish_reason=finish)],
            usage=self._chunk_usage))

    def _logprobs(self, d: StreamDelta) -> CompletionLogprobs | None:
        if not self.logprobs or d.log_probs is None:
            return None
        lp = CompletionLogprobs()
        tops = d.top_logprobs or []
        for i, (tid, p) in enumerate(zip(d.token_ids, d.log_probs, strict=False)):
            tok = _token_text(self.tokenizer, tid)
            lp.tokens.append(tok)
            lp.token_logprobs.append(p)
            lp.top_logprobs.append(
                {t.token: t.logprob for t in _top(self.tokenizer, tops[i])} if i < len(tops)
                else {})
            lp.text_offset.append(self._offsets[d.index])
            self._offsets[d.index] += len(tok)
        return lp

    def start(self) -> bytes:
        if not self.echo_text:
            return b""
        return b"".join(self._chunk(i, self.echo_text, None, None) for i in range(self.n))

    def event(self, d: StreamDelta) -> bytes:
        lp = self._logprobs(d)
        if d.text or lp is not None or d.finish_reason is not None:
            return self._chunk(d.index, d.text, d.finish_reason, lp)
        return b""

    def usage_event(self, usage: CompletionUsage) -> bytes:
        return sse(CompletionChunk(id=self.rid, created=self.created, model=self.model,
                                   choices=[], usage=Usage.from_completion_usage(usage)))

    def add(self, d: StreamDelta) -> None:
        if d.text:
            self.text_parts[d.index].append(d.text)
        lp = self._logprobs(d)
        if lp is not None and self._lp is not None:
            acc = self._lp[d.index]
            acc.tokens += lp.tokens
            acc.token_logprobs += lp.token_logprobs
            acc.top_logprobs += lp.top_logprobs
            acc.text_offset += lp.text_offset
        if d.finish_reason is not None:
            self.finish_reasons[d.index] = d.finish_reason

    def response(self, usage: CompletionUsage | None) -> Completion:
        return Completion(
            id=self.rid, created=self.created, model=self.model,
            choices=[CompletionChoice(
                index=i, text="".join(self.text_parts[i]),
                logprobs=self._lp[i] if self._lp is not None and self._lp[i].tokens else None,
                finish_reason=self.finish_reasons[i]) for i in range(self.n)],
            usage=Usage.from_completion_usage(usage) if usage is not None else None,
        )


Renderer = ChatRenderer | CompletionRenderer
