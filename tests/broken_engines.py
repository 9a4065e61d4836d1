"""Engines that each break one rule of the contract, to prove each conformance check fails.

``GoodEngine`` conforms; every other class overrides the smallest piece of it needed to break
exactly one invariant, so a test can assert both that its check fails with the named kind and
that unrelated checks still pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from dynamo_backend_common import (
    DynamoError,
    EngineConfig,
    GenerateContext,
    LLMEngine,
    LLMEngineOutput,
    PreprocessedRequest,
    chunk,
    usage,
)


class GoodEngine(LLMEngine):
    """Streams ``max_tokens`` (default 16) tokens 0, 1, 2, ...; conforms to the contract."""

    model = "good"

    def __init__(self) -> None:
        self.handle: list[str] | None = None  # a "resource" allocated by start
        self.cleanups = 0

    async def start(self, worker_id: int) -> EngineConfig:
        self.handle = ["allocated"]
        return EngineConfig(model=self.model)

    def max_tokens(self, request: PreprocessedRequest) -> int:
        n = request.stop_conditions.max_tokens
        return 16 if n is None else n

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        if not request.token_ids:
            raise DynamoError.invalid_argument("token_ids must not be empty")
        prompt, n = len(request.token_ids), self.max_tokens(request)
        for i in range(n):
            if ctx.is_stopped():
                yield LLMEngineOutput.cancelled().with_usage(usage(prompt, i))
                return
            await asyncio.sleep(0)  # a real engine awaits its scheduler here
            if i == n - 1:
                yield LLMEngineOutput.length().with_tokens([i]).with_usage(usage(prompt, n))
                return
            yield chunk.token(i)
        yield LLMEngineOutput.length().with_usage(usage(prompt, 0))

    async def cleanup(self) -> None:
        self.cleanups += 1
        self.handle = None


class EmptyModelEngine(GoodEngine):
    model = ""


class NoTerminalEngine(GoodEngine):
    """Streams the tokens but never a terminal chunk."""

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        for i in range(self.max_tokens(request)):
            if ctx.is_stopped():
                return
            yield chunk.token(i)


class ChunkAfterTerminalEngine(GoodEngine):
    """Yields one more token after the terminal chunk."""

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        async for out in super().generate(request, ctx):
            yield out
        yield chunk.token(99)


class HangAfterTerminalEngine(GoodEngine):
    """Does not return after its terminal chunk."""

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        async for out in super().generate(request, ctx):
            yield out
        await asyncio.Event().wait()


class SingleSlotEngine(GoodEngine):
    """Keeps "the current request" on self: a second concurrent generate is rejected."""

    busy = False

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        if self.busy:
            raise DynamoError.engine_shutdown("engine busy")
        self.busy = True
        try:
            async for out in super().generate(request, ctx):
                yield out
        finally:
            self.busy = False


class SmallPoolEngine(GoodEngine):
    """Serves up to 50 concurrent requests and fails the rest: fine at 8, broken at 100."""

    active = 0

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        if self.active >= 50:
            yield LLMEngineOutput.error("no free slot")
            return
        self.active += 1
        try:
            async for out in super().generate(request, ctx):
                yield out
        finally:
            self.active -= 1


class DeafEngine(GoodEngine):
    """Never looks at the context. Long requests stream slowly, so a stop goes unanswered."""

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        n = self.max_tokens(request)
        if not request.token_ids:
            raise DynamoError.invalid_argument("token_ids must not be empty")
        delay = 0.05 if n > 64 else 0.0
        for i in range(n - 1):
            await asyncio.sleep(delay)
            yield chunk.token(i)
        yield LLMEngineOutput.length()


class StopIsLengthEngine(GoodEngine):
    """Notices the stop but ends with ``length`` instead of ``cancelled``."""

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        async for out in super().generate(request, ctx):
            if out.finish_reason is not None and ctx.is_stopped():
                yield LLMEngineOutput.length().with_usage(usage(1, 1))
                return
            yield out


class NotIdempotentCleanupEngine(GoodEngine):
    """Tears down unconditionally: the second cleanup double-frees."""

    freed = False

    async def cleanup(self) -> None:
        if self.freed:
            raise RuntimeError("double free")
        self.freed = True
        self.handle = None


class NotNullSafeCleanupEngine(GoodEngine):
    """Assumes start allocated its handle: cleanup without start crashes."""

    closed = False

    async def cleanup(self) -> None:
        if self.closed:
            return
        assert self.handle is not None, "handle not allocated"
        self.handle.clear()
        self.closed = True


class UntypedErrorEngine(GoodEngine):
    """Indexes the prompt without validating it: an empty prompt raises IndexError."""

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        first = request.token_ids[0]
        yield LLMEngineOutput.stop().with_tokens([first])


class ErrorChunkEngine(GoodEngine):
    """Reports a bad request as an ``error`` chunk, which loses the error kind."""

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        if not request.token_ids:
            yield LLMEngineOutput.error("empty prompt")
            return
        async for out in super().generate(request, ctx):
            yield out


class WrongKindEngine(GoodEngine):
    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        if not request.token_ids:
            raise DynamoError.unknown("empty prompt")
        async for out in super().generate(request, ctx):
            yield out


class ShiftingSourcesEngine(GoodEngine):
    """Returns a different answer on every query."""

    calls = 0

    async def supported_controls(self) -> list[str]:
        self.calls += 1
        return [f"control-{self.calls}"]


class BadHealthPayloadEngine(GoodEngine):
    async def health_check_payload(self) -> dict[str, Any] | None:
        return {"token_ids": "not a list"}


class FailingStartEngine(GoodEngine):
    async def start(self, worker_id: int) -> EngineConfig:
        self.handle = ["half-allocated"]
        raise DynamoError.engine_shutdown("GPU not found")


class CoroutineGenerateEngine(GoodEngine):
    """Writes generate as a coroutine returning a stream (the Rust shape), not a generator."""

    async def generate(  # type: ignore[override]
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        return GoodEngine.generate(self, request, ctx)


class ManyFaultsEngine(EmptyModelEngine, ChunkAfterTerminalEngine, NotIdempotentCleanupEngine):
    """Three independent faults at once: the report must list all of them."""


class SlowStartEngine(GoodEngine):
    """Conforms, but ``start`` takes ``--start-seconds`` (default 1.0), as loading weights does:
    it passes only when the start bound is larger than that."""

    def __init__(self, start_seconds: float = 1.0) -> None:
        super().__init__()
        self.start_seconds = start_seconds

    @classmethod
    def from_args(cls, argv: list[str]) -> SlowStartEngine:
        if argv[:1] == ["--start-seconds"]:
            return cls(float(argv[1]))
        return cls()

    async def start(self, worker_id: int) -> EngineConfig:
        await asyncio.sleep(self.start_seconds)  # the slow load under test, not a synchronisation
        return await super().start(worker_id)


class HangingEngine(GoodEngine):
    """Starts, then never yields a first chunk and never looks at the context: every stream
    hangs until the kit's timeout, starting with ``single_generate``."""

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        await asyncio.Event().wait()  # nothing ever sets it
        yield LLMEngineOutput.stop()
