"""NVIDIA Dynamo 1.6.1's TCP request plane: request frames plus a per-request call-home stream.

This is the default request plane (``DYN_REQUEST_PLANE=tcp``): a real Dynamo frontend calls our
workers through it, and our frontend calls Dynamo's workers. Captured bytes are pinned in
``tests/golden/dynamo-1.6.1/tcp``. All integers are big-endian.

Request connection (client -> server, one persistent connection per worker, pipelined)::

    u16 path_len | path | u16 headers_len | headers (JSON object) | u32 payload_len | payload
    payload = TwoPart(header = RequestControlMessage JSON, body = request in payload_codec)
    TwoPart = u64 header_len | u64 body_len | u64 checksum (0) | header | body

The server answers every frame, in order, with an ACK ``u32 len | text`` (empty = accepted;
otherwise the reason, e.g. ``Server unavailable: unknown endpoint <path>``). The control
message's ``connection_info.info`` (a JSON string) names the client's call-home ``address`` and
a ``subject``. The server then *dials back* (a new TCP connection per request) and writes
TwoPart messages: header-only handshake ``{"subject", "stream_type": "response"}``, header-only
prologue ``{"error": null}``, one body-only ``{"data": Annotated, "complete_final": false}`` per
item (``Annotated`` = ``{"data": LLMEngineOutput}``, or ``{"event": "error", "error": {...}}``),
body-only ``{"complete_final": true}``, header-only ``"sentinel"``. The client closes the
connection after the sentinel. On the call-home connection the client may send header-only
``"stop"`` (``ctx.stop_generating()``: the stream goes on and ends with a ``cancelled``
terminal) or ``"kill"`` (``ctx.kill()``: the server drops the stream and closes at once).

Semantics kept from our private protocol (see :mod:`.server`): a plain connection drop cancels
the handler without touching ``ctx`` (it is not an explicit cancel); ``DynamoError`` kinds
survive the trip (as the Annotated error's ``error_type``); a server closing mid-stream sends an
``EngineShutdown`` error item. Bad input from the wire (a malformed frame, an unknown codec, a
control message or body that does not decode, a truncated stream) is logged once per event,
counted in ``stats`` and answered with an error where a peer can be told; it never crashes the
server or hangs a client (``callback_timeout`` bounds the wait for a call-home).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import struct
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any, Final, cast

import msgspec

from ...errors import BackendError, DynamoError
from ..context import Context
from ..gc_tuning import tune_for_serving
from .server import Handler

__all__ = [
    "DEFAULT_CALLBACK_TIMEOUT",
    "CallHomeClient",
    "CallHomeServer",
    "CallHomeStats",
    "decode_twoparts",
    "encode_request_frame",
    "twopart",
]

log = logging.getLogger("dynamo_backend_common.transport")

_U16: Final = struct.Struct(">H")
_U32: Final = struct.Struct(">I")
_TWO: Final = struct.Struct(">QQQ")
MAX_FRAME: Final = 64 * 2**20
DEFAULT_CALLBACK_TIMEOUT: Final = 10.0
_HIGH_WATER = 1024 * 1024
_EOF_WAIT = 5.0

# Body-only messages of the response stream, msgpack: byte concatenation around the item.
_MP_ITEM_HEAD: Final = b"\x82\xa4data\x81\xa4data"  # {"data": {"data": <item>
_MP_ITEM_TAIL: Final = b"\xaecomplete_final\xc2"  # , "complete_final": false}
_MP_FINAL: Final = b"\x81\xaecomplete_final\xc3"
_JSON_ITEM_HEAD: Final = b'{"data":{"data":'
_JSON_ITEM_TAIL: Final = b'},"complete_final":false}'
_JSON_FINAL: Final = b'{"complete_final":true}'
_SENTINEL: Final = b'"sentinel"'
_KILL: Final = b'"kill"'
_STOP: Final = b'"stop"'
_PROLOGUE_OK: Final = b'{"error":null}'
_ACK_OK: Final = b"\x00\x00\x00\x00"


def twopart(header: bytes = b"", body: bytes = b"") -> bytes:
    """One TwoPart message (checksum 0, as Dynamo's release builds write)."""
    return _TWO.pack(len(header), len(body), 0) + header + body


def decode_twoparts(buf: bytearray, max_bytes: int = MAX_FRAME) -> list[tuple[bytes, bytes]]:
    """Pop every complete TwoPart message off the front of ``buf``; raises ``ValueError`` for
    a length past ``max_bytes``."""
    out: list[tuple[bytes, bytes]] = []
    pos = 0
    n = len(buf)
    while n - pos >= 24:
        hl, bl, _ = _TWO.unpack_from(buf, pos)
        if hl + bl > max_bytes:
            raise ValueError(f"TwoPart message of {hl + bl} bytes exceeds {max_bytes}")
        end = pos + 24 + hl + bl
        if end > n:
            break
        out.append((bytes(buf[pos + 24:pos + 24 + hl]), bytes(buf[pos + 24 + hl:end])))
        pos = end
    if pos:
        del buf[:pos]
    return out


def encode_request_frame(path: str, headers: Mapping[str, str], control: bytes,
                         body: bytes) -> bytes:
    p = path.encode()
    h = msgspec.json.encode(dict(headers))
    payload = twopart(control, body)
    return b"".join((_U16.pack(len(p)), p, _U16.pack(len(h)), h, _U32.pack(len(payload)),
                     payload))


class _ConnInfo(msgspec.Struct):
    address: str
    subject: str
    context: str | None = None
    stream_type: str | None = None


class _ConnectionInfo(msgspec.Struct):
    transport: str
    info: str


class _Control(msgspec.Struct):
    id: str
    connection_info: _ConnectionInfo
    request_type: str = "single_in"
    response_type: str = "many_out"
    payload_codec: str = "json"


class _Annotated(msgspec.Struct):
    # Raw cannot sit in a union: an absent item is an empty Raw (a null one b"null"/b"\xc0").
    data: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)
    event: str | None = None
    error: Any = None
    comment: list[str] | None = None


