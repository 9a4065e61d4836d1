"""Dynamo's file-store layout (``file://``, :class:`FileDiscovery`): format, liveness, robustness.

The generic Discovery contract runs against this backend too, in test_discovery.py. The golden
files are exactly what a real Dynamo 1.6.1 mocker wrote (tests/golden/dynamo-1.6.1/discovery).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path

import pytest

from dynamo_backend_common.runtime.discovery import (
    DiscoveryError,
    DiscoveryEvent,
    EtcdDiscovery,
    FileDiscovery,
    LeaseFileDiscovery,
    MemoryDiscovery,
    open_discovery,
)
from dynamo_backend_common.runtime.discovery import file as dynamo_file
from dynamo_backend_common.runtime.discovery.file import decode_name, encode_name, split_key

TIMEOUT = 5.0
GOLDEN = Path(__file__).parent / "golden" / "dynamo-1.6.1" / "discovery"
GOLDEN_SETS = ["mocker_running", "mocker_no_system_port", "python_fake_worker_accepted_by_frontend"]
KEY = "v1/instances/dynamo/backend/generate/abc"
KEY_FILE = Path("v1/instances/dynamo%2Fbackend%2Fgenerate%2Fabc")


async def next_event(watch: AsyncGenerator[DiscoveryEvent, None]) -> DiscoveryEvent:
    return await asyncio.wait_for(anext(watch), TIMEOUT)


async def wait_until(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Wait for a condition only another thread/process can make true (no event to await)."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - a file's mtime has nothing to await on
            await asyncio.sleep(0.01)


def tree(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root``: relative path -> content."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "MANIFEST.tsv"
    }


def golden_records(name: str) -> dict[str, bytes]:
    """The key/value pairs a Dynamo process wrote into golden set ``name``."""
    records = {}
    for path, content in tree(GOLDEN / name).items():
        seg0, seg1, file_name = path.split("/")
        rest = decode_name(file_name)
        assert rest is not None
        records[f"{seg0}/{seg1}/{rest}"] = content
    return records


def write_foreign(path: Path, value: bytes, age: float = 0.0) -> None:
    """A key file as another (e.g. Dynamo, or dead) process left it, last touched ``age`` ago."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(value)
    if age:
        then = time.time() - age
        os.utime(path, (then, then))


# -- names and keys -----------------------------------------------------------------------------


def test_names_are_dynamos_percent_encoding() -> None:
    assert encode_name("dynamo/backend/generate/abc") == "dynamo%2Fbackend%2Fgenerate%2Fabc"
    assert (
        encode_name("dynamo/backend/worker_kv_query_source_b3df046b32133/d7e3ba0cccc2164d")
        == "dynamo%2Fbackend%2Fworker%5Fkv%5Fquery%5Fsource%5Fb3df046b32133%2Fd7e3ba0cccc2164d"
    )
    assert encode_name("a.b-c~d é%") == "a%2Eb%2Dc%7Ed%20%C3%A9%25"
    for text in ["a.b-c~d é%", "x/y", "ünï/cödé", "%2F"]:
        assert decode_name(encode_name(text)) == text
    assert decode_name("a%2fb") == "a/b"  # lower-case hex is accepted
    assert decode_name("100%") == "100%"  # a stray % stays literal, as in Dynamo
    assert decode_name("%FF%FE") is None  # not UTF-8
    # Every golden name round-trips: decode then encode gives the name Dynamo wrote.
    for name in GOLDEN_SETS:
        for path in tree(GOLDEN / name):
            file_name = path.split("/")[2]
            rest = decode_name(file_name)
            assert rest is not None and encode_name(rest) == file_name


@pytest.mark.parametrize(
    "key",
    ["", "v1", "v1/instances", "v1/instances/", "/v1/x", "v1//x", ".v1/x/y", "v1/.x/y", "a/b"],
)
async def test_short_or_odd_keys_raise_value_error(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError, match="segment"):
        split_key(key)
    async with FileDiscovery(tmp_path) as d:
        with pytest.raises(ValueError, match="segment"):
            await d.put(key, b"v")
        with pytest.raises(ValueError, match="segment"):
            await d.delete(key)
    assert os.listdir(tmp_path) == []


