"""NVIDIA Dynamo's file store (``file://[/DIR]``, the default): one directory shared with Dynamo.

This is byte-for-byte the layout a Dynamo 1.6.1 worker or frontend writes and reads with
``--discovery-backend file`` (``DYN_FILE_KV``), so our processes and Dynamo's share one root.

Layout (``$ROOT`` = ``root``, default :func:`default_file_root`):

- A key has at least three ``/``-separated segments. The first two name the *bucket*, a
  directory ``$ROOT/<seg0>/<seg1>`` (``v1/instances``, ``v1/mdc``, ``v1/event_channels``,
  ``v1/event_sources``, ...) created on first use. The rest is one file in it, named with
  :func:`encode_name`: every byte outside ``[A-Za-z0-9]`` as ``%XX`` (upper-case hex). So
  ``v1/instances/dynamo/backend/generate/abc`` is
  ``$ROOT/v1/instances/dynamo%2Fbackend%2Fgenerate%2Fabc``. Listing decodes names back to keys
  (leniently, as Dynamo does: a ``%`` not followed by two hex digits stays literal).
- The content is the raw value: no header, nothing appended.
- Create: write ``<bucket>/.tmp_<16 hex>``, ``os.link`` it to the name (fails if the key
  exists: create-if-absent), unlink the temp. Update of a key this object wrote: temp file
  then ``os.replace``. :meth:`FileDiscovery.put` is create-or-update, so a key found to exist
  already (another writer's, or a dead process's leftover) is replaced too.

Liveness, as in Dynamo: there is no lease file and no pid. The owner touches (sets the mtime
of) every file it owns every ``min(ttl, 10 s) / 3`` from a dedicated thread, so a busy or
blocked event loop (say, a synchronous model load) does not lose liveness. Every participant
that reads or watches a bucket treats a file whose mtime is older than ``expire_after``
(default ``max(10 s, ttl)``; Dynamo's own TTL is 10 s) as gone, unlinks it and logs
``expired discovery file ...`` at info level. A watch reports such an expiry as a delete.
So a SIGKILLed process disappears about 10 s after its last touch; a clean :meth:`close`
unlinks all its files at once.

Ownership lives in memory (the files carry none): this object remembers the inode of every
file it wrote. The keep-alive touches a file only through a descriptor whose inode is still
its own. If one of its files is gone or was replaced by another writer while its keep-alive
was on time, someone deleted or overwrote the key on purpose (``delete()`` from any
participant, or a fresh ``put`` by another): the key is no longer ours and is neither
touched nor recreated. If instead this object went longer than ``min(expire_after, 10 s)``
without touching a file (a stalled process, a starved thread), peers may already have
expired it and told their watchers: :attr:`~.base.Discovery.lease_lost` is set (and the
keep-alive stops, so the process does not quietly come back to life). Dynamo itself only
logs in these cases; the base contract asks for ``lease_lost``.

Reads skip, and never fail on, what is not a key: ``.tmp_*`` and other dot files (abandoned
temp files older than a minute are removed), and at the root and the ``v1`` level everything
that is not a directory (so the private ``file+lease://`` layout can share the root). Inside a
bucket, an entry that is not a regular file, cannot be read, is too large, or whose name does
not decode (not UTF-8) is skipped with one warning per entry and file signature, and counted
in :attr:`FileDiscovery.errors`. Values are opaque bytes here; callers parse them.

Watching polls, as the project's private layout did: all watches of one object share one
poller task that wakes them only on a change. A poll is one ``stat`` per watched bucket
directory (plus one of the root and ``v1`` directories when a watched prefix does not fix
the bucket). A bucket is re-listed (``scandir`` + one ``lstat`` per file) when its directory
mtime changed, while that mtime is too recent to trust, and once a second as a backstop. A
file is re-read only when its inode or size changed, or its mtime changed while the
directory did too (touches change a file's mtime but never its directory's, and every write
creates a new inode). Expiry needs no extra listing: a file is ``stat``-ed only when the
mtime last seen is ``expire_after`` old. Changes are delivered as the net difference between
polls (a key put and deleted between two polls is not reported), deletes first, then puts,
each by key.

Files are not fsynced: discovery state is ephemeral and rebuilt by live processes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import secrets
import stat
import tempfile
import threading
import time
from collections.abc import AsyncGenerator, Iterable
from pathlib import Path
from urllib.parse import unquote_to_bytes

from ._keepalive import KeepAlive
from ._polled import PolledWatches
from .base import Discovery, DiscoveryError, DiscoveryEvent, random_instance_id

__all__ = [
    "DYNAMO_FILE_TTL",
    "FileDiscovery",
    "decode_name",
    "default_file_root",
    "encode_name",
    "split_key",
]

log = logging.getLogger(__name__)

#: Dynamo's file-store TTL: its peers expire a file this long after its last touch.
DYNAMO_FILE_TTL = 10.0
#: Dynamo's temp-file prefix (also ours); such files are never keys.
TMP_PREFIX = ".tmp_"
_NAME_MAX = 255
_MIN_KEEPALIVE = 0.05
#: Larger files are not discovery records (Dynamo's model cards are a few KiB).
_MAX_VALUE = 16 * 1024 * 1024
#: A directory mtime this close to (or after) the listing that saw it is not trusted to reveal
#: later changes: those may land in the same timestamp tick.
_MTIME_MARGIN_NS = 200_000_000
#: Re-list a watched bucket at least this often even if its mtime did not change.
_RESCAN_EVERY_NS = 1_000_000_000
#: A temp file this old was abandoned by a writer that died between create and link.
_TMP_ABANDONED_NS = 60_000_000_000
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_OPEN_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK


def default_file_root() -> Path:
    """``$DYN_FILE_KV``, else ``$TMPDIR/dynamo_store_kv`` (Dynamo's defaults)."""
    env = os.environ.get("DYN_FILE_KV", "").strip()
    return Path(env) if env else Path(tempfile.gettempdir()) / "dynamo_store_kv"


def encode_name(text: str) -> str:
    """Dynamo's file name for a key's in-bucket part: ``%XX`` for every byte but ``[A-Za-z0-9]``."""
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in text.encode())


