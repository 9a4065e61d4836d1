"""The echo engine, as an example to copy.

Its source lives in the package (``dynamo_backend_common/echo.py``) so that
``dynamo-backend worker --engine echo`` works from any directory; this file re-exports it so that
``--engine examples/echo_engine.py:EchoEngine`` works too. Copy that module as the skeleton of a
new engine.
"""

from dynamo_backend_common.engines.echo import EchoEngine

__all__ = ["EchoEngine"]
