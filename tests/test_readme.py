"""The README's engine example is real code: extract it, run the conformance kit on it. The
set-up commands are checked here too; the client snippets run against a real server in
``tests/integration/test_frontend_server.py``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parent.parent / "README.md"


def section(title: str) -> str:
    """The README text under ``## title`` (up to the next ``## `` heading)."""
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start: end if end >= 0 else len(text)]


def blocks(lang: str, title: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section(title), flags=re.S)


def _python_blocks() -> list[str]:
    # The engine example and its check; the set-up's client snippet needs a running server
    # (tests/integration/test_frontend_server.py runs it).
    return blocks("python", "Write an engine")


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


def test_readme_set_up_is_two_commands_install_and_serve_then_test() -> None:
    cmds = [b.strip() for b in blocks("bash", "Set-up") if not b.lstrip().startswith("curl")]
    assert cmds == ["pip install -e '.[dev]' && dynamo-backend run --engine echo --workers 2",
                    "python -m pytest"]
