"""Private directory-backed discovery (``file+lease://[/DIR]``): pid-fast death detection.

This is the project's own layout, kept for setups of our processes only: it detects a
SIGKILLed local process at the next poll (pidfd) instead of after a 10 s mtime TTL. It is not
Dynamo's file store format (``file://``, :mod:`.file`); a Dynamo process does not see these
keys. Both layouts can share one root: each ignores the other's entries (this one skips
directories, the Dynamo layout skips plain files at the root).

Layout of the root directory (flat):

- ``<encoded key>``: one file per key. The name is the key percent-encoded with only
  ``[A-Za-z0-9_-]`` kept (so names never start with ``.`` and encoding preserves prefixes);
  keys whose name would exceed :data:`_MAX_NAME` are stored as ``~<sha256 of key>``. Content:
  one JSON header line ``{"key", "owner"}`` then the raw value. Writes are atomic (temp file
  then ``os.replace``) and stamp an explicit nanosecond mtime, so ``(inode, mtime_ns, size)``
  changes on every write and readers only re-read files that changed.
- ``.lease.<instance_id:016x>``: the lease of one live :class:`LeaseFileDiscovery`: JSON
  ``{"instance_id", "pid", "host", "pidns", "ttl"}``. Its owner touches its mtime every
  ``max(ttl/3, 0.2 s)`` from a dedicated thread (so a busy or blocked event loop, e.g. a
  synchronous model load, does not lose the lease).
- ``.tmp.*`` / ``.reap.*``: in-flight writes and removals.

A key is live iff its owner's lease file exists, was touched within the owner's ttl, and, when
the owner ran on this host (same hostname and pid namespace), its pid is still running (not a
zombie). So a SIGKILLed process vanishes at the next poll (its pid is watched through a pidfd;
where pidfds are unavailable, polled every ``min(0.5 s, ttl/4)``), and one on a stalled or
remote host after ``ttl``. Touching one lease file instead of every key file keeps key mtimes stable
(that is what makes change detection cheap) and makes keep-alive O(1). Every scan also reaps
what is dead: stale leases, their keys, and abandoned temp files.

Watching polls the directory every ``poll_interval`` (default 0.1 s) and diffs against the
previous scan. This is the one polling component in the runtime, on purpose: inotify would be
a platform-specific dependency, does not work on network filesystems, and could not report
the expiry of a lease (a *time* event, not a file event) anyway. All watches of one
:class:`LeaseFileDiscovery` share one poller task and are woken only when something under the root
changed. A poll is one ``stat`` of the directory: it is re-listed (``scandir`` plus one
``stat`` per key file, re-reading only changed files) when its mtime changed, while that mtime
is too recent to trust, and once a second as a backstop. Lease files are ``stat``-ed only when
their last seen touch is a ttl old, and local owners' pids cost one ``poll`` on their pidfds.
Changes are delivered as the net difference between scans: a key put and deleted between two
polls is not reported, and the changes of one poll are ordered deletes first, then puts, each
by key.

Files are not fsynced: discovery state is ephemeral and rebuilt by live processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import secrets
import select
import socket
import stat
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from urllib.parse import quote

import msgspec

from ._keepalive import KeepAlive
from ._polled import PolledWatches
from .base import Discovery, DiscoveryEvent, random_instance_id
from .file import default_file_root

__all__ = ["LeaseFileDiscovery"]

log = logging.getLogger(__name__)

_LEASE = ".lease."
_TMP = ".tmp."
_REAP = ".reap."
_HASHED = "~"
_MAX_NAME = 200
_MIN_KEEPALIVE = 0.2
_HEADER_MAX = 64 * 1024
#: A directory mtime this close to (or after) the time of the listing that saw it is not
#: trusted to reveal later changes: those may land in the same timestamp tick.
_MTIME_MARGIN_NS = 200_000_000
#: Re-list the directory at least this often even if its mtime did not change.
_RESCAN_EVERY_NS = 1_000_000_000
#: Without pidfds, how often (at most, and at most ttl/4) a local owner's pid is checked.
_PID_CHECK_EVERY = 0.5


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


def _open_pidfd(pid: int) -> int | None:
    """A pidfd for ``pid`` (readable once it exits), or None where pidfds are unavailable."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    try:
        fd: int = pidfd_open(pid)
    except OSError:
        return None  # ENOSYS, EPERM under seccomp, ESRCH (already reaped: polled instead)
    return fd


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


