"""The worker's system status server: ``/metrics``, ``/health``, ``/live`` and extra routes.

A deliberately small HTTP/1.1 server on :func:`asyncio.start_server`. It runs on the caller's event
loop and owns nothing else: no threads, no signal handlers (unlike uvicorn), so the worker keeps
sole ownership of SIGTERM/SIGINT.

Protocol subset, each part implemented strictly:

- Request line ``METHOD SP target SP HTTP/1.x``; origin-form (``/path?query``, the query is
  ignored for routing) or absolute-form targets. Malformed -> 400; another HTTP version -> 505.
- Header block up to ``max_header_bytes`` (431 beyond). Header names must be tokens (so obs-fold
  and whitespace before the colon are 400); conflicting ``Content-Length`` values are 400.
- Bodies only by ``Content-Length`` up to ``max_body_bytes`` (413 beyond). ``Transfer-Encoding``
  is not implemented -> 501. ``Expect: 100-continue`` is answered, so curl does not stall.
- Persistent connections: HTTP/1.1 keeps alive unless ``Connection: close``; HTTP/1.0 only with
  ``Connection: keep-alive``. Pipelined requests are answered in order. A connection idle, or
  slow to send a request, for ``read_timeout`` seconds is closed.
- ``HEAD`` is served for every ``GET`` route (same headers, no body). An unknown path is 404; a
  known path with another method is 405 with ``Allow``. A raising handler is 500.
- After an error response that leaves the request body unread the server half-closes and discards
  what the client still sends (bounded), so the client reads the response instead of a reset.

Built-in routes:

- ``GET /metrics``: 200 ``text/plain; version=0.0.4`` with ``metrics()`` (only if given).
- ``GET /live``: 200 ``{"status":"live"}`` while the server runs.
- ``GET /health``: ``health()`` -> ``(True, details)`` gives 200 ``{"status":"ready",...details}``,
  ``(False, details)`` 503 ``{"status":"notready",...details}``. No callback, or a callback that
  raises, is 503 ``notready``.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from .tasks import cancel_and_wait

log = logging.getLogger(__name__)

__all__ = ["METRICS_CONTENT_TYPE", "HealthCallback", "RouteHandler", "StatusServer"]

#: Handler of an extra route: request body -> (status code, content type, response body).
RouteHandler = Callable[[bytes], Awaitable[tuple[int, str, bytes]]]
#: Readiness callback: (ready, details merged into the JSON body).
HealthCallback = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
JSON_CONTENT_TYPE = "application/json"

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HTTP_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 64 << 20


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode()


class _Reject(Exception):
    """An error response that ends the connection (the stream position is no longer known)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class StatusServer:
    """HTTP/1.1 status server; see the module docstring for the protocol and routes.

    Args:
        host, port: where to listen; ``port=0`` picks a free port (read :attr:`port`).
        metrics: renders the ``/metrics`` body; called on the event loop, so keep it quick.
        health: readiness callback for ``/health``.
        max_header_bytes: limit on the request line plus headers.
        max_body_bytes: limit on a request body.
        read_timeout: seconds allowed for a request to arrive (also the keep-alive idle time).

    Routes may be added before or after :meth:`start`. :meth:`close` stops listening and ends
    every open connection, cancelling requests still being handled.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        metrics: Callable[[], bytes] | None = None,
        health: HealthCallback | None = None,
        max_header_bytes: int = 16 * 1024,
        max_body_bytes: int = 1 << 20,
        read_timeout: float = 30.0,
    ) -> None:
        self._host = host
        self._port = port
        self._metrics = metrics
        self._health = health
        self._max_header = max_header_bytes
        self._max_body = max_body_bytes
        self._read_timeout = read_timeout
        self._routes: dict[str, dict[str, RouteHandler]] = {}
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[Any]] = set()
        self._closing = False
        if metrics is not None:
            self.add_route("GET", "/metrics", self._get_metrics)
        self.add_route("GET", "/live", self._get_live)
        self.add_route("GET", "/health", self._get_health)

    # -- public API ---------------------------------------------------------------------------
    def add_route(self, method: str, path: str, handler: RouteHandler) -> None:
        """Serve ``method path`` (exact path match, query ignored) with ``handler``.

        Raises ``ValueError`` for a path not starting with ``/``, a method that is not an HTTP
        token or ``HEAD`` (implied by ``GET``), or a route that is already registered.
        """
        m = method.upper()
        if not path.startswith("/"):
            raise ValueError(f"route path must start with '/': {path!r}")
        if not _TOKEN.fullmatch(m.encode()) or m == "HEAD":
            raise ValueError(f"invalid route method {method!r}")
        methods = self._routes.setdefault(path, {})
        if m in methods:
            raise ValueError(f"route {m} {path} is already registered")
        methods[m] = handler

    async def start(self) -> None:
        """Bind and start accepting connections. Raises ``OSError`` if the address is taken."""
        if self._server is not None:
            raise RuntimeError("StatusServer already started")
        # The stream limit bounds the header block: readuntil fails past it.
        self._server = await asyncio.start_server(
            self._on_connect, self._host, self._port, limit=self._max_header
        )

    @property
    def port(self) -> int:
        """The bound port (the real one when constructed with ``port=0``)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("StatusServer is not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening and close all connections. Idempotent; a no-op before start()."""
        self._closing = True
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        await cancel_and_wait(list(self._conns))
        await server.wait_closed()

    # -- built-in routes ----------------------------------------------------------------------
    async def _get_metrics(self, _body: bytes) -> tuple[int, str, bytes]:
        assert self._metrics is not None
        return 200, METRICS_CONTENT_TYPE, self._metrics()

    async def _get_live(self, _body: bytes) -> tuple[int, str, bytes]:
        return 200, JSON_CONTENT_TYPE, _json({"status": "live"})

    async def _get_health(self, _body: bytes) -> tuple[int, str, bytes]:
        ready = False
        details: dict[str, Any] = {}
        if self._health is not None:
            try:
                ready, details = await self._health()
            except Exception as exc:
                log.exception("health callback failed; reporting notready")
                details = {"error": repr(exc)}
        status = "ready" if ready else "notready"
        body = {"status": status, **{k: v for k, v in details.items() if k != "status"}}
        return (200 if ready else 503), JSON_CONTENT_TYPE, _json(body)

    # -- connection handling ------------------------------------------------------------------
    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._closing:
            writer.close()
            return
        # Registered until the very end (socket closed included), so close() awaits all of it.
        self._conns.add(task)
        try:
            await self._connection(reader, writer)
        except asyncio.CancelledError:
            # Only close() (or loop teardown) cancels a connection task, and nothing awaits its
            # result except asyncio's stream callback, which would log a cancelled task as an
            # error. Ending normally is the clean outcome for this leaf task.
            pass
        finally:
            self._conns.discard(task)

    async def _connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            try:
                await self._serve(reader, writer)
            except _Reject as rej:
                await self._respond(
                    writer, rej.status, JSON_CONTENT_TYPE,
                    _json({"status": "error", "message": rej.message}), close=True,
                )
                await self._linger(reader, writer)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the client went away or stalled: nothing left to answer
        except Exception:
            log.exception("status server connection failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                async with asyncio.timeout(self._read_timeout):
                    head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return  # EOF between requests (or mid-header: nothing answerable)
            except asyncio.LimitOverrunError:
                raise _Reject(431, "request header too large") from None
            # RFC 9112 2.2: ignore empty lines received before the request line.
            head = head.lstrip(b"\r\n")
            if not head:
                continue
            method, target, version, headers = self._parse_head(head)

            if version == b"HTTP/1.1":
                keep_alive = b"close" not in _tokens(headers.get(b"connection", b""))
            else:
                keep_alive = b"keep-alive" in _tokens(headers.get(b"connection", b""))

            if b"transfer-encoding" in headers:
                raise _Reject(501, "transfer-encoding is not supported; send Content-Length")
            length = 0
            raw_len = headers.get(b"content-length")
            if raw_len is not None:
                if not raw_len.isdigit() or len(raw_len) > 18:
                    raise _Reject(400, "invalid Content-Length")
                length = int(raw_len)
            if length > self._max_body:
                raise _Reject(413, f"request body exceeds {self._max_body} bytes")
            expect = headers.get(b"expect")
            if expect is not None:
                if expect.lower() != b"100-continue":
                    raise _Reject(417, "unsupported Expect")
                if length and version == b"HTTP/1.1":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = b""
            if length:
                async with asyncio.timeout(self._read_timeout):
                    body = await reader.readexactly(length)

            status, ctype, payload, extra = await self._handle(method, target, body)
            if method == b"HEAD":
                await self._respond(writer, status, ctype, b"", keep_alive=keep_alive,
                                    version=version, length=len(payload), extra=extra)
            else:
                await self._respond(writer, status, ctype, payload, keep_alive=keep_alive,
                                    version=version, extra=extra)
            if not keep_alive:
                return

    @staticmethod
    def _parse_head(head: bytes) -> tuple[bytes, bytes, bytes, dict[bytes, bytes]]:
        lines = head[:-4].split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1]:
            raise _Reject(400, "malformed request line")
        method, target, version = parts
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            if _HTTP_VERSION.fullmatch(version):
                raise _Reject(505, "only HTTP/1.0 and HTTP/1.1 are supported")
            raise _Reject(400, "malformed request line")
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not _TOKEN.fullmatch(name):
                raise _Reject(400, "malformed header line")
            name = name.lower()
            value = value.strip(b" \t")
            prev = headers.get(name)
            if prev is None:
                headers[name] = value
            elif name == b"content-length":
                if prev != value:
                    raise _Reject(400, "conflicting Content-Length headers")
            else:
                headers[name] = prev + b", " + value  # RFC 9110 5.3: combine as a list
        return method, target, version, headers

    async def _handle(
        self, method: bytes, target: bytes, body: bytes
    ) -> tuple[int, str, bytes, list[tuple[str, str]]]:
        """Route one request: (status, content type, body, extra headers)."""
        try:
            raw = target.decode("ascii")
        except UnicodeDecodeError:
            raise _Reject(400, "request target is not ASCII") from None
        if raw.startswith("/"):
            path = raw.split("?", 1)[0]
        elif raw.startswith(("http://", "https://")):
            path = urlsplit(raw).path or "/"
        else:
            raise _Reject(400, "unsupported request target")
        m = method.decode("ascii")
        methods = self._routes.get(path)
        if methods is None:
            return 404, JSON_CONTENT_TYPE, _json(
                {"status": "error", "message": f"no route for {path}"}), []
        handler = methods.get("GET" if m == "HEAD" else m)
        if handler is None:
            allow = sorted({*methods, *(["HEAD"] if "GET" in methods else [])})
            return 405, JSON_CONTENT_TYPE, _json(
                {"status": "error", "message": f"method {m} not allowed for {path}"}
            ), [("Allow", ", ".join(allow))]
        try:
            status, ctype, payload = await handler(body)
        except Exception:
            log.exception("status route %s %s failed", m, path)
            return 500, JSON_CONTENT_TYPE, _json(
                {"status": "error", "message": "internal error"}), []
        return status, ctype, payload, []

    @staticmethod
    async def _respond(
        writer: asyncio.StreamWriter,
        status: int,
        ctype: str,
        body: bytes,
        *,
        keep_alive: bool = False,
        close: bool = False,
        version: bytes = b"HTTP/1.1",
        length: int | None = None,
        extra: list[tuple[str, str]] | None = None,
    ) -> None:
        try:
            reason = http.HTTPStatus(status).phrase
        except ValueError:
            reason = ""
        lines = [
            f"HTTP/1.1 {status} {reason}",
            f"Content-Type: {ctype}",
            f"Content-Length: {len(body) if length is None else length}",
        ]
        if close or not keep_alive:
            lines.append("Connection: close")
        elif version == b"HTTP/1.0":
            lines.append("Connection: keep-alive")
        lines.extend(f"{k}: {v}" for k, v in extra or ())
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()

    @staticmethod
    async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close, then discard what the client still sends, until EOF or a bound.

        Closing a socket with unread input makes the kernel send RST, which can destroy the
        error response before the client reads it (RFC 9112 9.6, "lingering close").
        """
        if writer.can_write_eof():
            writer.write_eof()
        seen = 0
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(_LINGER_SECONDS):
                while seen < _LINGER_BYTES:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    seen += len(chunk)


def _tokens(value: bytes) -> set[bytes]:
    return {t.strip().lower() for t in value.split(b",")}
