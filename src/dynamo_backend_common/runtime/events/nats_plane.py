"""NATS core pub/sub event plane (``nats://HOST:PORT[,nats://HOST:PORT...]``).

One reconnecting nats-py client per plane. ``publish`` appends to an in-process queue that a
single writer task drains into the client, because nats-py's ``publish`` is a coroutine and
``EventPlane.publish`` must not block; subscribe registrations travel through the same queue,
so a subscription made before a publish on the same plane is registered on the connection
first (and the server handles one connection's commands in order).

While the client is reconnecting, nats-py buffers outgoing messages (``pending_size`` bytes);
beyond that, publishes are dropped and counted in ``dropped``. After a reconnect nats-py
re-sends the subscriptions by itself. ``Subscription.ready()`` completes after a server round
trip (PING/PONG) that follows the SUB, so the server knows the subscription by then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from ...errors import BackendError, DynamoError
from .base import DEFAULT_MAX_PENDING, EventPlane, Message, Subscription

__all__ = ["NatsEventPlane"]

log = logging.getLogger(__name__)

#: Messages queued for the writer before ``publish`` drops new ones.
DEFAULT_MAX_QUEUED = 1 << 20

_Op = tuple[str, bytes] | Subscription | asyncio.Future[None]


class _NatsSubscription(Subscription):
    def __init__(self, plane: NatsEventPlane, subject: str, *, max_pending: int) -> None:
        super().__init__(subject, max_pending=max_pending, on_close=plane._unsubscribe)
        self._plane = plane

    async def ready(self) -> None:
        """Wait until the SUB was sent and the server answered a PING sent after it."""
        await super().ready()
        nc = self._plane._nc
        if nc is None:
            raise RuntimeError(f"subscription {self.subject!r}: the plane is closed")
        await nc.flush(timeout=max(1, round(self._plane._flush_timeout)))


class NatsEventPlane(EventPlane):
    """:class:`EventPlane` over NATS core (no JetStream): at-most-once, ordered per publisher.

    ``servers`` are ``nats://`` (or ``tls://``) URLs. ``start()`` fails with a
    ``DynamoError(CannotConnect)`` if no server accepts a connection within
    ``connect_timeout`` seconds; once connected, the client reconnects forever. ``close()``
    spends at most about ``2 * close_timeout`` handing queued messages to the server (a
    shutdown must not hang on an unreachable server); what is left then is lost.
    """

    def __init__(
        self,
        servers: list[str],
        *,
        name: str | None = None,
        connect_timeout: float = 10.0,
        max_queued: int = DEFAULT_MAX_QUEUED,
        flush_timeout: float = 10.0,
        close_timeout: float = 2.0,
    ) -> None:
        super().__init__()
        if not servers:
            raise ValueError("NatsEventPlane needs at least one server URL")
        self.servers = list(servers)
        self._name = name
        self._connect_timeout = connect_timeout
        self._flush_timeout = flush_timeout
        self._close_timeout = close_timeout
        self._max_queued = max_queued
        self._nc: Client | None = None
        self._ops: deque[_Op] = deque()
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._nats_subs: dict[Subscription, Any] = {}

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        if self._closed:
            raise RuntimeError("NatsEventPlane is closed")
        if self._started:
            return
        nc = Client()
        try:
            # nats-py retries the initial connect forever when reconnects are unlimited:
            # bound it here so a wrong URL fails startup instead of hanging it.
            await asyncio.wait_for(
                nc.connect(
                    servers=self.servers,
                    name=self._name,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=1,
                    connect_timeout=2,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                ),
                self._connect_timeout,
            )
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            raise DynamoError(
                BackendError.CannotConnect,
                f"cannot connect to NATS at {','.join(self.servers)} "
                f"within {self._connect_timeout:g}s",
                exc,
            ) from exc
        self._nc = nc
        self._writer = asyncio.create_task(self._write_loop(nc), name="nats-event-plane-writer")
        self._started = True

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._end_subscriptions()
        nc, self._nc = self._nc, None
        writer, self._writer = self._writer, None
        if writer is not None and nc is not None:
            # Let already published messages reach the client before closing it.
            done = asyncio.get_running_loop().create_future()
            self._enqueue(done)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(done), self._close_timeout)
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        self._ops.clear()
        if nc is not None:
            if nc.is_connected:  # while reconnecting, a flush could only time out
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(nc.flush(), self._close_timeout)
            with contextlib.suppress(Exception):
                await nc.close()

    # -- pub/sub ----------------------------------------------------------------------------
    def publish(self, subject: str, payload: bytes) -> None:
        if self._closed:
            return
        if not self._started:
            raise RuntimeError("NatsEventPlane.publish() before start()")
        if len(self._ops) >= self._max_queued:
            self._count_drop("the publish queue is full")
            return
        self._enqueue((subject, payload))

    def subscribe(self, subject: str, *, max_pending: int = DEFAULT_MAX_PENDING) -> Subscription:
        self._check_usable("subscribe")
        sub = _NatsSubscription(self, subject, max_pending=max_pending)
        self._subs.add(sub)
        self._enqueue(sub)
        return sub

    async def _unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)
        nsub = self._nats_subs.pop(sub, None)
        if nsub is not None and not self._closed:
            with contextlib.suppress(Exception):
                await nsub.unsubscribe()

    async def flush(self) -> None:
        """Wait until the writer handed every earlier message to the client, then until the
        server acknowledged them (PING/PONG). Raises ``TimeoutError`` after ``flush_timeout``.
        """
        self._check_usable("flush")
        done = asyncio.get_running_loop().create_future()
        self._enqueue(done)
        await asyncio.wait_for(asyncio.shield(done), self._flush_timeout)
        assert self._nc is not None
        await self._nc.flush(timeout=max(1, round(self._flush_timeout)))

    # -- internals --------------------------------------------------------------------------
    def _enqueue(self, op: _Op) -> None:
        self._ops.append(op)
        self._wakeup.set()

    def _count_drop(self, why: str) -> None:
        self.dropped += 1
        # Log the first drop and then every 10000th, not every message of a burst.
        if self.dropped % 10_000 == 1:
            log.warning("NATS event plane dropped %d message(s): %s", self.dropped, why)

    async def _write_loop(self, nc: Client) -> None:
        ops = self._ops
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while ops:
                op = ops.popleft()
                if isinstance(op, tuple):
                    try:
                        # Usually only appends to nats-py's buffer (no suspension).
                        await nc.publish(op[0], op[1])
                    except (nats.errors.Error, OSError, ValueError) as exc:
                        self._count_drop(f"{type(exc).__name__}: {exc}")
                elif isinstance(op, Subscription):
                    await self._register(nc, op)
                elif not op.done():
                    op.set_result(None)

    async def _register(self, nc: Client, sub: Subscription) -> None:
        if sub.closed:
            return

        async def on_msg(msg: Msg) -> None:
            sub._deliver(Message(msg.subject, msg.data))

        try:
            nsub = await nc.subscribe(sub.subject, cb=on_msg)
        except Exception as exc:  # reported through sub.ready(); the writer must go on
            sub._set_registered(exc)
            return
        self._nats_subs[sub] = nsub
        sub._set_registered()

    async def _on_error(self, exc: Exception) -> None:
        log.warning("NATS event plane: %s: %s", type(exc).__name__, exc)

    async def _on_disconnected(self) -> None:
        if not self._closed:
            log.warning("NATS event plane disconnected; reconnecting")

    async def _on_reconnected(self) -> None:
        log.info("NATS event plane reconnected")

    def __repr__(self) -> str:
        return f"NatsEventPlane({','.join(self.servers)!r})"
