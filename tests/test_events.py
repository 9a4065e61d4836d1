"""Event plane: subjects, the in-process plane, the ZMQ plane over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dynamo_backend_common.runtime.discovery import Discovery, open_discovery
from dynamo_backend_common.runtime.events import (
    EVENT_CHANNELS_PREFIX,
    EventPlane,
    MemoryEventPlane,
    Message,
    NatsEventPlane,
    SubjectPattern,
    Subscription,
    ZmqEventPlane,
    encode_segment,
    kv_events_subject,
    kv_metrics_subject,
    open_event_plane,
    validate_subject,
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
    zmq_plane = open_event_plane("zmq://", discovery=discovery)
    assert isinstance(zmq_plane, ZmqEventPlane) and zmq_plane.host == "127.0.0.1"
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


# -- ZMQ plane ----------------------------------------------------------------------------------
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


async def test_zmq_plane_between_two_planes(discovery_url: str) -> None:
    async with (
        open_discovery(discovery_url) as d1,
        open_discovery(discovery_url) as d2,
        open_event_plane("zmq://", discovery=d1) as pub_plane,
        open_event_plane("zmq://", discovery=d2) as sub_plane,
    ):
        sub = sub_plane.subscribe("t.>")
        exact = sub_plane.subscribe("t.exact")
        await sub.ready()
        pub_plane.publish("t.probe", b"")  # binds and announces the publisher
        await pub_plane.flush()
        assert isinstance(pub_plane, ZmqEventPlane) and pub_plane.endpoint is not None
        key = f"{EVENT_CHANNELS_PREFIX}{d1.instance_id}"
        assert (await d2.get_prefix(EVENT_CHANNELS_PREFIX))[key] == pub_plane.endpoint.encode()
        await probe(pub_plane, sub, "t.probe")
        await probe(pub_plane, exact, "t.exact")

        n = 2_000
        for i in range(n):
            pub_plane.publish("t.seq", i.to_bytes(4, "big"))
            pub_plane.publish("u.other", b"not for us")
            pub_plane.publish("t.exactly", b"only the wildcard")
        pub_plane.publish("t.exact", b"end")
        got = [m for m in await recv_until(sub, "t.exact", b"end") if m.subject == "t.seq"]
        assert [int.from_bytes(m.payload, "big") for m in got] == list(range(n))
        assert await recv(exact) == Message("t.exact", b"end")  # "t.exactly" filtered out
        assert sub.dropped == 0


async def test_zmq_plane_follows_discovery(discovery_url: str) -> None:
    """A subscriber connects to a publisher announced later and drops it when it leaves."""
    async with (
        open_discovery(discovery_url) as d1,
        open_discovery(discovery_url) as d2,
        open_event_plane("zmq://", discovery=d2) as sub_plane,
    ):
        assert isinstance(sub_plane, ZmqEventPlane)
        sub = sub_plane.subscribe("late")
        await sub.ready()
        pub_plane = open_event_plane("zmq://", discovery=d1)
        await pub_plane.start()
        await probe(pub_plane, sub, "late")
        key = f"{EVENT_CHANNELS_PREFIX}{d1.instance_id}"
        assert key in sub_plane._peers
        await pub_plane.close()
        assert key not in await d1.get_prefix(EVENT_CHANNELS_PREFIX)
        await asyncio.wait_for(sub_plane._wait_for(lambda: key not in sub_plane._peers), TIMEOUT)
        assert sub_plane._endpoint_refs == {}


async def test_zmq_plane_receives_its_own_messages() -> None:
    async with (
        open_discovery(f"memory://{bus_name()}") as d,
        open_event_plane("zmq://", discovery=d) as plane,
    ):
        sub = plane.subscribe("self")
        plane.publish("self", b"")
        await plane.flush()
        await probe(plane, sub, "self")


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
        sub = plane.subscribe("x")
        await sub.ready()
        await d.close()  # ends the plane's watch: it can no longer find publishers
        await asyncio.wait_for(plane._wait_for(lambda: plane._watch_ended), TIMEOUT)
        with pytest.raises(RuntimeError):
            await sub.ready()
