"""The Python API end to end, in one process as a notebook uses it (real Prefect, real server)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import shardeval
from shardeval.testing.server import TestServer
from tests.conftest import ROOT, cli_env
from tests.helpers.specs import write_spec

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def send_logs_while_the_server_is_up() -> Iterator[None]:
    """Flows run in this process leave their logs with Prefect's API log worker: send them
    after each test, while the session's server still answers (at exit it would not)."""
    yield
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=5)


def test_running_the_same_cell_twice_pays_once(
    tmp_path: Path, llm_server: TestServer, prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    spec = write_spec(tmp_path, base_url=llm_server.url, n_items=12, batch_size=5)
    first = shardeval.run(str(spec), output=str(tmp_path / "out"))
    assert first.metrics is not None and first.metrics["n_ok"] == 12
    assert llm_server.stats()["requests"] == 12
    second = shardeval.run(str(spec), output=str(tmp_path / "out"))
    assert second.id == first.id
    assert llm_server.stats()["requests"] == 12
    assert len(second.results()) == 12


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_the_notebook_in_docs_python_md_runs_as_written(tmp_path: Path, prefect_api: str) -> None:
    (tmp_path / "examples").mkdir()
    for name in ("quickstart.yaml", "arith.jsonl"):
        (tmp_path / "examples" / name).write_bytes((ROOT / "examples" / name).read_bytes())
    code = "\n".join(python_blocks((ROOT / "docs" / "python.md").read_text()))
    assert "shardeval.run(" in code
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=cli_env(prefect_api),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "complete" in result.stdout


def test_calling_the_flow_directly_resumes_like_the_cli(
    tmp_path: Path, llm_server: TestServer, prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a deployment run gets a new run per flow run; a direct call keeps the CLI's id."""
    from flows.evaluate import evaluate

    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    spec = write_spec(tmp_path, base_url=llm_server.url, n_items=6, batch_size=3)
    first = evaluate(spec=str(spec), output=str(tmp_path / "out"))
    second = evaluate(spec=str(spec), output=str(tmp_path / "out"))
    assert first["run_id"] == second["run_id"]
    assert llm_server.stats()["requests"] == 6


def test_a_copied_project_resumes_the_same_run_on_a_shared_output(
    tmp_path: Path, llm_server: TestServer, prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run id hashes the dataset path relative to the spec: a re-clone elsewhere (or a
    second worker) writing to the same output resumes the run instead of paying again."""
    import shutil

    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    shared = str(tmp_path / "shared-output")
    first_clone = tmp_path / "clone-a"
    spec = write_spec(first_clone, base_url=llm_server.url, n_items=10, output=shared)
    first = shardeval.run(str(spec), limit=6)  # stopped part-way, as a crash would
    assert llm_server.stats()["requests"] == 6
    second_clone = tmp_path / "elsewhere" / "clone-b"
    shutil.copytree(first_clone, second_clone)
    second = shardeval.run(str(second_clone / spec.name))
    assert second.id == first.id
    assert llm_server.stats()["requests"] == 10  # only the 4 items the first clone had not sent
    assert second.metrics is not None and second.metrics["n_ok"] == 10
