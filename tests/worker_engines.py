"""Engines for the worker tests, usable in-process and as ``--engine tests/worker_engines.py:X``.

:class:`LifecycleEngine` records every lifecycle call (``start``, ``abort <request id>``,
``drain``, ``cleanup``) as one line appended to ``--events-file`` (a file survives the worker
process, so a test can read the order after the process exited) and logs it at INFO on stderr
(``lifecycle: <line>``, so a test can wait for it on the process output). In-process tests read
:attr:`LifecycleEngine.events` instead.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from dynamo_backend_common import (
    HEALTH_CHECK_KEY,
    DynamoError,
    EngineConfig,
    GenerateContext,
    LLMEngine,
    LLMEngineOutput,
    PreprocessedRequest,
    chunk,
    usage,
)
from dynamo_backend_common.runtime.context import Context

log = logging.getLogger("worker_engines")

#: Controls :class:`LifecycleEngine` implements.
CONTROLS = ("echo", "stats")


class LifecycleEngine(LLMEngine):
    """Streams ``max_tokens`` (default ``--tokens``) tokens 0, 1, 2, ... ``delay_s`` apart.

    A stop ends the stream with a ``cancelled`` terminal at once (the delay races
    ``ctx.stopped()``). ``fail_start`` makes ``start`` raise after recording ``start``.
    A request whose prompt starts with token ``666`` raises ``DynamoError(InvalidArgument)``
    (a failing request, also usable as a failing canary).
    """

    def __init__(
        self,
        *,
        events_file: str | None = None,
        delay_s: float = 0.0,
        tokens: int = 8,
        fail_start: bool = False,
        canary: bool = False,
        cleanup: str = "ok",
    ) -> None:
        self.events_file = events_file
        self.delay_s = delay_s
        self.tokens = tokens
        self.fail_start = fail_start
        self.canary = canary
        #: ``ok``; ``hang``: cleanup awaits forever; ``block``: cleanup blocks the event loop.
        self.cleanup_mode = cleanup
        self.events: list[str] = []
        self.requests: list[PreprocessedRequest] = []
        #: ``(request id, is_decode, first-token signal set after the first token chunk)``.
        self.first_token_seen: list[tuple[str, bool, bool | None]] = []
        #: Set when a ``generate`` stream finishes (any exit path: completion, drop, close).
        self.finished = asyncio.Event()
        #: Requests wait on this before their first token when ``hold`` is set.
        self.hold: asyncio.Event | None = None

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None) -> LifecycleEngine:
        p = argparse.ArgumentParser(prog="lifecycle-engine")
        p.add_argument("--events-file", default=None)
        p.add_argument("--delay-ms", type=float, default=0.0)
        p.add_argument("--tokens", type=int, default=8)
        p.add_argument("--fail-start", action="store_true")
        p.add_argument("--canary", action="store_true", help="offer a health-check payload")
        p.add_argument("--cleanup", choices=["ok", "hang", "block"], default="ok")
        a = p.parse_args(argv)
        return cls(events_file=a.events_file, delay_s=a.delay_ms / 1e3, tokens=a.tokens,
                   fail_start=a.fail_start, canary=a.canary, cleanup=a.cleanup)

    def record(self, line: str) -> None:
        self.events.append(line)
        log.info("lifecycle: %s", line)
        if self.events_file:
            with open(self.events_file, "a") as f:
                f.write(line + "\n")

    async def start(self, worker_id: int) -> EngineConfig:
        self.record("start")
        if self.fail_start:
            raise RuntimeError("boom: injected start failure")
        return EngineConfig(model="lifecycle", context_length=4096)

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        self.requests.append(request)
        try:
            if request.token_ids[:1] == [666]:
                raise DynamoError.invalid_argument("token 666 is refused")
            n = self.tokens if request.stop_conditions.max_tokens is None else (
                request.stop_conditions.max_tokens)
            prompt = len(request.token_ids)
            if self.hold is not None:
                await self.hold.wait()
            for i in range(n):
                if ctx.is_stopped() or (self.delay_s and await ctx.stopped_within(self.delay_s)):
                    yield LLMEngineOutput.cancelled().with_usage(usage(prompt, i))
                    return
                if i == n - 1:
                    yield LLMEngineOutput.length().with_tokens([i]).with_usage(usage(prompt, n))
                    return
                yield chunk.token(i)
                if i == 0:
                    signal = ctx._first_token  # white-box: the decode first-token signal
                    self.first_token_seen.append(
                        (ctx.id, ctx.is_decode, None if signal is None else signal.is_set()))
            yield LLMEngineOutput.length().with_usage(usage(prompt, 0))
        finally:
            self.finished.set()

    async def abort(self, ctx: Context) -> None:
        self.record(f"abort {ctx.id}")

    async def drain(self) -> None:
        self.record("drain")

    async def cleanup(self) -> None:
        self.record("cleanup")
        if self.cleanup_mode == "hang":
            await asyncio.Event().wait()
        elif self.cleanup_mode == "block":
            time.sleep(3600)  # noqa: ASYNC251 - a synchronous teardown that never returns

    async def health_check_payload(self) -> dict[str, Any] | None:
        if not self.canary:
            return None
        return {"token_ids": [1], "stop_conditions": {"max_tokens": 1}, HEALTH_CHECK_KEY: True}

    async def supported_controls(self) -> list[str]:
        return list(CONTROLS)

    async def engine_control(self, control: str, body: Any) -> Any:
        if control == "echo":
            return {"status": "ok", "echo": body}
        return {"status": "ok", "requests": len(self.requests), "events": list(self.events)}
