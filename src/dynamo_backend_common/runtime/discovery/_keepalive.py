"""The lease keep-alive every discovery backend runs: one daemon thread per lease.

A renewal must never wait behind a busy event loop (a long prefill in the same process would
otherwise let the lease expire), which is also why Dynamo keeps its keep-alive on a dedicated
thread. :class:`KeepAlive` owns that thread: it calls the backend's ``beat`` every period, and
when a beat reports the lease lost it calls ``on_lost`` (on the thread) and sets the backend's
``lease_lost`` event on the event loop, then ends. :meth:`KeepAlive.stop` ends it from
``close()``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from ..loop import call_on_loop

__all__ = ["Beat", "KeepAlive"]

#: One renewal. Returns the seconds until the next one, or a ``str``: the lease is lost, for
#: that reason. It runs on the keep-alive thread and should check ``stopping`` in long loops.
Beat = Callable[[], "float | str"]


class KeepAlive:
    """A lease's keep-alive thread (``name`` names it). The first beat runs ``interval`` s
    after :meth:`start`; each later one when the previous beat says. ``on_exit`` runs on the
    thread as it ends (closing a connection the beats used), whatever ended it."""

    def __init__(self, name: str, interval: float, beat: Beat, *,
                 on_lost: Callable[[str], None], lease_lost: asyncio.Event,
                 on_exit: Callable[[], None] | None = None) -> None:
        self.name = name
        self.interval = interval
        self._beat = beat
        self._on_lost = on_lost
        self._lease_lost = lease_lost
        self._on_exit = on_exit
        #: Set by :meth:`stop`; beats that loop over many items check it between items.
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (call on the event loop that owns ``lease_lost``). Once only."""
        if self._thread is not None:
            raise RuntimeError("keep-alive already started")
        loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, args=(loop,), name=self.name,
                                        daemon=True)
        self._thread.start()

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            wait = self.interval
            while not self.stopping.wait(wait):
                outcome = self._beat()
                if isinstance(outcome, str):
                    self._on_lost(outcome)
                    call_on_loop(loop, self._lease_lost.set)  # False: loop closed, nobody to tell
                    return
                wait = outcome
        finally:
            if self._on_exit is not None:
                self._on_exit()

    async def stop(self) -> None:
        """End the thread, waiting for a beat in progress. Idempotent; a no-op before start."""
        self.stopping.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
