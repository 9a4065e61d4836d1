"""One generation request from its preprocessed form to the last byte sent: the per-request
pipeline of the OpenAI frontend.

:class:`Job` holds a request's state (its engine requests, one per choice, their postprocessors
and contexts, the renderer, the tally); :func:`job_deltas` runs its choices through an
:class:`~.engine_client.EngineClient` and the postprocessors; :class:`GenerationResponse` is the
ASGI response that drives them, answering one JSON body or an SSE stream, watching for the
client leaving (which stops the request) and for the request's timeout. The response knows its
job, a delta source and a finish callback, not the frontend that made it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Final, cast

import msgspec
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..errors import BackendError, DynamoError
from ..model_dir import ModelDir
from ..protocols.common import CompletionUsage, LLMEngineOutput, PreprocessedRequest
from ..protocols.common import usage as make_usage
from ..runtime.context import Context
from ..runtime.tasks import cancel_and_wait
from .engine_client import EngineClient
from .metrics import RequestTimer
from .openai_types import RequestError
from .postprocess import StreamDelta, StreamPostprocessor
from .preprocess import Preprocessed
from .responses import DONE, Renderer, sse

log = logging.getLogger("dynamo_backend_common.frontend")

__all__ = ["GenerationResponse", "Job", "choice_request", "dynamo_error_to_request_error",
           "job_deltas"]

#: Unsent SSE bytes of one stream above which generation waits for the client to read.
_MAX_BACKLOG: Final = 1024 * 1024
#: Unsent SSE bytes above which a stream's pending events are kept as one buffer, not a list.
_COMPACT_AT: Final = 64 * 1024
_encode = msgspec.json.Encoder().encode


def dynamo_error_to_request_error(exc: DynamoError) -> RequestError:
    """The HTTP error for an engine/transport error: status by kind, ``code`` = the kind."""
    status = exc.kind.http_status
    return RequestError(
        exc.message or exc.kind.value, status=status, code=exc.kind.value,
        type="invalid_request_error" if status < 500 else "server_error")


class Job:
    """One generation request, from preprocessing to the last byte sent.

    With ``n`` > 1 each choice ``i`` is its own engine request (``requests[i]``, its seed
    offset by ``i`` when one was given) with its own postprocessor and a child context that
    stops with ``ctx``.
    """

    __slots__ = ("completion", "ctx", "ctxs", "disconnected", "endpoint", "error", "finished",
                 "headers_sent", "model", "n", "posts", "prompt_tokens", "renderer", "requests",
                 "response_done", "stream", "timed_out", "timeout", "timer", "usage")

    def __init__(self, *, model: str, endpoint: str, stream: bool, pre: Preprocessed,
                 model_dir: ModelDir, renderer: Renderer, ctx: Context,
                 timer: RequestTimer) -> None:
        self.model = model
        self.endpoint = endpoint
        self.stream = stream
        # Of ``pre`` only the prompt length is needed later (not its rendered prompt text).
        self.prompt_tokens = pre.prompt_tokens
        self.renderer = renderer
        self.ctx = ctx
        self.timer = timer
        request = pre.request
        n = self.n = request.sampling_options.n or 1
        # Tuples: a request keeps these for as long as it streams.
        self.requests: tuple[PreprocessedRequest, ...]
        self.ctxs: tuple[Context, ...]
        if n == 1:
            self.requests = (request,)
            self.ctxs = (ctx,)
        else:
            self.requests = tuple(choice_request(request, i) for i in range(n))
            self.ctxs = tuple(Context(f"{ctx.id}-{i}") for i in range(n))
            children = self.ctxs

            def stop_children(_: Context) -> None:
                for c in children:
                    c.stop_generating()

            ctx.add_stop_callback(stop_children)
        self.posts = tuple(StreamPostprocessor.for_request(model_dir, r, index=i)
                           for i, r in enumerate(self.requests))
        self.disconnected = False
        #: Seconds the request may run (``None``: no limit), and whether it ran out.
        self.timeout: float | None = None
        self.timed_out = False
        self.headers_sent = False
        self.response_done = False
        # Tally of finished choices (see ``see``).
        self.finished = 0
        self.completion = 0
        self.usage: CompletionUsage | None = None
        self.error: str | None = None

    def see(self, d: StreamDelta) -> None:
        """Account for a delta: finished choices, summed usage, the first engine error."""
        if d.finish_reason is None:
            return
        self.finished += 1
        if d.error is not None and self.error is None:
            self.error = d.error
        if d.usage is not None:
            self.completion += d.usage.completion_tokens
            # One choice: the engine's usage as is (with its details); several: summed.
            self.usage = d.usage if self.n == 1 else make_usage(self.prompt_tokens,
                                                                self.completion)

    @property
    def complete(self) -> bool:
        return self.finished >= self.n


def choice_request(request: PreprocessedRequest, i: int) -> PreprocessedRequest:
    so = request.sampling_options
    so = msgspec.structs.replace(so, n=None, seed=None if so.seed is None else so.seed + i)
    return msgspec.structs.replace(request, sampling_options=so)


def job_deltas(client: EngineClient, job: Job) -> AsyncGenerator[StreamDelta, None]:
    """The deltas of all the job's choices (merged as they come when ``n`` > 1); ends when
    every choice finished. Raises the first ``DynamoError`` of any choice."""
    return _choice(client, job, 0) if job.n == 1 else _merged(client, job)

async def _merged(client: EngineClient, job: Job) -> AsyncGenerator[StreamDelta, None]:
    queue: asyncio.Queue[StreamDelta | Exception | None] = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for d in _choice(client, job, i):
                queue.put_nowait(d)
        except Exception as exc:  # handed to the consumer, which owns the outcome
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(None)

    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(pump(i)) for i in range(job.n)]
    try:
        running = job.n
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        await cancel_and_wait(tasks)

async def _choice(client: EngineClient, job: Job, i: int) -> AsyncGenerator[StreamDelta, None]:
    """Choice ``i``'s engine stream through its postprocessor; ends at its finish."""
    post = job.posts[i]
    timer = job.timer
    clock = time.perf_counter
    stream = cast(AsyncGenerator[LLMEngineOutput, None],
                  client.generate(job.model, job.requests[i], job.ctxs[i]))
    try:
        async for out in stream:
            n = len(out.token_ids)
            if n:
                timer.tokens(n, clock())
            d = post.process(out)
            yield d
            if d.finish_reason is not None:
                return
    finally:
        await stream.aclose()


