"""Admission gate and in-flight counter for graceful shutdown."""

from __future__ import annotations

import asyncio

from ..errors import WorkerDraining


class RequestTracker:
    """Counts admitted requests and closes admission at shutdown.

    Single event loop, so check-and-increment is atomic without locks: once
    :meth:`stop_accepting` ran, no request is admitted, and :meth:`wait_idle` returns as soon as
    the last admitted one releases (event driven, no polling).
    """

    __slots__ = ("_accepting", "_idle", "_inflight")

    def __init__(self) -> None:
        self._accepting = True
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def inflight(self) -> int:
        return self._inflight

    def acquire(self) -> None:
        """Admit one request or raise :class:`WorkerDraining`. Pair with :meth:`release`."""
        if not self._accepting:
            raise WorkerDraining()
        self._inflight += 1
        self._idle.clear()

    def release(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()

    def stop_accepting(self) -> None:
        self._accepting = False

    async def wait_idle(self, timeout: float | None) -> bool:
        """True once nothing is in flight; False if ``timeout`` expired first (one check at 0)."""
        if self._inflight == 0:
            return True
        if timeout is not None and timeout <= 0:
            return False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return self._inflight == 0
        return True
