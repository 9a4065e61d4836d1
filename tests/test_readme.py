"""The README's engine example is real code: extract it, run the conformance kit on it. The
set-up commands are checked here too; the client snippets run against a real server in
``tests/integration/test_frontend_server.py``."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

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


def engine_block() -> str:
    """The README's engine example (what a user saves as ``my_engine.py``)."""
    (block,) = [b for b in _python_blocks() if "class CountdownEngine(LLMEngine)" in b]
    return block


def check_block() -> str:
    """The README's pytest test of that engine (``test_my_engine.py``)."""
    (block,) = [b for b in _python_blocks() if "def test_my_engine_conforms" in b]
    return block


def test_readme_has_engine_and_check_examples() -> None:
    assert "class CountdownEngine(LLMEngine)" in engine_block()
    assert "check_engine(CountdownEngine)" in check_block()
    assert "from my_engine import CountdownEngine" in check_block()


def test_readme_engine_passes_conformance_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    # As my_engine.py plus test_my_engine.py; tests/test_kit_outside.py runs the same two files
    # with pytest in a fresh project.
    my_engine = types.ModuleType("my_engine")
    exec(compile(engine_block(), str(README), "exec"), my_engine.__dict__)
    monkeypatch.setitem(sys.modules, "my_engine", my_engine)
    namespace: dict[str, object] = {}
    exec(compile(check_block(), str(README), "exec"), namespace)
    check = namespace["test_my_engine_conforms"]
    assert callable(check)
    check()  # a plain function: it runs the kit itself


async def test_readme_engine_streams_reversed_prompt() -> None:
    from dynamo_backend_common import PreprocessedRequest, StopConditions
    from dynamo_backend_common.testing import mock_context

    namespace: dict[str, object] = {}
    exec(compile(engine_block(), str(README), "exec"), namespace)
    engine_class = namespace["CountdownEngine"]
    assert isinstance(engine_class, type)
    engine = engine_class()
    await engine.start(1)
    req = PreprocessedRequest(token_ids=[1, 2, 3], stop_conditions=StopConditions(max_tokens=8))
    outs = [o async for o in engine.generate(req, mock_context())]
    assert [t for o in outs for t in o.token_ids] == [3, 2, 1]
    assert outs[-1].finish_reason is not None and outs[-1].completion_usage is not None
    assert outs[-1].completion_usage.total_tokens == 6
    await engine.cleanup()


def test_readme_set_up_is_two_commands_install_and_serve_then_test() -> None:
    cmds = [b.strip() for b in blocks("bash", "Set-up") if not b.lstrip().startswith("curl")]
    assert cmds[:2] == ["pip install -e '.[dev]' && dynamo-backend run --engine echo --workers 2",
                        "python -m pytest"]


def test_readme_set_up_installs_a_cpu_torch_before_the_examples_extra() -> None:
    # A plain `pip install -e '.[examples]'` would resolve torch from PyPI: a multi-GB CUDA build.
    (cmd,) = [b.strip() for b in blocks("bash", "Set-up") if "[examples]" in b]
    torch_at = cmd.index("pip install torch --index-url https://download.pytorch.org/whl/cpu")
    assert torch_at < cmd.index("pip install -e '.[examples]'")
    assert "pip install torch==2.13.0" in section("Set-up")  # the CI machine's local CPU build


def tiny_model_commands() -> tuple[str, str]:
    """The Set-up's two commands that make a tiny model and serve it (one line each)."""
    (block,) = [b for b in blocks("bash", "Set-up") if "make_tiny_model.py" in b]
    make, serve = block.strip().splitlines()
    return make, serve


def test_readme_tiny_model_commands_name_the_same_directory() -> None:
    make, serve = tiny_model_commands()
    dest = make.split()[-1]
    assert make == f"python scripts/make_tiny_model.py {dest}"
    assert serve == ("dynamo-backend run --engine examples/transformers_engine.py:"
                     f"TransformersEngine --model {dest}")
