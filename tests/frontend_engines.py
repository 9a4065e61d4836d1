"""Engines for the frontend tests (loaded by worker subprocesses as ``path.py:Class``)."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Sequence

from dynamo_backend_common import (
    EngineConfig,
    GenerateContext,
    LLMEngine,
    LLMEngineOutput,
    PreprocessedRequest,
    chunk,
    usage,
)

#: Ordinary (non-special) byte-level BPE tokens of the tiny model.
FIRST_ID = 300
SPAN = 200


def positional_token(position: int) -> int:
    """The token :class:`PositionalEngine` emits at absolute sequence ``position``."""
    return FIRST_ID + position % SPAN


class PositionalEngine(LLMEngine):
    """Emits ``positional_token(len(sequence so far))``: the output depends only on positions,
    so a stream continued elsewhere (migration: prompt + delivered tokens) is identical to an
    unbroken one. ``--delay-ms`` between tokens; honours ``max_tokens`` and cancellation."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s

    @classmethod
    def from_args(cls, argv: Sequence[str]) -> PositionalEngine:
        p = argparse.ArgumentParser()
        p.add_argument("--delay-ms", type=float, default=0.0)
        return cls(p.parse_args(list(argv)).delay_ms / 1000)

    async def start(self, worker_id: int) -> EngineConfig:
        return EngineConfig(model="positional", context_length=2048)

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        n = request.stop_conditions.max_tokens or 16
        base = len(request.token_ids)
        for i in range(n):
            if self.delay_s:
                await ctx.stopped_within(self.delay_s)
            if ctx.is_stopped():
                yield LLMEngineOutput.cancelled().with_usage(usage(base, i))
                return
            if i == n - 1:
                yield (LLMEngineOutput.length().with_tokens([positional_token(base + i)])
                       .with_usage(usage(base, n)))
                return
            yield chunk.token(positional_token(base + i))
        yield LLMEngineOutput.length().with_usage(usage(base, 0))

    async def cleanup(self) -> None:
        pass


class ScriptedEngine(LLMEngine):
    """Replies ``--reply TEXT`` (tokenized with the model directory's tokenizer, from
    ``$DYN_MODEL_PATH``), two tokens per chunk, then ``stop``: for tests of what a frontend
    makes of a given model output (tool calls, reasoning)."""

    def __init__(self, reply: str) -> None:
        self.reply = reply
        self.ids: list[int] = []

    @classmethod
    def from_args(cls, argv: Sequence[str]) -> ScriptedEngine:
        p = argparse.ArgumentParser()
        p.add_argument("--reply", required=True)
        return cls(p.parse_args(list(argv)).reply)

    async def start(self, worker_id: int) -> EngineConfig:
        import os

        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(os.path.join(os.environ["DYN_MODEL_PATH"], "tokenizer.json"))
        self.ids = tok.encode(self.reply, add_special_tokens=False).ids
        return EngineConfig(model="scripted", context_length=2048)

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        ids = self.ids
        for i in range(0, len(ids), 2):
            yield chunk.tokens(ids[i:i + 2])
        yield LLMEngineOutput.stop().with_usage(usage(len(request.token_ids), len(ids)))

    async def cleanup(self) -> None:
        pass
