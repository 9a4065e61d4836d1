"""Task ownership: every background task has an owner that cancels and awaits it on close.

:class:`TaskSet` is the owner's set (a small, long-lived ``TaskGroup`` that does not cancel its
siblings when one fails): :meth:`~TaskSet.spawn` starts a task, a finished task leaves the set
by itself, and :meth:`~TaskSet.cancel_all` cancels what is left and waits for it.
:func:`cancel_and_wait` is the same ending for a handful of tasks held some other way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["TaskSet", "cancel_and_wait"]

T = TypeVar("T")


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel every task in ``tasks`` and wait until all have ended. Their results and
    exceptions (``CancelledError`` included) are dropped: the caller is shutting them down.
    A cancellation of the caller itself still propagates once they have ended."""
    owned = list(tasks)
    for t in owned:
        if not t.done():
            t.cancel()
    if owned:
        # Gathering the finished ones too retrieves their exceptions (no "never retrieved").
        await asyncio.gather(*owned, return_exceptions=True)


class TaskSet:
    """The background tasks of one owner. Not thread-safe: use it from its loop."""

    __slots__ = ("_tasks",)

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str | None = None) -> asyncio.Task[T]:
        """Start ``coro`` as a task owned by this set (it leaves the set when it ends)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.add(task)
        return task

    def add(self, task: asyncio.Task[T]) -> asyncio.Task[T]:
        """Own a task created elsewhere."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._tasks))

    async def cancel_all(self) -> None:
        """Cancel every task still running and wait for them all (see :func:`cancel_and_wait`).
        Idempotent; the set can be used again afterwards."""
        tasks = list(self._tasks)
        self._tasks.clear()
        await cancel_and_wait(tasks)