def decode_name(name: str) -> str | None:
    """The inverse of :func:`encode_name` (lenient about ``%``, like Dynamo); None if not UTF-8."""
    try:
        return unquote_to_bytes(os.fsencode(name)).decode("utf-8")
    except UnicodeError:
        return None


def _check_segment(segment: str, key: str) -> None:
    if not segment or segment.startswith(".") or "\0" in segment:
        raise ValueError(
            f"file discovery key {key!r}: bucket segment {segment!r} must be non-empty and "
            "must not start with '.'"
        )


def split_key(key: str) -> tuple[str, str]:
    """``"v1/instances/ns/c/e/1"`` -> ``("v1/instances", "ns/c/e/1")``: (bucket, rest).

    Raises :class:`ValueError` for a key with fewer than three segments (Dynamo's store has
    no place for it) or a bucket segment that is empty or starts with ``.``.
    """
    seg0, slash0, tail = key.partition("/")
    seg1, slash1, rest = tail.partition("/")
    if not slash0 or not slash1 or not rest:
        raise ValueError(
            f"file discovery key {key!r} needs at least 3 '/'-separated segments, "
            "<bucket>/<bucket>/<name> (e.g. v1/instances/dynamo/backend/generate/1a2b)"
        )
    _check_segment(seg0, key)
    _check_segment(seg1, key)
    return f"{seg0}/{seg1}", rest


def _bucket_matches(bucket: str, prefix: str) -> bool:
    """Whether bucket ``bucket`` may hold keys that start with ``prefix``."""
    return (bucket + "/").startswith(prefix) or prefix.startswith(bucket + "/")


class _Rec:
    """One key file as last seen."""

    __slots__ = ("ino", "key", "mtime_ns", "size", "value")

    def __init__(self, key: str, value: bytes, ino: int, size: int, mtime_ns: int) -> None:
        self.key = key
        self.value = value
        self.ino = ino
        self.size = size
        self.mtime_ns = mtime_ns


class _Bucket:
    """What the last listing of one bucket directory saw."""

    __slots__ = ("bad", "mtime_ns", "name", "next_expiry_ns", "path", "recs", "scanned_ns")

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self.mtime_ns: int | None = None  # of the directory, at the last listing
        self.scanned_ns = 0
        self.recs: dict[str, _Rec] = {}  # file name -> record
        self.bad: dict[str, object] = {}  # file name -> signature already logged
        self.next_expiry_ns = 0


