"""Disaggregated prefill/decode for the mocker: KV holds, a simulated KV transfer, and its wire.

Roles (``--disaggregation-mode``, default ``$DYN_DISAGGREGATION_MODE``):

**Prefill** (:class:`KvTransferServer`). A request is served by the normal scheduler with
``max_tokens`` capped at 1 (its prompt costs prefill time, hits the prefix cache, is chunked and
publishes KV events as for an aggregated request), then its one token ends the stream with
``length`` and ``disaggregated_params`` (:class:`MockerKvParams`, as a JSON-able dict)::

    {"mocker_handle": "<uuid4 hex>",   # names the hold on this worker
     "completed_tokens": [tok],        # the token the prefill produced: decode's first token
     "transfer_host": h, "transfer_port": p,   # this worker's transfer server
     "num_blocks": n, "block_size": bs,        # the prompt's KV blocks (ceil(prompt / bs))
     "prompt_len": len(prompt), "dp_rank": r,
     "bootstrap_room": room}           # null unless the request carried bootstrap_info

Its KV blocks are not freed when the stream ends: the scheduler hands them to a
:class:`~.kv_manager.KvPin` (a *hold*) that nothing can evict or reuse until the decode worker
pulled them or ``--kv-hold-timeout-s`` passed (then the hold is freed and counted ``expired``).
Health-check requests, and prefills cancelled or failed before their terminal, hold nothing.

**Transfer server.** An asyncio TCP server on ``--transfer-host`` (ephemeral port), opened by
``start()`` and closed by ``cleanup()`` (which frees every hold). Frames are a 4-byte
big-endian length then a msgpack map; a connection carries any number of request/reply pairs,
one at a time:

- request :class:`PullRequest`: ``{"handle": "<hex>"}`` (standard path) or ``{"room": n}``
  (bootstrap path);
- reply :class:`PullReply`: ``{"ok": true, "handle", "block_size", "num_blocks", "prompt_len",
  "block_hashes", "completed_tokens", "cached_tokens", "transfer_ms"}`` or ``{"ok": false,
  "error": code, "message": why}``, ``code`` one of ``unknown_handle``, ``expired``,
  ``already_pulled``, ``room_timeout``, ``room_failed``, ``freed_blocks``, ``freed`` (at
  shutdown), ``bad_request``.

A pull marks the hold in transfer (it cannot expire then), waits the simulated transfer time
(``num_blocks * --kv-transfer-ms-per-block / --speedup-ratio``; no wait with 0 or when steps do
not wait either), checks with :meth:`~.kv_manager.KvManager.verify` that every block is still
the very allocation the hold took (block id + allocation generation), replies, and frees the
hold. A block found freed or reused makes the reply ``freed_blocks`` and counts
``freed_block_reads`` (so a test can prove no decode ever reads freed KV). A decode side that
disconnects mid-transfer gets nothing: the hold goes back to waiting (and expires on time).

**Bootstrap path** (``--bootstrap``): ``start()`` returns the transfer server's address as
``EngineConfig.bootstrap_host``/``bootstrap_port``, so the frontend sends decode concurrently
with prefill, both carrying the same ``BootstrapInfo``; the prefill registers its hold under
``bootstrap_room`` too, and a pull of a room whose prefill has not finished waits for it
(bounded by the hold timeout); a prefill of that room that ends without KV fails the wait.

**Drain.** :meth:`KvTransferServer.wait_drained` (the engine's ``drain()``, which the worker
bounds by its ``kv_transfer`` budget) returns once no hold is waiting or in transfer, so a
SIGTERMed prefill worker still serves the pulls of what it prefilled.

**Decode** (:class:`KvPuller`). A request whose ``prefill_result.disaggregated_params`` name a
mocker handle, or that carries ``bootstrap_info``, queues in the decode worker's scheduler like
any other; once admitted (FCFS, within ``max_num_seqs`` and the free blocks) it holds blocks for
its whole prompt and computes nothing while it pulls the KV into them (vLLM's
``WAITING_FOR_REMOTE_KVS``; so a long decode queue can outlast a hold). When the pull completed
(``ctx.notify_first_token()`` then) the prompt counts as computed and cached (no prefill step;
the blocks are hashed and published) and the prefill's token is the first output, so prefill +
decode tokens = ``max_tokens``; usage covers the whole request (cached tokens: the prefill's
prefix hit), and no ``disaggregated_params`` are stamped. No
``prefill_result`` and no ``bootstrap_info``, or empty ``disaggregated_params`` (the decode
health canary's ``{}``), is a local prefill (counted ``local_prefill``, health checks aside). A
failed pull (refused or broken connection, error reply, ``--kv-pull-timeout-s``, a reply for
another prompt) is recomputed locally (``--kv-load-failure recompute``, counted ``recomputed``)
or raises ``DynamoError`` (``fail``): ``Disconnected`` for the connection, ``InvalidArgument``
for a handle the prefill worker does not know (or expired, or a mismatched reply),
``ResponseTimeout`` for a timeout, ``Unknown`` for freed blocks. A request stopped during its
pull still finishes it (bounded by the pull timeout; abandoning it would leave the prefill
holding the blocks until expiry, and free blocks a transfer is writing), then frees its blocks
and ends ``cancelled``; one stopped while still queued never pulls (the hold then expires).

**Metrics** (:class:`KvTransferStats`, on the worker's ``/metrics`` through
``MetricsCtx.metrics``; plain attributes for tests): ``dynamo_mocker_kv_transfers_total{role,
outcome}`` (prefill: ``completed``, ``expired``, ``failed``; decode: ``completed``, ``failed``,
``recomputed``, ``local_prefill``), ``dynamo_mocker_kv_transfer_seconds{role}`` (prefill: the
transfer; decode: the whole pull), ``dynamo_mocker_kv_held_blocks`` and
``dynamo_mocker_kv_holds`` (prefill), ``dynamo_mocker_kv_freed_block_reads_total`` (prefill),
``dynamo_mocker_kv_pulls_in_flight`` (decode).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

import msgspec
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from ...errors import BackendError, DynamoError
from ...kv.hashing import block_hashes
from ...protocols.common import LLMEngineOutput, PreprocessedRequest
from ...runtime.context import Context
from ...runtime.metrics import TTFT_BUCKETS, FastHistogram
from ...runtime.tasks import cancel_and_wait
from .args import MockerArgs
from .kv_manager import KvManager, KvPin
from .scheduler import Sequence

__all__ = [
    "KvPuller",
    "KvSource",
    "KvTransferServer",
    "KvTransferStats",
    "MockerKvParams",
    "PullReply",
    "PullRequest",
    "PulledKv",
]

log = logging.getLogger("dynamo_backend_common.mocker")

_LEN: Final = struct.Struct(">I")
#: Largest frame either side accepts (a reply carries one 8-byte hash per block).
MAX_FRAME: Final = 64 << 20
#: Handles / rooms remembered after their hold ended, to tell "expired" from "unknown".
_TOMBSTONES: Final = 4096
#: Idle connections kept per prefill worker.
_IDLE_PER_PEER: Final = 8
#: Seconds between two drain progress lines.
_DRAIN_LOG_S: Final = 5.0
_WILDCARD_HOSTS: Final = frozenset({"", "0.0.0.0", "::"})


# -- wire ---------------------------------------------------------------------------------------
class MockerKvParams(msgspec.Struct, kw_only=True):
    """The ``disaggregated_params`` a prefill mocker stamps on its terminal chunk."""

    mocker_handle: str
    transfer_host: str
    transfer_port: int
    completed_tokens: list[int] = []
    num_blocks: int = 0
    block_size: int = 0
    prompt_len: int = 0
    dp_rank: int = 0
    bootstrap_room: int | None = None


class PullRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Decode -> prefill: pull the hold named by ``handle``, or the one of bootstrap ``room``."""

    handle: str | None = None
    room: int | None = None


