"""Several frontend processes, the parts that need no process: the metrics merge (pure, then
over real unix sockets) and router replica sync (messages handed over by hand, then over an
in-process event plane)."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dynamo_backend_common.frontend.metrics import (
    FrontendMetrics,
    MetricsPeers,
    merge_states,
    render_families,
)
from dynamo_backend_common.frontend.model_manager import ModelEntry, WorkerEntry
from dynamo_backend_common.frontend.replica_sync import ReplicaSync, SyncMessage, SyncRoute
from dynamo_backend_common.frontend.replicas import ReplicaOptions, ensure_port_free
from dynamo_backend_common.frontend.routing import Routed, Router
from dynamo_backend_common.protocols.discovery import (
    InstanceInfo,
    ModelCard,
    ModelDeploymentCard,
    RuntimeConfig,
)
from dynamo_backend_common.runtime.events import EventPlane, MemoryEventPlane, Subscription

W1, W2 = 0x11, 0x22
BLOCK = 4


def counter(name: str, value: float, **labels: str) -> tuple[str, str, str, str, list[Any]]:
    return (name, "counter", "doc", "", [(name + "_total", labels, value)])


# -- the metrics merge -------------------------------------------------------------------------


def test_merge_sums_counters_and_histograms_and_takes_shared_gauges_once() -> None:
    hist = [("h_bucket", {"model": "m", "le": "0.1"}, 1.0),
            ("h_bucket", {"model": "m", "le": "+Inf"}, 2.0),
            ("h_count", {"model": "m"}, 2.0), ("h_sum", {"model": "m"}, 0.5)]
    local = [
        ("dynamo_frontend_requests", "counter", "Finished.", "",
         [("dynamo_frontend_requests_total", {"model": "m", "status": "success"}, 3.0),
          ("dynamo_frontend_requests_created", {"model": "m", "status": "success"}, 20.0)]),
        ("h", "histogram", "H.", "", hist),
        ("dynamo_frontend_inflight_requests", "gauge", "In flight.", "",
         [("dynamo_frontend_inflight_requests", {"model": "m"}, 1.0)]),
        ("dynamo_frontend_model_workers", "gauge", "Workers.", "",
         [("dynamo_frontend_model_workers", {"model": "m"}, 2.0)]),
        ("per_pid", "gauge", "Mine.", "", [("per_pid", {"pid": "1"}, 5.0)]),
    ]
    sibling = [
        ("dynamo_frontend_requests", "counter", "Finished.", "",
         [("dynamo_frontend_requests_total", {"status": "success", "model": "m"}, 4.0),
          ("dynamo_frontend_requests_total", {"model": "m", "status": "error"}, 1.0),
          ("dynamo_frontend_requests_created", {"model": "m", "status": "success"}, 10.0)]),
        ("h", "histogram", "H.", "", hist),
        ("dynamo_frontend_inflight_requests", "gauge", "In flight.", "",
         [("dynamo_frontend_inflight_requests", {"model": "m"}, 2.0)]),
        ("dynamo_frontend_model_workers", "gauge", "Workers.", "",
         [("dynamo_frontend_model_workers", {"model": "m"}, 1.0)]),  # lagging view: not taken
        ("per_pid", "gauge", "Mine.", "", [("per_pid", {"pid": "2"}, 7.0)]),
        counter("only_sibling", 9.0),
    ]
    before = repr(local) + repr(sibling)
    merged = {name: {(s[0], tuple(sorted(s[1].items()))): s[2] for s in samples}
              for name, _, _, _, samples in merge_states(local, [sibling])}
    assert repr(local) + repr(sibling) == before  # inputs untouched
    ok = (("model", "m"), ("status", "success"))
    assert merged["dynamo_frontend_requests"] == {
        ("dynamo_frontend_requests_total", ok): 7.0,
        ("dynamo_frontend_requests_created", ok): 10.0,  # the earliest
        ("dynamo_frontend_requests_total", (("model", "m"), ("status", "error"))): 1.0}
    assert merged["h"][("h_bucket", (("le", "+Inf"), ("model", "m")))] == 4.0
    assert merged["h"][("h_sum", (("model", "m"),))] == 1.0
    assert merged["dynamo_frontend_inflight_requests"] == {
        ("dynamo_frontend_inflight_requests", (("model", "m"),)): 3.0}
    assert merged["dynamo_frontend_model_workers"] == {
        ("dynamo_frontend_model_workers", (("model", "m"),)): 2.0}
    assert merged["per_pid"] == {("per_pid", (("pid", "1"),)): 5.0,
                                 ("per_pid", (("pid", "2"),)): 7.0}
    assert merged["only_sibling"] == {("only_sibling_total", ()): 9.0}
    text = render_families(merge_states(local, [sibling])).decode()
    assert 'dynamo_frontend_requests_total{model="m",status="success"} 7.0' in text
    assert "# TYPE h histogram" in text and text.index("dynamo_frontend_requests") < text.index(
        "only_sibling")


def test_merge_of_one_process_is_its_own_render() -> None:
    metrics = FrontendMetrics()
    timer = metrics.request_started("m", 5, 0.0)
    timer.tokens(2, 0.01)
    metrics.request_finished(timer, "m", "completions", False, "success", 2, 0.02)
    from dynamo_backend_common.frontend.metrics import collect_families

    assert render_families(merge_states(collect_families(metrics.registry), [])) == (
        metrics.render())


def finish(metrics: FrontendMetrics, n: int, model: str = "m") -> None:
    for _ in range(n):
        timer = metrics.request_started(model, 3, 0.0)
        metrics.request_finished(timer, model, "chat_completions", True, "success", 1, 0.5)


def value(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {line_start!r} in:\n{text}")


async def test_metrics_peers_merge_over_unix_sockets(tmp_path: Path) -> None:
    a, b, c = FrontendMetrics(), FrontendMetrics(), FrontendMetrics()
    peers = [MetricsPeers(m, tmp_path, str(i)) for i, m in enumerate((a, b, c), 1)]
    for p in peers:
        await p.start()
    try:
        finish(a, 2)
        finish(b, 3)
        finish(c, 4, "other")
        assert a.peers is peers[0]
        for m in (a, b, c):  # whichever answers shows the whole
            text = (await m.scrape()).decode()
            assert value(text, 'dynamo_frontend_requests_total{endpoint="chat_completions",'
                               'model="m"') == 5.0
            assert value(text, 'dynamo_frontend_requests_total{endpoint="chat_completions",'
                               'model="other"') == 4.0
            assert value(text, 'dynamo_frontend_request_duration_seconds_count{model="m"}') == 5
            assert value(text, 'dynamo_frontend_processes{status="up"}') == 3.0
            assert value(text, 'dynamo_frontend_processes{status="down"}') == 0.0
            # one process, one pid here: the per-process counter sums to the whole as well
            assert value(text, "dynamo_frontend_process_requests_total") == 9.0
        # a clean stop removes its socket: no longer expected
        await peers[2].close()
        text = (await a.scrape()).decode()
        assert value(text, 'dynamo_frontend_processes{status="up"}') == 2.0
        assert value(text, 'dynamo_frontend_processes{status="down"}') == 0.0
        assert 'model="other"' not in text
        # a killed one leaves its socket behind, nobody listening: skipped, counted down
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(str(tmp_path / "9.sock"))
        dead.close()
        t0 = time.monotonic()
        text = (await b.scrape()).decode()
        assert time.monotonic() - t0 < peers[1].timeout + 1.0
        assert value(text, 'dynamo_frontend_processes{status="up"}') == 2.0
        assert value(text, 'dynamo_frontend_processes{status="down"}') == 1.0
        assert value(text, 'dynamo_frontend_requests_total{endpoint="chat_completions",'
                           'model="m"') == 5.0
    finally:
        for p in peers:
            await p.close()
    assert a.peers is None and "dynamo_frontend_processes" not in (await a.scrape()).decode()
    assert sorted(os.listdir(tmp_path)) == ["9.sock"]


async def test_a_sibling_that_does_not_answer_in_time_is_skipped(tmp_path: Path) -> None:
    a = FrontendMetrics()
    mine = MetricsPeers(a, tmp_path, "1", timeout=0.2)
    await mine.start()
    accepted: list[asyncio.StreamWriter] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # never answers

    server = await asyncio.start_unix_server(mute, path=str(tmp_path / "2.sock"))
    try:
        finish(a, 1)
        text = (await a.scrape()).decode()
        assert value(text, 'dynamo_frontend_processes{status="down"}') == 1.0
        assert value(text, 'dynamo_frontend_requests_total{endpoint="chat_completions",'
                           'model="m"') == 1.0
    finally:
        for w in accepted:
            w.close()
        server.close()
        await mine.close()


def test_options_and_port_check() -> None:
    assert not ReplicaOptions().sync and ReplicaOptions(1, True).sync
    if sys.platform.startswith("linux"):
        assert ReplicaOptions(2).sync and not ReplicaOptions(2, False).sync
    with pytest.raises(ValueError):
        ReplicaOptions(0)
    busy = socket.create_server(("127.0.0.1", 0))
    try:
        with pytest.raises(OSError):
            ensure_port_free("127.0.0.1", busy.getsockname()[1])
    finally:
        busy.close()
    ensure_port_free("127.0.0.1", 0)


# -- router replica sync -----------------------------------------------------------------------


class FakeModels:
    """A ModelManager stand-in: workers W1 and W2 of model ``m``, block size 4."""

    def __init__(self, *iids: int) -> None:
        self.models: dict[str, ModelEntry] = {}
        self.listeners: list[Callable[[str, WorkerEntry, bool], None]] = []
        self.iids = iids

    def add_listener(self, fn: Callable[[str, WorkerEntry, bool], None]) -> None:
        self.listeners.append(fn)

    def join_all(self) -> None:
        for iid in self.iids:
            card = ModelCard(namespace="ns", component="c", endpoint="e", instance_id=iid,
                             card_json=ModelDeploymentCard(
                                 display_name="m", slug="m", kv_cache_block_size=BLOCK,
                                 runtime_config=RuntimeConfig()))
            info = InstanceInfo(component="c", endpoint="e", namespace="ns", instance_id=iid,
                                transport={"tcp": f"127.0.0.1:1/{iid:x}"})
            worker = WorkerEntry(iid, card, info)
            entry = self.models.setdefault("m", ModelEntry("m", card))
            entry.workers[iid] = worker
            for fn in self.listeners:
                fn("m", worker, True)


class RecordingPlane(EventPlane):
    """Publishes into a list; nothing is delivered unless the test hands it over."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []

    async def start(self) -> None:
        self._started = True

    def publish(self, subject: str, payload: bytes) -> None:
        self.sent.append(payload)

    def subscribe(self, subject: str, *, max_pending: int = 1 << 20) -> Subscription:
        sub = Subscription(subject, max_pending=max_pending)
        sub._set_registered()
        return sub

    async def flush(self) -> None:
        pass

    async def close(self) -> None:
        self._closed = True

    def take(self) -> list[bytes]:
        sent, self.sent = self.sent, []
        return sent


