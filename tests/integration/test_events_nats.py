"""The NATS event plane against a real nats-server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest

from dynamo_backend_common.errors import BackendError, DynamoError
from dynamo_backend_common.runtime.events import (
    EventPlane,
    Message,
    NatsEventPlane,
    Subscription,
    open_event_plane,
)

if TYPE_CHECKING:
    from tests.integration.conftest import NatsServer

pytestmark = pytest.mark.integration

TIMEOUT = 10.0
_prefixes = itertools.count()


def prefix() -> str:
    """Subjects of one test: the shared server must not mix tests' messages."""
    return f"t{os.getpid()}x{next(_prefixes)}"


async def recv(sub: Subscription, timeout: float = TIMEOUT) -> Message:
    return await asyncio.wait_for(anext(sub), timeout)


@pytest.fixture
async def planes(nats_url: str) -> AsyncIterator[tuple[EventPlane, EventPlane]]:
    async with open_event_plane(nats_url) as a, open_event_plane(nats_url) as b:
        yield a, b


async def test_round_trip(planes: tuple[EventPlane, EventPlane]) -> None:
    a, b = planes
    p = prefix()
    sub = b.subscribe(f"{p}.hello")
    await sub.ready()
    a.publish(f"{p}.hello", b"world")
    assert await recv(sub) == Message(f"{p}.hello", b"world")
    # The publisher's own subscription sees it too (no_echo is off), in one plane as well.
    own = a.subscribe(f"{p}.hello")
    await own.ready()
    a.publish(f"{p}.hello", b"again")
    assert await recv(own) == Message(f"{p}.hello", b"again")
    assert await recv(sub) == Message(f"{p}.hello", b"again")


async def test_wildcards(planes: tuple[EventPlane, EventPlane]) -> None:
    a, b = planes
    p = prefix()
    below = b.subscribe(f"{p}.a.>")
    one = b.subscribe(f"{p}.a.*")
    await below.ready()
    await one.ready()
    for subject in ("a", "a.b", "ab.c", "a.b.c"):
        a.publish(f"{p}.{subject}", b"")
    a.publish(f"{p}.a.end", b"")
    got_below = [(await recv(below)).subject for _ in range(3)]
    assert got_below == [f"{p}.a.b", f"{p}.a.b.c", f"{p}.a.end"]
    assert [(await recv(one)).subject for _ in range(2)] == [f"{p}.a.b", f"{p}.a.end"]


async def test_10k_messages_arrive_in_order(planes: tuple[EventPlane, EventPlane]) -> None:
    a, b = planes
    p = prefix()
    sub = b.subscribe(f"{p}.seq")
    await sub.ready()
    n = 10_000
    for i in range(n):
        a.publish(f"{p}.seq", i.to_bytes(4, "big"))
    await a.flush()
    got = [int.from_bytes((await recv(sub)).payload, "big") for _ in range(n)]
    assert got == list(range(n))
    assert a.dropped == 0 and sub.dropped == 0


async def test_subscribe_then_publish_on_one_plane_is_ordered(nats_url: str) -> None:
    """A SUB queued before a PUB on the same plane is registered first: no ready() needed."""
    async with open_event_plane(nats_url) as plane:
        p = prefix()
        sub = plane.subscribe(f"{p}.x")
        plane.publish(f"{p}.x", b"first")
        assert await recv(sub) == Message(f"{p}.x", b"first")


async def test_unsubscribe_and_close(planes: tuple[EventPlane, EventPlane]) -> None:
    a, b = planes
    p = prefix()
    gone = b.subscribe(f"{p}.s")
    kept = b.subscribe(f"{p}.s")
    await gone.ready()
    await kept.ready()
    await gone.close()
    a.publish(f"{p}.s", b"1")
    assert await recv(kept) == Message(f"{p}.s", b"1")
    assert await anext(gone, None) is None
    await b.close()
    assert await anext(kept, None) is None
    b.publish(f"{p}.s", b"after close: dropped silently")


async def test_connect_failure_is_typed() -> None:
    plane = NatsEventPlane(["nats://127.0.0.1:1"], connect_timeout=0.5)
    with pytest.raises(DynamoError) as info:
        await plane.start()
    assert info.value.kind is BackendError.CannotConnect
    await plane.close()


async def test_reconnects_after_server_restart(private_nats: NatsServer) -> None:
    server = private_nats
    async with open_event_plane(server.url) as a, open_event_plane(server.url) as b:
        sub = b.subscribe("r.x")
        await sub.ready()
        a.publish("r.x", b"before")
        assert await recv(sub) == Message("r.x", b"before")
        server.stop()
        server.start()
        # Both clients reconnect in the background and re-send their subscriptions; the
        # publisher cannot tell when the subscriber is back: probe until a message lands.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        for i in itertools.count():
            a.publish("r.x", b"after%d" % i)
            try:
                msg = await asyncio.wait_for(anext(sub), 0.2)
            except TimeoutError:
                assert loop.time() < deadline, "no message after the restart"
                continue
            assert msg.payload.startswith(b"after")
            break


async def test_close_is_bounded_when_the_server_is_gone(private_nats: NatsServer) -> None:
    server = private_nats
    plane = NatsEventPlane([server.url], close_timeout=0.5)
    await plane.start()
    sub = plane.subscribe("gone.x")
    await sub.ready()
    server.stop()
    for i in range(1000):
        plane.publish("gone.x", b"%d" % i)
    # A shutdown must not hang on the server: about 2 x close_timeout at most.
    await asyncio.wait_for(plane.close(), 5)
    assert plane.closed and await anext(sub, None) is None
