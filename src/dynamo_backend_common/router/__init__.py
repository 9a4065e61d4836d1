"""Request routing: the KV block indexer, the KV-aware router and the load-blind policies."""

from .indexer import GapCallback, KvIndexer, WorkerKey
from .kv_router import (
    KvRouter,
    KvRouterConfig,
    NoWorkersAvailable,
    RouteDecision,
    WorkerLoad,
    prompt_hashes,
)
from .policies import POLICY_NAMES, Random, RoundRobin, RoutingPolicy, make_policy

__all__ = [
    "POLICY_NAMES",
    "GapCallback",
    "KvIndexer",
    "KvRouter",
    "KvRouterConfig",
    "NoWorkersAvailable",
    "Random",
    "RoundRobin",
    "RouteDecision",
    "RoutingPolicy",
    "WorkerKey",
    "WorkerLoad",
    "make_policy",
    "prompt_hashes",
]
