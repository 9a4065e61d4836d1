"""KV-aware worker selection: prefix overlap from the :class:`KvIndexer` traded against load.

Cost model (the shape of Dynamo's KV router, ``docs/design-docs/router-design.md``), per
candidate worker ``w``, in blocks::

    prefill_blocks(w) = prompt_blocks - overlap_blocks(w)      # blocks w must compute
                        + queued_prefill_blocks(w)             # and must compute first
    decode_blocks(w)  = blocks in use on w (WorkerLoad.decode_blocks)
                        + request_blocks - active_prefix(w)    # the ones this request adds
    logit(w)          = overlap_score_weight * prefill_blocks(w) + decode_blocks(w)

Lower is better. ``overlap_blocks(w)`` is w's cached prefix of the prompt (from the indexer);
``queued_prefill_blocks(w)`` the prefill still to do for requests this router sent to w that
have not produced their first token (:meth:`KvRouter.prefill_done`; Dynamo's "active prefill
tokens"): without it, requests arriving together (a closed loop whose requests finished
together) would all pick the same least-loaded worker and queue behind each other's prefill.
``active_prefix(w)`` is the part of the prompt's blocks already in use on w by requests this
router has in flight there. Blocks in use are counted once however many requests share them (a
shared system prompt occupies its blocks once), as the workers' own ``kv_used_blocks`` does;
counting them per request would make a worker that serves many requests of one prefix look
loaded exactly because it shares, and push its prefix's next requests elsewhere.

Temperature 0 picks the minimum (ties broken at random, so equal workers share the traffic);
temperature ``T > 0`` samples from ``softmax(-normalised_logit / T)`` where logits are first
scaled to ``[0, 1]`` by their min and max, as Dynamo does, so ``T`` means the same for any
prompt length or load scale.

``overlap_score_weight = 0`` ignores the cache (pure least-loaded); larger values favour prefix
reuse (better TTFT) over spreading decode load (better ITL). With no KV events at all every
overlap is zero and the rule reduces to least-loaded.

``use_kv_events = False`` is Dynamo's approximate mode (``--no-kv-events``): the overlaps come
from an :class:`~.approx.ApproxKvIndexer` that :meth:`KvRouter.request_started` feeds with each
routed prompt's blocks (kept ``router_ttl_secs``) instead of from the workers' KV events.

Not thread-safe: use it from one thread (the event loop).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..kv.hashing import XXH3_SEED, block_hashes
from ..protocols.kv import LoadSnapshot, RouterEvent
from .approx import ApproxKvIndexer
from .indexer import KvIndexer, WorkerKey

__all__ = [
    "KvRouter",
    "KvRouterConfig",
    "NoWorkersAvailable",
    "RouteDecision",
    "WorkerLoad",
    "prompt_hashes",
]

_tickets = itertools.count(1)


class NoWorkersAvailable(LookupError):
    """``select`` had no candidate worker to choose from."""


@dataclass(frozen=True, slots=True, eq=False)
class RouteDecision:
    """Where a request goes and why.

    ``overlap_blocks`` is the chosen worker's cached prefix of the prompt and ``prompt_blocks``
    the prompt's full blocks (so ``overlap_blocks / prompt_blocks`` is the predicted hit rate).
    ``logits`` holds each candidate's cost (empty for policies that do not score). ``ticket``
    identifies the decision for :meth:`KvRouter.request_started` / ``request_finished``.
    Decisions compare and hash by identity, so they can key a caller's own tables.
    """

    worker: WorkerKey
    overlap_blocks: int = 0
    prompt_blocks: int = 0
    logits: dict[WorkerKey, float] = field(default_factory=dict)
    request_blocks: int = 0
    """Blocks the request occupies on its worker once admitted (prompt, partial block included)."""
    block_hashes: Sequence[int] = ()
    """The prompt's chained block hashes (full blocks), as used for the decision."""
    ticket: int = field(default_factory=lambda: next(_tickets))


