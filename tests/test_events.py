"""Event plane: subjects, the in-process plane, the ZMQ plane over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zmq

from dynamo_backend_common.runtime.discovery import Discovery, open_discovery
from dynamo_backend_common.runtime.events import (
    EVENT_CHANNELS_PREFIX,
    EVENT_SOURCES_PREFIX,
    EventPlane,
    MemoryEventPlane,
    Message,
    NatsEventPlane,
    SubjectPattern,
    Subscription,
    ZmqEventPlane,
    component_subject,
    decode_segment,
    encode_segment,
    kv_events_subject,
    kv_metrics_subject,
    open_event_plane,
    parse_component_subject,
    validate_subject,
)
from dynamo_backend_common.runtime.events.dynamo_wire import (
    EndpointRef,
    EventChannel,
    EventScope,
    EventTransport,
    channel_key,
    encode_frames,
    encode_record,
    random_publisher_id,
)

TIMEOUT = 5.0
_names = itertools.count()


def bus_name() -> str:
    """A fresh memory bus per test, so tests never see each other's messages."""
    return f"test-events-{next(_names)}"


async def recv(sub: Subscription, timeout: float = TIMEOUT) -> Message:
    return await asyncio.wait_for(anext(sub), timeout)


async def recv_until(sub: Subscription, subject: str, payload: bytes) -> list[Message]:
    """Every message up to and including ``(subject, payload)``."""
    out: list[Message] = []
    while True:
        msg = await recv(sub)
        out.append(msg)
        if msg == (subject, payload):
            return out


# -- subjects -----------------------------------------------------------------------------------
def test_subject_helpers() -> None:
    assert kv_events_subject("dynamo", "backend") == "namespace.dynamo.component.backend.kv-events"
    assert kv_metrics_subject("dynamo", "backend") == (
        "namespace.dynamo.component.backend.kv_metrics"
    )
    # Dots, spaces and non-ASCII would split or break a subject token: percent-encoded (UTF-8).
    assert encode_segment("my.ns") == "my%2Ens"
    assert encode_segment("a b/é") == "a%20b%2F%C3%A9"
    assert encode_segment("ok_Name-1") == "ok_Name-1"
    assert kv_events_subject("a.b", "c d") == "namespace.a%2Eb.component.c%20d.kv-events"
    validate_subject(kv_events_subject("a.b", "c d"), wildcards=False)


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        ("a.b", "a.b", True),
        ("a.b", "a.bc", False),
        ("a.b", "a", False),
        ("a.>", "a.b", True),
        ("a.>", "a.b.c", True),
        ("a.>", "a", False),  # NATS: '>' needs at least one token
        ("a.>", "ab.c", False),
        (">", "x", True),
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.*.c", "a.x.c", True),
        ("a.*.c", "a.x.d", False),
        ("*.b.>", "z.b.c.d", True),
        ("*.b.>", "z.c.c.d", False),
    ],
)
def test_subject_pattern(pattern: str, subject: str, expected: bool) -> None:
    assert SubjectPattern(pattern).matches(subject) is expected


def test_subject_pattern_literal_prefix() -> None:
    assert SubjectPattern("a.b").literal_prefix == "a.b"
    assert SubjectPattern("a.b.>").literal_prefix == "a.b."
    assert SubjectPattern("a.*.c").literal_prefix == "a."
    assert SubjectPattern(">").literal_prefix == ""


@pytest.mark.parametrize("bad", ["", "a..b", ".a", "a.", "a b", "a.>.b"])
def test_invalid_subjects(bad: str) -> None:
    with pytest.raises(ValueError):
        validate_subject(bad, wildcards=True)


def test_published_subjects_have_no_wildcards() -> None:
    with pytest.raises(ValueError, match="wildcards"):
        validate_subject("a.*", wildcards=False)


# -- open_event_plane ---------------------------------------------------------------------------
async def test_open_event_plane_urls() -> None:
    assert isinstance(open_event_plane(None), MemoryEventPlane)
    assert isinstance(open_event_plane(""), MemoryEventPlane)
    named = open_event_plane("memory://x")
    assert isinstance(named, MemoryEventPlane) and named.name == "x"
    nats_plane = open_event_plane("nats://h1:4222,h2:4223")
    assert isinstance(nats_plane, NatsEventPlane)
    assert nats_plane.servers == ["nats://h1:4222", "nats://h2:4223"]
    with pytest.raises(ValueError, match="discovery"):
        open_event_plane("zmq://")
    discovery = open_discovery(f"memory://{bus_name()}")
    zmq_plane = open_event_plane("zmq://", discovery=discovery, endpoint="gen")
    assert isinstance(zmq_plane, ZmqEventPlane) and zmq_plane.endpoint == "gen"
    for bad in ("bogus://x", "no-scheme", "zmq://h:1", "nats://"):
        with pytest.raises(ValueError):
            open_event_plane(bad, discovery=discovery)