async def _watch_disconnect(receive: Receive, job: Job) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not job.response_done:
                job.disconnected = True
                job.ctx.stop_generating()
            return


class GenerationResponse(Response):
    """Runs a :class:`Job` while watching for the client leaving; answers JSON or SSE.

    ``deltas(job)`` is the job's delta stream (:func:`job_deltas` bound to an engine client);
    ``on_finish(job, status)`` runs once when the response is done, with ``status`` one of
    ``success``, ``error``, ``cancelled`` (the frontend's metrics)."""

    def __init__(self, job: Job, deltas: Callable[[Job], AsyncGenerator[StreamDelta, None]],
                 on_finish: Callable[[Job, str], None]) -> None:
        self.job = job
        self.deltas = deltas
        self.on_finish = on_finish
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        job = self.job
        status = "error"
        watcher = asyncio.get_running_loop().create_task(_watch_disconnect(receive, job))
        # One step for the watcher: a client that left while the body was decoded, the model
        # directory loaded or the prompt preprocessed is already reported (the server's
        # ``receive`` answers ``http.disconnect`` at once), so no worker is asked for anything.
        await asyncio.sleep(0)
        if job.disconnected:
            await watcher
            self.on_finish(job, "cancelled")
            return
        deltas = self.deltas(job)
        # No timeout object (and its timer) for a request without a timeout.
        deadline = asyncio.timeout(job.timeout) if job.timeout is not None else None
        try:
            try:
                async with deadline if deadline is not None else contextlib.nullcontext():
                    status = await (self._stream(deltas, send, deadline) if job.stream
                                    else self._unary(deltas, send))
            except TimeoutError:
                if deadline is None or not deadline.expired():
                    raise
                # Stop the engine request (the worker runs abort), then answer the client.
                job.timed_out = True
                job.ctx.stop_generating()
                status = "error"
                log.warning("request %s: no finish after the %gs timeout; stopped it",
                            job.ctx.id, job.timeout)
                if not job.response_done and not job.headers_sent:
                    job.response_done = True
                    await _send_error(send, _timeout_error(job))
        except Exception:
            log.exception("request %s failed", job.ctx.id)
            if not job.response_done and not job.headers_sent:
                job.response_done = True
                await _send_error(send, RequestError(
                    "internal error while generating", status=500, code="internal_error",
                    type="server_error"))
        finally:
            watcher.cancel()
            await deltas.aclose()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            if job.disconnected:
                status = "cancelled"
            self.on_finish(job, status)

    async def _unary(self, deltas: AsyncIterator[StreamDelta], send: Send) -> str:
        job = self.job
        r = job.renderer
        try:
            async for d in deltas:
                r.add(d)
                job.see(d)
                if job.ctx.is_stopped():
                    return "cancelled"
        except DynamoError as exc:
            job.response_done = True
            await _send_error(send, dynamo_error_to_request_error(exc))
            return "error"
        if not job.complete:
            job.response_done = True
            await _send_error(send, RequestError(
                "the stream ended without a finish", status=502,
                code=BackendError.StreamIncomplete.value, type="server_error"))
            return "error"
        if job.error is not None:
            job.response_done = True
            await _send_error(send, RequestError(job.error, status=500, code="engine_error",
                                                 type="server_error"))
            return "error"
        body = _encode(r.response(job.usage))
        job.response_done = True
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", job.ctx.id.encode()),
        ]})
        await send({"type": "http.response.body", "body": body})
        return "success"

    async def _stream(self, deltas: AsyncIterator[StreamDelta], send: Send,
                      deadline: asyncio.Timeout | None) -> str:
        job = self.job
        r = job.renderer
        try:
            first = await anext(deltas)
        except StopAsyncIteration:
            first = None
        except DynamoError as exc:
            job.response_done = True
            await _send_error(send, dynamo_error_to_request_error(exc))
            return "error"
        if first is not None and first.error is not None:
            job.response_done = True
            await _send_error(send, RequestError(first.error, status=500, code="engine_error",
                                                 type="server_error"))
            return "error"
        job.headers_sent = True
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
            (b"x-request-id", job.ctx.id.encode()),
        ]})
        status = "success"
        out = _Coalescer(send)
        try:
            out.write(r.start())
            if first is not None:
                job.see(first)
                out.write(self._event(first))
            if first is not None and not job.complete:
                # Per chunk: the renderer's event straight away (``_event`` only adds the
                # error case), the tally only for a finish (``see`` ignores the rest).
                stopped = job.ctx.is_stopped
                event = r.event
                for_error = self._event
                write = out.write
                async for d in deltas:
                    if stopped():
                        return "cancelled"
                    if d.finish_reason is not None:
                        job.see(d)
                    write(event(d) if d.error is None else for_error(d))
                    if out.backlog > _MAX_BACKLOG:
                        await out.drained()
            if not job.complete:
                raise DynamoError(BackendError.StreamIncomplete,
                                  "the stream ended without a finish")
            if job.error is not None:
                status = "error"
            elif r.include_usage and job.usage is not None:
                out.write(r.usage_event(job.usage))
        except DynamoError as exc:
            if job.ctx.is_stopped():
                return "cancelled"
            status = "error"
            out.write(sse(dynamo_error_to_request_error(exc).to_response()))
        finally:
            if deadline is not None and deadline.expired():
                # Timed out mid-stream: the error event and [DONE] (the caller stops the engine).
                out.write(sse(_timeout_error(job).to_response()))
                job.response_done = True
            else:
                job.response_done = not job.ctx.is_stopped()
            await out.close(DONE if job.response_done else b"")
        return status

    def _event(self, d: StreamDelta) -> bytes:
        if d.error is not None:
            return sse(RequestError(d.error, status=500, code="engine_error",
                                    type="server_error").to_response())
        return self.job.renderer.event(d)


