"""Non-terminal chunk constructors. Terminal chunks come from ``LLMEngineOutput.stop()``,
``.length()``, ``.cancelled()`` and ``.error(msg)``.
"""

from __future__ import annotations

from collections.abc import Iterable

from .protocols.common import LLMEngineOutput


def token(id: int) -> LLMEngineOutput:
    """Non-terminal chunk carrying a single token."""
    return LLMEngineOutput(token_ids=[id])


def tokens(ids: Iterable[int]) -> LLMEngineOutput:
    """Non-terminal chunk carrying several tokens."""
    return LLMEngineOutput(token_ids=list(ids))
