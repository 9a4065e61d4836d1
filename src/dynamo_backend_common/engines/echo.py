"""EchoEngine: the smallest useful engine. It streams the prompt's tokens back.

Copy it as the skeleton of a real engine: everything the contract asks for is here.

- ``start`` returns the registration metadata; ``generate`` is an async generator yielding one
  chunk per token and exactly one terminal chunk; ``cleanup`` is null-safe and idempotent.
- Output: the prompt tokens, cycled when ``max_tokens`` exceeds the prompt.
- Stop conditions, checked per token in this order:

  * a token in ``request.eos_token_ids`` (unless ``stop_conditions.ignore_eos``): terminal
    ``eos``, the token is not returned. Dynamo's OpenAI layer reports ``eos`` as ``"stop"``;
    keeping it distinct lets the frontend tell an EOS from a user stop.
  * a token in ``stop_conditions.stop_token_ids_hidden``: terminal ``stop`` with
    ``stop_reason`` = the token id, the token is not returned.
  * a token in ``stop_conditions.stop_token_ids``: terminal ``stop`` with ``stop_reason``, the
    token is returned (visible stop token).
  * ``max_tokens`` tokens returned (default ``--max-tokens``): terminal ``length``.

  Stop tokens only count once ``stop_conditions.min_tokens`` tokens were returned.
- Cancellation: ``ctx.is_stopped()`` is checked before every token, and the per-token delay is
  raced against ``ctx.stopped()`` so a stop ends the stream at once with ``cancelled``.
- Usage is on every terminal: ``completion_tokens`` counts the tokens returned.
- An empty prompt raises ``DynamoError(InvalidArgument)``; ``generate`` before ``start`` or
  after ``cleanup`` raises ``DynamoError(EngineShutdown)``.

Serve it: ``dynamo-backend worker --engine echo -- --delay-ms 5``.
"""

from __future__ import annotations

import argparse
import itertools
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from dynamo_backend_common import (
    HEALTH_CHECK_KEY,
    DynamoError,
    EngineConfig,
    FinishReason,
    GenerateContext,
    LLMEngine,
    LLMEngineOutput,
    PreprocessedRequest,
    chunk,
    usage,
)

log = logging.getLogger(__name__)


class EchoEngine(LLMEngine):
    """Echoes prompt tokens, ``delay_s`` seconds apart."""

    def __init__(
        self,
        *,
        model_name: str = "echo",
        delay_s: float = 0.0,
        max_tokens: int = 16,
        context_length: int = 8192,
    ) -> None:
        if delay_s < 0 or max_tokens < 0:
            raise ValueError("delay_s and max_tokens must be >= 0")
        self.model_name = model_name
        self.delay_s = delay_s
        self.max_tokens = max_tokens
        self.context_length = context_length
        self._running = False

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None) -> EchoEngine:
        """Build from command-line flags (``--help`` lists them)."""
        parser = argparse.ArgumentParser(prog="echo_engine", description=cls.__doc__)
        parser.add_argument("--model-name", default="echo", help="advertised model name")
        parser.add_argument("--delay-ms", type=float, default=0.0, help="delay per token (ms)")
        parser.add_argument(
            "--max-tokens", type=int, default=16, help="output length when the request sets none"
        )
        args = parser.parse_args(argv)
        return cls(
            model_name=args.model_name, delay_s=args.delay_ms / 1000, max_tokens=args.max_tokens
        )

    async def start(self, worker_id: int) -> EngineConfig:
        self._running = True
        log.info("echo engine started (worker %x)", worker_id)
        # No KV cache, so no block size / block count: KV routing falls back to round robin.
        return EngineConfig(model=self.model_name, context_length=self.context_length)

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        if not self._running:
            raise DynamoError.engine_shutdown("echo engine is not running")
        prompt = request.token_ids
        if not prompt:
            raise DynamoError.invalid_argument("token_ids must not be empty")
        sc = request.stop_conditions
        max_tokens = self.max_tokens if sc.max_tokens is None else sc.max_tokens
        min_tokens = sc.min_tokens or 0
        eos = set() if sc.ignore_eos else set(request.eos_token_ids)
        hidden = set(sc.stop_token_ids_hidden or ())
        visible = set(sc.stop_token_ids or ())

        n = 0  # tokens returned so far
        for token in itertools.islice(itertools.cycle(prompt), max_tokens):
            if ctx.is_stopped() or (self.delay_s and await ctx.stopped_within(self.delay_s)):
                yield LLMEngineOutput.cancelled().with_usage(usage(len(prompt), n))
                return
            if n >= min_tokens:
                if token in eos:
                    yield LLMEngineOutput(
                        token_ids=[],
                        finish_reason=FinishReason.EOS,
                        completion_usage=usage(len(prompt), n),
                    )
                    return
                if token in hidden or token in visible:
                    tokens = [] if token in hidden else [token]
                    yield LLMEngineOutput(
                        token_ids=tokens,
                        finish_reason=FinishReason.STOP,
                        stop_reason=token,
                        completion_usage=usage(len(prompt), n + len(tokens)),
                    )
                    return
            n += 1
            if n == max_tokens:
                yield LLMEngineOutput.length().with_tokens([token]).with_usage(
                    usage(len(prompt), n)
                )
                return
            yield chunk.token(token)
        # Only reached when max_tokens == 0: nothing to generate.
        if ctx.is_stopped():
            yield LLMEngineOutput.cancelled().with_usage(usage(len(prompt), 0))
        else:
            yield LLMEngineOutput.length().with_usage(usage(len(prompt), 0))

    async def health_check_payload(self) -> dict[str, Any]:
        # The canary the worker sends to probe this engine: one token, no EOS stop.
        return {
            "token_ids": [1],
            "stop_conditions": {"max_tokens": 1, "ignore_eos": True},
            HEALTH_CHECK_KEY: True,
        }

    async def cleanup(self) -> None:
        # Null-safe and idempotent: nothing to release but the flag.
        if self._running:
            self._running = False
            log.info("echo engine stopped")
