"""Event-loop helpers: running the library's top-level coroutines (on uvloop when it is
installed), and handing a callback to a loop from any thread (:func:`call_on_loop`)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["call_on_loop", "run_coroutine"]


def call_on_loop(loop: asyncio.AbstractEventLoop | None, fn: Callable[[], None], *,
                 loop_thread: int | None = None) -> bool:
    """Run ``fn`` on ``loop``: at once when called on the loop's own thread (``loop_thread``,
    a ``threading.get_ident()``; or when there is no loop yet), else scheduled with
    ``call_soon_threadsafe``. Returns ``False`` when the loop is closed and ``fn`` will never
    run (shutdown: nobody is left to observe it), else ``True``."""
    if loop is None or (loop_thread is not None and loop_thread == threading.get_ident()):
        fn()
        return True
    try:
        loop.call_soon_threadsafe(fn)
    except RuntimeError:  # the loop is closed
        return False
    return True


def run_coroutine(coro: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    """Run ``coro`` to completion in a new event loop (uvloop's unless ``use_uvloop`` is false
    or uvloop is not installed) and return its result."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on Unix
            pass
        else:
            return uvloop.run(coro)
    return asyncio.run(coro)
