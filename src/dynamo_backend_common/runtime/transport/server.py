"""Request-plane server: serves named endpoints over persistent multiplexed TCP connections.

Per connection (one per client process), every REQUEST frame starts one *stream*: a task that
runs the endpoint's handler and forwards each item it yields as a DATA frame, then END (or
ERROR). Semantics, per stream:

- The handler gets a fresh :class:`Context` whose id is the ``x-request-id`` header (or a new id).
- Unknown endpoint: ERROR ``CannotConnect`` "unknown endpoint: <name>" (a frontend skips the
  worker and tries another).
- Handler raises :class:`DynamoError` (``WorkerDraining`` included): ERROR with its wire form,
  kind preserved. Any other exception: ERROR ``Unknown`` (``DynamoError.from_exception``), logged
  with its traceback.
- STOP: ``ctx.stop_generating()``; the handler keeps running and its items keep flowing (it is
  expected to finish with a ``cancelled`` terminal).
- KILL: ``ctx.kill()``, then the stream is dropped: its task is cancelled (the handler's generator
  is closed, so its ``finally`` blocks run), nothing more is forwarded and the stream ends with
  ERROR ``Cancelled`` "request killed". Clients normally stop listening at once (see client.py).
- Connection lost: every stream on it is cancelled the same way but *without* touching ``ctx``:
  a plain drop is not an explicit cancel, and the layer above relies on that distinction.
- :meth:`RequestPlaneServer.close`: remaining streams are cancelled and end with ERROR
  ``EngineShutdown`` (the frontend retries or migrates), then connections are closed.

Output path: frames are appended to a per-connection buffer and written with one
``transport.write`` per event-loop iteration (a ``call_soon`` flush), so chunks that become ready
together, from one stream or many, share one syscall. Backpressure: when the transport's buffer
passes its high-water mark, producers wait (per connection) until it drains, so a slow client
cannot make the worker buffer without bound; each stream then holds at most one pending item.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, cast

from ...errors import BackendError, DynamoError
from ..context import Context
from ..gc_tuning import tune_for_serving
from . import frames as fr

log = logging.getLogger("dynamo_backend_common.transport")

Handler = Callable[[bytes, Context, Mapping[str, str]], AsyncIterator[bytes]]
"""``(request payload, the request's Context, headers) -> async iterator of encoded items``."""

_pack_header = fr.HEADER.pack
_DATA = fr.DATA
_FLUSH_AT = 256 * 1024  # write at once past this many buffered bytes instead of waiting a tick
_HIGH_WATER = 1024 * 1024
_LOW_WATER = 256 * 1024

# Why a stream's task was cancelled; decides the terminal frame it sends (if it can send one).
_DROPPED = 0  # connection lost: nothing can be sent
_KILLED = 1
_SHUTDOWN = 2


class ServerStats:
    """Counters for tests and metrics. ``writes`` counts ``transport.write`` calls; ``pauses``
    counts the times a producer waited for the client to drain (backpressure)."""

    __slots__ = (
        "bytes_out", "connections", "frames_in", "frames_out", "pauses", "streams", "writes",
    )

    def __init__(self) -> None:
        self.connections = 0  # accepted so far
        self.streams = 0  # started so far
        self.frames_in = 0
        self.frames_out = 0
        self.writes = 0
        self.bytes_out = 0
        self.pauses = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class _Stream:
    __slots__ = ("cancel_reason", "ctx", "finishing", "task")

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.task: asyncio.Task[None] | None = None
        self.cancel_reason: int | None = None
        self.finishing = False  # terminal frame queued; the task only cleans up from here


class _Connection(asyncio.Protocol):
    """One client connection: frame parsing, stream tasks, coalesced and paced output."""

    def __init__(self, server: RequestPlaneServer) -> None:
        self._server = server
        self._stats = server.stats
        self._loop = asyncio.get_running_loop()
        self._reader = fr.FrameReader(server.max_frame_bytes)
        self._transport: asyncio.Transport | None = None
        self._out = bytearray()
        self._flush_scheduled = False
        self._paused = False
        # Set when producers must pause at their next item: the transport is over its high-water
        # mark, or an inline flush happened (a handler that never awaits must still let the
        # loop read STOP/KILL frames and serve other connections).
        self._yield_due = False
        self._drain: asyncio.Future[None] | None = None
        self.streams: dict[int, _Stream] = {}
        self.closed = False
        self.lost = self._loop.create_future()
        self.peer = "?"

    # -- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports do not subclass asyncio's.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        transport.set_write_buffer_limits(high=_HIGH_WATER, low=_LOW_WATER)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._server._connections.add(self)
        self._server.stats.connections += 1

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._reader.feed(data)
        except fr.FrameError as exc:
            self._protocol_error(str(exc))
            return
        self._server.stats.frames_in += len(frames)
        for kind, sid, payload in frames:
            if kind == fr.REQUEST:
                if sid in self.streams:
                    self._protocol_error(f"duplicate stream id {sid}")
                    return
                try:
                    env = fr.decode_request(payload)
                except fr.FrameError as exc:
                    self._protocol_error(str(exc))
                    return
                self._start_stream(sid, env)
            elif kind == fr.STOP:
                st = self.streams.get(sid)
                if st is not None:
                    st.ctx.stop_generating()
            elif kind == fr.KILL:
                st = self.streams.get(sid)
                if st is not None:
                    st.ctx.kill()
                    self._cancel(st, _KILLED)
            elif kind == fr.PING:
                self.write_frame(fr.PONG, sid, payload)
            else:
                self._protocol_error(f"unexpected {fr.KIND_NAMES[kind]} frame from a client")
                return

    def pause_writing(self) -> None:
        self._paused = True
        self._yield_due = True

    def resume_writing(self) -> None:
        self._paused = False
        self._yield_due = False
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._out.clear()
        self.resume_writing()  # wake paused producers; their streams are cancelled below
        for st in list(self.streams.values()):
            self._cancel(st, _DROPPED)
        self._server._connections.discard(self)
        if not self.lost.done():
            self.lost.set_result(None)

    # -- output ---------------------------------------------------------------------------
    def write_frame(self, kind: int, sid: int, payload: bytes = b"") -> None:
        """Queue one frame; it goes out with everything else queued in this loop iteration."""
        if self.closed:
            return
        out = self._out
        out += _pack_header(len(payload), kind, sid)
        out += payload
        self._stats.frames_out += 1
        if len(out) >= _FLUSH_AT:
            self._flush()
            self._yield_due = True
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._out or self.closed or self._transport is None:
            return
        # Hand the buffer over instead of copying it: the transport may keep a reference.
        out, self._out = self._out, bytearray()
        stats = self._server.stats
        stats.writes += 1
        stats.bytes_out += len(out)
        self._transport.write(out)

    async def _pace(self) -> None:
        """Called by a producer when ``_yield_due``: wait for the drain, or yield once."""
        if self._paused:
            await self.wait_writable()
        else:
            self._yield_due = False
            await asyncio.sleep(0)

    async def wait_writable(self) -> None:
        """Return once the transport is below its low-water mark (or the connection is gone)."""
        while self._paused and not self.closed:
            self._server.stats.pauses += 1
            if self._drain is None:
                self._drain = self._loop.create_future()
            await self._drain

    # -- streams --------------------------------------------------------------------------
    def _start_stream(self, sid: int, env: fr.RequestEnvelope) -> None:
        server = self._server
        server.stats.streams += 1
        handler = server._endpoints.get(env.endpoint)
        if handler is None:
            err = DynamoError(BackendError.CannotConnect, f"unknown endpoint: {env.endpoint}")
            self.write_frame(fr.ERROR, sid, fr.encode_error(err.to_wire()))
            return
        st = _Stream(Context(env.headers.get("x-request-id") or None))
        self.streams[sid] = st
        server._inflight += 1
        task = self._loop.create_task(self._run(sid, st, handler, env))
        st.task = task
        server._tasks.add(task)
        task.add_done_callback(lambda t: self._stream_done(sid, st, t))

    def _stream_done(self, sid: int, st: _Stream, task: asyncio.Task[None]) -> None:
        # A done callback, not a ``finally``: a task cancelled before its first step never
        # runs its body, yet must be accounted for and still owes the client a terminal frame.
        if self.streams.get(sid) is st:
            del self.streams[sid]
        server = self._server
        server._inflight -= 1
        server._tasks.discard(task)
        if task.cancelled() and st.cancel_reason is not None and not st.finishing:
            self._write_cancelled(sid, st.cancel_reason)

    def _cancel(self, st: _Stream, reason: int) -> None:
        # Once a stream is finishing (terminal frame queued, generator closing) it is left to
        # complete: cancelling its cleanup would only skip the handler's finally blocks.
        if st.cancel_reason is None and not st.finishing and st.task is not None:
            st.cancel_reason = reason
            st.task.cancel()

    async def _run(
        self, sid: int, st: _Stream, handler: Handler, env: fr.RequestEnvelope
    ) -> None:
        gen: AsyncIterator[bytes] | None = None
        exhausted = False
        write = self.write_frame
        limit = self._server.max_frame_bytes
        endpoint = env.endpoint
        try:
            gen = handler(env.payload, st.ctx, env.headers)
            # The envelope (the request's payload, its largest object here) is the handler's
            # now: not kept by this frame for the whole stream.
            del env
            async for item in gen:
                if st.cancel_reason is not None:
                    break  # the handler swallowed our cancellation: stop forwarding anyway
                if len(item) > limit:
                    raise DynamoError.unknown(
                        f"response item of {len(item)} bytes exceeds the frame limit of {limit}"
                    )
                write(_DATA, sid, item)
                if self._yield_due:
                    await self._pace()
            else:
                exhausted = True
            st.finishing = True
            if st.cancel_reason is None:
                write(fr.END, sid)
            else:
                self._write_cancelled(sid, st.cancel_reason)
        except asyncio.CancelledError:
            st.finishing = True
            if st.cancel_reason is None:
                raise  # not ours (e.g. the loop is shutting down): propagate
            self._write_cancelled(sid, st.cancel_reason)
        except DynamoError as exc:
            st.finishing = True
            write(fr.ERROR, sid, fr.encode_error(exc.to_wire()))
        except Exception as exc:
            st.finishing = True
            log.exception("handler for endpoint %r failed (request %s)", endpoint, st.ctx.id)
            write(fr.ERROR, sid, fr.encode_error(DynamoError.from_exception(exc).to_wire()))
        finally:
            st.finishing = True
            # Close a generator we stopped early (at a yield) so its finally blocks run now.
            aclose: Callable[[], Any] | None = getattr(gen, "aclose", None)
            if not exhausted and aclose is not None:
                try:
                    await aclose()
                except Exception:
                    log.exception("closing the handler of request %s failed", st.ctx.id)

    def _write_cancelled(self, sid: int, reason: int) -> None:
        if reason == _KILLED:
            self.write_frame(fr.ERROR, sid, _KILLED_WIRE)
        elif reason == _SHUTDOWN:
            self.write_frame(fr.ERROR, sid, _SHUTDOWN_WIRE)

    def _protocol_error(self, message: str) -> None:
        log.error("request plane: closing connection from %s: %s", self.peer, message)
        self.closed = True
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._flush()
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


_KILLED_WIRE = fr.encode_error(DynamoError(BackendError.Cancelled, "request killed").to_wire())
_SHUTDOWN_WIRE = fr.encode_error(
    DynamoError(BackendError.EngineShutdown, "request plane server closed").to_wire()
)


class RequestPlaneServer:
    """Serves named endpoints to :class:`RequestPlaneClient` connections. See module docs."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_frame_bytes: int = fr.DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        self.host = host
        self.port = port
        self.max_frame_bytes = max_frame_bytes
        self.stats = ServerStats()
        self._endpoints: dict[str, Handler] = {}
        self._server: asyncio.Server | None = None
        self._address: str | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight = 0

    def add_endpoint(self, name: str, handler: Handler) -> None:
        """Serve ``handler`` as ``name`` (replacing any previous handler of that name)."""
        self._endpoints[name] = handler

    async def start(self) -> None:
        """Bind and listen. Raises ``OSError`` if the address cannot be bound."""
        if self._server is not None:
            raise RuntimeError("server already started")
        tune_for_serving()  # a serving process: fewer cyclic-GC passes (see gc_tuning)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), self.host, self.port, reuse_address=True
        )
        sock = self._server.sockets[0].getsockname()
        host = sock[0]
        self._address = f"[{host}]:{sock[1]}" if ":" in host else f"{host}:{sock[1]}"

    @property
    def address(self) -> str:
        """``host:port`` actually bound (``[v6]:port`` for IPv6). Only valid after start()."""
        if self._address is None:
            raise RuntimeError("server not started")
        return self._address

    @property
    def inflight(self) -> int:
        """Number of streams whose handler is currently running."""
        return self._inflight

    async def stop_accepting(self) -> None:
        """Close the listening socket; existing connections and their streams carry on."""
        if self._server is not None and self._server.is_serving():
            self._server.close()

    async def close(self, timeout: float | None = None) -> None:
        """Stop accepting, cancel remaining streams, close connections.

        Cancelled streams end with ERROR ``EngineShutdown``. Waits up to ``timeout`` seconds
        (``None``: no limit) for the handlers' cleanup and for buffered output to flush, then
        aborts whatever connection is still open. Idempotent.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - loop.time())

        await self.stop_accepting()
        for conn in list(self._connections):
            for st in list(conn.streams.values()):
                conn._cancel(st, _SHUTDOWN)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=left())
        conns = list(self._connections)
        for conn in conns:
            conn.close()
        if conns:
            await asyncio.wait([c.lost for c in conns], timeout=left())
        for conn in conns:
            if not conn.lost.done():
                conn.abort()
        # Let transports that were just aborted deliver connection_lost before we return.
        if conns:
            await asyncio.wait([c.lost for c in conns], timeout=1.0)

    async def __aenter__(self) -> RequestPlaneServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
