"""Garbage-collector settings for a serving process: :func:`tune_for_serving`.

A frontend or worker under load allocates and frees many small objects per token (chunks,
deltas, futures, ASGI messages). Almost none of them form reference cycles, so reference
counting frees them; the cyclic collector still runs whenever the tracked objects grow by its
first threshold (700) between collections, which the in-flight requests' state does all the
time, and every few hundred collections a full one walks the whole heap (the imported
modules, the loaded model files, every live request). Measured on a frontend at 64 streams:
about 9% of its CPU in the collector (a full collection of the startup heap ~23 ms), almost
none of it finding garbage.

:func:`tune_for_serving` (called by the servers when they start: the frontend's
:class:`~dynamo_backend_common.frontend.http.HttpServer`, the request plane's
:class:`~dynamo_backend_common.runtime.transport.server.RequestPlaneServer`) raises the first
threshold to :data:`GEN0_THRESHOLD` (the other two stay), so the collector, full collections
included, runs about 30x less often. Cycles are still collected, a little later (a few MB of
garbage at most), and ``gc.collect()`` works as always. ``DYN_GC_TUNING=0`` leaves the
collector as it is.
"""

from __future__ import annotations

import gc
import os
from typing import Final

__all__ = ["GEN0_THRESHOLD", "tune_for_serving"]

#: The first-generation threshold while serving (Python's default is 700).
GEN0_THRESHOLD: Final = 20_000

_tuned = False


def tune_for_serving() -> bool:
    """Raise the first collector threshold to :data:`GEN0_THRESHOLD` (see the module
    docstring). Once per process (later calls do nothing), only if the threshold is below it
    (a collector that is off, or someone's larger choice, stays) and ``DYN_GC_TUNING`` is not
    ``0``; returns whether it changed anything."""
    global _tuned
    if _tuned or os.environ.get("DYN_GC_TUNING", "1").strip().lower() in ("0", "false", "no",
                                                                          "off"):
        return False
    _tuned = True
    gen0, gen1, gen2 = gc.get_threshold()
    if gen0 == 0 or gen0 >= GEN0_THRESHOLD:  # disabled, or someone chose a larger one
        return False
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
    return True
