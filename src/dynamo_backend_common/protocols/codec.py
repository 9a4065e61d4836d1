"""Encode/decode helpers for protocol types (msgpack for the wire, JSON for interop and HTTP).

Decoders are cached per target type. Any decoding failure (garbage bytes, wrong shape, value out of
range) raises :class:`~dynamo_backend_common.errors.ProtocolError` naming the type and the problem.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, TypeVar

import msgspec

from ..errors import ProtocolError
from .common import FinishReason

T = TypeVar("T")


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, FinishReason):
        return obj.to_wire()
    raise NotImplementedError(f"cannot encode objects of type {type(obj).__name__}")


def _dec_hook(typ: type, obj: Any) -> Any:
    if typ is FinishReason:
        try:
            return FinishReason.from_wire(obj)
        except ValueError as exc:
            raise msgspec.ValidationError(str(exc)) from None
    raise NotImplementedError(f"cannot decode objects of type {typ!r}")


_MSGPACK_ENCODER = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_JSON_ENCODER = msgspec.json.Encoder(enc_hook=_enc_hook)


@lru_cache(maxsize=128)
def _msgpack_decoder(typ: Any) -> msgspec.msgpack.Decoder[Any]:
    return msgspec.msgpack.Decoder(typ, dec_hook=_dec_hook)


@lru_cache(maxsize=128)
def _json_decoder(typ: Any) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(typ, dec_hook=_dec_hook)


def to_msgpack(obj: Any) -> bytes:
    """Encode a protocol object (or plain data containing them) as msgpack."""
    return _MSGPACK_ENCODER.encode(obj)


def to_json(obj: Any) -> bytes:
    """Encode a protocol object (or plain data containing them) as JSON (Dynamo-compatible)."""
    return _JSON_ENCODER.encode(obj)


#: The decoders of the first types decoded, in a plain dict: the per-chunk path (a frontend
#: decodes an ``LLMEngineOutput`` per token) skips the ``lru_cache`` wrapper.
_FAST_DECODERS: dict[Any, msgspec.msgpack.Decoder[Any]] = {}
_FAST_DECODERS_MAX = 32


def from_msgpack(data: bytes | bytearray | memoryview, typ: type[T]) -> T:
    """Decode msgpack bytes into ``typ``; raises :class:`ProtocolError` on bad input."""
    dec = _FAST_DECODERS.get(typ)
    if dec is None:
        dec = _msgpack_decoder(typ)  # type: ignore[arg-type]
        if len(_FAST_DECODERS) < _FAST_DECODERS_MAX:
            _FAST_DECODERS[typ] = dec
    try:
        return dec.decode(data)  # type: ignore[no-any-return]
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"invalid {_name(typ)} (msgpack): {exc}") from None


def from_json(data: bytes | bytearray | memoryview | str, typ: type[T]) -> T:
    """Decode JSON into ``typ``; raises :class:`ProtocolError` on bad input."""
    try:
        return _json_decoder(typ).decode(data)  # type: ignore[no-any-return,arg-type]
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"invalid {_name(typ)} (JSON): {exc}") from None


def convert(obj: Any, typ: type[T]) -> T:
    """Convert already-decoded builtins (dicts, lists) into ``typ`` with validation."""
    try:
        return msgspec.convert(obj, typ, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"invalid {_name(typ)}: {exc}") from None


def to_builtins(obj: Any) -> Any:
    """Protocol object -> plain dicts/lists/str/int (the JSON shape)."""
    return msgspec.to_builtins(obj, enc_hook=_enc_hook)


def _name(typ: Any) -> str:
    return getattr(typ, "__name__", None) or repr(typ)
