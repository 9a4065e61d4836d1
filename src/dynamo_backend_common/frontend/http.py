"""Serving an ASGI app with uvicorn on the current event loop: :class:`HttpServer`."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import uvicorn

from ..runtime.gc_tuning import tune_for_serving

__all__ = ["HttpServer"]


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
            proxy_headers=False)
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
