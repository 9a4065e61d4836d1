"""``MockerEngine``: a simulated vLLM-like engine, for tests, demos and router benchmarks.

It serves requests with pseudo-random tokens while keeping real engine bookkeeping, so every
framework path (KV-aware routing, load snapshots, cancellation, shutdown) sees realistic
behaviour without a GPU:

- per data-parallel rank, a paged KV cache with prefix caching (:mod:`.kv_manager`) and a
  continuous-batching scheduler with chunked prefill and preemption (:mod:`.scheduler`);
- one step-loop task per rank (owned: created in :meth:`MockerEngine.start`, cancelled and
  awaited in :meth:`MockerEngine.cleanup`) that schedules a step, waits its simulated duration
  (the :class:`~.scheduler.CostModel` divided by ``speedup_ratio``; with 0 or inf it only yields
  to the event loop), then applies it;
- KV events (stored / removed, with the chained block hashes routers compute from prompts) through
  one :class:`PushKvEventSource` per rank, and a :class:`ComponentSnapshot` per rank after the
  steps that change it, at most one per ``snapshot_interval_ms`` of wall time (a change held back
  by the throttle is published when the interval ends, also if the rank goes idle), and the
  unchanged one again every ``snapshot_heartbeat_ms`` (a router that subscribed late, or lost a
  message, would otherwise never hear from an idle rank).

Single event loop, no threads (but one ``to_thread`` at start to read the tokenizer). Output
tokens are ``random.Random(seed)`` draws in ``[0, vocab_size)`` (seed = ``sampling_options.seed``,
else a hash of ``--seed`` and the request id), never one of the request's ``eos_token_ids``; see
:class:`~.scheduler.StopRules` for stops.

Structured output: with a tokenizer (``tokenizer.json`` in ``--model-path``, default
``$DYN_MODEL_PATH``) the engine advertises ``runtime_data[GUIDED_DECODING_KEY] = ["json",
"choice"]`` and a request with ``sampling_options.guided_decoding`` gets, instead of random
tokens, the encoding of a schema-valid JSON instance (or one of the choices) drawn from the same
seed (:mod:`.structured`), at the same simulated pace through the same scheduler, ending with
``eos``. Without a tokenizer nothing is advertised and a guided request raises
``DynamoError(InvalidArgument)`` saying why.

Disaggregated serving: ``--disaggregation-mode prefill`` or ``decode`` (default
``$DYN_DISAGGREGATION_MODE``) makes the mocker one half of a prefill/decode pair with a
simulated KV transfer between them; :mod:`.disagg` states that contract. The default
(aggregated) mocker does none of it: its per-token path is unchanged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import random
from collections.abc import AsyncIterator
from collections.abc import Sequence as Seq
from typing import Any, Final

import msgspec
import xxhash

from ...engine import (
    GUIDED_DECODING_KEY,
    HEALTH_CHECK_KEY,
    ComponentSnapshot,
    EngineConfig,
    GenerateContext,
    KvEventSource,
    LLMEngine,
    MetricsBindings,
    MetricsCtx,
    PushKvEventSource,
)
from ...errors import DynamoError
from ...protocols.common import (
    CompletionUsage,
    FinishReason,
    GuidedDecodingOptions,
    LLMEngineOutput,
    PreprocessedRequest,
    PromptTokensDetails,
    usage,
)
from ...protocols.kv import KvEventData
from ...runtime.context import Context
from ...runtime.publishers import KvEventPublisher, SnapshotPublisher
from ...runtime.tasks import cancel_and_wait
from ...worker.config import DisaggregationMode
from .args import MockerArgs
from .disagg import KvPuller, KvSource, KvTransferServer, KvTransferStats
from .kv_manager import KvManager, KvStats
from .scheduler import Scheduler, SeqState, Sequence, StepStats, StopRules
from .structured import ScriptedSequence, guided_text

__all__ = ["MockerEngine"]

log = logging.getLogger("dynamo_backend_common.mocker")

# When the paced loop falls further behind its schedule than this, it stops trying to catch up
# (a stalled event loop must not be followed by a burst of back-to-back steps).
_MAX_LAG_S: Final = 0.05

#: The guided-decoding kinds the mocker honours once it has a tokenizer.
GUIDED_KINDS: Final = ("json", "choice")


class _Rank:
    """One data-parallel rank: KV cache, scheduler, step loop and publishers."""

    def __init__(self, dp_rank: int, args: MockerArgs) -> None:
        self.dp_rank = dp_rank
        self.args = args
        self.kv = KvManager(
            args.num_gpu_blocks,
            args.block_size,
            prefix_caching=args.enable_prefix_caching,
            sink=self._on_kv_event,
        )
        self.scheduler = Scheduler(
            self.kv, args.scheduler_config(), check_invariants=args.check_invariants
        )
        self.kv_publisher: KvEventPublisher | None = None
        self.snapshots: SnapshotPublisher | None = None
        self.task: asyncio.Task[None] | None = None
        self.failure: BaseException | None = None
        # Live requests by id (ids need not be unique), for abort() and shutdown.
        self.requests: dict[str, list[tuple[Sequence, Context]]] = {}
        self._work = asyncio.Event()  # set on every add/remove: wakes an idle step loop
        self._idle = asyncio.Event()
        self._idle.set()
        self._last_snapshot: ComponentSnapshot | None = None
        self._last_publish = -math.inf

    # -- requests -------------------------------------------------------------------------
    def attach(self, seq: Sequence, ctx: Context) -> None:
        self.scheduler.add(seq)
        self.requests.setdefault(seq.request_id, []).append((seq, ctx))
        self._idle.clear()
        self._work.set()

    def cancel(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks now (stop, abort, shutdown), unless a KV pull is landing in
        them: then the stream frees them once the pull ended. Idempotent."""
        if seq.state is not SeqState.LOADING and self.scheduler.remove(seq):
            self._work.set()

    def loaded(self, seq: Sequence, token: int | None) -> None:
        """A decode request's KV pull ended (see :meth:`Scheduler.loaded`)."""
        self.scheduler.loaded(seq, token)
        self._work.set()

    def detach(self, seq: Sequence) -> None:
        """The stream ended (any way): free ``seq``'s blocks and forget it."""
        if self.scheduler.remove(seq):
            self._work.set()
        entries = self.requests.get(seq.request_id)
        if entries is not None:
            entries[:] = [e for e in entries if e[0] is not seq]
            if not entries:
                del self.requests[seq.request_id]

    def abort(self, request_id: str) -> None:
        for seq, _ctx in list(self.requests.get(request_id, ())):
            if seq.state is SeqState.LOADING:
                continue  # its pull ends first; the stream then sees the stop
            self.cancel(seq)
            if seq.finish_reason is None:
                seq.finish_reason = FinishReason.CANCELLED
                seq.notify()

    def stop_all(self) -> None:
        """Stop every live request's context: each stream ends with a clean ``cancelled``."""
        for entries in list(self.requests.values()):
            for seq, ctx in list(entries):
                ctx.stop_generating()
                self.cancel(seq)

    async def wait_idle(self) -> None:
        while self.scheduler.has_work() and self.task is not None and not self.task.done():
            await self._idle.wait()

    # -- publishing -----------------------------------------------------------------------
    def set_kv_publisher(self, publisher: KvEventPublisher) -> None:
        self.kv_publisher = publisher

    def _on_kv_event(self, data: KvEventData) -> None:
        # Before the worker hands us a publisher there is nobody to tell.
        if self.kv_publisher is not None:
            self.kv_publisher.publish(data)

    def set_snapshot_publisher(self, publisher: SnapshotPublisher) -> None:
        self.snapshots = publisher
        try:
            now = asyncio.get_running_loop().time()
        except RuntimeError:  # handed over off the loop: the throttle just starts open
            now = -math.inf
        # An initial snapshot, so the router sees this rank's capacity before any request.
        self._publish_snapshot(self._snapshot(), now)

    def _snapshot(self) -> ComponentSnapshot:
        used, _cached, _free, total = self.kv.stats()
        return ComponentSnapshot(
            kv_used_blocks=used,
            kv_total_blocks=total,
            gpu_cache_usage=used / total,
            kv_cache_hit_rate=self.scheduler.hit_rate,
            dp_rank=self.dp_rank,
        )

    def _snapshot_delay(self, now: float) -> float | None:
        """Seconds until a snapshot is due (<= 0: now): a changed one once the throttle
        interval has passed, an unchanged one once the heartbeat interval has; None: never."""
        if self.snapshots is None:
            return None
        if self._snapshot() != self._last_snapshot:
            return self._last_publish + self.args.snapshot_interval_ms / 1000.0 - now
        heartbeat = self.args.snapshot_heartbeat_ms
        if heartbeat > 0:
            return self._last_publish + heartbeat / 1000.0 - now
        return None

    def _maybe_publish(self, now: float) -> None:
        delay = self._snapshot_delay(now)
        if delay is not None and delay <= 0:
            self._publish_snapshot(self._snapshot(), now)

    def _publish_snapshot(self, snap: ComponentSnapshot, now: float) -> None:
        if self.snapshots is not None:
            self.snapshots.publish(self.dp_rank, snap)
            self._last_snapshot = snap
            self._last_publish = now

    # -- the step loop --------------------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        sched = self.scheduler
        args = self.args
        fast = args.as_fast_as_possible
        deadline = loop.time()
        try:
            while True:
                if not sched.has_work():
                    self._idle.set()
                    await self._wait_for_work(loop)
                    deadline = loop.time()
                    continue
                plan = sched.schedule()
                if plan.empty:
                    # Nothing fits; only a removal (or a new request) can change that.
                    await self._wait_for_work(loop)
                    continue
                if fast:
                    await asyncio.sleep(0)
                else:
                    # Pace against a running deadline so sleep overshoot does not accumulate.
                    now = loop.time()
                    deadline = max(deadline, now - _MAX_LAG_S)
                    deadline += plan.stats.duration_s / args.speedup_ratio
                    await asyncio.sleep(max(deadline - now, 0.0))
                sched.apply(plan)
                self._maybe_publish(loop.time())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("mocker dp_rank %d: step loop failed", self.dp_rank)
            self.failure = exc
            for entries in list(self.requests.values()):
                for seq, _ctx in entries:
                    seq.notify()
            self._idle.set()

    async def _wait_for_work(self, loop: asyncio.AbstractEventLoop) -> None:
        self._work.clear()
        while not self._work.is_set():
            delay = self._snapshot_delay(loop.time())
            if delay is None:
                await self._work.wait()
            elif delay <= 0:
                self._publish_snapshot(self._snapshot(), loop.time())
            else:
                # A throttled change is still pending: publish it when its interval ends.
                try:
                    async with asyncio.timeout(delay):
                        await self._work.wait()
                except TimeoutError:
                    pass