class _Wrapper(msgspec.Struct):
    data: _Annotated | None = None
    complete_final: bool = False


class _Handshake(msgspec.Struct):
    subject: str
    stream_type: str | None = None


class _Prologue(msgspec.Struct):
    error: str | None = None


_CONTROL_DEC: Final = msgspec.json.Decoder(_Control)
_INFO_DEC: Final = msgspec.json.Decoder(_ConnInfo)
_MP_WRAPPER_DEC: Final = msgspec.msgpack.Decoder(_Wrapper)
_JSON_WRAPPER_DEC: Final = msgspec.json.Decoder(_Wrapper)
_HANDSHAKE_DEC: Final = msgspec.json.Decoder(_Handshake)
_PROLOGUE_DEC: Final = msgspec.json.Decoder(_Prologue)


def _error_item(exc: DynamoError) -> dict[str, Any]:
    """The Annotated error Dynamo's workers send (``error_type`` is the BackendError kind)."""
    message = exc.message if not exc.causes else f"{exc.message} ({'; '.join(exc.causes)})"
    return {"data": {"event": "error", "comment": [message],
                     "error": {"error_type": exc.kind.value, "message": message,
                               "diagnostic": message,
                               "public": {"type": "message", "message": message}}},
            "complete_final": False}


def _error_from_annotated(ann: _Annotated) -> DynamoError:
    err = ann.error
    kind = BackendError.Unknown
    message = "; ".join(ann.comment or []) or "worker reported an error"
    if isinstance(err, dict):
        with contextlib.suppress(ValueError):
            kind = BackendError(str(err.get("error_type", "Unknown")))
        message = str(err.get("message") or message)
    elif isinstance(err, str):
        message = err
    return DynamoError(kind, message)


class CallHomeStats:
    """Counters for tests and metrics; errors are bad input seen from the wire."""

    __slots__ = ("connections", "decode_errors", "protocol_errors", "streams")

    def __init__(self) -> None:
        self.connections = 0
        self.streams = 0
        self.protocol_errors = 0
        self.decode_errors = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


