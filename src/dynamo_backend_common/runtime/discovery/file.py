"""Directory-backed discovery (``file://[/DIR]``): processes on one machine see each other.

Layout of the root directory (flat):

- ``<encoded key>``: one file per key. The name is the key percent-encoded with only
  ``[A-Za-z0-9_-]`` kept (so names never start with ``.`` and encoding preserves prefixes);
  keys whose name would exceed :data:`_MAX_NAME` are stored as ``~<sha256 of key>``. Content:
  one JSON header line ``{"key", "owner"}`` then the raw value. Writes are atomic (temp file
  then ``os.replace``) and stamp an explicit nanosecond mtime, so ``(inode, mtime_ns, size)``
  changes on every write and readers only re-read files that changed.
- ``.lease.<instance_id:016x>``: the lease of one live :class:`FileDiscovery`: JSON
  ``{"instance_id", "pid", "host", "pidns", "ttl"}``. Its owner touches its mtime every
  ``max(ttl/3, 0.2 s)`` from a dedicated thread (so a busy or blocked event loop, e.g. a
  synchronous model load, does not lose the lease).
- ``.tmp.*`` / ``.reap.*``: in-flight writes and removals.

A key is live iff its owner's lease file exists, was touched within the owner's ttl, and, when
the owner ran on this host (same hostname and pid namespace), its pid is still running (not a
zombie). So a SIGKILLed process vanishes at the next scan, and one on a stalled or remote
host after ``ttl``. Touching one lease file instead of every key file keeps key mtimes stable
(that is what makes change detection cheap) and makes keep-alive O(1). Every scan also reaps
what is dead: stale leases, their keys, and abandoned temp files.

Watching polls the directory every ``poll_interval`` (default 0.1 s) and diffs against the
previous scan. This is the one polling component in the runtime, on purpose: inotify would be
a platform-specific dependency, does not work on network filesystems, and could not report
the expiry of a lease (a *time* event, not a file event) anyway. The cost of a poll is one
``scandir`` plus one ``stat`` per key file of the prefix. Changes are delivered as the net
difference between scans: a key put and deleted between two polls is not reported, and the
changes of one poll are ordered deletes first, then puts, each by key.

Files are not fsynced: discovery state is ephemeral and rebuilt by live processes.
This layout is not Dynamo's file store format (which has no pid liveness); it is private.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import secrets
import socket
import tempfile
import threading
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from urllib.parse import quote

import msgspec

from .base import Discovery, DiscoveryEvent, random_instance_id

__all__ = ["FileDiscovery", "default_file_root"]

log = logging.getLogger(__name__)

_LEASE = ".lease."
_TMP = ".tmp."
_REAP = ".reap."
_HASHED = "~"
_MAX_NAME = 200
_MIN_KEEPALIVE = 0.2
_HEADER_MAX = 64 * 1024


def default_file_root() -> Path:
    """``$DYN_FILE_KV``, else ``$TMPDIR/dynamo_store_kv`` (Dynamo's defaults)."""
    env = os.environ.get("DYN_FILE_KV", "").strip()
    return Path(env) if env else Path(tempfile.gettempdir()) / "dynamo_store_kv"


def _encode(key: str) -> str:
    # quote() keeps "_.-~"; "." and "~" are encoded too so names never clash with ours.
    return quote(key, safe="").replace(".", "%2E").replace("~", "%7E")


def _file_name(key: str) -> str:
    name = _encode(key)
    if len(name) > _MAX_NAME:
        return _HASHED + hashlib.sha256(key.encode()).hexdigest()
    return name


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    """True unless ``pid`` certainly is gone (no such process, or a zombie awaiting reaping)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OSError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    # Field 3, after the parenthesised command name (which may contain spaces and parens).
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state not in (b"Z", b"X")


def _other_inode(inode: int, path: Path) -> bool:
    return os.stat(path).st_ino != inode


class _Header(msgspec.Struct):
    key: str
    owner: int


class _LeaseInfo(msgspec.Struct):
    instance_id: int
    pid: int
    host: str
    pidns: str | None
    ttl: float


class _Record(msgspec.Struct):
    sig: tuple[int, int, int]  # (inode, mtime_ns, size)
    key: str
    owner: int
    value: bytes


#: Given the grabbed file, whether it must be kept (see ``FileDiscovery._remove_if``).
_Keep = Callable[[Path], bool]

_header_encoder = msgspec.json.Encoder()
_header_decoder = msgspec.json.Decoder(_Header)
_lease_decoder = msgspec.json.Decoder(_LeaseInfo)


class FileDiscovery(Discovery):
    """:class:`Discovery` in a shared directory (see the module docstring for the format).

    ``root`` defaults to :func:`default_file_root`; it is created on :meth:`start` or first
    read. ``poll_interval`` is the watch poll period in seconds.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        ttl: float | None = None,
        poll_interval: float = 0.1,
    ) -> None:
        super().__init__(ttl=ttl)
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval!r}")
        self.root = Path(root) if root is not None else default_file_root()
        self.poll_interval = float(poll_interval)
        self._owned: set[str] = set()
        self._cache: dict[str, _Record] = {}
        self._lease_cache: dict[str, tuple[int, _LeaseInfo]] = {}  # name -> (inode, info)
        self._host = socket.gethostname()
        self._pidns = _pid_namespace()
        self._stop_keepalive = threading.Event()
        self._keepalive: threading.Thread | None = None

    # -- lease --------------------------------------------------------------------------------
    def _lease_path(self, owner: int) -> Path:
        return self.root / f"{_LEASE}{owner:016x}"

    async def start(self) -> None:
        self._check_open()
        if self._started:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        instance_id = random_instance_id()
        info = _LeaseInfo(instance_id, os.getpid(), self._host, self._pidns, self.ttl)
        self._write_atomic(self._lease_path(instance_id), msgspec.json.encode(info))
        self._instance_id = instance_id
        self._started = True
        self._keepalive = threading.Thread(
            target=self._keepalive_loop,
            args=(asyncio.get_running_loop(), self._lease_path(instance_id)),
            name=f"discovery-file-keepalive-{instance_id:x}",
            daemon=True,
        )
        self._keepalive.start()

    def _keepalive_loop(self, loop: asyncio.AbstractEventLoop, lease: Path) -> None:
        interval = max(self.ttl / 3, _MIN_KEEPALIVE)
        last = time.monotonic()  # last successful touch
        while not self._stop_keepalive.wait(interval):
            now = time.monotonic()
            if now - last > self.ttl:
                # Starved or failing past the ttl: peers may already have reported our keys
                # deleted, so do not quietly come back to life.
                reason = f"no successful keep-alive for {now - last:.1f}s"
                break
            try:
                os.utime(lease)
            except FileNotFoundError:
                # Another process reaped it: to everyone else this process is already gone.
                reason = "lease file was removed"
                break
            except OSError as exc:
                log.warning("file discovery cannot touch %s: %s", lease, exc)
                continue
            last = now
        else:
            return  # stopped by close()
        log.error("file discovery lease %s lost: %s", lease.name, reason)
        with contextlib.suppress(RuntimeError):  # loop already closed
            loop.call_soon_threadsafe(self.lease_lost.set)

    # -- writes -------------------------------------------------------------------------------
    def _write_atomic(self, path: Path, data: bytes) -> None:
        tmp = self.root / f"{_TMP}{secrets.token_hex(8)}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            # An explicit fine-grained mtime: two writes within one kernel clock tick still
            # differ in their signature, so watchers notice both.
            now = time.time_ns()
            os.utime(tmp, ns=(now, now))
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    async def put(self, key: str, value: bytes) -> None:
        self._check_started()
        header = _header_encoder.encode(_Header(key, self.instance_id))
        self._write_atomic(self.root / _file_name(key), header + b"\n" + bytes(value))
        self._owned.add(key)

    async def delete(self, key: str) -> None:
        self._check_open()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.root / _file_name(key))
        self._owned.discard(key)

    def _remove_if(self, path: Path, keep: _Keep) -> None:
        """Remove ``path`` unless the file found there satisfies ``keep``.

        Renaming first makes check-and-remove atomic against a concurrent writer: if a fresh
        file was swapped in meanwhile, it is linked back (unless an even newer one exists).
        """
        grabbed = self.root / f"{_REAP}{secrets.token_hex(8)}"
        try:
            os.rename(path, grabbed)
        except FileNotFoundError:
            return
        try:
            if keep(grabbed):
                with contextlib.suppress(FileExistsError):
                    os.link(grabbed, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(grabbed)

    # -- reads --------------------------------------------------------------------------------
    def _read_record(self, path: Path, sig: tuple[int, int, int]) -> _Record | None:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        end = data.find(b"\n", 0, _HEADER_MAX)
        if end < 0:
            return None
        try:
            header = _header_decoder.decode(data[:end])
        except msgspec.DecodeError:
            return None
        return _Record(sig, header.key, header.owner, data[end + 1 :])

    def _lease_live(self, owner: int, now_ns: int) -> bool:
        path = self._lease_path(owner)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
        cached = self._lease_cache.get(path.name)
        if cached is not None and cached[0] == st.st_ino:
            info = cached[1]
        else:
            try:
                info = _lease_decoder.decode(path.read_bytes())
            except FileNotFoundError:
                return False
            except (OSError, msgspec.DecodeError):
                return True  # unreadable: let the mtime decide next time
            self._lease_cache[path.name] = (st.st_ino, info)
        stale = now_ns - st.st_mtime_ns > info.ttl * 1e9
        dead = info.host == self._host and info.pidns == self._pidns and not _pid_alive(info.pid)
        if stale or dead:
            if owner != self._instance_id:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            return False
        return True

    def _scan(self, prefix: str) -> dict[str, _Record]:
        """Live entries under ``prefix``; reaps dead leases, their keys and stale temp files."""
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return {}
        now_ns = time.time_ns()
        encoded = _encode(prefix)
        live: dict[int, bool] = {}
        out: dict[str, _Record] = {}
        names: set[str] = set()
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                if name.startswith(_LEASE):
                    with contextlib.suppress(ValueError):
                        owner = int(name[len(_LEASE) :], 16)
                        live[owner] = self._lease_live(owner, now_ns)
                elif name.startswith((_TMP, _REAP)):
                    self._reap_temp(entry, now_ns)
                continue
            names.add(name)
            if not (name.startswith(encoded) or name.startswith(_HASHED)):
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            sig = (st.st_ino, st.st_mtime_ns, st.st_size)
            record = self._cache.get(name)
            if record is None or record.sig != sig:
                record = self._read_record(Path(entry.path), sig)
                if record is None:
                    continue
                self._cache[name] = record
            if not record.key.startswith(prefix):
                continue
            if record.owner not in live:
                # Not in this listing (readdir is not a snapshot): ask the lease file itself.
                live[record.owner] = self._lease_live(record.owner, now_ns)
            if live[record.owner]:
                out[record.key] = record
            else:
                # Keep it if a fresh write replaced the dead file since we looked.
                self._remove_if(Path(entry.path), functools.partial(_other_inode, sig[0]))
        for stale_name in self._cache.keys() - names:
            del self._cache[stale_name]
        for stale_lease in self._lease_cache.keys() - {e.name for e in entries}:
            del self._lease_cache[stale_lease]
        return out

    def _reap_temp(self, entry: os.DirEntry[str], now_ns: int) -> None:
        # A writer killed between create and replace leaves its temp file behind.
        with contextlib.suppress(OSError):
            if now_ns - entry.stat().st_mtime_ns > max(self.ttl, 60.0) * 1e9:
                os.unlink(entry.path)

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        self._check_open()
        return {key: rec.value for key, rec in self._scan(prefix).items()}

    async def watch_prefix(self, prefix: str) -> AsyncGenerator[DiscoveryEvent, None]:
        if self._closed:
            return
        # Each poll diffs against the previous scan, so the snapshot-to-live handover
        # loses nothing: whatever changed after the snapshot shows up in the next diff.
        current = self._scan(prefix)
        for key in sorted(current):
            yield DiscoveryEvent("put", key, current[key].value)
        while not self._closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.poll_interval)
            if self._closing.is_set():
                return
            latest = self._scan(prefix)
            for key in sorted(current.keys() - latest.keys()):
                yield DiscoveryEvent("delete", key, None)
            for key in sorted(latest):
                old = current.get(key)
                if old is None or old.sig != latest[key].sig:
                    yield DiscoveryEvent("put", key, latest[key].value)
            current = latest

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        if self._keepalive is not None:
            self._stop_keepalive.set()
            await asyncio.to_thread(self._keepalive.join)
        if self._instance_id is not None:
            me = self._instance_id

            def someone_elses(path: Path) -> bool:
                record = self._read_record(path, (0, 0, 0))
                return record is not None and record.owner != me

            for key in sorted(self._owned):
                # Only if still ours: another process may have overwritten the key since.
                self._remove_if(self.root / _file_name(key), someone_elses)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._lease_path(me))
        self._owned.clear()