class MockerEngine(LLMEngine):
    """Simulated engine; see the module docs. Build with ``MockerEngine(MockerArgs(...))``,
    ``MockerEngine(num_gpu_blocks=64, speedup_ratio=0)`` or ``MockerEngine.from_args(argv)``.

    Request handling:

    - an empty prompt, a prompt of ``max_seq_len`` tokens or more, a prompt over the token
      budget without chunked prefill, or a ``routing.dp_rank`` out of range raises
      ``DynamoError(InvalidArgument)``; ``generate`` before ``start`` or after ``cleanup`` raises
      ``DynamoError(EngineShutdown)``;
    - the rank is ``request.routing.dp_rank`` when set, else the least loaded (rotating ties);
    - ``max_tokens`` (default ``args.max_tokens``) output tokens end with ``length``; also when
      prompt + output reaches ``max_seq_len``; stop tokens end with ``stop``;
    - every terminal carries usage, with ``prompt_tokens_details.cached_tokens`` = the prefix
      cache hit at admission;
    - a stop of ``ctx`` frees the request's blocks at once and ends the stream with
      ``cancelled``; blocks are also freed when the consumer drops the stream, on errors and
      by :meth:`abort`;
    - ``sampling_options.guided_decoding`` (json schema or choice; see the module docs) is
      checked before any token: regex, grammar, structural_tag, a schema keyword
      :func:`~.structured.instance_for_schema` does not cover, or no tokenizer raise
      ``DynamoError(InvalidArgument)``; a guided stream ends with ``eos`` once the instance is
      out (``length`` if ``max_tokens`` comes first);
    - the prefill and decode roles behave as :mod:`.disagg` says (``kv_transfers`` counts the
      transfers; ``transfer_server`` is the prefill role's holds and server).
    """

    def __init__(self, args: MockerArgs | None = None, **overrides: Any) -> None:
        if args is None:
            args = MockerArgs(**overrides)
        elif overrides:
            args = dataclasses.replace(args, **overrides)
        self.args = args
        self._ranks = [_Rank(r, args) for r in range(args.dp_size)]
        # Built once so kv_event_sources() is idempotent.
        self._sources: list[KvEventSource] = (
            [PushKvEventSource(r.set_kv_publisher, dp_rank=r.dp_rank) for r in self._ranks]
            if args.enable_prefix_caching
            else []
        )
        self._state = "new"  # -> "running" -> "closed"
        self._rr = 0
        # Guided decoding: the tokenizer (a ``tokenizers.Tokenizer``) once start found one, else
        # why there is none (for the InvalidArgument a guided request gets).
        self._tokenizer: Any = None
        self._no_tokenizer = "the mocker is not started"
        role = args.role
        self.role = role
        #: Counters of the disaggregated roles' KV transfers (all zero when aggregated).
        self.kv_transfers = KvTransferStats(role.value)
        #: Prefill role: the KV holds and their transfer server.
        self.transfer_server: KvTransferServer | None = (
            KvTransferServer(args, self.kv_transfers)
            if role is DisaggregationMode.PREFILL else None
        )
        self._puller: KvPuller | None = (
            KvPuller(args, self.kv_transfers) if role is DisaggregationMode.DECODE else None
        )

    @classmethod
    def from_args(cls, argv: Seq[str] | None = None) -> MockerEngine:
        """Build from command-line flags (``--help`` lists them)."""
        return cls(MockerArgs.from_args(argv))

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self, worker_id: int) -> EngineConfig:
        if self._state != "new":
            raise DynamoError.engine_shutdown(f"mocker engine cannot start: it is {self._state}")
        self._state = "running"
        # Reading a large tokenizer.json takes ~100 ms: off the event loop.
        self._tokenizer, self._no_tokenizer = await asyncio.to_thread(
            _load_tokenizer, self.args.model_path
        )
        bootstrap: tuple[str, int] | None = None
        if self.transfer_server is not None:
            address = await self.transfer_server.start()
            if self.args.bootstrap:
                bootstrap = address
        loop = asyncio.get_running_loop()
        for rank in self._ranks:
            rank.task = loop.create_task(rank.run(), name=f"mocker-dp{rank.dp_rank}")
        a = self.args
        log.info(
            "mocker started (worker %x): %d rank(s) x %d blocks of %d tokens, speedup %s, %s",
            worker_id, a.dp_size, a.num_gpu_blocks, a.block_size, a.speedup_ratio,
            self.role.value,
        )
        return EngineConfig(
            model=a.model_name,
            served_model_name=a.served_model_name or a.model_name,
            context_length=a.context_length,
            kv_cache_block_size=a.block_size,
            # Per rank, as vLLM reports num_gpu_blocks.
            total_kv_blocks=a.num_gpu_blocks,
            max_num_seqs=a.max_num_seqs,
            max_num_batched_tokens=a.max_num_batched_tokens,
            data_parallel_size=a.dp_size,
            bootstrap_host=None if bootstrap is None else bootstrap[0],
            bootstrap_port=None if bootstrap is None else bootstrap[1],
            runtime_data=(
                {GUIDED_DECODING_KEY: list(GUIDED_KINDS)} if self._tokenizer is not None else {}
            ),
        )

    async def cleanup(self) -> None:
        if self._state == "closed":
            return
        self._state = "closed"
        for rank in self._ranks:
            rank.stop_all()
        await cancel_and_wait(r.task for r in self._ranks if r.task is not None)
        if self._puller is not None:
            await self._puller.close()
        if self.transfer_server is not None:
            await self.transfer_server.close()
        for rank in self._ranks:
            rank.task = None
            rank.kv_publisher = None
            rank.snapshots = None
        log.info("mocker stopped")

    async def drain(self) -> None:
        """Wait until no request is waiting or running on any rank and, on a prefill worker,
        until every KV hold was pulled or expired (the caller bounds it)."""
        for rank in self._ranks:
            await rank.wait_idle()
        if self.transfer_server is not None:
            await self.transfer_server.wait_drained()

    async def abort(self, ctx: Context) -> None:
        for rank in self._ranks:
            rank.abort(ctx.id)

    # -- serving --------------------------------------------------------------------------
    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        if self._state != "running":
            raise DynamoError.engine_shutdown(f"mocker engine is not running ({self._state})")
        args = self.args
        prompt = request.token_ids
        if not prompt:
            raise DynamoError.invalid_argument("token_ids must not be empty")
        max_len = args.max_seq_len
        if len(prompt) >= max_len:
            raise DynamoError.invalid_argument(
                f"prompt of {len(prompt)} tokens leaves no room for output: the longest "
                f"sequence is {max_len} tokens (context length {args.context_length}, KV "
                f"capacity {args.num_gpu_blocks * args.block_size})"
            )
        if not args.enable_chunked_prefill and len(prompt) > args.max_num_batched_tokens:
            raise DynamoError.invalid_argument(
                f"prompt of {len(prompt)} tokens exceeds max_num_batched_tokens "
                f"{args.max_num_batched_tokens} and chunked prefill is off"
            )
        guided = request.sampling_options.guided_decoding
        script: list[int] | None = None
        if guided is not None:
            script = self._guided_script(guided, request, ctx)
        rank = self._pick_rank(request)
        if rank.failure is not None:
            raise DynamoError.engine_shutdown(f"mocker dp_rank {rank.dp_rank} failed")
        sc = request.stop_conditions
        max_tokens = args.max_tokens if sc.max_tokens is None else sc.max_tokens
        min_tokens = sc.min_tokens or 0
        prefill = self.transfer_server
        if prefill is not None:
            # One token, never a stop: the decode worker applies the stop rules to it.
            max_tokens = min(max_tokens, 1)
            min_tokens = max_tokens
        if max_tokens == 0:
            terminal = LLMEngineOutput.cancelled() if ctx.is_stopped() else LLMEngineOutput.length()
            yield terminal.with_usage(usage(len(prompt), 0))
            return

        eos = frozenset(request.eos_token_ids)
        rules = StopRules(
            max_tokens=max_tokens,
            max_len=max_len,
            min_tokens=min_tokens,
            eos_ids=eos,
            eos_rate=0.0 if sc.ignore_eos else args.eos_rate,
            stop_hidden=frozenset(sc.stop_token_ids_hidden or ()),
            stop_visible=frozenset(sc.stop_token_ids or ()),
        )
        seed = self._seed(request, ctx)
        if script is None:
            seq = Sequence(
                ctx.id, list(prompt), rules,
                block_size=args.block_size, seed=seed, vocab_size=args.vocab_size,
            )
        else:
            seq = ScriptedSequence(
                ctx.id, list(prompt), rules,
                block_size=args.block_size, seed=seed, vocab_size=args.vocab_size, script=script,
            )
        inner = ctx.inner
        source: KvSource | None = None
        if self._puller is not None:
            source = self._puller.source(request, inner)  # None: a local prefill
            seq.remote_kv = source is not None
        elif prefill is not None and not request.health_check:
            seq.retain_kv = True
        wake = asyncio.Event()
        seq.notify = wake.set

        def on_stop(_ctx: Context) -> None:
            rank.cancel(seq)  # free the blocks now (unless a pull is landing in them)
            wake.set()

        rank.attach(seq, inner)
        inner.add_stop_callback(on_stop)
        delivered = 0
        held = False  # prefill role: the KV went to a hold
        try:
            if source is not None:
                await self._load(source, request, ctx, rank, seq, wake)
            while True:
                if ctx.is_stopped():
                    tokens, _ = seq.take_output()
                    delivered += len(tokens)
                    yield self._terminal(
                        LLMEngineOutput.cancelled().with_tokens(tokens), seq, delivered
                    )
                    return
                if rank.failure is not None:
                    raise DynamoError.unknown(
                        f"mocker dp_rank {rank.dp_rank} step loop failed", rank.failure
                    )
                tokens, finish = seq.take_output()
                delivered += len(tokens)
                if finish is not None:
                    out = LLMEngineOutput(
                        token_ids=tokens, finish_reason=finish, stop_reason=seq.stop_reason
                    )
                    if seq.kv_pin is not None and prefill is not None:
                        out = prefill.hold(seq, rank.kv, rank.dp_rank, request, out)
                        held = out.disaggregated_params is not None
                    yield self._terminal(out, seq, delivered)
                    return
                if tokens:
                    yield LLMEngineOutput(token_ids=tokens)
                    continue
                wake.clear()
                await wake.wait()
        finally:
            # Every exit path: finished, cancelled, raised, or the consumer dropped the stream.
            inner.remove_stop_callback(on_stop)
            rank.detach(seq)
            if prefill is not None and not held:
                prefill.discard(seq, rank.kv, request)  # cancelled or failed: hold nothing

    async def _load(self, source: KvSource, request: PreprocessedRequest, ctx: GenerateContext,
                    rank: _Rank, seq: Sequence, wake: asyncio.Event) -> None:
        """Decode role: once the scheduler admitted ``seq`` into ``loading`` (blocks for its
        prompt allocated), pull the KV into them, then let it run (see :mod:`.disagg`).
        Returns early, the stream loop ending it, when ``seq`` was stopped before admission."""
        assert self._puller is not None
        while seq.state is SeqState.WAITING and rank.failure is None:
            wake.clear()
            await wake.wait()
        if seq.state is not SeqState.LOADING:
            return
        # Not cut short by a stop: a pull abandoned mid-transfer leaves the prefill worker
        # holding the blocks until they expire. The puller bounds it.
        pulled = await self._puller.pull(source, request, ctx.inner, rank.kv.block_size)
        if ctx.is_stopped() or rank.failure is not None:
            rank.detach(seq)  # the landing blocks go now; the stream loop ends it
            return
        if pulled is not None:
            seq.cached_tokens = pulled.cached_tokens
            ctx.notify_first_token()
        rank.loaded(seq, None if pulled is None else pulled.first_token)

    def _seed(self, request: PreprocessedRequest, ctx: GenerateContext) -> int:
        seed = request.sampling_options.seed
        if seed is None:
            seed = xxhash.xxh64_intdigest(ctx.id.encode(), self.args.seed & 0xFFFF_FFFF_FFFF_FFFF)
        return seed

    def _guided_script(
        self, guided: GuidedDecodingOptions, request: PreprocessedRequest, ctx: GenerateContext
    ) -> list[int] | None:
        """The tokens a guided request is answered with (None: nothing to constrain)."""
        # Its own stream from the request seed: the same seed gives the same instance.
        text = guided_text(guided, random.Random(self._seed(request, ctx)))
        if text is None:
            return None
        if self._tokenizer is None:
            raise DynamoError.invalid_argument(f"guided decoding unavailable: {self._no_tokenizer}")
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def _terminal(self, out: LLMEngineOutput, seq: Sequence, delivered: int) -> LLMEngineOutput:
        u: CompletionUsage = usage(seq.prompt_len, delivered)
        if seq.cached_tokens is not None:
            u = msgspec.structs.replace(
                u, prompt_tokens_details=PromptTokensDetails(cached_tokens=seq.cached_tokens)
            )
        return out.with_usage(u)

    def _pick_rank(self, request: PreprocessedRequest) -> _Rank:
        ranks = self._ranks
        routing = request.routing
        if routing is not None and routing.dp_rank is not None:
            if routing.dp_rank >= len(ranks):
                raise DynamoError.invalid_argument(
                    f"routing.dp_rank {routing.dp_rank} out of range: this worker hosts ranks "
                    f"0..{len(ranks) - 1}"
                )
            return ranks[routing.dp_rank]
        n = len(ranks)
        if n == 1:
            return ranks[0]
        start = self._rr
        self._rr = (start + 1) % n
        # Least loaded; ties go to the next rank in rotation.
        return min((ranks[(start + i) % n] for i in range(n)), key=lambda r: r.scheduler.num_active)

    # -- publishing -----------------------------------------------------------------------
    async def kv_event_sources(self) -> list[KvEventSource]:
        """One push source per rank (none without prefix caching: nothing is published)."""
        return list(self._sources)

    async def setup_metrics(self, ctx: MetricsCtx) -> MetricsBindings:
        if self.role is not DisaggregationMode.AGGREGATED:
            ctx.metrics.add_expfmt_callback(self.kv_transfers.render)
        return MetricsBindings(
            dp_ranks=[r.dp_rank for r in self._ranks],
            on_publisher_ready=self._on_snapshot_publisher,
        )

    def _on_snapshot_publisher(self, publisher: SnapshotPublisher) -> None:
        for rank in self._ranks:
            rank.set_snapshot_publisher(publisher)

    async def health_check_payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "token_ids": [1],
            "stop_conditions": {"max_tokens": 1, "ignore_eos": True},
            "sampling_options": {"temperature": 0.0},
            HEALTH_CHECK_KEY: True,
        }
        if self._puller is not None:
            # No KV to pull: the canary is prefilled locally, as Dynamo's decode canary asks.
            payload["prefill_result"] = {"disaggregated_params": {}}
        return payload

    # -- introspection (tests, benchmarks) ------------------------------------------------
    @property
    def dp_size(self) -> int:
        return len(self._ranks)

    def kv_stats(self, rank: int = 0) -> KvStats:
        """``(used_blocks, cached_blocks, free_blocks, total)`` of one rank's KV cache."""
        return self._ranks[rank].kv.stats()

    def kv_manager(self, rank: int = 0) -> KvManager:
        return self._ranks[rank].kv

    def scheduler(self, rank: int = 0) -> Scheduler:
        return self._ranks[rank].scheduler

    def step_stats(self, rank: int = 0) -> list[StepStats]:
        """The most recent steps of one rank (bounded history), oldest first."""
        return list(self._ranks[rank].scheduler.recent_steps)

    def num_active_requests(self) -> int:
        """Requests waiting or running, over all ranks."""
        return sum(r.scheduler.num_active for r in self._ranks)


def _load_tokenizer(model_path: str | None) -> tuple[Any, str]:
    """``(tokenizers.Tokenizer, "")`` from ``model_path/tokenizer.json``, else ``(None, why)``."""
    if not model_path:
        return None, "the mocker has no tokenizer (give it --model-path DIR with a tokenizer.json)"
    path = os.path.join(model_path, "tokenizer.json")
    if not os.path.isfile(path):
        return None, f"the mocker has no tokenizer: no tokenizer.json in {model_path}"
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(path), ""
    except Exception as exc:  # a corrupt or too-new tokenizer.json must not fail the worker
        log.warning("mocker: cannot load %s, guided decoding is off: %s", path, exc)
        return None, f"the mocker cannot load {path}: {exc}"
