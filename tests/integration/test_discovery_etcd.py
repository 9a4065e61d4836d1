"""Discovery on a real etcd (see the ``etcd_url`` / ``private_etcd`` fixtures in conftest)."""

from __future__ import annotations

import asyncio
import base64
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import httpx
import pytest

from dynamo_backend_common.runtime.discovery import (
    DiscoveryError,
    DiscoveryEvent,
    EtcdDiscovery,
    open_discovery,
)

pytestmark = pytest.mark.integration

TIMEOUT = 10.0


async def next_event(watch: AsyncGenerator[DiscoveryEvent, None]) -> DiscoveryEvent:
    return await asyncio.wait_for(anext(watch), TIMEOUT)


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own: tests share one etcd."""
    return f"test/{uuid.uuid4().hex}/"


@pytest.fixture
async def etcd(etcd_url: str) -> AsyncIterator[list[EtcdDiscovery]]:
    """Opened discoveries to close at the end (append to it)."""
    opened: list[EtcdDiscovery] = []
    yield opened
    for d in opened:
        await d.close()


def open_etcd(url: str, opened: list[EtcdDiscovery], ttl: float = 5) -> EtcdDiscovery:
    d = open_discovery(url, ttl=ttl)
    assert isinstance(d, EtcdDiscovery)
    opened.append(d)
    return d


async def etcd_post(url: str, path: str, body: dict[str, object]) -> dict[str, object]:
    async with httpx.AsyncClient() as client:
        response = await client.post(url + path, json=body, timeout=5)
        response.raise_for_status()
        data: dict[str, object] = response.json()
        return data


async def test_put_get_delete(etcd_url: str, etcd: list[EtcdDiscovery], prefix: str) -> None:
    d = open_etcd(etcd_url.replace("http://", "etcd://"), etcd)
    await d.start()
    assert 0 < d.instance_id < 2**63
    await d.put(prefix + "a/1", b"one")
    await d.put(prefix + "b/2", b"")  # empty values survive (etcd omits them in JSON)
    await d.put(prefix + "a/1", b"uno")
    assert await d.get_prefix(prefix) == {prefix + "a/1": b"uno", prefix + "b/2": b""}
    assert await d.get_prefix(prefix + "a/") == {prefix + "a/1": b"uno"}
    await d.delete(prefix + "a/1")
    await d.delete(prefix + "missing")
    assert await d.get_prefix(prefix) == {prefix + "b/2": b""}
    # The key is bound to the lease whose id is instance_id.
    raw = await etcd_post(
        etcd_url, "/v3/kv/range", {"key": base64.b64encode((prefix + "b/2").encode()).decode()}
    )
    kvs = raw["kvs"]
    assert isinstance(kvs, list) and int(kvs[0]["lease"]) == d.instance_id


async def test_watch_snapshot_then_every_change_in_order(
    etcd_url: str, etcd: list[EtcdDiscovery], prefix: str
) -> None:
    writer, reader = open_etcd(etcd_url, etcd), open_etcd(etcd_url, etcd)
    await writer.start()
    await writer.put(prefix + "b", b"2")
    await writer.put(prefix + "a", b"1")
    await writer.put(prefix + "zz-other/x", b"not under the watched prefix")
    watch = reader.watch_prefix(prefix)
    first = [await next_event(watch) for _ in range(3)]
    assert first == [
        DiscoveryEvent("put", prefix + "a", b"1"),
        DiscoveryEvent("put", prefix + "b", b"2"),
        DiscoveryEvent("put", prefix + "zz-other/x", b"not under the watched prefix"),
    ]
    # Back-to-back changes: etcd's watch delivers each one, in revision order.
    await writer.put(prefix + "c", b"3")
    await writer.put(prefix + "c", b"3'")
    await writer.delete(prefix + "a")
    await writer.put(prefix.rstrip("/") + "-sibling", b"outside the prefix")
    await writer.put(prefix + "d", b"4")
    assert [await next_event(watch) for _ in range(4)] == [
        DiscoveryEvent("put", prefix + "c", b"3"),
        DiscoveryEvent("put", prefix + "c", b"3'"),
        DiscoveryEvent("delete", prefix + "a", None),
        DiscoveryEvent("put", prefix + "d", b"4"),
    ]
    await watch.aclose()
    await writer.delete(prefix.rstrip("/") + "-sibling")


async def test_no_event_lost_between_snapshot_and_stream(
    etcd_url: str, etcd: list[EtcdDiscovery], prefix: str
) -> None:
    writer, reader = open_etcd(etcd_url, etcd), open_etcd(etcd_url, etcd)
    await writer.start()

    async def write_many() -> None:
        for i in range(50):
            await writer.put(f"{prefix}{i:03}", b"x")

    writing = asyncio.ensure_future(write_many())
    watch = reader.watch_prefix(prefix)
    seen: set[str] = set()
    while len(seen) < 50:
        event = await next_event(watch)
        assert event.kind == "put"
        seen.add(event.key)
    await writing
    await watch.aclose()
    assert seen == {f"{prefix}{i:03}" for i in range(50)}


async def test_close_revokes_lease_and_watchers_see_deletes(
    etcd_url: str, etcd: list[EtcdDiscovery], prefix: str
) -> None:
    owner, other, reader = (open_etcd(etcd_url, etcd) for _ in range(3))
    await owner.start()
    await other.start()
    await owner.put(prefix + "1", b"owner")
    await owner.put(prefix + "shared", b"owner first")
    await other.put(prefix + "shared", b"other now")  # now bound to other's lease
    watch = reader.watch_prefix(prefix)
    assert {(await next_event(watch)).key for _ in range(2)} == {prefix + "1", prefix + "shared"}
    await owner.close()
    assert await next_event(watch) == DiscoveryEvent("delete", prefix + "1", None)
    assert await reader.get_prefix(prefix) == {prefix + "shared": b"other now"}
    await owner.close()  # idempotent
    # Closing ends the Discovery's own watches.
    own_watch = other.watch_prefix(prefix)
    assert await next_event(own_watch) == DiscoveryEvent("put", prefix + "shared", b"other now")
    pending = asyncio.ensure_future(anext(own_watch))
    await other.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(pending, TIMEOUT)
    await watch.aclose()


async def test_two_objects_see_each_other(
    etcd_url: str, etcd: list[EtcdDiscovery], prefix: str
) -> None:
    a, b = open_etcd(etcd_url, etcd), open_etcd(etcd_url, etcd)
    await a.start()
    await b.start()
    assert a.instance_id != b.instance_id
    watch = b.watch_prefix(prefix)
    await a.put(prefix + "a", b"A")
    assert await next_event(watch) == DiscoveryEvent("put", prefix + "a", b"A")
    await b.put(prefix + "b", b"B")
    assert await a.get_prefix(prefix) == {prefix + "a": b"A", prefix + "b": b"B"}
    await watch.aclose()


CHILD = """
import asyncio, sys
from dynamo_backend_common.runtime.discovery import open_discovery

