"""Discovery: the contract on memory and both file backends, plus the private lease layout.

Dynamo's file layout (``file://``) has its own tests in test_discovery_file.py; etcd is in
tests/integration/test_discovery_etcd.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from collections.abc import AsyncGenerator, Callable
from pathlib import Path

import pytest

from dynamo_backend_common.runtime.discovery import (
    Discovery,
    DiscoveryEvent,
    EtcdDiscovery,
    FileDiscovery,
    LeaseFileDiscovery,
    MemoryDiscovery,
    file_lease,
    open_discovery,
    parse_etcd_endpoints,
)

Factory = Callable[..., Discovery]
TIMEOUT = 5.0


async def next_event(watch: AsyncGenerator[DiscoveryEvent, None]) -> DiscoveryEvent:
    return await asyncio.wait_for(anext(watch), TIMEOUT)


async def wait_until(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Wait for a condition only another thread/process can make true (no event to await)."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - a file's mtime has nothing to await on
            await asyncio.sleep(0.01)


def names(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


@pytest.fixture(params=["memory", "file", "file+lease"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(kind, url) of a fresh, empty store for this test."""
    if request.param == "memory":
        return "memory", f"memory://test-{uuid.uuid4().hex}"
    return request.param, f"{request.param}://{tmp_path / 'kv'}"


@pytest.fixture
async def make(backend: tuple[str, str]) -> AsyncGenerator[Factory, None]:
    """Opens Discovery objects on the test's store; closes them all at the end."""
    kind, url = backend
    opened: list[Discovery] = []

    def factory(**kw: float) -> Discovery:
        d: Discovery
        if kind == "file":
            d = FileDiscovery(url.removeprefix("file://"), poll_interval=0.02, **kw)
        elif kind == "file+lease":
            d = LeaseFileDiscovery(url.removeprefix("file+lease://"), poll_interval=0.02, **kw)
        else:
            d = open_discovery(url, **kw)
        opened.append(d)
        return d

    yield factory
    for d in opened:
        await d.close()


async def test_put_get_delete(make: Factory) -> None:
    async with make() as d:
        await d.put("v1/instances/ns/a/1", b"one")
        await d.put("v1/instances/ns/b/2", b"two")
        await d.put("v1/mdc/ns/a/1", b"card")
        assert await d.get_prefix("v1/instances/") == {
            "v1/instances/ns/a/1": b"one",
            "v1/instances/ns/b/2": b"two",
        }
        await d.put("v1/instances/ns/a/1", b"uno")  # update
        assert (await d.get_prefix("v1/instances/ns/a"))["v1/instances/ns/a/1"] == b"uno"
        await d.delete("v1/instances/ns/a/1")
        await d.delete("v1/instances/ns/missing")  # no error
        assert await d.get_prefix("v1/instances/") == {"v1/instances/ns/b/2": b"two"}
        assert set(await d.get_prefix("")) == {"v1/instances/ns/b/2", "v1/mdc/ns/a/1"}


async def test_odd_keys_and_values_round_trip(make: Factory) -> None:
    # Every backend takes keys of 3+ segments; the odd parts sit after the bucket (v1/x).
    keys = [
        "v1/x/a.b/~c",
        "v1/x/.hidden",
        "v1/x/ünï/cödé",
        "v1/x/sp ace%2F",
        "v1/x/trailing/",
        "v1/k/" + "x" * 80,
        "v1/k/y",
        "v2/k/z",
    ]
    async with make() as d:
        for i, key in enumerate(keys):
            await d.put(key, bytes([i, 0, 255, 10]))
        assert await d.get_prefix("") == {k: bytes([i, 0, 255, 10]) for i, k in enumerate(keys)}
        assert set(await d.get_prefix("v1/k/")) == {"v1/k/" + "x" * 80, "v1/k/y"}
        assert set(await d.get_prefix("v1/k")) == {"v1/k/" + "x" * 80, "v1/k/y"}
        assert set(await d.get_prefix("v")) == set(keys)
        assert await d.get_prefix("v1/x/a.b/~") == {"v1/x/a.b/~c": bytes([0, 0, 255, 10])}
        assert await d.get_prefix("v1/x/a.b/~c/") == {}
        assert await d.get_prefix("v3") == {}


async def test_watch_snapshot_then_live_in_order(make: Factory) -> None:
    async with make() as writer, make() as reader:
        await writer.put("t/p/b", b"2")
        await writer.put("t/p/a", b"1")
        await writer.put("t/q/x", b"other prefix")
        watch = reader.watch_prefix("t/p/")
        assert [await next_event(watch), await next_event(watch)] == [
            DiscoveryEvent("put", "t/p/a", b"1"),
            DiscoveryEvent("put", "t/p/b", b"2"),
        ]
        await writer.put("t/p/c", b"3")
        assert await next_event(watch) == DiscoveryEvent("put", "t/p/c", b"3")
        await writer.put("t/p/c", b"3'")
        assert await next_event(watch) == DiscoveryEvent("put", "t/p/c", b"3'")
        await writer.put("t/q/y", b"ignored")
        await writer.delete("t/p/a")
        assert await next_event(watch) == DiscoveryEvent("delete", "t/p/a", None)
        await watch.aclose()


