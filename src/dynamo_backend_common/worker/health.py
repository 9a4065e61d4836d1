"""The worker's health: the readiness verdict of ``/health`` and the canary behind it.

The canary is a real request (the engine's ``health_check_payload``, marked with
``HEALTH_CHECK_KEY``) sent through the same adapter as client requests every
``health_check_interval_secs``; the worker is ready once one passed, and not ready while the
last one failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..engine import HEALTH_CHECK_KEY
from ..errors import BackendError, DynamoError
from ..protocols.codec import convert
from ..protocols.common import PreprocessedRequest
from ..runtime.context import Context
from .adapter import EngineAdapter

log = logging.getLogger("dynamo_backend_common.worker")

__all__ = ["canary_loop", "health_verdict", "run_canary"]


def health_verdict(*, ready: bool, shutdown_reason: str | None, worker_id: int | None,
                   health: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """``/health``'s answer: ``(ok, details)``. ``ok`` when the worker registered, is not
    shutting down (``shutdown_reason`` is ``None``) and, with a canary, the last one passed."""
    details = dict(health)
    details["worker_id"] = f"{worker_id:x}" if worker_id is not None else None
    if shutdown_reason is not None:
        details["shutdown"] = shutdown_reason
    # With a canary, readiness is the canary's verdict: not ready until one passed.
    ok = ready and shutdown_reason is None and details.get("canary") in ("ok", "disabled")
    return ok, details


async def run_canary(adapter: EngineAdapter, payload: dict[str, Any],
                     timeout: float) -> dict[str, Any] | None:
    """Send one canary through ``adapter``; the health details it earned (``canary``:
    ``ok`` / ``failed`` with the reason), or ``None`` when the engine is shutting down (no
    verdict)."""
    body = dict(payload)
    body[HEALTH_CHECK_KEY] = True
    started = time.perf_counter()
    try:
        request = convert(body, PreprocessedRequest)

        async def consume() -> int:
            n = 0
            # Closed here, not left to garbage collection: the request must leave the tracker
            # and the metrics when the canary ends.
            async with contextlib.aclosing(adapter.generate(request, Context(), {})) as stream:
                async for out in stream:
                    n += 1
                    if out.finish_reason is not None:
                        break
            return n

        chunks = await asyncio.wait_for(consume(), timeout)
        return {"canary": "ok", "canary_chunks": chunks,
                "canary_ms": round((time.perf_counter() - started) * 1e3, 3)}
    except TimeoutError:
        log.warning("health canary failed: no terminal chunk within %ss", timeout)
        return {"canary": "failed", "canary_error": f"no terminal chunk within {timeout}s"}
    except DynamoError as exc:
        if exc.kind is BackendError.EngineShutdown:
            return None
        log.warning("health canary failed: %s", exc)
        return {"canary": "failed", "canary_error": str(exc)}
    except Exception as exc:
        log.warning("health canary failed: %s", exc)
        return {"canary": "failed", "canary_error": f"{type(exc).__name__}: {exc}"}


async def canary_loop(run_once: Callable[[], Awaitable[None]], shutdown: asyncio.Event,
                      interval: float) -> None:
    """``run_once`` every ``interval`` seconds until ``shutdown`` is set."""
    while not shutdown.is_set():
        await run_once()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(shutdown.wait(), interval)