class PullReply(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Prefill -> decode: the KV's description (``ok``) or why there is none."""

    ok: bool
    error: str | None = None
    message: str = ""
    handle: str = ""
    block_size: int = 0
    num_blocks: int = 0
    prompt_len: int = 0
    block_hashes: list[int] = []
    completed_tokens: list[int] = []
    cached_tokens: int = 0
    transfer_ms: float = 0.0


_ENCODER: Final = msgspec.msgpack.Encoder()
_REQUEST_DECODER: Final = msgspec.msgpack.Decoder(PullRequest)
_REPLY_DECODER: Final = msgspec.msgpack.Decoder(PullReply)

# Error codes of a refused pull, and the DynamoError kind a decode worker raises for each.
_ERROR_KINDS: Final = {
    "unknown_handle": BackendError.InvalidArgument,
    "expired": BackendError.InvalidArgument,
    "already_pulled": BackendError.InvalidArgument,
    "room_failed": BackendError.InvalidArgument,
    "bad_request": BackendError.InvalidArgument,
    "room_timeout": BackendError.ResponseTimeout,
    "freed_blocks": BackendError.Unknown,
    "freed": BackendError.EngineShutdown,
}


def _frame(msg: msgspec.Struct) -> bytes:
    body = _ENCODER.encode(msg)
    return _LEN.pack(len(body)) + body


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (n,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if n > MAX_FRAME:
        raise ConnectionError(f"KV transfer frame of {n} bytes exceeds {MAX_FRAME}")
    return await reader.readexactly(n)


def _error(code: str, message: str) -> PullReply:
    return PullReply(ok=False, error=code, message=message)


# -- metrics ------------------------------------------------------------------------------------
class KvTransferStats:
    """Counters of one mocker's KV transfers (plain ints: no work per token, no locks), and
    their Prometheus exposition (:meth:`render`, for ``EngineMetrics.add_expfmt_callback``)."""

    PREFILL_OUTCOMES: Final = ("completed", "expired", "failed")
    DECODE_OUTCOMES: Final = ("completed", "failed", "recomputed", "local_prefill")

    def __init__(self, role: str) -> None:
        self.role = role
        #: Pulls that delivered the KV (served, on prefill; received, on decode).
        self.completed = 0
        #: Prefill: holds freed unpulled after the hold timeout.
        self.expired = 0
        #: Pulls that delivered nothing (prefill: refused or broken pulls; decode: with
        #: ``--kv-load-failure fail``, or for a request already stopped).
        self.failed = 0
        #: Decode: failed pulls whose prompt was prefilled locally instead.
        self.recomputed = 0
        #: Decode: requests without a KV handle, prefilled locally (health checks aside).
        self.local_prefill = 0
        #: Prefill: pulls that found a held block freed or reused (must stay 0).
        self.freed_block_reads = 0
        #: Decode: pulls in progress.
        self.in_flight = 0
        self.transfer_seconds = FastHistogram(TTFT_BUCKETS)
        #: Prefill: ``(holds, blocks held)`` now; set by the transfer server.
        self.holds: Callable[[], tuple[int, int]] = lambda: (0, 0)
        self._registry: CollectorRegistry | None = None

    def render(self) -> bytes:
        if self._registry is None:
            self._registry = CollectorRegistry(auto_describe=True)
            self._registry.register(self)
        return bytes(generate_latest(self._registry))

    def collect(self) -> Iterator[Metric]:
        role = self.role
        outcomes = self.PREFILL_OUTCOMES if role == "prefill" else self.DECODE_OUTCOMES
        fam = CounterMetricFamily(
            "dynamo_mocker_kv_transfers", "Mocker KV transfers, by role and outcome.",
            labels=["role", "outcome"],
        )
        for outcome in outcomes:
            fam.add_metric([role, outcome], getattr(self, outcome))
        yield fam
        buckets, total = self.transfer_seconds.cumulative()
        hist = HistogramMetricFamily(
            "dynamo_mocker_kv_transfer_seconds",
            "Mocker KV transfer time (prefill: the transfer; decode: the whole pull).",
            labels=["role"],
        )
        hist.add_metric([role], buckets, total)
        yield hist
        if role == "prefill":
            holds, blocks = self.holds()
            g = GaugeMetricFamily("dynamo_mocker_kv_held_blocks",
                                  "KV blocks held for decode pulls.", labels=["role"])
            g.add_metric([role], blocks)
            yield g
            g = GaugeMetricFamily("dynamo_mocker_kv_holds",
                                  "KV holds waiting for or in transfer.", labels=["role"])
            g.add_metric([role], holds)
            yield g
            c = CounterMetricFamily(
                "dynamo_mocker_kv_freed_block_reads",
                "KV pulls that found a held block freed or reused.", labels=["role"],
            )
            c.add_metric([role], self.freed_block_reads)
            yield c
        else:
            g = GaugeMetricFamily("dynamo_mocker_kv_pulls_in_flight",
                                  "KV pulls in progress.", labels=["role"])
            g.add_metric([role], self.in_flight)
            yield g


# -- prefill side -------------------------------------------------------------------------------
class _HoldState(Enum):
    WAITING = "waiting"
    TRANSFERRING = "transferring"


class _Hold:
    """One prefilled prompt's KV, pinned until its pull (or expiry)."""

    __slots__ = (
        "block_hashes", "cached_tokens", "completed_tokens", "deadline", "handle", "kv", "pin",
        "prompt_len", "room", "state", "timer",
    )

    def __init__(self, handle: str, room: int | None, kv: KvManager, pin: KvPin,
                 block_hashes: list[int], prompt_len: int, completed_tokens: list[int],
                 cached_tokens: int, deadline: float) -> None:
        self.handle = handle
        self.room = room
        self.kv = kv
        self.pin = pin
        self.block_hashes = block_hashes
        self.prompt_len = prompt_len
        self.completed_tokens = completed_tokens
        self.cached_tokens = cached_tokens
        self.deadline = deadline
        self.state = _HoldState.WAITING
        self.timer: asyncio.TimerHandle | None = None


class _RoomWait:
    __slots__ = ("event", "waiters")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.waiters = 0


class KvTransferServer:
    """The prefill role: KV holds and the transfer server (see the module docs)."""

    def __init__(self, args: MockerArgs, stats: KvTransferStats) -> None:
        self.args = args
        self.stats = stats
        stats.holds = lambda: (len(self._holds), self.held_blocks)
        self.host = args.transfer_host
        self.port = 0
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._holds: dict[str, _Hold] = {}
        self._rooms: dict[int, _Hold] = {}
        # Why a handle / room is gone (pulled, expired, ...), newest last, bounded.
        self._gone: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._gone_rooms: OrderedDict[int, tuple[str, str]] = OrderedDict()
        self._room_waits: dict[int, _RoomWait] = {}
        self._empty = asyncio.Event()
        self._empty.set()
        self._changed = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> tuple[str, int]:
        """Open the transfer server; ``(advertised host, port)``."""
        try:
            self._server = await asyncio.start_server(
                self._serve_connection, self.args.transfer_host, 0
            )
        except OSError as exc:
            raise DynamoError.invalid_argument(
                f"mocker prefill: cannot open the KV transfer server on "
                f"{self.args.transfer_host!r}: {exc}", exc,
            ) from exc
        self.port = int(self._server.sockets[0].getsockname()[1])
        bind = self.args.transfer_host
        self.host = socket.gethostname() if bind in _WILDCARD_HOSTS else bind
        log.info("mocker prefill: KV transfer server on %s:%d", self.host, self.port)
        return self.host, self.port

    async def close(self) -> None:
        """Stop serving, end live connections, free every hold. Idempotent, safe unstarted."""
        if self._closed:
            return
        self._closed = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        await cancel_and_wait(self._conns)
        if server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await server.wait_closed()
        for hold in list(self._holds.values()):
            self._release(hold, "freed", "the prefill worker shut down")
        for wait in self._room_waits.values():
            wait.event.set()
        self._notify()

    async def wait_drained(self) -> None:
        """Return once no hold is waiting or in transfer (logs progress every ~5 s)."""
        if not self._holds:
            return
        log.info("mocker drain: waiting for %d KV hold(s) (%d blocks) to be pulled",
                 len(self._holds), self.held_blocks)
        while self._holds:
            try:
                async with asyncio.timeout(_DRAIN_LOG_S):
                    await self._empty.wait()
            except TimeoutError:
                log.info("mocker drain: %d KV hold(s) (%d blocks) still pending",
                         len(self._holds), self.held_blocks)
        log.info("mocker drain: every KV hold was pulled or expired")

    # -- holds --------------------------------------------------------------------------------
    @property
    def held_blocks(self) -> int:
        """Blocks of all holds (a block two holds share counts twice)."""
        return sum(h.pin.num_blocks for h in self._holds.values())

    @property
    def num_holds(self) -> int:
        return len(self._holds)

    def holds(self) -> list[str]:
        """Handles of the holds waiting or in transfer."""
        return list(self._holds)

    def hold_state(self, handle: str) -> str | None:
        """``waiting``, ``transferring``, or None when not held (tests, debugging)."""
        hold = self._holds.get(handle)
        return None if hold is None else hold.state.value

    def pin(self, handle: str) -> KvPin | None:
        hold = self._holds.get(handle)
        return None if hold is None else hold.pin

    def room_waiters(self, room: int) -> int:
        """Pulls waiting for ``room``'s prefill to finish."""
        wait = self._room_waits.get(room)
        return 0 if wait is None else wait.waiters

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait (event-driven) until ``predicate()`` holds, re-checked on every change of the
        holds, transfers or room waits; ``TimeoutError`` after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._changed.wait()

    def hold(self, seq: Sequence, kv: KvManager, dp_rank: int,
             request: PreprocessedRequest, out: LLMEngineOutput) -> LLMEngineOutput:
        """Turn ``seq``'s pinned blocks into a hold and stamp ``out`` (its terminal) with the
        handle. Without a pin, a token or a running server, ``out`` goes back unchanged."""
        pin, seq.kv_pin = seq.kv_pin, None
        if pin is None:
            return out
        if not out.token_ids or self._closed:  # nothing for a decode worker to continue
            kv.unpin(pin)
            return out
        loop = asyncio.get_running_loop()
        n_full = seq.prompt_len // kv.block_size
        seq.ensure_hashes(n_full)
        info = request.bootstrap_info
        room = None if info is None else info.bootstrap_room
        hold = _Hold(
            uuid.uuid4().hex, room, kv, pin, seq.seq_hashes[:n_full], seq.prompt_len,
            list(out.token_ids), seq.cached_tokens or 0, loop.time() + self.args.kv_hold_timeout_s,
        )
        self._holds[hold.handle] = hold
        self._empty.clear()
        hold.timer = loop.call_at(hold.deadline, self._expire, hold)
        if room is not None:
            if room in self._rooms:
                log.warning("mocker prefill: bootstrap room %d already held; the new hold is "
                            "reachable by its handle only", room)
            else:
                self._rooms[room] = hold
                self._wake_room(room)
        self._notify()
        params = MockerKvParams(
            mocker_handle=hold.handle, transfer_host=self.host, transfer_port=self.port,
            completed_tokens=hold.completed_tokens, num_blocks=pin.num_blocks,
            block_size=kv.block_size, prompt_len=seq.prompt_len, dp_rank=dp_rank,
            bootstrap_room=room,
        )
        return msgspec.structs.replace(out, disaggregated_params=msgspec.to_builtins(params))

    def discard(self, seq: Sequence, kv: KvManager, request: PreprocessedRequest) -> None:
        """A prefill ended without handing its KV over (cancelled, failed, dropped): free what
        it pinned and fail the pulls waiting on its bootstrap room."""
        pin, seq.kv_pin = seq.kv_pin, None
        if pin is not None:
            kv.unpin(pin)
        info = request.bootstrap_info
        if info is not None and info.bootstrap_room not in self._rooms:
            room = info.bootstrap_room
            self._remember(self._gone_rooms, room, "room_failed",
                           f"the prefill of bootstrap room {room} ended without KV "
                           "(cancelled or failed)")
            self._wake_room(room)
            self._notify()

    def _expire(self, hold: _Hold) -> None:
        if self._holds.get(hold.handle) is not hold or hold.state is not _HoldState.WAITING:
            return
        self.stats.expired += 1
        log.warning("mocker prefill: KV hold %s (%d blocks) expired unpulled after %.1fs",
                    hold.handle, hold.pin.num_blocks, self.args.kv_hold_timeout_s)
        self._release(hold, "expired",
                      f"its KV hold expired after {self.args.kv_hold_timeout_s:g}s unpulled")

    def _release(self, hold: _Hold, code: str, why: str) -> None:
        if self._holds.pop(hold.handle, None) is None:
            return
        if hold.timer is not None:
            hold.timer.cancel()
            hold.timer = None
        hold.kv.unpin(hold.pin)
        self._remember(self._gone, hold.handle, code, why)
        if hold.room is not None and self._rooms.get(hold.room) is hold:
            del self._rooms[hold.room]
            self._remember(self._gone_rooms, hold.room, code, why)
        if not self._holds:
            self._empty.set()
        self._notify()

    @staticmethod
    def _remember(table: OrderedDict[Any, tuple[str, str]], key: Any, code: str,
                  why: str) -> None:
        table[key] = (code, why)
        table.move_to_end(key)
        while len(table) > _TOMBSTONES:
            table.popitem(last=False)

    def _wake_room(self, room: int) -> None:
        wait = self._room_waits.get(room)
        if wait is not None:
            wait.event.set()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # -- serving pulls ------------------------------------------------------------------------
    async def _serve_connection(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or self._closed:  # pragma: no cover - asyncio always runs it in a task
            writer.close()
            return
        self._conns.add(task)
        try:
            while True:
                try:
                    body = await _read_frame(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return  # the decode side closed (or broke) the connection
                try:
                    request = _REQUEST_DECODER.decode(body)
                except msgspec.DecodeError as exc:
                    writer.write(_frame(_error("bad_request", f"malformed pull: {exc}")))
                    await writer.drain()
                    return
                reply = await self._pull(request, reader)
                if reply is None:
                    return
                writer.write(_frame(reply))
                await writer.drain()
        except (ConnectionError, OSError):
            return
        except asyncio.CancelledError:
            if not self._closed:
                raise
            # close() cancelled it: end normally, as asyncio's stream callback calls
            # task.exception() on a finished handler (a cancelled one would log an error).
            return
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _pull(self, request: PullRequest,
                    reader: asyncio.StreamReader) -> PullReply | None:
        if request.handle is not None:
            hold = self._holds.get(request.handle)
            if hold is None:
                code, why = self._gone.get(request.handle, ("unknown_handle", "no such hold"))
                self.stats.failed += 1
                return _error(code, f"KV handle {request.handle}: {why}")
        elif request.room is not None:
            found = await self._await_room(request.room)
            if isinstance(found, PullReply):
                self.stats.failed += 1
                return found
            hold = found
        else:
            self.stats.failed += 1
            return _error("bad_request", "a pull names a handle or a bootstrap room")
        if hold.state is not _HoldState.WAITING:
            self.stats.failed += 1
            return _error("already_pulled", f"KV handle {hold.handle}: a pull is in progress")
        return await self._transfer(hold, reader)

    async def _await_room(self, room: int) -> _Hold | PullReply:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.args.kv_hold_timeout_s
        while True:
            hold = self._rooms.get(room)
            if hold is not None:
                return hold
            gone = self._gone_rooms.get(room)
            if gone is not None:
                return _error(gone[0], f"bootstrap room {room}: {gone[1]}")
            remaining = deadline - loop.time()
            if self._closed or remaining <= 0:
                return _error("room_timeout", f"bootstrap room {room}: no prefill finished "
                              f"within {self.args.kv_hold_timeout_s:g}s")
            wait = self._room_waits.get(room)
            if wait is None:
                wait = self._room_waits[room] = _RoomWait()
            wait.waiters += 1
            self._notify()
            try:
                async with asyncio.timeout(remaining):
                    await wait.event.wait()
            except TimeoutError:
                pass
            finally:
                wait.waiters -= 1
                if wait.waiters == 0 and self._room_waits.get(room) is wait:
                    del self._room_waits[room]
                self._notify()

    async def _transfer(self, hold: _Hold, reader: asyncio.StreamReader) -> PullReply | None:
        loop = asyncio.get_running_loop()
        hold.state = _HoldState.TRANSFERRING
        if hold.timer is not None:  # a hold in transfer does not expire
            hold.timer.cancel()
            hold.timer = None
        self._notify()
        started = loop.time()
        try:
            delay = hold.pin.num_blocks * self.args.transfer_s_per_block
            if delay > 0 and await _peer_left_within(reader, delay):
                # The decode side gave up mid-transfer and got nothing: the hold waits again
                # (a retry may still pull it) until its deadline.
                self.stats.failed += 1
                log.warning("mocker prefill: the pull of KV hold %s was abandoned mid-transfer",
                            hold.handle)
                hold.state = _HoldState.WAITING
                hold.timer = loop.call_at(max(hold.deadline, loop.time()), self._expire, hold)
                self._notify()
                return None
            bad = hold.kv.verify(hold.pin)
            if bad:
                self.stats.freed_block_reads += 1
                self.stats.failed += 1
                log.error("mocker prefill: KV hold %s lost %d of its %d blocks before its "
                          "transfer (ids %s): refusing the pull", hold.handle, len(bad),
                          hold.pin.num_blocks, bad[:8])
                self._release(hold, "freed_blocks", "held blocks were freed before the pull")
                return _error("freed_blocks", f"KV handle {hold.handle}: {len(bad)} of its "
                              f"{hold.pin.num_blocks} blocks were freed or reused")
            elapsed = loop.time() - started
            reply = PullReply(
                ok=True, handle=hold.handle, block_size=hold.kv.block_size,
                num_blocks=hold.pin.num_blocks, prompt_len=hold.prompt_len,
                block_hashes=hold.block_hashes, completed_tokens=hold.completed_tokens,
                cached_tokens=hold.cached_tokens, transfer_ms=elapsed * 1000.0,
            )
            self.stats.completed += 1
            self.stats.transfer_seconds.observe(elapsed)
            self._release(hold, "already_pulled", "its KV was already pulled")
            return reply
        finally:
            if self._holds.get(hold.handle) is hold and hold.state is _HoldState.TRANSFERRING:
                # Cancelled (the server closes): nobody will pull it any more.
                self._release(hold, "freed", "the prefill worker shut down")


async def _peer_left_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Wait ``seconds``; True as soon as the peer closed the connection (or sent anything:
    a puller waits for its reply before it writes again)."""
    probe = asyncio.ensure_future(reader.read(1))
    try:
        done, _ = await asyncio.wait([probe], timeout=seconds)
    finally:
        await cancel_and_wait([probe])
    return bool(done)


# -- decode side --------------------------------------------------------------------------------
@dataclass(frozen=True)
class PulledKv:
    """A completed pull: the prompt's KV is now the decode worker's."""

    handle: str
    #: The prefill's token: the decode request's first output token.
    first_token: int
    #: The prefill's prefix-cache hit, reported as the request's cached tokens.
    cached_tokens: int
    num_blocks: int


class _PullFailure(Exception):
    def __init__(self, kind: BackendError, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class KvSource:
    """Where a decode request's KV is: a prefill worker's transfer server, and the pull."""

    host: str
    port: int
    request: PullRequest
    what: str  # for messages: "KV handle <hex>" / "bootstrap room <n>"


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @property
    def usable(self) -> bool:
        return not self.reader.at_eof() and not self.writer.is_closing()


class KvPuller:
    """The decode role: pulls a request's KV from its prefill worker (see the module docs)."""

    def __init__(self, args: MockerArgs, stats: KvTransferStats) -> None:
        self.args = args
        self.stats = stats
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._open: set[_Conn] = set()
        self._closed = False

    async def close(self) -> None:
        """Close every connection (a pull in progress fails at once). Idempotent."""
        self._closed = True
        conns, self._open = self._open, set()
        self._idle.clear()
        for conn in conns:
            conn.writer.close()
        for conn in conns:
            with contextlib.suppress(Exception):
                await conn.writer.wait_closed()

    def source(self, request: PreprocessedRequest, ctx: Context) -> KvSource | None:
        """Where ``request``'s KV is; None for a local prefill (no handle: counted
        ``local_prefill``, health checks aside; or ``disaggregated_params`` that are not a
        mocker handle, handled as a failed pull)."""
        result = request.prefill_result
        params = None if result is None else result.disaggregated_params
        if params:
            try:
                p = msgspec.convert(params, MockerKvParams)
            except msgspec.ValidationError as exc:
                failure = _PullFailure(
                    BackendError.InvalidArgument,
                    f"disaggregated_params are not a mocker KV handle: {exc}",
                )
                self._failed(failure, ctx, "the request")
                return None
            return KvSource(p.transfer_host, p.transfer_port,
                           PullRequest(handle=p.mocker_handle), f"KV handle {p.mocker_handle}")
        info = request.bootstrap_info
        if info is not None:
            return KvSource(info.bootstrap_host, info.bootstrap_port,
                           PullRequest(room=info.bootstrap_room),
                           f"bootstrap room {info.bootstrap_room}")
        if not request.health_check:
            self.stats.local_prefill += 1
        return None

    async def pull(self, src: KvSource, request: PreprocessedRequest, ctx: Context,
                   block_size: int) -> PulledKv | None:
        """Pull ``request``'s KV from ``src``: a :class:`PulledKv`, or None when it failed
        under ``recompute`` (or for a stopped request); under ``fail`` a failure raises
        ``DynamoError``. Runs to its end (bounded) even if ``ctx`` is stopped meanwhile."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.stats.in_flight += 1
        try:
            timeout = self.args.kv_pull_timeout_s
            if src.request.room is not None:  # may wait for the prefill itself
                timeout += self.args.kv_hold_timeout_s
            reply = await self._exchange(src, timeout)
            pulled = self._check(reply, request, block_size, src)
        except _PullFailure as failure:
            self._failed(failure, ctx, f"{src.what} from {src.host}:{src.port}")
            return None
        finally:
            self.stats.in_flight -= 1
        self.stats.completed += 1
        self.stats.transfer_seconds.observe(loop.time() - started)
        return pulled

    def _failed(self, failure: _PullFailure, ctx: Context, what: str) -> None:
        """Count a failed pull; raise under ``--kv-load-failure fail``."""
        message = f"KV pull of {what} failed: {failure.message}"
        if self._closed or ctx.is_stopped():  # nobody wants the result any more
            self.stats.failed += 1
            return
        if self.args.kv_load_failure == "fail":
            self.stats.failed += 1
            raise DynamoError(failure.kind, message)
        self.stats.recomputed += 1
        log.warning("mocker decode: %s; prefilling locally", message)

    async def _exchange(self, src: KvSource, timeout: float) -> PullReply:
        key = (src.host, src.port)
        try:
            async with asyncio.timeout(timeout):
                if self._closed:
                    raise ConnectionError("the mocker is shutting down")
                conn = self._checkout(key)
                if conn is None:
                    reader, writer = await asyncio.open_connection(src.host, src.port)
                    conn = _Conn(reader, writer)
                    self._open.add(conn)
                    if self._closed:  # close() ran while connecting
                        self._discard(conn)
                        raise ConnectionError("the mocker is shutting down")
                try:
                    conn.writer.write(_frame(src.request))
                    await conn.writer.drain()
                    body = await _read_frame(conn.reader)
                except BaseException:
                    self._discard(conn)
                    raise
                self._checkin(key, conn)
        except TimeoutError:
            raise _PullFailure(BackendError.ResponseTimeout,
                               f"no reply within {timeout:g}s") from None
        except ConnectionRefusedError as exc:
            raise _PullFailure(BackendError.Disconnected,
                               f"connection refused (the prefill worker is gone?): {exc}") from None
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise _PullFailure(BackendError.Disconnected,
                               f"connection lost: {type(exc).__name__}: {exc}") from None
        try:
            reply = _REPLY_DECODER.decode(body)
        except msgspec.DecodeError as exc:
            raise _PullFailure(BackendError.Unknown, f"malformed reply: {exc}") from None
        if not reply.ok:
            code = reply.error or "unknown"
            kind = _ERROR_KINDS.get(code, BackendError.Unknown)
            raise _PullFailure(kind, f"the prefill worker refused it ({code}): {reply.message}")
        return reply

    @staticmethod
    def _check(reply: PullReply, request: PreprocessedRequest, block_size: int,
               src: KvSource) -> PulledKv:
        """The reply must describe this request's prompt, in this cache's block layout."""
        prompt = request.token_ids
        problem = None
        if reply.block_size != block_size:
            problem = f"block size {reply.block_size}, this worker's is {block_size}"
        elif reply.prompt_len != len(prompt):
            problem = f"a prompt of {reply.prompt_len} tokens, this one has {len(prompt)}"
        elif reply.block_hashes != block_hashes(prompt, block_size):
            problem = "the KV of a different prompt"
        elif not reply.completed_tokens:
            problem = "no prefill token"
        if problem is not None:
            raise _PullFailure(BackendError.InvalidArgument, f"the prefill worker sent {problem}")
        return PulledKv(reply.handle or src.what, reply.completed_tokens[0],
                        reply.cached_tokens, reply.num_blocks)

    def _checkout(self, key: tuple[str, int]) -> _Conn | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.usable:
                return conn
            self._discard(conn)
        return None

    def _checkin(self, key: tuple[str, int], conn: _Conn) -> None:
        idle = self._idle.setdefault(key, [])
        if self._closed or len(idle) >= _IDLE_PER_PEER:
            self._discard(conn)
        else:
            idle.append(conn)

    def _discard(self, conn: _Conn) -> None:
        self._open.discard(conn)
        conn.writer.close()
