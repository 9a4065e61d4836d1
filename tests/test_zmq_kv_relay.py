"""vLLM ZMQ KV events -> ZmqKvEventRelay -> KvEventPublisher, over real sockets on 127.0.0.1.

The engine side is a real zmq PUB socket sending what vLLM's ``ZmqEventPublisher`` sends:
``[topic, seq (u64 BE), msgpack KVEventBatch]``, encoded with msgspec structs declared as in
``vllm/distributed/kv_events.py`` (both the array_like encoding of older versions and the map
encoding of newer ones).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import msgspec
import pytest
import zmq
import zmq.asyncio

from dynamo_backend_common.engine import ZmqKvEventSource
from dynamo_backend_common.errors import ProtocolError
from dynamo_backend_common.kv.hashing import block_hashes, local_block_hashes
from dynamo_backend_common.protocols.kv import (
    KvCleared,
    KvEventData,
    KvRemoved,
    KvStored,
    RouterEvent,
)
from dynamo_backend_common.runtime.publishers import KvEventPublisher
from dynamo_backend_common.worker.zmq_kv_relay import (
    VllmAllBlocksCleared,
    VllmBlockRemoved,
    VllmBlockStored,
    VllmEventBatch,
    ZmqKvEventRelay,
    decode_vllm_batch,
)

TIMEOUT = 5.0
BS = 4  # block size
TOPIC = "kv-events"


# -- vLLM's types (vllm/distributed/kv_events.py), in its two encodings --------------------------
class ArrayBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class ArrayEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class ArrayBlockStored(ArrayEvent, tag="BlockStored"):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class ArrayBlockRemoved(ArrayEvent, tag="BlockRemoved"):
    block_hashes: list[int | bytes]
    medium: str | None


class ArrayAllBlocksCleared(ArrayEvent, tag="AllBlocksCleared"):
    pass


class MapBatch(msgspec.Struct, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class MapEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class MapBlockStored(MapEvent, tag="BlockStored"):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None


class MapBlockRemoved(MapEvent, tag="BlockRemoved"):
    block_hashes: list[int | bytes]
    medium: str | None
    group_idx: int | None = None


class MapAllBlocksCleared(MapEvent, tag="AllBlocksCleared"):
    pass


_encode = msgspec.msgpack.Encoder().encode


def stored(
    hashes: list[int | bytes],
    tokens: list[int],
    parent: int | bytes | None = None,
    *,
    medium: str | None = "GPU",
    group_idx: int | None = None,
    block_size: int = BS,
) -> dict[str, Any]:
    return {"kind": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent,
            "token_ids": tokens, "block_size": block_size, "lora_id": None, "medium": medium,
            "group_idx": group_idx}  # fmt: skip


def removed(hashes: list[int | bytes], *, medium: str | None = "GPU") -> dict[str, Any]:
    return {"kind": "BlockRemoved", "block_hashes": hashes, "medium": medium}


def cleared() -> dict[str, Any]:
    return {"kind": "AllBlocksCleared"}


def encode_batch(events: list[dict[str, Any]], style: str, dp_rank: int | None = 0) -> bytes:
    """A KVEventBatch as vLLM encodes it: ``array`` (older vLLM: everything array_like),
    ``mixed`` (array batch, map events) or ``map`` (newest: no array_like)."""
    out: list[Any] = []
    for ev in events:
        kind = ev["kind"]
        if style == "array":
            if kind == "BlockStored":
                out.append(ArrayBlockStored(ev["block_hashes"], ev["parent_block_hash"],
                                            ev["token_ids"], ev["block_size"], None,
                                            ev["medium"]))  # fmt: skip
            elif kind == "BlockRemoved":
                out.append(ArrayBlockRemoved(ev["block_hashes"], ev["medium"]))
            else:
                out.append(ArrayAllBlocksCleared())
        elif kind == "BlockStored":
            out.append(MapBlockStored(ev["block_hashes"], ev["parent_block_hash"], ev["token_ids"],
                                      ev["block_size"], None, ev["medium"], None,
                                      group_idx=ev["group_idx"]))  # fmt: skip
        elif kind == "BlockRemoved":
            out.append(MapBlockRemoved(ev["block_hashes"], ev["medium"]))
        else:
            out.append(MapAllBlocksCleared())
    batch_cls = MapBatch if style == "map" else ArrayBatch
    return _encode(batch_cls(ts=1234.5, events=out, data_parallel_rank=dp_rank))


# -- decoding -----------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["array", "mixed", "map"])
def test_decode_every_vllm_encoding(style: str) -> None:
    payload = encode_batch(
        [stored([1, b"\x02"], list(range(8)), parent=9), removed([1], medium=None), cleared()],
        style,
        dp_rank=3,
    )
    batch, unknown = decode_vllm_batch(payload)
    assert unknown == 0
    assert batch == VllmEventBatch(
        ts=1234.5,
        events=[
            VllmBlockStored([1, b"\x02"], 9, list(range(8)), BS, None, "GPU", None),
            VllmBlockRemoved([1], None),
            VllmAllBlocksCleared(),
        ],
        data_parallel_rank=3,
    )


def test_decode_skips_unknown_event_kinds_and_rejects_garbage() -> None:
    batch, unknown = decode_vllm_batch(_encode([0.0, [["SomethingNew", 1], ["AllBlocksCleared"]]]))
    assert (batch.events, unknown) == ([VllmAllBlocksCleared()], 1)
    for bad in (
        b"\xc1",  # not msgpack
        _encode({"no": "events"}),
        _encode([0.0, "not a list"]),
        _encode([0.0, [["BlockStored", [1], None, "tokens", 4, None, None]]]),
        _encode([0.0, [["BlockStored", [1.5], None, [1, 2, 3, 4], 4, None, None]]]),
        _encode([0.0, [["BlockStored", [1], None, [1, 2, 3, 4], 0, None, None]]]),
        _encode([0.0, [42]]),
    ):
        with pytest.raises(ProtocolError):
            decode_vllm_batch(bad)


# -- the relay over real sockets ----------------------------------------------------------------
class Collector:
    """The publisher's sink: collects RouterEvents and wakes waiters (event driven)."""

    def __init__(self) -> None:
        self.events: deque[RouterEvent] = deque()
        self._arrived = asyncio.Event()

    def __call__(self, event: RouterEvent) -> None:
        self.events.append(event)
        self._arrived.set()

    async def next_event(self, timeout: float = TIMEOUT) -> RouterEvent:
        async with asyncio.timeout(timeout):
            while not self.events:
                self._arrived.clear()
                await self._arrived.wait()
        return self.events.popleft()

    async def next(self, timeout: float = TIMEOUT) -> KvEventData:
        return (await self.next_event(timeout)).event.data

    async def until(self, pred: Callable[[KvEventData], bool]) -> list[KvEventData]:
        """Every event up to and including the first one satisfying ``pred``."""
        out = [await self.next()]
        while not pred(out[-1]):
            out.append(await self.next())
        return out


