"""pytest plugin (auto-loaded through the ``pytest11`` entry point).

A synchronous test needs none of it, nor any pytest-asyncio configuration:
``check_engine(MyEngine)`` from :mod:`dynamo_backend_common.testing` runs the kit on its own
event loop and fails the test with every failure listed.

Fixtures:

``conformance``
    for ``async def`` tests (which need pytest-asyncio: ``asyncio_mode = auto`` or an
    ``@pytest.mark.asyncio`` marker): ``report = await conformance(MyEngine,
    **run_conformance_kwargs)`` runs the kit and fails the test with every failure listed when
    the engine does not conform.
``mock_context`` / ``cancelling_context``
    the functions of the same names in :mod:`dynamo_backend_common.testing`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from ..engine import GenerateContext
from . import conformance as _kit
from .conformance import CancellingContext, ConformanceReport, EngineFactory

ConformanceFixture = Callable[..., Awaitable[ConformanceReport]]


@pytest.fixture
def conformance() -> ConformanceFixture:
    """An async helper: run the conformance kit on a factory and assert the report is ok."""

    async def check(factory: EngineFactory, **kwargs: Any) -> ConformanceReport:
        report = await _kit.run_conformance(factory, **kwargs)
        report.raise_for_failures()
        return report

    return check


@pytest.fixture(name="mock_context")
def mock_context_fixture() -> Callable[..., GenerateContext]:
    """:func:`dynamo_backend_common.testing.mock_context`."""
    return _kit.mock_context


@pytest.fixture(name="cancelling_context")
def cancelling_context_fixture() -> Callable[..., CancellingContext]:
    """:func:`dynamo_backend_common.testing.cancelling_context`."""
    return _kit.cancelling_context
