"""Chooses the worker (and data-parallel rank) for each request of each model.

One :class:`Router` serves a frontend. It keeps one routing policy per model
(``round_robin`` | ``random`` | ``kv``, see :mod:`dynamo_backend_common.router`), fed by the
:class:`ModelManager` (workers joining and leaving) and, in ``kv`` mode, by the event plane
(KV events and load snapshots of every worker). A worker with ``data_parallel_size`` N is N
routing targets ``(instance_id, rank)``; the chosen rank travels in ``request.routing.dp_rank``.

Per request the :class:`EngineClient` calls :meth:`Router.route`, :meth:`Router.first_token`
when the first token arrives, then, once the attempt ends, :meth:`Router.finished` with what
``route`` returned; ``kv`` mode counts the request's prefill and blocks against its worker in
between.

KV index upkeep (``kv`` mode), one :class:`KvIndexer` for all models:

- a worker that leaves (discovery) loses its index entries, load and in-flight counts at once;
  its id is remembered (the last :data:`DEPARTED_MEMORY` ids) so KV events and snapshots it
  published while shutting down, still in flight on the event plane, cannot re-create entries
  nobody would ever remove. A worker id that joins again is forgotten from that list.
- a gap in a worker rank's event ids (events lost: ZMQ high-water mark, a NATS reconnect) drops
  that rank's entries, logged as a warning and counted in ``kv_event_gaps``; the event that
  revealed the gap starts the rank's new baseline. Stale entries would attract requests to a
  cold cache; missing ones only cost a prefill, so dropping is the safe resync.
- a ``cleared`` event drops the rank's entries; ``removed`` drops the named blocks.

Messages are NVIDIA Dynamo 1.6.1's (``protocols.kv``): a ``kv-events`` message is a list of
RouterEvent, a ``kv_metrics`` message one ActiveLoad, so Dynamo's workers (the mocker, vLLM
through Dynamo) are routed like ours. A load without ``kv_total_blocks`` (Dynamo's never has
one) takes the capacity from the worker's card (``runtime_config.total_kv_blocks``, per rank).
Malformed messages are dropped, counted (``kv_events_malformed``, the ``malformed`` result of
the events metric) and logged at most once per 10 s.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter as Tally
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..errors import ProtocolError
from ..protocols.kv import LoadSnapshot, decode_kv_events, decode_load
from ..router import KvIndexer, KvRouterConfig, RouteDecision, RoutingPolicy, WorkerKey, make_policy
from ..router.policies import POLICY_NAMES
from ..runtime.events import EventPlane, Subscription, kv_events_subject, kv_metrics_subject
from .model_manager import ModelEntry, ModelManager, WorkerEntry

log = logging.getLogger("dynamo_backend_common.frontend")

__all__ = ["DEPARTED_MEMORY", "ROUTER_MODES", "Routed", "Router"]

ROUTER_MODES = POLICY_NAMES

#: How many departed worker ids a :class:`Router` remembers to ignore their late events.
DEPARTED_MEMORY = 4096


@dataclass(eq=False, slots=True)
class Routed:
    """One routing decision: the worker, the rank, and the policy's reasoning."""

    worker: WorkerEntry
    dp_rank: int
    decision: RouteDecision
    policy: RoutingPolicy


def _worker_keys(worker: WorkerEntry) -> list[tuple[int, int]]:
    rc = worker.card.runtime_config
    start = rc.data_parallel_start_rank
    return [(worker.instance_id, start + r) for r in range(max(1, rc.data_parallel_size))]


