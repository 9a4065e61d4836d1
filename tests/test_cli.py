"""The command line's first-minute errors: one clear line and exit status 1, never a traceback
and never a worker that starts healthy but cannot serve."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dynamo_backend_common.cli import load_engine_class
from dynamo_backend_common.config import WorkerConfig


def cli(*argv: str, cwd: Path | None = None, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dynamo_backend_common.cli", *argv],
                          capture_output=True, text=True, timeout=60, cwd=cwd,
                          env={**os.environ, **(env or {})})


def test_a_class_name_that_is_not_there_says_so_and_lists_what_is(tmp_path: Path) -> None:
    f = tmp_path / "eng.py"
    f.write_text("from dynamo_backend_common.echo import EchoEngine\n"
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