async def main() -> None:
    d = open_discovery(sys.argv[1], ttl=float(sys.argv[3]))
    await d.start()
    await d.put(sys.argv[2], b"child")
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_sigkilled_process_vanishes_within_ttl(
    etcd_url: str, etcd: list[EtcdDiscovery], prefix: str
) -> None:
    ttl = 2.0
    key = prefix + "child"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, etcd_url, key, str(ttl), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        assert (await asyncio.wait_for(proc.stdout.readline(), 20)).startswith(b"ready")
        reader = open_etcd(etcd_url, etcd)
        watch = reader.watch_prefix(prefix)
        assert await next_event(watch) == DiscoveryEvent("put", key, b"child")
        proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        assert await next_event(watch) == DiscoveryEvent("delete", key, None)
        # The lease was renewed at most ttl/3 before the kill; etcd expires it ~ttl later
        # (its expiry check has ~0.5 s granularity).
        assert time.monotonic() - killed_at < ttl + 1.5
        assert await reader.get_prefix(prefix) == {}
        await watch.aclose()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_lease_lost_when_lease_revoked(
    etcd_url: str, etcd: list[EtcdDiscovery], prefix: str
) -> None:
    d = open_etcd(etcd_url, etcd, ttl=2)
    await d.start()
    await d.put(prefix + "k", b"v")
    await etcd_post(etcd_url, "/v3/lease/revoke", {"ID": str(d.instance_id)})
    await asyncio.wait_for(d.lease_lost.wait(), TIMEOUT)
    assert await d.get_prefix(prefix) == {}
    with pytest.raises(DiscoveryError, match="lease not found"):
        await d.put(prefix + "k", b"v")