@dataclass(slots=True)
class WorkerLoad:
    """What the router knows about one worker's load.

    ``active_blocks`` comes from the worker's latest :class:`LoadSnapshot` (``kv_used_blocks``,
    else Dynamo's ``active_decode_blocks``), less the blocks of requests that ended since (as
    this router saw them end); ``total_blocks`` from its ``kv_total_blocks`` (0 = unknown; a
    Dynamo worker sends none, and the frontend fills it in from the model card).
    ``inflight_*`` count the requests this router sent there that have not finished, their
    blocks counted once however many of them share a block; ``pending_blocks`` is what requests
    routed after the latest snapshot added to ``inflight_blocks``, which that snapshot cannot
    reflect yet.
    """

    active_blocks: int = 0
    total_blocks: int = 0
    inflight_requests: int = 0
    inflight_blocks: int = 0
    pending_blocks: int = 0
    snapshot_seq: int = 0
    """Number of snapshots with a block count received (0 = none yet)."""
    prefill_blocks: int = 0
    """Blocks still to prefill for requests routed here that have not produced a token."""

    @property
    def decode_blocks(self) -> int:
        """Predicted blocks in use: the snapshot plus what was routed here since it, but never
        less than what this router alone has in flight there.

        Adding every in-flight block to the snapshot would count running requests twice (the
        snapshot already includes them); using the snapshot alone would send a burst of requests
        to the same worker until its next snapshot.
        """
        return max(self.active_blocks + self.pending_blocks, self.inflight_blocks)

    @property
    def usage(self) -> float | None:
        """``decode_blocks / total_blocks``, or ``None`` when the capacity is unknown."""
        return self.decode_blocks / self.total_blocks if self.total_blocks > 0 else None


@dataclass(frozen=True, slots=True, kw_only=True)
class KvRouterConfig:
    """Tuning of :class:`KvRouter` (names follow Dynamo's ``--router-*`` flags).

    ``block_size`` must equal the workers' KV block size, or no prompt hash will ever match.
    ``busy_threshold`` (a fraction of ``total_blocks``, like Dynamo's
    ``--active-decode-blocks-threshold``) excludes workers above it, unless every candidate is.
    ``use_kv_events = False`` predicts the caches from the routing decisions instead of KV
    events (Dynamo's approximate mode): a routed prompt's blocks count as cached on its worker
    for ``router_ttl_secs``, at most ``router_max_tree_size`` (worker, block) pairs are kept,
    pruned to ``router_prune_target_ratio`` of that (Dynamo's defaults: 120 s, 2**20, 0.8).
    """

    block_size: int
    overlap_score_weight: float = 1.0
    temperature: float = 0.0
    busy_threshold: float | None = None
    hash_seed: int = XXH3_SEED
    use_kv_events: bool = True
    router_ttl_secs: float = 120.0
    router_max_tree_size: int = 2**20
    router_prune_target_ratio: float = 0.8

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.overlap_score_weight < 0:
            raise ValueError("overlap_score_weight must be >= 0")
        if not self.temperature >= 0:
            raise ValueError("temperature must be >= 0")
        if self.busy_threshold is not None and not self.busy_threshold > 0:
            raise ValueError("busy_threshold must be > 0")
        if not self.router_ttl_secs > 0:
            raise ValueError(f"router_ttl_secs must be > 0, got {self.router_ttl_secs}")
        if self.router_max_tree_size <= 0:
            raise ValueError("router_max_tree_size must be > 0")
        if not 0.0 <= self.router_prune_target_ratio < 1.0:
            raise ValueError("router_prune_target_ratio must be in [0, 1)")


