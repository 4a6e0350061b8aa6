"""Fixtures for the deployment tests: a process work pool, the `evaluate` deployment, a worker.

All of them talk to the session's real Prefect server (``prefect_api``), through the Python
client where possible: each ``prefect`` CLI call costs ~8 CPU-seconds, so there are two (the
deploy and the worker), once per session.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, cli_env

WORKER_ENV = {
    # Poll for scheduled runs every second instead of every 10 (the tests wait on it).
    "PREFECT_WORKER_QUERY_SECONDS": "1",
    # Task retries of a failing batch after 0.5 s instead of 10 and 30 s.
    "SHARDEVAL_BATCH_RETRY_DELAYS": "0.5",
    "SHARDEVAL_DASK_WORKERS": "2",
}


@pytest.fixture(scope="session")
def client(prefect_api: str) -> Iterator[Any]:
    """A sync Prefect client for the session's server (not the process's settings)."""
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(prefect_api) as c:
        yield c


@pytest.fixture
def use_server(prefect_api: str) -> Iterator[str]:
    """Point this process's Prefect at the session's server for one test (run_deployment)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_api}):
        yield prefect_api
        # Send this test's flow-run logs now, while the server is still up.
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)


@pytest.fixture(scope="session")
def work_pool(client: Any) -> str:
    """A process work pool, created through the API."""
    from prefect.client.schemas.actions import WorkPoolCreate

    name = f"shardeval-test-{uuid.uuid4().hex[:6]}"
    client.create_work_pool(WorkPoolCreate(name=name, type="process"))
    return name


@pytest.fixture(scope="session")
def deployment(prefect_api: str, client: Any, work_pool: str) -> Any:
    """``prefect deploy`` of the ``evaluate`` deployment from prefect.yaml, from the repo root."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefect",
            "--no-prompt",
            "deploy",
            "--name",
            "evaluate",
            "--pool",
            work_pool,
        ],
        cwd=ROOT,
        env=cli_env(prefect_api),
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert "successfully created" in output, output[-3000:]
    # Prefect 3.8.8's `deploy` ends by asking for the pool's workers with an explicit
    # `"limit": null`, which fastapi >= 0.151 refuses (422): pyproject pins fastapi below it.
    assert result.returncode == 0, output[-3000:]
    return client.read_deployment_by_name("evaluate/evaluate")


@pytest.fixture(scope="session")
def worker(
    prefect_api: str,
    client: Any,
    work_pool: str,
    deployment: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Path]:
    """``prefect worker start --pool POOL`` in a subprocess; stopped with SIGTERM."""
    from prefect.client.schemas.filters import WorkerFilter

    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", work_pool],
        cwd=tmp_path_factory.mktemp("worker-cwd"),
        env=cli_env(prefect_api, **WORKER_ENV),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            online = client.read_workers_for_work_pool(
                work_pool,
                worker_filter=WorkerFilter(status={"any_": ["ONLINE"]}),
                offset=0,
                limit=10,
            )
            if online:
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start: {log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield log_path
    finally:
        # Background prefect processes ignore SIGINT; SIGTERM stops the worker (and its runs).
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def wait_final(client: Any, flow_run_id: Any, *, run_count: int = 1, timeout: float = 240) -> Any:
    """The flow run once it is in a final state of its ``run_count``-th attempt (or later)."""
    deadline = time.monotonic() + timeout
    while True:
        flow_run = client.read_flow_run(flow_run_id)
        state = flow_run.state
        if state is not None and state.is_final() and flow_run.run_count >= run_count:
            return flow_run
        if time.monotonic() > deadline:
            raise AssertionError(f"flow run {flow_run_id} still {state!r} after {timeout} s")
        time.sleep(0.5)


def task_runs(client: Any, flow_run_id: Any) -> list[Any]:
    """Every task run of a flow run, all attempts (explicit sort and limit: see above)."""
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId
    from prefect.client.schemas.sorting import TaskRunSort

    return list(
        client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
            limit=200,
            offset=0,
        )
    )
