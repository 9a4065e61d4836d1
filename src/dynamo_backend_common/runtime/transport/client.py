"""Request-plane client: one persistent multiplexed connection per server address.

Contract of :meth:`RequestPlaneClient.stream`:

- The connection to ``address`` is opened lazily (at the first iteration) and shared by every
  concurrent stream to that address; after it is lost, the next stream opens a new one.
- Connection refused / unreachable: ``DynamoError(CannotConnect)``; no answer within
  ``connect_timeout``: ``DynamoError(ConnectionTimeout)``. Both mean "this worker did not take
  the request".
- Connection lost (or a protocol error from the server) mid-stream: ``DynamoError(Disconnected)``
  raised from the iterator at once, after the items already received.
- Server ERROR frame: ``DynamoError.from_wire(...)`` (same kind, message and causes).
- With ``ctx``: the first ``ctx.stop_generating()`` sends STOP (the server's handler sees
  ``ctx.stopped()`` and should finish with a ``cancelled`` terminal; items keep flowing);
  ``ctx.kill()`` sends KILL and the iterator raises ``DynamoError(Cancelled)`` at once without
  waiting for the server. If ``headers`` has no ``x-request-id``, ``ctx.id`` is sent as one so
  both sides log the same request id.
- Consumer abandons the iterator early (``aclose()``, or ``break`` and the generator is
  finalised): STOP is sent (unless the stream already ended) and the stream is forgotten; later
  frames for it are dropped.
- Receive queues are unbounded per stream: a consumer that stops reading while the server keeps
  producing accumulates items in memory (TCP backpressure is per connection, and a stalled reader
  must not stall the other streams).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import cast

from ...errors import BackendError, DynamoError
from ..context import Context
from . import frames as fr

log = logging.getLogger("dynamo_backend_common.transport")


class _Stream:
    """One stream's client side: the items received, in arrival order, then one terminal
    outcome; and its context's stop callback (:meth:`on_stop`).

    One of these lives per request in flight, so it is kept small (an empty deque alone is
    ~600 bytes) and allocates nothing per item in the common case: the next
    item waits in ``item``, and only items arriving while one already waits go to a list,
    ``more``, which the consumer takes whole. The order is arrival order: an item goes to
    ``item`` only when nothing waits at all, and the consumer empties ``item`` before ``more``
    and a taken ``more`` before looking at ``item`` again. The stop callback is a method
    rather than closures over the stream.
    """

    __slots__ = ("conn", "discarded", "item", "kill_watch", "more", "sid", "terminal", "waiter")

    def __init__(self, conn: _Connection, sid: int) -> None:
        self.conn = conn
        self.sid = sid
        self.item: bytes | None = None
        self.more: list[bytes] | None = None
        # None while open; True after END; a DynamoError after ERROR / loss / kill.
        self.terminal: bool | DynamoError | None = None
        #: Set by a kill: the items not yet yielded (also those the consumer took) are dropped.
        self.discarded = False
        self.waiter: asyncio.Future[None] | None = None
        self.kill_watch: asyncio.Task[None] | None = None

    def wake(self) -> None:
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)

    def fail(self, exc: DynamoError, *, discard_items: bool = False) -> None:
        if self.terminal is None:
            self.terminal = exc
            if discard_items:
                self.discarded = True
                self.item = self.more = None
        self.wake()

    def on_stop(self, ctx: Context) -> None:
        """The context's stop callback: STOP to the server; a kill drops the stream too."""
        if self.terminal is not None:
            return
        if ctx.is_killed():
            self.kill()
            return
        self.conn.write_frame(fr.STOP, self.sid)
        # A kill may still follow the stop; only this rare path pays for a watcher task,
        # which the stream owns and cancels when it ends.
        self.kill_watch = asyncio.get_running_loop().create_task(self._watch_kill(ctx))

    def kill(self) -> None:
        if self.terminal is None:
            self.conn.write_frame(fr.KILL, self.sid)
            self.conn.streams.pop(self.sid, None)
            self.fail(DynamoError(BackendError.Cancelled, "request killed"), discard_items=True)

    async def _watch_kill(self, ctx: Context) -> None:
        await ctx.killed()
        self.kill()