# -- memory plane -------------------------------------------------------------------------------
@pytest.fixture
async def memory_pair() -> AsyncIterator[tuple[EventPlane, EventPlane]]:
    name = bus_name()
    async with open_event_plane(f"memory://{name}") as a, open_event_plane(f"memory://{name}") as b:
        yield a, b


async def test_memory_round_trip_between_planes(memory_pair: tuple[EventPlane, EventPlane]) -> None:
    a, b = memory_pair
    sub = b.subscribe("x.y")
    await sub.ready()
    a.publish("x.y", b"hello")
    assert await recv(sub) == Message("x.y", b"hello")
    msg = Message("x.y", b"hello")
    assert (msg.subject, msg.payload) == ("x.y", b"hello")


async def test_memory_buses_are_isolated_by_name() -> None:
    async with (
        open_event_plane(f"memory://{bus_name()}") as a,
        open_event_plane(f"memory://{bus_name()}") as b,
    ):
        sub = b.subscribe("s")
        a.publish("s", b"lost")
        b.publish("s", b"mine")
        assert await recv(sub) == Message("s", b"mine")


async def test_memory_wildcards(memory_pair: tuple[EventPlane, EventPlane]) -> None:
    a, b = memory_pair
    below = b.subscribe("a.>")
    one = b.subscribe("a.*")
    exact = b.subscribe("a")
    for subject in ("a", "a.b", "ab.c", "a.b.c", "b.a"):
        a.publish(subject, subject.encode())
    a.publish("a.end", b"end")
    a.publish("a", b"end")
    assert [m.subject for m in await recv_until(below, "a.end", b"end")] == [
        "a.b",
        "a.b.c",
        "a.end",
    ]
    assert [m.subject for m in await recv_until(one, "a.end", b"end")] == ["a.b", "a.end"]
    assert [m.payload for m in await recv_until(exact, "a", b"end")] == [b"a", b"end"]


async def test_memory_ordering_10k(memory_pair: tuple[EventPlane, EventPlane]) -> None:
    a, b = memory_pair
    sub = b.subscribe("seq.>")
    n = 10_000
    for i in range(n):
        a.publish(f"seq.{i % 2}", i.to_bytes(4, "big"))
    got = [int.from_bytes((await recv(sub)).payload, "big") for _ in range(n)]
    assert got == list(range(n))
    assert sub.dropped == 0


async def test_memory_slow_consumer_drops_beyond_max_pending(
    memory_pair: tuple[EventPlane, EventPlane],
) -> None:
    a, b = memory_pair
    sub = b.subscribe("s", max_pending=3)
    for i in range(5):
        a.publish("s", bytes([i]))
    assert sub.dropped == 2
    assert [(await recv(sub)).payload for _ in range(3)] == [b"\x00", b"\x01", b"\x02"]


async def test_subscription_close_ends_iteration_and_unsubscribes(
    memory_pair: tuple[EventPlane, EventPlane],
) -> None:
    a, b = memory_pair
    sub = b.subscribe("s")
    other = b.subscribe("s")
    waiting = asyncio.create_task(anext(sub, None))
    await asyncio.sleep(0)  # one loop turn: the task runs until it blocks in __anext__
    assert sub._waiter is not None and not waiting.done()
    await sub.close()
    assert await asyncio.wait_for(waiting, TIMEOUT) is None
    await sub.close()  # idempotent
    a.publish("s", b"after")
    assert await recv(other) == Message("s", b"after")
    assert sub.closed
    with pytest.raises(RuntimeError):
        await sub.ready()


async def test_plane_close_ends_subscriptions_and_drops_late_publishes() -> None:
    plane = open_event_plane(f"memory://{bus_name()}")
    with pytest.raises(RuntimeError, match="before start"):
        plane.publish("s", b"x")
    with pytest.raises(RuntimeError, match="before start"):
        plane.subscribe("s")
    await plane.start()
    sub = plane.subscribe("s")
    async with sub:
        await plane.close()
        assert [m async for m in sub] == []
        plane.publish("s", b"dropped silently")  # a shutdown race, not an error
        with pytest.raises(RuntimeError, match="closed"):
            plane.subscribe("s")
        await plane.close()  # idempotent