# -- server ---------------------------------------------------------------------------------


class _RequestConn(asyncio.Protocol):
    """One request connection: parse frames, ACK in order, start a stream per request."""

    def __init__(self, server: CallHomeServer) -> None:
        self.server = server
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)
        self.server.stats.connections += 1
        self.server._conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._conns.discard(self)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            if len(buf) < 2:
                return
            (plen,) = _U16.unpack_from(buf, 0)
            if len(buf) < 2 + plen + 2:
                return
            (hlen,) = _U16.unpack_from(buf, 2 + plen)
            off = 4 + plen + hlen
            if len(buf) < off + 4:
                return
            (size,) = _U32.unpack_from(buf, off)
            if size > MAX_FRAME:
                self._fatal(f"request frame of {size} bytes exceeds {MAX_FRAME}")
                return
            end = off + 4 + size
            if len(buf) < end:
                return
            path = bytes(buf[2:2 + plen])
            payload = bytes(buf[off + 4:end])
            headers = bytes(buf[4 + plen:off])
            del buf[:end]
            self.server._on_frame(self, path, headers, payload)

    def ack(self, text: str = "") -> None:
        if self.transport is not None and not self.transport.is_closing():
            if text:
                data = text.encode()
                self.transport.write(_U32.pack(len(data)) + data)
            else:
                self.transport.write(_ACK_OK)

    def _fatal(self, message: str) -> None:
        self.server.stats.protocol_errors += 1
        log.warning("request plane: %s; closing the connection", message)
        self.ack(f"Protocol error: {message}")
        if self.transport is not None:
            self.transport.close()


class _Back(asyncio.Protocol):
    """The server's end of one call-home connection."""

    def __init__(self, stream: _ServerStream) -> None:
        self.stream = stream
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.out: list[bytes] = []
        self.flush_scheduled = False
        self.writable = asyncio.Event()
        self.writable.set()
        self.eof = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            msgs = decode_twoparts(self.buf)
        except ValueError as exc:
            self.stream.server.stats.protocol_errors += 1
            log.warning("call-home stream %s: %s", self.stream.ctx.id, exc)
            self.stream.drop()
            return
        for header, _body in msgs:
            h = header.strip()
            if h == _KILL:
                self.stream.kill()
            elif h == _STOP:
                self.stream.ctx.stop_generating()

    def eof_received(self) -> bool | None:
        self.eof.set()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof.set()
        self.writable.set()
        self.stream.on_lost()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def write(self, data: bytes) -> None:
        self.out.append(data)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        if self.out and self.transport is not None and not self.transport.is_closing():
            data = b"".join(self.out) if len(self.out) > 1 else self.out[0]
            self.transport.write(data)
        self.out.clear()


class _ServerStream:
    __slots__ = ("back", "ctx", "dialing", "done", "killed", "server", "task")

    def __init__(self, server: CallHomeServer, ctx: Context) -> None:
        self.server = server
        self.ctx = ctx
        self.task: asyncio.Task[None] | None = None
        self.back: _Back | None = None
        self.done = False
        self.killed = False
        self.dialing = True

    def kill(self) -> None:
        self.killed = True
        self.ctx.kill()
        self._cancel()
        if self.back is not None and self.back.transport is not None:
            self.back.transport.close()

    def drop(self) -> None:
        self._cancel()
        if self.back is not None and self.back.transport is not None:
            self.back.transport.abort()

    def on_lost(self) -> None:
        if not self.done:
            self._cancel()  # a plain drop: ctx is left alone

    def _cancel(self) -> None:
        if self.task is not None and not self.task.done() and not self.done:
            self.task.cancel()


