"""The worker's shutdown vocabulary and its stage runner.

A shutdown runs these :class:`Stage` s in order, each once, under one budget (see
:mod:`.lifecycle`): unregister from discovery, the router grace period, stop admitting
requests, wait for the in-flight ones, let the engine drain its KV transfers, clean up. Each
ends with an :class:`Outcome`, logged and recorded as
``dynamo_component_shutdown_stage_seconds{stage,reason}``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from collections.abc import Awaitable
from typing import Any

log = logging.getLogger("dynamo_backend_common.worker")

__all__ = ["Outcome", "Stage", "run_stage"]


class Stage(enum.StrEnum):
    """The shutdown stages, in the order they run (lifecycle reference 4.11.6)."""

    UNREGISTER = "unregister"
    ROUTER_GRACE = "router_grace"
    STOP_ADMISSION = "stop_admission"
    INFLIGHT = "inflight"
    KV_TRANSFER = "kv_transfer"
    CLEANUP = "cleanup"


class Outcome(enum.StrEnum):
    """How a stage ended (the ``reason`` label)."""

    COMPLETED = "completed"
    TIMED_OUT = "timed_out"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"
    UNSUPPORTED = "unsupported"


async def run_stage(stage: Stage, aw: Awaitable[Any], timeout: float | None, *,
                    zero_ok: bool = False) -> tuple[Outcome, float]:
    """Run one stage's work for at most ``timeout`` seconds (``None`` or inf: no bound; 0:
    only what is already done, unless ``zero_ok``, which lets a zero budget still wait
    unbounded for work that must finish). Returns its outcome and how long it took: work past
    its budget is cancelled (``timed_out``), work that raised is logged (``skipped``)."""
    t = time.perf_counter()
    task = asyncio.ensure_future(aw)
    if timeout is not None and timeout <= 0 and not zero_ok:
        timeout = 0.0
    wait_for = None if timeout is None or math.isinf(timeout) else max(0.0, timeout)
    done, _ = await asyncio.wait([task], timeout=wait_for)
    if not done:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        outcome = Outcome.TIMED_OUT
    elif task.exception() is not None:
        log.warning("shutdown stage %s failed: %s", stage, task.exception())
        outcome = Outcome.SKIPPED
    else:
        outcome = Outcome.COMPLETED
    return outcome, time.perf_counter() - t
