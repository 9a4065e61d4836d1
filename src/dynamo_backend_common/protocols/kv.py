"""KV-cache events and load snapshots as they travel on the event plane: NVIDIA Dynamo 1.6.1's
formats, byte for byte.

A worker publishes :class:`RouterEvent` s (one per cache change, ``event_id`` strictly increasing
per worker and dp_rank) so routers can index which blocks each worker holds. ``block_hash`` is
the chained hash of the block's tokens and every token before it (see ``kv.hashing``), so a
router can compute the same value from a prompt; ``tokens_hash`` is the hash of the block's own
tokens (what Dynamo's radix tree keys blocks by); ``parent_hash`` links a stored run of blocks
to the block before it. Both hashes are Dynamo's (xxh3-64, seed 1337), bit for bit.

Wire format (measured on a real Dynamo 1.6.1, ``tests/golden/dynamo-1.6.1/zmq``): the payload of
one ``kv-events`` message is a msgpack **list** of RouterEvent maps, several events of one
moment in one list (:func:`encode_kv_events` / :func:`decode_kv_events`)::

    [{"worker_id": u64, "storage_tier": "device", "residency_domain": "worker",
      "event": {"event_id": u64,
                "data": {"stored": {"parent_hash": u64|nil, "start_position": u32|nil,
                                    "blocks": [{"block_hash": u64, "tokens_hash": u64,
                                                "mm_extra_info": nil|map}]}}
                      | {"removed": {"block_hashes": [u64, ...]}}
                      | "cleared",
                "dp_rank": u32}}]

``data`` is serde's *externally tagged* enum: a one-key map for the variants with data and the
bare string ``"cleared"`` for the unit variant (observed: Dynamo's own ``KvEventPublisher``
relaying a vLLM ``AllBlocksCleared`` emits ``"data": "cleared"``). The decoder also takes
``{"cleared": nil}`` and skips variants it does not know (counted, not an error).

A ``kv_metrics`` message is one :class:`LoadSnapshot`: Dynamo's ``ActiveLoad`` map
``{worker_id, dp_rank, active_decode_blocks, active_prefill_tokens, kv_used_blocks}`` plus our
optional ``kv_total_blocks`` (Dynamo's decoder ignores unknown fields; verified against its
frontend). A Dynamo worker sends no total: routers then take it from the model card's
``runtime_config.total_kv_blocks``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Final

import msgspec

from ..errors import ProtocolError

__all__ = [
    "STORAGE_TIER_DEVICE",
    "U32",
    "U64",
    "ActiveLoad",
    "KvCacheEvent",
    "KvCleared",
    "KvEventData",
    "KvRemoved",
    "KvStored",
    "LoadSnapshot",
    "RouterEvent",
    "StoredBlock",
    "decode_kv_events",
    "decode_load",
    "encode_kv_events",
    "encode_load",
]

# msgspec checks the u64 upper bound itself when decoding.
U64 = Annotated[int, msgspec.Meta(ge=0)]
U32 = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]

#: The GPU tier (Dynamo's ``StorageTier::Device``): the one routers index by default.
STORAGE_TIER_DEVICE: Final = "device"


class StoredBlock(msgspec.Struct, frozen=True):
    """One stored block: its chained ``block_hash`` and its own ``tokens_hash``.

    Dynamo's router needs ``tokens_hash`` (its radix tree is keyed by it). When it is not given,
    ``block_hash`` stands in: right for the first block of a root run (the two hashes are equal
    there) and, deeper, a key no prompt produces, so a Dynamo router under-matches such blocks
    but never claims a false hit. Engines should pass it (``publish_stored(tokens_hashes=...)``
    or ``token_ids=``).
    """

    block_hash: U64
    tokens_hash: U64 | None = None
    #: Dynamo's multimodal block info (``{"mm_objects": [...]}``), passed through as is.
    mm_extra_info: Any | None = None

    def __post_init__(self) -> None:
        if self.tokens_hash is None:
            msgspec.structs.force_setattr(self, "tokens_hash", self.block_hash)


class KvStored(msgspec.Struct, frozen=True, kw_only=True):
    """Blocks now cached, in sequence order, following ``parent_hash`` (``None``: a root run)."""

    parent_hash: U64 | None = None
    #: Position of the first block in its sequence, when the engine knows it (Dynamo's
    #: positional replay); ``None`` otherwise.
    start_position: U32 | None = None
    blocks: list[StoredBlock]


class KvRemoved(msgspec.Struct, frozen=True):
    block_hashes: list[U64]


class KvCleared(msgspec.Struct, frozen=True):
    """The whole cache of the rank was reset."""


KvEventData = KvStored | KvRemoved | KvCleared


class KvCacheEvent(msgspec.Struct, frozen=True):
    event_id: U64
    data: KvEventData
    dp_rank: U32 = 0


class RouterEvent(msgspec.Struct, frozen=True):
    """A KV cache event stamped with the publishing worker's id (encode it with
    :func:`encode_kv_events`: msgspec alone cannot write Dynamo's external tags)."""

    worker_id: U64
    event: KvCacheEvent
    storage_tier: str = STORAGE_TIER_DEVICE
    residency_domain: str = "worker"


class LoadSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """Per-rank load signal for routers: Dynamo's ``ActiveLoad`` (topic ``kv_metrics``).

    ``kv_used_blocks`` is what the worker's engine holds; ``active_decode_blocks`` /
    ``active_prefill_tokens`` are what Dynamo's scheduler-side publishers fill in (``None`` from
    workers, as Dynamo's mocker sends them). ``kv_total_blocks`` is our extension (the rank's
    capacity), absent in Dynamo's messages. Dynamo's five fields are always written (``None`` as
    nil, like Dynamo); ``kv_total_blocks`` only when known.
    """

    worker_id: U64
    dp_rank: U32 = 0
    active_decode_blocks: U64 | None = None
    active_prefill_tokens: U64 | None = None
    kv_used_blocks: U64 | None = None
    kv_total_blocks: U64 | None = None


#: Dynamo's name for :class:`LoadSnapshot`.
ActiveLoad = LoadSnapshot


# -- the kv-events wire codec -------------------------------------------------------------------
# Encoding goes through small wrapper structs (C-speed msgspec encoding, exact field order);
# decoding through mirror structs whose ``data`` accepts any externally tagged variant.
class _StoredTag(msgspec.Struct):
    stored: KvStored


class _RemovedTag(msgspec.Struct):
    removed: KvRemoved


class _EventOut(msgspec.Struct):
    event_id: int
    data: Any
    dp_rank: int


class _RouterEventOut(msgspec.Struct):
    worker_id: int
    storage_tier: str
    residency_domain: str
    event: _EventOut


class _DataIn(msgspec.Struct):
    stored: KvStored | None = None
    removed: KvRemoved | None = None
    cleared: Any = msgspec.UNSET


class _EventIn(msgspec.Struct):
    event_id: U64
    data: _DataIn | str
    dp_rank: U32 = 0


class _RouterEventIn(msgspec.Struct):
    worker_id: U64
    event: _EventIn
    storage_tier: str = STORAGE_TIER_DEVICE
    residency_domain: str = "worker"


class _LoadOut(msgspec.Struct):
    worker_id: int
    dp_rank: int
    active_decode_blocks: int | None
    active_prefill_tokens: int | None
    kv_used_blocks: int | None


_CLEARED: Final = "cleared"
_ENCODER = msgspec.msgpack.Encoder()
_EVENTS_DECODER = msgspec.msgpack.Decoder(list[_RouterEventIn])
_LOAD_DECODER = msgspec.msgpack.Decoder(LoadSnapshot)


def _tagged(data: KvEventData) -> Any:
    if isinstance(data, KvStored):
        return _StoredTag(data)
    if isinstance(data, KvRemoved):
        return _RemovedTag(data)
    if isinstance(data, KvCleared):
        return _CLEARED
    raise TypeError(f"not a KV event payload: {type(data).__name__}")


def encode_kv_events(events: Sequence[RouterEvent]) -> bytes:
    """One ``kv-events`` message: ``events`` as Dynamo's msgpack list of RouterEvent."""
    return _ENCODER.encode([
        _RouterEventOut(
            e.worker_id,
            e.storage_tier,
            e.residency_domain,
            _EventOut(e.event.event_id, _tagged(e.event.data), e.event.dp_rank),
        )
        for e in events
    ])


def decode_kv_events(payload: bytes | bytearray | memoryview) -> tuple[list[RouterEvent], int]:
    """Decode one ``kv-events`` message (Dynamo's list of RouterEvent).

    Returns the events and the number of events of variants this decoder does not know (left
    out). Raises :class:`ProtocolError` for bytes that are not such a list.
    """
    try:
        raw = _EVENTS_DECODER.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"invalid kv-events message (msgpack): {exc}") from None
    out: list[RouterEvent] = []
    unknown = 0
    for r in raw:
        d = r.event.data
        data: KvEventData
        if isinstance(d, str):
            if d != _CLEARED:
                unknown += 1
                continue
            data = KvCleared()
        elif d.stored is not None:
            data = d.stored
        elif d.removed is not None:
            data = d.removed
        elif d.cleared is not msgspec.UNSET:
            data = KvCleared()
        else:
            unknown += 1
            continue
        out.append(RouterEvent(r.worker_id, KvCacheEvent(r.event.event_id, data, r.event.dp_rank),
                               r.storage_tier, r.residency_domain))
    return out, unknown


def encode_load(snapshot: LoadSnapshot) -> bytes:
    """One ``kv_metrics`` message (Dynamo's ActiveLoad map, plus ``kv_total_blocks`` when set)."""
    if snapshot.kv_total_blocks is not None:
        return _ENCODER.encode(snapshot)
    s = snapshot
    return _ENCODER.encode(_LoadOut(s.worker_id, s.dp_rank, s.active_decode_blocks,
                                    s.active_prefill_tokens, s.kv_used_blocks))


def decode_load(payload: bytes | bytearray | memoryview) -> LoadSnapshot:
    """Decode one ``kv_metrics`` message (ours or a Dynamo worker's); unknown fields are
    ignored. Raises :class:`ProtocolError` for bytes that are not an ActiveLoad map."""
    try:
        return _LOAD_DECODER.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"invalid kv_metrics message (msgpack): {exc}") from None
