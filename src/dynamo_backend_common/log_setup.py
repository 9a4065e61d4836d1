"""Process logging set-up for the CLI and :func:`run` (``DYN_LOG`` sets the level)."""

from __future__ import annotations

import logging
import os
import sys


def configure_logging(level: str | None = None) -> None:
    """Configure the root logger once: ``DYN_LOG`` (debug|info|warning|error), default info."""
    name = (level or os.environ.get("DYN_LOG") or "info").strip().upper()
    lvl = getattr(logging, name, None)
    if not isinstance(lvl, int):
        lvl = logging.INFO
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
        )
        root.addHandler(handler)
    root.setLevel(lvl)
