"""The README's engine example is real code: extract it, run the conformance kit on it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_engine_and_check_examples() -> None:
    blocks = _python_blocks()
    assert any("class CountdownEngine(LLMEngine)" in b for b in blocks)
    assert any("run_conformance" in b for b in blocks)


async def test_readme_engine_passes_conformance_as_written() -> None:
    namespace: dict[str, Any] = {}
    for block in _python_blocks():
        exec(compile(block, str(README), "exec"), namespace)
    check = namespace["test_my_engine_conforms"]
    await check()


async def test_readme_engine_streams_reversed_prompt() -> None:
    from dynamo_backend_common import PreprocessedRequest, StopConditions
    from dynamo_backend_common.testing import mock_context

    namespace: dict[str, Any] = {}
    exec(compile(_python_blocks()[0], str(README), "exec"), namespace)
    engine = namespace["CountdownEngine"]()
    await engine.start(1)
    req = PreprocessedRequest(token_ids=[1, 2, 3], stop_conditions=StopConditions(max_tokens=8))
    outs = [o async for o in engine.generate(req, mock_context())]
    assert [t for o in outs for t in o.token_ids] == [3, 2, 1]
    assert outs[-1].finish_reason is not None and outs[-1].completion_usage is not None
    assert outs[-1].completion_usage.total_tokens == 6
    await engine.cleanup()
