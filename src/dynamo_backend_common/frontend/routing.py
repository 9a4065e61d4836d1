"""Chooses the worker (and data-parallel rank) for each request of each model.

One :class:`Router` serves a frontend. It keeps one routing policy per model (the modes of
NVIDIA Dynamo: ``round_robin`` | ``random`` | ``power_of_two`` | ``least_loaded`` | ``kv`` |
``direct``, see :mod:`dynamo_backend_common.router`), fed by the :class:`ModelManager` (workers
joining and leaving) and, in ``kv`` mode with KV events, by the event plane (KV events and load
snapshots of every worker). A worker with ``data_parallel_size`` N is N routing targets
``(instance_id, rank)``; the chosen rank travels in ``request.routing.dp_rank``.

Per request the :class:`EngineClient` calls :meth:`Router.route`, :meth:`Router.first_token`
when the first token arrives, then, once the attempt ends, :meth:`Router.finished` with what
``route`` returned; ``kv`` mode counts the request's prefill and blocks against its worker in
between, ``power_of_two`` and ``least_loaded`` count it as one request in flight there.

Direct routing (Dynamo's ``--router-mode direct``): the client names the worker, as Dynamo's
HTTP frontend lets it, with the headers ``x-worker-instance-id: ID`` (decimal as Dynamo writes
it, or ``0x`` + the hex id ``GET /health`` lists) and optionally ``x-dp-rank: R`` (alias
``x-data-parallel-rank``). :class:`DirectRoutingMiddleware` turns those headers into the
request's :class:`RouteTarget` (a context variable, so it reaches :meth:`Router.route` through
the engine client untouched); code can set one with :func:`route_to` or pass
``route(..., target=...)``. In ``direct`` mode a request without a target, or naming a worker
that does not serve its model or a rank that worker does not have, fails with
:class:`DirectRoutingError` (HTTP 400); a target that was already tried (it refused the request,
or its stream broke) fails with ``LookupError`` (the engine client's 503): never another
worker. ``kv`` mode honours a target too (the request goes there, its overlap and load are
counted, as Dynamo's KV router does with ``backend_instance_id``); the other modes ignore it.
Without a rank the mode's rule picks among the worker's ranks (``direct``: in turn).

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

KV routing without KV events (``kv_events=False``, Dynamo's ``--no-kv-events``): no event plane
is used; each model's KV policy predicts the caches from its own decisions
(:class:`~dynamo_backend_common.router.ApproxKvIndexer`, ``router_ttl_secs``).

Router replicas (several frontends, or frontend processes, routing to the same workers): a
:class:`RouteListener` set with :meth:`Router.set_listener` hears every decision of the modes
that count load (:data:`LOAD_TRACKING_MODES`: ``kv``, ``power_of_two``, ``least_loaded``), its
first token and its end, so it can tell the other replicas; :meth:`Router.remote_started`,
:meth:`Router.remote_prefill_done` and :meth:`Router.remote_finished` put the other replicas'
requests into this router's load view (never into its metrics or :attr:`Router.decisions`).
See :mod:`.replica_sync`.

Messages are NVIDIA Dynamo 1.6.1's (``protocols.kv``): a ``kv-events`` message is a list of
RouterEvent, a ``kv_metrics`` message one ActiveLoad, so Dynamo's workers (the mocker, vLLM
through Dynamo) are routed like ours. A load without ``kv_total_blocks`` (Dynamo's never has
one) takes the capacity from the worker's card (``runtime_config.total_kv_blocks``, per rank).
Malformed messages are dropped, counted (``kv_events_malformed``, the ``malformed`` result of
the events metric) and logged at most once per 10 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter as Tally
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final, Protocol

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import BackendError, DynamoError, ProtocolError
from ..protocols.kv import LoadSnapshot, decode_kv_events, decode_load
from ..router import (
    POLICY_NAMES,
    ROUTER_MODE_SPELLINGS,
    KvIndexer,
    KvRouterConfig,
    RouteDecision,
    RoutingPolicy,
    WorkerKey,
    make_policy,
    normalize_router_mode,
)
from ..runtime.events import EventPlane, Subscription, kv_events_subject, kv_metrics_subject
from ..runtime.tasks import cancel_and_wait
from .model_manager import ModelEntry, WorkerEntry, WorkerPool
from .openai_types import RequestError

log = logging.getLogger("dynamo_backend_common.frontend")

__all__ = [
    "DEPARTED_MEMORY",
    "HEADER_DP_RANK",
    "HEADER_DP_RANK_ALIAS",
    "HEADER_WORKER_INSTANCE_ID",
    "LOAD_TRACKING_MODES",
    "ROUTER_MODES",
    "ROUTER_MODE_SPELLINGS",
    "DirectRoutingError",
    "DirectRoutingMiddleware",
    "RemoteRoute",
    "RouteListener",
    "RouteTarget",
    "Routed",
    "Router",
    "current_target",
    "normalize_router_mode",
    "parse_target",
    "route_to",
]

#: The canonical router modes (:func:`normalize_router_mode` maps Dynamo's spellings to them).
ROUTER_MODES = POLICY_NAMES

#: Dynamo's request headers for direct routing (``lib/llm/src/protocols/openai/nvext.rs``).
HEADER_WORKER_INSTANCE_ID: Final = "x-worker-instance-id"
HEADER_DP_RANK: Final = "x-dp-rank"
HEADER_DP_RANK_ALIAS: Final = "x-data-parallel-rank"

#: Modes in which a request's :class:`RouteTarget` decides the worker.
_TARGETED_MODES: Final = frozenset({"direct", "kv"})

#: How many departed worker ids a :class:`Router` remembers to ignore their late events.
DEPARTED_MEMORY = 4096

#: Policies whose choice depends on the requests in flight (what router replicas share).
LOAD_TRACKING_MODES: Final = frozenset({"kv", "power_of_two", "least_loaded"})


class DirectRoutingError(DynamoError):
    """A request's direct-routing target is missing or names no worker (rank) of its model.

    Kind ``InvalidArgument``: the frontend answers HTTP 400 with the message, and it is never
    retried on another worker. ``header`` names the request header at fault, if one is.
    """

    def __init__(self, message: str, header: str | None = None) -> None:
        super().__init__(BackendError.InvalidArgument, message)
        self.header = header


@dataclass(frozen=True, slots=True)
class RouteTarget:
    """The worker a client named: ``instance_id`` and, optionally, its data-parallel rank."""

    instance_id: int
    dp_rank: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.instance_id < 2**64:
            raise DirectRoutingError(f"worker instance id {self.instance_id} is not a u64",
                                     HEADER_WORKER_INSTANCE_ID)
        if self.dp_rank is not None and not 0 <= self.dp_rank < 2**32:
            raise DirectRoutingError(f"dp rank {self.dp_rank} is not a u32", HEADER_DP_RANK)


_TARGET: ContextVar[RouteTarget | None] = ContextVar("dynamo_route_target", default=None)


def current_target() -> RouteTarget | None:
    """The :class:`RouteTarget` of the request being handled in this context, if any."""
    return _TARGET.get()


@contextlib.contextmanager
def route_to(instance_id: int, dp_rank: int | None = None) -> Iterator[RouteTarget]:
    """Within the block, requests routed from this context (and tasks it starts) target worker
    ``instance_id`` (rank ``dp_rank``) in ``direct`` and ``kv`` modes."""
    target = RouteTarget(instance_id, dp_rank)
    token = _TARGET.set(target)
    try:
        yield target
    finally:
        _TARGET.reset(token)


def _parse_int(value: str, what: str, header: str) -> int:
    text = value.strip()
    try:
        return int(text[2:], 16) if text[:2].lower() == "0x" else int(text, 10)
    except ValueError:
        raise DirectRoutingError(
            f"header {header}: {value[:64]!r} is not a {what} (decimal, or 0x + hex)",
            header) from None


def parse_target(instance_id: str | None, dp_rank: str | None = None) -> RouteTarget | None:
    """The :class:`RouteTarget` of the header values ``x-worker-instance-id`` and ``x-dp-rank``
    (``None`` when neither is given). Raises :class:`DirectRoutingError` for a value that is not
    a number in range, or a rank without an instance id."""
    if instance_id is None:
        if dp_rank is not None:
            raise DirectRoutingError(
                f"header {HEADER_DP_RANK} needs {HEADER_WORKER_INSTANCE_ID} (the worker whose "
                "rank it names)", HEADER_WORKER_INSTANCE_ID)
        return None
    iid = _parse_int(instance_id, "worker instance id", HEADER_WORKER_INSTANCE_ID)
    rank = None if dp_rank is None else _parse_int(dp_rank, "dp rank", HEADER_DP_RANK)
    return RouteTarget(iid, rank)


_encode_json = msgspec.json.Encoder().encode
_HEADER_NAMES: Final = {HEADER_WORKER_INSTANCE_ID.encode(): 0, HEADER_DP_RANK.encode(): 1,
                        HEADER_DP_RANK_ALIAS.encode(): 1}


class DirectRoutingMiddleware:
    """ASGI middleware: the direct-routing headers of an HTTP request become its
    :class:`RouteTarget` for as long as ``app`` handles it.

    ``x-worker-instance-id`` (Dynamo's header; a decimal u64 or ``0x`` + hex) and ``x-dp-rank``
    / ``x-data-parallel-rank`` (a u32). A malformed value is answered at once with an OpenAI
    error body, status 400, code ``invalid_value``, ``param`` the header. Requests without the
    headers pass through untouched (one scan of the header list).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        values: list[str | None] = [None, None]
        for name, value in scope["headers"]:
            slot = _HEADER_NAMES.get(name)
            if slot is not None:
                values[slot] = value.decode("latin-1")
        if values[0] is None and values[1] is None:
            await self.app(scope, receive, send)
            return
        try:
            target = parse_target(values[0], values[1])
        except DirectRoutingError as exc:
            body = _encode_json(RequestError(exc.message, code="invalid_value",
                                             param=exc.header).to_response())
            await send({"type": "http.response.start", "status": 400, "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        token = _TARGET.set(target)
        try:
            await self.app(scope, receive, send)
        finally:
            _TARGET.reset(token)


@dataclass(eq=False, slots=True)
class Routed:
    """One routing decision: the worker, the rank, and the policy's reasoning.

    ``shared``: the router's :class:`RouteListener` was told of it (and hears its first token
    and its end).
    """

    worker: WorkerEntry
    dp_rank: int
    decision: RouteDecision
    policy: RoutingPolicy
    shared: bool = False


class RouteListener(Protocol):
    """Hears a :class:`Router`'s decisions in the modes of :data:`LOAD_TRACKING_MODES`.

    Called on the event loop, synchronously inside ``route`` / ``first_token`` / ``finished``:
    implementations must be quick and must not raise. ``finished`` may come without
    ``prefill_done`` (an attempt that failed before its first token) and may be called more
    than once for one decision (only the first counts).
    """

    def routed(self, model: str, routed: Routed) -> None:
        """``routed`` was just sent to its worker (its load counts there from now on)."""
        ...

    def prefill_done(self, routed: Routed) -> None:
        """``routed`` produced its first token."""
        ...

    def finished(self, routed: Routed) -> None:
        """``routed`` ended, whatever the outcome."""
        ...


@dataclass(eq=False, slots=True)
class RemoteRoute:
    """Another router replica's request, counted in this router's load view
    (:meth:`Router.remote_started`)."""

    model: str
    policy: RoutingPolicy
    decision: RouteDecision


def _worker_keys(worker: WorkerEntry) -> list[tuple[int, int]]:
    rc = worker.card.runtime_config
    start = rc.data_parallel_start_rank
    return [(worker.instance_id, start + r) for r in range(max(1, rc.data_parallel_size))]


class Router:
    """Routes the requests of every model a :class:`ModelManager` (or another
    :class:`~.model_manager.WorkerPool`, such as its prefill pool) knows (see module doc).

    ``mode`` is any spelling :func:`normalize_router_mode` accepts (default ``round_robin``);
    :attr:`mode` holds its canonical name. In ``kv`` mode with ``kv_events`` (the default)
    ``events`` is the event plane the workers publish on; with ``kv_events=False`` no event plane
    is used and the caches are predicted from the routing decisions, each routed prompt's blocks
    kept ``router_ttl_secs``. A model whose card has no ``kv_cache_block_size`` is routed
    round-robin in ``kv`` mode (with a warning), since its prompts cannot be hashed into blocks.
    ``overlap_weight``, ``temperature`` and ``busy_threshold`` tune the KV cost
    (see :class:`~dynamo_backend_common.router.KvRouterConfig`). ``power_of_two`` and
    ``least_loaded`` count each worker rank's requests in flight across all models
    (:meth:`inflight`). With ``targeted=False`` the worker a request names is ignored (and
    ``direct`` mode needs a caller that always passes ``target``).
    """

    def __init__(
        self,
        models: WorkerPool,
        mode: str = "round_robin",
        *,
        events: EventPlane | None = None,
        overlap_weight: float = 1.0,
        temperature: float = 0.0,
        busy_threshold: float | None = None,
        kv_events: bool = True,
        router_ttl_secs: float = 120.0,
        seed: int | None = None,
        registry: CollectorRegistry | None = None,
        targeted: bool = True,
    ) -> None:
        key = normalize_router_mode(mode)
        if key == "kv" and kv_events and events is None:
            raise ValueError("router mode kv needs the event plane workers publish on "
                             "(or kv_events=False to predict the caches without events)")
        self.mode = key
        self.kv_events = kv_events
        self._models = models
        self._events = events
        self._kv_options: dict[str, Any] = {
            "overlap_score_weight": overlap_weight, "temperature": temperature,
            "busy_threshold": busy_threshold, "use_kv_events": kv_events,
            "router_ttl_secs": router_ttl_secs}
        KvRouterConfig(block_size=1, **self._kv_options)  # bad options fail here, not later
        self._rng = random.Random(seed)
        self.indexer = KvIndexer(on_gap=self._on_gap)
        # ``targeted=False``: a request's named worker (a header) is not for this router (the
        # prefill router: the header names the decode worker).
        self._targeted = targeted and key in _TARGETED_MODES
        self._inflight: dict[WorkerKey, int] = {}  # power_of_two / least_loaded, all models
        # model -> (entry, its worker count, routing key -> worker, the keys): the candidates
        # of a request that excludes no worker, rebuilt when a worker joins or leaves.
        self._candidates: dict[
            str, tuple[ModelEntry, int, dict[WorkerKey, WorkerEntry], list[WorkerKey]]] = {}
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
        self._listener: RouteListener | None = None
        self._decisions: Counter | None = None
        self._children: dict[tuple[str, str, int, int], tuple[Any, Any, Any, Any]] = {}
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
        tasks, self._tasks = self._tasks, []
        await cancel_and_wait(tasks)
        for sub in self._subscriptions.values():
            await sub.close()
        self._subscriptions.clear()

    # -- per request ------------------------------------------------------------------------
    def route(
        self, model: str, entry: ModelEntry, token_ids: Sequence[int], exclude: set[int],
        *, target: RouteTarget | None = None,
    ) -> Routed:
        """Choose a worker of ``entry`` not in ``exclude`` (instance ids) for ``token_ids``.

        In ``direct`` and ``kv`` modes ``target`` (default: :func:`current_target`) names the
        worker; see the module doc for what happens when it names none or a wrong one
        (:class:`DirectRoutingError`). Raises ``LookupError`` when no candidate is left. The
        caller must pass the result to :meth:`finished` when the attempt ends, whatever the
        outcome.
        """
        if self._targeted:
            if target is None:
                target = _TARGET.get()
            if target is not None:
                return self._route_to(model, entry, token_ids, exclude, target)
            if self.mode == "direct":
                raise DirectRoutingError(
                    f"router mode direct: the request names no worker; send the header "
                    f"{HEADER_WORKER_INSTANCE_ID}: <instance id> (GET /health lists them)",
                    HEADER_WORKER_INSTANCE_ID)
        cached = self._candidates.get(model)
        if (cached is not None and not exclude and cached[0] is entry
                and cached[1] == len(entry.workers)):
            by_key, keys = cached[2], cached[3]
        else:
            by_key = {}
            for iid, worker in entry.workers.items():
                if iid not in exclude:
                    for key in _worker_keys(worker):
                        by_key[key] = worker
            if not by_key:
                raise LookupError(f"no worker left for model {model!r}")
            keys = list(by_key)
            if not exclude:
                self._candidates[model] = (entry, len(entry.workers), by_key, keys)
        policy = self._policy(model, entry)
        decision = policy.select(token_ids, keys)
        policy.request_started(decision)
        return self._record(model, policy, decision, by_key[decision.worker])

    def _route_to(
        self, model: str, entry: ModelEntry, token_ids: Sequence[int], exclude: set[int],
        target: RouteTarget,
    ) -> Routed:
        iid = target.instance_id
        worker = entry.workers.get(iid)
        if worker is None:
            known = ", ".join(f"{i:#x}" for i in entry.workers) or "none"
            raise DirectRoutingError(
                f"worker {iid:#x} ({iid}) does not serve model {model!r} (its workers: "
                f"{known})", HEADER_WORKER_INSTANCE_ID)
        if iid in exclude:
            raise LookupError(f"worker {iid:#x}, the request's target, was already tried")
        keys = _worker_keys(worker)
        if target.dp_rank is not None:
            key = (iid, target.dp_rank)
            if key not in keys:
                raise DirectRoutingError(
                    f"worker {iid:#x} has no data-parallel rank {target.dp_rank} (its ranks: "
                    f"{', '.join(str(k[1]) for k in keys)})", HEADER_DP_RANK)
            keys = [key]
        policy = self._policy(model, entry)
        decision = policy.select(token_ids, keys)
        policy.request_started(decision)
        return self._record(model, policy, decision, worker)

    def _record(
        self, model: str, policy: RoutingPolicy, decision: RouteDecision, worker: WorkerEntry
    ) -> Routed:
        """Count, log and wrap a decision that was just started."""
        worker_id, rank = decision.worker
        self.decisions[(model, worker_id)] += 1
        if self._decisions is not None:
            # The labelled children, looked up once per (model, policy, worker rank): ``labels``
            # costs more than the increments it leads to.
            key = (model, policy.name, worker_id, rank)
            children = self._children.get(key)
            if children is None:
                assert self._overlap is not None and self._overlap_blocks is not None
                assert self._prompt_blocks is not None
                wid, rk = f"{worker_id:x}", str(rank)
                children = self._children[key] = (
                    self._decisions.labels(model, policy.name, wid, rk),
                    self._overlap.labels(model), self._overlap_blocks.labels(model, wid, rk),
                    self._prompt_blocks.labels(model, wid, rk))
            children[0].inc()
            if decision.prompt_blocks:
                children[1].observe(decision.overlap_blocks / decision.prompt_blocks)
                children[2].inc(decision.overlap_blocks)
                children[3].inc(decision.prompt_blocks)
        if log.isEnabledFor(logging.DEBUG):
            costs = ", ".join(f"{k[0]:x}/{k[1]}={v:g}" for k, v in decision.logits.items())
            log.debug("route %s -> worker %x rank %d (%s, overlap %d/%d blocks%s)", model,
                      worker_id, rank, policy.name, decision.overlap_blocks,
                      decision.prompt_blocks, f"; costs {costs}" if costs else "")
        routed = Routed(worker, rank, decision, policy)
        self.last = routed
        listener = self._listener
        if listener is not None and policy.name in LOAD_TRACKING_MODES:
            routed.shared = True
            listener.routed(model, routed)
        return routed

    def set_listener(self, listener: RouteListener | None) -> None:
        """Tell ``listener`` of every later decision in a load-tracking mode (``None``: stop).
        One listener at a time; decisions made before keep going to the one they went to."""
        self._listener = listener

    def remote_started(
        self, model: str, worker: WorkerKey, *, prompt_blocks: int = 0, overlap_blocks: int = 0,
        request_blocks: int = 0, block_hashes: Sequence[int] = (),
    ) -> RemoteRoute | None:
        """Count another replica's request on worker rank ``worker`` of ``model`` as if this
        router had sent it (load, queued prefill, active blocks; without KV events also the
        predicted cache), without counting it in metrics or :attr:`decisions`.

        Returns the handle for :meth:`remote_prefill_done` / :meth:`remote_finished`, or
        ``None`` (nothing counted) when this router does not know the model or the worker (not
        yet or no longer in discovery) or routes the model in a mode that counts no load.
        Inconsistent block counts are clamped (``overlap <= prompt == len(block_hashes) <=
        request``), so a malformed message cannot corrupt the load view.
        """
        entry = self._models.models.get(model)
        if entry is None or worker[0] not in entry.workers or worker[0] in self._departed:
            return None
        if worker not in _worker_keys(entry.workers[worker[0]]):
            return None
        policy = self._policy(model, entry)
        if policy.name not in LOAD_TRACKING_MODES:
            return None
        hashes = list(block_hashes) if policy.name == "kv" else []
        prompt = len(hashes) if hashes else max(0, prompt_blocks)
        decision = RouteDecision(
            worker=worker, overlap_blocks=min(max(0, overlap_blocks), prompt),
            prompt_blocks=prompt, request_blocks=max(request_blocks, len(hashes)),
            block_hashes=hashes)
        policy.request_started(decision)
        self._notify()
        return RemoteRoute(model, policy, decision)

    def notify_waiters(self) -> None:
        """Wake every :meth:`wait_for` to re-check its predicate (a listener's own state,
        such as its replicas, changed)."""
        self._notify()

    def remote_prefill_done(self, remote: RemoteRoute) -> None:
        """The remote request produced its first token (idempotent)."""
        remote.policy.prefill_done(remote.decision)
        self._notify()

    def remote_finished(self, remote: RemoteRoute) -> None:
        """The remote request ended, or its replica is gone (idempotent)."""
        remote.policy.request_finished(remote.decision)
        self._notify()

    def worker_ranks(self) -> int:
        """Routing targets (worker ranks) of every model, as this router sees them now."""
        return sum(len(_worker_keys(w)) for e in self._models.models.values()
                   for w in e.workers.values())

    def inflight(self, key: WorkerKey) -> int:
        """Requests in flight on worker rank ``key`` as ``power_of_two`` / ``least_loaded``
        count them (0 in the other modes)."""
        return self._inflight.get(key, 0)

    def load(self, key: WorkerKey) -> LoadSnapshot | None:
        """The latest load snapshot of worker rank ``key`` (``kv`` mode), if any."""
        return self._loads.get(key)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait until ``predicate()`` holds, re-checked after every KV event, load snapshot,
        worker change and replica-sync change (tests, warm-up). Raises ``TimeoutError``
        after ``timeout`` s."""
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
        if routed.shared and self._listener is not None:
            self._listener.prefill_done(routed)

    def finished(self, routed: Routed) -> None:
        """The attempt ``routed`` ended (success, error or cancellation)."""
        routed.policy.request_finished(routed.decision)
        if routed.shared and self._listener is not None:
            self._listener.finished(routed)

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
            # Without events each model's policy predicts into an index of its own.
            policy = make_policy("kv", rng=self._rng,
                                 indexer=self.indexer if self.kv_events else None,
                                 block_size=block_size, **self._kv_options)
            for snap in self._loads.values():
                policy.update_load(snap)
        elif mode in ("power_of_two", "least_loaded"):
            policy = make_policy(mode, rng=self._rng, inflight=self._inflight)
        else:
            policy = make_policy(mode, rng=self._rng)
        self._policies[model] = policy
        return policy

    def _on_worker(self, model: str, worker: WorkerEntry, added: bool) -> None:
        self._candidates.pop(model, None)
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
            if self.mode == "kv" and self.kv_events:
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
        if self.mode == "kv" and self.kv_events:
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
