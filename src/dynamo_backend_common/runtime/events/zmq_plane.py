"""Server-less event plane over ZMQ PUB/SUB (``zmq://[HOST]``) in NVIDIA Dynamo 1.6.1's form.

A Dynamo frontend's KV router follows our publishers, and our subscribers follow Dynamo's, with
the same code: the wire is Dynamo's (see :mod:`.dynamo_wire`).

Subjects map to Dynamo's (scope, topic): ``namespace.{ns}.component.{comp}.{topic}`` is topic
``topic`` in the endpoint scope ``(ns, comp, endpoint)``, where ``endpoint`` is the plane's
``endpoint`` (the worker's, ``generate`` by default). A subject of another shape cannot be
published here (:class:`ValueError`); a subscription pattern may be anything and is matched
against the subjects of the announced channels (so ``namespace.x.component.y.kv-events`` sees
that topic of every endpoint of ``x/y``).

- **Publishing.** ``prepare_publish`` (a worker calls it at startup, so routers connect before
  its first event, as Dynamo's workers announce their channels at startup) or else the first
  ``publish`` on a subject binds a PUB socket for it on
  ``tcp://HOST:<ephemeral>``, with a random publisher id (< 2**53) and a sequence starting at 0
  (+1 per message), and announces it under the discovery lease: an ``EventChannel`` record and,
  for ``kv-events``, first an ``EventSource`` record attributing it to worker
  ``discovery.instance_id`` (dp rank 0), without a recovery target. ``close()`` deletes them.
  HOST is the URL's, else ``$DYN_EVENT_PLANE_HOST``, else 127.0.0.1; a wildcard bind address
  (``0.0.0.0``) is advertised as ``$DYN_EVENT_PLANE_HOST`` (else this host's address).
- **Subscribing.** One SUB socket per plane watches ``v1/event_channels/``; every ZMQ channel
  whose subject matches a subscription is connected and its topic SUBSCRIBEd (exact topic
  bytes); a deleted record disconnects it. Each message is checked (4 frames, version byte,
  length, envelope agreeing with the frames), attributed by its publisher id to its channel and
  delivered as ``Message(subject, envelope.payload)``. Malformed messages are dropped, counted
  in ``malformed`` and logged (rate-limited); messages of publishers not (or no longer) known
  are dropped and counted in ``unknown_publisher``. A sequence number that is not the last
  one + 1 counts in ``sequence_gaps`` (messages were lost, e.g. beyond the high-water mark); the
  payloads carry their own ids (KV events' ``event_id``), which is what the KV router resyncs
  on.

Delivery is at most once. ZMQ's slow joiner applies: a subscription reaches a publisher a
moment after the SUB connected, and messages published before that are not delivered.
``Subscription.ready()`` waits until the SUB is connected to every matching channel announced
when it was called; it cannot see the subscription arrive at the publisher (a test that needs
certainty publishes a probe until one arrives). Beyond ``hwm`` queued messages per peer, ZMQ
drops silently (seen as sequence gaps).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import zmq
import zmq.asyncio

from ...errors import ProtocolError
from ..tasks import cancel_and_wait
from .base import DEFAULT_MAX_PENDING, EventPlane, Subscription, SubscriptionIndex
from .dynamo_wire import (
    EVENT_CHANNELS_PREFIX,
    EndpointRef,
    EventChannel,
    EventScope,
    EventSource,
    EventSourceMetadata,
    EventTransport,
    WorkerRef,
    channel_key,
    decode_channel,
    decode_frames,
    encode_frames,
    encode_record,
    random_publisher_id,
    source_key,
)
from .subjects import KV_EVENTS_TOPIC, component_subject, parse_component_subject

if TYPE_CHECKING:
    from ..discovery import Discovery

__all__ = ["DEFAULT_ENDPOINT", "EVENT_CHANNELS_PREFIX", "ZmqEventPlane"]

log = logging.getLogger(__name__)

DEFAULT_HWM = 100_000
#: The endpoint of the scope our channels announce when none is given (Dynamo's worker default).
DEFAULT_ENDPOINT = "generate"
_DRAIN_BATCH = 1024
_WILDCARD_HOSTS = ("0.0.0.0", "::", "*", "")
#: At most one log line per this many seconds per kind of trouble.
_LOG_EVERY = 10.0


class _RateLimitedLog:
    """Logs the first occurrence, then at most one line per :data:`_LOG_EVERY` seconds with
    the number suppressed in between."""

    def __init__(self) -> None:
        self._next = 0.0
        self._suppressed = 0

    def __call__(self, level: int, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        if self._suppressed:
            msg += " (%d similar message(s) suppressed)"
            args = (*args, self._suppressed)
        self._suppressed = 0
        self._next = now + _LOG_EVERY
        log.log(level, msg, *args)


@dataclass(slots=True, eq=False)
class _Publisher:
    """One PUB socket of this plane: one subject."""

    subject: str
    topic: str
    publisher_id: int
    sock: zmq.Socket[bytes]
    address: str
    keys: list[str]
    announce: asyncio.Task[None] | None = None
    sequence: int = 0


@dataclass(slots=True, eq=False)
class _Remote:
    """One announced channel (ours or anyone's) this plane knows of."""

    key: str
    subject: str
    topic: str
    publisher_id: int
    address: str
    connected: bool = False

    def same_channel(self, other: _Remote) -> bool:
        return (self.subject, self.topic, self.publisher_id, self.address) == (
            other.subject, other.topic, other.publisher_id, other.address)


class _ZmqSubscription(Subscription):
    def __init__(self, plane: ZmqEventPlane, subject: str, *, max_pending: int) -> None:
        super().__init__(subject, max_pending=max_pending, on_close=plane._unsubscribe)
        self._plane = plane

    async def ready(self) -> None:
        """Wait until the SUB is connected to every matching channel announced right now."""
        await super().ready()
        await self._plane._wait_connected()


def _advertised(bind_host: str) -> str:
    if bind_host.strip("[]") not in _WILDCARD_HOSTS:
        return bind_host
    env = os.environ.get("DYN_EVENT_PLANE_HOST", "").strip()
    if env and env not in _WILDCARD_HOSTS:
        return env
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class ZmqEventPlane(EventPlane):
    """:class:`EventPlane` of direct PUB/SUB connections in Dynamo's form; see the module doc.

    ``discovery`` must be started before :meth:`start`; the plane never closes it. ``host`` is
    the bind address (default ``$DYN_EVENT_PLANE_HOST``, else 127.0.0.1), ``advertise_host`` the
    address written in the records (default: ``host``, or for a wildcard ``host``
    ``$DYN_EVENT_PLANE_HOST``). ``endpoint`` is the endpoint of the scope our channels announce.

    Counters (subscriber side): ``received`` (messages delivered), ``malformed``,
    ``unknown_publisher``, ``sequence_gaps``, ``bad_records`` (channel records that do not
    parse); publisher side: ``dropped`` (messages the socket refused).
    """

    def __init__(
        self,
        discovery: Discovery,
        *,
        host: str | None = None,
        advertise_host: str | None = None,
        endpoint: str = DEFAULT_ENDPOINT,
        hwm: int = DEFAULT_HWM,
        linger: float = 1.0,
    ) -> None:
        super().__init__()
        if not endpoint or "/" in endpoint:
            raise ValueError(f"ZmqEventPlane: bad endpoint name {endpoint!r}")
        self.discovery = discovery
        env_host = os.environ.get("DYN_EVENT_PLANE_HOST", "").strip()
        self.host = host or env_host or "127.0.0.1"
        self.advertise_host = advertise_host or _advertised(self.host)
        self.endpoint = endpoint
        self._hwm = hwm
        self._linger_ms = int(linger * 1000)
        self._index = SubscriptionIndex()
        # Publisher side.
        self._pubs: dict[str, _Publisher] = {}
        # Subscriber side.
        self._sub: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._remotes: dict[str, _Remote] = {}  # discovery key -> channel
        self._by_publisher: dict[int, _Remote] = {}  # connected channels by publisher id
        self._address_refs: dict[str, int] = {}
        self._topic_refs: dict[bytes, int] = {}
        self._last_seq: dict[int, int] = {}
        self._seen: set[str] = set()  # keys the watcher has processed (put or delete)
        self._watch_ended = False
        self._changed = asyncio.Event()  # replaced after each set: waiters see every change
        self._log_malformed = _RateLimitedLog()
        self._log_gap = _RateLimitedLog()
        self._log_record = _RateLimitedLog()
        #: Messages delivered to subscriptions (after the checks).
        self.received = 0
        #: Messages dropped as malformed (frames, version, length, envelope).
        self.malformed = 0
        #: Messages of a publisher id with no matching channel record (dropped).
        self.unknown_publisher = 0
        #: Sequence numbers that did not follow the publisher's previous one.
        self.sequence_gaps = 0
        #: Channel records that could not be parsed (ignored).
        self.bad_records = 0

    @property
    def publishers(self) -> dict[str, tuple[int, str]]:
        """Our channels: subject -> (publisher id, advertised address)."""
        return {s: (p.publisher_id, p.address) for s, p in self._pubs.items()}

    async def start(self) -> None:
        if self._closed:
            raise RuntimeError("ZmqEventPlane is closed")
        if not self.discovery.started:
            raise RuntimeError("ZmqEventPlane needs a started Discovery (call its start() first)")
        self._started = True

    # -- publisher side ---------------------------------------------------------------------
    def publish(self, subject: str, payload: bytes) -> None:
        """Send ``payload`` on ``subject`` (a ``namespace.{ns}.component.{comp}.{topic}``
        subject, else :class:`ValueError`)."""
        if self._closed:
            return
        if not self._started:
            raise RuntimeError("ZmqEventPlane.publish() before start()")
        pub = self._pubs.get(subject)
        if pub is None:
            pub = self._bind(subject)
        seq = pub.sequence
        pub.sequence = seq + 1
        frames = encode_frames(pub.topic, pub.publisher_id, seq, payload)
        try:
            pub.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:  # PUB normally drops silently; this is a socket failure
            self.dropped += 1
            if self.dropped % 10_000 == 1:
                log.warning("ZMQ event plane dropped %d message(s): %s", self.dropped, exc)

    def prepare_publish(self, subject: str) -> None:
        """Bind and announce ``subject``'s channel now (``flush()`` waits for the records), so
        subscribers are connected before the first message; :class:`ValueError` for a subject
        this plane cannot publish."""
        self._check_usable("prepare_publish")
        if subject not in self._pubs:
            self._bind(subject)

    def _bind(self, subject: str) -> _Publisher:
        parsed = parse_component_subject(subject)
        if parsed is None:
            raise ValueError(f"the zmq event plane publishes namespace.{{ns}}.component."
                             f"{{comp}}.{{topic}} subjects only, got {subject!r}")
        namespace, component, topic = parsed
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUB)
        try:
            sock.setsockopt(zmq.SNDHWM, self._hwm)
            sock.setsockopt(zmq.LINGER, self._linger_ms)
            if ":" in self.host.strip("[]"):
                sock.setsockopt(zmq.IPV6, 1)
            sock.bind(f"tcp://{_bracket(self.host)}:0")
            port = sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1]
        except Exception:
            sock.close(0)
            raise
        address = f"tcp://{_bracket(self.advertise_host)}:{port}"
        pid = random_publisher_id()
        ref = EndpointRef(namespace, component, self.endpoint)
        scope = EventScope("endpoint", ref)
        records: list[tuple[str, bytes]] = []
        if topic == KV_EVENTS_TOPIC:
            source = EventSource(scope, topic, pid, EventSourceMetadata(
                kv_state_endpoint=ref, worker=WorkerRef(self.discovery.instance_id, 0),
                publisher_id=pid))
            records.append((source_key(namespace, component, self.endpoint, topic, pid),
                            encode_record(source)))
        channel = EventChannel(scope, topic, pid, EventTransport.zmq(address))
        records.append((channel_key(namespace, component, self.endpoint, topic, pid),
                        encode_record(channel)))
        pub = _Publisher(subject, topic, pid, sock, address, [k for k, _ in records])
        pub.announce = asyncio.get_running_loop().create_task(
            self._announce(records, address), name=f"zmq-event-plane-announce {topic}")
        self._pubs[subject] = pub
        return pub

    async def _announce(self, records: list[tuple[str, bytes]], address: str) -> None:
        for key, value in records:  # the source first: a router attributes the channel's events
            try:
                await self.discovery.put(key, value)
            except Exception as exc:  # subscribers will not find us; keep publishing regardless
                log.error("ZMQ event plane could not announce %s in discovery (%s): %s",
                          address, key, exc)
                return
        log.debug("ZMQ event plane publishing on %s (%s)", address, records[-1][0])

    async def flush(self) -> None:
        """Wait until every channel is announced in discovery (messages are handed to ZMQ by
        ``publish`` itself)."""
        self._check_usable("flush")
        tasks = [p.announce for p in self._pubs.values() if p.announce is not None]
        if tasks:
            await asyncio.shield(asyncio.gather(*tasks))

    # -- subscriber side --------------------------------------------------------------------
    def subscribe(self, subject: str, *, max_pending: int = DEFAULT_MAX_PENDING) -> Subscription:
        self._check_usable("subscribe")
        sub = _ZmqSubscription(self, subject, max_pending=max_pending)
        sock = self._sub if self._sub is not None else self._open_sub()
        self._index.add(sub)
        self._subs.add(sub)
        self._reconcile(sock)
        sub._set_registered()
        return sub

    async def _unsubscribe(self, sub: Subscription) -> None:
        self._index.remove(sub)
        self._subs.discard(sub)
        if self._sub is not None and not self._closed:
            self._reconcile(self._sub)

    def _open_sub(self) -> zmq.asyncio.Socket:
        sock = zmq.asyncio.Context.instance().socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, self._hwm)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IPV6, 1)  # connect to IPv6 peers too (IPv4 still works)
        self._sub = sock
        self._tasks.append(asyncio.create_task(self._watch(sock), name="zmq-event-plane-watch"))
        self._tasks.append(asyncio.create_task(self._receive(sock), name="zmq-event-plane-recv"))
        return sock

    def _wanted(self, remote: _Remote) -> bool:
        return any(s.pattern.matches(remote.subject) for s in self._subs)

    def _reconcile(self, sock: zmq.asyncio.Socket) -> None:
        """Connect every known channel some subscription wants, disconnect the others."""
        for remote in self._remotes.values():
            want = self._wanted(remote)
            if want and not remote.connected:
                self._connect(sock, remote)
            elif not want and remote.connected:
                self._disconnect(sock, remote)

    async def _watch(self, sock: zmq.asyncio.Socket) -> None:
        watch = self.discovery.watch_prefix(EVENT_CHANNELS_PREFIX)
        try:
            async with contextlib.aclosing(watch):
                async for ev in watch:
                    remote = None
                    if ev.kind == "put" and ev.value is not None:
                        remote = self._parse(ev.key, ev.value)
                    old = self._remotes.pop(ev.key, None)
                    if old is not None and remote is not None and old.same_channel(remote):
                        self._remotes[ev.key] = old  # rewritten unchanged: stay connected
                    else:
                        if old is not None and old.connected:
                            self._disconnect(sock, old)
                        if remote is not None:
                            self._remotes[ev.key] = remote
                            if self._wanted(remote):
                                self._connect(sock, remote)
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

    def _parse(self, key: str, value: bytes) -> _Remote | None:
        try:
            record = decode_channel(value)
        except ProtocolError as exc:
            self.bad_records += 1
            self._log_record(logging.WARNING, "ZMQ event plane: ignoring channel record %s: %s",
                             key, exc)
            return None
        ep = record.scope.endpoint
        address = record.transport.zmq_address
        if record.scope.kind != "endpoint" or ep is None or address is None:
            log.debug("ZMQ event plane: ignoring channel %s (scope %s, transport %s)", key,
                      record.scope.kind, record.transport.kind)
            return None
        subject = component_subject(ep.namespace, ep.component, record.topic)
        return _Remote(key, subject, record.topic, record.instance_id, address)

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

    def _connect(self, sock: zmq.asyncio.Socket, remote: _Remote) -> None:
        refs = self._address_refs.get(remote.address, 0)
        if refs == 0:  # a second connect to the same address would duplicate every message
            try:
                sock.connect(remote.address)
            except zmq.ZMQError as exc:
                log.warning("ZMQ event plane: cannot connect to %s (%s): %s", remote.address,
                            remote.key, exc)
                return
        self._address_refs[remote.address] = refs + 1
        topic = remote.topic.encode()
        n = self._topic_refs.get(topic, 0)
        if n == 0:
            sock.setsockopt(zmq.SUBSCRIBE, topic)
        self._topic_refs[topic] = n + 1
        self._by_publisher[remote.publisher_id] = remote
        remote.connected = True
        log.debug("ZMQ event plane: following %s on %s (%s)", remote.subject, remote.address,
                  remote.key)

    def _disconnect(self, sock: zmq.asyncio.Socket, remote: _Remote) -> None:
        remote.connected = False
        if self._by_publisher.get(remote.publisher_id) is remote:
            del self._by_publisher[remote.publisher_id]
            self._last_seq.pop(remote.publisher_id, None)
        topic = remote.topic.encode()
        n = self._topic_refs.pop(topic, 1) - 1
        if n > 0:
            self._topic_refs[topic] = n
        else:
            with contextlib.suppress(zmq.ZMQError):
                sock.setsockopt(zmq.UNSUBSCRIBE, topic)
        refs = self._address_refs.pop(remote.address, 1) - 1
        if refs > 0:
            self._address_refs[remote.address] = refs
            return
        with contextlib.suppress(zmq.ZMQError):  # already gone
            sock.disconnect(remote.address)

    async def _wait_connected(self) -> None:
        keys = set(await self.discovery.get_prefix(EVENT_CHANNELS_PREFIX))
        await self._wait_for(lambda: keys <= self._seen)

    async def _receive(self, sock: zmq.asyncio.Socket) -> None:
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
                self._on_message(frames)
            await asyncio.sleep(0)

    def _on_message(self, frames: list[bytes]) -> None:
        try:
            topic, pid, seq, env = decode_frames(frames)
        except ProtocolError as exc:
            self.malformed += 1
            self._log_malformed(logging.WARNING, "ZMQ event plane: dropping a malformed message "
                                "(%d so far): %s", self.malformed, exc)
            return
        remote = self._by_publisher.get(pid)
        if remote is None or remote.topic != topic:
            self.unknown_publisher += 1
            return
        last = self._last_seq.get(pid)
        self._last_seq[pid] = seq
        if last is not None and seq != last + 1:
            self.sequence_gaps += 1
            self._log_gap(logging.WARNING, "ZMQ event plane: sequence gap from publisher %x on "
                          "%s: expected %d, got %d", pid, remote.subject, last + 1, seq)
        self.received += 1
        self._index.deliver(remote.subject, env.payload)

    # -- shutdown ---------------------------------------------------------------------------
    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._end_subscriptions()
        self._notify()
        tasks, self._tasks = self._tasks, []
        await cancel_and_wait(tasks)
        if self._sub is not None:
            self._sub.close(linger=0)
            self._sub = None
        pubs, self._pubs = list(self._pubs.values()), {}
        for pub in pubs:
            if pub.announce is not None:
                with contextlib.suppress(Exception):
                    await pub.announce
        if not self.discovery.closed:
            for pub in pubs:
                for key in reversed(pub.keys):  # the channel first, then its source
                    with contextlib.suppress(Exception):
                        await self.discovery.delete(key)
        for pub in pubs:
            # Returns at once; ZMQ's I/O thread keeps sending what is queued for ``linger``.
            pub.sock.close()

    def __repr__(self) -> str:
        return (f"ZmqEventPlane(host={self.host!r}, endpoint={self.endpoint!r}, "
                f"publishers={len(self._pubs)})")