class Replica:
    def __init__(self, mode: str, seed: int, **kw: Any) -> None:
        self.models = FakeModels(W1, W2)
        extra: dict[str, Any] = {"kv_events": False} if mode == "kv" else {}
        self.router = Router(self.models, mode, seed=seed, **extra)  # type: ignore[arg-type]
        self.models.join_all()
        self.plane = RecordingPlane()
        self.sync = ReplicaSync(self.router, self.plane, heartbeat_s=60, peer_timeout_s=120,
                                **kw)

    async def start(self) -> Replica:
        await self.plane.start()
        await self.sync.start()
        return self

    def route(self, tokens: list[int]) -> Routed:
        return self.router.route("m", self.models.models["m"], tokens, set())

    def deliver_to(self, other: Replica) -> None:
        for payload in self.plane.take():
            other.sync.on_message(payload)

    def load(self, routed: Routed, iid: int) -> int:
        """kv: blocks in flight on ``iid`` as this replica's router sees them."""
        return routed.policy.load((iid, 0)).inflight_blocks  # type: ignore[attr-defined,no-any-return]


def prompt(seed: int, n: int = 16) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 1000) for _ in range(n)]


async def pair(mode: str, seed: int = 0) -> tuple[Replica, Replica]:
    a = await Replica(mode, seed).start()
    b = await Replica(mode, seed + 1000).start()
    a.deliver_to(b)  # the hello heartbeats
    b.deliver_to(a)
    return a, b