class _Lease:
    """What a watcher tracks about one owner's lease file."""

    __slots__ = ("info", "inode", "mtime_ns", "next_pid_check_ns", "path", "pidfd", "ttl_ns")

    def __init__(self, path: Path, inode: int, mtime_ns: int, info: _LeaseInfo | None) -> None:
        self.path = path
        self.inode = inode
        self.mtime_ns = mtime_ns
        self.info = info
        # An unreadable lease is re-read at its expiry; until then assume a short ttl.
        self.ttl_ns = int((info.ttl if info is not None else 1.0) * 1e9)
        self.pidfd: int | None = None
        self.next_pid_check_ns = 0  # 0: pid not polled (remote owner, or a pidfd watches it)

    def local(self, d: LeaseFileDiscovery) -> bool:
        info = self.info
        return info is not None and info.host == d._host and info.pidns == d._pidns

    def pid_alive(self) -> bool:
        return self.info is None or _pid_alive(self.info.pid)


class _Record(msgspec.Struct):
    sig: tuple[int, int, int]  # (inode, mtime_ns, size)
    key: str
    owner: int
    value: bytes


#: Given the grabbed file, whether it must be kept (see ``LeaseFileDiscovery._remove_if``).
_Keep = Callable[[Path], bool]

_header_encoder = msgspec.json.Encoder()
_header_decoder = msgspec.json.Decoder(_Header)
_lease_decoder = msgspec.json.Decoder(_LeaseInfo)