# -- ZMQ plane (Dynamo 1.6.1's form) ----------------------------------------------------------
NS, COMP = "ns1", "backend"
KV = kv_events_subject(NS, COMP)
LOAD = kv_metrics_subject(NS, COMP)
OTHER = component_subject(NS, COMP, "other-topic")


@pytest.fixture(params=["memory", "file"])
async def discovery_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return f"memory://{bus_name()}"
    return f"file://{tmp_path / 'kv'}"


async def probe(publisher: EventPlane, sub: Subscription, subject: str) -> None:
    """Publish probes until one arrives (ZMQ's slow joiner), then a fence, and consume up to it,
    so that the next message ``sub`` yields is the next one published. Bounded by TIMEOUT."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    for i in itertools.count():
        publisher.publish(subject, b"probe%d" % i)
        try:
            await asyncio.wait_for(anext(sub), 0.05)
            break
        except TimeoutError:
            if loop.time() > deadline:
                raise AssertionError("no probe arrived: the SUB never connected") from None
    publisher.publish(subject, b"fence")
    await recv_until(sub, subject, b"fence")


def test_component_subjects_round_trip() -> None:
    assert parse_component_subject(KV) == (NS, COMP, "kv-events")
    assert parse_component_subject(component_subject("a.b", "c d/é", "t")) == ("a.b", "c d/é", "t")
    assert decode_segment(encode_segment("x.y%z")) == "x.y%z"
    for bad in ("a.b", "namespace.x.component.y", "namespace..component.y.t", "ns.x.component.y.t"):
        assert parse_component_subject(bad) is None


async def test_zmq_plane_between_two_planes(discovery_url: str) -> None:
    async with (
        open_discovery(discovery_url) as d1,
        open_discovery(discovery_url) as d2,
        open_event_plane("zmq://", discovery=d1, endpoint="gen") as pub_plane,
        open_event_plane("zmq://", discovery=d2) as sub_plane,
    ):
        assert isinstance(pub_plane, ZmqEventPlane) and isinstance(sub_plane, ZmqEventPlane)
        sub = sub_plane.subscribe(f"namespace.{NS}.component.{COMP}.>")
        exact = sub_plane.subscribe(KV)
        await sub.ready()
        pub_plane.publish(KV, b"")  # binds and announces the channel
        pub_plane.publish(OTHER, b"")
        await pub_plane.flush()
        await probe(pub_plane, sub, OTHER)
        await probe(pub_plane, exact, KV)

        n = 2_000
        for i in range(n):
            pub_plane.publish(OTHER, i.to_bytes(4, "big"))
            pub_plane.publish(LOAD, b"not subscribed exactly")
        pub_plane.publish(KV, b"end")
        # One PUB per topic: ordering holds per subject, not across subjects.
        got = [m for m in await recv_until(sub, KV, b"end") if m.subject == OTHER]
        while len(got) < n:
            got.append(await recv(sub))
            if got[-1].subject != OTHER:
                got.pop()
        assert [int.from_bytes(m.payload, "big") for m in got] == list(range(n))
        assert await recv(exact) == Message(KV, b"end")
        assert sub.dropped == 0 and sub_plane.sequence_gaps == 0 and sub_plane.malformed == 0
        assert set(pub_plane.publishers) == {KV, OTHER, LOAD}


async def test_zmq_plane_announces_dynamo_records(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_EVENT_PLANE_HOST", "127.0.0.1")
    async with (
        open_discovery(f"memory://{bus_name()}") as d,
        open_event_plane("zmq://", discovery=d, endpoint="generate") as plane,
    ):
        assert isinstance(plane, ZmqEventPlane) and plane.host == "127.0.0.1"
        plane.publish(KV, b"x")
        plane.publish(LOAD, b"y")
        await plane.flush()
        (kv_pid, kv_addr), (load_pid, load_addr) = plane.publishers[KV], plane.publishers[LOAD]
        assert kv_pid != load_pid and kv_addr != load_addr and 0 < kv_pid < 2**53
        assert kv_addr.startswith("tcp://127.0.0.1:")
        channels = await d.get_prefix(EVENT_CHANNELS_PREFIX)
        scope = {"kind": "endpoint",
                 "endpoint": {"namespace": NS, "component": COMP, "name": "generate"}}
        base = f"namespace/{NS}/component/{COMP}/endpoint/generate/topic"
        assert json.loads(channels[f"{EVENT_CHANNELS_PREFIX}{base}/kv-events/{kv_pid:x}"]) == {
            "type": "EventChannel", "scope": scope, "topic": "kv-events", "instance_id": kv_pid,
            "transport": {"kind": "Zmq", "config": {"endpoint": kv_addr}}}
        assert f"{EVENT_CHANNELS_PREFIX}{base}/kv_metrics/{load_pid:x}" in channels
        sources = await d.get_prefix(EVENT_SOURCES_PREFIX)
        assert list(sources) == [f"{EVENT_SOURCES_PREFIX}{base}/kv-events/{kv_pid:x}"]
        value = next(iter(sources.values()))
        assert b" " not in value and not value.endswith(b"\n")
        assert json.loads(value) == {
            "type": "EventSource", "scope": scope, "topic": "kv-events", "publisher_id": kv_pid,
            "metadata": {"kv_state_endpoint": scope["endpoint"],
                         "worker": {"worker_id": d.instance_id, "dp_rank": 0},
                         "publisher_id": kv_pid}}
        with pytest.raises(ValueError, match="namespace"):
            plane.publish("not.a.component.subject", b"")
    # close() deleted the records
    async with open_discovery(f"memory://{bus_name()}") as d2:
        assert await d2.get_prefix("v1/") == {}


async def test_zmq_plane_follows_discovery(discovery_url: str) -> None:
    """A subscriber connects to a publisher announced later and drops it when it leaves."""
    async with (
        open_discovery(discovery_url) as d1,
        open_discovery(discovery_url) as d2,
        open_event_plane("zmq://", discovery=d2) as sub_plane,
    ):
        assert isinstance(sub_plane, ZmqEventPlane)
        sub = sub_plane.subscribe(LOAD)
        await sub.ready()
        pub_plane = open_event_plane("zmq://", discovery=d1)
        await pub_plane.start()
        await probe(pub_plane, sub, LOAD)
        assert isinstance(pub_plane, ZmqEventPlane)
        pid = pub_plane.publishers[LOAD][0]
        assert pid in sub_plane._by_publisher
        await pub_plane.close()
        assert await d1.get_prefix(EVENT_CHANNELS_PREFIX) == {}
        await asyncio.wait_for(
            sub_plane._wait_for(lambda: pid not in sub_plane._by_publisher), TIMEOUT)
        assert sub_plane._followed == {}  # its socket was closed


async def test_zmq_plane_unsubscribe_disconnects_unwanted_channels() -> None:
    async with (
        open_discovery(f"memory://{bus_name()}") as d,
        open_event_plane("zmq://", discovery=d) as plane,
    ):
        assert isinstance(plane, ZmqEventPlane)
        a = plane.subscribe(KV)
        b = plane.subscribe(LOAD)
        plane.publish(KV, b"")
        plane.publish(LOAD, b"")
        await plane.flush()
        await probe(plane, a, KV)
        await probe(plane, b, LOAD)
        kv_addr, load_addr = plane.publishers[KV][1], plane.publishers[LOAD][1]
        kv_sock = plane._followed[kv_addr].sock
        assert {a: f.topics for a, f in plane._followed.items()} == {
            kv_addr: {b"kv-events": 1}, load_addr: {b"kv_metrics": 1}}  # a socket per address
        await a.close()
        assert {a: f.topics for a, f in plane._followed.items()} == {load_addr: {b"kv_metrics": 1}}
        assert kv_sock.closed
        await probe(plane, b, LOAD)


async def test_zmq_plane_receives_its_own_messages() -> None:
    async with (
        open_discovery(f"memory://{bus_name()}") as d,
        open_event_plane("zmq://", discovery=d) as plane,
    ):
        sub = plane.subscribe(KV)
        plane.publish(KV, b"")
        await plane.flush()
        await probe(plane, sub, KV)


class RawPublisher:
    """A hand-made Dynamo-style publisher: its own PUB socket and discovery records."""

    def __init__(self, d: Discovery, topic: str, endpoint: str = "generate") -> None:
        self.sock = zmq.Context.instance().socket(zmq.PUB)
        self.sock.bind("tcp://127.0.0.1:0")
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.pid = random_publisher_id()
        self.topic = topic
        self.d = d
        self.key = channel_key(NS, COMP, endpoint, topic, self.pid)
        self.record = EventChannel(EventScope("endpoint", EndpointRef(NS, COMP, endpoint)), topic,
                                   self.pid, EventTransport.zmq(self.address))

    async def announce(self) -> None:
        await self.d.put(self.key, encode_record(self.record))

    def send(self, seq: int, payload: bytes) -> None:
        self.sock.send_multipart(encode_frames(self.topic, self.pid, seq, payload))

    def send_raw(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def close(self) -> None:
        self.sock.close(0)


async def _raw_probe(raw: RawPublisher, sub: Subscription, start: int) -> int:
    """Like :func:`probe` for a raw publisher; returns the next sequence number."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    seq = start
    while True:
        raw.send(seq, b"probe")
        seq += 1
        try:
            await asyncio.wait_for(anext(sub), 0.05)
            return seq
        except TimeoutError:
            if loop.time() > deadline:
                raise AssertionError("no probe arrived") from None


