"""The README's snippets run as written, in a temporary copy of the project.

Blocks preceded by ``<!-- runnable ... -->`` are run in order: bash blocks line by line with
``&&``-chained installation steps (venv, activate, pip install) left out (this environment
is installed already), python blocks with this interpreter. The quickstart runs in
Prefect's ephemeral mode, as a new user's first run does.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli_env

pytestmark = pytest.mark.slow
INSTALL = re.compile(r"^(python -m venv|\. \.venv/bin/activate|pip install|uv pip install)")


def runnable_blocks(readme: str) -> list[tuple[str, str]]:
    """(language, code) of every block marked runnable, in order."""
    pattern = re.compile(r"<!-- runnable[^>]*-->\n```(\w+)\n(.*?)```", re.S)
    return [(m.group(1), m.group(2)) for m in pattern.finditer(readme)]


def commands(bash: str) -> list[str]:
    steps = []
    for line in bash.splitlines():
        kept = [p.strip() for p in line.split("&&") if p.strip() and not INSTALL.match(p.strip())]
        if kept:
            steps.append(" && ".join(kept))
    return steps


def test_blocks_are_found() -> None:
    blocks = runnable_blocks((ROOT / "README.md").read_text())
    assert [lang for lang, _ in blocks] == ["bash", "python"]
    assert commands(blocks[0][1]) == ["shardeval run examples/quickstart.yaml"]


def test_readme_snippets_run_as_written(tmp_path: Path) -> None:
    project = tmp_path / "shardeval"
    shutil.copytree(ROOT / "examples", project / "examples")
    env = cli_env()
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    for language, code in runnable_blocks((ROOT / "README.md").read_text()):
        if language == "bash":
            for step in commands(code):
                result = subprocess.run(
                    ["bash", "-c", step],
                    cwd=project,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                assert result.returncode == 0, f"{step}\n{result.stderr}"
        else:
            result = subprocess.run(
                [sys.executable, "-c", code],
                cwd=project,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert result.returncode == 0, f"{code}\n{result.stderr}"
