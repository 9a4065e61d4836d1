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
    assert str(missing.value) == (f"class 'MyEngin' not found in '{f}'; LLMEngine subclasses "
                                  "defined there: MyEngine")
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


def test_an_engine_file_imports_its_neighbours(tmp_path: Path) -> None:
    """``--engine mypkg_dir/engine.py:E`` where engine.py does ``from helper import ...``."""
    pkg = tmp_path / "mypkg_dir"
    pkg.mkdir()
    (pkg / "helper.py").write_text("from dynamo_backend_common.engines.echo import EchoEngine\n"
                                   "MODEL = 'from-helper'\n")
    (pkg / "engine.py").write_text(
        "from helper import MODEL, EchoEngine\n"
        "class E(EchoEngine):\n"
        "    def __init__(self, **kw):\n"
        "        super().__init__(**{'model_name': MODEL, **kw})\n")
    r = cli("conformance", "--engine", "mypkg_dir/engine.py:E", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No module named 'helper'" not in r.stderr


@pytest.mark.parametrize(("argv", "typo", "meant"), [
    (["run", "--engine", "echo", "--served-model-nam", "x"], "--served-model-nam",
     "--served-model-name"),
    (["run", "--engine", "echo", "--work", "2"], "--work", "--workers"),
    (["worker", "--engine", "echo", "--model-pat", "/m", "--", "--delay-ms", "1"],
     "--model-pat", "--model-path"),
    (["conformance", "--engine", "echo", "--delay-ms", "1"], "--delay-ms", None),
])
def test_unknown_flags_before_the_double_dash_are_an_error_not_engine_flags(
        argv: list[str], typo: str, meant: str | None, tmp_path: Path) -> None:
    r = cli(*argv, env={"DYN_FILE_KV": str(tmp_path / "kv")})
    assert r.returncode == 2, r.stdout + r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"dynamo-backend {argv[0]}: error: unrecognized arguments: {typo}")
    if meant:
        assert f"{typo}: did you mean {meant}?" in last
    assert f"engine flags go after --: dynamo-backend {argv[0]} --engine SPEC" in last
    assert "Traceback" not in r.stderr and not (tmp_path / "kv").exists()


def test_engine_flags_after_the_double_dash_still_reach_the_engine() -> None:
    r = cli("conformance", "--engine", "echo", "--", "--no-such-echo-flag")
    assert r.returncode == 2
    assert "echo_engine: error: unrecognized arguments: --no-such-echo-flag" in r.stderr


def test_worker_and_run_help_state_one_served_model_name_rule() -> None:
    """Both --help texts give the same default, and it is the rule docs/worker.md states."""
    import re

    helps = {}
    for command in ("worker", "run"):
        text = cli(command, "--help").stdout
        m = re.search(r"--served-model-name SERVED_MODEL_NAME\n(.*?)\n  -", text, re.S)
        assert m is not None, text
        helps[command] = " ".join(m.group(1).split())
    assert helps["worker"] == helps["run"]
    rule = helps["run"]
    for part in ("[DYN_SERVED_MODEL_NAME]",
                 "Default under run: the model directory's name (config.json's _name_or_path, "
                 "else the folder name)",
                 "Default under worker: the engine's EngineConfig.served_model_name, else "
                 "EngineConfig.model"):
        assert part in rule
    doc = (Path(__file__).resolve().parents[1] / "docs" / "worker.md").read_text()
    assert "## Served model name" in doc


# -- conformance: bounds and progress -----------------------------------------------------------
BROKEN = "tests/broken_engines.py"


def test_conformance_prints_each_check_as_it_runs_and_the_report_at_the_end() -> None:
    from dynamo_backend_common.testing import CHECKS

    r = cli("conformance", "--engine", "echo")
    assert r.returncode == 0, r.stdout + r.stderr
    progress = [line.split() for line in r.stderr.splitlines() if line.startswith("  ")]
    assert [p[0] for p in progress] == list(CHECKS)
    assert all(p[2] == "ok" and p[3].endswith("s") for p in progress), r.stderr
    assert r.stdout.startswith("conformance: 10 passed, 0 failed, 0 skipped")


def test_conformance_start_timeout_is_its_own_bound() -> None:
    slow = f"{BROKEN}:SlowStartEngine"
    r = cli("conformance", "--engine", slow, "--start-timeout", "0.2", "--",
            "--start-seconds", "1.5")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "StartFailed: start() did not return within 0.2s" in r.stdout
    assert "start_config ........... FAIL" in r.stderr
    r = cli("conformance", "--engine", slow, "--timeout", "1", "--start-timeout", "30", "--",
            "--start-seconds", "1.5")
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli("conformance", "--engine", "echo", "--start-timeout", "0")
    assert r.returncode == 2 and "--start-timeout must be a positive number" in r.stderr


def test_conformance_shows_the_check_a_hanging_engine_hangs_in_while_it_hangs() -> None:
    import selectors
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "dynamo_backend_common.cli", "conformance",
         "--engine", f"{BROKEN}:HangingEngine", "--timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        seen = b""
        deadline = time.monotonic() + 30  # interpreter start-up; the hang itself is 60 s
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stderr, selectors.EVENT_READ)
            while b"single_generate" not in seen and time.monotonic() < deadline:
                if sel.select(timeout=max(0.0, deadline - time.monotonic())):
                    data = os.read(proc.stderr.fileno(), 65536)
                    if not data:
                        break
                    seen += data
        text = seen.decode()
        assert "start_config ........... ok" in text, text
        assert text.rstrip().endswith("single_generate ........"), text
        assert proc.poll() is None  # still hanging in single_generate, and the user can see it
    finally:
        proc.kill()
        proc.wait()