@pytest.mark.parametrize("mode", ["kv", "least_loaded", "power_of_two"])
async def test_a_replica_routes_away_from_the_worker_another_just_loaded(mode: str) -> None:
    for seed in range(10):  # not luck: every seed
        a, b = await pair(mode, seed)
        first = a.route(prompt(seed))
        await asyncio.sleep(0)  # the end of this loop turn: the batch goes out
        a.deliver_to(b)
        assert b.sync.remote_requests == 1
        second = b.route(prompt(seed + 1))
        assert second.worker.instance_id != first.worker.instance_id, (mode, seed)
        if mode != "kv":
            key = (first.worker.instance_id, 0)
            assert b.router.inflight(key) == 1 and a.router.inflight(key) == 1
        await a.sync.close()
        await b.sync.close()


async def test_without_sync_replicas_herd() -> None:
    """The control: two routers that do not share pick by their own view only, so for some
    seeds both send their request to the same idle worker."""
    same = 0
    for seed in range(20):
        a, b = Replica("kv", seed), Replica("kv", seed + 1000)
        same += a.route(prompt(seed)).worker.instance_id == b.route(
            prompt(seed + 1)).worker.instance_id
    assert same > 0


async def test_remote_requests_leave_the_view_when_they_end() -> None:
    a, b = await pair("kv")
    routed = [a.route(prompt(i)) for i in range(3)]
    a.router.first_token(routed[0])
    await asyncio.sleep(0)
    a.deliver_to(b)
    probe = b.route(prompt(99))
    b.router.finished(probe)
    await asyncio.sleep(0)
    b.plane.take()
    total = sum(b.load(probe, iid) for iid in (W1, W2))
    assert total == 3 * BLOCK
    for r in routed:
        a.router.finished(r)
        a.router.finished(r)  # twice: counted once
    await asyncio.sleep(0)
    a.deliver_to(b)
    assert b.sync.remote_requests == 0
    assert sum(b.load(probe, iid) for iid in (W1, W2)) == 0
    # and its own messages are ignored by a replica
    a.route(prompt(5))
    await asyncio.sleep(0)
    for payload in list(a.plane.sent):
        a.sync.on_message(payload)
    assert a.sync.remote_requests == 0 and a.sync.local_requests == 1