class LeaseFileDiscovery(PolledWatches, Discovery):
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
        # Change detection (see _refresh): what the last refresh saw.
        self._leases: dict[int, _Lease] = {}
        self._pidfds: dict[int, int] = {}  # pidfd -> owner
        self._pidpoll = select.poll()
        self._pid_check_ns = int(min(_PID_CHECK_EVERY, self.ttl / 4) * 1e9)
        self._dir_mtime: int | None = None
        self._dir_scanned_ns = 0
        self._live: dict[str, _Record] = {}
        self._garbage: dict[str, tuple[int, int, int]] = {}  # unparsable file name -> sig
        self._version = 0
        # Watches: one shared poller task, and the futures of the watches waiting on a change.
        self._watchers = 0
        self._init_polled()
        self._host = socket.gethostname()
        self._pidns = _pid_namespace()
        self._keepalive: KeepAlive | None = None
        self._last_touch = 0.0  # monotonic time of the last successful touch of the lease

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
        lease = self._lease_path(instance_id)
        interval = max(self.ttl / 3, _MIN_KEEPALIVE)
        self._last_touch = time.monotonic()
        self._keepalive = KeepAlive(
            f"discovery-file-keepalive-{instance_id:x}", interval,
            lambda: self._beat(lease, interval), lease_lost=self.lease_lost,
            on_lost=lambda reason: log.error("file discovery lease %s lost: %s", lease.name,
                                             reason))
        self._keepalive.start()

    def _beat(self, lease: Path, interval: float) -> float | str:
        now = time.monotonic()
        if now - self._last_touch > self.ttl:
            # Starved or failing past the ttl: peers may already have reported our keys
            # deleted, so do not quietly come back to life.
            return f"no successful keep-alive for {now - self._last_touch:.1f}s"
        try:
            os.utime(lease)
        except FileNotFoundError:
            # Another process reaped it: to everyone else this process is already gone.
            return "lease file was removed"
        except OSError as exc:
            log.warning("file discovery cannot touch %s: %s", lease, exc)
            return interval
        self._last_touch = now
        return interval

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
        except OSError:  # gone, unreadable, or not a file (e.g. swapped for a directory)
            return None
        end = data.find(b"\n", 0, _HEADER_MAX)
        if end < 0:
            return None
        try:
            header = _header_decoder.decode(data[:end])
        except msgspec.DecodeError:
            return None
        return _Record(sig, header.key, header.owner, data[end + 1 :])

    # -- liveness and change detection ------------------------------------------------------
    def _track_lease(self, owner: int, now_ns: int) -> _Lease | None:
        """Read ``owner``'s lease file and start tracking it; None (and reaped) if it is dead."""
        path = self._lease_path(owner)
        try:
            st = os.stat(path)
            info: _LeaseInfo | None = _lease_decoder.decode(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError):
            info = None  # unreadable (being written?): the mtime decides, re-read at expiry
        lease = _Lease(path, st.st_ino, st.st_mtime_ns, info)
        if now_ns - lease.mtime_ns > lease.ttl_ns or (lease.local(self) and not lease.pid_alive()):
            self._reap_lease(owner, lease)
            return None
        if lease.local(self) and info is not None:
            lease.pidfd = _open_pidfd(info.pid)
            if lease.pidfd is not None:
                self._pidfds[lease.pidfd] = owner
                self._pidpoll.register(lease.pidfd, select.POLLIN)
            else:
                lease.next_pid_check_ns = now_ns + self._pid_check_ns
        self._leases[owner] = lease
        return lease

    def _untrack_lease(self, owner: int) -> _Lease | None:
        lease = self._leases.pop(owner, None)
        if lease is not None and lease.pidfd is not None:
            self._pidpoll.unregister(lease.pidfd)
            del self._pidfds[lease.pidfd]
            os.close(lease.pidfd)
            lease.pidfd = None
        return lease

    def _reap_lease(self, owner: int, lease: _Lease) -> None:
        self._untrack_lease(owner)
        if owner != self._instance_id:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lease.path)

    def _check_leases(self, now_ns: int) -> bool:
        """Drop (and reap) tracked leases that died; True if any did.

        A lease's file is only stat'ed once its last seen mtime is a ttl old (its owner touches
        it every ttl/3, so that is about once per ttl), and the pids of local owners are watched
        through pidfds (one ``poll`` for all of them), so a steady state costs no file I/O.
        """
        dead: list[int] = []
        reread: list[int] = []
        for owner, lease in self._leases.items():
            if now_ns - lease.mtime_ns > lease.ttl_ns:
                try:
                    st = os.stat(lease.path)
                except FileNotFoundError:
                    dead.append(owner)
                    continue
                if st.st_ino != lease.inode or lease.info is None:
                    reread.append(owner)  # replaced or unreadable: read it again when needed
                    continue
                lease.mtime_ns = st.st_mtime_ns
                if now_ns - lease.mtime_ns > lease.ttl_ns:
                    dead.append(owner)
                    continue
            if lease.next_pid_check_ns and now_ns >= lease.next_pid_check_ns:
                if not lease.pid_alive():
                    dead.append(owner)
                    continue
                lease.next_pid_check_ns = now_ns + self._pid_check_ns
        if self._pidfds:
            dead.extend(self._pidfds[fd] for fd, _ in self._pidpoll.poll(0))
        for owner in reread:
            self._untrack_lease(owner)
        for owner in dead:
            if owner in self._leases:
                self._reap_lease(owner, self._leases[owner])
        return bool(dead or reread)

    def _rescan(self, now_ns: int) -> bool:
        """Re-list the directory: re-read changed key files, track new leases, reap temp files.

        True if a tracked lease's file is gone (its owner's keys are no longer live).
        """
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            entries = []
        cache: dict[str, _Record] = {}
        garbage: dict[str, tuple[int, int, int]] = {}
        leases: set[int] = set()
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                if name.startswith(_LEASE):
                    with contextlib.suppress(ValueError):
                        leases.add(int(name[len(_LEASE) :], 16))
                elif name.startswith((_TMP, _REAP)):
                    self._reap_temp(entry, now_ns)
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.debug("lease file discovery skips %s: %s", entry.path, exc)
                continue
            if not stat.S_ISREG(st.st_mode):
                continue  # e.g. a bucket directory of Dynamo's layout sharing this root
            sig = (st.st_ino, st.st_mtime_ns, st.st_size)
            record = self._cache.get(name)
            if record is None or record.sig != sig:
                if self._garbage.get(name) == sig:
                    garbage[name] = sig
                    continue
                record = self._read_record(Path(entry.path), sig)
                if record is None:
                    garbage[name] = sig  # not ours (no header): not re-read until it changes
                    continue
            cache[name] = record
        self._cache = cache
        self._garbage = garbage
        gone = self._leases.keys() - leases
        for owner in gone:
            self._untrack_lease(owner)
        for owner in leases - self._leases.keys():
            self._track_lease(owner, now_ns)
        return bool(gone)

    def _refresh(self, *, full: bool = False) -> None:
        """Bring :attr:`_live` up to date with the directory; bump :attr:`_version` on change.

        The directory is only re-listed when its mtime changed (every write, delete and lease
        creation renames or unlinks in it), or when that mtime is too recent to be trusted
        (two changes within one timestamp tick look alike), or every :data:`_RESCAN_EVERY`
        as a backstop against odd filesystem clocks. Otherwise a refresh is one ``stat`` plus
        the lease checks of :meth:`_check_leases`.
        """
        now_ns = time.time_ns()
        try:
            mtime = os.stat(self.root).st_mtime_ns
        except FileNotFoundError:
            mtime = None
        changed = False
        if (
            full
            or mtime is None
            or mtime != self._dir_mtime
            or self._dir_scanned_ns - mtime < _MTIME_MARGIN_NS
            or now_ns - self._dir_scanned_ns > _RESCAN_EVERY_NS
        ):
            old = {name: rec.sig for name, rec in self._cache.items()}
            leases_gone = self._rescan(now_ns)
            self._dir_mtime, self._dir_scanned_ns = mtime, now_ns
            changed = leases_gone or old != {name: rec.sig for name, rec in self._cache.items()}
        changed = self._check_leases(now_ns) or changed or self._version == 0
        if not changed:
            return
        live: dict[str, _Record] = {}
        for name, record in list(self._cache.items()):
            owner = record.owner
            if owner in self._leases or self._track_lease(owner, now_ns) is not None:
                live[record.key] = record
            else:
                # Keep it if a fresh write replaced the dead file since we looked.
                self._remove_if(self.root / name, functools.partial(_other_inode, record.sig[0]))
                del self._cache[name]
        if {k: r.sig for k, r in live.items()} != {k: r.sig for k, r in self._live.items()}:
            self._live = live
            self._version += 1
            self._wake_all()

    def _scan(self, prefix: str) -> dict[str, _Record]:
        """Live entries under ``prefix``, read now."""
        self._refresh(full=True)
        return {key: rec for key, rec in self._live.items() if key.startswith(prefix)}

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
        # Each wake-up diffs against the previous state, so the snapshot-to-live handover
        # loses nothing: whatever changed after the snapshot shows up in the next diff.
        current = self._scan(prefix)
        seen = self._version
        self._watchers += 1
        self._ensure_poller(self._poll_loop, f"discovery-file-poll-{self.root}")
        try:
            for key in sorted(current):
                yield DiscoveryEvent("put", key, current[key].value)
            while not self._closing.is_set():
                if self._version == seen:
                    await self._wait_change()
                    continue
                seen = self._version
                latest = {k: r for k, r in self._live.items() if k.startswith(prefix)}
                for key in sorted(current.keys() - latest.keys()):
                    yield DiscoveryEvent("delete", key, None)
                for key in sorted(latest):
                    old = current.get(key)
                    if old is None or old.sig != latest[key].sig:
                        yield DiscoveryEvent("put", key, latest[key].value)
                current = latest
        finally:
            self._watchers -= 1
            if self._watchers == 0:
                self._drop_poller()

    async def _poll_loop(self) -> None:
        """One poller per object, shared by all its watches: they wake only on a change."""
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                self._refresh()
            except Exception as exc:  # e.g. the directory became unreadable
                self._fail_all(exc)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        self._wake_all()
        await self._stop_poller()
        for owner in list(self._leases):
            self._untrack_lease(owner)
        if self._keepalive is not None:
            await self._keepalive.stop()
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
