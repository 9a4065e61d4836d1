"""Router replica sync: frontends (or frontend processes) that route to the same workers share
their requests in flight, so that N replicas do not all send a burst to the same idle worker.

This is the idea of NVIDIA Dynamo's KV-router replica sync (``ActiveSequences`` events:
``AddRequest`` with the prompt's blocks, ``MarkPrefillCompleted``, ``Free``, each carrying the
router's id), with our own wire format. Each :class:`ReplicaSync` has a random 63-bit
:attr:`~ReplicaSync.replica_id` and publishes, on one event-plane subject per frontend scope
(:func:`replica_subject`: ``namespace.{ns}.component.frontend.router-replicas``, ``ns`` the
frontend's ``--namespace`` or ``_all``), msgpack :class:`SyncMessage` batches of what its
:class:`~.routing.Router` decided in the modes that count load (``kv``, ``power_of_two``,
``least_loaded``):

- ``added``: a request sent to worker ``worker_id`` rank ``dp_rank``, with its prompt's block
  count, cached overlap, blocks and (kv) chained block hashes;
- ``prefilled``: its first token arrived; ``freed``: it ended.

Every replica applies the other replicas' messages to its router's load view
(:meth:`~.routing.Router.remote_started` and friends) and ignores its own. Events of one turn of
the event loop go out as one message (a burst costs one publish).

Keeping the view right when messages are lost or replicas vanish:

- every ``heartbeat_s`` (1 s) a replica sends a heartbeat listing the requests it has in flight
  and the replicas it hears. A receiver drops that replica's requests the heartbeat does not
  list (a lost ``freed`` heals within a heartbeat; phantom load never lingers). Messages of one
  publisher on one subject arrive in order, so a request listed as gone was freed.
- a replica not heard from for ``peer_timeout_s`` (5 s: SIGKILLed, partitioned) is dropped
  with all its requests; one that closes says goodbye and is dropped at once.
- a replica that newly hears another (one that starts later, one the event plane's slow
  joiner kept deaf at first, or one it had timed out) answers at once with a heartbeat that
  asks it to replay (``resync``); a replica replays its requests in flight when asked, and
  when a heartbeat shows a peer newly hearing it (in case the request was lost), so a late
  joiner's view is complete within two message latencies. Replays are deduplicated by
  (replica, request).
- a lost ``added`` is not recovered: that request then only counts in its own replica's view
  (a routing imbalance until it ends, never a wrong answer). Gaps in a peer's message sequence
  are counted (``gaps``).

A remote request whose model or worker this router does not know (discovery not caught up)
is not counted. Nothing here blocks a request: publishing never waits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

import msgspec
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..runtime.events import EventPlane, Subscription, component_subject
from ..runtime.tasks import TaskSet, cancel_and_wait
from .routing import RemoteRoute, Routed, Router

log = logging.getLogger("dynamo_backend_common.frontend")

__all__ = [
    "DEFAULT_HEARTBEAT_S",
    "DEFAULT_PEER_TIMEOUT_S",
    "REPLICA_TOPIC",
    "ReplicaSync",
    "SyncMessage",
    "SyncRoute",
    "replica_subject",
]

#: Topic of the replica-sync messages (our own; Dynamo's routers never read it).
REPLICA_TOPIC: Final = "router-replicas"
DEFAULT_HEARTBEAT_S: Final = 1.0
DEFAULT_PEER_TIMEOUT_S: Final = 5.0
#: Requests per replay message (a replay of many requests goes out in several).
_REPLAY_BATCH: Final = 256


def replica_subject(namespace: str | None) -> str:
    """The subject the replicas of a frontend serving ``namespace`` (``None``: all) share."""
    return component_subject(namespace or "_all", "frontend", REPLICA_TOPIC)


class SyncRoute(msgspec.Struct, array_like=True, frozen=True):
    """One request a replica sent to a worker rank (Dynamo's ``AddRequest``)."""

    request: int
    model: str
    worker_id: int
    dp_rank: int
    prompt_blocks: int = 0
    overlap_blocks: int = 0
    request_blocks: int = 0
    block_hashes: list[int] = []
    #: Its first token already arrived (replays).
    prefilled: bool = False


class SyncMessage(msgspec.Struct, array_like=True):
    """One message of replica ``replica`` (its ``seq``-th, from 0)."""

    replica: int
    seq: int
    added: list[SyncRoute] = []
    prefilled: list[int] = []
    freed: list[int] = []
    #: A heartbeat: ``inflight`` is every request the sender has in flight after this
    #: message's changes, ``peers`` the replicas it hears.
    heartbeat: bool = False
    inflight: list[int] = []
    peers: list[int] = []
    #: The sender is closing: drop everything it contributed.
    bye: bool = False
    #: Replicas asked to replay their requests in flight (the sender just started hearing
    #: them, perhaps again after it had timed them out).
    resync: list[int] = []


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(SyncMessage).decode


@dataclass(slots=True, eq=False)
class _Local:
    model: str
    routed: Routed
    prefilled: bool = False


@dataclass(slots=True, eq=False)
class _Peer:
    replica: int
    last_seen: float
    seq: int
    routes: dict[int, RemoteRoute] = field(default_factory=dict)
    #: Its latest heartbeat listed us among the replicas it hears.
    hears_us: bool = False


class ReplicaSync:
    """Shares one :class:`~.routing.Router`'s requests in flight with its replicas over
    ``events`` (see the module doc). ``await start()`` after the router exists (the event plane
    started); at shutdown ``await leave()`` first, then ``await close()`` before closing the
    router. :meth:`close` closes ``events`` only with ``close_events``.

    ``registry`` gets the per-process families (label ``pid``):
    ``dynamo_frontend_router_replica_peers`` (replicas heard within the timeout that also hear
    this one), ``dynamo_frontend_router_replica_workers`` (worker ranks the router knows),
    ``dynamo_frontend_router_replica_requests{source=local|remote}`` and
    ``dynamo_frontend_router_replica_messages_total{result=applied|malformed|gap}``.
    """

    def __init__(
        self,
        router: Router,
        events: EventPlane,
        *,
        namespace: str | None = None,
        replica_id: int | None = None,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        peer_timeout_s: float = DEFAULT_PEER_TIMEOUT_S,
        registry: CollectorRegistry | None = None,
        close_events: bool = False,
    ) -> None:
        if not heartbeat_s > 0 or not peer_timeout_s > heartbeat_s:
            raise ValueError("need 0 < heartbeat_s < peer_timeout_s")
        self.router = router
        self.events = events
        self.subject = replica_subject(namespace)
        #: This replica's id (random, never 0): messages carrying it are ignored.
        self.replica_id = replica_id if replica_id is not None else random.getrandbits(63) | 1
        self.heartbeat_s = heartbeat_s
        self.peer_timeout_s = peer_timeout_s
        self._local: dict[int, _Local] = {}  # ticket -> a request of ours in flight
        self._peers: dict[int, _Peer] = {}
        self._added: list[SyncRoute] = []
        self._prefilled: list[int] = []
        self._freed: list[int] = []
        self._flush_handle: asyncio.Handle | None = None
        self._heartbeat_due = False
        self._replay_due = False
        self._resync: set[int] = set()
        self._seq = 0
        self._sub: Subscription | None = None
        self._tasks = TaskSet()
        self._registry = registry
        self._collector: _Collector | None = None
        self._started = False
        self._left = False
        self._close_events = close_events
        self._heartbeat_task: asyncio.Task[None] | None = None
        #: Messages of other replicas applied / that did not decode / sequence gaps seen.
        self.applied = 0
        self.malformed = 0
        self.gaps = 0
        self._next_malformed_log = 0.0

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        """Subscribe, announce this replica (a heartbeat) and hook into the router."""
        if self._started:
            return
        self._started = True
        self.events.prepare_publish(self.subject)
        self._sub = self.events.subscribe(self.subject)
        self._tasks.spawn(self._pump(self._sub), name="replica sync receive")
        self._heartbeat_task = self._tasks.spawn(self._heartbeats(),
                                                 name="replica sync heartbeat")
        self.router.set_listener(self)
        if self._registry is not None:
            self._collector = _Collector(self)
            self._registry.register(self._collector)
        self._publish(heartbeat=True)
        log.info("router replica sync: replica %x on %s", self.replica_id, self.subject)

    async def leave(self) -> None:
        """Stop sharing (the process is shutting down): unhook from the router, stop the
        heartbeats and say goodbye, so the other replicas drop this one's requests at once.
        Messages of the others are still read until :meth:`close`. Idempotent.

        Call it at the start of a shutdown, well before :meth:`close`: the goodbye then
        reaches the others long before this replica's channel disappears from discovery (with
        ``zmq://``, a subscriber that drops a channel while holding an unread message from it
        trips a libzmq assertion; see :meth:`close`)."""
        if not self._started or self._left:
            return
        self._left = True
        self.router.set_listener(None)
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._heartbeat_task is not None:
            await cancel_and_wait([self._heartbeat_task])
            self._heartbeat_task = None
        if not self.events.closed:
            self._publish(bye=True)
            try:
                await asyncio.wait_for(self.events.flush(), 1.0)
            except Exception:  # best effort: peers time us out otherwise
                log.debug("router replica sync: goodbye not flushed", exc_info=True)

    async def close(self) -> None:
        """:meth:`leave` if not done, stop receiving, drop what the other replicas contributed
        and unregister the metrics. With ``close_events`` the event plane is closed here (the
        subscription ends with it), else only the subscription is: on the ZMQ plane that
        disconnects from each publisher one by one, which libzmq 4.3.5 turns into an abort
        when a message of one of them is half-read, so a plane used only for replica sync
        should be closed whole (``close_events=True``)."""
        if not self._started:
            return
        await self.leave()
        self._started = False
        await self._tasks.cancel_all()
        if self._close_events:
            await self.events.close()
        elif self._sub is not None:
            await self._sub.close()
        for peer in list(self._peers.values()):
            self._drop(peer)
        if self._collector is not None and self._registry is not None:
            self._registry.unregister(self._collector)
            self._collector = None

    # -- what this replica routes (RouteListener) -------------------------------------------
    def routed(self, model: str, routed: Routed) -> None:
        d = routed.decision
        self._local[d.ticket] = _Local(model, routed)
        self._added.append(_route(d.ticket, model, routed, False))
        self._schedule()

    def prefill_done(self, routed: Routed) -> None:
        local = self._local.get(routed.decision.ticket)
        if local is not None and not local.prefilled:
            local.prefilled = True
            self._prefilled.append(routed.decision.ticket)
            self._schedule()

    def finished(self, routed: Routed) -> None:
        if self._local.pop(routed.decision.ticket, None) is not None:
            self._freed.append(routed.decision.ticket)
            self._schedule()

    # -- views (tests, metrics) -------------------------------------------------------------
    @property
    def local_requests(self) -> int:
        """Requests of this replica in flight (in a load-tracking mode)."""
        return len(self._local)

    @property
    def remote_requests(self) -> int:
        """Other replicas' requests counted in this router's load view."""
        return sum(len(p.routes) for p in self._peers.values())

    def peers(self, *, synced: bool = True) -> list[int]:
        """Replicas heard from within the timeout (``synced``: that also hear this one)."""
        return [p.replica for p in self._peers.values() if p.hears_us or not synced]

    # -- publishing -------------------------------------------------------------------------
    def _schedule(self) -> None:
        if self._flush_handle is None and self._started and not self._left:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        if self._replay_due:
            self._replay_due = False
            self._heartbeat_due = True
            routes = [_route(t, lo.model, lo.routed, lo.prefilled) for t, lo in self._local.items()]
            # Pending adds are in the replay; their prefills and frees are already applied.
            self._added, self._prefilled = [], []
            for i in range(0, len(routes), _REPLAY_BATCH):
                self._publish(added=routes[i:i + _REPLAY_BATCH])
        heartbeat, self._heartbeat_due = self._heartbeat_due, False
        if self._added or self._prefilled or self._freed or heartbeat:
            self._publish(added=self._added, prefilled=self._prefilled, freed=self._freed,
                          heartbeat=heartbeat)
            self._added, self._prefilled, self._freed = [], [], []

    def _publish(self, *, added: list[SyncRoute] | None = None,
                 prefilled: list[int] | None = None, freed: list[int] | None = None,
                 heartbeat: bool = False, bye: bool = False) -> None:
        msg = SyncMessage(self.replica_id, self._seq, added or [], prefilled or [], freed or [])
        if heartbeat:
            msg.heartbeat = True
            msg.inflight = list(self._local)
            msg.peers = list(self._peers)
        msg.bye = bye
        if self._resync and not bye:
            msg.resync = list(self._resync)
            self._resync.clear()
        self._seq += 1
        self.events.publish(self.subject, _encode(msg))

    def _heartbeat_soon(self) -> None:
        self._heartbeat_due = True
        self._schedule()

    async def _heartbeats(self) -> None:
        # A periodic timer, not a synchronisation: heartbeats and peer expiry run on it.
        while True:
            await asyncio.sleep(self.heartbeat_s)
            self.expire_peers(time.monotonic())
            self._heartbeat_soon()

    def expire_peers(self, now: float) -> None:
        """Drop the replicas not heard from for ``peer_timeout_s`` before ``now``
        (``time.monotonic()``), with their requests (the heartbeat timer calls it)."""
        for peer in [p for p in self._peers.values()
                     if now - p.last_seen > self.peer_timeout_s]:
            log.warning("router replica sync: replica %x silent for %.1f s; dropping its %d "
                        "request(s) in flight", peer.replica, now - peer.last_seen,
                        len(peer.routes))
            self._drop(peer)

    def _drop(self, peer: _Peer) -> None:
        self._peers.pop(peer.replica, None)
        routes, peer.routes = peer.routes, {}
        for remote in routes.values():
            self.router.remote_finished(remote)
        self.router.notify_waiters()

    # -- receiving --------------------------------------------------------------------------
    async def _pump(self, sub: Subscription) -> None:
        async for msg in sub:
            try:
                self.on_message(msg.payload)
            except Exception:
                log.exception("router replica sync: handling a message failed")

    def on_message(self, payload: bytes, now: float | None = None) -> None:
        """Apply one message of another replica (messages of this one are ignored). Malformed
        payloads are counted in :attr:`malformed`, logged at most once per 10 s, and dropped."""
        try:
            msg = _decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.malformed += 1
            t = time.monotonic()
            if t >= self._next_malformed_log:
                self._next_malformed_log = t + 10.0
                log.warning("router replica sync: dropping a malformed message (%d so far): %s",
                            self.malformed, exc)
            return
        if msg.replica == self.replica_id:
            return
        now = time.monotonic() if now is None else now
        peer = self._peers.get(msg.replica)
        if msg.bye:
            if peer is not None:
                log.info("router replica sync: replica %x left; dropping its %d request(s)",
                         msg.replica, len(peer.routes))
                self._drop(peer)
            return
        if peer is None:
            peer = self._peers[msg.replica] = _Peer(msg.replica, now, msg.seq)
            log.info("router replica sync: hearing replica %x", msg.replica)
            self._resync.add(msg.replica)  # what it has in flight we have not seen
            self._heartbeat_soon()  # so it hears of us soon, and replays when it does
        elif msg.seq != peer.seq + 1:
            self.gaps += 1
        peer.seq = msg.seq
        peer.last_seen = now
        self.applied += 1
        router = self.router
        routes = peer.routes
        for r in msg.added:
            if r.request in routes:
                continue  # a replay of one we have
            remote = router.remote_started(
                r.model, (r.worker_id, r.dp_rank), prompt_blocks=r.prompt_blocks,
                overlap_blocks=r.overlap_blocks, request_blocks=r.request_blocks,
                block_hashes=r.block_hashes)
            if remote is not None:
                routes[r.request] = remote
                if r.prefilled:
                    router.remote_prefill_done(remote)
        for ticket in msg.prefilled:
            remote = routes.get(ticket)
            if remote is not None:
                router.remote_prefill_done(remote)
        for ticket in msg.freed:
            remote = routes.pop(ticket, None)
            if remote is not None:
                router.remote_finished(remote)
        if self.replica_id in msg.resync:
            self._replay_due = True
            self._schedule()
        if msg.heartbeat:
            if routes:
                keep = set(msg.inflight)
                for ticket in [t for t in routes if t not in keep]:
                    router.remote_finished(routes.pop(ticket))
            hears = self.replica_id in msg.peers
            if hears and not peer.hears_us:
                self._replay_due = True
                self._schedule()
            if hears != peer.hears_us:
                peer.hears_us = hears
                router.notify_waiters()


def _route(ticket: int, model: str, routed: Routed, prefilled: bool) -> SyncRoute:
    d = routed.decision
    return SyncRoute(ticket, model, d.worker[0], d.worker[1], d.prompt_blocks, d.overlap_blocks,
                     d.request_blocks, list(d.block_hashes), prefilled)


class _Collector:
    def __init__(self, owner: ReplicaSync) -> None:
        self._owner = owner
        self._pid = str(os.getpid())

    def collect(self) -> Iterator[Metric]:
        o, pid = self._owner, [self._pid]
        peers = GaugeMetricFamily(
            "dynamo_frontend_router_replica_peers", "Router replicas this process hears and "
            "that hear it (replica sync).", labels=["pid"])
        peers.add_metric(pid, len(o.peers()))
        yield peers
        workers = GaugeMetricFamily(
            "dynamo_frontend_router_replica_workers", "Worker ranks this process's router can "
            "route to (replicas should agree).", labels=["pid"])
        workers.add_metric(pid, o.router.worker_ranks())
        yield workers
        reqs = GaugeMetricFamily(
            "dynamo_frontend_router_replica_requests", "Requests in flight in this process's "
            "load view: routed here (local) or by other replicas (remote).",
            labels=["pid", "source"])
        reqs.add_metric([*pid, "local"], o.local_requests)
        reqs.add_metric([*pid, "remote"], o.remote_requests)
        yield reqs
        msgs = CounterMetricFamily(
            "dynamo_frontend_router_replica_messages", "Replica-sync messages of other "
            "replicas: applied, malformed (dropped), sequence gaps (messages lost).",
            labels=["pid", "result"])
        msgs.add_metric([*pid, "applied"], o.applied)
        msgs.add_metric([*pid, "malformed"], o.malformed)
        msgs.add_metric([*pid, "gap"], o.gaps)
        yield msgs
