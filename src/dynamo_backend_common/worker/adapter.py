"""Per-request glue between the request plane and the engine.

For each request the adapter: admits it (or raises ``WorkerDraining``), decodes the payload,
builds the :class:`GenerateContext`, arms the cancellation monitor (``engine.abort(ctx)`` exactly
once when the context is explicitly stopped or killed, never on a plain drop), wraps the stream
in the contract validator, fires the decode first-token signal on the first non-empty chunk,
measures TTFT / inter-token latency / token counts, and encodes each chunk for the wire.

Deferred abort (decode mode): a decode request stopped before its first token is usually still
pulling its KV blocks from a prefill worker; aborting the engine then would cut the transfer
short and leave the prefill worker holding blocks until its hold expires. So on a decode worker
``engine.abort`` waits until the first-token signal fired (by the first non-empty chunk or
``ctx.notify_first_token()``) or the request's stream ended, whichever comes first. The engine
still sees the stop at once through ``ctx``; only the out-of-band ``abort`` is deferred.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncGenerator, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, cast

from ..engine import GenerateContext, LLMEngine
from ..errors import DynamoError, ProtocolError
from ..protocols.codec import _MSGPACK_ENCODER, from_msgpack
from ..protocols.common import FinishReason, LLMEngineOutput, PreprocessedRequest
from ..runtime.context import Context
from ..validate import validate_stream, validation_enabled
from .tracker import RequestTracker

if TYPE_CHECKING:
    from .metrics import WorkerMetrics

log = logging.getLogger("dynamo_backend_common.worker")

_CANCELLED = FinishReason.CANCELLED
#: ``to_msgpack`` without the wrapper call: the encoder's bound method, once per chunk.
_ENCODE: Callable[[LLMEngineOutput], bytes] = _MSGPACK_ENCODER.encode


class EngineAdapter:
    """Drives ``engine.generate`` for one worker. Owns the abort tasks it starts."""

    def __init__(
        self,
        engine: LLMEngine,
        *,
        tracker: RequestTracker,
        metrics: WorkerMetrics | None = None,
        decode_mode: bool = False,
        validate: bool | None = None,
    ) -> None:
        self.engine = engine
        self.tracker = tracker
        self.metrics = metrics
        self.decode_mode = decode_mode
        self.validate = validation_enabled() if validate is None else validate
        self._abort_tasks: set[asyncio.Task[None]] = set()
        #: Aborts that waited for a decode request's first token or end (see module doc).
        self.deferred_aborts = 0

    # -- transport entry point ------------------------------------------------------------
    def handle(
        self, payload: bytes, ctx: Context, headers: Mapping[str, str]
    ) -> AsyncGenerator[bytes, None]:
        """Request-plane handler: msgpack ``PreprocessedRequest`` in, msgpack chunks out."""
        return cast("AsyncGenerator[bytes, None]", self._run(payload, ctx, headers, _ENCODE))

    def generate(
        self,
        request: PreprocessedRequest,
        ctx: Context,
        metadata: Mapping[str, str] | None = None,
    ) -> AsyncGenerator[LLMEngineOutput, None]:
        """Run one request through the engine with admission, monitoring and accounting."""
        return cast("AsyncGenerator[LLMEngineOutput, None]",
                    self._run(request, ctx, metadata, None))

    async def _run(
        self,
        request: PreprocessedRequest | bytes,
        ctx: Context,
        metadata: Mapping[str, str] | None,
        encode: Callable[[LLMEngineOutput], bytes] | None,
    ) -> AsyncGenerator[LLMEngineOutput | bytes, None]:
        # One generator layer for both entry points (not handle() wrapping generate()): every
        # chunk crosses one frame less, which is a measurable share of the per-token cost.
        if not isinstance(request, PreprocessedRequest):
            try:
                request = from_msgpack(request, PreprocessedRequest)
            except ProtocolError as exc:
                raise DynamoError.invalid_argument(str(exc)) from None
        self.tracker.acquire()  # raises WorkerDraining once shutdown closed admission
        metrics = self.metrics
        if metrics is not None:
            metrics.request_started()
        started = time.perf_counter()
        first_token: asyncio.Event | None = None
        ended: asyncio.Event | None = None
        on_stop: Callable[[Context], None] = self._on_stop
        if self.decode_mode:
            first_token, ended = asyncio.Event(), asyncio.Event()
            on_stop = functools.partial(self._on_stop_deferred, first_token, ended)
        gctx = GenerateContext(ctx, first_token, metadata)
        ctx.add_stop_callback(on_stop)

        status = "error"
        n_out = 0
        ttft: float | None = None
        itl: list[float] = []
        last = started
        try:
            stream = self.engine.generate(request, gctx)
            if self.validate:
                stream = validate_stream(stream, gctx, request_id=ctx.id)
            is_killed = ctx.is_killed
            clock = time.perf_counter
            add_itl = itl.append
            try:
                async for out in stream:
                    n = len(out.token_ids)
                    if n:
                        now = clock()
                        if ttft is None:
                            ttft = now - started
                            if first_token is not None:
                                first_token.set()
                        else:
                            add_itl(now - last)
                        last = now
                        n_out += n
                    if out.finish_reason is not None:
                        status = "cancelled" if out.finish_reason == _CANCELLED else "success"
                    yield out if encode is None else encode(out)
                    if is_killed():
                        status = "cancelled"
                        break
            finally:
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()
        except (GeneratorExit, asyncio.CancelledError):
            # Closed by the consumer. After the terminal chunk was delivered (a consumer that
            # stops reading at the terminal) the request finished; before it, it was dropped.
            if status == "error":
                status = "dropped"
            raise
        finally:
            ctx.remove_stop_callback(on_stop)
            if ended is not None:
                ended.set()
            self.tracker.release()
            duration = time.perf_counter() - started
            if metrics is not None:
                metrics.request_finished(
                    status="cancelled" if status == "dropped" else status,
                    input_tokens=len(request.token_ids),
                    output_tokens=n_out,
                    ttft_s=ttft,
                    itl_s=itl,
                    duration_s=duration,
                )
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "request %s %s: input_tokens=%d output_tokens=%d ttft_ms=%s "
                    "avg_itl_ms=%s duration_ms=%.1f",
                    ctx.id,
                    status,
                    len(request.token_ids),
                    n_out,
                    f"{ttft * 1e3:.2f}" if ttft is not None else "-",
                    f"{sum(itl) / len(itl) * 1e3:.3f}" if itl else "-",
                    duration * 1e3,
                )

    # -- cancellation monitor -------------------------------------------------------------
    def _on_stop(self, ctx: Context) -> None:
        # Runs once per context, at the first explicit stop/kill while the request is live.
        self._spawn_abort(self._abort(ctx), ctx)

    def _on_stop_deferred(self, first_token: asyncio.Event, ended: asyncio.Event,
                          ctx: Context) -> None:
        if first_token.is_set() or ended.is_set():
            self._spawn_abort(self._abort(ctx), ctx)
        else:
            self.deferred_aborts += 1
            self._spawn_abort(self._abort(ctx, first_token, ended), ctx)

    def _spawn_abort(self, coro: Coroutine[Any, Any, None], ctx: Context) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"abort-{ctx.id}")
        self._abort_tasks.add(task)
        task.add_done_callback(self._abort_tasks.discard)

    async def _abort(self, ctx: Context, *after: asyncio.Event) -> None:
        if after:
            # Decode: the KV pull ends with the first token, or the stream ends without one.
            waits = [asyncio.ensure_future(e.wait()) for e in after]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            log.debug("request %s: deferred abort runs now (first token: %s)", ctx.id,
                      after[0].is_set())
        try:
            await self.engine.abort(ctx)
        except Exception:
            log.exception("engine.abort failed for request %s", ctx.id)

    async def wait_aborts(self) -> None:
        """Return once every ``engine.abort`` call started so far has finished (unbounded)."""
        while self._abort_tasks:
            await asyncio.wait(list(self._abort_tasks))

    async def close(self, timeout: float = 5.0) -> None:
        """Wait (bounded) for outstanding abort calls, then cancel what is left."""
        if not self._abort_tasks:
            return
        tasks = list(self._abort_tasks)
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending)