class _Parent:
    """A directory above buckets (the root, or ``$ROOT/v1``): its subdirectory names."""

    __slots__ = ("children", "mtime_ns", "scanned_ns")

    def __init__(self) -> None:
        self.children: tuple[str, ...] = ()
        self.mtime_ns: int | None = None
        self.scanned_ns = 0


class _Owned:
    """A file this object wrote: its inode and when the keep-alive last touched it."""

    __slots__ = ("ino", "path", "touched")

    def __init__(self, path: Path, ino: int, touched: float) -> None:
        self.path = path
        self.ino = ino
        self.touched = touched  # time.monotonic() just before the last successful touch


class FileDiscovery(PolledWatches, Discovery):
    """:class:`Discovery` in Dynamo's file-store layout (see the module docstring).

    ``root`` defaults to :func:`default_file_root`. ``poll_interval`` is the watch poll period
    in seconds. ``expire_after`` is the age (seconds since the last touch) at which this object
    treats a file as dead; it defaults to ``max(10, ttl)`` and should not be lower than what
    other participants use (Dynamo: 10 s). The owner's keep-alive period is
    ``min(ttl, 10, expire_after) / 3``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        ttl: float | None = None,
        poll_interval: float = 0.1,
        expire_after: float | None = None,
    ) -> None:
        super().__init__(ttl=ttl)
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval!r}")
        if expire_after is None:
            expire_after = max(DYNAMO_FILE_TTL, self.ttl)
        elif not expire_after > 0:
            raise ValueError(f"expire_after must be > 0 seconds, got {expire_after!r}")
        self.root = Path(root) if root is not None else default_file_root()
        self.poll_interval = float(poll_interval)
        #: Seconds after its last touch at which a file counts as dead (and is removed).
        self.expire_after = float(expire_after)
        #: How often the owner touches its files.
        self.keepalive_interval = max(
            min(self.ttl, DYNAMO_FILE_TTL, self.expire_after) / 3, _MIN_KEEPALIVE
        )
        #: Directory entries skipped because they could not be used (counted once per entry
        #: and file signature): unreadable, not a regular file, too large, name not decodable.
        self.errors = 0
        self._expire_ns = int(self.expire_after * 1e9)
        # Past this many seconds without a touch, a peer may have expired our file.
        self._late_after = min(self.expire_after, DYNAMO_FILE_TTL)
        self._owned: dict[str, _Owned] = {}
        self._owned_lock = threading.Lock()
        self._lost_reason: str | None = None
        self._keepalive: KeepAlive | None = None
        self._warned: dict[str, int] = {}  # key -> errno the keep-alive last warned about
        self._made: set[str] = set()  # bucket directories known to exist
        # Change detection (see _refresh).
        self._buckets: dict[str, _Bucket] = {}
        self._parents: dict[str, _Parent] = {}  # "" = root, "v1" = $ROOT/v1
        self._parent_bad: dict[str, object] = {}
        self._unlink_failed: dict[str, int] = {}  # path -> inode already warned about
        self._version = 0
        # Watches: one shared poller task, the prefixes it serves, and the waiting watches.
        self._interest: collections.Counter[str] = collections.Counter()
        self._init_polled()

    # -- lease (keep-alive) -------------------------------------------------------------------
    async def start(self) -> None:
        self._check_open()
        if self._started:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        self._instance_id = random_instance_id()
        self._started = True
        self._keepalive = KeepAlive(
            f"discovery-dynamo-file-keepalive-{self._instance_id:x}", self.keepalive_interval,
            self._beat, on_lost=self._lose, lease_lost=self.lease_lost)
        self._keepalive.start()

    def _beat(self) -> float | str:
        """Touch every owned file (on the keep-alive thread); a ``str`` when the lease is
        lost."""
        assert self._keepalive is not None
        stopping = self._keepalive.stopping
        warned = self._warned
        with self._owned_lock:
            owned = list(self._owned.items())
        for key, own in owned:
            if stopping.is_set():
                break
            now = time.monotonic()
            if now - own.touched > self._late_after:
                return f"{key!r} was not touched for {now - own.touched:.1f}s"
            try:
                outcome = _touch(own.path, own.ino)
            except OSError as exc:
                if warned.get(key) != exc.errno:
                    warned[key] = exc.errno or 0
                    log.warning("file discovery cannot touch %s: %s", own.path, exc)
                continue
            warned.pop(key, None)
            if outcome == "ok":
                own.touched = now
                continue
            if outcome == "missing" and time.monotonic() - own.touched > self._late_after / 2:
                # Gone while we were late: most likely a peer expired it.
                return f"{own.path} was removed while its keep-alive was late"
            with self._owned_lock:
                if self._owned.get(key) is not own:
                    continue  # deleted or rewritten by this object meanwhile
                del self._owned[key]
            log.info(
                "file discovery no longer owns %r: its file was %s by another participant",
                key,
                "deleted" if outcome == "missing" else "replaced",
            )
        return self.keepalive_interval

    def _lose(self, reason: str) -> None:
        self._lost_reason = reason
        log.error("file discovery lease lost: %s; peers may consider this process gone", reason)

    # -- writes -------------------------------------------------------------------------------
    def _path(self, key: str) -> tuple[str, Path]:
        bucket, rest = split_key(key)
        name = encode_name(rest)
        if len(name) > _NAME_MAX:
            raise ValueError(
                f"file discovery key {key!r} is too long: its file name would be {len(name)} "
                f"bytes (the limit is {_NAME_MAX})"
            )
        return bucket, self.root / bucket / name

    def _write_temp(self, directory: Path, data: bytes) -> tuple[Path, int]:
        for _ in range(16):
            tmp = directory / f"{TMP_PREFIX}{secrets.token_hex(8)}"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            except FileExistsError:
                continue
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                ino = os.fstat(fd).st_ino
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            os.close(fd)
            return tmp, ino
        raise DiscoveryError(f"cannot create a unique temp file in {directory}")

    async def put(self, key: str, value: bytes) -> None:
        self._check_started()
        if self._lost_reason is not None:
            raise DiscoveryError(f"file discovery lease lost ({self._lost_reason})")
        bucket, path = self._path(key)
        data = bytes(value)
        touched = time.monotonic()
        if bucket not in self._made:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._made.add(bucket)
        try:
            tmp, ino = self._write_temp(path.parent, data)
        except FileNotFoundError:  # the bucket directory was removed since
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp, ino = self._write_temp(path.parent, data)
        try:
            with self._owned_lock:
                ours = key in self._owned
            if ours:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    os.replace(tmp, path)  # create-or-update: replace whatever is there
                else:
                    os.unlink(tmp)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with self._owned_lock:
            self._owned[key] = _Owned(path, ino, touched)

    async def delete(self, key: str) -> None:
        self._check_open()
        _, path = self._path(key)
        with self._owned_lock:
            self._owned.pop(key, None)
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            os.unlink(path)

    # -- reads --------------------------------------------------------------------------------
    def _skip(self, b: _Bucket, bad: dict[str, object], name: str, sig: object, why: str) -> None:
        bad[name] = sig
        if b.bad.get(name) != sig:
            self.errors += 1
            log.warning("file discovery skips %s: %s", b.path / name, why)

    def _parent_error(self, path: Path, exc: OSError) -> None:
        sig = (exc.errno, type(exc).__name__)
        if self._parent_bad.get(str(path)) != sig:
            self._parent_bad[str(path)] = sig
            self.errors += 1
            log.warning("file discovery cannot list %s: %s", path, exc)

    def _children(self, rel: str, now_ns: int, full: bool) -> tuple[str, ...]:
        """Subdirectories (not starting with ``.``) of ``$ROOT`` (``rel=""``) or ``$ROOT/rel``."""
        parent = self._parents.setdefault(rel, _Parent())
        path = self.root / rel if rel else self.root
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            parent.children, parent.mtime_ns = (), None
            return ()
        except OSError as exc:
            self._parent_error(path, exc)
            return parent.children
        if not stat.S_ISDIR(st.st_mode):
            parent.children, parent.mtime_ns = (), None
            return ()
        if (
            full
            or st.st_mtime_ns != parent.mtime_ns
            or parent.scanned_ns - st.st_mtime_ns < _MTIME_MARGIN_NS
            or now_ns - parent.scanned_ns > _RESCAN_EVERY_NS
        ):
            try:
                with os.scandir(path) as it:
                    names = []
                    for entry in it:
                        with contextlib.suppress(OSError):
                            if not entry.name.startswith(".") and entry.is_dir():
                                names.append(entry.name)
            except OSError as exc:
                self._parent_error(path, exc)
                return parent.children
            self._parent_bad.pop(str(path), None)
            parent.children = tuple(sorted(names))
            parent.mtime_ns, parent.scanned_ns = st.st_mtime_ns, now_ns
        return parent.children

    def _bucket_names(self, prefix: str, now_ns: int, full: bool) -> set[str]:
        """The buckets that may hold keys under ``prefix`` (listing parents if needed)."""
        parts = prefix.split("/", 2)
        names: set[str] = {b for b in self._buckets if _bucket_matches(b, prefix)}
        if len(parts) == 3:
            seg0, seg1 = parts[0], parts[1]
            if seg0 and seg1 and not seg0.startswith(".") and not seg1.startswith("."):
                names.add(f"{seg0}/{seg1}")
        elif len(parts) == 2:
            seg0, start = parts
            if seg0 and not seg0.startswith("."):
                names.update(
                    f"{seg0}/{c}" for c in self._children(seg0, now_ns, full) if c.startswith(start)
                )
        else:
            for seg0 in self._children("", now_ns, full):
                if seg0.startswith(prefix):
                    names.update(f"{seg0}/{c}" for c in self._children(seg0, now_ns, full))
        return names

    def _refresh(self, prefixes: Iterable[str], *, full: bool = False) -> None:
        """Bring the buckets under ``prefixes`` up to date; bump :attr:`_version` on change."""
        now_ns = time.time_ns()
        names: set[str] = set()
        for prefix in prefixes:
            names |= self._bucket_names(prefix, now_ns, full)
        changed = False
        for name in sorted(names):
            changed = self._refresh_bucket(name, now_ns, full) or changed
        if changed or self._version == 0:
            self._version += 1
            self._wake_all()

    def _refresh_bucket(self, name: str, now_ns: int, full: bool) -> bool:
        b = self._buckets.get(name)
        if b is None:
            b = self._buckets[name] = _Bucket(name, self.root / name)
        try:
            st = os.stat(b.path)
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(b.path))
        except (FileNotFoundError, NotADirectoryError):
            del self._buckets[name]
            self._made.discard(name)
            return bool(b.recs)
        except OSError as exc:
            self._parent_error(b.path, exc)
            return False
        trusted = (
            b.mtime_ns is not None
            and st.st_mtime_ns == b.mtime_ns
            and b.scanned_ns - b.mtime_ns >= _MTIME_MARGIN_NS
        )
        if full or not trusted or now_ns - b.scanned_ns > _RESCAN_EVERY_NS:
            return self._relist(b, st.st_mtime_ns, now_ns, dir_changed=not trusted)
        return self._check_expiry(b, now_ns)

    def _relist(self, b: _Bucket, dir_mtime_ns: int, now_ns: int, *, dir_changed: bool) -> bool:
        try:
            it = os.scandir(b.path)
        except FileNotFoundError:
            had = bool(b.recs)
            b.recs, b.bad, b.mtime_ns = {}, {}, None
            return had
        except OSError as exc:
            self._parent_error(b.path, exc)
            return False
        self._parent_bad.pop(str(b.path), None)
        recs: dict[str, _Rec] = {}
        bad: dict[str, object] = {}
        by_key: dict[str, str] = {}
        with it:
            entries = list(it)
        for entry in sorted(entries, key=lambda e: e.name):
            name = entry.name
            if name.startswith("."):
                if name.startswith(TMP_PREFIX):
                    self._reap_temp(entry, now_ns)
                continue
            try:
                st: os.stat_result | None = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as exc:
                self._skip(b, bad, name, ("stat", exc.errno), f"cannot stat it: {exc}")
                continue
            assert st is not None
            if not stat.S_ISREG(st.st_mode):
                kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
                self._skip(b, bad, name, ("type", stat.S_IFMT(st.st_mode), st.st_ino), kind)
                continue
            if now_ns - st.st_mtime_ns > self._expire_ns:
                st = self._expire(b, name, st.st_ino, now_ns)
                if st is None:
                    continue
            rec = self._record(b, name, st, bad, dir_changed=dir_changed)
            if rec is None:
                continue
            other = by_key.get(rec.key)
            if other is not None:  # two names decode to one key: keep Dynamo's spelling
                canonical = encode_name(rec.key[len(b.name) + 1 :])
                drop = other if name == canonical else name
                self._skip(b, bad, drop, ("dup", rec.key), f"another file also holds {rec.key!r}")
                if drop == name:
                    continue
                del recs[other]
            by_key[rec.key] = name
            recs[name] = rec
        changed = recs.keys() != b.recs.keys() or any(b.recs[n] is not r for n, r in recs.items())
        b.recs, b.bad = recs, bad
        b.mtime_ns, b.scanned_ns = dir_mtime_ns, now_ns
        self._set_next_expiry(b)
        return changed

    def _record(
        self,
        b: _Bucket,
        name: str,
        st: os.stat_result,
        bad: dict[str, object],
        *,
        dir_changed: bool,
    ) -> _Rec | None:
        """The record for file ``name`` (stat ``st``): the previous one if unchanged, else read."""
        old = b.recs.get(name)
        if (
            old is not None
            and old.ino == st.st_ino
            and old.size == st.st_size
            and (old.mtime_ns == st.st_mtime_ns or not dir_changed)
        ):
            old.mtime_ns = st.st_mtime_ns  # a touch (no write happened in the directory)
            return old
        rest = decode_name(name)
        if not rest:
            self._skip(b, bad, name, ("name",), "its name is not a percent-encoded UTF-8 key")
            return None
        sig = (st.st_ino, st.st_size, st.st_mtime_ns)
        if b.bad.get(name) == sig:
            bad[name] = sig  # already known to be unreadable: not retried until it changes
            return None
        if st.st_size > _MAX_VALUE:
            self._skip(b, bad, name, sig, f"{st.st_size} bytes is too large for a record")
            return None
        try:
            value, fst = _read(b.path / name)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._skip(b, bad, name, sig, f"cannot read it: {exc}")
            return None
        if old is not None and old.ino == fst.st_ino and old.value == value:
            old.size, old.mtime_ns = fst.st_size, fst.st_mtime_ns
            return old
        return _Rec(f"{b.name}/{rest}", value, fst.st_ino, fst.st_size, fst.st_mtime_ns)

    def _set_next_expiry(self, b: _Bucket) -> None:
        oldest = min((r.mtime_ns for r in b.recs.values()), default=None)
        b.next_expiry_ns = (1 << 63) if oldest is None else oldest + self._expire_ns

    def _check_expiry(self, b: _Bucket, now_ns: int) -> bool:
        """Between listings: ``stat`` the files last seen ``expire_after`` ago; expire the dead."""
        if now_ns <= b.next_expiry_ns:
            return False
        changed = relist = False
        for name, rec in list(b.recs.items()):
            if now_ns - rec.mtime_ns <= self._expire_ns:
                continue
            try:
                st = os.stat(b.path / name, follow_symlinks=False)
            except FileNotFoundError:
                del b.recs[name]
                changed = True
                continue
            except OSError:
                relist = True
                continue
            if st.st_ino != rec.ino or st.st_size != rec.size or not stat.S_ISREG(st.st_mode):
                relist = True  # rewritten: the listing re-reads it
                continue
            rec.mtime_ns = st.st_mtime_ns
            if now_ns - rec.mtime_ns > self._expire_ns:
                if self._expire(b, name, rec.ino, now_ns) is None:
                    del b.recs[name]
                    changed = True
                else:
                    relist = True
        self._set_next_expiry(b)
        if relist:
            try:
                dir_mtime_ns = os.stat(b.path).st_mtime_ns
            except OSError:
                dir_mtime_ns = 0  # gone or unreadable: _relist finds out
            changed = self._relist(b, dir_mtime_ns, now_ns, dir_changed=True) or changed
        return changed

    def _expire(self, b: _Bucket, name: str, ino: int, now_ns: int) -> os.stat_result | None:
        """Remove ``name`` if it still is the expired file ``ino``; its fresh stat if it lives."""
        path = b.path / name
        try:
            st = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if st.st_ino != ino or now_ns - st.st_mtime_ns <= self._expire_ns:
            return st if stat.S_ISREG(st.st_mode) else None  # touched or rewritten meanwhile
        age = (now_ns - st.st_mtime_ns) / 1e9
        try:
            os.unlink(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            # Treated as gone all the same (Dynamo does too); say so once per file.
            if self._unlink_failed.get(str(path)) != ino:
                self._unlink_failed[str(path)] = ino
                log.warning("file discovery cannot remove expired %s: %s", path, exc)
            return None
        log.info("expired discovery file %s (last modified %.1fs ago)", path, age)
        return None

    def _reap_temp(self, entry: os.DirEntry[str], now_ns: int) -> None:
        with contextlib.suppress(OSError):
            if now_ns - entry.stat(follow_symlinks=False).st_mtime_ns > _TMP_ABANDONED_NS:
                os.unlink(entry.path)

    def _view(self, prefix: str) -> dict[str, _Rec]:
        return {
            rec.key: rec
            for b in self._buckets.values()
            if _bucket_matches(b.name, prefix)
            for rec in b.recs.values()
            if rec.key.startswith(prefix)
        }

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        self._check_open()
        self._refresh([prefix], full=True)
        return {key: rec.value for key, rec in self._view(prefix).items()}

    # -- watch --------------------------------------------------------------------------------
    async def watch_prefix(self, prefix: str) -> AsyncGenerator[DiscoveryEvent, None]:
        if self._closed:
            return
        self._interest[prefix] += 1
        try:
            # Each wake-up diffs against the previous state, so the snapshot-to-live handover
            # loses nothing: whatever changed after the snapshot shows up in the next diff.
            self._refresh([prefix], full=True)
            current = self._view(prefix)
            seen = self._version
            self._ensure_poller(self._poll_loop, f"discovery-dynamo-file-poll-{self.root}")
            for key in sorted(current):
                yield DiscoveryEvent("put", key, current[key].value)
            while not self._closing.is_set():
                if self._version == seen:
                    await self._wait_change()
                    continue
                seen = self._version
                latest = self._view(prefix)
                for key in sorted(current.keys() - latest.keys()):
                    yield DiscoveryEvent("delete", key, None)
                for key in sorted(latest):
                    if current.get(key) is not latest[key]:
                        yield DiscoveryEvent("put", key, latest[key].value)
                current = latest
        finally:
            self._interest[prefix] -= 1
            if self._interest[prefix] <= 0:
                del self._interest[prefix]
            if not self._interest:
                self._drop_poller()

    async def _poll_loop(self) -> None:
        """One poller per object, shared by all its watches: they wake only on a change."""
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                self._refresh(list(self._interest))
            except Exception as exc:  # a bug: surface it in the watches, do not spin silently
                self._fail_all(exc)

    # -- shutdown -----------------------------------------------------------------------------
    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        self._wake_all()
        await self._stop_poller()
        if self._keepalive is not None:
            await self._keepalive.stop()
        with self._owned_lock:
            owned, self._owned = self._owned, {}
        for own in owned.values():  # all at once, as Dynamo does on shutdown
            try:
                if os.lstat(own.path).st_ino == own.ino:  # still ours, not a newer writer's
                    os.unlink(own.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("file discovery cannot remove %s on close: %s", own.path, exc)


def _touch(path: Path, ino: int) -> str:
    """Set ``path``'s mtime to now if it still is inode ``ino``: "ok", "missing" or "replaced"."""
    try:
        fd = os.open(path, os.O_WRONLY | _OPEN_FLAGS)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENOTDIR):
            return "replaced"  # a symlink, directory or fifo took its place
        raise
    try:
        st = os.fstat(fd)
        if st.st_ino != ino:
            return "replaced"
        os.utime(fd, ns=(st.st_atime_ns, time.time_ns()))
    finally:
        os.close(fd)
    return "ok"


def _read(path: Path) -> tuple[bytes, os.stat_result]:
    """The content of regular file ``path`` and the stat of exactly the inode read."""
    fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
    with open(fd, "rb", closefd=True) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        data = f.read(_MAX_VALUE + 1)
        if len(data) > _MAX_VALUE:
            raise OSError(errno.EFBIG, "too large for a discovery record", str(path))
        return data, st