class CallHomeServer:
    """Serves named endpoints on Dynamo's TCP request plane (see the module docstring).

    Endpoints are keyed by Dynamo's endpoint path, ``{instance_id:x}/{ns}/{comp}/{ep}``
    (:func:`~dynamo_backend_common.protocols.discovery.endpoint_path`). A handler gets the body
    as msgpack (a JSON body is transcoded) and yields msgpack items.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 connect_timeout: float = 5.0) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.stats = CallHomeStats()
        self._handlers: dict[str, Handler] = {}
        self._server: asyncio.Server | None = None
        self._address = ""
        self._conns: set[_RequestConn] = set()
        self._streams: set[_ServerStream] = set()
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()
        # Streams acked but not yet dialled home: Dynamo's frontend cancels those (it drops the
        # pending registrations) the moment it sees this instance leave discovery.
        self._dialing = 0
        self._dialed = asyncio.Event()
        self._dialed.set()

    def add_endpoint(self, path: str, handler: Handler) -> None:
        self._handlers[path] = handler

    async def start(self) -> None:
        tune_for_serving()  # a serving process: fewer cyclic-GC passes (see gc_tuning)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _RequestConn(self), self.host, self.port,
                                               backlog=1024)
        host, port = self._server.sockets[0].getsockname()[:2]
        self._address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def address(self) -> str:
        """``host:port`` actually bound (kept after :meth:`stop_accepting`)."""
        assert self._address, "start() first"
        return self._address

    @property
    def inflight(self) -> int:
        return len(self._streams)

    async def wait_dialed(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) for a moment when every accepted request has its
        response stream connected; False on timeout. Call it right before unregistering: a
        Dynamo frontend fails the requests still waiting for their call-home connection when
        the instance leaves discovery, and streams already connected run to the end."""
        try:
            async with asyncio.timeout(timeout):
                await self._dialed.wait()
        except TimeoutError:
            return False
        return True

    def _dial_done(self, st: _ServerStream) -> None:
        if not st.dialing:
            return
        st.dialing = False
        self._dialing -= 1
        if not self._dialing:
            self._dialed.set()

    async def stop_accepting(self) -> None:
        """Refuse new connections; streams in flight go on."""
        if self._server is not None:
            self._server.close()

    async def close(self, timeout: float | None = None) -> None:
        """Stop accepting; streams still running end with an ``EngineShutdown`` error item."""
        self._closing = True
        await self.stop_accepting()
        for st in list(self._streams):
            st._cancel()
        if self._streams:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout if timeout is not None else 5.0):
                    await self._idle.wait()
        for conn in list(self._conns):
            if conn.transport is not None:
                conn.transport.close()

    async def __aenter__(self) -> CallHomeServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- per request ----------------------------------------------------------------------
    def _on_frame(self, conn: _RequestConn, path_b: bytes, headers_b: bytes,
                  payload: bytes) -> None:
        try:
            path = path_b.decode()
        except UnicodeDecodeError:
            conn._fatal("endpoint path is not UTF-8")
            return
        handler = self._handlers.get(path)
        if handler is None or self._closing:
            log.info("request for unknown endpoint %r", path)
            conn.ack(f"Server unavailable: unknown endpoint {path}")
            return
        try:
            parts = decode_twoparts(bytearray(payload))
            if len(parts) != 1:
                raise ValueError("payload is not one TwoPart message")
            control_b, body = parts[0]
            control = _CONTROL_DEC.decode(control_b)
            if control.connection_info.transport != "tcp_server":
                raise ValueError(f"unsupported response transport "
                                 f"{control.connection_info.transport!r}")
            info = _INFO_DEC.decode(control.connection_info.info)
            headers = msgspec.json.decode(headers_b, type=dict[str, str]) if headers_b else {}
        except (ValueError, msgspec.MsgspecError) as exc:
            self.stats.decode_errors += 1
            log.warning("undecodable request on %s: %s", path, exc)
            conn.ack(f"Deserialization Error: {exc}")
            return
        conn.ack()
        ctx = Context(control.id or headers.get("request-id") or None)
        st = _ServerStream(self, ctx)
        self._streams.add(st)
        self._idle.clear()
        self._dialing += 1
        self._dialed.clear()
        self.stats.streams += 1
        st.task = asyncio.get_running_loop().create_task(
            self._run(st, handler, info, control.payload_codec, body, headers))
        st.task.add_done_callback(lambda _t: self._forget(st))

    def _forget(self, st: _ServerStream) -> None:
        self._dial_done(st)  # a task cancelled before it dialled
        self._streams.discard(st)
        if not self._streams:
            self._idle.set()

    async def _run(self, st: _ServerStream, handler: Handler, info: _ConnInfo, codec: str,
                   body: bytes, headers: dict[str, str]) -> None:
        host, _, port = info.address.rpartition(":")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, back = await loop.create_connection(lambda: _Back(st), host.strip("[]"),
                                                       int(port))
        except (OSError, TimeoutError, ValueError) as exc:
            self._dial_done(st)
            self.stats.protocol_errors += 1
            log.warning("request %s: cannot call home to %s: %s", st.ctx.id, info.address, exc)
            return
        st.back = back
        back.write(twopart(msgspec.json.encode(_Handshake(info.subject, "response"))))
        back.write(twopart(_PROLOGUE_OK))
        self._dial_done(st)
        json_codec = codec == "json"
        head, tail, final = ((_JSON_ITEM_HEAD, _JSON_ITEM_TAIL, _JSON_FINAL) if json_codec
                             else (_MP_ITEM_HEAD, _MP_ITEM_TAIL, _MP_FINAL))
        error: DynamoError | None = None
        try:
            if codec not in ("json", "msgpack"):
                self.stats.decode_errors += 1
                raise DynamoError.invalid_argument(f"unknown payload codec {codec!r}")
            if json_codec:
                try:
                    body = msgspec.msgpack.encode(msgspec.json.decode(body))
                except msgspec.MsgspecError as exc:
                    self.stats.decode_errors += 1
                    raise DynamoError.invalid_argument(f"request body is not JSON: {exc}") \
                        from None
            gen = handler(body, st.ctx, headers)
            try:
                async for item in gen:
                    if json_codec:
                        item = msgspec.json.encode(msgspec.msgpack.decode(item))
                    back.write(twopart(b"", head + item + tail))
                    if not back.writable.is_set():
                        back.flush()
                        await back.writable.wait()
            finally:
                aclose = getattr(gen, "aclose", None)
                if aclose is not None:
                    await aclose()
        except asyncio.CancelledError:
            if st.killed or back.transport is None or back.transport.is_closing():
                st.done = True
                raise
            if not self._closing:
                st.done = True
                raise
            error = DynamoError(BackendError.EngineShutdown, "worker is shutting down")
        except DynamoError as exc:
            error = exc
        except Exception as exc:
            log.exception("request %s: handler failed", st.ctx.id)
            error = DynamoError.from_exception(exc)
        st.done = True
        if error is not None:
            enc = msgspec.json.encode if json_codec else msgspec.msgpack.encode
            back.write(twopart(b"", enc(_error_item(error))))
        back.write(twopart(b"", final))
        back.write(twopart(_SENTINEL))
        back.flush()
        # The client closes after the sentinel; do not wait forever for it.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_EOF_WAIT):
                await back.eof.wait()
        if back.transport is not None:
            back.transport.close()