async def test_memory_watch_delivers_every_change_in_order() -> None:
    # The memory backend is event driven: even back-to-back changes all arrive, in order.
    async with MemoryDiscovery(f"t-{uuid.uuid4().hex}") as d:
        watch = d.watch_prefix("k")
        await d.put("k0", b"snap")
        assert await next_event(watch) == DiscoveryEvent("put", "k0", b"snap")
        await d.put("k1", b"a")
        await d.put("k1", b"b")
        await d.delete("k1")
        await d.put("k2", b"c")
        got = [await next_event(watch) for _ in range(4)]
        assert got == [
            DiscoveryEvent("put", "k1", b"a"),
            DiscoveryEvent("put", "k1", b"b"),
            DiscoveryEvent("delete", "k1", None),
            DiscoveryEvent("put", "k2", b"c"),
        ]
        await watch.aclose()
        assert not d._store.watchers  # aclose unsubscribed


async def test_close_removes_own_keys_and_watchers_see_deletes(make: Factory) -> None:
    owner, other, reader = make(), make(), make()
    await owner.start()
    await other.start()
    await owner.put("t/svc/1", b"owner")
    await owner.put("t/svc/shared", b"owner first")
    await other.put("t/svc/shared", b"other now")  # overwritten: no longer owner's to remove
    await other.put("t/svc/2", b"other")
    watch = reader.watch_prefix("t/svc/")
    snapshot = {(await next_event(watch)).key for _ in range(3)}
    assert snapshot == {"t/svc/1", "t/svc/2", "t/svc/shared"}
    await owner.close()
    assert await next_event(watch) == DiscoveryEvent("delete", "t/svc/1", None)
    assert await reader.get_prefix("t/svc/") == {
        "t/svc/shared": b"other now",
        "t/svc/2": b"other",
    }
    await owner.close()  # idempotent
    await watch.aclose()


async def test_close_ends_own_watches(make: Factory) -> None:
    d = make()
    await d.start()
    await d.put("t/w/1", b"x")
    watch = d.watch_prefix("t/w/")
    assert await next_event(watch) == DiscoveryEvent("put", "t/w/1", b"x")
    pending = asyncio.ensure_future(anext(watch))
    await d.close()
    # Its own key's delete may come first (memory); then the iterator ends.
    with pytest.raises(StopAsyncIteration):
        while True:
            event = await asyncio.wait_for(asyncio.shield(pending), TIMEOUT)
            assert event == DiscoveryEvent("delete", "t/w/1", None)
            pending = asyncio.ensure_future(anext(watch))
    # A watch opened on a closed Discovery ends at once.
    with pytest.raises(StopAsyncIteration):
        await anext(d.watch_prefix("t/w/"))


async def test_two_objects_see_each_other(make: Factory) -> None:
    async with make() as a, make() as b:
        assert a.instance_id != b.instance_id
        assert 0 < a.instance_id < 2**63 and 0 < b.instance_id < 2**63
        watch_b = b.watch_prefix("t/peers/")
        await a.put("t/peers/a", b"A")
        assert await next_event(watch_b) == DiscoveryEvent("put", "t/peers/a", b"A")
        await b.put("t/peers/b", b"B")
        assert await a.get_prefix("t/peers/") == {"t/peers/a": b"A", "t/peers/b": b"B"}
        assert await next_event(watch_b) == DiscoveryEvent("put", "t/peers/b", b"B")
        await b.delete("t/peers/a")  # anyone may delete any key
        assert await next_event(watch_b) == DiscoveryEvent("delete", "t/peers/a", None)
        await watch_b.aclose()


async def test_lifecycle_errors(make: Factory) -> None:
    d = make()
    with pytest.raises(RuntimeError, match="start"):
        _ = d.instance_id
    with pytest.raises(RuntimeError, match="start"):
        await d.put("t/k/v", b"v")
    assert await d.get_prefix("") == {}  # reads need no lease
    await d.start()
    first = d.instance_id
    await d.start()  # idempotent
    assert d.instance_id == first
    await d.close()
    with pytest.raises(RuntimeError, match="closed"):
        await d.put("t/k/v", b"v")
    with pytest.raises(RuntimeError, match="closed"):
        await d.get_prefix("")
    with pytest.raises(RuntimeError, match="closed"):
        await d.start()
    assert not d.lease_lost.is_set()


