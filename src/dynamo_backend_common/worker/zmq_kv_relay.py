"""Relay an engine's vLLM-format ZMQ KV events into a :class:`KvEventPublisher`.

Engines such as vLLM (and SGLang, which copies the format) publish KV cache changes on a ZMQ
PUB socket as three-frame messages ``[topic, seq (u64 big-endian), payload]`` where ``payload``
is a msgpack ``KVEventBatch``. :class:`ZmqKvEventRelay` subscribes to one such socket (one
``ZmqKvEventSource``, i.e. one data-parallel rank), decodes the batches and republishes each
event through the rank's publisher, translating the engine's opaque block hashes into the
chained hashes routers compute from prompts (``kv.hashing``).

Wire format (``vllm/distributed/kv_events.py``), accepted in both of its encodings, because
vLLM versions differ: msgspec ``array_like`` structs (arrays, events tagged by their first
element) and plain structs (maps, events tagged by a ``"type"`` key)::

    KVEventBatch      [ts: float, events: list, data_parallel_rank: int | None]
    BlockStored       ["BlockStored", block_hashes, parent_block_hash, token_ids, block_size,
                       lora_id, medium, lora_name?, extra_keys?, group_idx?, ...]
    BlockRemoved      ["BlockRemoved", block_hashes, medium, group_idx?, ...]
    AllBlocksCleared  ["AllBlocksCleared"]

Engine block hashes are ints or (newer vLLM, optionally) bytes; both are accepted as opaque ids.

Translation rules:

- ``BlockStored``: our hashes are ``kv.hashing`` chained hashes of ``token_ids`` (the tokens of
  exactly these blocks) after the parent's *our* hash. The relay remembers engine hash -> our
  hash for every stored block, to find parents and to translate removals. If the parent is
  unknown (its store was missed: a sequence gap, or the relay joined late), the event is
  dropped and counted in ``unknown_parents``: the chained hash depends on every earlier token,
  and hashing the blocks as a root would claim a cached prefix the engine does not have (a
  false cache hit for prompts starting with these tokens). Its descendants are dropped too,
  since their parents stay unknown. An event whose token count is not ``len(block_hashes) *
  block_size`` (the engine uses another block size) is dropped as well.
- ``BlockRemoved``: the known hashes are published as removed and forgotten; unknown ones are
  dropped (their store was never published).
- ``AllBlocksCleared``: published as cleared; the map is reset.
- Only the device tier of the first KV cache group is relayed: events with a ``medium`` other
  than ``None``/``"GPU"`` (CPU offload tiers) or a ``group_idx`` other than ``None``/``0``
  (hybrid models' extra groups) are skipped and counted in ``skipped_events``; the router's
  index describes one tier and one block layout.
- Sequence numbers: a jump forward is a gap (``gaps`` += 1, warning with expected/got). With a
  ``replay_endpoint`` (the engine's ROUTER replay socket) the relay first asks it for the
  missing batches and applies those it gets; ``missed`` counts batches still lost. A jump
  backwards means the engine's publisher restarted: its cache is new, so the relay publishes
  cleared and resets the map.

Limitations: LoRA ids, ``extra_keys`` (multimodal hashes, cache salt) are not part of our hash,
so blocks that differ only in those map to the same hash.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from ..engine import ZmqKvEventSource
from ..errors import DynamoError, ProtocolError
from ..kv.hashing import XXH3_SEED, local_block_hashes, sequence_hash
from ..runtime.publishers import KvEventPublisher
from ..runtime.tasks import cancel_and_wait

__all__ = [
    "VllmAllBlocksCleared",
    "VllmBlockRemoved",
    "VllmBlockStored",
    "VllmEventBatch",
    "ZmqKvEventRelay",
    "decode_vllm_batch",
]

log = logging.getLogger(__name__)

EngineHash = int | bytes

#: vLLM's end-of-replay marker: sequence number -1 as a signed 8-byte big-endian integer.
_END_SEQ = (-1).to_bytes(8, "big", signed=True)
_GPU_MEDIA = (None, "GPU")


# -- the vLLM wire format ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class VllmBlockStored:
    block_hashes: list[EngineHash]
    parent_block_hash: EngineHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class VllmBlockRemoved:
    block_hashes: list[EngineHash]
    medium: str | None = None
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class VllmAllBlocksCleared:
    pass


VllmEvent = VllmBlockStored | VllmBlockRemoved | VllmAllBlocksCleared


@dataclass(frozen=True, slots=True)
class VllmEventBatch:
    ts: float
    events: list[VllmEvent] = field(default_factory=list)
    data_parallel_rank: int | None = None


_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
                  "medium", "lora_name", "extra_keys", "group_idx")  # fmt: skip
_REMOVED_FIELDS = ("block_hashes", "medium", "group_idx")


def _fields(raw: Any, names: Sequence[str]) -> dict[str, Any]:
    """An event's fields by name, from its array form (tag first) or its map form."""
    if isinstance(raw, list):
        return dict(zip(names, raw[1:], strict=False))
    return {k: v for k, v in raw.items() if k in names}


