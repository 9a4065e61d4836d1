"""Golden tests: our event plane and KV payloads against what a real NVIDIA Dynamo 1.6.1 put on
the wire (``tests/golden/dynamo-1.6.1``: ZMQ captures of a mocker behind a KV-routing frontend,
and the discovery records it wrote)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from dynamo_backend_common.errors import ProtocolError
from dynamo_backend_common.kv.hashing import block_hashes, local_block_hashes
from dynamo_backend_common.protocols.kv import (
    KvCacheEvent,
    KvCleared,
    KvRemoved,
    KvStored,
    LoadSnapshot,
    RouterEvent,
    StoredBlock,
    decode_kv_events,
    decode_load,
    encode_kv_events,
    encode_load,
)
from dynamo_backend_common.runtime.events.dynamo_wire import (
    EndpointRef,
    EventChannel,
    EventScope,
    EventSource,
    EventSourceMetadata,
    EventTransport,
    WorkerRef,
    channel_key,
    decode_channel,
    decode_frames,
    encode_frames,
    encode_record,
    source_key,
)

GOLDEN = Path(__file__).parent / "golden" / "dynamo-1.6.1"
ZMQ = GOLDEN / "zmq"
RECORDS = GOLDEN / "discovery" / "mocker_running" / "v1"
CAPTURES = ("capture_run1", "capture_evict")

#: What Dynamo 1.6.1's own ``KvEventPublisher`` sent for a relayed vLLM ``AllBlocksCleared``
#: (captured for this test from ``dynamo._core.KvEventPublisher(zmq_endpoint=...)``, worker 123,
#: event 2): the unit variant is the bare string "cleared".
DYNAMO_CLEARED_PAYLOAD = bytes.fromhex(
    "9184a9776f726b65725f69647bac73746f726167655f74696572a6646576696365b07265736964656e63795f"
    "646f6d61696ea6776f726b6572a56576656e7483a86576656e745f696402a464617461a7636c656172656"
    "4a764705f72616e6b00")
#: The same publisher's stored event for tokens [1, 2, 3, 4] (block size 4, engine hash 111):
#: Dynamo computed tokens_hash 14643705804678351452.
DYNAMO_RELAYED_STORED = bytes.fromhex(
    "9184a9776f726b65725f69647bac73746f726167655f74696572a6646576696365b07265736964656e63795f"
    "646f6d61696ea6776f726b6572a56576656e7483a86576656e745f696401a46461746181a673746f72656483"
    "ab706172656e745f68617368c0ae73746172745f706f736974696f6ec0a6626c6f636b739183aa626c6f636b"
    "5f686173686fab746f6b656e735f68617368cfcb38e4d7fb2dca5cad6d6d5f65787472615f696e666fc0a764"
    "705f72616e6b00")


def captured(name: str) -> list[list[bytes]]:
    out = []
    for line in (ZMQ / f"{name}_raw.jsonl").read_text().splitlines():
        out.append([bytes.fromhex(h) for h in json.loads(line)["frames_hex"]])
    return out


def decoded(name: str) -> list[dict[str, Any]]:
    lines = (ZMQ / f"{name}_decoded.jsonl.txt").read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def all_frames() -> list[list[bytes]]:
    return [f for name in CAPTURES for f in captured(name)]


def test_every_captured_message_decodes_and_reencodes_byte_for_byte() -> None:
    counts: dict[str, int] = {}
    for frames in all_frames():
        topic, pid, seq, env = decode_frames(frames)
        counts[topic] = counts.get(topic, 0) + 1
        assert (env.topic, env.publisher_id, env.sequence) == (topic, pid, seq)
        assert pid < 2**53 and env.published_at > 1_700_000_000_000  # ms since the epoch
        # Our frames for the same message are the captured bytes, every one of the four.
        assert encode_frames(topic, pid, seq, env.payload, env.published_at) == frames
        if topic == "kv-events":
            events, unknown = decode_kv_events(env.payload)
            assert events and unknown == 0
            assert encode_kv_events(events) == env.payload
        elif topic == "kv_metrics":
            assert encode_load(decode_load(env.payload)) == env.payload
    assert counts == {"forward-pass-metrics": 136, "kv_metrics": 18, "kv-events": 11,
                      "active_sequences_events": 3}


def test_decoded_captures_match_our_types() -> None:
    """Our decoding of every kv-events / kv_metrics payload equals the reference decoding."""
    seen = 0
    for name, frames_list in ((n, captured(n)) for n in CAPTURES):
        ref = {(d["publisher_id"], d["sequence"]): d for d in decoded(name)}
        for frames in frames_list:
            topic, pid, seq, env = decode_frames(frames)
            want = ref[(pid, seq)]["envelope"]["payload"]
            if topic == "kv-events":
                events, _ = decode_kv_events(env.payload)
                assert msgspec.msgpack.decode(encode_kv_events(events)) == want
                seen += 1
            elif topic == "kv_metrics":
                assert msgspec.to_builtins(decode_load(env.payload)) == {
                    **want, "kv_total_blocks": None}
                seen += 1
    assert seen == 29


def test_specific_captured_values() -> None:
    frames = next(f for f in captured("capture_run1") if f[0] == b"kv-events")
    _, pid, seq, env = decode_frames(frames)
    assert (pid, seq) == (3164326931407155, 8)
    (event,), _ = decode_kv_events(env.payload)
    assert event.worker_id == 15556482102005470797  # >= 2**63
    assert (event.storage_tier, event.residency_domain) == ("device", "worker")
    assert (event.event.event_id, event.event.dp_rank) == (9, 0)
    data = event.event.data
    assert isinstance(data, KvStored)
    assert (data.parent_hash, data.start_position) == (None, None)
    assert data.blocks == [
        StoredBlock(8903940377379117605, 8903940377379117605),
        StoredBlock(10434282767381264959, 9563788864468063311),
    ]
    # A removal and a store in one message (the evict capture, sequence 4).
    frames = [f for f in captured("capture_evict") if f[0] == b"kv-events"][4]
    _, _, seq, env = decode_frames(frames)
    events, _ = decode_kv_events(env.payload)
    assert seq == 4 and [e.event.event_id for e in events] == [5, 6]
    assert events[0].event.data == KvRemoved([6405937161754839590])
    assert isinstance(events[1].event.data, KvStored)
    assert events[1].event.data.blocks[0].block_hash == 7496775311913828292
    # A load message of the mocker: no total, nulls where the scheduler would report.
    frames = next(f for f in captured("capture_evict") if f[0] == b"kv_metrics")
    load = decode_load(decode_frames(frames)[3].payload)
    assert load == LoadSnapshot(worker_id=10458987965542209491, dp_rank=0, kv_used_blocks=0)
    assert load.active_decode_blocks is None and load.kv_total_blocks is None


def test_sample_frame_files_decode() -> None:
    samples = sorted({p.name.split(".frame")[0] for p in (ZMQ / "samples").glob("*.frame0.bin")})
    assert len(samples) == 10
    for sample in samples:
        frames = [(ZMQ / "samples" / f"{sample}.frame{i}.bin").read_bytes() for i in range(4)]
        topic, _, _, env = decode_frames(frames)
        assert sample.startswith(topic)
        if topic == "kv-events":
            events, unknown = decode_kv_events(env.payload)
            kinds = "+".join(type(e.event.data).__name__[2:].lower() for e in events)
            assert sample == f"kv-events_{kinds}_{sample.rsplit('_', 1)[1]}" and unknown == 0
        elif topic == "kv_metrics":
            decode_load(env.payload)


def test_cleared_as_dynamo_sends_it() -> None:
    (event,), unknown = decode_kv_events(DYNAMO_CLEARED_PAYLOAD)
    assert unknown == 0
    assert event == RouterEvent(123, KvCacheEvent(2, KvCleared(), 0))
    assert encode_kv_events([event]) == DYNAMO_CLEARED_PAYLOAD
    # Also accepted: the map form of a unit variant.
    alt = msgspec.msgpack.encode([{"worker_id": 1, "event": {"event_id": 0,
                                                             "data": {"cleared": None}}}])
    (event,), _ = decode_kv_events(alt)
    assert isinstance(event.event.data, KvCleared) and event.storage_tier == "device"


def test_tokens_hash_matches_dynamo() -> None:
    (event,), _ = decode_kv_events(DYNAMO_RELAYED_STORED)
    assert isinstance(event.event.data, KvStored)
    assert event.event.data.blocks[0].tokens_hash == local_block_hashes([1, 2, 3, 4], 4)[0]
    assert encode_kv_events([event]) == DYNAMO_RELAYED_STORED


def test_our_events_are_dynamos_shape_to_a_plain_decoder() -> None:
    tokens = list(range(32))
    seq, local = block_hashes(tokens, 16), local_block_hashes(tokens, 16)
    events = [
        RouterEvent(2**64 - 1, KvCacheEvent(7, KvStored(
            parent_hash=None, blocks=[StoredBlock(s, t) for s, t in zip(seq, local, strict=True)]),
            1)),
        RouterEvent(5, KvCacheEvent(8, KvRemoved([2**64 - 1, 0]))),
        RouterEvent(5, KvCacheEvent(9, KvCleared())),
        RouterEvent(5, KvCacheEvent(10, KvStored(parent_hash=seq[0], start_position=1,
                                                 blocks=[StoredBlock(seq[1])]))),
    ]
    plain = msgspec.msgpack.decode(encode_kv_events(events))
    assert isinstance(plain, list) and len(plain) == 4
    head = {"storage_tier": "device", "residency_domain": "worker"}
    blocks = [{"block_hash": s, "tokens_hash": t, "mm_extra_info": None}
              for s, t in zip(seq, local, strict=True)]
    assert plain == [
        {"worker_id": 2**64 - 1, **head, "event": {
            "event_id": 7, "data": {"stored": {"parent_hash": None, "start_position": None,
                                               "blocks": blocks}}, "dp_rank": 1}},
        {"worker_id": 5, **head, "event": {
            "event_id": 8, "data": {"removed": {"block_hashes": [2**64 - 1, 0]}}, "dp_rank": 0}},
        {"worker_id": 5, **head, "event": {"event_id": 9, "data": "cleared", "dp_rank": 0}},
        # A block without a tokens_hash carries its block hash there (Dynamo requires one).
        {"worker_id": 5, **head, "event": {
            "event_id": 10, "data": {"stored": {
                "parent_hash": seq[0], "start_position": 1,
                "blocks": [{"block_hash": seq[1], "tokens_hash": seq[1],
                            "mm_extra_info": None}]}}, "dp_rank": 0}},
    ]
    # Key order as Dynamo writes it (serde field order).
    assert list(plain[0]) == ["worker_id", "storage_tier", "residency_domain", "event"]
    assert list(plain[0]["event"]) == ["event_id", "data", "dp_rank"]
    assert list(plain[0]["event"]["data"]["stored"]) == ["parent_hash", "start_position", "blocks"]
    assert decode_kv_events(encode_kv_events(events)) == (events, 0)


def test_our_load_is_dynamos_active_load() -> None:
    plain = msgspec.msgpack.decode(encode_load(LoadSnapshot(worker_id=2**64 - 1, dp_rank=2,
                                                            kv_used_blocks=3)))
    assert plain == {"worker_id": 2**64 - 1, "dp_rank": 2, "active_decode_blocks": None,
                     "active_prefill_tokens": None, "kv_used_blocks": 3}
    assert list(plain) == ["worker_id", "dp_rank", "active_decode_blocks",
                           "active_prefill_tokens", "kv_used_blocks"]
    with_total = msgspec.msgpack.decode(encode_load(LoadSnapshot(worker_id=1, kv_used_blocks=3,
                                                                 kv_total_blocks=100)))
    assert list(with_total)[-1] == "kv_total_blocks" and with_total["kv_total_blocks"] == 100


@pytest.mark.parametrize("payload", [
    b"", b"\xc1", msgspec.msgpack.encode({"worker_id": 1}),  # a map, not a list
    msgspec.msgpack.encode([{"worker_id": -1, "event": {"event_id": 0, "data": "cleared"}}]),
    msgspec.msgpack.encode([{"worker_id": 1, "event": {"event_id": 0, "data": {
        "stored": {"blocks": [{"block_hash": "x"}]}}}}]),
])
def test_malformed_kv_events_raise_protocol_error(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_kv_events(payload)


def test_unknown_variants_are_skipped_and_counted() -> None:
    payload = msgspec.msgpack.encode([
        {"worker_id": 1, "event": {"event_id": 0, "data": {"future_variant": {"x": 1}}}},
        {"worker_id": 1, "event": {"event_id": 1, "data": "reset_all"}},
        {"worker_id": 1, "event": {"event_id": 2, "data": {"removed": {"block_hashes": [3]}}}},
    ])
    events, unknown = decode_kv_events(payload)
    assert unknown == 2 and [e.event.event_id for e in events] == [2]


def test_malformed_load_raises_protocol_error() -> None:
    for payload in (b"\x90", msgspec.msgpack.encode({"dp_rank": 0})):
        with pytest.raises(ProtocolError):
            decode_load(payload)


@pytest.mark.parametrize("bad", [
    lambda f: f[:3],
    lambda f: [f[0], f[1][:7], f[2], f[3]],
    lambda f: [*f[:3], b"\x02" + f[3][1:]],
    lambda f: [*f[:3], f[3][:4]],
    lambda f: [*f[:3], f[3] + b"\x00"],
    lambda f: [*f[:3], b"\x01\x00\x00\x00\x01\xc1"],
    lambda f: [b"other", *f[1:]],
    lambda f: [f[0], (1).to_bytes(8, "big"), *f[2:]],
])
def test_malformed_frames_raise_protocol_error(bad: Any) -> None:
    frames = encode_frames("kv-events", 42, 7, b"\x90", 1)
    decode_frames(frames)
    with pytest.raises(ProtocolError):
        decode_frames(bad(frames))


def test_discovery_records_are_dynamos_byte_for_byte() -> None:
    files = {p.name: p.read_bytes() for p in (RECORDS / "event_channels").iterdir()}
    assert len(files) == 4
    for raw in files.values():
        record = decode_channel(raw)
        ep = record.scope.endpoint
        assert ep is not None and record.transport.zmq_address is not None
        ours = EventChannel(EventScope("endpoint", EndpointRef(ep.namespace, ep.component,
                                                               ep.name)), record.topic,
                            record.instance_id, EventTransport.zmq(record.transport.zmq_address))
        assert encode_record(ours) == raw
        key = channel_key(ep.namespace, ep.component, ep.name, record.topic, record.instance_id)
        # The file name is the key below the bucket, every non-alphanumeric byte %XX-encoded.
        name = "".join(c if c.isalnum() else f"%{ord(c):02X}"
                       for c in key.removeprefix("v1/event_channels/"))
        assert name in files
    (source_file,) = (RECORDS / "event_sources").iterdir()
    raw = source_file.read_bytes()
    source = msgspec.json.decode(raw, type=EventSource)
    assert encode_record(source) == raw  # recovery_target passes through
    meta = source.metadata
    assert meta.worker == WorkerRef(15556482102005470797, 0)
    # Ours: the same without a recovery target (we serve no recovery endpoint).
    ours = EventSource(source.scope, "kv-events", source.publisher_id, EventSourceMetadata(
        kv_state_endpoint=meta.kv_state_endpoint, worker=meta.worker,
        publisher_id=source.publisher_id))
    plain = json.loads(encode_record(ours))
    want = json.loads(raw)
    del want["metadata"]["recovery_target"]
    assert plain == want and list(plain) == list(want)
    assert source_key("dynamo", "backend", "generate", "kv-events", source.publisher_id) == (
        "v1/event_sources/namespace/dynamo/component/backend/endpoint/generate/topic/kv-events/"
        "b3df046b32133")
