"""Server-less event plane over ZMQ PUB/SUB (``zmq://[HOST]``), found through discovery.

- A plane that publishes binds one PUB socket on ``tcp://HOST:<ephemeral>`` (HOST defaults to
  127.0.0.1) at its first ``publish`` and announces the endpoint in discovery under
  ``v1/event_channels/{instance_id}`` (value: the endpoint, UTF-8). The key lives on the
  discovery lease, so a dead publisher disappears with it; ``close()`` deletes it.
- A plane that subscribes opens one SUB socket, watches ``v1/event_channels/`` and connects to
  every announced publisher (its own included), disconnecting when a key is deleted.
- Messages are two frames ``[subject, payload]``. ZMQ filters on the publisher side by a byte
  prefix of the first frame; the SUB subscribes to the literal part of each subject pattern and
  exact matching happens here.

Delivery is at most once. ZMQ's slow joiner applies: a subscription reaches a publisher a
moment after the SUB connected, and messages published before that are not delivered.
``Subscription.ready()`` waits until the SUB is connected to every publisher announced when it
was called; it cannot see the subscription arrive at the publisher (a test that needs
certainty publishes a probe until one arrives). Beyond ``hwm`` queued messages per peer, ZMQ
drops silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import zmq
import zmq.asyncio

from .base import DEFAULT_MAX_PENDING, EventPlane, Subscription, SubscriptionIndex

if TYPE_CHECKING:
    from ..discovery import Discovery

__all__ = ["EVENT_CHANNELS_PREFIX", "ZmqEventPlane"]

log = logging.getLogger(__name__)

#: Discovery prefix under which publishers announce their PUB endpoints.
EVENT_CHANNELS_PREFIX = "v1/event_channels/"

DEFAULT_HWM = 100_000
_DRAIN_BATCH = 1024

# Publishing planes per Discovery object: the second one in a process gets a suffixed key.
_announced: weakref.WeakKeyDictionary[Discovery, int] = weakref.WeakKeyDictionary()


class _ZmqSubscription(Subscription):
    def __init__(self, plane: ZmqEventPlane, subject: str, *, max_pending: int) -> None:
        super().__init__(subject, max_pending=max_pending, on_close=plane._unsubscribe)
        self._plane = plane

    async def ready(self) -> None:
        """Wait until the SUB is connected to every publisher announced right now."""
        await super().ready()
        await self._plane._wait_connected()


class ZmqEventPlane(EventPlane):
    """:class:`EventPlane` of direct PUB/SUB connections between processes; see the module doc.

    ``discovery`` must be started before :meth:`start`; the plane never closes it.
    """

    def __init__(
        self,
        discovery: Discovery,
        *,
        host: str = "127.0.0.1",
        hwm: int = DEFAULT_HWM,
        linger: float = 1.0,
    ) -> None:
        super().__init__()
        self.discovery = discovery
        self.host = host
        self._hwm = hwm
        self._linger_ms = int(linger * 1000)
        self._index = SubscriptionIndex()
        # Publisher side.
        self._pub: zmq.Socket[bytes] | None = None
        self.endpoint: str | None = None
        self._key: str | None = None
        self._announce: asyncio.Task[None] | None = None
        # Subscriber side.
        self._sub: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._peers: dict[str, str] = {}  # discovery key -> endpoint we connected to
        self._endpoint_refs: dict[str, int] = {}
        self._seen: set[str] = set()  # keys the watcher has processed (put or delete)
        self._watch_ended = False
        self._changed = asyncio.Event()  # replaced after each set: waiters see every change

    async def start(self) -> None:
        if self._closed:
            raise RuntimeError("ZmqEventPlane is closed")
        if not self.discovery.started:
            raise RuntimeError("ZmqEventPlane needs a started Discovery (call its start() first)")
        self._started = True

    # -- publisher side ---------------------------------------------------------------------
    def publish(self, subject: str, payload: bytes) -> None:
        if self._closed:
            return
        if not self._started:
            raise RuntimeError("ZmqEventPlane.publish() before start()")
        pub = self._pub if self._pub is not None else self._bind()
        try:
            pub.send_multipart((subject.encode(), payload), flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:  # PUB normally drops silently; this is a socket failure
            self.dropped += 1
            if self.dropped % 10_000 == 1:
                log.warning("ZMQ event plane dropped %d message(s): %s", self.dropped, exc)

    def _bind(self) -> zmq.Socket[bytes]:
        pub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUB)
        pub.setsockopt(zmq.SNDHWM, self._hwm)
        pub.setsockopt(zmq.LINGER, self._linger_ms)
        pub.bind(f"tcp://{self.host}:0")
        self.endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._pub = pub
        n = _announced.get(self.discovery, 0)
        _announced[self.discovery] = n + 1
        self._key = f"{EVENT_CHANNELS_PREFIX}{self.discovery.instance_id}" + (f"/{n}" if n else "")
        self._announce = asyncio.create_task(self._put_key(self._key, self.endpoint))
        return pub

    async def _put_key(self, key: str, endpoint: str) -> None:
        try:
            await self.discovery.put(key, endpoint.encode())
        except Exception as exc:  # subscribers will not find us; keep publishing regardless
            log.error("ZMQ event plane could not announce %s in discovery: %s", endpoint, exc)
        else:
            log.debug("ZMQ event plane publishing on %s (%s)", endpoint, key)

    async def flush(self) -> None:
        """Wait until the PUB endpoint is announced in discovery (messages are handed to ZMQ
        by ``publish`` itself)."""
        self._check_usable("flush")
        if self._announce is not None:
            await asyncio.shield(self._announce)

    # -- subscriber side --------------------------------------------------------------------
    def subscribe(self, subject: str, *, max_pending: int = DEFAULT_MAX_PENDING) -> Subscription:
        self._check_usable("subscribe")
        sub = _ZmqSubscription(self, subject, max_pending=max_pending)
        sock = self._sub if self._sub is not None else self._open_sub()
        sock.setsockopt(zmq.SUBSCRIBE, sub.pattern.literal_prefix.encode())
        self._index.add(sub)
        self._subs.add(sub)
        sub._set_registered()
        return sub

    async def _unsubscribe(self, sub: Subscription) -> None:
        self._index.remove(sub)
        self._subs.discard(sub)
        if self._sub is not None and not self._closed:
            # libzmq counts subscriptions per prefix: this removes only this one's.
            self._sub.setsockopt(zmq.UNSUBSCRIBE, sub.pattern.literal_prefix.encode())

    def _open_sub(self) -> zmq.asyncio.Socket:
        sock = zmq.asyncio.Context.instance().socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, self._hwm)
        sock.setsockopt(zmq.LINGER, 0)
        self._sub = sock
        self._tasks.append(asyncio.create_task(self._watch(sock), name="zmq-event-plane-watch"))
        self._tasks.append(asyncio.create_task(self._receive(sock), name="zmq-event-plane-recv"))
        return sock

    async def _watch(self, sock: zmq.asyncio.Socket) -> None:
        watch = self.discovery.watch_prefix(EVENT_CHANNELS_PREFIX)
        try:
            async with contextlib.aclosing(watch):
                async for ev in watch:
                    if ev.kind == "put" and ev.value is not None:
                        self._connect(sock, ev.key, ev.value.decode(errors="replace"))
                    else:
                        self._disconnect(sock, ev.key)
                    self._seen.add(ev.key)
                    self._notify()
        except Exception as exc:
            if not self._closed:
                log.error("ZMQ event plane: discovery watch failed: %s", exc)
        finally:
            if not self._closed:
                log.warning("ZMQ event plane: the discovery watch ended; no new publishers")
            self._watch_ended = True
            self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds after some discovery change (or already does).
        Raises :class:`RuntimeError` if the plane closes or the watch ends first."""
        while not predicate():
            if self._closed or self._watch_ended:
                raise RuntimeError("ZmqEventPlane: closed, or its discovery watch ended")
            await self._changed.wait()

    def _connect(self, sock: zmq.asyncio.Socket, key: str, endpoint: str) -> None:
        if self._peers.get(key) == endpoint:
            return
        self._disconnect(sock, key)
        refs = self._endpoint_refs.get(endpoint, 0)
        if refs == 0:  # a second connect to the same endpoint would duplicate every message
            try:
                sock.connect(endpoint)
            except zmq.ZMQError as exc:
                log.warning("ZMQ event plane: cannot connect to %s (%s): %s", endpoint, key, exc)
                return
        self._endpoint_refs[endpoint] = refs + 1
        self._peers[key] = endpoint

    def _disconnect(self, sock: zmq.asyncio.Socket, key: str) -> None:
        endpoint = self._peers.pop(key, None)
        if endpoint is None:
            return
        refs = self._endpoint_refs.pop(endpoint, 1) - 1
        if refs > 0:
            self._endpoint_refs[endpoint] = refs
            return
        with contextlib.suppress(zmq.ZMQError):  # already gone
            sock.disconnect(endpoint)

    async def _wait_connected(self) -> None:
        keys = set(await self.discovery.get_prefix(EVENT_CHANNELS_PREFIX))
        await self._wait_for(lambda: keys <= self._seen)

    async def _receive(self, sock: zmq.asyncio.Socket) -> None:
        deliver = self._index.deliver
        # Wait asynchronously, then drain what is queued with plain non-blocking reads: one
        # future per message would cost several times the rest of the work.
        drain: zmq.Socket[bytes] = zmq.Socket.shadow(sock.underlying)
        while True:
            await sock.poll()  # POLLIN
            for _ in range(_DRAIN_BATCH):  # then yield, so one busy peer cannot starve the loop
                try:
                    frames = drain.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if len(frames) != 2:
                    log.warning("ZMQ event plane: ignoring a message of %d frames", len(frames))
                    continue
                try:
                    subject = frames[0].decode()
                except UnicodeDecodeError:
                    continue
                deliver(subject, frames[1])
            await asyncio.sleep(0)

    # -- shutdown ---------------------------------------------------------------------------
    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._end_subscriptions()
        self._notify()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._sub is not None:
            self._sub.close(linger=0)
            self._sub = None
        if self._announce is not None:
            with contextlib.suppress(Exception):
                await self._announce
        if self._key is not None and not self.discovery.closed:
            with contextlib.suppress(Exception):
                await self.discovery.delete(self._key)
        if self._pub is not None:
            # Returns at once; ZMQ's I/O thread keeps sending what is queued for ``linger``.
            self._pub.close()
            self._pub = None

    def __repr__(self) -> str:
        return f"ZmqEventPlane(host={self.host!r}, endpoint={self.endpoint!r})"
