"""What the two file stores' watches share: one poller task per store, and watches that sleep
until the store's version changes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any


class PolledWatches:
    """Mixin: ``_poller`` (the store's one polling task, started by its first watch) and the
    futures of watches waiting for a change. The store calls :meth:`_wake_all` after a change,
    :meth:`_fail_all` when polling fails (the error surfaces in every watch, rather than the
    poller spinning silently), and :meth:`_stop_poller` when the last watch ends or it closes."""

    def _init_polled(self) -> None:
        self._poller: asyncio.Task[None] | None = None
        self._waiters: set[asyncio.Future[None]] = set()

    def _ensure_poller(self, loop_fn: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(loop_fn(), name=name)

    async def _wait_change(self) -> None:
        """Sleep until the next :meth:`_wake_all` (or raise what :meth:`_fail_all` got)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await waiter
        finally:
            self._waiters.discard(waiter)

    def _wake_all(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _fail_all(self, exc: BaseException) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(exc)

    def _drop_poller(self) -> None:
        """Cancel the poller without waiting (the last watch ended)."""
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None

    async def _stop_poller(self) -> None:
        """Cancel the poller and wait for it to end (closing)."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