async def test_zmq_plane_follows_a_foreign_publisher_and_counts_trouble(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A channel announced by someone else (as a Dynamo worker would): messages arrive with the
    envelope's payload; malformed ones are counted and logged once, never fatal; sequence gaps
    are counted; an undecodable record is skipped."""
    async with (
        open_discovery(f"memory://{bus_name()}") as d,
        open_event_plane("zmq://", discovery=d) as plane,
    ):
        assert isinstance(plane, ZmqEventPlane)
        raw = RawPublisher(d, "kv-events", endpoint="other-ep")
        try:
            await d.put(f"{EVENT_CHANNELS_PREFIX}garbage/1", b"{not json")
            await raw.announce()
            sub = plane.subscribe(KV)
            await sub.ready()
            assert plane.bad_records == 1
            seq = await _raw_probe(raw, sub, 0)
            good = encode_frames("kv-events", raw.pid, seq, b"payload")
            bad_version = [*good[:3], b"\x02" + good[3][1:]]
            short = [*good[:3], good[3][:-1]]
            with caplog.at_level(logging.WARNING, "dynamo_backend_common.runtime.events"):
                raw.send_raw(good)
                raw.send_raw(good[:3])  # 3 frames
                raw.send_raw(bad_version)
                raw.send_raw(short)
                raw.send_raw([*good[:3], b"\x01\x00\x00\x00\x02\xc1\xc1"])  # not msgpack
                raw.send_raw([good[0], good[1], (seq + 7).to_bytes(8, "big"), good[3]])
                raw.send(seq + 1, b"after")  # follows the previous good one: no gap counted
            assert await recv(sub) == Message(KV, b"payload")
            assert await recv(sub) == Message(KV, b"after")
            assert plane.malformed == 5  # the last raw one's envelope disagrees with frame 2
            assert plane.sequence_gaps == 0
            raw.send(seq + 5, b"gap")
            assert await recv(sub) == Message(KV, b"gap")
            assert plane.sequence_gaps == 1
            malformed_lines = [r for r in caplog.records if "malformed message" in r.getMessage()]
            assert len(malformed_lines) == 1  # rate-limited
            await d.delete(raw.key)
            await asyncio.wait_for(plane._wait_for(lambda: not plane._by_publisher), TIMEOUT)
        finally:
            raw.close()


async def _raw_recv(raw: RawPublisher, sub: Subscription, seq: int, payload: bytes) -> int:
    """Send ``payload`` from ``raw`` until it arrives (skipping anything else); returns the next
    sequence number."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while True:
        raw.send(seq, payload)
        seq += 1
        try:
            while (await asyncio.wait_for(anext(sub), 0.05)).payload != payload:
                pass
            return seq
        except TimeoutError:
            if loop.time() > deadline:
                raise AssertionError(f"{payload!r} never arrived") from None


async def test_zmq_plane_unfollowing_a_publisher_closes_only_its_own_socket() -> None:
    """Every followed address has a SUB socket of its own: dropping a channel while a message
    of it is half read (EVENTS prefetches its first frame) closes that socket, never
    disconnect()s a pipe of a socket other publishers share (libzmq 4.3 aborts the process
    then: ``!_more (src/fq.cpp:80)``); the others keep their sockets and keep delivering.
    Channels announced at one address share its socket, with per-topic refcounts."""
    async with (
        open_discovery(f"memory://{bus_name()}") as d,
        open_event_plane("zmq://", discovery=d) as plane,
    ):
        assert isinstance(plane, ZmqEventPlane)
        a, b = RawPublisher(d, "kv-events"), RawPublisher(d, "kv-events")
        # A second channel at b's address (another topic, another publisher id).
        b_load = EventChannel(EventScope("endpoint", EndpointRef(NS, COMP, "generate")),
                              "kv_metrics", random_publisher_id(), EventTransport.zmq(b.address))
        b_load_key = channel_key(NS, COMP, "generate", "kv_metrics", b_load.instance_id)
        try:
            await a.announce()
            await b.announce()
            await d.put(b_load_key, encode_record(b_load))
            sub = plane.subscribe(f"namespace.{NS}.component.{COMP}.>")
            await sub.ready()
            seq_a = await _raw_recv(a, sub, 0, b"a")
            seq_b = await _raw_recv(b, sub, 0, b"b")
            fa, fb = plane._followed[a.address], plane._followed[b.address]
            assert plane._followed == {a.address: fa, b.address: fb} and fa.sock is not fb.sock
            assert (fa.refs, fa.topics) == (1, {b"kv-events": 1})
            assert (fb.refs, fb.topics) == (2, {b"kv-events": 1, b"kv_metrics": 1})

            a.send(seq_a, b"half read")
            assert fa.sock.poll(int(TIMEOUT * 1000)) == zmq.POLLIN  # its first frame prefetched
            await d.delete(a.key)
            await asyncio.wait_for(
                plane._wait_for(lambda: a.address not in plane._followed), TIMEOUT)
            assert fa.sock.closed and not fb.sock.closed and plane._followed == {b.address: fb}
            assert a.pid not in plane._by_publisher
            seq_b = await _raw_recv(b, sub, seq_b, b"b still delivers")

            await d.delete(b_load_key)  # b's socket stays for its other channel
            await asyncio.wait_for(plane._wait_for(lambda: fb.refs == 1), TIMEOUT)
            assert plane._followed == {b.address: fb} and fb.topics == {b"kv-events": 1}
            await _raw_recv(b, sub, seq_b, b"b after its other channel went")

            await a.announce()  # followed again, on a new socket
            await asyncio.wait_for(
                plane._wait_for(lambda: a.address in plane._followed), TIMEOUT)
            assert plane._followed[a.address] is not fa
            await _raw_recv(a, sub, seq_a + 1, b"a again")
            assert plane.malformed == 0 and plane.sequence_gaps == 0
        finally:
            a.close()
            b.close()
    assert fb.sock.closed and plane._followed == {}  # close() closed the rest


async def test_zmq_plane_needs_started_discovery() -> None:
    d: Discovery = open_discovery(f"memory://{bus_name()}")
    plane = open_event_plane("zmq://", discovery=d)
    with pytest.raises(RuntimeError, match="started Discovery"):
        await plane.start()
    await plane.close()
    await d.close()


async def test_zmq_plane_ready_fails_once_discovery_is_gone() -> None:
    d = open_discovery(f"memory://{bus_name()}")
    await d.start()
    async with open_event_plane("zmq://", discovery=d) as plane:
        assert isinstance(plane, ZmqEventPlane)
        sub = plane.subscribe(KV)
        await sub.ready()
        await d.close()  # ends the plane's watch: it can no longer find publishers
        await asyncio.wait_for(plane._wait_for(lambda: plane._watch_ended), TIMEOUT)
        with pytest.raises(RuntimeError):
            await sub.ready()


async def test_zmq_plane_host_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    d = open_discovery(f"memory://{bus_name()}")
    monkeypatch.setenv("DYN_EVENT_PLANE_HOST", "127.0.0.2")
    plane = open_event_plane("zmq://", discovery=d)
    assert isinstance(plane, ZmqEventPlane)
    assert (plane.host, plane.advertise_host) == ("127.0.0.2", "127.0.0.2")
    explicit = ZmqEventPlane(d, host="0.0.0.0")
    assert explicit.advertise_host == "127.0.0.2"  # a wildcard bind advertises the env host
    assert open_event_plane("zmq://127.0.0.3", discovery=d).host == "127.0.0.3"  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        ZmqEventPlane(d, endpoint="a/b")
