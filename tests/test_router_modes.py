"""Router modes beyond round_robin / random / kv-with-events: Dynamo's spellings, power_of_two,
least_loaded, direct and kv without KV events (approximate). Unit tests of each choice rule,
then one end-to-end test per mode through the real HTTP frontend with two in-process workers."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from dynamo_backend_common import EngineConfig, GenerateContext, LLMEngineOutput
from dynamo_backend_common import PreprocessedRequest as Request
from dynamo_backend_common.engines.echo import EchoEngine
from dynamo_backend_common.errors import BackendError
from dynamo_backend_common.fixtures import tiny_model_dir
from dynamo_backend_common.frontend.http import HttpServer
from dynamo_backend_common.frontend.model_manager import ModelEntry, WorkerEntry
from dynamo_backend_common.frontend.routing import (
    DirectRoutingError,
    Router,
    RouteTarget,
    current_target,
    parse_target,
    route_to,
)
from dynamo_backend_common.frontend.server import Frontend, FrontendConfig
from dynamo_backend_common.kv.hashing import block_hashes
from dynamo_backend_common.protocols.discovery import (
    InstanceInfo,
    ModelCard,
    ModelDeploymentCard,
    RuntimeConfig,
)
from dynamo_backend_common.protocols.kv import KvCacheEvent, KvStored, RouterEvent, StoredBlock
from dynamo_backend_common.router import (
    ROUTER_MODE_SPELLINGS,
    ApproxKvIndexer,
    Direct,
    KvRouter,
    KvRouterConfig,
    LeastLoaded,
    NoWorkersAvailable,
    PowerOfTwo,
    RouteDecision,
    RoutingPolicy,
    WorkerKey,
    make_policy,
    normalize_router_mode,
)
from dynamo_backend_common.runtime.discovery import open_discovery
from dynamo_backend_common.worker import Worker
from dynamo_backend_common.worker.config import ShutdownConfig, WorkerConfig

A, B, C, D = (1, 0), (2, 0), (3, 0), (4, 0)
PROMPT = list(range(64))


def busy(policy: RoutingPolicy, worker: WorkerKey, n: int) -> list[RouteDecision]:
    """Start ``n`` requests on ``worker`` (as if the policy had chosen it)."""
    started = []
    for _ in range(n):
        d = RouteDecision(worker=worker)
        policy.request_started(d)
        started.append(d)
    return started


# -- names ---------------------------------------------------------------------------------------


def test_dynamo_spellings_normalise_to_one_name() -> None:
    expected = {
        "round-robin": "round_robin", "ROUND_ROBIN": "round_robin", " random ": "random",
        "power-of-two": "power_of_two", "power_of_two_choices": "power_of_two",
        "least-loaded": "least_loaded", "KV": "kv", "direct": "direct",
    }
    for spelling, name in expected.items():
        assert normalize_router_mode(spelling) == name
        assert make_policy(spelling, block_size=16).name == name
    assert set(ROUTER_MODE_SPELLINGS) == {"round_robin", "random", "power_of_two",
                                          "least_loaded", "kv", "direct"}
    for bad in ("device-aware-weighted", "p2c", "least loaded", ""):
        with pytest.raises(ValueError, match="power-of-two"):
            normalize_router_mode(bad)


def test_cli_router_flags() -> None:
    from dynamo_backend_common.cli import build_parser

    parser = build_parser()
    args, _ = parser.parse_known_args(
        ["frontend", "--router-mode", "least-loaded", "--no-kv-events", "--router-ttl", "30"])
    assert (args.router_mode, args.kv_events, args.router_ttl_secs) == ("least_loaded", False,
                                                                        30.0)
    args, _ = parser.parse_known_args(["frontend", "--router-mode", "power-of-two"])
    assert (args.router_mode, args.kv_events, args.router_ttl_secs) == ("power_of_two", True,
                                                                        120.0)
    with pytest.raises(SystemExit):
        parser.parse_known_args(["frontend", "--router-mode", "device-aware-weighted"])
    with pytest.raises(SystemExit):
        parser.parse_known_args(["frontend", "--router-ttl", "0"])


# -- least_loaded --------------------------------------------------------------------------------


def test_least_loaded_always_picks_the_idle_worker() -> None:
    ll = LeastLoaded()
    busy(ll, A, 2)
    busy(ll, C, 1)
    for _ in range(12):  # whatever the rotating start, B (idle) wins
        d = ll.select(PROMPT, [A, B, C])
        assert d.worker == B
        assert d.logits == {A: 2, B: 0, C: 1}


def test_least_loaded_balances_what_it_starts_and_frees_on_finish() -> None:
    ll = LeastLoaded()
    sent = []
    for _ in range(30):
        d = ll.select(PROMPT, [A, B, C])
        ll.request_started(d)
        sent.append(d)
    assert Counter(d.worker for d in sent) == {A: 10, B: 10, C: 10}
    for d in sent:
        if d.worker == B:
            ll.request_finished(d)
    assert ll.load(B) == 0 and ll.load(A) == 10
    assert ll.select(PROMPT, [A, B, C]).worker == B


def test_least_loaded_ties_take_turns() -> None:
    ll = LeastLoaded()
    assert [ll.select(PROMPT, [A, B, C]).worker for _ in range(6)] == [A, B, C, A, B, C]
    busy(ll, A, 1)  # A loses every tie it was part of; B and C alternate
    assert [ll.select(PROMPT, [A, B, C]).worker for _ in range(4)] == [B, C, B, C]


# -- power_of_two --------------------------------------------------------------------------------


def test_power_of_two_never_picks_the_most_loaded_of_three_when_two_are_idle() -> None:
    for seed in range(20):
        p2 = PowerOfTwo(random.Random(seed))
        busy(p2, A, 5)
        picks = Counter(p2.select(PROMPT, [A, B, C]).worker for _ in range(60))
        assert A not in picks
    p2 = PowerOfTwo(random.Random(0))
    busy(p2, A, 5)
    picks = Counter(p2.select(PROMPT, [A, B, C]).worker for _ in range(300))
    assert set(picks) == {B, C} and min(picks.values()) > 100  # the idle two share the work


def test_power_of_two_samples_two_distinct_workers() -> None:
    # With two workers the pair is always both of them, so the idle one always wins; a sampler
    # that could draw the same worker twice would sometimes send to the busy one.
    p2 = PowerOfTwo(random.Random(1))
    busy(p2, A, 1)
    for _ in range(500):
        d = p2.select(PROMPT, [A, B])
        assert d.worker == B and d.logits == {A: 1, B: 0}


def test_power_of_two_takes_the_less_loaded_of_its_sample() -> None:
    p2 = PowerOfTwo(random.Random(2))
    for w, n in ((A, 0), (B, 1), (C, 2), (D, 3)):
        busy(p2, w, n)
    picks: Counter[WorkerKey] = Counter()
    for _ in range(3000):
        d = p2.select(PROMPT, [A, B, C, D])
        assert len(d.logits) == 2 and d.logits[d.worker] == min(d.logits.values())
        picks[d.worker] += 1
    assert D not in picks
    # A is chosen exactly when sampled: 1 - C(3,2)/C(4,2) = 1/2 of the time; B when sampled
    # without A: 2/6; C only with D: 1/6.
    assert abs(picks[A] / 3000 - 1 / 2) < 0.05
    assert abs(picks[B] / 3000 - 1 / 3) < 0.05
    assert abs(picks[C] / 3000 - 1 / 6) < 0.05


def test_power_of_two_is_reproducible_and_single_candidate_is_taken() -> None:
    def run(seed: int) -> list[WorkerKey]:
        p2 = PowerOfTwo(random.Random(seed))
        return [p2.select(PROMPT, [A, B, C, D]).worker for _ in range(50)]

    assert run(7) == run(7)
    assert PowerOfTwo().select(PROMPT, [C]).worker == C
    with pytest.raises(NoWorkersAvailable):
        PowerOfTwo().select(PROMPT)


def test_inflight_counts_are_idempotent_shared_and_dropped_with_the_worker() -> None:
    shared: dict[WorkerKey, int] = {}
    p2 = make_policy("power_of_two", inflight=shared, seed=0)
    ll = make_policy("least_loaded", inflight=shared)
    assert isinstance(p2, PowerOfTwo) and isinstance(ll, LeastLoaded)
    d = p2.select(PROMPT, [A])
    p2.request_started(d)
    p2.request_started(d)
    e = RouteDecision(worker=A)
    ll.request_started(e)
    assert shared == {A: 2} and ll.load(A) == 2  # one model's request counts for the other
    p2.request_finished(d)
    p2.request_finished(d)
    assert shared == {A: 1}
    ll.remove_worker(A)
    assert shared == {}
    ll.request_finished(e)  # finishing after the worker left is harmless
    assert shared == {} and ll.load(A) == 0


def test_direct_policy_never_falls_back() -> None:
    direct = make_policy("direct")
    assert isinstance(direct, Direct)
    direct.add_worker(A)
    with pytest.raises(NoWorkersAvailable, match="target"):
        direct.select(PROMPT)
    assert [direct.select(PROMPT, [B, C]).worker for _ in range(3)] == [B, C, B]


# -- kv without KV events ------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def approx_router(clock: Clock, *workers: WorkerKey, ttl: float = 10.0, **kw: Any) -> KvRouter:
    cfg = KvRouterConfig(block_size=4, use_kv_events=False, router_ttl_secs=ttl)
    router = KvRouter(ApproxKvIndexer(ttl, clock=clock, **kw), cfg, random.Random(0))
    for w in workers:
        router.add_worker(w)
    return router


def send(router: KvRouter, tokens: list[int]) -> RouteDecision:
    d = router.select(tokens)
    router.request_started(d)
    router.request_finished(d)
    return d


def test_approx_kv_follows_its_own_decisions_until_the_ttl() -> None:
    clock = Clock()
    router = approx_router(clock, A, B, C)
    first = send(router, PROMPT)
    assert first.overlap_blocks == 0
    for _ in range(5):  # the same prompt again: predicted cached where it went
        d = send(router, PROMPT)
        assert d.worker == first.worker and d.overlap_blocks == 16
        clock.now += 3  # each send restarts the 10 s clock
    assert send(router, [*PROMPT[:32], 999, *PROMPT[33:]]).worker == first.worker  # prefix hit
    clock.now += 10.5
    late = router.select(PROMPT)
    assert late.overlap_blocks == 0  # expired: no prediction left anywhere
    assert router.indexer.find_matches(late.block_hashes) == {}
    assert isinstance(router.indexer, ApproxKvIndexer) and router.indexer.num_predicted == 0


def test_approx_kv_expires_per_block_and_stays_prefix_closed() -> None:
    clock = Clock()
    idx = ApproxKvIndexer(10.0, clock=clock)
    short, long = block_hashes(PROMPT[:16], 4), block_hashes(PROMPT, 4)
    idx.record(A, long)
    clock.now += 6
    idx.record(A, short)  # refreshes the first 4 blocks only
    clock.now += 5  # the long prompt's tail expired, its head did not
    assert idx.find_matches(long) == {A: 4}
    clock.now += 6
    assert idx.find_matches(long) == {}


def test_approx_kv_prunes_the_earliest_to_expire_first() -> None:
    clock = Clock()
    idx = ApproxKvIndexer(100.0, max_blocks=10, prune_target_ratio=0.5, clock=clock)
    p1, p2, p3 = (block_hashes([k, *PROMPT[1:16]], 4) for k in (101, 102, 103))
    for p in (p1, p2, p3):
        idx.record(A, p)
        clock.now += 1
    # 12 > 10: drop 7 down to 5 -- all of p1, then p2's three deepest blocks.
    assert idx.num_predicted == 5
    assert (idx.find_matches(p1), idx.find_matches(p2), idx.find_matches(p3)) == (
        {}, {A: 1}, {A: 4})


def test_approx_kv_prunes_across_workers() -> None:
    """Victims of a prune keep their own worker (they used to be labelled with the last
    worker's key, a KeyError once several workers' predictions passed the cap)."""
    clock = Clock()
    idx = ApproxKvIndexer(100.0, max_blocks=10, prune_target_ratio=0.5, clock=clock)
    p1, p2, p3 = (block_hashes([k, *PROMPT[1:16]], 4) for k in (101, 102, 103))
    for key, p in ((A, p1), (B, p2), (A, p3)):
        idx.record(key, p)
        clock.now += 1
    assert idx.num_predicted == 5
    assert (idx.find_matches(p1), idx.find_matches(p2), idx.find_matches(p3)) == (
        {}, {B: 1}, {A: 4})


def test_approx_kv_ignores_events_and_forgets_departed_workers() -> None:
    clock = Clock()
    router = approx_router(clock, A, B)
    hs = block_hashes(PROMPT, 4)
    router.apply_event(RouterEvent(B[0], KvCacheEvent(0, KvStored(
        blocks=[StoredBlock(h) for h in hs]))))
    assert router.indexer.find_matches(hs) == {}
    d = send(router, PROMPT)
    router.remove_worker(d.worker)
    assert router.indexer.find_matches(hs) == {}
    assert isinstance(router.indexer, ApproxKvIndexer) and router.indexer.num_predicted == 0


def test_approx_kv_config() -> None:
    kv = make_policy("kv", block_size=4, use_kv_events=False, router_ttl_secs=5)
    assert isinstance(kv, KvRouter) and isinstance(kv.indexer, ApproxKvIndexer)
    assert kv.indexer.ttl_secs == 5
    with pytest.raises(TypeError):
        make_policy("kv", block_size=4, use_kv_events=False, indexer=ApproxKvIndexer())
    with pytest.raises(TypeError):
        KvRouter(make_policy("kv", block_size=4).indexer,  # type: ignore[attr-defined]
                 KvRouterConfig(block_size=4, use_kv_events=False))
    with pytest.raises(ValueError):
        KvRouterConfig(block_size=4, router_ttl_secs=0)


# -- the frontend Router: targets, errors, the candidate cache -----------------------------------


class FakeModels:
    def __init__(self) -> None:
        self.models: dict[str, ModelEntry] = {}
        self.listeners: list[Callable[[str, WorkerEntry, bool], None]] = []

    def add_listener(self, fn: Callable[[str, WorkerEntry, bool], None]) -> None:
        self.listeners.append(fn)

    def join(self, model: str, iid: int, dp_size: int = 1) -> WorkerEntry:
        card = ModelCard(namespace="ns", component="c", endpoint="e", instance_id=iid,
                         card_json=ModelDeploymentCard(
                             display_name=model, slug=model, kv_cache_block_size=4,
                             runtime_config=RuntimeConfig(data_parallel_size=dp_size)))
        info = InstanceInfo(component="c", endpoint="e", namespace="ns", instance_id=iid,
                            transport={"tcp": f"127.0.0.1:1/{iid:x}"})
        worker = WorkerEntry(iid, card, info)
        entry = self.models.setdefault(model, ModelEntry(model, card))
        entry.workers[iid] = worker
        for fn in self.listeners:
            fn(model, worker, True)
        return worker

    def leave(self, model: str, iid: int) -> None:
        worker = self.models[model].workers.pop(iid)
        for fn in self.listeners:
            fn(model, worker, False)


def fake_router(mode: str, *iids: int, dp_size: int = 1, **kw: Any) -> tuple[Router, FakeModels]:
    fm = FakeModels()
    router = Router(fm, mode, seed=0, **kw)  # type: ignore[arg-type]
    for iid in iids:
        fm.join("m", iid, dp_size)
    return router, fm


def test_direct_routes_to_the_named_worker_and_rank() -> None:
    router, fm = fake_router("direct", 0x10, 0x20, dp_size=2)
    entry = fm.models["m"]
    with route_to(0x20):
        picks = [router.route("m", entry, PROMPT, set()) for _ in range(4)]
        assert current_target() == RouteTarget(0x20)
    assert current_target() is None
    assert [(r.worker.instance_id, r.dp_rank) for r in picks] == [(0x20, 0), (0x20, 1)] * 2
    r = router.route("m", entry, PROMPT, set(), target=RouteTarget(0x10, 1))
    assert (r.worker.instance_id, r.dp_rank, r.policy.name) == (0x10, 1, "direct")


def test_direct_errors_are_typed_and_never_fall_back() -> None:
    router, fm = fake_router("direct", 0x10, 0x20)
    entry = fm.models["m"]
    with pytest.raises(DirectRoutingError, match="names no worker") as err:
        router.route("m", entry, PROMPT, set())
    assert err.value.kind is BackendError.InvalidArgument and err.value.kind.http_status == 400
    with pytest.raises(DirectRoutingError, match=r"0x30 .* does not serve model 'm'"):
        router.route("m", entry, PROMPT, set(), target=RouteTarget(0x30))
    with pytest.raises(DirectRoutingError, match="no data-parallel rank 1"):
        router.route("m", entry, PROMPT, set(), target=RouteTarget(0x10, 1))
    # The target refused (the engine client excludes it and asks again): no other worker.
    with pytest.raises(LookupError, match="already tried"):
        router.route("m", entry, PROMPT, {0x10}, target=RouteTarget(0x10))
    assert sum(router.decisions.values()) == 0


def test_kv_honours_a_target_and_other_modes_ignore_it() -> None:
    router, fm = fake_router("kv", 0x10, 0x20, kv_events=False)
    entry = fm.models["m"]
    for _ in range(3):
        r = router.route("m", entry, PROMPT, set(), target=RouteTarget(0x20))
        router.finished(r)
        assert r.worker.instance_id == 0x20
    assert r.decision.overlap_blocks == 16  # predicted from the earlier (targeted) requests
    rr, fm2 = fake_router("round_robin", 0x10, 0x20)
    with route_to(0x20):
        assert {rr.route("m", fm2.models["m"], PROMPT, set()).worker.instance_id
                for _ in range(4)} == {0x10, 0x20}


def test_kv_without_events_needs_no_event_plane() -> None:
    router, _ = fake_router("kv", 0x10, kv_events=False)
    assert router.mode == "kv" and not router.kv_events
    with pytest.raises(ValueError, match="event plane"):
        fake_router("kv", 0x10)
    assert fake_router("Least-Loaded")[0].mode == "least_loaded"


def test_candidates_follow_workers_joining_and_leaving() -> None:
    router, fm = fake_router("round_robin", 1, 2)
    entry = fm.models["m"]

    def served(n: int, exclude: set[int] | None = None) -> set[int]:
        return {router.route("m", entry, PROMPT, exclude or set()).worker.instance_id
                for _ in range(n)}

    assert served(4) == {1, 2}
    fm.join("m", 3)
    assert served(6) == {1, 2, 3}
    fm.leave("m", 1)
    assert served(6) == {2, 3}
    assert served(4, {2}) == {3}
    assert served(6) == {2, 3}


def test_load_aware_modes_count_requests_in_flight_through_the_router() -> None:
    router, fm = fake_router("least_loaded", 1, 2)
    entry = fm.models["m"]
    first = router.route("m", entry, PROMPT, set())
    assert router.inflight((first.worker.instance_id, 0)) == 1
    for _ in range(4):  # the other worker is idle every time
        r = router.route("m", entry, PROMPT, set())
        assert r.worker is not first.worker
        router.finished(r)
    router.finished(first)
    assert router.inflight((first.worker.instance_id, 0)) == 0


def test_parse_target() -> None:
    assert parse_target(None) is None
    assert parse_target("255") == RouteTarget(255)
    assert parse_target(" 0xff ", "3") == RouteTarget(255, 3)
    for iid, rank, header in (("abc", None, "x-worker-instance-id"),
                              ("-1", None, "x-worker-instance-id"),
                              (str(2**64), None, "x-worker-instance-id"),
                              ("1", "x", "x-dp-rank"), (None, "1", "x-worker-instance-id")):
        with pytest.raises(DirectRoutingError) as err:
            parse_target(iid, rank)
        assert err.value.header == header


# -- end to end: the HTTP frontend with two in-process workers -----------------------------------

HOLD = 7  # max_tokens that makes a TaggedEngine wait for its gate


class TaggedEngine(EchoEngine):
    """Echo that counts the requests it served (canaries aside) and holds those asking for
    ``HOLD`` tokens until :attr:`gate` is set."""

    def __init__(self, block_size: int | None = None) -> None:
        super().__init__(model_name="tagged")
        self.block_size = block_size
        self.served = 0
        self.active = 0
        self.gate = asyncio.Event()
        #: Set when a held request arrives (what the tests wait on).
        self.holding = asyncio.Event()

    async def start(self, worker_id: int) -> EngineConfig:
        cfg = await super().start(worker_id)
        return dataclasses.replace(cfg, kv_cache_block_size=self.block_size)

    async def generate(self, request: Request, ctx: GenerateContext) -> AsyncIterator[
            LLMEngineOutput]:
        if request.health_check:
            async for out in super().generate(request, ctx):
                yield out
            return
        self.served += 1
        self.active += 1
        try:
            if request.stop_conditions.max_tokens == HOLD:
                self.holding.set()
                await self.gate.wait()
            async for out in super().generate(request, ctx):
                yield out
        finally:
            self.active -= 1


class Stack:
    """A frontend (memory discovery) served by uvicorn, plus in-process workers."""

    def __init__(self, **frontend: Any) -> None:
        self.bus = uuid.uuid4().hex
        self.frontend_options = frontend
        self.workers: list[Worker] = []
        self.engines: list[TaggedEngine] = []
        self.tasks: list[asyncio.Task[int]] = []
        self.servers: list[HttpServer] = []

    async def __aenter__(self) -> Stack:
        self.discovery = open_discovery(f"memory://{self.bus}")
        await self.discovery.start()
        self.frontend = Frontend(FrontendConfig(port=0, **self.frontend_options),
                                 discovery=self.discovery)
        await self.frontend.start()
        self.url = await self.serve(self.frontend.app)
        return self

    async def serve(self, app: Any) -> str:
        server = HttpServer(app, "127.0.0.1", 0)
        await server.start()
        self.servers.append(server)
        return server.url

    async def add_workers(self, n: int, block_size: int | None = None) -> None:
        for _ in range(n):
            engine = TaggedEngine(block_size)
            cfg = WorkerConfig(discovery=f"memory://{self.bus}", events=f"memory://{self.bus}",
                               served_model_name="tagged", model_path=str(tiny_model_dir()),
                               status_port=None,
                               shutdown=ShutdownConfig(total_secs=5, router_grace_secs=0))
            worker = Worker(engine, cfg)
            self.workers.append(worker)
            self.engines.append(engine)
            self.tasks.append(asyncio.create_task(worker.run()))
            await asyncio.wait_for(worker.ready.wait(), 10)
        await self.frontend.wait_for_model("tagged", workers=len(self.workers), timeout=10)

    def served(self) -> list[int]:
        return [e.served for e in self.engines]

    async def __aexit__(self, *exc: object) -> None:
        for engine in self.engines:
            engine.gate.set()
        for server in self.servers:
            await server.stop()
        for w in self.workers:
            w.request_shutdown("test")
        await asyncio.wait_for(asyncio.gather(*self.tasks), 20)
        await self.frontend.close()
        await self.discovery.close()


async def complete(h: httpx.AsyncClient, max_tokens: int = 2, prompt: str = "hello there",
                   headers: dict[str, str] | None = None) -> httpx.Response:
    return await h.post("/v1/completions", headers=headers, json={
        "model": "tagged", "prompt": prompt, "max_tokens": max_tokens})


@pytest.fixture
def hold() -> Iterator[Callable[[Stack, httpx.AsyncClient], Any]]:
    """Start one held request; return (its task, the index of the engine holding it)."""

    async def start(st: Stack, h: httpx.AsyncClient) -> tuple[asyncio.Task[httpx.Response], int]:
        task = asyncio.create_task(complete(h, HOLD))
        waits = [asyncio.ensure_future(e.holding.wait()) for e in st.engines]
        _, pending = await asyncio.wait(waits, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        for w in pending:
            w.cancel()
        held = [i for i, e in enumerate(st.engines) if e.holding.is_set()]
        assert len(held) == 1
        return task, held[0]

    yield start


@pytest.mark.parametrize("mode", ["power-of-two", "least-loaded"])
async def test_load_aware_modes_over_http_avoid_the_busy_worker(
        mode: str, hold: Callable[[Stack, httpx.AsyncClient], Any]) -> None:
    async with Stack(router_mode=mode) as st:
        await st.add_workers(2)
        async with httpx.AsyncClient(base_url=st.url, timeout=10) as h:
            task, busy_i = await hold(st, h)
            for _ in range(6):
                r = await complete(h)
                assert r.status_code == 200, r.text
            idle_i = 1 - busy_i
            assert st.served()[busy_i] == 1 and st.served()[idle_i] == 6
            st.engines[busy_i].gate.set()
            assert (await task).status_code == 200
            if mode == "least-loaded":  # idle again: ties take turns
                before = st.served()
                for _ in range(4):
                    assert (await complete(h)).status_code == 200
                assert [a - b for a, b in zip(st.served(), before, strict=True)] == [2, 2]
        assert st.frontend.router is not None
        assert st.frontend.router.mode == mode.replace("-", "_")


async def test_direct_over_http_serves_on_the_named_worker_only() -> None:
    async with Stack(router_mode="direct") as st:
        await st.add_workers(2)
        url = st.url  # the frontend reads the direct-routing headers itself in this mode
        ids = [w.worker_id for w in st.workers]
        assert None not in ids
        async with httpx.AsyncClient(base_url=url, timeout=10) as h:
            for _ in range(3):
                r = await complete(h, headers={"x-worker-instance-id": str(ids[1])})
                assert r.status_code == 200, r.text
            r = await complete(h, headers={"x-worker-instance-id": f"{ids[0]:#x}",
                                           "x-dp-rank": "0"})
            assert r.status_code == 200, r.text
            assert st.served() == [1, 3]
            unknown = max(i for i in ids if i is not None) + 1
            r = await complete(h, headers={"x-worker-instance-id": str(unknown)})
            assert r.status_code == 400
            assert r.json()["error"]["code"] == "InvalidArgument"
            assert "does not serve model 'tagged'" in r.json()["error"]["message"]
            r = await complete(h, headers={"x-worker-instance-id": str(ids[0]),
                                           "x-dp-rank": "1"})
            assert r.status_code == 400 and "no data-parallel rank 1" in r.text
            r = await complete(h, headers={"x-worker-instance-id": "worker-1"})
            assert r.status_code == 400
            assert r.json()["error"]["param"] == "x-worker-instance-id"
            r = await complete(h)  # no target: an error, not some worker
            assert r.status_code == 400 and "names no worker" in r.text
            assert st.served() == [1, 3]


async def test_kv_without_events_over_http_sticks_to_the_predicted_cache() -> None:
    async with Stack(router_mode="kv", kv_events=False, router_ttl_secs=60) as st:
        await st.add_workers(2, block_size=4)
        router = st.frontend.router
        assert router is not None and not router.kv_events
        prompt = "the quick brown fox jumps over the lazy dog " * 4
        async with httpx.AsyncClient(base_url=st.url, timeout=10) as h:
            for i in range(6):
                r = await complete(h, prompt=prompt)
                assert r.status_code == 200, r.text
                assert router.last is not None
                d = router.last.decision
                assert d.prompt_blocks >= 4
                assert d.overlap_blocks == (0 if i == 0 else d.prompt_blocks)
            assert sorted(st.served()) == [0, 6]
            assert router.events_applied == 0