# -- lease file backend (file+lease://) specifics -------------------------------------------

CHILD = """
import asyncio, sys
from dynamo_backend_common.runtime.discovery import open_discovery

async def main() -> None:
    d = open_discovery(sys.argv[1], ttl=float(sys.argv[3]))
    await d.start()
    await d.put(sys.argv[2], b"child")
    print("ready", d.instance_id, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def spawn_registered_child(url: str, key: str, ttl: float) -> asyncio.subprocess.Process:
    """A child process that registers ``key`` and then idles until killed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, url, key, str(ttl), stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 20)
    assert line.startswith(b"ready"), line
    return proc


async def test_lease_sigkilled_process_vanishes(tmp_path: Path) -> None:
    url = f"file+lease://{tmp_path}"
    # A long TTL: disappearing within the timeout proves the dead-pid check, not expiry.
    proc = await spawn_registered_child(url, "v1/instances/child", ttl=60)
    try:
        async with LeaseFileDiscovery(tmp_path, poll_interval=0.02) as d:
            assert await d.get_prefix("v1/") == {"v1/instances/child": b"child"}
            watch = d.watch_prefix("v1/")
            assert await next_event(watch) == DiscoveryEvent("put", "v1/instances/child", b"child")
            proc.send_signal(signal.SIGKILL)
            assert await next_event(watch) == DiscoveryEvent("delete", "v1/instances/child", None)
            assert await d.get_prefix("v1/") == {}
            await watch.aclose()
        # The dead process's files were reaped, not just ignored.
        assert names(tmp_path) == []
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_lease_sigkilled_process_vanishes_without_pidfds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Where pidfds are unavailable the pid is polled instead (every min(0.5 s, ttl/4)).
    monkeypatch.setattr(file_lease, "_open_pidfd", lambda pid: None)
    proc = await spawn_registered_child(f"file+lease://{tmp_path}", "k", ttl=60)
    try:
        async with LeaseFileDiscovery(tmp_path, poll_interval=0.02) as d:
            watch = d.watch_prefix("")
            assert await next_event(watch) == DiscoveryEvent("put", "k", b"child")
            assert not d._pidfds
            proc.send_signal(signal.SIGKILL)
            assert await next_event(watch) == DiscoveryEvent("delete", "k", None)
            await watch.aclose()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_lease_keys_vanish_with_their_removed_lease(tmp_path: Path) -> None:
    async with LeaseFileDiscovery(tmp_path) as owner:
        await owner.put("k", b"v")
        async with LeaseFileDiscovery(tmp_path, poll_interval=0.02) as reader:
            watch = reader.watch_prefix("")
            assert await next_event(watch) == DiscoveryEvent("put", "k", b"v")
            os.unlink(owner._lease_path(owner.instance_id))  # as a peer reaping it would
            assert await next_event(watch) == DiscoveryEvent("delete", "k", None)
            assert await reader.get_prefix("") == {}
            await watch.aclose()


async def test_lease_idle_watches_share_one_cheap_poller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with LeaseFileDiscovery(tmp_path) as writer:
        await writer.put("a/1", b"x")
        await writer.put("b/1", b"y")
        async with LeaseFileDiscovery(tmp_path, poll_interval=0.02) as d:
            watches = [d.watch_prefix("a/"), d.watch_prefix("b/"), d.watch_prefix("")]
            for w in [*watches, watches[2]]:  # the snapshots: 1, 1 and 2 entries
                await next_event(w)
            poller = d._poller
            assert poller is not None
            await asyncio.sleep(0.3)  # past the window in which the dir mtime is distrusted
            refreshes = rescans = 0
            refresh, rescan = d._refresh, d._rescan

            def counting_refresh(*, full: bool = False) -> None:
                nonlocal refreshes
                refreshes += 1
                refresh(full=full)

            def counting_rescan(now_ns: int) -> bool:
                nonlocal rescans
                rescans += 1
                return rescan(now_ns)

            monkeypatch.setattr(d, "_refresh", counting_refresh)
            monkeypatch.setattr(d, "_rescan", counting_rescan)
            await asyncio.sleep(0.5)
            # One poller for all three watches; it re-lists only as the once-a-second backstop.
            assert 5 <= refreshes <= 26 and rescans <= 2, (refreshes, rescans)
            await writer.put("b/2", b"z")
            assert await next_event(watches[1]) == DiscoveryEvent("put", "b/2", b"z")
            assert await next_event(watches[2]) == DiscoveryEvent("put", "b/2", b"z")
            for w in watches:
                await w.aclose()
            await asyncio.sleep(0)
            assert d._poller is None and poller.done()


