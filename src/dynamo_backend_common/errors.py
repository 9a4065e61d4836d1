"""Typed errors that cross the worker/frontend boundary intact.

Every error leaving a backend is a :class:`DynamoError` carrying one :class:`BackendError` kind.
The kind survives the trip over the request plane (see :meth:`DynamoError.to_wire` /
:meth:`DynamoError.from_wire`), so a frontend can tell ``InvalidArgument`` (a 4xx) from
``EngineShutdown`` (retry elsewhere) without parsing messages.
"""

from __future__ import annotations

import enum
from typing import Any


class BackendError(enum.Enum):
    """The error kinds of Dynamo's ``ErrorType::Backend(BackendError::X)``, names kept verbatim."""

    InvalidArgument = "InvalidArgument"
    CannotConnect = "CannotConnect"
    EngineShutdown = "EngineShutdown"
    StreamIncomplete = "StreamIncomplete"
    Cancelled = "Cancelled"
    ResponseTimeout = "ResponseTimeout"
    Disconnected = "Disconnected"
    ConnectionTimeout = "ConnectionTimeout"
    Unknown = "Unknown"

    @property
    def http_status(self) -> int:
        """The HTTP status for this kind, the one table every HTTP surface uses (the OpenAI
        frontend, the worker's engine-control route): ``InvalidArgument`` 400;
        ``CannotConnect``, ``EngineShutdown``, ``Cancelled`` 503 (try again elsewhere or
        later); ``Disconnected``, ``StreamIncomplete`` 502; ``ResponseTimeout``,
        ``ConnectionTimeout`` 504; ``Unknown`` 500."""
        return _HTTP_STATUS[self]


_HTTP_STATUS: dict[BackendError, int] = {
    BackendError.InvalidArgument: 400,
    BackendError.CannotConnect: 503,
    BackendError.EngineShutdown: 503,
    BackendError.Cancelled: 503,
    BackendError.Disconnected: 502,
    BackendError.StreamIncomplete: 502,
    BackendError.ResponseTimeout: 504,
    BackendError.ConnectionTimeout: 504,
    BackendError.Unknown: 500,
}


class DynamoError(Exception):
    """An error with a stable :class:`BackendError` kind, a message and an optional cause chain.

    Raise it from ``generate`` (before or during the stream) to end a request with a typed error;
    it is terminal. ``cause`` is kept as ``__cause__`` so tracebacks show the chain; on the wire
    the chain is flattened into ``causes`` (outermost first) because exceptions do not travel.
    """

    __slots__ = ("causes", "kind", "message")

    def __init__(
        self,
        kind: BackendError | str,
        message: str,
        cause: BaseException | None = None,
        *,
        causes: list[str] | None = None,
    ) -> None:
        self.kind = kind if isinstance(kind, BackendError) else _parse_kind(kind)
        self.message = message
        self.causes: list[str] = list(causes) if causes else []
        if cause is not None:
            self.__cause__ = cause
            self.causes.extend(_flatten(cause))
        super().__init__(message)

    def __str__(self) -> str:
        text = f"{self.kind.value}: {self.message}"
        if self.causes:
            text += " (caused by: " + "; ".join(self.causes) + ")"
        return text

    def __repr__(self) -> str:
        return f"DynamoError({self.kind.value!r}, {self.message!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DynamoError):
            return NotImplemented
        return (self.kind, self.message, self.causes) == (other.kind, other.message, other.causes)

    def __hash__(self) -> int:
        return hash((self.kind, self.message))

    # -- convenience constructors, one per kind --------------------------------------------
    @classmethod
    def invalid_argument(cls, message: str, cause: BaseException | None = None) -> DynamoError:
        return cls(BackendError.InvalidArgument, message, cause)

    @classmethod
    def engine_shutdown(cls, message: str, cause: BaseException | None = None) -> DynamoError:
        return cls(BackendError.EngineShutdown, message, cause)

    @classmethod
    def unknown(cls, message: str, cause: BaseException | None = None) -> DynamoError:
        return cls(BackendError.Unknown, message, cause)

    @classmethod
    def disconnected(cls, message: str, cause: BaseException | None = None) -> DynamoError:
        return cls(BackendError.Disconnected, message, cause)

    @classmethod
    def from_exception(cls, exc: BaseException) -> DynamoError:
        """Wrap any exception: a ``DynamoError`` is returned as is, anything else as ``Unknown``."""
        if isinstance(exc, DynamoError):
            return exc
        return cls(BackendError.Unknown, f"{type(exc).__name__}: {exc}", exc)

    # -- wire form -------------------------------------------------------------------------
    def to_wire(self) -> dict[str, Any]:
        """Stable, JSON/msgpack-safe form: ``{"kind", "message", "causes"?}``."""
        out: dict[str, Any] = {"kind": self.kind.value, "message": self.message}
        if self.causes:
            out["causes"] = self.causes
        return out

    @classmethod
    def from_wire(cls, obj: Any) -> DynamoError:
        """Inverse of :meth:`to_wire`. Malformed input yields an ``Unknown`` error, never raises."""
        if not isinstance(obj, dict):
            return cls(BackendError.Unknown, f"malformed error payload: {obj!r}")
        kind = obj.get("kind", "Unknown")
        message = obj.get("message", "")
        causes = obj.get("causes") or []
        if not isinstance(message, str):
            message = str(message)
        if not isinstance(causes, list):
            causes = [str(causes)]
        try:
            parsed = _parse_kind(str(kind))
        except ValueError:
            parsed = BackendError.Unknown
            message = f"[{kind}] {message}"
        return cls(parsed, message, causes=[str(c) for c in causes])


class WorkerDraining(DynamoError):
    """Raised for a request that arrives after the worker stopped admitting new work.

    Its kind is ``EngineShutdown``: a frontend retries the request on another worker.
    """

    def __init__(self, message: str = "worker is not accepting new requests") -> None:
        super().__init__(BackendError.EngineShutdown, message)


class ProtocolError(ValueError):
    """Bytes could not be decoded into a protocol type (garbage, wrong shape, bad value)."""


def _parse_kind(kind: str) -> BackendError:
    try:
        return BackendError(kind)
    except ValueError:
        valid = ", ".join(k.value for k in BackendError)
        raise ValueError(f"unknown BackendError kind {kind!r}; expected one of: {valid}") from None


def _flatten(exc: BaseException) -> list[str]:
    out: list[str] = []
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, DynamoError):
            out.append(f"{cur.kind.value}: {cur.message}")
            out.extend(cur.causes)
            break
        out.append(f"{type(cur).__name__}: {cur}")
        cur = cur.__cause__ or cur.__context__
    return out
