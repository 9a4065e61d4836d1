"""Engine-facing metrics surface: bridge a vendor Prometheus registry into ``/metrics``."""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


class EngineMetrics:
    """Collects text-exposition callbacks whose output is appended to the worker's ``/metrics``.

    Each callback returns Prometheus text format (e.g. ``prometheus_client.generate_latest(reg)``
    decoded). A callback that raises is logged and skipped for that scrape; it never breaks
    ``/metrics``.
    """

    def __init__(self) -> None:
        self._callbacks: list[Callable[[], str | bytes]] = []

    def add_expfmt_callback(self, callback: Callable[[], str | bytes]) -> None:
        self._callbacks.append(callback)

    def render(self) -> str:
        parts: list[str] = []
        for cb in self._callbacks:
            try:
                text = cb()
            except Exception:
                log.exception("engine metrics callback failed; skipped for this scrape")
                continue
            if isinstance(text, bytes):
                text = text.decode()
            if text and not text.endswith("\n"):
                text += "\n"
            parts.append(text)
        return "".join(parts)
