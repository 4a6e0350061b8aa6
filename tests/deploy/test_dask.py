"""Batches on Dask: the same results as threads; resume and caching work across processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from shardeval.errors import SpecError
from shardeval.taskrunners import check_task_runner
from tests.conftest import cli_env
from tests.deploy.conftest import task_runs, wait_final
from tests.helpers.specs import write_spec

# latency_s is measured, not computed: it differs between any two runs.
COMPARED = ["item_id", "item_index", "trial", "status", "error", "response", "score_exact_match"]


def results(output: Path) -> pd.DataFrame:
    (run_dir,) = (output / "runs").iterdir()
    return pd.read_parquet(run_dir / "results.parquet")


@pytest.mark.slow
def test_dask_matches_threads_and_resumes(
    prefect_api: str,
    worker: Path,
    client: Any,
    use_server: str,
    llm_server: Any,
    tmp_path: Path,
) -> None:
    from prefect.deployments import run_deployment

    spec = write_spec(tmp_path / "eval", base_url=llm_server.url, n_items=60)
    env = cli_env(prefect_api, SHARDEVAL_DASK_WORKERS="2")

    def run(output: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "shardeval", "run", str(spec), "-o", str(output), *extra],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    threads = run(tmp_path / "threads", "--quiet")
    assert threads.returncode == 0, threads.stderr[-3000:]
    dask = run(tmp_path / "dask", "--quiet", "--task-runner", "dask")
    assert dask.returncode == 0, dask.stderr[-3000:]
    assert "60 model calls made" in dask.stdout, dask.stdout  # progress counted from workers
    assert llm_server.stats()["completions"] == 120
    pd.testing.assert_frame_equal(
        results(tmp_path / "dask")[COMPARED], results(tmp_path / "threads")[COMPARED]
    )

    # Resume on Dask, from a deployment (the task_runner parameter): every batch is Cached.
    (run_dir,) = (tmp_path / "dask" / "runs").iterdir()
    (run_dir / "metrics.json").unlink()
    (run_dir / "results.parquet").unlink()
    requests = llm_server.stats()["requests"]
    flow_run = run_deployment(
        "evaluate/evaluate",
        parameters={
            "spec": str(spec),
            "output": str(tmp_path / "dask"),
            "run_id": run_dir.name,
            "task_runner": "dask",
        },
        timeout=0,
    )
    flow_run = wait_final(client, flow_run.id, timeout=300)
    assert flow_run.state.is_completed(), (flow_run.state, worker.read_text()[-3000:])
    assert llm_server.stats()["requests"] == requests  # zero requests
    batches = [t for t in task_runs(client, flow_run.id) if t.name.startswith("batch")]
    assert len(batches) == 6 and {t.state_name for t in batches} == {"Cached"}
    pd.testing.assert_frame_equal(
        results(tmp_path / "dask")[COMPARED], results(tmp_path / "threads")[COMPARED]
    )


def test_task_runner_options_are_checked_before_prefect() -> None:
    assert check_task_runner("threads") == "threads"
    assert check_task_runner("dask", "tcp://10.0.0.5:8786") == "dask"
    with pytest.raises(SpecError, match="not one of: threads, dask"):
        check_task_runner("ray")
    with pytest.raises(SpecError, match="needs --task-runner dask"):
        check_task_runner("threads", "tcp://10.0.0.5:8786")
    with pytest.raises(SpecError, match="expected a scheduler address"):
        check_task_runner("dask", "not an address")
