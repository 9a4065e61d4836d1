"""Routing policies the frontend swaps by name: ``round_robin``, ``random`` and ``kv``.

All three satisfy :class:`RoutingPolicy`, so the frontend drives them the same way: membership
from discovery (``add_worker`` / ``remove_worker``), signals from the event plane
(``apply_event`` / ``update_load``, ignored by the load-blind policies), and per request
``select`` -> ``request_started`` -> ``prefill_done`` (first token) -> ``request_finished``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from ..protocols.kv import LoadSnapshot, RouterEvent
from .indexer import KvIndexer, WorkerKey
from .kv_router import KvRouter, KvRouterConfig, NoWorkersAvailable, RouteDecision

__all__ = ["POLICY_NAMES", "Random", "RoundRobin", "RoutingPolicy", "make_policy"]

POLICY_NAMES = ("round_robin", "random", "kv")


@runtime_checkable
class RoutingPolicy(Protocol):
    """What the frontend needs from a router. Implementations are not thread-safe."""

    @property
    def name(self) -> str:
        """The policy's name as given to :func:`make_policy`."""
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
        """Choose a worker among ``candidates`` (default: the added workers).

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


def make_policy(
    name: str,
    *,
    rng: random.Random | None = None,
    seed: int | None = None,
    indexer: KvIndexer | None = None,
    **kv_options: Any,
) -> RoutingPolicy:
    """Build the policy called ``name`` (``round_robin`` | ``random`` | ``kv``; ``-`` may stand
    for ``_``).

    ``rng`` or ``seed`` makes the random choices reproducible. For ``kv``, ``kv_options`` are
    :class:`KvRouterConfig` fields (``block_size`` is required) and ``indexer`` an existing
    index to share; the other policies accept ``block_size`` and ignore it (the frontend always
    knows it) but reject any other KV option.
    """
    key = name.strip().lower().replace("-", "_")
    if rng is None and seed is not None:
        rng = random.Random(seed)
    if key == "kv":
        if "block_size" not in kv_options:
            raise ValueError("the kv policy needs block_size")
        config = KvRouterConfig(**kv_options)
        return KvRouter(indexer if indexer is not None else KvIndexer(), config, rng)
    if key not in POLICY_NAMES:
        raise ValueError(f"unknown routing policy {name!r}; expected one of {POLICY_NAMES}")
    extra = set(kv_options) - {"block_size"}
    if extra or indexer is not None:
        raise TypeError(f"options {sorted(extra) or ['indexer']} only apply to the kv policy")
    if key == "round_robin":
        return RoundRobin()
    return Random(rng)
