"""The command line's first-minute errors: one clear line and exit status 1, never a traceback
and never a worker that starts healthy but cannot serve."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dynamo_backend_common.cli import load_engine_class
from dynamo_backend_common.worker.config import WorkerConfig


def cli(*argv: str, cwd: Path | None = None, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dynamo_backend_common.cli", *argv],
                          capture_output=True, text=True, timeout=60, cwd=cwd,
                          env={**os.environ, **(env or {})})


def test_a_class_name_that_is_not_there_says_so_and_lists_what_is(tmp_path: Path) -> None:
    f = tmp_path / "eng.py"
    f.write_text("from dynamo_backend_common.engines.echo import EchoEngine\n"
                 "class MyEngine(EchoEngine): pass\n"
                 "class Helper: pass\n"
                 "VALUE = 3\n")
    with pytest.raises(SystemExit) as missing:
        load_engine_class(f"{f}:MyEngin")
    assert str(missing.value) == f"no 'MyEngin' in '{f}'; LLMEngine subclasses defined there: " \
                                 "MyEngine"
    with pytest.raises(SystemExit) as plain:
        load_engine_class(f"{f}:Helper")
    assert str(plain.value) == f"'{f}:Helper' is a class Helper, not an LLMEngine subclass"
    with pytest.raises(SystemExit) as value:
        load_engine_class(f"{f}:VALUE")
    assert str(value.value) == f"'{f}:VALUE' is a int, not an LLMEngine subclass"
    assert load_engine_class(f"{f}:MyEngine").__name__ == "MyEngine"
    with pytest.raises(SystemExit, match="LLMEngine subclasses defined there: none"):
        load_engine_class("json:Nope")


def test_worker_with_a_missing_model_directory_fails_at_start(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    r = cli("worker", "--engine", "echo", "--model-path", str(missing),
            env={"DYN_FILE_KV": str(tmp_path / "kv")})
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert f"model_path '{missing}' is not a directory" in r.stderr
    assert not (tmp_path / "kv").exists() or not any((tmp_path / "kv").rglob("*generate*"))
    with pytest.raises(ValueError, match="is not a directory"):
        WorkerConfig(model_path=str(missing)).validate()


def test_a_bad_flag_value_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    r = cli("worker", "--engine", "echo", "--port", "99999",
            env={"DYN_FILE_KV": str(tmp_path / "kv")})
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "dynamo-backend worker: invalid WorkerConfig: port out of range: 99999")


def test_engine_shapes_that_would_fail_on_first_call_are_rejected_at_start(
        tmp_path: Path) -> None:
    f = tmp_path / "shapes.py"
    f.write_text(
        "from dynamo_backend_common import EngineConfig, LLMEngine, chunk\n"
        "class SyncStart(LLMEngine):\n"
        "    def start(self, worker_id):\n"
        "        return EngineConfig(model='m')\n"
        "    async def generate(self, request, ctx):\n"
        "        yield chunk.token(1, finish_reason='length')\n"
        "    async def cleanup(self):\n"
        "        pass\n"
        "class ReturningGenerate(LLMEngine):\n"
        "    async def start(self, worker_id):\n"
        "        return EngineConfig(model='m')\n"
        "    async def generate(self, request, ctx):\n"
        "        return [chunk.token(1, finish_reason='length')]\n"
        "    async def cleanup(self):\n"
        "        pass\n")
    r = cli("worker", "--engine", f"{f}:SyncStart", env={"DYN_FILE_KV": str(tmp_path / "kv")})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "SyncStart.start must be a coroutine: write "
        "`async def start(self, worker_id: int) -> EngineConfig:`")
    r = cli("worker", "--engine", f"{f}:ReturningGenerate",
            env={"DYN_FILE_KV": str(tmp_path / "kv")})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "ReturningGenerate.generate is an `async def` without `yield`" in r.stderr
    assert "`yield` each LLMEngineOutput chunk" in r.stderr


def test_worker_from_python_rejects_the_same_shapes() -> None:
    from dynamo_backend_common import EngineConfig, LLMEngine
    from dynamo_backend_common.worker import Worker

    class PlainCleanup(LLMEngine):
        async def start(self, worker_id: int) -> EngineConfig:
            return EngineConfig(model="m")

        def generate(self, request, ctx):  # type: ignore[no-untyped-def]
            raise AssertionError("never called")

        def cleanup(self) -> None:  # type: ignore[override]
            pass

    with pytest.raises(TypeError, match=r"PlainCleanup.cleanup must be a coroutine: write "
                                        r"`async def cleanup\(self\) -> None:`"):
        Worker(PlainCleanup())
