"""Running the library's top-level coroutines: on uvloop when it is installed."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["run_coroutine"]


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
