"""The request plane: framed, multiplexed request/response streams over persistent TCP.

A worker runs a :class:`RequestPlaneServer` exposing named endpoints (each a :data:`Handler`);
a frontend holds one :class:`RequestPlaneClient` with one connection per worker address, shared
by all concurrent requests. Frame format: :mod:`.frames`; server and client semantics: the
docstrings of :mod:`.server` and :mod:`.client`.
"""

from .client import RequestPlaneClient
from .frames import DEFAULT_MAX_FRAME_BYTES
from .server import Handler, RequestPlaneServer, ServerStats

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "Handler",
    "RequestPlaneClient",
    "RequestPlaneServer",
    "ServerStats",
]