def _hash(value: Any) -> EngineHash:
    if isinstance(value, int | bytes) and not isinstance(value, bool):
        return value
    raise ProtocolError(f"block hash must be an int or bytes, got {type(value).__name__}")


def _opt_int(value: Any, name: str) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ProtocolError(f"{name} must be an int or null, got {type(value).__name__}")


def _opt_str(value: Any, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise ProtocolError(f"{name} must be a string or null, got {type(value).__name__}")


def _hash_list(value: Any) -> list[EngineHash]:
    if not isinstance(value, list):
        raise ProtocolError("block_hashes must be a list")
    return [_hash(h) for h in value]


def _decode_event(raw: Any) -> VllmEvent | None:
    if isinstance(raw, list) and raw:
        tag = raw[0]
    elif isinstance(raw, dict):
        tag = raw.get("type")
    else:
        raise ProtocolError(f"a KV event must be an array or a map, got {type(raw).__name__}")
    if tag == "BlockStored":
        f = _fields(raw, _STORED_FIELDS)
        token_ids = f.get("token_ids")
        if not isinstance(token_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in token_ids
        ):
            raise ProtocolError("BlockStored.token_ids must be a list of ints")
        block_size = f.get("block_size")
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
            raise ProtocolError(f"BlockStored.block_size must be a positive int: {block_size!r}")
        parent = f.get("parent_block_hash")
        return VllmBlockStored(
            block_hashes=_hash_list(f.get("block_hashes")),
            parent_block_hash=None if parent is None else _hash(parent),
            token_ids=token_ids,
            block_size=block_size,
            lora_id=_opt_int(f.get("lora_id"), "lora_id"),
            medium=_opt_str(f.get("medium"), "medium"),
            group_idx=_opt_int(f.get("group_idx"), "group_idx"),
        )
    if tag == "BlockRemoved":
        f = _fields(raw, _REMOVED_FIELDS)
        return VllmBlockRemoved(
            block_hashes=_hash_list(f.get("block_hashes")),
            medium=_opt_str(f.get("medium"), "medium"),
            group_idx=_opt_int(f.get("group_idx"), "group_idx"),
        )
    if tag == "AllBlocksCleared":
        return VllmAllBlocksCleared()
    return None  # an event kind newer than this relay: skipped, not an error


def decode_vllm_batch(payload: bytes | memoryview) -> tuple[VllmEventBatch, int]:
    """Decode one vLLM ``KVEventBatch`` (array or map encoding).

    Returns the batch and the number of events of unknown kinds that were left out. Raises
    :class:`ProtocolError` for bytes that are not a well-formed batch.
    """
    try:
        raw = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"KV event batch is not msgpack: {exc}") from None
    if isinstance(raw, list) and len(raw) >= 2:
        ts, raw_events, dp_rank = raw[0], raw[1], raw[2] if len(raw) > 2 else None
    elif isinstance(raw, dict) and "events" in raw:
        ts, raw_events, dp_rank = raw.get("ts", 0.0), raw["events"], raw.get("data_parallel_rank")
    else:
        raise ProtocolError("KV event batch must be [ts, events, dp_rank?] or a map with events")
    if not isinstance(raw_events, list):
        raise ProtocolError("KV event batch: events must be a list")
    if not isinstance(ts, int | float):
        raise ProtocolError("KV event batch: ts must be a number")
    events: list[VllmEvent] = []
    unknown = 0
    for raw_event in raw_events:
        event = _decode_event(raw_event)
        if event is None:
            unknown += 1
        else:
            events.append(event)
    return VllmEventBatch(float(ts), events, _opt_int(dp_rank, "data_parallel_rank")), unknown