async def test_unreachable_etcd_fails_fast() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        d = open_discovery(f"etcd://127.0.0.1:{s.getsockname()[1]}")
        with pytest.raises(DiscoveryError, match="unreachable"):
            await asyncio.wait_for(d.start(), TIMEOUT)
    await d.close()


async def test_lease_lost_when_etcd_dies_and_watch_resumes_after_restart(
    private_etcd: Any, prefix: str
) -> None:
    url = private_etcd.url
    async with open_discovery(url, ttl=1) as worker, open_discovery(url) as frontend:
        watch = frontend.watch_prefix(prefix)
        await worker.put(prefix + "w", b"1")
        assert await next_event(watch) == DiscoveryEvent("put", prefix + "w", b"1")
        private_etcd.kill()
        await asyncio.wait_for(worker.lease_lost.wait(), TIMEOUT)
        private_etcd.start()
        # The watch reconnects from the last revision it saw and reports what happened since:
        # a new registration, and the dead worker's key going when its lease expires (etcd
        # restarts leases with a full TTL, and nobody renews this one any more).
        async with open_discovery(url) as late:
            await late.put(prefix + "late", b"2")
            events = {await next_event(watch), await next_event(watch)}
            assert events == {
                DiscoveryEvent("put", prefix + "late", b"2"),
                DiscoveryEvent("delete", prefix + "w", None),
            }
        await watch.aclose()


async def test_watch_resyncs_after_compaction(
    etcd_url: str, etcd: list[EtcdDiscovery], prefix: str
) -> None:
    d = open_etcd(etcd_url, etcd)
    await d.start()
    await d.put(prefix + "gone", b"old")
    await d.put(prefix + "changed", b"old")
    _, stale_revision = await d._range(prefix)
    await d.delete(prefix + "gone")
    await d.put(prefix + "changed", b"new")
    await d.put(prefix + "added", b"new")
    _, revision = await d._range(prefix)
    await etcd_post(etcd_url, "/v3/kv/compaction", {"revision": str(revision)})
    # A reader that last saw stale_revision reconnects: that history is compacted away.
    queue: asyncio.Queue[DiscoveryEvent | None] = asyncio.Queue()
    known = {prefix + "gone": b"old", prefix + "changed": b"old"}
    reader = asyncio.ensure_future(d._watch_reader(prefix, stale_revision + 1, known, queue))
    try:
        got = [await asyncio.wait_for(queue.get(), TIMEOUT) for _ in range(3)]
        assert got == [
            DiscoveryEvent("delete", prefix + "gone", None),
            DiscoveryEvent("put", prefix + "added", b"new"),
            DiscoveryEvent("put", prefix + "changed", b"new"),
        ]
        await d.put(prefix + "live", b"after resync")
        live = await asyncio.wait_for(queue.get(), TIMEOUT)
        assert live == DiscoveryEvent("put", prefix + "live", b"after resync")
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