async def test_too_long_key_raises_value_error(tmp_path: Path) -> None:
    async with FileDiscovery(tmp_path) as d:
        with pytest.raises(ValueError, match="too long"):
            await d.put("v1/x/" + "/" * 100, b"v")  # 300 bytes once encoded
        await d.put("v1/x/" + "a" * 255, b"v")  # exactly the limit


# -- the format ---------------------------------------------------------------------------------


async def test_layout_content_and_write_protocol(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_link, real_replace = os.link, os.replace

    def link(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls.append(f"link {Path(src).name[:5]} {Path(dst).name}")
        real_link(src, dst)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls.append(f"replace {Path(src).name[:5]} {Path(dst).name}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(os, "replace", replace)
    name = KEY_FILE.name
    async with FileDiscovery(tmp_path) as d:
        await d.put(KEY, b'{"raw":"json"}')
        assert tree(tmp_path) == {str(KEY_FILE): b'{"raw":"json"}'}  # no header, no temp left
        ino = (tmp_path / KEY_FILE).stat().st_ino
        await d.put(KEY, b"v2")  # update of our own key: temp + rename
        assert (tmp_path / KEY_FILE).read_bytes() == b"v2"
        assert (tmp_path / KEY_FILE).stat().st_ino != ino
        assert calls == [f"link .tmp_ {name}", f"replace .tmp_ {name}"]
        # A file of the same key left by someone else: create-if-absent fails, then replace
        # (put is create-or-update).
        other = tmp_path / "v1/mdc/dynamo%2Fbackend%2Fgenerate%2Fabc"
        write_foreign(other, b"stale")
        calls.clear()
        await d.put("v1/mdc/dynamo/backend/generate/abc", b"mine")
        assert other.read_bytes() == b"mine"
        assert calls == [f"link .tmp_ {other.name}", f"replace .tmp_ {other.name}"]
        assert sorted(os.listdir(tmp_path / "v1")) == ["instances", "mdc"]
        assert all(not n.startswith(".tmp_") for n in os.listdir(tmp_path / "v1/mdc"))
    assert tree(tmp_path) == {}  # close() removed both


@pytest.mark.parametrize("golden", GOLDEN_SETS)
async def test_writing_dynamos_records_gives_dynamos_bytes(tmp_path: Path, golden: str) -> None:
    records = golden_records(golden)
    assert len(records) >= 2
    async with FileDiscovery(tmp_path) as d:
        for key, value in records.items():
            await d.put(key, value)
        assert tree(tmp_path) == tree(GOLDEN / golden)  # same names, same bytes, nothing else


@pytest.mark.parametrize("golden", GOLDEN_SETS)
async def test_reading_dynamos_directory(tmp_path: Path, golden: str) -> None:
    root = tmp_path / "kv"
    shutil.copytree(GOLDEN / golden, root)
    for path in root.rglob("*"):
        os.utime(path)  # as if the writer were alive and touching them
    records = golden_records(golden)
    async with FileDiscovery(root, poll_interval=0.02) as d:
        assert await d.get_prefix("") == records
        assert await d.get_prefix("v1/") == records
        instances = {k: v for k, v in records.items() if k.startswith("v1/instances/")}
        assert await d.get_prefix("v1/instances/") == instances
        assert await d.get_prefix("v1/instances/dynamo/") == instances
        watch = d.watch_prefix("v1/")
        got = {}
        for _ in records:
            ev = await next_event(watch)
            assert ev.kind == "put" and ev.value is not None
            got[ev.key] = ev.value
        assert got == records
        await watch.aclose()
        assert d.errors == 0


# -- liveness -----------------------------------------------------------------------------------


async def test_owner_touches_its_files_in_place(tmp_path: Path) -> None:
    async with FileDiscovery(tmp_path, ttl=0.3) as d:
        assert d.keepalive_interval == pytest.approx(0.1)
        await d.put(KEY, b"v")
        path = tmp_path / KEY_FILE
        before = path.stat()
        await wait_until(lambda: path.stat().st_mtime_ns > before.st_mtime_ns)
        after = path.stat()
        assert (after.st_ino, path.read_bytes()) == (before.st_ino, b"v")
    assert FileDiscovery(tmp_path).keepalive_interval == pytest.approx(10 / 3)
    assert FileDiscovery(tmp_path, ttl=60).keepalive_interval == pytest.approx(10 / 3)
    assert FileDiscovery(tmp_path, ttl=60).expire_after == 60
    assert FileDiscovery(tmp_path, ttl=2).expire_after == 10


async def test_reader_expires_untouched_files_and_reports_a_delete(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=dynamo_file.__name__)
    # Already a minute old when first seen: not reported at all, and removed.
    write_foreign(tmp_path / "v1/instances/old", b"dead", age=60)
    # Fresh, but nobody touches it: reported, then expired after expire_after.
    write_foreign(tmp_path / KEY_FILE, b"unowned")
    async with FileDiscovery(tmp_path, poll_interval=0.02, expire_after=0.3) as d:
        watch = d.watch_prefix("v1/")
        assert await next_event(watch) == DiscoveryEvent("put", KEY, b"unowned")
        assert not (tmp_path / "v1/instances/old").exists()
        assert await next_event(watch) == DiscoveryEvent("delete", KEY, None)
        assert not (tmp_path / KEY_FILE).exists()
        assert await d.get_prefix("v1/") == {}
        await watch.aclose()
    expired = [r.getMessage() for r in caplog.records if "expired discovery file" in r.message]
    assert len(expired) == 2 and any(str(tmp_path / KEY_FILE) in m for m in expired)


async def test_stalled_owner_expires_and_learns_it_lost_the_lease(tmp_path: Path) -> None:
    owner = FileDiscovery(tmp_path, ttl=0.3, expire_after=0.6)
    await owner.start()
    await owner.put(KEY, b"v")
    async with FileDiscovery(tmp_path, poll_interval=0.02, expire_after=0.6) as reader:
        watch = reader.watch_prefix("v1/")
        assert await next_event(watch) == DiscoveryEvent("put", KEY, b"v")
        owner._keepalive.stopping.set()  # a hung process: same pid, no keep-alive
        assert await next_event(watch) == DiscoveryEvent("delete", KEY, None)
        assert not (tmp_path / KEY_FILE).exists()  # the reader removed it
        await watch.aclose()
    await owner.close()

    # A starved keep-alive (no touch for longer than peers wait) sets lease_lost.
    async with FileDiscovery(tmp_path, ttl=0.3, expire_after=0.6) as d:
        await d.put(KEY, b"v")
        with d._owned_lock:
            d._owned[KEY].touched -= 10
        await asyncio.wait_for(d.lease_lost.wait(), TIMEOUT)
        with pytest.raises(DiscoveryError, match="lease lost"):
            await d.put(KEY, b"again")

    # Its file vanishing while the keep-alive was late: a peer expired it, lease lost too.
    async with FileDiscovery(tmp_path, ttl=0.3, expire_after=0.6) as d:
        await d.put(KEY, b"v")
        with d._owned_lock:
            d._owned[KEY].touched -= 0.4  # late, but not yet past expire_after
        os.unlink(tmp_path / KEY_FILE)
        await asyncio.wait_for(d.lease_lost.wait(), TIMEOUT)


async def test_owner_gives_up_keys_others_deleted_or_replaced(tmp_path: Path) -> None:
    async with (
        FileDiscovery(tmp_path, ttl=0.3) as owner,
        FileDiscovery(tmp_path, poll_interval=0.02) as other,
    ):
        await owner.put(KEY, b"owner")
        await owner.put("v1/mdc/a/b/c", b"card")
        await other.delete(KEY)  # on purpose, while the owner's keep-alive is on time
        await wait_until(lambda: KEY not in owner._owned)
        # Replaced by a fresh writer: no longer the owner's to touch or remove.
        write_foreign(tmp_path / "v1/mdc/tmp", b"newer")
        os.replace(tmp_path / "v1/mdc/tmp", tmp_path / "v1/mdc/a%2Fb%2Fc")
        await wait_until(lambda: "v1/mdc/a/b/c" not in owner._owned)
        assert not owner.lease_lost.is_set()
        assert not (tmp_path / KEY_FILE).exists()  # not recreated
        await owner.close()
        assert await other.get_prefix("v1/") == {"v1/mdc/a/b/c": b"newer"}


CHILD = """
import asyncio, signal, sys
from dynamo_backend_common.runtime.discovery import FileDiscovery

async def main() -> None:
    d = FileDiscovery(sys.argv[1], ttl=0.3)
    await d.start()
    await d.put(sys.argv[2], b"child")
    await d.put("v1/mdc/child/x/1", b"card")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await d.close()

asyncio.run(main())
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
async def test_other_process_leaves_cleanly_or_expires(tmp_path: Path, sig: signal.Signals) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(tmp_path), KEY, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        assert (await asyncio.wait_for(proc.stdout.readline(), 20)).startswith(b"ready")
        async with FileDiscovery(tmp_path, poll_interval=0.02, expire_after=0.6) as d:
            watch = d.watch_prefix("v1/instances/")
            assert await next_event(watch) == DiscoveryEvent("put", KEY, b"child")
            # Alive: touched more than expire_after after it was written, still there.
            path = tmp_path / KEY_FILE
            born = path.stat().st_mtime_ns
            await wait_until(lambda: path.stat().st_mtime_ns > born + 700_000_000)
            assert KEY in await d.get_prefix("v1/instances/")
            proc.send_signal(sig)
            assert await next_event(watch) == DiscoveryEvent("delete", KEY, None)
            await watch.aclose()
            assert await d.get_prefix("v1/") == {}
        assert await proc.wait() == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
        assert tree(tmp_path) == {}
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


# -- robustness ---------------------------------------------------------------------------------


async def test_odd_entries_are_skipped_logged_once_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = tmp_path / "v1" / "instances"
    write_foreign(bucket / "good", b"ok")
    (bucket / "adir").mkdir()  # a directory where files are expected
    os.mkfifo(bucket / "fifo")  # never opened: no hang
    (bucket / "%FF%FE").write_bytes(b"not a utf-8 name")
    (bucket / ".tmp_0123456789abcdef").write_bytes(b"in flight")  # ignored, not counted
    write_foreign(bucket / ".tmp_fedcba9876543210", b"abandoned", age=120)  # reaped
    (bucket / "unreadable").write_bytes(b"secret")
    read = dynamo_file._read

    def read_or_deny(path: Path) -> tuple[bytes, os.stat_result]:
        if path.name == "unreadable":  # chmod 0 would not stop root
            raise PermissionError(13, "Permission denied", str(path))
        return read(path)

    monkeypatch.setattr(dynamo_file, "_read", read_or_deny)
    expected_errors = 4
    (tmp_path / "MANIFEST.tsv").write_bytes(b"a plain file at the root")
    (tmp_path / "v1" / "stray").write_bytes(b"a plain file at the v1 level")
    (tmp_path / "v1" / "mdc").write_bytes(b"a file where a bucket should be")
    caplog.set_level(logging.WARNING, logger=dynamo_file.__name__)
    async with FileDiscovery(tmp_path, poll_interval=0.02) as d:
        for _ in range(3):
            assert await d.get_prefix("") == {"v1/instances/good": b"ok"}
            assert await d.get_prefix("v1/mdc/") == {}
        watch = d.watch_prefix("v1/")
        assert await next_event(watch) == DiscoveryEvent("put", "v1/instances/good", b"ok")
        write_foreign(bucket / "later", b"fine")
        assert await next_event(watch) == DiscoveryEvent("put", "v1/instances/later", b"fine")
        await watch.aclose()
        assert d.errors == expected_errors
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == expected_errors, [r.getMessage() for r in warnings]
        assert {".tmp_0123456789abcdef", "%FF%FE", "unreadable"} <= set(os.listdir(bucket))
        assert not (bucket / ".tmp_fedcba9876543210").exists()
        # A rewritten unreadable file is a new signature: logged and counted again (a bad
        # name stays the same problem whatever the content).
        (bucket / "%FF%FE").write_bytes(b"changed")
        write_foreign(bucket / "tmp", b"still secret")
        os.replace(bucket / "tmp", bucket / "unreadable")
        await d.get_prefix("")
        assert d.errors == expected_errors + 1


async def test_shares_a_root_with_the_private_lease_layout(tmp_path: Path) -> None:
    async with FileDiscovery(tmp_path) as dynamo, LeaseFileDiscovery(tmp_path) as lease:
        await dynamo.put(KEY, b"dynamo layout")
        await lease.put("v1/instances/lease/1", b"lease layout")
        assert await dynamo.get_prefix("") == {KEY: b"dynamo layout"}
        assert await lease.get_prefix("") == {"v1/instances/lease/1": b"lease layout"}
        assert dynamo.errors == 0


async def test_watches_follow_new_buckets_and_removed_ones(tmp_path: Path) -> None:
    async with (
        FileDiscovery(tmp_path, poll_interval=0.02) as reader,
        FileDiscovery(tmp_path) as writer,
    ):
        everything, v1 = reader.watch_prefix(""), reader.watch_prefix("v1/")
        pending = asyncio.ensure_future(anext(everything))  # the root does not exist yet
        await writer.put("v1/event_sources/a/b", b"1")
        assert await asyncio.wait_for(pending, TIMEOUT) == DiscoveryEvent(
            "put", "v1/event_sources/a/b", b"1"
        )
        assert await next_event(v1) == DiscoveryEvent("put", "v1/event_sources/a/b", b"1")
        await writer.put("v2/x/y", b"2")
        assert await next_event(everything) == DiscoveryEvent("put", "v2/x/y", b"2")
        await writer.put("v1/mdc/a/b", b"3")
        assert await next_event(v1) == DiscoveryEvent("put", "v1/mdc/a/b", b"3")
        assert await next_event(everything) == DiscoveryEvent("put", "v1/mdc/a/b", b"3")
        shutil.rmtree(tmp_path / "v1" / "mdc")  # an operator wipes a bucket
        assert await next_event(v1) == DiscoveryEvent("delete", "v1/mdc/a/b", None)
        await writer.put("v1/mdc/a/b", b"4")  # recreates the bucket directory
        assert await next_event(v1) == DiscoveryEvent("put", "v1/mdc/a/b", b"4")
        await everything.aclose()
        await v1.aclose()


@pytest.mark.parametrize(("store", "prefix", "rounds"), [
    (FileDiscovery, "v1/k/", 8), (LeaseFileDiscovery, "k", 20)])
async def test_back_to_back_changes_end_on_the_last_state(
        tmp_path: Path, store: type[FileDiscovery | LeaseFileDiscovery], prefix: str,
        rounds: int) -> None:
    # Many changes within one directory-mtime tick: the watch still ends on the last state.
    async with (
        store(tmp_path, poll_interval=0.02) as writer,
        store(tmp_path, poll_interval=0.02) as reader,
    ):
        watch = reader.watch_prefix(prefix)
        await writer.put(f"{prefix}0", b"snap")
        state: dict[str, bytes] = {}
        for round_ in range(rounds):
            await asyncio.sleep(0.25 if store is FileDiscovery else 0.1)  # past the mtime margin
            for i in range(5):
                await writer.put(f"{prefix}{i}", f"{round_}".encode())
            await writer.delete(f"{prefix}3")
            want = {f"{prefix}{i}": f"{round_}".encode() for i in range(5) if i != 3}
            while state != want:
                ev = await next_event(watch)
                if ev.kind == "put":
                    assert ev.value is not None
                    state[ev.key] = ev.value
                else:
                    del state[ev.key]
        await watch.aclose()


async def test_idle_watch_does_not_reread_touched_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with FileDiscovery(tmp_path, ttl=0.3) as owner:  # touches every 0.1 s
        for i in range(5):
            await owner.put(f"v1/instances/w/{i}", b"x" * 100)
        await owner.put("v1/mdc/w/0", b"card")
        async with FileDiscovery(tmp_path, poll_interval=0.02) as d:
            watches = [d.watch_prefix(p) for p in ("v1/instances/", "v1/mdc/", "")]
            for w, n in zip(watches, (5, 1, 6), strict=True):
                for _ in range(n):
                    await next_event(w)
            poller = d._poller
            assert poller is not None
            await asyncio.sleep(0.3)  # past the window in which the dir mtime is distrusted
            reads = relists = 0
            read, relist = dynamo_file._read, d._relist

            def counting_read(path: Path) -> tuple[bytes, os.stat_result]:
                nonlocal reads
                reads += 1
                return read(path)

            def counting_relist(*args: object, **kw: bool) -> bool:
                nonlocal relists
                relists += 1
                return relist(*args, **kw)  # type: ignore[arg-type]

            monkeypatch.setattr(dynamo_file, "_read", counting_read)
            monkeypatch.setattr(d, "_relist", counting_relist)
            await asyncio.sleep(1.2)  # a measurement window: ~12 touches of every file
            # Touches never cause re-reads; buckets are re-listed only by the 1 s backstop.
            assert reads == 0 and relists <= 4, (reads, relists)
            await owner.put("v1/mdc/w/1", b"new")
            assert await next_event(watches[1]) == DiscoveryEvent("put", "v1/mdc/w/1", b"new")
            assert await next_event(watches[2]) == DiscoveryEvent("put", "v1/mdc/w/1", b"new")
            assert reads >= 1
            for w in watches:
                await w.aclose()
            await asyncio.sleep(0)
            assert d._poller is None and poller.done()


# -- selection from the environment ---------------------------------------------------------------


def test_environment_selects_the_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("DYN_DISCOVERY", "DYN_DISCOVERY_BACKEND", "ETCD_ENDPOINTS", "DYN_DISCOVERY_TTL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DYN_FILE_KV", str(tmp_path / "kv"))
    d = open_discovery()
    assert type(d) is FileDiscovery and d.root == tmp_path / "kv"
    monkeypatch.setenv("DYN_DISCOVERY_BACKEND", "file")
    d = open_discovery()
    assert type(d) is FileDiscovery and d.root == tmp_path / "kv"
    for name in ("mem", "memory", " MEM "):
        monkeypatch.setenv("DYN_DISCOVERY_BACKEND", name)
        assert isinstance(open_discovery(None), MemoryDiscovery)
    monkeypatch.setenv("DYN_DISCOVERY_BACKEND", "etcd")
    etcd = open_discovery()
    assert isinstance(etcd, EtcdDiscovery) and etcd.endpoints == ["http://localhost:2379"]
    monkeypatch.setenv("ETCD_ENDPOINTS", "http://h1:1,https://h2, h3:3")
    etcd = open_discovery("")
    assert isinstance(etcd, EtcdDiscovery)
    assert etcd.endpoints == ["http://h1:1", "https://h2:2379", "http://h3:3"]
    # Our own URL variable beats Dynamo's selector, and an explicit URL beats both.
    monkeypatch.setenv("DYN_DISCOVERY", f"file+lease://{tmp_path}")
    assert isinstance(open_discovery(), LeaseFileDiscovery)
    assert isinstance(open_discovery("memory://x"), MemoryDiscovery)
    monkeypatch.delenv("DYN_DISCOVERY")
    for bad in ("kubernetes", "nats", "filesystem"):
        monkeypatch.setenv("DYN_DISCOVERY_BACKEND", bad)
        with pytest.raises(ValueError, match=r"file, etcd, mem"):
            open_discovery()
    monkeypatch.setenv("DYN_DISCOVERY_BACKEND", "etcd")
    monkeypatch.setenv("ETCD_ENDPOINTS", "h:notaport")
    with pytest.raises(ValueError, match="ETCD_ENDPOINTS"):
        open_discovery()


def test_etcd_lease_ttl_from_dynamos_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DYN_DISCOVERY_TTL", raising=False)
    monkeypatch.delenv("ETCD_LEASE_TTL", raising=False)
    assert EtcdDiscovery(["http://h:1"]).ttl == 10.0
    monkeypatch.setenv("ETCD_LEASE_TTL", "7")
    assert EtcdDiscovery(["http://h:1"]).ttl == 7.0
    assert EtcdDiscovery(["http://h:1"], ttl=3).ttl == 3.0
    assert MemoryDiscovery().ttl == 10.0  # etcd only
    monkeypatch.setenv("DYN_DISCOVERY_TTL", "4")
    assert EtcdDiscovery(["http://h:1"]).ttl == 4.0
    monkeypatch.delenv("DYN_DISCOVERY_TTL")
    for bad in ("x", "0", "-1"):
        monkeypatch.setenv("ETCD_LEASE_TTL", bad)
        with pytest.raises(ValueError, match="ETCD_LEASE_TTL"):
            EtcdDiscovery(["http://h:1"])