async def test_lease_stalled_owner_expires_after_ttl(tmp_path: Path) -> None:
    owner = LeaseFileDiscovery(tmp_path, ttl=0.3)
    await owner.start()
    await owner.put("k", b"v")
    async with LeaseFileDiscovery(tmp_path, poll_interval=0.02) as reader:
        watch = reader.watch_prefix("")
        assert await next_event(watch) == DiscoveryEvent("put", "k", b"v")
        lease = owner._lease_path(owner.instance_id)
        # Keep-alive runs: the lease mtime advances.
        touched = lease.stat().st_mtime_ns
        await wait_until(lambda: lease.stat().st_mtime_ns != touched)
        # Simulate a hung process (same pid, alive): stop its keep-alive thread.
        owner._keepalive.stopping.set()
        assert await next_event(watch) == DiscoveryEvent("delete", "k", None)
        assert not lease.exists()  # reaped
        await watch.aclose()
    await owner.close()


async def test_lease_lease_lost_when_lease_reaped(tmp_path: Path) -> None:
    async with LeaseFileDiscovery(tmp_path, ttl=0.3) as d:
        os.unlink(d._lease_path(d.instance_id))  # what a peer does to a stalled process
        await asyncio.wait_for(d.lease_lost.wait(), TIMEOUT)


async def test_lease_ignores_garbage_and_reaps_orphans(tmp_path: Path) -> None:
    (tmp_path / "garbage").write_bytes(b"no header line")
    (tmp_path / "bad-header").write_bytes(b"{not json\nvalue")
    # A key whose owner's lease does not exist (owner crashed before writing it or is gone).
    (tmp_path / "orphan").write_bytes(b'{"key":"orphan","owner":12345}\nvalue')
    # Dynamo's layout in the same root: bucket directories, skipped (this used to crash).
    (tmp_path / "v1" / "instances").mkdir(parents=True)
    (tmp_path / "v1" / "instances" / "dynamo%2Fx").write_bytes(b"{}")
    async with LeaseFileDiscovery(tmp_path) as d:
        await d.put("good", b"ok")
        await d.put("k/" + "x" * 400, b"long")  # hashed file name
        assert await d.get_prefix("") == {"good": b"ok", "k/" + "x" * 400: b"long"}
    assert names(tmp_path) == ["bad-header", "garbage", "v1"]  # the orphan was reaped


# -- URLs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "nope",
        "redis://host:1",
        "file://relative/dir",
        "file+lease://host/dir",
        "etcd://",
        "etcd://host:notaport",
        "etcd://host:70000",
        "etcd://a:1,,b:2",
        "http://host:2379/path",
        "etcd://user@host:1",
    ],
)
def test_bad_urls_raise_value_error(url: str) -> None:
    with pytest.raises(ValueError, match=r"discovery URL|etcd endpoint|scheme"):
        open_discovery(url)


def test_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(open_discovery("memory://"), MemoryDiscovery)
    named = open_discovery("memory://x")
    assert isinstance(named, MemoryDiscovery) and named.name == "x"
    file_d = open_discovery(f"file://{tmp_path}")
    assert isinstance(file_d, FileDiscovery) and file_d.root == tmp_path
    lease_d = open_discovery(f"file+lease://{tmp_path}")
    assert isinstance(lease_d, LeaseFileDiscovery) and lease_d.root == tmp_path
    assert isinstance(open_discovery("FILE+LEASE://"), LeaseFileDiscovery)
    etcd = open_discovery("etcd://127.0.0.1:2379,other:2380", ttl=3)
    assert isinstance(etcd, EtcdDiscovery) and etcd.ttl == 3.0
    assert etcd.endpoints == ["http://127.0.0.1:2379", "http://other:2380"]
    assert parse_etcd_endpoints("http://a:1,https://b,[::1]:5") == [
        "http://a:1",
        "https://b:2379",
        "http://[::1]:5",
    ]
    monkeypatch.setenv("DYN_FILE_KV", str(tmp_path / "kv"))
    monkeypatch.delenv("DYN_DISCOVERY", raising=False)
    monkeypatch.delenv("DYN_DISCOVERY_BACKEND", raising=False)
    default = open_discovery()
    assert isinstance(default, FileDiscovery) and default.root == tmp_path / "kv"
    assert isinstance(open_discovery("file://"), FileDiscovery)
    monkeypatch.setenv("DYN_DISCOVERY", "memory://from-env")
    monkeypatch.setenv("DYN_DISCOVERY_TTL", "2.5")
    env = open_discovery()
    assert isinstance(env, MemoryDiscovery) and env.name == "from-env" and env.ttl == 2.5
    monkeypatch.setenv("DYN_DISCOVERY_TTL", "-1")
    with pytest.raises(ValueError, match="ttl"):
        open_discovery("memory://")


def test_default_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DYN_DISCOVERY_TTL", raising=False)
    assert open_discovery("memory://").ttl == 10.0
    assert os.environ.get("DYN_DISCOVERY_TTL") is None
