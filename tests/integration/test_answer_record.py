"""A complete run's rerun answers from its record, and every change falls through to the exact path.

Real CLI subprocesses against the real test server, counting the requests it receives. Which
path answered is told by what the command imported (``PYTHONPROFILEIMPORTTIME``): the record
answers without pyarrow, the exact path reads the dataset with it.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from shardeval.answer_record import RACY_S
from shardeval.testing.server import TestServer
from tests.conftest import ROOT
from tests.helpers.specs import arith_items, write_jsonl, write_spec

RunCli = Callable[..., subprocess.CompletedProcess[str]]

pytestmark = pytest.mark.slow

METRIC_MODULE = """
def score(response, item):
    return {version}
"""


def settle(*paths: Path) -> None:
    """Wait until the files are older than the racy window (a record may then vouch for them)."""
    newest = max(max(p.stat().st_mtime, p.stat().st_ctime) for p in paths)
    time.sleep(max(0.0, newest + RACY_S + 0.1 - time.time()))


def rerun(run_cli: RunCli, spec: Path, *args: str, **env: str) -> tuple[str, bool]:
    """Run the spec again; return its stdout and whether the exact path (pyarrow) answered."""
    result = run_cli("run", str(spec), *args, PYTHONPROFILEIMPORTTIME="1", **env)
    assert result.returncode == 0, result.stderr[-3000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    return result.stdout, "pyarrow" in imported


def complete_with_record(run_cli: RunCli, spec: Path, *files: Path, **env: str) -> None:
    """First run, then (files settled) the exact path writes the record, then the record answers."""
    assert run_cli("run", str(spec), **env).returncode == 0
    settle(*files)
    _, exact = rerun(run_cli, spec, **env)
    assert exact
    out, exact = rerun(run_cli, spec, **env)
    assert not exact, "the record did not answer an unchanged rerun"
    assert "no model call was made" in out


def completed(
    tmp_path: Path, server: TestServer, run_cli: RunCli, items: list[dict[str, Any]], **spec: Any
) -> Path:
    """A spec over ``items`` whose run is complete and answered from its record."""
    env, files = spec.pop("env", {}), spec.pop("files", [])
    path = write_spec(tmp_path, base_url=server.url, items=items, **spec)
    complete_with_record(run_cli, path, tmp_path / "items.jsonl", *files, **env)
    return path


def test_unchanged_rerun_answers_from_the_record_with_the_same_output(
    tmp_path: Path, llm_server: TestServer, run_cli: RunCli
) -> None:
    spec = completed(tmp_path, llm_server, run_cli, arith_items(30))
    assert llm_server.stats()["requests"] == 30
    exact_out = run_cli("run", str(spec), "--limit", "30").stdout  # another key: exact path
    record_out, exact = rerun(run_cli, spec)
    assert not exact
    assert llm_server.stats()["requests"] == 30

    def without_wall_time(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.startswith("wall time")]

    assert without_wall_time(record_out) == without_wall_time(exact_out)
    assert "exact_match" in record_out


@pytest.mark.parametrize("restore_mtime", [False, True], ids=["edited", "mtime-set-back"])
def test_same_size_dataset_edit_falls_through(
    tmp_path: Path, llm_server: TestServer, run_cli: RunCli, restore_mtime: bool
) -> None:
    """Same size, other bytes; set back to the old mtime too, the ctime still moves."""
    items = arith_items(30)
    spec = completed(tmp_path, llm_server, run_cli, items)
    dataset = tmp_path / "items.jsonl"
    before = dataset.stat()
    items[7]["a"], items[7]["b"] = items[7]["b"], items[7]["a"]  # same bytes, other prompt
    write_jsonl(dataset, items)
    assert dataset.stat().st_size == before.st_size
    if restore_mtime:
        os.utime(dataset, ns=(before.st_atime_ns, before.st_mtime_ns))

    out, exact = rerun(run_cli, spec)

    assert exact
    assert llm_server.stats()["requests"] == 31  # the edited item, nothing else
    assert "1 model calls made" in out


def test_metric_change_falls_through_and_scores_again(
    tmp_path: Path, llm_server: TestServer, run_cli: RunCli
) -> None:
    spec = completed(tmp_path, llm_server, run_cli, arith_items(30))
    data = yaml.safe_load(spec.read_text())
    data["metrics"].append({"type": "includes", "target": "answer"})
    spec.write_text(yaml.safe_dump(data, sort_keys=False))

    out, exact = rerun(run_cli, spec)

    assert exact
    assert "includes" in out
    assert llm_server.stats()["requests"] == 30  # scores come from stored responses


def test_custom_metric_code_edit_falls_through(
    tmp_path: Path, llm_server: TestServer, run_cli: RunCli
) -> None:
    code = tmp_path / "code"
    code.mkdir()
    module = code / "record_metric.py"
    module.write_text(METRIC_MODULE.format(version=1.0))
    env = {"PYTHONPATH": f"{ROOT}{os.pathsep}{code}"}
    metric = {"type": "python", "function": "record_metric:score", "name": "custom"}
    spec = completed(
        tmp_path, llm_server, run_cli, arith_items(20), metrics=[metric], env=env, files=[module]
    )
    module.write_text(METRIC_MODULE.format(version=0.0))

    _, exact = rerun(run_cli, spec, **env)

    assert exact
    assert llm_server.stats()["requests"] == 20


@pytest.mark.parametrize("change", ["prompt", "model"])
def test_prompt_or_model_change_is_a_new_run(
    tmp_path: Path, llm_server: TestServer, run_cli: RunCli, change: str
) -> None:
    spec = completed(tmp_path, llm_server, run_cli, arith_items(20))
    data = yaml.safe_load(spec.read_text())
    if change == "prompt":
        data["prompt"]["user"] = "Compute {{ a }} + {{ b }}."
    else:
        data["model"]["params"] = {"temperature": 0.5}
    spec.write_text(yaml.safe_dump(data, sort_keys=False))

    _, exact = rerun(run_cli, spec)

    assert exact
    assert llm_server.stats()["requests"] == 40  # every item again, under a new run id


def test_set_option_is_part_of_the_key(
    tmp_path: Path, llm_server: TestServer, run_cli: RunCli
) -> None:
    spec = completed(tmp_path, llm_server, run_cli, arith_items(20))

    _, exact = rerun(run_cli, spec, "--set", "model.revision=checkpoint-2")

    assert exact
    assert llm_server.stats()["requests"] == 40


def test_a_held_or_rescored_run_falls_through(
    tmp_path: Path, llm_server: TestServer, run_cli: RunCli
) -> None:
    spec = completed(tmp_path, llm_server, run_cli, arith_items(20))
    (run_dir,) = (tmp_path / "runs" / "runs").iterdir()
    metrics = run_dir / "metrics.json"
    metrics.write_text(metrics.read_text())  # rewritten (as a rescore does): another stat

    _, exact = rerun(run_cli, spec)

    assert exact
    assert llm_server.stats()["requests"] == 20
