"""Request routing: the KV block indexers, the KV-aware router and the other router modes."""

from .approx import ApproxKvIndexer
from .indexer import GapCallback, KvIndexer, WorkerKey
from .kv_router import (
    KvRouter,
    KvRouterConfig,
    NoWorkersAvailable,
    RouteDecision,
    WorkerLoad,
    prompt_hashes,
)
from .policies import (
    POLICY_NAMES,
    ROUTER_MODE_SPELLINGS,
    Direct,
    LeastLoaded,
    PowerOfTwo,
    Random,
    RoundRobin,
    RoutingPolicy,
    make_policy,
    normalize_router_mode,
)

__all__ = [
    "POLICY_NAMES",
    "ROUTER_MODE_SPELLINGS",
    "ApproxKvIndexer",
    "Direct",
    "GapCallback",
    "KvIndexer",
    "KvRouter",
    "KvRouterConfig",
    "LeastLoaded",
    "NoWorkersAvailable",
    "PowerOfTwo",
    "Random",
    "RoundRobin",
    "RouteDecision",
    "RoutingPolicy",
    "WorkerKey",
    "WorkerLoad",
    "make_policy",
    "normalize_router_mode",
    "prompt_hashes",
]
