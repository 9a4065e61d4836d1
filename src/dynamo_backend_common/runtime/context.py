"""The per-request runtime context: identity plus stop/kill signals, event driven.

``stop_generating()`` asks the engine to finish gracefully (it should emit a ``cancelled``
terminal); ``kill()`` also stops and additionally tells the framework to drop the stream.
Waiting is event driven (``await ctx.stopped()``); nothing polls.

A ``Context`` belongs to the event loop that runs the request. ``stop_generating`` / ``kill`` may
be called from other threads: they hop onto the owning loop.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable

from .loop import call_on_loop


class Context:
    """Runtime context of one request.

    Contract:
    - ``kill()`` implies ``stop_generating()``: after it, ``is_stopped()`` is also true.
    - Both are idempotent; ``stopped()`` / ``killed()`` return at once when already set.
    - Callbacks added with :meth:`add_stop_callback` run once, on the loop, at the first stop.
    """

    __slots__ = (
        "_callbacks",
        "_id",
        "_killed",
        "_killed_event",
        "_loop",
        "_stopped",
        "_stopped_event",
        "_thread",
    )

    def __init__(self, id: str | None = None) -> None:
        self._id = id or uuid.uuid4().hex
        self._stopped = False
        self._killed = False
        # Events are created lazily: most requests never wait on them.
        self._stopped_event: asyncio.Event | None = None
        self._killed_event: asyncio.Event | None = None
        self._callbacks: list[Callable[[Context], None]] | None = None
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            self._thread: int | None = threading.get_ident()
        except RuntimeError:
            self._loop = None
            self._thread = None

    @property
    def id(self) -> str:
        return self._id

    def is_stopped(self) -> bool:
        return self._stopped

    def is_killed(self) -> bool:
        return self._killed

    def stop_generating(self) -> None:
        """Ask the engine to stop. Idempotent; safe from any thread."""
        if self._stopped:
            return
        if not self._on_loop():
            self._hop(self.stop_generating)
            return
        self._stopped = True
        if self._stopped_event is not None:
            self._stopped_event.set()
        callbacks, self._callbacks = self._callbacks, None
        for cb in callbacks or ():
            cb(self)

    # Dynamo's Python binding spells it ``stop``; keep both.
    stop = stop_generating

    def kill(self) -> None:
        """Stop and mark killed (the stream is dropped). Idempotent; safe from any thread."""
        if self._killed:
            return
        if not self._on_loop():
            self._hop(self.kill, killed=True)
            return
        self._killed = True
        if self._killed_event is not None:
            self._killed_event.set()
        self.stop_generating()

    async def stopped(self) -> None:
        """Return once the context is stopped (or killed)."""
        if self._stopped:
            return
        if self._stopped_event is None:
            self._bind()
            self._stopped_event = asyncio.Event()
        await self._stopped_event.wait()

    async def stopped_within(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for a stop: ``True`` as soon as the context is stopped (at
        once if it already is), ``False`` when the time ran out first. The engine's paced
        wait between steps (a delay that a cancellation cuts short)."""
        if self._stopped:
            return True
        if seconds <= 0:
            return False
        try:
            async with asyncio.timeout(seconds):
                await self.stopped()
        except TimeoutError:
            return False
        return True

    async def killed(self) -> None:
        """Return once the context is killed."""
        if self._killed:
            return
        if self._killed_event is None:
            self._bind()
            self._killed_event = asyncio.Event()
        await self._killed_event.wait()

    def add_stop_callback(self, callback: Callable[[Context], None]) -> None:
        """Run ``callback(self)`` at the first stop (at once if already stopped)."""
        if self._stopped:
            callback(self)
            return
        self._bind()
        if self._callbacks is None:
            self._callbacks = []
        self._callbacks.append(callback)

    def remove_stop_callback(self, callback: Callable[[Context], None]) -> None:
        if self._callbacks and callback in self._callbacks:
            self._callbacks.remove(callback)

    def __repr__(self) -> str:
        state = "killed" if self._killed else "stopped" if self._stopped else "live"
        return f"Context(id={self._id!r}, {state})"

    # -- internals ------------------------------------------------------------------------
    def _bind(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.get_ident()

    def _on_loop(self) -> bool:
        return self._thread is None or self._thread == threading.get_ident()

    def _hop(self, fn: Callable[[], None], *, killed: bool = False) -> None:
        assert self._loop is not None
        if not call_on_loop(self._loop, fn):
            # The loop is closed: nobody can observe the signal; record it anyway.
            self._stopped = True
            if killed:
                self._killed = True
