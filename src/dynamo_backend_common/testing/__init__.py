"""Testing helpers for engine authors: the conformance kit and mock contexts.

In a plain (synchronous) pytest test, with no pytest-asyncio configuration::

    from dynamo_backend_common.testing import check_engine

    def test_my_engine_conforms():
        check_engine(MyEngine)  # AssertionError listing every failure if it does not conform

In async code, ``report = await run_conformance(MyEngine)``; with pytest-asyncio, the
``conformance`` fixture (this package's pytest plugin, loaded automatically) awaits it and fails
the test on any failure.
"""

from .conformance import (
    CHECKS,
    CancellingContext,
    CheckProgress,
    ConformanceFailure,
    ConformanceReport,
    ProgressCallback,
    cancelling_context,
    check_engine,
    default_request,
    mock_context,
    run_conformance,
)

__all__ = [
    "CHECKS",
    "CancellingContext",
    "CheckProgress",
    "ConformanceFailure",
    "ConformanceReport",
    "ProgressCallback",
    "cancelling_context",
    "check_engine",
    "default_request",
    "mock_context",
    "run_conformance",
]