class Engine:
    """A vLLM-like publisher: a PUB socket on 127.0.0.1 and its sequence counter."""

    def __init__(self, style: str) -> None:
        self.style = style
        self.pub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind("tcp://127.0.0.1:0")
        self.endpoint: str = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.seq = itertools.count()
        self.sent: dict[int, bytes] = {}  # the replay buffer

    def send(self, *events: dict[str, Any], seq: int | None = None) -> int:
        n = next(self.seq) if seq is None else seq
        payload = encode_batch(list(events), self.style)
        self.sent[n] = payload
        self.pub.send_multipart([TOPIC.encode(), n.to_bytes(8, "big"), payload])
        return n

    def skip(self, *events: dict[str, Any]) -> int:
        """A batch the engine publishes (and keeps for replay) that the relay never sees."""
        n = next(self.seq)
        self.sent[n] = encode_batch(list(events), self.style)
        return n


@pytest.fixture(params=["array", "mixed", "map"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    eng = Engine(request.param)
    yield eng
    eng.pub.close(linger=0)


@pytest.fixture
def sink() -> Collector:
    return Collector()


async def connect(engine: Engine, relay: ZmqKvEventRelay, sink: Collector) -> None:
    """Wait out ZMQ's slow joiner: send cleared batches until one is relayed, then a fence
    block and consume up to it (earlier probes may still be in flight), then reset. Bounded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while True:
        engine.send(cleared())
        try:
            await sink.next(0.05)
            break
        except TimeoutError:
            assert loop.time() < deadline, "the relay never received a batch"
    engine.send(stored([0xFE11CE], [7] * BS))
    await sink.until(lambda d: isinstance(d, KvStored) and d.parent_hash is None
                     and len(d.blocks) == 1 and d.blocks[0].tokens_hash
                     == local_block_hashes([7] * BS, BS)[0])  # fmt: skip
    engine.send(cleared())
    assert isinstance(await sink.next(), KvCleared)
    assert relay.tracked_blocks == 0 and relay.gaps == 0


@pytest.fixture
async def relay(engine: Engine, sink: Collector) -> AsyncIterator[ZmqKvEventRelay]:
    publisher = KvEventPublisher(7, 0, sink, asyncio.get_running_loop())
    r = ZmqKvEventRelay(ZmqKvEventSource(engine.endpoint, TOPIC, 0), publisher, block_size=BS)
    await r.start()
    try:
        await connect(engine, r, sink)
        yield r
    finally:
        await r.close()


async def test_stored_removed_cleared(
    engine: Engine, relay: ZmqKvEventRelay, sink: Collector
) -> None:
    tokens = list(range(100, 120))  # 5 blocks
    ours = block_hashes(tokens, BS)
    locals_ = local_block_hashes(tokens, BS)

    engine.send(stored([11, 12, 13], tokens[:12]))
    data = await sink.next()
    assert isinstance(data, KvStored) and data.parent_hash is None
    assert [b.block_hash for b in data.blocks] == ours[:3]
    assert [b.tokens_hash for b in data.blocks] == locals_[:3]

    # A continuation names the engine's parent hash: ours chains from our hash of it.
    engine.send(stored([14, 15], tokens[12:], parent=13))
    data = await sink.next()
    assert isinstance(data, KvStored) and data.parent_hash == ours[2]
    assert [b.block_hash for b in data.blocks] == ours[3:]
    assert relay.tracked_blocks == 5

    # Removal translates known hashes and drops unknown ones.
    engine.send(removed([15, 999]))
    assert await sink.next() == KvRemoved([ours[4]])
    assert relay.tracked_blocks == 4

    engine.send(cleared())
    assert await sink.next() == KvCleared()
    assert relay.tracked_blocks == 0
    # After a clear nothing is known: removing an old block publishes nothing (the cleared
    # event right after it in the same batch is the next thing the sink sees).
    engine.send(removed([11]), cleared())
    assert await sink.next() == KvCleared()
    assert relay.gaps == 0 and relay.decode_errors == 0


async def test_event_ids_increase_by_one(
    engine: Engine, relay: ZmqKvEventRelay, sink: Collector
) -> None:
    engine.send(stored([1], [1] * BS), stored([2], [2] * BS, parent=1), removed([2]))
    got = [await sink.next_event() for _ in range(3)]
    ids = [e.event.event_id for e in got]
    assert ids == list(range(ids[0], ids[0] + 3))
    assert all(e.worker_id == 7 and e.event.dp_rank == 0 for e in got)


async def test_unknown_parent_is_dropped_with_its_descendants(
    engine: Engine, relay: ZmqKvEventRelay, sink: Collector
) -> None:
    engine.send(stored([21], [5] * BS, parent=4242))  # parent never stored
    engine.send(stored([22], [6] * BS, parent=21))  # so its child is unknown too
    engine.send(cleared())  # marker: everything before it has been processed
    assert await sink.next() == KvCleared()
    assert relay.unknown_parents == 2


async def test_bytes_hashes_and_skipped_events(
    engine: Engine, relay: ZmqKvEventRelay, sink: Collector
) -> None:
    tokens = [3] * BS + [4] * BS
    engine.send(
        stored([b"a" * 32], tokens[:BS]),
        stored([b"b" * 32], tokens[BS:], parent=b"a" * 32),
        stored([31], [9] * BS, medium="CPU"),  # an offload tier: not ours
        stored([32], [9] * (BS + 1)),  # block size mismatch
        removed([b"a" * 32], medium="CPU"),
    )
    engine.send(cleared())
    got = await sink.until(lambda d: isinstance(d, KvCleared))
    assert [[b.block_hash for b in d.blocks] for d in got if isinstance(d, KvStored)] == [
        block_hashes(tokens, BS)[:1],
        block_hashes(tokens, BS)[1:],
    ]
    assert not any(isinstance(d, KvRemoved) for d in got)
    assert relay.skipped_events == 3


async def test_sequence_gap_is_detected(
    engine: Engine, relay: ZmqKvEventRelay, sink: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    first_missing = engine.skip(cleared())
    engine.skip(cleared())
    got = engine.send(stored([41], [8] * BS))
    data = await sink.next()
    assert isinstance(data, KvStored)  # the batch after the gap is still applied
    assert (relay.gaps, relay.missed, relay.recovered) == (1, 2, 0)
    assert f"expected {first_missing}, got {got}" in caplog.text


async def test_sequence_restart_clears(
    engine: Engine, relay: ZmqKvEventRelay, sink: Collector
) -> None:
    engine.send(stored([51], [1] * BS))
    assert isinstance(await sink.next(), KvStored)
    engine.send(stored([52], [2] * BS), seq=0)  # the engine's publisher started over
    assert await sink.next() == KvCleared()
    data = await sink.next()
    assert isinstance(data, KvStored) and data.parent_hash is None
    assert relay.gaps == 0 and relay.tracked_blocks == 1


async def test_undecodable_batch_is_counted_and_skipped(
    engine: Engine, relay: ZmqKvEventRelay, sink: Collector
) -> None:
    engine.pub.send_multipart([TOPIC.encode(), next(engine.seq).to_bytes(8, "big"), b"\xc1junk"])
    engine.pub.send_multipart([TOPIC.encode(), b"only two frames"])
    engine.send(cleared())
    assert await sink.next() == KvCleared()
    assert relay.decode_errors == 2 and relay.gaps == 0


async def test_topic_filter(engine: Engine, sink: Collector) -> None:
    """A relay for topic "kv-events" ignores another topic on the same socket."""
    publisher = KvEventPublisher(7, 0, sink, asyncio.get_running_loop())
    relay = ZmqKvEventRelay(ZmqKvEventSource(engine.endpoint, TOPIC, 0), publisher, block_size=BS)
    await relay.start()
    try:
        await connect(engine, relay, sink)
        engine.pub.send_multipart([b"other", (10**6).to_bytes(8, "big"), encode_batch([cleared()],
                                   engine.style)])  # fmt: skip
        engine.send(stored([61], [1] * BS))
        assert isinstance(await sink.next(), KvStored)
        assert relay.gaps == 0
    finally:
        await relay.close()


# -- replay -------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def replay_server(engine: Engine) -> AsyncIterator[str]:
    """vLLM's replay ROUTER: a request ``[id, b"", start_seq]`` gets every buffered batch from
    ``start_seq`` on as ``[id, b"", seq, payload]``, then ``[id, b"", -1, b""]``."""
    router = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("tcp://127.0.0.1:0")
    endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)

    async def serve() -> None:
        while True:
            client, _, start = await router.recv_multipart()
            first = int.from_bytes(start, "big")
            for seq in sorted(engine.sent):
                if seq >= first:
                    await router.send_multipart([client, b"", seq.to_bytes(8, "big"),
                                                 engine.sent[seq]])  # fmt: skip
            await router.send_multipart([client, b"", (-1).to_bytes(8, "big", signed=True), b""])

    task = asyncio.create_task(serve())
    try:
        yield endpoint
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        router.close(linger=0)


async def test_gap_is_filled_from_the_replay_socket(engine: Engine, sink: Collector) -> None:
    async with replay_server(engine) as replay_endpoint:
        publisher = KvEventPublisher(7, 0, sink, asyncio.get_running_loop())
        relay = ZmqKvEventRelay(
            ZmqKvEventSource(engine.endpoint, TOPIC, 0), publisher, block_size=BS,
            replay_endpoint=replay_endpoint,
        )  # fmt: skip
        await relay.start()
        try:
            await connect(engine, relay, sink)
            tokens = list(range(3 * BS))
            # The relay misses the first two stores; without them the third has no parent.
            engine.skip(stored([71], tokens[:BS]))
            engine.skip(stored([72], tokens[BS : 2 * BS], parent=71))
            engine.send(stored([73], tokens[2 * BS :], parent=72))
            got = [await sink.next() for _ in range(3)]
            ours = block_hashes(tokens, BS)
            assert [[b.block_hash for b in d.blocks] for d in got if isinstance(d, KvStored)] == [
                [ours[0]],
                [ours[1]],
                [ours[2]],
            ]
            assert (relay.gaps, relay.recovered, relay.missed) == (1, 2, 0)
            assert relay.unknown_parents == 0
        finally:
            await relay.close()