async def test_heartbeat_drops_requests_whose_free_was_lost() -> None:
    a, b = await pair("least_loaded")
    r1, r2 = a.route(prompt(1)), a.route(prompt(2))
    await asyncio.sleep(0)
    a.deliver_to(b)
    assert b.sync.remote_requests == 2
    a.router.finished(r1)
    await asyncio.sleep(0)
    a.plane.take()  # the free is lost
    assert b.sync.remote_requests == 2
    a.sync._heartbeat_soon()
    await asyncio.sleep(0)
    a.deliver_to(b)
    assert b.sync.remote_requests == 1
    assert b.router.inflight((r2.worker.instance_id, 0)) == 1
    assert b.router.inflight((r1.worker.instance_id, 0)) == (
        1 if r1.worker.instance_id == r2.worker.instance_id else 0)


async def test_a_silent_replica_is_dropped_and_a_closing_one_says_goodbye() -> None:
    a, b = await pair("kv")
    c = await Replica("kv", 7).start()
    for r in (a, c):
        r.route(prompt(3))
    await asyncio.sleep(0)
    a.deliver_to(b)
    c.deliver_to(b)
    assert b.sync.remote_requests == 2 and len(b.sync.peers(synced=False)) == 2
    b.sync.expire_peers(time.monotonic() + 1.0)  # within the timeout: nothing happens
    assert b.sync.remote_requests == 2
    # c goes silent (SIGKILL): after the timeout its contribution is gone
    c_id = c.sync.replica_id
    b.sync._peers[c_id].last_seen -= 200
    b.sync.expire_peers(time.monotonic())
    assert b.sync.remote_requests == 1 and c_id not in b.sync.peers(synced=False)
    # a closes: its goodbye drops it at once
    await a.sync.close()
    a.deliver_to(b)
    assert b.sync.remote_requests == 0 and b.sync.peers(synced=False) == []


async def test_a_late_replica_gets_the_requests_already_in_flight() -> None:
    a = await Replica("kv", 1).start()
    a.plane.take()
    routed = [a.route(prompt(i)) for i in range(3)]
    a.router.first_token(routed[1])
    await asyncio.sleep(0)
    a.plane.take()  # nobody heard these
    b = await Replica("kv", 2).start()
    b.deliver_to(a)  # a hears b: a answers with a heartbeat at once
    await asyncio.sleep(0)
    a.deliver_to(b)  # b hears a (and drops nothing: it knows none of a's requests)
    await asyncio.sleep(0)
    assert b.sync.remote_requests == 0
    b.deliver_to(a)  # b's heartbeat says it hears a: a replays what it has in flight
    assert a.sync.peers() == [b.sync.replica_id]
    await asyncio.sleep(0)
    a.deliver_to(b)
    assert b.sync.remote_requests == 3
    probe = b.route(prompt(50))
    assert sum(b.load(probe, iid) for iid in (W1, W2)) == 4 * BLOCK  # 3 remote + the probe
    # the replayed prefill state came along: only two of a's requests still queue prefill
    queued = sum(probe.policy.load((iid, 0)).prefill_blocks  # type: ignore[attr-defined]
                 for iid in (W1, W2))
    assert queued == 2 * BLOCK + BLOCK


