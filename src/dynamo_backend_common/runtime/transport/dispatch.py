"""One client for every worker, whatever request plane it advertises.

A worker's :class:`~dynamo_backend_common.protocols.discovery.InstanceInfo` names its protocol in
``transport``: ``{"tcp": "host:port/{id:x}/{ns}/{comp}/{ep}"}`` is Dynamo's TCP request plane
(:mod:`.callhome`; the body codec is ``request_plane_codec``, JSON when absent, as Dynamo's
frontend does it) and ``{"mux": "host:port/{ep}"}`` our private multiplexed protocol
(:mod:`.client`). Our workers serving Dynamo's plane also serve ours on a second port and say
so in the record's ``mux`` field; :class:`WorkerClient` takes that fast path when it is there
(``prefer_mux``), else the advertised transport.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping

from ...errors import BackendError, DynamoError
from ...protocols.discovery import InstanceInfo
from ..context import Context
from .callhome import CallHomeClient
from .client import RequestPlaneClient

__all__ = ["WorkerClient"]


class WorkerClient:
    """``stream`` / ``call`` a worker by its instance record (see the module docstring)."""

    def __init__(self, *, callback_timeout: float | None = None,
                 prefer_mux: bool = True) -> None:
        self.tcp = (CallHomeClient() if callback_timeout is None
                    else CallHomeClient(callback_timeout=callback_timeout))
        self._mux: RequestPlaneClient | None = None
        #: Take a worker's ``mux`` fast path when its record has one (else its transport).
        self.prefer_mux = prefer_mux

    @property
    def mux(self) -> RequestPlaneClient:
        if self._mux is None:
            self._mux = RequestPlaneClient()
        return self._mux

    def stream(
        self,
        info: InstanceInfo,
        payload: bytes,
        ctx: Context | None = None,
        headers: Mapping[str, str] | None = None,
        *,
        endpoint: str | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """Send msgpack ``payload`` to the worker's serving endpoint (or to ``endpoint`` of the
        same component, e.g. its engine-control endpoint); iterate msgpack items."""
        if info.mux and self.prefer_mux:
            address, _, name = info.mux.partition("/")
            return self.mux.stream(address, endpoint or name, payload, ctx, headers)
        proto = info.protocol
        if proto == "tcp":
            path = info.path
            if endpoint is not None:
                path = f"{path.rpartition('/')[0]}/{endpoint}"
            return self.tcp.stream(info.address, path, payload, ctx, headers,
                                   codec=info.request_plane_codec or "json")
        if proto == "mux":
            return self.mux.stream(info.address, endpoint or info.path, payload, ctx, headers)
        raise DynamoError(BackendError.CannotConnect,
                          f"worker {info.instance_id:x} advertises no supported request plane "
                          f"(transport {info.transport!r})")

    async def call(self, info: InstanceInfo, payload: bytes, ctx: Context | None = None, *,
                   endpoint: str | None = None) -> bytes:
        """Unary request: exactly one item."""
        result: bytes | None = None
        gen = self.stream(info, payload, ctx, endpoint=endpoint)
        try:
            async for item in gen:
                if result is not None:
                    raise DynamoError.unknown("endpoint returned more than one item")
                result = item
        finally:
            await gen.aclose()
        if result is None:
            raise DynamoError(BackendError.StreamIncomplete, "endpoint returned no item")
        return result

    async def close(self) -> None:
        await self.tcp.close()
        if self._mux is not None:
            await self._mux.close()

    async def __aenter__(self) -> WorkerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