class _Connection(asyncio.Protocol):
    """Client end of one connection: stream-id allocation, demultiplexing, coalesced writes."""

    def __init__(self, address: str, max_frame_bytes: int) -> None:
        self.address = address
        self._loop = asyncio.get_running_loop()
        self._reader = fr.FrameReader(max_frame_bytes)
        self._transport: asyncio.Transport | None = None
        self._out = bytearray()
        self._flush_scheduled = False
        self._next_id = 1
        self.streams: dict[int, _Stream] = {}
        self.closed = False
        self.on_lost: Callable[[_Connection], None] | None = None

    # -- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports do not subclass asyncio's.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._reader.feed(data)
        except fr.FrameError as exc:
            self._protocol_error(str(exc))
            return
        streams = self.streams
        for kind, sid, payload in frames:
            st = streams.get(sid)
            if kind == fr.DATA:
                if st is not None:
                    if st.item is None and st.more is None:
                        st.item = payload
                    elif st.more is None:
                        st.more = [payload]
                    else:
                        st.more.append(payload)
                    if st.waiter is not None:
                        st.wake()
            elif kind == fr.END:
                if st is not None:
                    del streams[sid]
                    st.terminal = True
                    st.wake()
            elif kind == fr.ERROR:
                if st is not None:
                    del streams[sid]
                    st.fail(DynamoError.from_wire(fr.decode_error(payload)))
            elif kind == fr.PONG:
                pass
            else:
                self._protocol_error(f"unexpected {fr.KIND_NAMES[kind]} frame from a server")
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._out.clear()
        streams, self.streams = self.streams, {}
        if streams:
            reason = f"connection to {self.address} lost" + (
                f": {type(exc).__name__}: {exc}" if exc is not None else ""
            )
            for st in streams.values():
                st.fail(DynamoError.disconnected(reason))  # one instance per raise site
        if self.on_lost is not None:
            self.on_lost(self)

    # -- output ---------------------------------------------------------------------------
    def open_stream(self, envelope: bytes) -> tuple[int, _Stream]:
        """Register a new stream and queue its REQUEST frame (an encoded envelope)."""
        sid = self._next_id
        self._next_id = sid + 1
        st = self.streams[sid] = _Stream(self, sid)
        self.write_frame(fr.REQUEST, sid, envelope)  # copied: the caller may drop it
        return sid, st

    def write_frame(self, kind: int, sid: int, payload: bytes = b"") -> None:
        """Queue a frame; everything queued in one loop iteration goes out in one write."""
        if self.closed:
            return
        out = self._out
        out += fr.HEADER.pack(len(payload), kind, sid)
        out += payload
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and not self.closed and self._transport is not None:
            out, self._out = self._out, bytearray()  # hand over: the transport may keep it
            self._transport.write(out)

    def _protocol_error(self, message: str) -> None:
        log.error("request plane: closing connection to %s: %s", self.address, message)
        self.close(abort=True)

    def close(self, *, abort: bool = False) -> None:
        if self._transport is not None and not self._transport.is_closing():
            if abort:
                self._transport.abort()
            else:
                self._flush()
                self._transport.close()