class Router:
    """Routes the requests of every model a :class:`ModelManager` knows (see module doc).

    ``mode`` is ``round_robin`` (default), ``random`` or ``kv``. In ``kv`` mode ``events`` is the
    event plane the workers publish on; a model whose card has no ``kv_cache_block_size`` is
    routed round-robin (with a warning), since its prompts cannot be hashed into blocks.
    ``overlap_weight``, ``temperature`` and ``busy_threshold`` tune the KV cost
    (see :class:`~dynamo_backend_common.router.KvRouterConfig`).
    """

    def __init__(
        self,
        models: ModelManager,
        mode: str = "round_robin",
        *,
        events: EventPlane | None = None,
        overlap_weight: float = 1.0,
        temperature: float = 0.0,
        busy_threshold: float | None = None,
        seed: int | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        key = mode.strip().lower().replace("-", "_")
        if key not in POLICY_NAMES:
            raise ValueError(f"unknown router mode {mode!r}; expected one of {POLICY_NAMES}")
        if key == "kv" and events is None:
            raise ValueError("router mode kv needs the event plane workers publish on")
        self.mode = key
        self._models = models
        self._events = events
        self._kv_options: dict[str, Any] = {
            "overlap_score_weight": overlap_weight, "temperature": temperature,
            "busy_threshold": busy_threshold}
        KvRouterConfig(block_size=1, **self._kv_options)  # bad options fail here, not later
        self._rng = random.Random(seed)
        self.indexer = KvIndexer(on_gap=self._on_gap)
        self._policies: dict[str, RoutingPolicy] = {}
        self._subscriptions: dict[str, Subscription] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._loads: dict[tuple[int, int], LoadSnapshot] = {}
        self._departed: OrderedDict[int, None] = OrderedDict()
        #: KV events applied to the index so far (``kv`` mode).
        self.events_applied = 0
        #: KV events dropped because their worker had already left.
        self.events_ignored = 0
        #: Event-id gaps seen (each dropped one worker rank's entries).
        self.kv_event_gaps = 0
        #: Messages on the KV topics that could not be decoded (dropped).
        self.kv_events_malformed = 0
        #: KV events of variants this router does not know (skipped).
        self.kv_events_unknown = 0
        self._capacity: dict[int, int] = {}  # instance id -> the card's total_kv_blocks
        self._next_malformed_log = 0.0
        self._changed = asyncio.Event()  # set and replaced on every change (see _notify)
        self._waiters = 0
        #: Requests routed per ``(model, instance_id)`` since start.
        self.decisions: Tally[tuple[str, int]] = Tally()
        #: The most recent decision (tests, debugging).
        self.last: Routed | None = None
        self._decisions: Counter | None = None
        self._overlap: Histogram | None = None
        self._overlap_blocks: Counter | None = None
        self._prompt_blocks: Counter | None = None
        self._events_metric: Counter | None = None
        self._gaps_metric: Counter | None = None
        if registry is not None:
            self._decisions = Counter(
                "dynamo_frontend_router_decisions", "Routing decisions per worker",
                ["model", "policy", "worker_id", "dp_rank"], registry=registry)
            self._overlap = Histogram(
                "dynamo_frontend_router_overlap_ratio",
                "Share of the prompt's KV blocks already cached on the chosen worker (kv mode)",
                ["model"], buckets=(0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0), registry=registry)
            self._overlap_blocks = Counter(
                "dynamo_frontend_router_overlap_blocks",
                "Prompt KV blocks found cached on the chosen worker (kv mode); divide by "
                "dynamo_frontend_router_prompt_blocks for the predicted hit rate",
                ["model", "worker_id", "dp_rank"], registry=registry)
            self._prompt_blocks = Counter(
                "dynamo_frontend_router_prompt_blocks",
                "Full KV blocks of the prompts routed (kv mode)",
                ["model", "worker_id", "dp_rank"], registry=registry)
            self._events_metric = Counter(
                "dynamo_frontend_router_kv_events",
                "KV events received: applied to the index, ignored (worker gone) or malformed",
                ["result"], registry=registry)
            self._gaps_metric = Counter(
                "dynamo_frontend_router_kv_event_gaps",
                "Gaps in a worker rank's KV event ids (its index entries were dropped)",
                registry=registry)
            Gauge("dynamo_frontend_router_indexed_blocks",
                  "Distinct KV block hashes in the router's index (kv mode)",
                  registry=registry).set_function(lambda: self.indexer.num_blocks)
        models.add_listener(self._on_worker)
        for name, entry in models.models.items():
            for worker in entry.workers.values():
                self._on_worker(name, worker, True)

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        """Nothing to do up front: subscriptions open as models appear (``kv`` mode)."""

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for sub in self._subscriptions.values():
            await sub.close()
        self._subscriptions.clear()

    # -- per request ------------------------------------------------------------------------
    def route(
        self, model: str, entry: ModelEntry, token_ids: Sequence[int], exclude: set[int]
    ) -> Routed:
        """Choose a worker of ``entry`` not in ``exclude`` (instance ids) for ``token_ids``.

        Raises ``LookupError`` when no candidate is left. The caller must pass the result to
        :meth:`finished` when the attempt ends, whatever the outcome.
        """
        by_key: dict[tuple[int, int], WorkerEntry] = {}
        for iid, worker in entry.workers.items():
            if iid not in exclude:
                for key in _worker_keys(worker):
                    by_key[key] = worker
        if not by_key:
            raise LookupError(f"no worker left for model {model!r}")
        policy = self._policy(model, entry)
        decision = policy.select(token_ids, list(by_key))
        policy.request_started(decision)
        worker_id, rank = decision.worker
        self.decisions[(model, worker_id)] += 1
        if self._decisions is not None:
            wid, rk = f"{worker_id:x}", str(rank)
            self._decisions.labels(model, policy.name, wid, rk).inc()
            if decision.prompt_blocks:
                assert self._overlap is not None and self._overlap_blocks is not None
                assert self._prompt_blocks is not None
                self._overlap.labels(model).observe(
                    decision.overlap_blocks / decision.prompt_blocks)
                self._overlap_blocks.labels(model, wid, rk).inc(decision.overlap_blocks)
                self._prompt_blocks.labels(model, wid, rk).inc(decision.prompt_blocks)
        if log.isEnabledFor(logging.DEBUG):
            costs = ", ".join(f"{k[0]:x}/{k[1]}={v:g}" for k, v in decision.logits.items())
            log.debug("route %s -> worker %x rank %d (%s, overlap %d/%d blocks%s)", model,
                      worker_id, rank, policy.name, decision.overlap_blocks,
                      decision.prompt_blocks, f"; costs {costs}" if costs else "")
        routed = Routed(by_key[decision.worker], rank, decision, policy)
        self.last = routed
        return routed

    def load(self, key: WorkerKey) -> LoadSnapshot | None:
        """The latest load snapshot of worker rank ``key`` (``kv`` mode), if any."""
        return self._loads.get(key)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait until ``predicate()`` holds, re-checked after every KV event, load snapshot
        and worker change (tests, warm-up). Raises ``TimeoutError`` after ``timeout`` s."""
        self._waiters += 1
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    await self._changed.wait()
        finally:
            self._waiters -= 1

    async def wait_for_events(self, count: int, timeout: float) -> None:
        """Wait until at least ``count`` KV events were applied (tests, warm-up)."""
        await self.wait_for(lambda: self.events_applied >= count, timeout)

    def first_token(self, routed: Routed) -> None:
        """The attempt ``routed`` produced its first token (its prefill is done)."""
        routed.policy.prefill_done(routed.decision)

    def finished(self, routed: Routed) -> None:
        """The attempt ``routed`` ended (success, error or cancellation)."""
        routed.policy.request_finished(routed.decision)

    # -- membership and events --------------------------------------------------------------
    def _policy(self, model: str, entry: ModelEntry) -> RoutingPolicy:
        policy = self._policies.get(model)
        if policy is not None:
            return policy
        mode = self.mode
        block_size = entry.card.kv_cache_block_size
        if mode == "kv" and not block_size:
            log.warning("model %s has no kv_cache_block_size; routing it round-robin", model)
            mode = "round_robin"
        if mode == "kv":
            assert block_size is not None
            policy = make_policy("kv", rng=self._rng, indexer=self.indexer,
                                 block_size=block_size, **self._kv_options)
            for snap in self._loads.values():
                policy.update_load(snap)
        else:
            policy = make_policy(mode, rng=self._rng)
        self._policies[model] = policy
        return policy

    def _on_worker(self, model: str, worker: WorkerEntry, added: bool) -> None:
        entry = self._models.models.get(model)
        if added:
            self._departed.pop(worker.instance_id, None)
            total = worker.card.runtime_config.total_kv_blocks
            if total and self._capacity.get(worker.instance_id) != total:
                self._capacity[worker.instance_id] = total
                self._apply_capacity(worker.instance_id, total)
            if entry is None:
                return
            policy = self._policy(model, entry)
            for key in _worker_keys(worker):
                policy.add_worker(key)
            if self.mode == "kv":
                self._subscribe(worker.card.namespace, worker.card.component)
            self._notify()
            return
        current = self._policies.get(model)
        keys = _worker_keys(worker)
        dropped = sum(len(self.indexer.worker_blocks(k)) for k in keys)
        for key in keys:
            if current is not None:
                current.remove_worker(key)
            self.indexer.remove_worker(*key)
            self._loads.pop(key, None)
        # Ranks the card did not announce (defensive): forget them too.
        self.indexer.remove_worker(worker.instance_id)
        self._capacity.pop(worker.instance_id, None)
        self._departed[worker.instance_id] = None
        while len(self._departed) > DEPARTED_MEMORY:
            self._departed.popitem(last=False)
        if self.mode == "kv":
            log.info("kv router: worker %x left model %s; dropped its %d indexed blocks",
                     worker.instance_id, model, dropped)
        if entry is None:
            self._policies.pop(model, None)
        self._notify()

    def _apply_capacity(self, instance_id: int, total: int) -> None:
        """Loads that arrived before the worker's card (the event plane ran ahead of
        discovery) and carry no total get the card's."""
        for key, snap in list(self._loads.items()):
            if key[0] == instance_id and snap.kv_total_blocks is None:
                snap = msgspec.structs.replace(snap, kv_total_blocks=total)
                self._loads[key] = snap
                for policy in self._policies.values():
                    policy.update_load(snap)

    def _notify(self) -> None:
        """Wake every :meth:`wait_for` (each re-checks its predicate)."""
        if self._waiters:
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()

    def _subscribe(self, namespace: str, component: str) -> None:
        assert self._events is not None
        for subject, handler in (
            (kv_events_subject(namespace, component), self._on_kv_event),
            (kv_metrics_subject(namespace, component), self._on_load),
        ):
            if subject in self._subscriptions:
                continue
            sub = self._events.subscribe(subject)
            self._subscriptions[subject] = sub
            self._tasks.append(asyncio.get_running_loop().create_task(
                self._pump(sub, handler), name=f"router {subject}"))
            log.info("kv router: subscribed to %s", subject)

    async def _pump(self, sub: Subscription, handler: Callable[[bytes], None]) -> None:
        async for msg in sub:
            try:
                handler(msg.payload)
            except ProtocolError as exc:
                self.kv_events_malformed += 1
                self._count_event("malformed")
                now = time.monotonic()
                if now >= self._next_malformed_log:
                    self._next_malformed_log = now + 10.0
                    log.warning("kv router: dropping malformed message on %s (%d so far): %s",
                                msg.subject, self.kv_events_malformed, exc)
            except Exception:
                log.exception("kv router: handler failed on %s", msg.subject)
            self._notify()

    def _count_event(self, result: str) -> None:
        if self._events_metric is not None:
            self._events_metric.labels(result).inc()

    def _on_kv_event(self, payload: bytes) -> None:
        events, unknown = decode_kv_events(payload)
        self.kv_events_unknown += unknown
        for event in events:
            if event.worker_id in self._departed:
                self.events_ignored += 1
                self._count_event("ignored")
                continue
            self.indexer.apply(event)
            self.events_applied += 1
            self._count_event("applied")

    def _on_gap(self, key: WorkerKey, expected: int, got: int) -> None:
        """The indexer saw event ``got`` from ``key`` where ``expected`` was due: events were
        lost, so its entries may be stale. Drop them; ``got`` becomes the new baseline."""
        self.kv_event_gaps += 1
        if self._gaps_metric is not None:
            self._gaps_metric.inc()
        log.warning("kv router: KV event gap from worker %x rank %d (expected event %d, got "
                    "%d: %d lost); dropping its %d indexed blocks", key[0], key[1], expected,
                    got, got - expected, len(self.indexer.worker_blocks(key)))
        self.indexer.clear_worker(key)

    def _on_load(self, payload: bytes) -> None:
        snap = decode_load(payload)
        if snap.worker_id in self._departed:
            return
        if snap.kv_total_blocks is None and snap.worker_id in self._capacity:
            snap = msgspec.structs.replace(snap, kv_total_blocks=self._capacity[snap.worker_id])
        self._loads[(snap.worker_id, snap.dp_rank)] = snap
        for policy in self._policies.values():
            policy.update_load(snap)
