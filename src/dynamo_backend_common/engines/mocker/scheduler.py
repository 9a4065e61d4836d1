"""Continuous-batching scheduler of one data-parallel rank, modelled on vLLM v1.

Pure logic, no asyncio: :meth:`Scheduler.schedule` picks the work of one forward pass and
reserves its KV blocks; :meth:`Scheduler.apply` records the pass as done (computed blocks are
hashed and published, every sequence that computed all its tokens samples one). The engine sleeps
the step's simulated duration in between; tests can call :meth:`Scheduler.step` directly.

One step (``max_num_batched_tokens`` = the token budget):

1. Running sequences, oldest first, each get ``min(uncomputed tokens, budget left)`` tokens
   (1 for a decoding sequence; a chunk of its prompt for one still prefilling). When the KV cache
   cannot hold them, the most recently admitted running sequence is preempted until they fit,
   possibly the sequence itself: its blocks are released (its hashed blocks stay cached, so no
   KV event is due until they are evicted), it goes back to the front of the waiting queue and is
   recomputed later, prefix cache hits included. The oldest sequence is never preempted by a
   younger one, and one sequence always fits (``max_len`` <= the cache), so all make progress.
2. If nothing was preempted, waiting sequences are admitted in FCFS order while fewer than
   ``max_num_seqs`` run, budget is left and the KV cache holds their first chunk. Their prefix
   cache hits are not computed again. Without chunked prefill a sequence is admitted only whole
   (or alone in an otherwise empty step, so a long recompute cannot starve).

Every sequence that computed all of its tokens in the step samples one new token.

Disaggregated serving (:mod:`.disagg`) adds per-request (never per-token) hooks:

- a sequence with ``retain_kv`` hands its blocks to a :class:`~.kv_manager.KvPin` (``kv_pin``)
  when it finishes, instead of freeing them (a prefill worker's KV awaiting its pull);
- a sequence with ``remote_kv`` (a decode worker's request whose prompt KV is on a prefill
  worker) is admitted, in FCFS order and within ``max_num_seqs``, into ``loading`` instead of
  running (vLLM's ``WAITING_FOR_REMOTE_KVS``): it gets blocks for its whole prompt (prefix hits
  shared as usual), computes nothing, is never preempted (its blocks are a transfer's landing
  zone), and is notified; the engine pulls the KV, then :meth:`Scheduler.loaded` makes it run
  with its prompt computed and the prefill's token as its first output (or, when the pull
  failed, with only its local prefix hits computed: it prefills the rest here).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Final

from ...kv.hashing import local_block_hashes, sequence_hash
from ...protocols.common import FinishReason
from .kv_manager import KvManager, KvPin

__all__ = [
    "CostModel",
    "Scheduler",
    "SchedulerConfig",
    "SeqState",
    "Sequence",
    "StepPlan",
    "StepStats",
    "StopRules",
]

# Redraws before a pseudo-random token that hit an excluded (eos) id is stepped past instead.
_MAX_REDRAWS: Final = 8


@dataclass(frozen=True)
class CostModel:
    """Simulated duration of one forward pass, in milliseconds (before ``speedup_ratio``).

    ``step = [prefill_base + prefill_per_token * P + prefill_per_token_sq * A]   (if P > 0)
           + [decode_base + decode_per_seq * D]                                 (if D > 0)``

    where ``P`` = prompt tokens computed in the step (cache hits excluded), ``A`` = their
    attention work, ``sum(chunk * (cached_or_computed_prefix + chunk))`` over the prefilling
    sequences (= ``P**2`` for one prompt from scratch), and ``D`` = sequences decoding one token.

    The defaults resemble an 8B model in bf16 on one H100: about 12 ms per decode step at small
    batch (weight-bandwidth bound, +0.05 ms per sequence, so ~25 ms at 256), and ~14k prompt
    tokens/s (0.07 ms per token, plus a quadratic attention term worth ~65 ms at 8k tokens).
    """

    prefill_base_ms: float = 5.0
    prefill_ms_per_token: float = 0.07
    prefill_ms_per_token_sq: float = 1e-6
    decode_base_ms: float = 12.0
    decode_ms_per_seq: float = 0.05

    def step_ms(self, prefill_tokens: int, attention_work: int, decode_seqs: int) -> float:
        ms = 0.0
        if prefill_tokens > 0:
            ms += (
                self.prefill_base_ms
                + self.prefill_ms_per_token * prefill_tokens
                + self.prefill_ms_per_token_sq * attention_work
            )
        if decode_seqs > 0:
            ms += self.decode_base_ms + self.decode_ms_per_seq * decode_seqs
        return ms


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    chunked_prefill: bool = True
    cost: CostModel = field(default_factory=CostModel)


@dataclass(frozen=True)
class StopRules:
    """When a sequence stops, from its request. Token ids in ``eos_ids`` are never sampled;
    an EOS stop happens with probability ``eos_rate`` per token instead (and never with
    ``ignore_eos``), so output lengths are controllable and reproducible."""

    max_tokens: int
    #: Tokens (prompt + output) at which the sequence stops with ``length``.
    max_len: int
    min_tokens: int = 0
    eos_ids: frozenset[int] = frozenset()
    eos_rate: float = 0.0
    #: Stop token ids that end the stream and are not returned.
    stop_hidden: frozenset[int] = frozenset()
    #: Stop token ids that end the stream and are returned.
    stop_visible: frozenset[int] = frozenset()


class SeqState(Enum):
    WAITING = "waiting"
    #: Admitted, holding blocks, its prompt KV being pulled from a prefill worker.
    LOADING = "loading"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One request inside a scheduler: its tokens, KV blocks and pending output.

    KV holdings: ``hashed`` = the hashed blocks it references (always its first
    ``len(hashed)`` full blocks), plus ``n_private`` private blocks after them. Output the
    consumer has not taken yet sits in ``outbox`` / ``finish_reason``; ``notify`` is called
    whenever they change.
    """

    __slots__ = (
        "block_size",
        "cached_tokens",
        "finish_reason",
        "hashed",
        "kv_pin",
        "local_hashes",
        "n_private",
        "notify",
        "num_computed",
        "outbox",
        "prompt_len",
        "remote_kv",
        "request_id",
        "retain_kv",
        "rng",
        "rules",
        "seq_hashes",
        "state",
        "stop_reason",
        "tokens",
        "vocab_size",
    )

    def __init__(
        self,
        request_id: str,
        prompt: list[int],
        rules: StopRules,
        *,
        block_size: int,
        seed: int,
        vocab_size: int,
    ) -> None:
        if not prompt:
            raise ValueError("a sequence needs at least one prompt token")
        self.request_id = request_id
        self.tokens = list(prompt)
        self.prompt_len = len(prompt)
        self.rules = rules
        self.block_size = block_size
        self.rng = random.Random(seed)
        self.vocab_size = vocab_size
        self.state = SeqState.WAITING
        self.num_computed = 0
        self.hashed: list[int] = []
        self.n_private = 0
        # Chained and local hashes of the full blocks of ``tokens``, extended lazily.
        self.seq_hashes: list[int] = []
        self.local_hashes: list[int] = []
        #: Prompt tokens found in the prefix cache at the first admission (None before it).
        self.cached_tokens: int | None = None
        self.outbox: list[int] = []
        self.finish_reason: FinishReason | None = None
        self.stop_reason: int | None = None
        self.notify: Callable[[], None] = _noop
        #: Keep the blocks pinned in ``kv_pin`` when finished (a disaggregated prefill).
        self.retain_kv = False
        self.kv_pin: KvPin | None = None
        #: Its prompt's KV comes from a prefill worker: admitted into ``loading``.
        self.remote_kv = False

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def blocks_held(self) -> int:
        return len(self.hashed) + self.n_private

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def ensure_hashes(self, n_blocks: int) -> None:
        """Extend ``seq_hashes`` / ``local_hashes`` to cover the first ``n_blocks`` blocks."""
        have = len(self.seq_hashes)
        if n_blocks <= have:
            return
        bs = self.block_size
        locals_ = local_block_hashes(self.tokens[have * bs : n_blocks * bs], bs)
        parent = self.seq_hashes[-1] if self.seq_hashes else None
        for local in locals_:
            parent = sequence_hash(parent, local)
            self.seq_hashes.append(parent)
        self.local_hashes.extend(locals_)

    def take_output(self) -> tuple[list[int], FinishReason | None]:
        """Hand the pending tokens (and the finish reason, once set) to the consumer."""
        tokens, self.outbox = self.outbox, []
        return tokens, self.finish_reason

    def sample(self) -> bool:
        """Sample the next token into ``outbox``; True when the sequence is finished."""
        rules = self.rules
        n_out = self.num_output
        rng = self.rng
        if n_out >= rules.min_tokens and rules.eos_rate > 0 and rules.eos_ids:
            if rng.random() < rules.eos_rate:
                return self._finish(FinishReason.EOS)
        token = rng.randrange(self.vocab_size)
        if token in rules.eos_ids:
            for _ in range(_MAX_REDRAWS):
                token = rng.randrange(self.vocab_size)
                if token not in rules.eos_ids:
                    break
            else:
                # A tiny vocabulary made of eos ids: step to the next allowed id, if any.
                for step in range(1, self.vocab_size):
                    candidate = (token + step) % self.vocab_size
                    if candidate not in rules.eos_ids:
                        token = candidate
                        break
        if self._take(token, n_out):
            return True
        self.notify()
        return False

    def accept(self, token: int) -> bool:
        """Take ``token``, sampled elsewhere (a disaggregated prefill's first token), as the
        next output under the same stop rules as :meth:`sample`; True when finished."""
        n_out = self.num_output
        if n_out >= self.rules.min_tokens and token in self.rules.eos_ids:
            return self._finish(FinishReason.EOS)
        return self._take(token, n_out)

    def _take(self, token: int, n_out: int) -> bool:
        """Append ``token`` (the ``n_out``-th output) unless a stop token hides it; True
        (and finished) on a stop token or the length limit."""
        rules = self.rules
        if n_out >= rules.min_tokens:
            if token in rules.stop_hidden:
                self.stop_reason = token
                return self._finish(FinishReason.STOP)
            if token in rules.stop_visible:
                self._append(token)
                self.stop_reason = token
                return self._finish(FinishReason.STOP)
        self._append(token)
        if n_out + 1 >= rules.max_tokens or len(self.tokens) >= rules.max_len:
            return self._finish(FinishReason.LENGTH)
        return False

    def _append(self, token: int) -> None:
        self.tokens.append(token)
        self.outbox.append(token)

    def _finish(self, reason: FinishReason) -> bool:
        self.finish_reason = reason
        self.notify()
        return True

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.state.value}, tokens={len(self.tokens)}, "
            f"computed={self.num_computed}, blocks={len(self.hashed)}+{self.n_private})"
        )