class RequestPlaneClient:
    """Client side of the request plane. See the module docs for the stream contract."""

    def __init__(
        self,
        *,
        connect_timeout: float = 5.0,
        max_frame_bytes: int = fr.DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.max_frame_bytes = max_frame_bytes
        self._conns: dict[str, _Connection] = {}
        self._connecting: dict[str, asyncio.Task[_Connection]] = {}
        self._closed = False

    # -- connections ----------------------------------------------------------------------
    async def _connection(self, address: str) -> _Connection:
        conn = self._conns.get(address)
        if conn is not None and not conn.closed:
            return conn
        if self._closed:
            raise DynamoError(BackendError.CannotConnect, "request plane client is closed")
        task = self._connecting.get(address)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._connect(address))
            self._connecting[address] = task
            task.add_done_callback(self._connect_done)
        try:
            # Shielded: one waiter giving up must not cancel the connect the others wait on.
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled() and self._closed:  # close() cancelled the connect, not us
                raise DynamoError(
                    BackendError.CannotConnect, "request plane client is closed"
                ) from None
            raise

    def _connect_done(self, task: asyncio.Task[_Connection]) -> None:
        for address, t in list(self._connecting.items()):
            if t is task:
                del self._connecting[address]
        if not task.cancelled():
            task.exception()  # retrieved here too, in case every waiter gave up

    async def _connect(self, address: str) -> _Connection:
        host, port = _split_address(address)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(address, self.max_frame_bytes), host, port
                )
        except TimeoutError:
            raise DynamoError(
                BackendError.ConnectionTimeout,
                f"connecting to {address} timed out after {self.connect_timeout}s",
            ) from None
        except OSError as exc:
            raise DynamoError(
                BackendError.CannotConnect, f"cannot connect to {address}: {exc}"
            ) from None
        if self._closed:
            conn.close(abort=True)
            raise DynamoError(BackendError.CannotConnect, "request plane client is closed")
        conn.on_lost = self._forget
        self._conns[address] = conn
        return conn

    def _forget(self, conn: _Connection) -> None:
        if self._conns.get(conn.address) is conn:
            del self._conns[conn.address]

    # -- streams --------------------------------------------------------------------------
    def stream(
        self,
        address: str,
        endpoint: str,
        payload: bytes,
        ctx: Context | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """Send one request; iterate the response items' bytes. See the module docs."""
        return self._stream(address, endpoint, payload, ctx, headers)

    async def _stream(
        self,
        address: str,
        endpoint: str,
        payload: bytes,
        ctx: Context | None,
        headers: Mapping[str, str] | None,
    ) -> AsyncGenerator[bytes, None]:
        if ctx is not None:
            if ctx.is_killed():
                raise DynamoError(BackendError.Cancelled, "request killed before it was sent")
            if headers is None or "x-request-id" not in headers:
                headers = {**(headers or {}), "x-request-id": ctx.id}
        envelope = fr.encode_request(endpoint, headers or {}, payload)
        # Neither the payload nor the envelope stays alive for the stream's lifetime (they are
        # a request's largest objects here): open_stream queues a copy of the envelope.
        del payload, headers
        if len(envelope) > self.max_frame_bytes:
            raise DynamoError.invalid_argument(
                f"request of {len(envelope)} bytes exceeds the frame limit of "
                f"{self.max_frame_bytes}"
            )
        conn = await self._connection(address)
        if conn.closed:  # lost while we were being resumed: the request was never sent
            raise DynamoError(BackendError.CannotConnect, f"connection to {address} lost")
        sid, st = conn.open_stream(envelope)
        del envelope
        on_stop: Callable[[Context], None] | None = None
        if ctx is not None:
            on_stop = st.on_stop
            ctx.add_stop_callback(on_stop)
        loop = asyncio.get_running_loop()
        try:
            while True:
                item = st.item
                if item is not None:
                    st.item = None
                    yield item
                    continue
                more = st.more
                if more is not None:
                    # The whole batch; items arriving meanwhile go to ``item`` / a new batch.
                    st.more = None
                    for item in more:
                        yield item
                        if st.discarded:  # killed while the consumer held the batch
                            break
                    del more
                    continue
                terminal = st.terminal
                if terminal is not None:
                    if isinstance(terminal, DynamoError):
                        raise terminal
                    return
                st.waiter = loop.create_future()
                await st.waiter
        finally:
            if on_stop is not None and ctx is not None:
                ctx.remove_stop_callback(on_stop)
            if st.kill_watch is not None:
                st.kill_watch.cancel()
            if st.terminal is None:
                # Abandoned by the consumer (or cancelled): ask the server to wind the request
                # down gracefully and stop listening for it.
                conn.write_frame(fr.STOP, sid)
                conn.streams.pop(sid, None)

    async def call(
        self,
        address: str,
        endpoint: str,
        payload: bytes,
        ctx: Context | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> bytes:
        """Unary request: the response must be exactly one item.

        Zero items raise ``DynamoError(StreamIncomplete)``; more than one raise ``Unknown``
        (the stream is abandoned, which sends STOP).
        """
        result: bytes | None = None
        gen = self._stream(address, endpoint, payload, ctx, headers)
        try:
            async for item in gen:
                if result is not None:
                    raise DynamoError.unknown(
                        f"endpoint {endpoint!r} at {address} returned more than one item"
                    )
                result = item
        finally:
            await gen.aclose()
        if result is None:
            raise DynamoError(
                BackendError.StreamIncomplete,
                f"endpoint {endpoint!r} at {address} returned no item",
            )
        return result

    async def close(self) -> None:
        """Close every connection; streams still open fail with ``Disconnected``. Final."""
        self._closed = True
        for task in list(self._connecting.values()):
            task.cancel()
        conns = list(self._conns.values())
        self._conns.clear()
        for conn in conns:
            conn.close()
        # Fail waiting streams now rather than when the transports report the loss.
        for conn in conns:
            streams, conn.streams = conn.streams, {}
            for st in streams.values():
                st.fail(DynamoError.disconnected(f"request plane client closed ({conn.address})"))

    async def __aenter__(self) -> RequestPlaneClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` (anything after a ``/`` is ignored) -> (host, port)."""
    hostport = address.partition("/")[0]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise DynamoError(BackendError.CannotConnect, f"bad request plane address {address!r}")
    return host.strip("[]"), int(port)