def _connectable(endpoint: str) -> str:
    """vLLM configures its PUB with a bind address (``tcp://*:5557``); connect to loopback."""
    for wildcard in ("tcp://*:", "tcp://0.0.0.0:"):
        if endpoint.startswith(wildcard):
            return "tcp://127.0.0.1:" + endpoint[len(wildcard) :]
    return endpoint


# -- the relay --------------------------------------------------------------------------------
class ZmqKvEventRelay:
    """Subscribe to ``source``'s ZMQ PUB socket and republish through ``publisher``.

    ``block_size`` and ``hash_seed`` must be the ones the router hashes prompts with. The
    counters (``batches``, ``gaps``, ``missed``, ``recovered``, ``decode_errors``,
    ``unknown_parents``, ``skipped_events``) are for tests and metrics. Create, ``start()``
    and ``close()`` it on the publisher's event loop.
    """

    def __init__(
        self,
        source: ZmqKvEventSource,
        publisher: KvEventPublisher,
        *,
        block_size: int,
        hash_seed: int = XXH3_SEED,
        replay_endpoint: str | None = None,
        replay_timeout: float = 1.0,
        hwm: int = 100_000,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.source = source
        self.publisher = publisher
        self.block_size = block_size
        self.hash_seed = hash_seed
        self.endpoint = _connectable(source.endpoint)
        self.replay_endpoint = None if replay_endpoint is None else _connectable(replay_endpoint)
        self._replay_timeout = replay_timeout
        self._hwm = hwm
        self._sock: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_seq: int | None = None
        # engine block hash -> our chained hash, for every block the engine holds (as far as
        # we know); bounded by the engine's cache size as long as removals arrive.
        self._hashes: dict[EngineHash, int] = {}
        #: Batches processed (live and replayed).
        self.batches = 0
        #: Forward jumps in the sequence numbers.
        self.gaps = 0
        #: Batches lost in gaps (after any replay).
        self.missed = 0
        #: Batches recovered through the replay socket.
        self.recovered = 0
        #: Messages that could not be decoded (dropped).
        self.decode_errors = 0
        #: Stored events dropped because their parent block was unknown.
        self.unknown_parents = 0
        #: Events not relayed: other tier or group, block size mismatch, unknown kind.
        self.skipped_events = 0

    @property
    def tracked_blocks(self) -> int:
        """Engine blocks currently known (stored and not yet removed)."""
        return len(self._hashes)

    async def start(self) -> None:
        """Connect the SUB socket and start relaying. Raises ``DynamoError(InvalidArgument)``
        for a malformed endpoint (an unreachable one is retried by ZMQ in the background)."""
        if self._task is not None:
            return
        sock = zmq.asyncio.Context.instance().socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, self._hwm)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise DynamoError.invalid_argument(
                f"bad KV event endpoint {self.source.endpoint!r}", exc
            ) from exc
        sock.setsockopt(zmq.SUBSCRIBE, self.source.topic.encode())
        self._sock = sock
        self._task = asyncio.create_task(self._run(sock), name=f"kv-relay-{self.endpoint}")
        log.info("relaying KV events from %s (topic %r, dp_rank %d)",
                 self.endpoint, self.source.topic, self.source.dp_rank)  # fmt: skip

    async def close(self) -> None:
        """Stop relaying and close the socket. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait([task])
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    async def _run(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()
            if len(frames) != 3 or len(frames[1]) != 8:
                self.decode_errors += 1
                log.warning("KV relay %s: ignoring a message of %d frame(s); expected "
                            "[topic, seq, payload]", self.endpoint, len(frames))  # fmt: skip
                continue
            seq = int.from_bytes(frames[1], "big")
            await self._check_sequence(seq)
            self._last_seq = seq
            self._apply(frames[2])

    async def _check_sequence(self, seq: int) -> None:
        last = self._last_seq
        if last is None:
            if seq != 0:
                log.info("KV relay %s: joined at sequence %d", self.endpoint, seq)
            return
        expected = last + 1
        if seq == expected:
            return
        if seq < expected:
            log.warning("KV relay %s: sequence went back from %d to %d: the engine's publisher "
                        "restarted; clearing its blocks", self.endpoint, last, seq)  # fmt: skip
            self._hashes.clear()
            self.publisher.publish_cleared()
            return
        self.gaps += 1
        log.warning("KV relay %s: sequence gap: expected %d, got %d (%d batch(es) missing)",
                    self.endpoint, expected, seq, seq - expected)  # fmt: skip
        got = await self._replay(expected, seq) if self.replay_endpoint is not None else 0
        self.recovered += got
        self.missed += seq - expected - got

    async def _replay(self, start: int, stop: int) -> int:
        """Ask the engine's replay socket for batches ``start..stop-1`` and apply them in
        order. Returns how many were applied; stops at the first one it cannot get."""
        assert self.replay_endpoint is not None
        dealer = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        applied = 0
        try:
            dealer.connect(self.replay_endpoint)
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            nxt = start
            while nxt < stop:
                if not await dealer.poll(int(self._replay_timeout * 1000)):
                    log.warning("KV relay %s: replay timed out at %d", self.endpoint, nxt)
                    break
                frames = await dealer.recv_multipart()
                if len(frames) != 3 or frames[1] == _END_SEQ:
                    break
                rseq = int.from_bytes(frames[1], "big")
                if rseq < nxt:
                    continue
                if rseq > nxt:  # the engine's buffer no longer holds ``nxt``
                    break
                self._last_seq = rseq
                self._apply(frames[2])
                applied += 1
                nxt += 1
        except zmq.ZMQError as exc:
            log.warning("KV relay %s: replay from %s failed: %s",
                        self.endpoint, self.replay_endpoint, exc)  # fmt: skip
        finally:
            dealer.close(linger=0)
        return applied

    def _apply(self, payload: bytes) -> None:
        try:
            batch, unknown = decode_vllm_batch(payload)
        except ProtocolError as exc:
            self.decode_errors += 1
            log.warning("KV relay %s: dropping an undecodable batch: %s", self.endpoint, exc)
            return
        self.batches += 1
        self.skipped_events += unknown
        for event in batch.events:
            if isinstance(event, VllmBlockStored):
                self._stored(event)
            elif isinstance(event, VllmBlockRemoved):
                self._removed(event)
            else:
                self._hashes.clear()
                self.publisher.publish_cleared()

    def _stored(self, ev: VllmBlockStored) -> None:
        if ev.medium not in _GPU_MEDIA or ev.group_idx not in (None, 0):
            self.skipped_events += 1
            return
        parent: int | None = None
        if ev.parent_block_hash is not None:
            parent = self._hashes.get(ev.parent_block_hash)
            if parent is None:
                self.unknown_parents += 1
                log.debug("KV relay %s: parent %r of a stored run is unknown; dropped",
                          self.endpoint, ev.parent_block_hash)  # fmt: skip
                return
        n = len(ev.block_hashes)
        if n == 0:
            return
        if len(ev.token_ids) != n * self.block_size:
            self.skipped_events += 1
            log.warning("KV relay %s: stored event with %d tokens for %d blocks does not match "
                        "block_size %d (engine says %d); dropped", self.endpoint,
                        len(ev.token_ids), n, self.block_size, ev.block_size)  # fmt: skip
            return
        locals_ = local_block_hashes(ev.token_ids, self.block_size, self.hash_seed)
        ours: list[int] = []
        prev = parent
        for engine_hash, local in zip(ev.block_hashes, locals_, strict=True):
            prev = sequence_hash(prev, local, self.hash_seed)
            ours.append(prev)
            self._hashes[engine_hash] = prev
        self.publisher.publish_stored(ours, parent_hash=parent, tokens_hashes=locals_)

    def _removed(self, ev: VllmBlockRemoved) -> None:
        if ev.medium not in _GPU_MEDIA or ev.group_idx not in (None, 0):
            self.skipped_events += 1
            return
        pop = self._hashes.pop
        ours = [h for h in (pop(eh, None) for eh in ev.block_hashes) if h is not None]
        if ours:
            self.publisher.publish_removed(ours)

    def __repr__(self) -> str:
        return f"ZmqKvEventRelay({self.endpoint!r}, topic={self.source.topic!r})"
