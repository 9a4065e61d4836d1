"""The README's pytest check works in a user's own project, not only in this repository.

The README's engine (``my_engine.py``) and its test (``test_my_engine.py``), both extracted
from README.md, go into a fresh directory outside the repository with its own empty pytest
config (so this repo's ``asyncio_mode = auto`` does not apply), and ``python -m pytest`` runs
there with this environment's Python, where the package is installed and its pytest plugin is
loaded through the ``pytest11`` entry point.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.test_readme import check_block, engine_block

REPO = Path(__file__).resolve().parent.parent


def user_project(root: Path, engine_source: str) -> Path:
    root.mkdir()
    assert not root.resolve().is_relative_to(REPO), "the project must be outside the repo"
    (root / "pytest.ini").write_text("[pytest]\n")
    (root / "my_engine.py").write_text(engine_source)
    (root / "test_my_engine.py").write_text(check_block())
    return root


def run_pytest(project: Path) -> subprocess.CompletedProcess[str]:
    # A user's shell: none of this test run's pytest or import-path settings.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PYTEST") and k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-m", "pytest"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=120)


def test_readme_check_passes_in_a_fresh_project(tmp_path: Path) -> None:
    project = user_project(tmp_path / "project", engine_block())
    r = run_pytest(project)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "configfile: pytest.ini" in out  # its own config, not this repo's pyproject.toml
    assert "1 passed" in out


def test_readme_check_fails_a_broken_engine_in_a_fresh_project(tmp_path: Path) -> None:
    good = engine_block()
    broken = good.replace('EngineConfig(model="countdown"', 'EngineConfig(model=""')
    assert broken != good
    r = run_pytest(user_project(tmp_path / "project", broken))
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "1 failed" in out
    assert "EmptyModelInConfig" in out  # the failure says which rule broke