# -- client ---------------------------------------------------------------------------------


class _ClientStream:
    __slots__ = ("attached", "back", "codec", "items", "kill_watch", "sent_cancel", "terminal",
                 "waiter")

    def __init__(self, codec: str) -> None:
        self.codec = codec
        self.items: deque[bytes] = deque()
        self.terminal: DynamoError | bool | None = None  # True = complete_final
        self.waiter: asyncio.Future[None] | None = None
        self.attached: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.back: _Home | None = None
        self.sent_cancel = False
        self.kill_watch: asyncio.Task[None] | None = None

    def wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def finish(self, terminal: DynamoError | bool) -> None:
        if self.terminal is None:
            self.terminal = terminal
        if not self.attached.done():
            self.attached.set_result(None)
        self.wake()


class _Home(asyncio.Protocol):
    """The client's end of one call-home connection (the worker dialled us)."""

    def __init__(self, client: CallHomeClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.stream: _ClientStream | None = None
        self.phase = 0  # 0 = handshake, 1 = prologue, 2 = items, 3 = done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)

    def send(self, header: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(twopart(header))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            msgs = decode_twoparts(self.buf)
        except ValueError as exc:
            self._bad(str(exc))
            return
        for header, body in msgs:
            if self.phase == 0:
                try:
                    hs = _HANDSHAKE_DEC.decode(header)
                except msgspec.MsgspecError as exc:
                    self._bad(f"bad handshake: {exc}")
                    return
                st = self.client._pending.pop(hs.subject, None)
                if st is None:
                    self._bad(f"call-home for unknown subject {hs.subject!r}")
                    return
                self.stream = st
                st.back = self
                self.phase = 1
                continue
            st = self.stream
            assert st is not None
            if self.phase == 1:
                try:
                    pro = _PROLOGUE_DEC.decode(header)
                except msgspec.MsgspecError as exc:
                    self._bad(f"bad prologue: {exc}")
                    return
                if pro.error is not None:
                    st.finish(DynamoError(BackendError.CannotConnect,
                                          f"worker could not start the request: {pro.error}"))
                    self.phase = 3
                    self.close()
                    return
                self.phase = 2
                if not st.attached.done():
                    st.attached.set_result(None)
                continue
            if self.phase != 2:
                if header.strip() == _SENTINEL:
                    self.close()
                continue
            if not body:
                if header.strip() == _SENTINEL:
                    self.phase = 3
                    self.close()
                continue
            try:
                w = (_JSON_WRAPPER_DEC if st.codec == "json" else _MP_WRAPPER_DEC).decode(body)
            except msgspec.MsgspecError as exc:
                self._bad(f"undecodable response item: {exc}")
                return
            ann = w.data
            if ann is not None:
                if ann.event == "error" or ann.error is not None:
                    st.finish(_error_from_annotated(ann))
                elif len(ann.data) and bytes(ann.data) not in (b"null", b"\xc0"):
                    raw = bytes(ann.data)
                    if st.codec == "json":
                        raw = msgspec.msgpack.encode(msgspec.json.decode(raw))
                    st.items.append(raw)
            if w.complete_final:
                st.finish(True)
                self.phase = 3
            st.wake()

    def _bad(self, message: str) -> None:
        self.client.stats.protocol_errors += 1
        log.warning("call-home stream: %s", message)
        if self.stream is not None:
            self.stream.finish(DynamoError(BackendError.StreamIncomplete, message))
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        st = self.stream
        if st is not None and st.terminal is None:
            if st.sent_cancel:
                st.finish(DynamoError(BackendError.Cancelled, "request stopped"))
            else:
                st.finish(DynamoError(BackendError.Disconnected,
                                      "worker closed the response stream before it completed"))


class _ReqConn(asyncio.Protocol):
    def __init__(self, client: CallHomeClient, address: str) -> None:
        self.client = client
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.acks: deque[asyncio.Future[str]] = deque()
        self.buf = bytearray()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while len(buf) >= 4:
            (n,) = _U32.unpack_from(buf, 0)
            if n > MAX_FRAME:
                self.client.stats.protocol_errors += 1
                log.warning("request plane %s: bad ACK length %d", self.address, n)
                if self.transport is not None:
                    self.transport.abort()
                return
            if len(buf) < 4 + n:
                return
            text = bytes(buf[4:4 + n]).decode(errors="replace")
            del buf[:4 + n]
            if self.acks:
                fut = self.acks.popleft()
                if not fut.done():
                    fut.set_result(text)
            else:
                self.client.stats.protocol_errors += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.client._forget(self)
        while self.acks:
            fut = self.acks.popleft()
            if not fut.done():
                fut.set_exception(DynamoError(BackendError.CannotConnect,
                                              f"connection to {self.address} lost"))


class CallHomeClient:
    """Client of Dynamo's TCP request plane: same interface as
    :class:`~.client.RequestPlaneClient` (``stream`` / ``call`` / ``close``), plus the body
    ``codec`` a worker wants (``InstanceInfo.request_plane_codec``; JSON when absent)."""

    def __init__(self, *, connect_timeout: float = 5.0,
                 callback_timeout: float = DEFAULT_CALLBACK_TIMEOUT,
                 host: str | None = None) -> None:
        import os

        self.connect_timeout = connect_timeout
        self.callback_timeout = callback_timeout
        self.host = host or os.environ.get("DYN_TCP_RESPONSE_STREAM_HOST", "").strip() \
            or "127.0.0.1"
        self.stats = CallHomeStats()
        self._pending: dict[str, _ClientStream] = {}
        self._active: set[_ClientStream] = set()
        self._conns: dict[str, _ReqConn] = {}
        self._connecting: dict[str, asyncio.Task[_ReqConn]] = {}
        self._home: asyncio.Server | None = None
        self._home_addr = ""
        self._home_lock = asyncio.Lock()
        self._closed = False

    async def _home_address(self) -> str:
        if self._home is None:
            async with self._home_lock:
                if self._home is None:
                    loop = asyncio.get_running_loop()
                    self._home = await loop.create_server(lambda: _Home(self), self.host, 0,
                                                          backlog=4096)
                    h, p = self._home.sockets[0].getsockname()[:2]
                    self._home_addr = f"[{h}]:{p}" if ":" in h else f"{h}:{p}"
        return self._home_addr

    async def _connection(self, address: str) -> _ReqConn:
        conn = self._conns.get(address)
        if conn is not None and not conn.closed:
            return conn
        if self._closed:
            raise DynamoError(BackendError.CannotConnect, "request plane client is closed")
        task = self._connecting.get(address)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._connect(address))
            self._connecting[address] = task
            task.add_done_callback(functools.partial(self._connect_done, address))
        return await asyncio.shield(task)

    def _connect_done(self, address: str, task: asyncio.Task[_ReqConn]) -> None:
        if self._connecting.get(address) is task:
            del self._connecting[address]
        if not task.cancelled():
            task.exception()  # retrieved, in case every waiter gave up

    async def _connect(self, address: str) -> _ReqConn:
        host, _, port = address.rpartition(":")
        if not port.isdigit():
            raise DynamoError(BackendError.CannotConnect, f"bad request plane address {address!r}")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(lambda: _ReqConn(self, address),
                                                       host.strip("[]"), int(port))
        except TimeoutError:
            raise DynamoError(BackendError.ConnectionTimeout,
                              f"connecting to {address} timed out") from None
        except OSError as exc:
            raise DynamoError(BackendError.CannotConnect,
                              f"cannot connect to {address}: {exc}") from None
        self._conns[address] = conn
        return conn

    def _forget(self, conn: _ReqConn) -> None:
        if self._conns.get(conn.address) is conn:
            del self._conns[conn.address]

    def stream(self, address: str, endpoint: str, payload: bytes, ctx: Context | None = None,
               headers: Mapping[str, str] | None = None, *,
               codec: str = "msgpack") -> AsyncGenerator[bytes, None]:
        """Send one request (msgpack ``payload``) to ``endpoint`` (the endpoint path) at
        ``address``; iterate the response items as msgpack bytes."""
        return self._stream(address, endpoint, payload, ctx, headers, codec)

    async def _stream(self, address: str, endpoint: str, payload: bytes, ctx: Context | None,
                      headers: Mapping[str, str] | None, codec: str
                      ) -> AsyncGenerator[bytes, None]:
        if ctx is not None and ctx.is_killed():
            raise DynamoError(BackendError.Cancelled, "request killed before it was sent")
        if codec not in ("msgpack", "json"):
            raise DynamoError.invalid_argument(f"unknown payload codec {codec!r}")
        request_id = ctx.id if ctx is not None else str(uuid.uuid4())
        subject = str(uuid.uuid4())
        home = await self._home_address()
        body = payload if codec == "msgpack" else msgspec.json.encode(
            msgspec.msgpack.decode(payload))
        info = msgspec.json.encode(_ConnInfo(home, subject, request_id, "response")).decode()
        control = msgspec.json.encode({
            "id": request_id, "request_type": "single_in", "response_type": "many_out",
            "payload_codec": codec,
            "connection_info": {"transport": "tcp_server", "info": info}})
        hdrs = {"request-id": request_id, "x-endpoint-path": endpoint,
                "x-frontend-send-ts-ns": str(time.time_ns()), **(headers or {})}
        frame = encode_request_frame(endpoint, hdrs, control, body)
        conn = await self._connection(address)
        st = _ClientStream(codec)
        self._pending[subject] = st
        self._active.add(st)
        loop = asyncio.get_running_loop()
        ack: asyncio.Future[str] = loop.create_future()
        conn.acks.append(ack)
        assert conn.transport is not None
        conn.transport.write(frame)
        on_stop: Callable[[Context], None] | None = None
        try:
            try:
                async with asyncio.timeout(self.callback_timeout):
                    text = await ack
                    if text:
                        raise DynamoError(BackendError.CannotConnect,
                                          f"worker at {address} refused the request: {text}")
                    await st.attached
            except TimeoutError:
                raise DynamoError(
                    BackendError.ResponseTimeout,
                    f"worker at {address} did not open the response stream within "
                    f"{self.callback_timeout}s") from None
            if ctx is not None:
                on_stop = self._stop_callback(st, ctx)
                ctx.add_stop_callback(on_stop)
                if ctx.is_stopped():
                    on_stop(ctx)
            items = st.items
            while True:
                while items:
                    yield items.popleft()
                terminal = st.terminal
                if terminal is not None:
                    if isinstance(terminal, DynamoError):
                        raise terminal
                    return
                st.waiter = loop.create_future()
                await st.waiter
        finally:
            self._pending.pop(subject, None)
            self._active.discard(st)
            if on_stop is not None and ctx is not None:
                ctx.remove_stop_callback(on_stop)
            if st.kill_watch is not None:
                st.kill_watch.cancel()
            back = st.back
            if back is not None:
                if st.terminal is None:
                    back.send(_KILL)  # abandoned: the worker drops the request at once
                back.close()

    def _stop_callback(self, st: _ClientStream, ctx: Context) -> Callable[[Context], None]:
        def on_stop(_: Context) -> None:
            if st.terminal is not None or st.back is None:
                return
            st.sent_cancel = True
            if ctx.is_killed():
                st.back.send(_KILL)
                st.finish(DynamoError(BackendError.Cancelled, "request killed"))
                st.items.clear()
            else:
                st.back.send(_STOP)
                # A kill may still follow the stop; only this rare path pays for a watcher
                # task, which the stream owns and cancels when it ends.
                st.kill_watch = asyncio.get_running_loop().create_task(watch_kill())

        async def watch_kill() -> None:
            await ctx.killed()
            on_stop(ctx)

        return on_stop

    async def call(self, address: str, endpoint: str, payload: bytes,
                   ctx: Context | None = None, headers: Mapping[str, str] | None = None, *,
                   codec: str = "msgpack") -> bytes:
        """Unary request: the response must be exactly one item."""
        result: bytes | None = None
        gen = self._stream(address, endpoint, payload, ctx, headers, codec)
        try:
            async for item in gen:
                if result is not None:
                    raise DynamoError.unknown(f"endpoint {endpoint!r} returned more than one item")
                result = item
        finally:
            await gen.aclose()
        if result is None:
            raise DynamoError(BackendError.StreamIncomplete,
                              f"endpoint {endpoint!r} returned no item")
        return result

    async def close(self) -> None:
        self._closed = True
        for task in list(self._connecting.values()):
            task.cancel()
        for conn in list(self._conns.values()):
            if conn.transport is not None:
                conn.transport.close()
        self._conns.clear()
        for st in list(self._active):
            st.finish(DynamoError.disconnected("request plane client closed"))
            if st.back is not None and st.back.transport is not None:
                st.back.transport.abort()  # a plain drop: the worker must not see a cancel
        self._pending.clear()
        if self._home is not None:
            self._home.close()
            self._home = None

    async def __aenter__(self) -> CallHomeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

