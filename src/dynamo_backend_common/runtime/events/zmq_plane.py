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
- **Subscribing.** The plane watches ``v1/event_channels/``; every ZMQ channel whose subject
  matches a subscription is followed and its topic SUBSCRIBEd (exact topic bytes); a deleted
  record, or no subscription wanting it any more, unfollows it. Each message is checked (4
  frames, version byte, length, envelope agreeing with the frames), attributed by its publisher
  id to its channel (on that channel's socket) and delivered as ``Message(subject,
  envelope.payload)``. Malformed messages are dropped, counted in ``malformed`` and logged
  (rate-limited); messages of publishers not (or no longer) known are dropped and counted in
  ``unknown_publisher``. A sequence number that is not the last one + 1 counts in
  ``sequence_gaps`` (messages were lost, e.g. beyond the high-water mark); the payloads carry
  their own ids (KV events' ``event_id``), which is what the KV router resyncs on.
- **One SUB socket per followed address.** Each followed channel address has a SUB socket of
  its own (channels announced at one address share it, with per-topic reference counts),
  created on the first connect and closed with linger 0 when its last channel goes; no socket
  is ever ``disconnect()``ed. libzmq 4.3 aborts the whole process (``Assertion failed: !_more
  (src/fq.cpp:80)``) when a SUB that fair-queues several pipes has begun a multipart message
  of one (reading ``ZMQ_EVENTS``, as every poll does, prefetches its first frame) and that pipe
  is terminated before the rest is read. With one SUB for all publishers, dropping a channel
  whose messages were streaming in or still queued (its worker shut down, or was SIGKILLed and
  its lease expired; a subscription closed) could abort a frontend and every KV router in it.
  Now a socket's only pipe ends with the socket, which is never read again.
- **Receiving** costs no task or future per message, nor per socket: each socket's ``ZMQ_FD``
  is an ``add_reader`` callback that drains it with non-blocking reads, at most
  ``_DRAIN_BATCH`` messages before it reschedules itself (``call_soon``) so that one busy
  publisher cannot starve the loop. The FD is edge-triggered (only a read that found the queue
  empty re-arms it), so a socket is also drained once right after it connects.

Delivery is at most once. ZMQ's slow joiner applies: a subscription reaches a publisher a
moment after the SUB connected, and messages published before that are not delivered.
``Subscription.ready()`` waits until a SUB socket is connected to every matching channel
announced when it was called; it cannot see the subscription arrive at the publisher (a test
that needs certainty publishes a probe until one arrives). Beyond ``hwm`` queued messages per
peer, ZMQ drops silently (seen as sequence gaps).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import zmq

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
class _Follow:
    """The SUB socket of one followed address: its only pipe is the one to that publisher."""

    address: str
    sock: zmq.Socket[bytes]
    fd: int
    #: Connected channels (:class:`_Remote`) at this address; the socket closes at 0.
    refs: int = 0
    #: SUBSCRIBEd topic -> connected channels of that topic here.
    topics: dict[bytes, int] = field(default_factory=dict)
    #: A drain is queued with ``call_soon`` (at most one at a time).
    scheduled: bool = False
    closed: bool = False


@dataclass(slots=True, eq=False)
class _Remote:
    """One announced channel (ours or anyone's) this plane knows of."""

    key: str
    subject: str
    topic: str
    publisher_id: int
    address: str
    #: The socket it is followed on; ``None`` while not connected.
    follow: _Follow | None = None

    @property
    def connected(self) -> bool:
        return self.follow is not None

    def same_channel(self, other: _Remote) -> bool:
        return (self.subject, self.topic, self.publisher_id, self.address) == (
            other.subject, other.topic, other.publisher_id, other.address)


class _ZmqSubscription(Subscription):
    def __init__(self, plane: ZmqEventPlane, subject: str, *, max_pending: int) -> None:
        super().__init__(subject, max_pending=max_pending, on_close=plane._unsubscribe)
        self._plane = plane

    async def ready(self) -> None:
        """Wait until every matching channel announced right now is connected."""
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
        self._loop: asyncio.AbstractEventLoop | None = None  # set by the first subscribe()
        self._tasks: list[asyncio.Task[None]] = []
        self._remotes: dict[str, _Remote] = {}  # discovery key -> channel
        self._by_publisher: dict[int, _Remote] = {}  # connected channels by publisher id
        self._followed: dict[str, _Follow] = {}  # address -> its SUB socket
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
        if self._loop is None:  # the first one starts following discovery
            self._loop = asyncio.get_running_loop()
            self._tasks.append(self._loop.create_task(self._watch(),
                                                      name="zmq-event-plane-watch"))
        self._index.add(sub)
        self._subs.add(sub)
        self._reconcile()
        sub._set_registered()
        return sub

    async def _unsubscribe(self, sub: Subscription) -> None:
        self._index.remove(sub)
        self._subs.discard(sub)
        if not self._closed:
            self._reconcile()

    def _wanted(self, remote: _Remote) -> bool:
        return any(s.pattern.matches(remote.subject) for s in self._subs)

    def _reconcile(self) -> None:
        """Connect every known channel some subscription wants, disconnect the others."""
        for remote in self._remotes.values():
            want = self._wanted(remote)
            if want and not remote.connected:
                self._connect(remote)
            elif not want and remote.connected:
                self._disconnect(remote)

    async def _watch(self) -> None:
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
                            self._disconnect(old)
                        if remote is not None:
                            self._remotes[ev.key] = remote
                            if self._wanted(remote):
                                self._connect(remote)
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

    def _connect(self, remote: _Remote) -> None:
        follow = self._followed.get(remote.address)
        if follow is None:  # one socket per address: a second connect would duplicate messages
            follow = self._follow(remote)
            if follow is None:
                return
        topic = remote.topic.encode()
        n = follow.topics.get(topic, 0)
        if n == 0:
            follow.sock.setsockopt(zmq.SUBSCRIBE, topic)
        follow.topics[topic] = n + 1
        follow.refs += 1
        remote.follow = follow
        self._by_publisher[remote.publisher_id] = remote
        log.debug("ZMQ event plane: following %s on %s (%s)", remote.subject, remote.address,
                  remote.key)

    def _follow(self, remote: _Remote) -> _Follow | None:
        """A new SUB socket connected to ``remote.address``, read by the loop (see the module
        doc); ``None`` (logged) if it cannot connect."""
        assert self._loop is not None
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
        try:
            sock.setsockopt(zmq.RCVHWM, self._hwm)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IPV6, 1)  # connect to IPv6 peers too (IPv4 still works)
            sock.connect(remote.address)
            fd = sock.fileno()  # ZMQ_FD
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            log.warning("ZMQ event plane: cannot connect to %s (%s): %s", remote.address,
                        remote.key, exc)
            return None
        follow = _Follow(remote.address, sock, fd)
        self._loop.add_reader(fd, self._drain, follow)
        self._followed[remote.address] = follow
        # The FD signals a change of state, not queued messages: only a read that found the
        # pipe empty arms it, so read once (connect() may also have taken pending commands).
        self._schedule_drain(follow)
        return follow

    def _disconnect(self, remote: _Remote) -> None:
        follow, remote.follow = remote.follow, None
        if self._by_publisher.get(remote.publisher_id) is remote:
            del self._by_publisher[remote.publisher_id]
            self._last_seq.pop(remote.publisher_id, None)
        if follow is None:
            return
        follow.refs -= 1
        if follow.refs <= 0:
            self._unfollow(follow)
            return
        topic = remote.topic.encode()
        n = follow.topics.pop(topic, 1) - 1
        if n > 0:
            follow.topics[topic] = n
        else:
            with contextlib.suppress(zmq.ZMQError):
                follow.sock.setsockopt(zmq.UNSUBSCRIBE, topic)

    def _unfollow(self, follow: _Follow) -> None:
        """Close ``follow``'s socket (linger 0, queued messages dropped): never disconnect()
        a pipe a message may be half read from (see the module doc)."""
        follow.closed = True
        if self._followed.get(follow.address) is follow:
            del self._followed[follow.address]
        if self._loop is not None:
            self._loop.remove_reader(follow.fd)  # before close(): the FD number is reused
        follow.sock.close(linger=0)

    async def _wait_connected(self) -> None:
        keys = set(await self.discovery.get_prefix(EVENT_CHANNELS_PREFIX))
        await self._wait_for(lambda: keys <= self._seen)

    def _schedule_drain(self, follow: _Follow) -> None:
        if not follow.scheduled:
            follow.scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._drain, follow, True)

    def _drain(self, follow: _Follow, scheduled: bool = False) -> None:
        """Read what ``follow``'s socket has queued (its FD's reader callback): plain
        non-blocking reads, no future per message, at most ``_DRAIN_BATCH`` before yielding to
        the loop so that one busy peer cannot starve it."""
        if scheduled:
            follow.scheduled = False
        if follow.closed:
            return
        recv = follow.sock.recv_multipart
        on_message = self._on_message
        try:
            for _ in range(_DRAIN_BATCH):
                on_message(recv(zmq.NOBLOCK), follow)
        except zmq.Again:
            return  # the queue is empty, so the FD is armed for the next message
        except zmq.ZMQError as exc:  # the socket is unusable (context terminated)
            if not follow.closed:
                log.error("ZMQ event plane: receiving from %s failed: %s", follow.address, exc)
                assert self._loop is not None
                self._loop.remove_reader(follow.fd)  # its FD may stay readable: no busy loop
            return
        except BaseException:
            self._schedule_drain(follow)  # do not strand what is queued behind it
            raise
        self._schedule_drain(follow)  # more may be queued, and the FD will not say so

    def _on_message(self, frames: list[bytes], follow: _Follow) -> None:
        try:
            topic, pid, seq, env = decode_frames(frames)
        except ProtocolError as exc:
            self.malformed += 1
            self._log_malformed(logging.WARNING, "ZMQ event plane: dropping a malformed message "
                                "(%d so far): %s", self.malformed, exc)
            return
        remote = self._by_publisher.get(pid)
        if remote is None or remote.follow is not follow or remote.topic != topic:
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
        for follow in list(self._followed.values()):
            self._unfollow(follow)
        for remote in self._remotes.values():
            remote.follow = None
        self._by_publisher.clear()
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