class KvRouter:
    """Chooses a worker for a prompt from KV overlap and load (see the module docstring).

    Workers are candidates once :meth:`add_worker` ed (discovery is the authority on who exists);
    ``select(..., candidates=...)`` may instead name them per call. Load snapshots and KV events
    of workers not (yet) added are kept, since the event plane may run ahead of discovery.

    With ``config.use_kv_events = False`` the ``indexer`` must be an :class:`ApproxKvIndexer`
    (:func:`~.policies.make_policy` builds one): every :meth:`request_started` records the
    prompt's blocks on the chosen worker, and KV events are not used.
    """

    name = "kv"

    def __init__(
        self,
        indexer: KvIndexer,
        config: KvRouterConfig,
        rng: random.Random | None = None,
    ) -> None:
        if not config.use_kv_events and not isinstance(indexer, ApproxKvIndexer):
            raise TypeError("use_kv_events=False needs an ApproxKvIndexer")
        self.indexer = indexer
        self.config = config
        self._approx = indexer if isinstance(indexer, ApproxKvIndexer) else None
        self._rng = rng if rng is not None else random.Random()
        self._workers: dict[WorkerKey, None] = {}  # ordered set
        self._loads: dict[WorkerKey, WorkerLoad] = {}
        # Per worker: block hash -> in-flight requests (routed here) whose prompt holds it. A
        # chained hash implies its whole prefix, so each set is prefix-closed per prompt.
        self._active: dict[WorkerKey, dict[int, int]] = {}
        # ticket -> (decision, blocks it added, snapshot_seq of the worker when routed)
        self._inflight: dict[int, tuple[RouteDecision, int, int]] = {}
        # ticket -> blocks to prefill, until the request's first token
        self._prefilling: dict[int, int] = {}

    # -- membership and signals ----------------------------------------------------------------
    @property
    def workers(self) -> list[WorkerKey]:
        """Workers added and not removed, in the order added."""
        return list(self._workers)

    def add_worker(self, key: WorkerKey) -> None:
        """Make ``key`` a default candidate (idempotent)."""
        self._workers[key] = None

    def remove_worker(self, key: WorkerKey) -> None:
        """``key`` left: forget its load, its in-flight requests and its indexed blocks."""
        self._workers.pop(key, None)
        self._loads.pop(key, None)
        self._active.pop(key, None)
        self.indexer.remove_worker(key[0], key[1])
        for ticket in [t for t, (d, _, _) in self._inflight.items() if d.worker == key]:
            del self._inflight[ticket]
            self._prefilling.pop(ticket, None)

    def update_load(self, snapshot: LoadSnapshot) -> None:
        """Take a worker's load snapshot; its block count supersedes what was routed there
        before it. Fields it leaves ``None`` (a Dynamo worker sends no total) keep their value."""
        used = snapshot.kv_used_blocks
        if used is None:
            used = snapshot.active_decode_blocks
        if used is None and snapshot.kv_total_blocks is None:
            return
        load = self._load((snapshot.worker_id, snapshot.dp_rank))
        if snapshot.kv_total_blocks is not None:
            load.total_blocks = snapshot.kv_total_blocks
        if used is not None:
            load.active_blocks = used
            load.snapshot_seq += 1
            load.pending_blocks = 0

    def apply_event(self, event: RouterEvent) -> None:
        """Feed one KV event to the indexer."""
        self.indexer.apply(event)

    def load(self, key: WorkerKey) -> WorkerLoad:
        """A copy of what the router knows about ``key``'s load (zeros when nothing)."""
        load = self._loads.get(key)
        if load is None:
            return WorkerLoad()
        return WorkerLoad(
            load.active_blocks,
            load.total_blocks,
            load.inflight_requests,
            load.inflight_blocks,
            load.pending_blocks,
            load.snapshot_seq,
            load.prefill_blocks,
        )

    def _load(self, key: WorkerKey) -> WorkerLoad:
        load = self._loads.get(key)
        if load is None:
            load = self._loads[key] = WorkerLoad()
        return load

    # -- the decision --------------------------------------------------------------------------
    def select(
        self,
        token_ids: Sequence[int],
        candidates: Sequence[WorkerKey] | None = None,
        *,
        block_hashes: Sequence[int] | None = None,
    ) -> RouteDecision:
        """Choose a worker for a prompt of ``token_ids``.

        ``candidates`` defaults to the added workers; duplicates are ignored. ``block_hashes``
        may pass the prompt's chained hashes when the caller already has them (they must be
        ``kv.hashing.block_hashes(token_ids, block_size, hash_seed)``). Raises
        :class:`NoWorkersAvailable` when there is no candidate. Does not record the request:
        call :meth:`request_started` once it is actually sent.
        """
        cands = list(dict.fromkeys(candidates)) if candidates is not None else list(self._workers)
        if not cands:
            raise NoWorkersAvailable("no worker to route to")
        cfg = self.config
        hashes = block_hashes if block_hashes is not None else prompt_hashes(cfg, token_ids)
        prompt_blocks = len(hashes)
        request_blocks = -(-len(token_ids) // cfg.block_size)
        overlaps = self.indexer.find_matches(hashes)

        loads = self._loads
        empty = WorkerLoad()
        if cfg.busy_threshold is not None:
            limit = cfg.busy_threshold
            free = [k for k in cands if not _busy(loads.get(k, empty), limit)]
            if free:
                cands = free
        weight = cfg.overlap_score_weight
        logits: dict[WorkerKey, float] = {}
        active = self._active
        for k in cands:
            load = loads.get(k, empty)
            prefill = prompt_blocks - overlaps.get(k, 0) + load.prefill_blocks
            act = active.get(k)
            added = request_blocks - (_active_prefix(act, hashes) if act else 0)
            logits[k] = weight * prefill + load.decode_blocks + added

        worker = self._choose(cands, logits)
        return RouteDecision(
            worker=worker,
            overlap_blocks=overlaps.get(worker, 0),
            prompt_blocks=prompt_blocks,
            logits=logits,
            request_blocks=request_blocks,
            block_hashes=hashes,
        )

    def _choose(self, cands: list[WorkerKey], logits: dict[WorkerKey, float]) -> WorkerKey:
        if len(cands) == 1:
            return cands[0]
        values = [logits[k] for k in cands]
        lo, hi = min(values), max(values)
        temperature = self.config.temperature
        if temperature == 0.0:
            # Tolerance, since float weights make equal costs differ in the last bits.
            eps = 1e-9 * max(1.0, abs(lo))
            ties = [k for k, v in zip(cands, values, strict=True) if v <= lo + eps]
            return ties[0] if len(ties) == 1 else self._rng.choice(ties)
        if hi == lo:
            return self._rng.choice(cands)
        scale = 1.0 / ((hi - lo) * temperature)
        weights = [math.exp(-(v - lo) * scale) for v in values]  # the best one has weight 1
        return self._rng.choices(cands, weights)[0]

    # -- router-side load tracking -------------------------------------------------------------
    def request_started(self, decision: RouteDecision) -> None:
        """The request of ``decision`` was sent to ``decision.worker`` (idempotent). Without KV
        events, its prompt blocks are predicted cached there from now on (see the class doc)."""
        if decision.ticket in self._inflight:
            return
        if self._approx is not None:
            self._approx.record(decision.worker, decision.block_hashes)
        load = self._load(decision.worker)
        active = self._active.setdefault(decision.worker, {})
        # The partial last block (if any) is the request's own; full blocks may be shared.
        blocks = decision.request_blocks - len(decision.block_hashes)
        for h in decision.block_hashes:
            n = active.get(h, 0)
            if not n:
                blocks += 1
            active[h] = n + 1
        self._inflight[decision.ticket] = (decision, blocks, load.snapshot_seq)
        prefill = decision.prompt_blocks - decision.overlap_blocks
        self._prefilling[decision.ticket] = prefill
        load.prefill_blocks += prefill
        load.inflight_requests += 1
        load.inflight_blocks += blocks
        load.pending_blocks += blocks

    def prefill_done(self, decision: RouteDecision) -> None:
        """The request of ``decision`` produced its first token: its prefill no longer queues
        ahead of others on its worker (idempotent; also implied by ``request_finished``)."""
        prefill = self._prefilling.pop(decision.ticket, None)
        if prefill:
            load = self._loads.get(decision.worker)
            if load is not None:
                load.prefill_blocks -= prefill

    def request_finished(self, decision: RouteDecision) -> None:
        """The request of ``decision`` ended, however (idempotent; unknown tickets ignored)."""
        self.prefill_done(decision)
        entry = self._inflight.pop(decision.ticket, None)
        if entry is None:
            return
        decision, added, seq = entry
        key = decision.worker
        load = self._loads.get(key)
        active = self._active.get(key)
        if load is None or active is None:
            return
        freed = decision.request_blocks - len(decision.block_hashes)
        for h in decision.block_hashes:
            n = active[h] - 1
            if n:
                active[h] = n
            else:
                del active[h]
                freed += 1
        load.inflight_requests -= 1
        load.inflight_blocks -= freed
        if seq == load.snapshot_seq:  # routed after the latest snapshot: still pending there
            load.pending_blocks = max(0, load.pending_blocks - added)
        else:
            # A snapshot taken since counted its blocks; until the next one says so, assume
            # they are free now (else a worker looks busy for a whole snapshot interval after
            # its requests ended, and a conversation's next turn is sent elsewhere).
            load.active_blocks = max(0, load.active_blocks - freed)

    def route(
        self, token_ids: Sequence[int], candidates: Sequence[WorkerKey] | None = None
    ) -> RouteDecision:
        """``select`` then ``request_started``: for callers that send at once."""
        decision = self.select(token_ids, candidates)
        self.request_started(decision)
        return decision


def _active_prefix(active: dict[int, int], hashes: Sequence[int]) -> int:
    """How many leading ``hashes`` are in ``active``. A chained hash is only ever active
    together with its whole prefix, so membership is monotone along the prompt: bisect."""
    lo, hi = 0, len(hashes)  # hashes[:lo] are all active; hashes[hi:] none is
    while lo < hi:
        mid = (lo + hi) // 2
        if hashes[mid] in active:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _busy(load: WorkerLoad, limit: float) -> bool:
    usage = load.usage
    return usage is not None and usage > limit


def prompt_hashes(config: KvRouterConfig, token_ids: Sequence[int]) -> list[int]:
    """The chained block hashes ``select`` computes for ``token_ids`` under ``config``."""
    return block_hashes(token_ids, config.block_size, config.hash_seed)