async def test_malformed_messages_are_counted_and_dropped() -> None:
    a = await Replica("kv", 1).start()
    a.sync.on_message(b"\x00garbage")
    a.sync.on_message(b"")
    assert a.sync.malformed == 2 and a.sync.remote_requests == 0
    # unknown worker or model: not counted, nothing raised
    import msgspec

    bogus = SyncMessage(replica=5, seq=0, added=[
        SyncRoute(1, "m", 0x99, 0, 4, 0, 4, [1, 2, 3, 4]),
        SyncRoute(2, "nope", W1, 0, 4, 0, 4, [1, 2, 3, 4]),
        SyncRoute(3, "m", W1, 7, 4, 0, 4, [1, 2, 3, 4])])
    a.sync.on_message(msgspec.msgpack.encode(bogus))
    assert a.sync.remote_requests == 0 and a.sync.malformed == 2


async def test_replica_sync_over_an_event_plane() -> None:
    """Two routers on one in-process event plane find each other by heartbeats and share a
    request (real subscriptions and timers, short heartbeats)."""
    name = f"replicas-{os.getpid()}-{random.getrandbits(32)}"
    planes = [MemoryEventPlane(name), MemoryEventPlane(name)]
    routers, syncs = [], []
    for i, plane in enumerate(planes):
        await plane.start()
        models = FakeModels(W1, W2)
        router = Router(models, "kv", kv_events=False, seed=i)  # type: ignore[arg-type]
        models.join_all()
        sync = ReplicaSync(router, plane, heartbeat_s=0.05, peer_timeout_s=1.0)
        await sync.start()
        routers.append((router, models))
        syncs.append(sync)

    try:
        for (r, _), s in zip(routers, syncs, strict=True):
            await r.wait_for(lambda s=s: len(s.peers()) == 1, 5.0)  # type: ignore[misc]
        router, models = routers[0]
        router2, models2 = routers[1]
        first = router.route("m", models.models["m"], prompt(1), set())
        await router2.wait_for(lambda: syncs[1].remote_requests == 1, 5.0)
        second = router2.route("m", models2.models["m"], prompt(2), set())
        assert second.worker.instance_id != first.worker.instance_id
        router.finished(first)
        await router2.wait_for(lambda: syncs[1].remote_requests == 0, 5.0)
        await syncs[0].close()
        await router2.wait_for(lambda: syncs[1].peers(synced=False) == [], 5.0)
    finally:
        for s in syncs:
            await s.close()
        for p in planes:
            await p.close()


def test_cli_flags() -> None:
    from dynamo_backend_common.cli import build_parser

    parser = build_parser()
    args, _ = parser.parse_known_args(["frontend"])
    assert (args.processes, args.router_replica_sync) == (1, None)
    args, _ = parser.parse_known_args(["frontend", "--processes", "4", "--no-router-replica-sync"])
    assert (args.processes, args.router_replica_sync) == (4, False)
    args, _ = parser.parse_known_args(["run", "--engine", "echo", "--frontend-processes", "3",
                                       "--router-replica-sync"])
    assert (args.frontend_processes, args.router_replica_sync) == (3, True)
    args, _ = parser.parse_known_args(["run", "--engine", "echo"])
    assert (args.frontend_processes, args.router_replica_sync) == (1, None)
    for bad in (["frontend", "--processes", "0"], ["run", "--engine", "echo",
                                                    "--frontend-processes", "-1"]):
        with pytest.raises(SystemExit):
            parser.parse_known_args(bad)


async def test_a_replica_timed_out_by_mistake_is_resynced() -> None:
    """b's loop stalled past the timeout and dropped a, though a is alive: a's next message
    makes b hear it anew and ask for a replay, which restores a's requests in b's view."""
    a, b = await pair("kv")
    for i in range(2):
        a.route(prompt(i))
    await asyncio.sleep(0)
    a.deliver_to(b)
    b.deliver_to(a)
    await asyncio.sleep(0)
    a.deliver_to(b)
    assert b.sync.remote_requests == 2
    b.sync._peers[a.sync.replica_id].last_seen -= 200
    b.sync.expire_peers(time.monotonic())
    assert b.sync.remote_requests == 0
    a.sync._heartbeat_soon()
    await asyncio.sleep(0)
    a.deliver_to(b)  # b hears a again; its next message asks a to resync
    await asyncio.sleep(0)
    b.deliver_to(a)
    await asyncio.sleep(0)
    a.deliver_to(b)
    assert b.sync.remote_requests == 2
