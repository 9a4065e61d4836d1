"""Routing policies the frontend swaps by name: ``round_robin``, ``random``, ``power_of_two``,
``least_loaded``, ``kv`` and ``direct`` (NVIDIA Dynamo's router modes, see
:func:`normalize_router_mode` for the spellings accepted).

All of them satisfy :class:`RoutingPolicy`, so the frontend drives them the same way: membership
from discovery (``add_worker`` / ``remove_worker``), signals from the event plane
(``apply_event`` / ``update_load``, used by ``kv`` only), and per request
``select`` -> ``request_started`` -> ``prefill_done`` (first token) -> ``request_finished``.

The load-aware modes (``power_of_two``, ``least_loaded``) measure a worker's load as Dynamo's
``RoutingOccupancyState`` does: the requests this router sent there that have not finished
(counted from ``request_started`` to ``request_finished``). They need no event plane and ignore
the workers' published KV usage, so they work with any engine.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Final, Protocol, runtime_checkable

from ..protocols.kv import LoadSnapshot, RouterEvent
from .approx import ApproxKvIndexer
from .indexer import KvIndexer, WorkerKey
from .kv_router import KvRouter, KvRouterConfig, NoWorkersAvailable, RouteDecision

__all__ = [
    "POLICY_NAMES",
    "ROUTER_MODE_SPELLINGS",
    "Direct",
    "LeastLoaded",
    "PowerOfTwo",
    "Random",
    "RoundRobin",
    "RoutingPolicy",
    "make_policy",
    "normalize_router_mode",
]

#: The canonical policy names (what :attr:`RoutingPolicy.name` and the metrics say).
POLICY_NAMES: Final = ("round_robin", "random", "power_of_two", "least_loaded", "kv", "direct")

#: Every spelling :func:`normalize_router_mode` accepts, per canonical name: ours, Dynamo's
#: ``--router-mode`` values (``round-robin``, ``power-of-two``, ``least-loaded``, ...) and its
#: ``RouterMode`` serde names (``power_of_two_choices``). Case is ignored.
ROUTER_MODE_SPELLINGS: Final[dict[str, tuple[str, ...]]] = {
    "round_robin": ("round_robin", "round-robin"),
    "random": ("random",),
    "power_of_two": ("power_of_two", "power-of-two", "power_of_two_choices",
                     "power-of-two-choices"),
    "least_loaded": ("least_loaded", "least-loaded"),
    "kv": ("kv",),
    "direct": ("direct",),
}
_CANONICAL: Final = {s: name for name, ss in ROUTER_MODE_SPELLINGS.items() for s in ss}


def normalize_router_mode(mode: str) -> str:
    """The canonical name (one of :data:`POLICY_NAMES`) of router mode ``mode``.

    Accepts every spelling in :data:`ROUTER_MODE_SPELLINGS`, case-insensitively and with
    surrounding blanks ignored. Raises ``ValueError`` naming the accepted spellings otherwise
    (Dynamo's ``device-aware-weighted`` included: it has no equivalent here).
    """
    name = _CANONICAL.get(mode.strip().lower())
    if name is None:
        accepted = ", ".join(s for ss in ROUTER_MODE_SPELLINGS.values() for s in ss)
        raise ValueError(f"unknown router mode {mode!r}; expected one of: {accepted}")
    return name


@runtime_checkable
class RoutingPolicy(Protocol):
    """What the frontend needs from a router. Implementations are not thread-safe."""

    @property
    def name(self) -> str:
        """The policy's canonical name (one of :data:`POLICY_NAMES`)."""
        ...

    def add_worker(self, key: WorkerKey) -> None:
        """Make ``key`` a default candidate (idempotent)."""
        ...

    def remove_worker(self, key: WorkerKey) -> None:
        """Forget ``key`` and everything known about it (idempotent)."""
        ...

    def select(
        self, token_ids: Sequence[int], candidates: Sequence[WorkerKey] | None = None
    ) -> RouteDecision:
        """Choose a worker among ``candidates`` (default: the added workers), leaving the
        sequence unmodified (callers reuse it).

        Raises :class:`NoWorkersAvailable` when there is none.
        """
        ...

    def request_started(self, decision: RouteDecision) -> None:
        """The request was sent to ``decision.worker``."""
        ...

    def prefill_done(self, decision: RouteDecision) -> None:
        """The request produced its first token (its prompt is computed)."""
        ...

    def request_finished(self, decision: RouteDecision) -> None:
        """The request ended (success, error or cancellation)."""
        ...

    def update_load(self, snapshot: LoadSnapshot) -> None:
        """A worker's load snapshot arrived."""
        ...

    def apply_event(self, event: RouterEvent) -> None:
        """A worker's KV cache event arrived."""
        ...


class _LoadBlind:
    """Membership bookkeeping shared by the policies that ignore load and cache state."""

    name = ""

    def __init__(self) -> None:
        self._workers: dict[WorkerKey, None] = {}  # ordered set

    @property
    def workers(self) -> list[WorkerKey]:
        return list(self._workers)

    def add_worker(self, key: WorkerKey) -> None:
        self._workers[key] = None

    def remove_worker(self, key: WorkerKey) -> None:
        self._workers.pop(key, None)

    def _candidates(self, candidates: Sequence[WorkerKey] | None) -> Sequence[WorkerKey]:
        cands = candidates if candidates is not None else list(self._workers)
        if not cands:
            raise NoWorkersAvailable("no worker to route to")
        return cands

    def request_started(self, decision: RouteDecision) -> None:
        pass

    def prefill_done(self, decision: RouteDecision) -> None:
        pass

    def request_finished(self, decision: RouteDecision) -> None:
        pass

    def update_load(self, snapshot: LoadSnapshot) -> None:
        pass

    def apply_event(self, event: RouterEvent) -> None:
        pass


class RoundRobin(_LoadBlind):
    """Cycles through the candidates. With a fixed candidate list every worker gets every
    ``len(candidates)``-th request; when the list changes the cycle continues at the same count.
    """

    name = "round_robin"

    def __init__(self) -> None:
        super().__init__()
        self._next = 0

    def select(
        self, token_ids: Sequence[int], candidates: Sequence[WorkerKey] | None = None
    ) -> RouteDecision:
        cands = self._candidates(candidates)
        worker = cands[self._next % len(cands)]
        self._next += 1
        return RouteDecision(worker=worker)


class Random(_LoadBlind):
    """Picks a candidate uniformly at random (seedable through ``rng``)."""

    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__()
        self._rng = rng if rng is not None else random.Random()

    def select(
        self, token_ids: Sequence[int], candidates: Sequence[WorkerKey] | None = None
    ) -> RouteDecision:
        return RouteDecision(worker=self._rng.choice(self._candidates(candidates)))


class Direct(RoundRobin):
    """The client names the worker: the caller passes the target's routing keys (one, or a
    worker's data-parallel ranks when the client named no rank) as ``candidates`` and they are
    taken in turn.

    Without ``candidates`` it raises :class:`NoWorkersAvailable` rather than falling back to the
    added workers: a request that named no target must fail, never go anywhere.
    """

    name = "direct"

    def select(
        self, token_ids: Sequence[int], candidates: Sequence[WorkerKey] | None = None
    ) -> RouteDecision:
        if candidates is None:
            raise NoWorkersAvailable("direct routing needs the target worker of the request")
        return super().select(token_ids, candidates)


class _InflightCounting(_LoadBlind):
    """Counts, per worker, the requests started and not yet finished (Dynamo's occupancy).

    ``inflight`` may be shared by several policies (one per model) so a worker's count covers
    every request this router sent it. Each decision counts once however often
    ``request_started`` / ``request_finished`` are called for it; a count never goes below 0.
    """

    def __init__(self, inflight: dict[WorkerKey, int] | None = None) -> None:
        super().__init__()
        #: worker -> requests in flight there (absent = 0).
        self.inflight: dict[WorkerKey, int] = inflight if inflight is not None else {}
        self._open: dict[int, WorkerKey] = {}  # ticket -> worker, until the request ends

    def load(self, key: WorkerKey) -> int:
        """Requests in flight on ``key`` as this router counts them."""
        return self.inflight.get(key, 0)

    def remove_worker(self, key: WorkerKey) -> None:
        super().remove_worker(key)
        self.inflight.pop(key, None)
        for ticket in [t for t, k in self._open.items() if k == key]:
            del self._open[ticket]

    def request_started(self, decision: RouteDecision) -> None:
        ticket = decision.ticket
        if ticket in self._open:
            return
        key = decision.worker
        self._open[ticket] = key
        self.inflight[key] = self.inflight.get(key, 0) + 1

    def request_finished(self, decision: RouteDecision) -> None:
        key = self._open.pop(decision.ticket, None)
        if key is None:
            return
        n = self.inflight.get(key, 0)
        if n > 1:
            self.inflight[key] = n - 1
        else:
            self.inflight.pop(key, None)


class PowerOfTwo(_InflightCounting):
    """Dynamo's ``power-of-two`` (``PowerOfTwoChoices``): sample two *distinct* candidates
    uniformly at random and take the one with fewer requests in flight, the first sampled on a
    tie. One candidate is taken as is.

    So the most loaded of three or more candidates is never chosen while another is strictly
    less loaded (any pair holds a less loaded one), and an idle worker beats a busy one whenever
    it is sampled. ``decision.logits`` holds the two sampled candidates' loads. Seedable
    through ``rng``.
    """

    name = "power_of_two"

    def __init__(
        self, rng: random.Random | None = None, inflight: dict[WorkerKey, int] | None = None
    ) -> None:
        super().__init__(inflight)
        self._rng = rng if rng is not None else random.Random()

    def select(
        self, token_ids: Sequence[int], candidates: Sequence[WorkerKey] | None = None
    ) -> RouteDecision:
        cands = self._candidates(candidates)
        n = len(cands)
        if n == 1:
            return RouteDecision(worker=cands[0])
        rand = self._rng.random
        i = int(rand() * n)
        j = (i + 1 + int(rand() * (n - 1))) % n  # any index but i, uniformly
        a, b = cands[i], cands[j]
        get = self.inflight.get
        la, lb = get(a, 0), get(b, 0)
        loads: dict[WorkerKey, float] = {a: la, b: lb}
        return RouteDecision(worker=a if la <= lb else b, logits=loads)


class LeastLoaded(_InflightCounting):
    """Dynamo's ``least-loaded``: the candidate with the fewest requests in flight.

    Ties go round robin: the scan starts just after the position chosen last time and keeps the
    first minimum it meets, so equally loaded workers take turns (a sequential client does not
    pin the first worker) and the choice is deterministic for a given call sequence.
    ``decision.logits`` holds every candidate's load.
    """

    name = "least_loaded"

    def __init__(self, inflight: dict[WorkerKey, int] | None = None) -> None:
        super().__init__(inflight)
        self._next = 0

    def select(
        self, token_ids: Sequence[int], candidates: Sequence[WorkerKey] | None = None
    ) -> RouteDecision:
        cands = self._candidates(candidates)
        n = len(cands)
        start = self._next % n
        get = self.inflight.get
        best_at = start
        best = cands[start]
        best_load = get(best, 0)
        loads: dict[WorkerKey, float] = {best: best_load}
        for idx in range(start + 1, start + n):
            key = cands[idx % n]
            load = get(key, 0)
            loads[key] = load
            if load < best_load:
                best_at, best, best_load = idx, key, load
        self._next = best_at + 1  # the next scan starts just after the chosen one
        return RouteDecision(worker=best, logits=loads)


def make_policy(
    name: str,
    *,
    rng: random.Random | None = None,
    seed: int | None = None,
    indexer: KvIndexer | None = None,
    inflight: dict[WorkerKey, int] | None = None,
    **kv_options: Any,
) -> RoutingPolicy:
    """Build the policy for router mode ``name`` (any spelling of
    :func:`normalize_router_mode`).

    ``rng`` or ``seed`` makes the random choices reproducible. ``inflight`` is a per-worker
    in-flight count to share between ``power_of_two`` / ``least_loaded`` policies. For ``kv``,
    ``kv_options`` are :class:`KvRouterConfig` fields (``block_size`` is required) and
    ``indexer`` an existing index to share; with ``use_kv_events=False`` the policy gets its own
    :class:`ApproxKvIndexer` instead (an ``indexer`` is then an error). The other policies accept
    ``block_size`` and ignore it (the frontend always knows it) but reject any other KV option.
    """
    try:
        key = normalize_router_mode(name)
    except ValueError as exc:
        raise ValueError(f"unknown routing policy {name!r}: {exc}") from None
    if rng is None and seed is not None:
        rng = random.Random(seed)
    if key == "kv":
        if "block_size" not in kv_options:
            raise ValueError("the kv policy needs block_size")
        config = KvRouterConfig(**kv_options)
        if not config.use_kv_events:
            if indexer is not None:
                raise TypeError("use_kv_events=False builds its own ApproxKvIndexer; "
                                "pass no indexer")
            indexer = ApproxKvIndexer(
                config.router_ttl_secs, max_blocks=config.router_max_tree_size,
                prune_target_ratio=config.router_prune_target_ratio)
        return KvRouter(indexer if indexer is not None else KvIndexer(), config, rng)
    extra = set(kv_options) - {"block_size"}
    if extra or indexer is not None:
        raise TypeError(f"options {sorted(extra) or ['indexer']} only apply to the kv policy")
    if key == "round_robin":
        return RoundRobin()
    if key == "random":
        return Random(rng)
    if key == "power_of_two":
        return PowerOfTwo(rng, inflight)
    if key == "least_loaded":
        return LeastLoaded(inflight)
    return Direct()
