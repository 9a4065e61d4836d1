"""Wire format of the request plane: length-prefixed binary frames, many streams per connection.

Every frame is a 13-byte header followed by ``length`` payload bytes::

    u32 BE length | u8 kind | u64 BE stream_id | payload (length bytes)

``length`` counts the payload only, so a frame occupies ``13 + length`` bytes. Stream ids are
chosen by the client (per connection, never reused while the connection lives); id 0 is reserved
for connection-level frames (PING/PONG).

Kinds and payloads (C = client, S = server):

========  ====  =====  ==========================================================================
kind      code  dir    payload
========  ====  =====  ==========================================================================
REQUEST   1     C->S   msgpack array ``[endpoint: str, headers: {str: str}, request: bin]``
DATA      2     S->C   one response item, opaque bytes
END       3     S->C   empty; the stream finished normally (terminal)
ERROR     4     S->C   msgpack map ``DynamoError.to_wire()`` (terminal)
STOP      5     C->S   empty; ``ctx.stop_generating()`` on the server, the stream goes on
KILL      6     C->S   empty; ``ctx.kill()`` and the server drops the stream (see server.py)
PING      7     C->S   opaque; answered by a PONG with the same payload
PONG      8     S->C   echo of the PING payload
========  ====  =====  ==========================================================================

A frame whose kind is unknown, whose length exceeds the receiver's ``max_frame_bytes`` or whose
envelope does not decode is a protocol error: the receiver logs it and closes the connection.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any, Final

import msgspec

HEADER: Final = struct.Struct(">IBQ")
HEADER_SIZE: Final = HEADER.size  # 13
DEFAULT_MAX_FRAME_BYTES: Final = 32 * 2**20

REQUEST: Final = 1
DATA: Final = 2
END: Final = 3
ERROR: Final = 4
STOP: Final = 5
KILL: Final = 6
PING: Final = 7
PONG: Final = 8

KIND_NAMES: Final = {
    REQUEST: "REQUEST", DATA: "DATA", END: "END", ERROR: "ERROR",
    STOP: "STOP", KILL: "KILL", PING: "PING", PONG: "PONG",
}


class FrameError(ValueError):
    """The peer sent bytes that are not a valid frame; the connection must be closed."""


class RequestEnvelope(msgspec.Struct, array_like=True, frozen=True):
    """Payload of a REQUEST frame (a 3-element msgpack array on the wire)."""

    endpoint: str
    headers: dict[str, str]
    payload: bytes


_ENCODER: Final = msgspec.msgpack.Encoder()
_REQUEST_DECODER: Final = msgspec.msgpack.Decoder(RequestEnvelope)
_ERROR_DECODER: Final = msgspec.msgpack.Decoder()


def encode_frame(kind: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One whole frame as bytes (convenience for tests and control frames)."""
    return HEADER.pack(len(payload), kind, stream_id) + payload


def encode_request(endpoint: str, headers: Mapping[str, str], payload: bytes) -> bytes:
    """Payload of a REQUEST frame."""
    return _ENCODER.encode(RequestEnvelope(endpoint, dict(headers), payload))


def decode_request(data: bytes) -> RequestEnvelope:
    """Inverse of :func:`encode_request`; raises :class:`FrameError` on a malformed envelope."""
    try:
        return _REQUEST_DECODER.decode(data)
    except msgspec.DecodeError as exc:
        raise FrameError(f"malformed REQUEST envelope: {exc}") from None


def encode_error(wire: Mapping[str, Any]) -> bytes:
    """Payload of an ERROR frame from ``DynamoError.to_wire()``."""
    return _ENCODER.encode(wire)


def decode_error(data: bytes) -> Any:
    """Payload of an ERROR frame as plain data (feed it to ``DynamoError.from_wire``).

    Undecodable bytes come back as a string so ``from_wire`` reports them as ``Unknown``.
    """
    try:
        return _ERROR_DECODER.decode(data)
    except msgspec.DecodeError:
        return f"undecodable error payload ({len(data)} bytes)"


class FrameReader:
    """Incremental frame parser: feed it bytes as they arrive, get whole frames back.

    ``feed`` returns the complete frames as ``(kind, stream_id, payload)`` tuples and keeps any
    partial frame for the next call. It raises :class:`FrameError` for an unknown kind or a length
    above ``max_frame_bytes``, checked as soon as the header is in, so a garbage length can never
    make it buffer gigabytes.
    """

    __slots__ = ("_buf", "_need", "max_frame_bytes")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        # Bytes needed before the pending data can yield a frame: lets a large frame arriving
        # in many small reads be accumulated without re-parsing it each time.
        self._need = HEADER_SIZE

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return []
            src = bytes(buf)
            buf.clear()
        else:
            # Common case: nothing pending, parse straight from the received bytes.
            src = data
        frames: list[tuple[int, int, bytes]] = []
        end = len(src)
        off = 0
        need = HEADER_SIZE
        unpack = HEADER.unpack_from
        limit = self.max_frame_bytes
        while end - off >= HEADER_SIZE:
            length, kind, sid = unpack(src, off)
            if length > limit:
                raise FrameError(f"frame of {length} bytes exceeds the limit of {limit}")
            if not REQUEST <= kind <= PONG:
                raise FrameError(f"unknown frame kind {kind}")
            start = off + HEADER_SIZE
            stop = start + length
            if stop > end:
                need = HEADER_SIZE + length
                break
            frames.append((kind, sid, src[start:stop]))
            off = stop
        if off < end:
            buf += memoryview(src)[off:]
        self._need = need
        return frames
