"""``DynamoError``: kinds, the wire form, cause chains."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from dynamo_backend_common import BackendError, DynamoError, WorkerDraining


def test_kinds_are_dynamos_names_verbatim() -> None:
    assert [k.value for k in BackendError] == [
        "InvalidArgument",
        "CannotConnect",
        "EngineShutdown",
        "StreamIncomplete",
        "Cancelled",
        "ResponseTimeout",
        "Disconnected",
        "ConnectionTimeout",
        "Unknown",
    ]


def test_wire_round_trip_keeps_kind_message_and_causes() -> None:
    root = OSError("connection refused")
    err = DynamoError(BackendError.CannotConnect, "cannot reach scheduler", root)
    wire = err.to_wire()
    assert wire == {
        "kind": "CannotConnect",
        "message": "cannot reach scheduler",
        "causes": ["OSError: connection refused"],
    }
    # Through both wire encodings, as the request plane and HTTP carry it.
    codecs: list[tuple[Callable[[Any], bytes], Callable[[bytes], Any]]] = [
        (msgspec.msgpack.encode, msgspec.msgpack.decode),
        (msgspec.json.encode, msgspec.json.decode),
    ]
    for encode, decode in codecs:
        back = DynamoError.from_wire(decode(encode(wire)))
        assert back == err
        assert back.kind is BackendError.CannotConnect
        assert back.message == "cannot reach scheduler"
        assert back.causes == ["OSError: connection refused"]


def test_every_kind_round_trips() -> None:
    for kind in BackendError:
        back = DynamoError.from_wire(DynamoError(kind, "m").to_wire())
        assert back.kind is kind and back.message == "m" and back.causes == []


def test_no_causes_key_when_there_is_no_cause() -> None:
    assert DynamoError.invalid_argument("bad").to_wire() == {
        "kind": "InvalidArgument",
        "message": "bad",
    }


def test_unknown_kind_on_the_wire_becomes_unknown_keeping_the_original_kind() -> None:
    back = DynamoError.from_wire({"kind": "QuotaExceeded", "message": "too many"})
    assert back.kind is BackendError.Unknown
    assert "QuotaExceeded" in back.message and "too many" in back.message


@pytest.mark.parametrize("payload", [None, "oops", 42, ["kind"]])
def test_malformed_wire_payload_is_unknown_and_never_raises(payload: object) -> None:
    back = DynamoError.from_wire(payload)
    assert back.kind is BackendError.Unknown and "malformed" in back.message


def test_from_exception_keeps_dynamo_errors_and_wraps_others() -> None:
    typed = DynamoError.engine_shutdown("bye")
    assert DynamoError.from_exception(typed) is typed
    exc = ValueError("bad shape")
    wrapped = DynamoError.from_exception(exc)
    assert wrapped.kind is BackendError.Unknown
    assert wrapped.message == "ValueError: bad shape"
    assert wrapped.__cause__ is exc
    assert wrapped.causes == ["ValueError: bad shape"]


def test_cause_chain_is_flattened_outermost_first() -> None:
    inner = DynamoError.disconnected("peer went away")
    try:
        try:
            raise inner
        except DynamoError as e:
            raise RuntimeError("stream broke") from e
    except RuntimeError as outer:
        err = DynamoError(BackendError.StreamIncomplete, "incomplete", outer)
    assert err.causes == ["RuntimeError: stream broke", "Disconnected: peer went away"]
    assert str(err) == (
        "StreamIncomplete: incomplete (caused by: RuntimeError: stream broke; "
        "Disconnected: peer went away)"
    )


def test_kind_may_be_given_as_its_name_but_must_be_valid() -> None:
    assert DynamoError("Cancelled", "x").kind is BackendError.Cancelled
    with pytest.raises(ValueError, match="unknown BackendError kind"):
        DynamoError("Nope", "x")


def test_equality_and_hash_follow_kind_and_message() -> None:
    a, b = DynamoError.unknown("m"), DynamoError.unknown("m")
    assert a == b and hash(a) == hash(b)
    assert a != DynamoError.invalid_argument("m")


def test_worker_draining_is_an_engine_shutdown() -> None:
    err = WorkerDraining()
    assert isinstance(err, DynamoError) and err.kind is BackendError.EngineShutdown
    assert DynamoError.from_wire(err.to_wire()).kind is BackendError.EngineShutdown


def test_every_kind_has_one_http_status() -> None:
    from dynamo_backend_common.frontend.generation import dynamo_error_to_request_error

    table = {k: k.http_status for k in BackendError}
    assert table == {
        BackendError.InvalidArgument: 400, BackendError.CannotConnect: 503,
        BackendError.EngineShutdown: 503, BackendError.Cancelled: 503,
        BackendError.Disconnected: 502, BackendError.StreamIncomplete: 502,
        BackendError.ResponseTimeout: 504, BackendError.ConnectionTimeout: 504,
        BackendError.Unknown: 500}
    # The frontend answers with the same table.
    assert all(dynamo_error_to_request_error(DynamoError(k, "m")).status == s
               for k, s in table.items())
