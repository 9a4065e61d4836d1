"""Split model output into reasoning and content, streamed or whole (``--reasoning-parser``).

Engines such as vLLM (``vllm/reasoning``) and NVIDIA Dynamo (``lib/parsers/src/reasoning``) move
a model's chain of thought (``<think>...</think>``) out of ``content`` into
``reasoning_content``. This module does the same for the tag-based formats, as a pure text
state machine: :func:`make_reasoning_parser` gives a per-choice streaming parser, whose
:meth:`~ReasoningParser.feed` takes each text delta and returns the ``(reasoning, content)``
text to emit now, and whose :meth:`~ReasoningParser.finish` flushes what it held back at the
end of the stream; :func:`parse_reasoning` splits a whole output at once.

One reasoning block, at the start of the output (like vLLM; Dynamo also parses later blocks):

1. *Start.* Leading whitespace is passed on, then an optional start tag (``<think>``) is
   consumed. With an *implicit* start (``deepseek_r1``, ``step3``: the chat template already
   wrote ``<think>`` into the prompt) the output is reasoning from its first character, tag or
   not, and the leading whitespace is reasoning too. With an *explicit* start (``qwen3``,
   ``basic``, ``mistral``) reasoning needs the tag; leading whitespace before it is content,
   and output that does not start with the tag is all content, verbatim, to the end.
2. *Reasoning* runs up to the first end tag (``</think>``), which is consumed; a start tag
   inside reasoning is plain reasoning text. No end tag: everything is reasoning (an
   unterminated or truncated chain of thought, as vLLM and Dynamo do).
3. *Content* is everything after the end tag, verbatim: a second ``</think>`` is content text,
   and so is the ``"\\n\\n"`` DeepSeek writes after ``</think>`` (vLLM also keeps it; Dynamo's
   unary parse strips it, its stream does not, so the two disagree there).

Rules:

* Split invariance: for every way of cutting an output into deltas, the concatenated
  reasoning and content equal :func:`parse_reasoning` of the whole text (which is one
  ``feed`` plus ``finish``). A delta that ends in a partial tag (``</thi``) holds that suffix
  back until the next delta decides it; text that cannot start a tag is emitted at once, so
  plain text (no ``<`` / ``[``) passes straight through on the same ``feed`` call, and once in
  content nothing is held at all.
* Nothing lost: only the start tag of step 1 and the end tag of step 2 are dropped; every
  other character reaches reasoning or content exactly once, in order.
* Cheap: a ``feed`` looks only at the delta plus at most ``len(tag) - 1`` held characters,
  never at the accumulated output; no regular expressions.

Where vLLM / Dynamo differ, this module chose (each with the reason):

* ``qwen3`` / ``basic``: explicit start (Dynamo's ``qwen3`` and ``basic``; vLLM's ``qwen3``
  before Qwen3.5). Current vLLM treats output without ``<think>`` as reasoning up to a
  ``</think>`` (Qwen3-Thinking-2507 / Qwen3.5 templates write ``<think>`` into the prompt),
  and Dynamo's unary parse does that for a "dangling" ``</think>``. That needs the whole
  output before deciding whether its first word is reasoning or content, which no stream
  can do without holding everything back, so here such output is content, ``</think>`` and
  all. Serve those models with ``deepseek_r1``: that is what current vLLM ``qwen3`` does
  with thinking enabled (less its ``<tool_call>`` implicit end of reasoning).
* ``deepseek_r1``: vLLM drops a ``<think>`` found anywhere (and, unary, the text before it);
  here only a leading one is a tag, later ones are reasoning text.
* ``mistral``: explicit ``[THINK]...[/THINK]`` as vLLM (no ``[THINK]``: all content). Dynamo
  starts ``mistral`` in reasoning (implicit); vLLM also accepts ``[THINK]`` after some
  content and drops a stray ``[/THINK]``: here both are content text.
* Unary results: ``None`` for an empty reasoning or content (vLLM returns ``""`` reasoning
  for ``<think></think>``; Dynamo and the stream, which never sends an empty delta, agree
  with ``None``). No whitespace is stripped (Dynamo's unary parse strips; vLLM does not).

Non-tag formats (``granite``'s "Here is my thought process:", gpt-oss channels) are not here.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from functools import partial
from types import MappingProxyType

__all__ = [
    "KEEPS_SPECIAL_TOKENS",
    "REASONING_PARSERS",
    "ReasoningParser",
    "TagReasoningParser",
    "make_reasoning_parser",
    "parse_reasoning",
]


class ReasoningParser(ABC):
    """Per-choice streaming splitter of output text into ``(reasoning, content)``.

    Single use: feed one output's deltas in order, then call :meth:`finish` once.
    """

    @abstractmethod
    def feed(self, text: str) -> tuple[str, str]:
        """Take the next text delta; return the ``(reasoning, content)`` text to emit now."""

    @abstractmethod
    def finish(self) -> tuple[str, str]:
        """End of stream: return the ``(reasoning, content)`` text still held back."""


class _State(enum.Enum):
    START = enum.auto()  # before the first non-whitespace character is decided
    REASONING = enum.auto()  # inside the reasoning block, watching for the end tag
    CONTENT = enum.auto()  # after it (or explicit start without the tag): verbatim


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    n = min(len(text), len(tag) - 1)
    # Fast path: no character of the tail can begin the tag.
    if n <= 0 or text.find(tag[0], len(text) - n) < 0:
        return 0
    for k in range(n, 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class TagReasoningParser(ReasoningParser):
    """Reasoning between ``start_tag`` and ``end_tag`` at the start of the output.

    ``implicit_start``: the output is reasoning from its beginning even without
    ``start_tag`` (the prompt already opened the block); otherwise reasoning needs a leading
    ``start_tag`` and output without it is all content. See the module docstring.
    """

    __slots__ = ("_end", "_held", "_implicit", "_start", "_state")

    def __init__(self, start_tag: str, end_tag: str, *, implicit_start: bool) -> None:
        if not start_tag or not end_tag:
            raise ValueError("start_tag and end_tag must be non-empty")
        self._start = start_tag
        self._end = end_tag
        self._implicit = implicit_start
        self._state = _State.START
        self._held = ""  # a partial tag held back: len < len(tag)

    @property
    def start_tag(self) -> str:
        return self._start

    @property
    def end_tag(self) -> str:
        return self._end

    @property
    def implicit_start(self) -> bool:
        return self._implicit

    def feed(self, text: str) -> tuple[str, str]:
        state = self._state
        if state is _State.CONTENT:
            return "", text
        s = self._held + text if self._held else text
        self._held = ""
        reasoning = content = ""
        if state is _State.START:
            rest = s.lstrip()
            lead = s[: len(s) - len(rest)]
            if lead:
                if self._implicit:
                    reasoning = lead
                else:
                    content = lead
            if not rest:
                return reasoning, content
            if rest.startswith(self._start):
                s = rest[len(self._start) :]
                state = _State.REASONING
            elif self._start.startswith(rest):
                self._held = rest  # maybe the start tag: wait for more
                return reasoning, content
            else:
                s = rest
                state = _State.REASONING if self._implicit else _State.CONTENT
            self._state = state
            if state is _State.CONTENT:
                return reasoning, content + s
        # REASONING: everything up to the first end tag.
        end = self._end
        i = s.find(end)
        if i >= 0:
            self._state = _State.CONTENT
            return reasoning + s[:i], content + s[i + len(end) :]
        k = _partial_suffix(s, end)
        if k:
            self._held = s[-k:]
            s = s[:-k]
        return reasoning + s, content

    def finish(self) -> tuple[str, str]:
        held, self._held = self._held, ""
        if not held:
            return "", ""
        # A held partial tag never completed: it is text of the section it was found in.
        if self._state is _State.REASONING or self._implicit:
            return held, ""
        return "", held


def _tag_parser(start: str, end: str, *, implicit_start: bool) -> Callable[[], ReasoningParser]:
    return partial(TagReasoningParser, start, end, implicit_start=implicit_start)


_THINK = ("<think>", "</think>")

#: Every known parser name (vLLM / Dynamo ``--reasoning-parser`` names), aliases included.
REASONING_PARSERS: Mapping[str, Callable[[], ReasoningParser]] = MappingProxyType(
    {
        # <think> already in the prompt; an optional leading <think> is dropped.
        "deepseek_r1": _tag_parser(*_THINK, implicit_start=True),
        # Step3: all output before </think> is reasoning (vLLM and Dynamo agree).
        "step3": _tag_parser(*_THINK, implicit_start=True),
        # Explicit <think>...</think>; no leading <think>: all content.
        "qwen3": _tag_parser(*_THINK, implicit_start=False),
        # Dynamo's name for the same explicit <think> parser.
        "basic": _tag_parser(*_THINK, implicit_start=False),
        # Magistral: explicit [THINK]...[/THINK] (vLLM's semantics).
        "mistral": _tag_parser("[THINK]", "[/THINK]", implicit_start=False),
    }
)

#: Parsers whose tags are special tokens (Magistral's ``[THINK]``): the text they read must
#: keep special tokens (``skip_special_tokens`` false).
KEEPS_SPECIAL_TOKENS: frozenset[str] = frozenset({"mistral"})


def make_reasoning_parser(name: str) -> ReasoningParser:
    """A fresh streaming parser for ``name`` (case-insensitive; ``-`` is read as ``_``).

    Raises :class:`ValueError` naming the known parsers for an unknown ``name``.
    """
    factory = REASONING_PARSERS.get(name) or REASONING_PARSERS.get(
        name.strip().lower().replace("-", "_")
    )
    if factory is None:
        known = ", ".join(sorted(REASONING_PARSERS))
        raise ValueError(f"unknown reasoning parser {name!r}; known parsers: {known}")
    return factory()


def parse_reasoning(name: str, text: str) -> tuple[str | None, str | None]:
    """Split a whole output: ``(reasoning, content)``, each ``None`` when empty.

    Equal to feeding ``text`` to :func:`make_reasoning_parser` in any split and joining.
    """
    parser = make_reasoning_parser(name)
    r1, c1 = parser.feed(text)
    r2, c2 = parser.finish()
    return (r1 + r2) or None, (c1 + c2) or None
