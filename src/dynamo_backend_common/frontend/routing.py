"""Chooses the worker (and data-parallel rank) for each request of each model.

One :class:`Router` serves a frontend. It keeps one routing policy per model
(``round_robin`` | ``random`` | ``kv``, see :mod:`dynamo_backend_common.router`), fed by the
:class:`ModelManager` (workers joining and leaving) and, in ``kv`` mode, by the event plane
(KV events and load snapshots of every worker). A worker with ``data_parallel_size`` N is N
routing targets ``(instance_id, rank)``; the chosen rank travels in ``request.routing.dp_rank``.

Per request the :class:`EngineClient` calls :meth:`Router.route` then, once the attempt ends,
:meth:`Router.finished` with what ``route`` returned; ``kv`` mode counts the request's blocks
against its worker in between.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter as Tally
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from ..errors import ProtocolError
from ..protocols.codec import from_msgpack
from ..protocols.kv import LoadSnapshot, RouterEvent
from ..router import KvIndexer, RouteDecision, RoutingPolicy, make_policy
from ..router.policies import POLICY_NAMES
from ..runtime.events import EventPlane, Subscription, kv_events_subject, kv_metrics_subject
from .model_manager import ModelEntry, ModelManager, WorkerEntry

log = logging.getLogger("dynamo_backend_common.frontend")

__all__ = ["ROUTER_MODES", "Routed", "Router"]

ROUTER_MODES = POLICY_NAMES


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
        self._rng = random.Random(seed)
        self.indexer = KvIndexer()
        self._policies: dict[str, RoutingPolicy] = {}
        self._subscriptions: dict[str, Subscription] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._loads: dict[tuple[int, int], LoadSnapshot] = {}
        #: KV events applied to the index so far (``kv`` mode).
        self.events_applied = 0
        self._events_changed = asyncio.Condition()
        #: Requests routed per ``(model, instance_id)`` since start.
        self.decisions: Tally[tuple[str, int]] = Tally()
        self._decisions: Counter | None = None
        self._overlap: Histogram | None = None
        if registry is not None:
            self._decisions = Counter(
                "dynamo_frontend_router_decisions", "Routing decisions per worker",
                ["model", "policy", "worker_id", "dp_rank"], registry=registry)
            self._overlap = Histogram(
                "dynamo_frontend_router_overlap_ratio",
                "Share of the prompt's KV blocks already cached on the chosen worker (kv mode)",
                ["model"], buckets=(0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0), registry=registry)
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
            self._decisions.labels(model, policy.name, f"{worker_id:x}", str(rank)).inc()
        if self._overlap is not None and decision.prompt_blocks:
            self._overlap.labels(model).observe(decision.overlap_blocks / decision.prompt_blocks)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("route %s -> worker %x rank %d (%s, overlap %d/%d blocks)", model,
                      worker_id, rank, policy.name, decision.overlap_blocks,
                      decision.prompt_blocks)
        return Routed(by_key[decision.worker], rank, decision, policy)

    async def wait_for_events(self, count: int, timeout: float) -> None:
        """Wait until at least ``count`` KV events were applied (tests, warm-up)."""
        async with self._events_changed:
            await asyncio.wait_for(
                self._events_changed.wait_for(lambda: self.events_applied >= count), timeout)

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
            if entry is None:
                return
            policy = self._policy(model, entry)
            for key in _worker_keys(worker):
                policy.add_worker(key)
            if self.mode == "kv":
                self._subscribe(worker.card.namespace, worker.card.component)
            return
        current = self._policies.get(model)
        for key in _worker_keys(worker):
            if current is not None:
                current.remove_worker(key)
            self.indexer.remove_worker(*key)
            self._loads.pop(key, None)
        if entry is None:
            self._policies.pop(model, None)

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
                log.warning("kv router: dropping malformed message on %s: %s", msg.subject, exc)
            except Exception:
                log.exception("kv router: handler failed on %s", msg.subject)
            if handler == self._on_kv_event:
                async with self._events_changed:
                    self._events_changed.notify_all()

    def _on_kv_event(self, payload: bytes) -> None:
        event = from_msgpack(payload, RouterEvent)
        self.indexer.apply(event)
        self.events_applied += 1

    def _on_load(self, payload: bytes) -> None:
        snap = from_msgpack(payload, LoadSnapshot)
        self._loads[(snap.worker_id, snap.dp_rank)] = snap
        for policy in self._policies.values():
            policy.update_load(snap)
