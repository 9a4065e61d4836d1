"""Testing helpers for engine authors: the conformance kit and mock contexts.

``from dynamo_backend_common.testing import run_conformance`` and
``report = await run_conformance(MyEngine)``; with pytest, the ``conformance`` fixture (this
package's pytest plugin, loaded automatically) does the same and fails the test on any failure.
"""

from .conformance import (
    CHECKS,
    CancellingContext,
    ConformanceFailure,
    ConformanceReport,
    cancelling_context,
    default_request,
    mock_context,
    run_conformance,
)

__all__ = [
    "CHECKS",
    "CancellingContext",
    "ConformanceFailure",
    "ConformanceReport",
    "cancelling_context",
    "default_request",
    "mock_context",
    "run_conformance",
]