class _Coalescer:
    """Sends SSE bytes as few ``http.response.body`` messages as possible, adding no latency.

    :meth:`write` only appends to a list of pending events and wakes a sender task; the task
    runs when the producer next waits (for the engine), so every event that was ready at once
    (a burst of chunks on the request plane) goes out in one message, one ``write`` syscall. A
    producer with a backlog over :data:`_MAX_BACKLOG` bytes (a slow reader) waits in
    :meth:`drained`. A lone event is sent as it is (no copy), and nothing sent stays referenced:
    between bursts a stream holds an empty list, not a buffer grown to its largest burst. A
    backlog over :data:`_COMPACT_AT` bytes (the client is not reading) goes to one buffer
    instead (a list of events costs ~20% more than their bytes).
    """

    # The sender and the producer wake each other with bare futures (cheaper than
    # ``asyncio.Event``s: one wake-up per burst of events is the cost that matters here).
    __slots__ = ("_buf", "_closing", "_drained", "_loop", "_parts", "_send", "_size", "_task",
                 "_wake")

    def __init__(self, send: Send) -> None:
        self._send = send
        # The pending bytes: events in _parts, or (a backlog) all of them in _buf.
        self._parts: list[bytes] = []
        self._buf: bytearray | None = None
        self._size = 0  # pending bytes
        self._loop = asyncio.get_running_loop()
        #: The sender's wake-up (while it waits for bytes), the producer's (while it waits
        #: for the backlog to go out).
        self._wake: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._closing = False
        self._task = self._loop.create_task(self._run())

    @property
    def backlog(self) -> int:
        return self._size

    def write(self, data: bytes) -> None:
        if data:
            size = self._size = self._size + len(data)
            if size <= _COMPACT_AT:
                self._parts.append(data)
            else:
                buf = self._buf
                if buf is None:
                    buf = self._buf = bytearray().join(self._parts)
                    self._parts = []
                buf += data
            wake = self._wake
            if wake is not None:
                self._wake = None
                if not wake.done():
                    wake.set_result(None)

    async def drained(self) -> None:
        if self._size and not self._task.done():
            self._drained = self._loop.create_future()
            try:
                await self._drained
            finally:
                self._drained = None

    async def _run(self) -> None:
        try:
            while True:
                if not self._size and not self._closing:
                    self._wake = self._loop.create_future()
                    await self._wake
                if self._closing:
                    return
                await self._send({"type": "http.response.body", "body": self._take(),
                                  "more_body": True})
                drained = self._drained
                if not self._size and drained is not None and not drained.done():
                    drained.set_result(None)
        finally:
            # A sender that failed (or stopped) must not leave the producer waiting.
            drained = self._drained
            if drained is not None and not drained.done():
                drained.set_result(None)

    async def close(self, last: bytes) -> None:
        """Stop the sender; send what is left plus ``last`` as the final body message."""
        self._closing = True
        wake, self._wake = self._wake, None
        if wake is not None and not wake.done():
            wake.set_result(None)
        try:
            await self._task
        finally:
            if not self._task.done():
                self._task.cancel()
        body = self._take()
        await self._send({"type": "http.response.body", "body": body + last if body else last,
                          "more_body": False})

    def _take(self) -> bytes:
        """The pending bytes as one body (a lone event as it is), and none pending after."""
        self._size = 0
        buf = self._buf
        if buf is not None:
            self._buf = None
            return bytes(buf)
        parts, self._parts = self._parts, []
        return parts[0] if len(parts) == 1 else b"".join(parts)  # (none: b"")


def _timeout_error(job: Job) -> RequestError:
    return RequestError(f"the request did not finish within its {job.timeout:g}s timeout; it "
                        "was stopped", status=504, code=BackendError.ResponseTimeout.value,
                        type="server_error")


async def _send_error(send: Send, err: RequestError) -> None:
    body = _encode(err.to_response())
    await send({"type": "http.response.start", "status": err.status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