def _noop() -> None:
    return None


@dataclass(frozen=True)
class StepStats:
    """What one forward pass did, and how long it took on the simulated clock."""

    index: int
    #: Prompt (or recompute) tokens computed, cache hits excluded.
    prefill_tokens: int
    #: Sequences that decoded one token.
    decode_seqs: int
    #: Sequences preempted while scheduling this step.
    preempted: int
    #: Simulated duration, seconds, before ``speedup_ratio``.
    duration_s: float


@dataclass
class StepPlan:
    """The work of one step: ``(sequence, tokens to compute)`` pairs, and its stats."""

    items: list[tuple[Sequence, int]]
    stats: StepStats

    @property
    def empty(self) -> bool:
        return not self.items


class Scheduler:
    """Waiting queue + running set of one rank, over one :class:`KvManager`.

    ``remove`` may be called at any time (cancellation), also between ``schedule`` and
    ``apply``: ``apply`` skips sequences that are no longer running.
    """

    def __init__(
        self,
        kv: KvManager,
        config: SchedulerConfig | None = None,
        *,
        check_invariants: bool = False,
        history: int = 256,
    ) -> None:
        self.kv = kv
        self.config = config or SchedulerConfig()
        self.check_invariants = check_invariants
        self.waiting: deque[Sequence] = deque()
        #: Running sequences in admission order (the last one is preempted first).
        self.running: list[Sequence] = []
        #: Admitted sequences whose prompt KV is being pulled (``remote_kv``), oldest first.
        self.loading: list[Sequence] = []
        self.num_steps = 0
        #: Sum of the simulated step durations, seconds.
        self.sim_time_s = 0.0
        self.num_preemptions = 0
        #: The last ``history`` steps.
        self.recent_steps: deque[StepStats] = deque(maxlen=history)
        # Prefix cache counters over first admissions, in tokens (vLLM's PrefixCacheStats).
        self.prefix_queries = 0
        self.prefix_hits = 0

    # -- queries --------------------------------------------------------------------------
    @property
    def num_active(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.loading)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def hit_rate(self) -> float | None:
        """Cumulative prefix cache hit rate (tokens), or None before the first admission."""
        if self.prefix_queries == 0:
            return None
        return self.prefix_hits / self.prefix_queries

    # -- membership -----------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.state is not SeqState.WAITING or seq.blocks_held:
            raise ValueError(f"{seq!r} cannot be added")
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> bool:
        """Take ``seq`` out (finished, cancelled or dropped) and free its blocks. Idempotent;
        True when it was still waiting or running."""
        if seq.state is SeqState.FINISHED:
            return False
        if seq.state is SeqState.RUNNING:
            self.running.remove(seq)
        elif seq.state is SeqState.LOADING:
            self.loading.remove(seq)
        else:
            self.waiting.remove(seq)
        self._free(seq)
        seq.state = SeqState.FINISHED
        self._check()
        return True

    # -- stepping -------------------------------------------------------------------------
    def step(self) -> StepPlan:
        """``schedule()`` then ``apply()`` at once (no simulated wait)."""
        plan = self.schedule()
        self.apply(plan)
        return plan

    def schedule(self) -> StepPlan:
        """Choose the next step's work and reserve its blocks. An empty plan (nothing could be
        scheduled) is not counted as a step."""
        cfg = self.config
        kv = self.kv
        budget = cfg.max_num_batched_tokens
        items: list[tuple[Sequence, int]] = []
        prefill_tokens = attention = decode_seqs = 0
        preempted = 0

        # 1. running sequences, oldest first
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            n = min(len(seq.tokens) - seq.num_computed, budget)
            need = seq.blocks_for(seq.num_computed + n) - seq.blocks_held
            while need > kv.available():
                victim = running.pop()
                self._preempt(victim)
                preempted += 1
                if victim is seq:
                    break
            if seq.state is not SeqState.RUNNING:
                break  # it preempted itself: everything after it already was
            kv.allocate(need)
            seq.n_private += max(need, 0)
            items.append((seq, n))
            budget -= n
            if n == 1 and seq.num_output > 0:
                decode_seqs += 1
            else:
                prefill_tokens += n
                attention += n * (seq.num_computed + n)
            i += 1

        # 2. admissions, FCFS, only when the cache is not under pressure
        loading = self.loading
        while (not preempted and self.waiting and budget > 0
               and len(running) + len(loading) < cfg.max_num_seqs):
            seq = self.waiting[0]
            bs = kv.block_size
            hits = 0
            if kv.prefix_caching:
                # At least one token is always computed: its logits give the next token.
                max_hit = (len(seq.tokens) - 1) // bs
                seq.ensure_hashes(max_hit)
                hits = kv.match_prefix(seq.seq_hashes[:max_hit])
            hit_hashes = seq.seq_hashes[:hits]
            computed = hits * bs
            if seq.remote_kv:
                if not self._admit_loading(seq, hit_hashes):
                    break
                continue
            uncomputed = len(seq.tokens) - computed
            n = min(uncomputed, budget)
            if n < uncomputed and not cfg.chunked_prefill:
                if items:
                    break
                n = uncomputed  # alone in the step: may exceed the budget
            need = seq.blocks_for(computed + n) - hits
            if need > kv.available() - kv.evictable_among(hit_hashes):
                break
            self.waiting.popleft()
            kv.acquire(hit_hashes)
            kv.allocate(need)
            seq.hashed = list(hit_hashes)
            seq.n_private = need
            seq.num_computed = computed
            seq.state = SeqState.RUNNING
            if seq.cached_tokens is None:
                seq.cached_tokens = computed
                self.prefix_queries += seq.prompt_len
                self.prefix_hits += computed
            running.append(seq)
            items.append((seq, n))
            budget -= n
            prefill_tokens += n
            attention += n * (computed + n)

        if not items:
            self._check()
            return StepPlan([], StepStats(self.num_steps, 0, 0, preempted, 0.0))
        duration = cfg.cost.step_ms(prefill_tokens, attention, decode_seqs) / 1000.0
        stats = StepStats(self.num_steps, prefill_tokens, decode_seqs, preempted, duration)
        self.num_steps += 1
        self.sim_time_s += duration
        self.num_preemptions += preempted
        self.recent_steps.append(stats)
        self._check()
        return StepPlan(items, stats)

    def apply(self, plan: StepPlan) -> list[Sequence]:
        """Record ``plan`` as computed: hash and publish full blocks, sample tokens, retire
        finished sequences (their blocks are freed). Returns the sequences that finished."""
        kv = self.kv
        finished: list[Sequence] = []
        for seq, n in plan.items:
            if seq.state is not SeqState.RUNNING:
                continue  # removed (cancelled) while the step was in flight
            seq.num_computed += n
            if kv.prefix_caching:
                full = seq.num_computed // kv.block_size
                first = len(seq.hashed)
                if full > first:
                    seq.ensure_hashes(full)
                    blocks = list(
                        zip(seq.seq_hashes[first:full], seq.local_hashes[first:full], strict=True)
                    )
                    kv.commit(blocks, seq.hashed[-1] if seq.hashed else None)
                    seq.hashed.extend(seq.seq_hashes[first:full])
                    seq.n_private -= full - first
            if seq.num_computed == len(seq.tokens) and seq.sample():
                finished.append(seq)
        if finished:
            for seq in finished:
                if seq.retain_kv:
                    # A disaggregated prefill: its KV outlives it, pinned for the decode pull.
                    seq.kv_pin = kv.pin(seq.hashed, seq.n_private)
                    seq.hashed = []
                    seq.n_private = 0
                self._free(seq)
                seq.state = SeqState.FINISHED
            self.running = [s for s in self.running if s.state is SeqState.RUNNING]
        self._check()
        return finished

    def loaded(self, seq: Sequence, token: int | None) -> bool:
        """End the KV load of a ``loading`` sequence. With ``token`` (the prefill's first
        token) the prompt counts as computed (its full blocks are hashed and published) and
        ``token`` is its first output; with None (the pull failed) only its prefix hits count
        and it prefills the rest here. It runs from the next step. True when ``token`` alone
        finished it (its blocks are then freed)."""
        if seq.state is not SeqState.LOADING:
            raise ValueError(f"{seq!r} is not loading")
        self.loading.remove(seq)
        seq.remote_kv = False  # a later preemption recomputes locally, as vLLM does
        kv = self.kv
        if token is None:
            if seq.cached_tokens is None:
                seq.cached_tokens = seq.num_computed
                self.prefix_queries += seq.prompt_len
                self.prefix_hits += seq.num_computed
        else:
            seq.num_computed = seq.prompt_len
            full = seq.prompt_len // kv.block_size
            first = len(seq.hashed)
            if kv.prefix_caching and full > first:
                seq.ensure_hashes(full)
                blocks = list(
                    zip(seq.seq_hashes[first:full], seq.local_hashes[first:full], strict=True)
                )
                kv.commit(blocks, seq.hashed[-1] if seq.hashed else None)
                seq.hashed.extend(seq.seq_hashes[first:full])
                seq.n_private -= full - first
            if seq.accept(token):
                self._free(seq)
                seq.state = SeqState.FINISHED
                self._check()
                return True
        seq.state = SeqState.RUNNING
        self.running.append(seq)
        self._check()
        return False

    # -- internals ------------------------------------------------------------------------
    def _admit_loading(self, seq: Sequence, hit_hashes: list[int]) -> bool:
        """Admit a ``remote_kv`` sequence into ``loading`` with blocks for its whole prompt;
        False, changing nothing, when the cache cannot hold them now."""
        kv = self.kv
        hits = len(hit_hashes)
        need = seq.blocks_for(seq.prompt_len) - hits
        if need > kv.available() - kv.evictable_among(hit_hashes):
            return False
        self.waiting.popleft()
        kv.acquire(hit_hashes)
        kv.allocate(need)
        seq.hashed = list(hit_hashes)
        seq.n_private = need
        seq.num_computed = hits * kv.block_size
        seq.state = SeqState.LOADING
        self.loading.append(seq)
        seq.notify()
        return True

    def _free(self, seq: Sequence) -> None:
        if seq.hashed or seq.n_private:
            self.kv.release(seq.hashed, seq.n_private)
        seq.hashed = []
        seq.n_private = 0

    def _preempt(self, seq: Sequence) -> None:
        # Recompute from scratch later; its released blocks stay cached, so the recompute
        # usually hits the prefix cache.
        self._free(seq)
        seq.num_computed = 0
        seq.state = SeqState.WAITING
        self.waiting.appendleft(seq)

    def _check(self) -> None:
        if self.check_invariants:
            self.kv.check_invariants()
            held = sum(s.n_private for s in self.running) + self.kv.pinned_private_blocks
            held += sum(s.n_private for s in self.loading)
            assert held == self.kv.private_blocks, (held, self.kv.private_blocks)
            for s in self.loading:
                assert s.blocks_held == s.blocks_for(s.prompt_len), s
            for s in self.running:
                assert s.blocks_held >= s.blocks_for(s.num_computed), s
            for s in self.waiting:
                assert s.blocks_held == 0, s

