"""Serving an ASGI app with uvicorn on the current event loop: :class:`HttpServer`."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from typing import Any

import uvicorn

from ..runtime.gc_tuning import tune_for_serving

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # no httptools: uvicorn picks its h11 protocol, as it is
    HttpToolsProtocol = None  # type: ignore[assignment, misc]

__all__ = ["HttpServer"]


class _LeanEvent:
    """What uvicorn uses of :class:`asyncio.Event` (``set``, ``clear``, ``is_set``, ``wait``,
    the same semantics) in ~50 bytes: an ``asyncio.Event`` is ~800, most of it the first block
    of its deque of waiters, allocated even when nothing ever waits. uvicorn keeps one per
    connection (flow control) and one per request (the request body's arrival): ~1.5 MB at
    1000 concurrent streams."""

    __slots__ = ("_value", "_waiters")

    def __init__(self, value: bool = False) -> None:
        self._value = value
        self._waiters: list[asyncio.Future[bool]] | None = None

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        if not self._value:
            self._value = True
            waiters, self._waiters = self._waiters, None
            for fut in waiters or ():
                if not fut.done():
                    fut.set_result(True)

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> bool:
        if self._value:
            return True
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(fut)
        try:
            return await fut
        finally:
            waiters = self._waiters
            if waiters is not None and fut in waiters:  # not woken by set(): cancelled
                waiters.remove(fut)


class _Pipeline(list[Any]):
    """uvicorn's queue of pipelined requests (``appendleft``, ``pop``, truthiness) as a list:
    an empty deque is ~630 bytes, per connection, and pipelining is rare."""

    __slots__ = ()

    def appendleft(self, item: Any) -> None:
        self.insert(0, item)


def _lean(event: Any) -> Any:
    """``event`` as a :class:`_LeanEvent` in the same state, if it is a plain, unwaited-for
    ``asyncio.Event`` (anything else is returned as it is)."""
    if type(event) is asyncio.Event:
        return _LeanEvent(event.is_set())
    return event


#: uvicorn's ``http`` setting: the lean httptools protocol when httptools is there.
_HTTP_PROTOCOL: Any = "auto"

if HttpToolsProtocol is not None:
    class _LeanHttpToolsProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol, unchanged on the wire and in behaviour, with its
        per-connection and per-request bookkeeping made smaller (:class:`_LeanEvent`,
        :class:`_Pipeline`): ~2 KB less per concurrent stream. Where uvicorn's internals are
        not the ones expected, each replacement is skipped (the protocol is then uvicorn's
        own)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if type(getattr(self, "pipeline", None)) is deque and not self.pipeline:
                self.pipeline = _Pipeline()  # type: ignore[assignment]

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            flow = getattr(self, "flow", None)
            if flow is not None and hasattr(flow, "_is_writable_event"):
                # Nothing waits on it yet: flow control starts writable.
                flow._is_writable_event = _lean(flow._is_writable_event)

        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            # Before the request's task exists, so nothing waits on the event yet (a
            # pipelined request may have received its body already: the state is kept).
            if hasattr(cycle, "message_event"):
                cycle.message_event = _lean(cycle.message_event)
            super()._start_asgi_task(cycle, app)

    _HTTP_PROTOCOL = _LeanHttpToolsProtocol


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: the owner of the process decides on shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


class HttpServer:
    """Serves an ASGI app with uvicorn on the current event loop.

    The listening socket is bound in :meth:`start`, so :attr:`port` is the real port (also
    with port 0) and clients may connect as soon as ``start`` returns. :meth:`stop` stops
    accepting, lets in-flight responses finish for up to ``graceful_s`` seconds, then cancels
    them. No signal handlers are installed.

    ``reuse_port`` (Linux): the socket is bound with ``SO_REUSEPORT``, so several processes
    (of the same user) can listen on one address and the kernel spreads new connections over
    them (by a hash of the connection's addresses); a listener that closes or dies leaves the
    group and gets no new connections. Every socket of the group must set it, the first one
    too. It does not check that the address is free of other such groups: see
    :func:`.replicas.ensure_port_free`.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 8000, *,
                 graceful_s: float = 5.0, log_level: str = "warning",
                 reuse_port: bool = False) -> None:
        self.host = host
        self.reuse_port = reuse_port
        self._requested_port = port
        self.port = port
        self._config = uvicorn.Config(
            app, host=host, port=port, lifespan="off", log_level=log_level, access_log=False,
            interface="asgi3",
            timeout_graceful_shutdown=int(max(1, graceful_s)), server_header=False,
            ws="none", log_config=None,
            # Nothing reads the client address, so no X-Forwarded-For rewriting middleware
            # on every request.
            proxy_headers=False, http=_HTTP_PROTOCOL)
        self._server = _Uvicorn(self._config)
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def bind(self) -> None:
        """Bind and listen now (idempotent); :attr:`port` is then final. Connections made
        before :meth:`start` wait in the backlog."""
        if self._sock is None:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            self._sock = socket.create_server((self.host, self._requested_port),
                                              family=family, backlog=2048,
                                              reuse_port=self.reuse_port)
            self.port = int(self._sock.getsockname()[1])

    async def start(self) -> None:
        """Bind (unless :meth:`bind` was called) and start serving. Raises ``OSError`` when
        the address cannot be bound."""
        self.bind()
        assert self._sock is not None
        tune_for_serving()  # a serving process: fewer cyclic-GC passes (see gc_tuning)
        self._task = asyncio.get_running_loop().create_task(
            self._server.serve(sockets=[self._sock]), name="uvicorn")

    async def wait(self) -> None:
        """Until the server stops (or fails)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def stop(self) -> None:
        self._server.should_exit = True
        try:
            if self._task is not None:
                await self._task
        finally:
            self._task = None
            if self._sock is not None:
                self._sock.close()
                self._sock = None
