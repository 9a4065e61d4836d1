"""Child processes a process owns (the workers of ``dynamo-backend run``, the extra frontend
processes of ``--processes``): started so they die with their parent, stopped with a deadline.

:class:`ChildProcess` holds the asyncio subprocess and the task reading its output; subclasses
start it (:func:`pdeathsig_hook` as ``preexec_fn``), read their output their own way and say
what a stop had to do through :meth:`ChildProcess.report`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import signal
import sys
from collections.abc import Callable

__all__ = ["ChildProcess", "pdeathsig_hook"]


@functools.cache
def pdeathsig_hook() -> Callable[[], object] | None:
    """Linux: a ``preexec_fn`` making the child get SIGTERM if this process dies without
    stopping it. libc is loaded here, in the parent: the child (forked from a process that may
    have threads) only makes the one prctl call, no dlopen or imports. ``None`` elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return functools.partial(prctl, 1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


class ChildProcess:
    """A child process: ``proc`` once started, ``_reader`` the task reading its output."""

    proc: asyncio.subprocess.Process | None = None
    _reader: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return "child process"

    def report(self, message: str) -> None:
        """Say what happened to the child (a stop that had to kill it)."""

    async def wait(self) -> int:
        """The exit code, once the child exited and its output was read to the end."""
        assert self.proc is not None
        code = await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader  # EOF follows exit: the last lines are in
        return code

    def signal(self, sig: int) -> None:
        """Send ``sig`` unless the child already exited."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def stop(self, timeout: float) -> int:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Returns the exit code."""
        self.signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.wait(), timeout)
        except TimeoutError:
            self.report(f"{self.name} did not stop within {timeout:g}s; killing it")
            self.signal(signal.SIGKILL)
            return await self.wait()
