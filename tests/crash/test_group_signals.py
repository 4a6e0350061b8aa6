"""Ctrl-C and SIGTERM to the whole process group, the way a terminal, ``timeout`` or CI send them.

A real ``shardeval run`` leads its own process group (``start_new_session``) against the
session's standing Prefect server; the test signals the group with ``os.killpg``, so every
process in it (Prefect's background services, Dask workers) gets the signal too. The contract:
exit 130 within the grace period + 10 s, "N of M done; run the same command to resume", no
lease left behind, no Prefect traceback or ERROR line on the console, and a rerun that sends
again at most the requests that were in flight.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from shardeval.testing.server import TestServer
from tests.crash.harness import (
    CONCURRENCY,
    answered_twice,
    crash_spec,
    output_of,
    start_run,
    stderr_of,
    wait_for_answers,
)

pytestmark = pytest.mark.slow

N_ITEMS = 1000
GRACE_S = 5.0
CONTRACT_S = GRACE_S + 10.0
"""The contract's bound on the time from the signal to the exit (not a performance figure)."""


def group_stop_and_resume(
    tmp_path: Path,
    prefect_api: str,
    server: TestServer,
    signum: signal.Signals,
    *args: str,
    env: dict[str, str] | None = None,
) -> None:
    spec = crash_spec(tmp_path / "eval", server, n_items=N_ITEMS, grace_period_s=GRACE_S)
    logs = tmp_path / "logs"
    process = start_run(spec, prefect_api, logs, *args, new_session=True, env=env)
    assert wait_for_answers(server, process, 200, timeout=300), output_of(logs)
    os.killpg(process.pid, signum)
    signalled = time.monotonic()
    code = process.wait(timeout=120)
    elapsed = time.monotonic() - signalled
    said = output_of(logs)
    assert code == 130, said
    assert elapsed <= CONTRACT_S, f"exit {elapsed:.1f}s after the signal: {said}"
    assert f"of {N_ITEMS:,} done; run the same command to resume" in said, said
    err = stderr_of(logs)
    assert "Traceback" not in err and "ERROR" not in err, err
    run_dir = next((tmp_path / "eval" / "runs" / "runs").iterdir())
    assert not (run_dir / "lock.json").exists(), "the lease was left behind"
    # The group's other processes went with it: none is left holding the terminal.
    with pytest.raises(ProcessLookupError):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            os.killpg(process.pid, 0)
            time.sleep(0.1)
    first = server.stats()["completions"]
    assert first < N_ITEMS, "the run was not stopped"

    rerun = start_run(spec, prefect_api, logs, *args, env=env)
    assert rerun.wait(timeout=300) == 0, output_of(logs)
    assert answered_twice(server) <= CONCURRENCY, "more than the requests in flight re-sent"
    assert len(server.stats()["prompt_completions"]) == N_ITEMS
    results = pq.read_table(run_dir / "results.parquet")
    assert results.num_rows == N_ITEMS
    assert set(results.column("status").to_pylist()) == {"ok"}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_group_signal_with_a_standing_server(
    tmp_path: Path, prefect_api: str, slow_server: TestServer, signum: signal.Signals
) -> None:
    group_stop_and_resume(tmp_path, prefect_api, slow_server, signum)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_group_signal_with_dask_workers(
    tmp_path: Path, prefect_api: str, slow_server: TestServer, signum: signal.Signals
) -> None:
    pytest.importorskip("prefect_dask")
    group_stop_and_resume(
        tmp_path,
        prefect_api,
        slow_server,
        signum,
        "--task-runner",
        "dask",
        env={"SHARDEVAL_DASK_WORKERS": "2"},
    )


def test_a_fresh_run_stopped_by_ctrl_c_names_the_run_to_resume(
    tmp_path: Path, prefect_api: str, slow_server: TestServer
) -> None:
    """``--fresh`` gives the run an id the same command never derives again: typed again it
    would start another run and pay for every finished request once more. The message names
    ``--run-id``, and that command resumes the stopped run, re-sending only what was in flight.
    """
    spec = crash_spec(tmp_path / "eval", slow_server, n_items=N_ITEMS, grace_period_s=GRACE_S)
    logs = tmp_path / "logs"
    process = start_run(spec, prefect_api, logs, "--fresh", new_session=True)
    assert wait_for_answers(slow_server, process, 200, timeout=300), output_of(logs)
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=120) == 130, output_of(logs)
    runs = tmp_path / "eval" / "runs" / "runs"
    (run_dir,) = runs.iterdir()
    said = output_of(logs)
    advice = f"run the same command with `--run-id {run_dir.name}` in place of `--fresh`"
    assert f"of {N_ITEMS:,} done; {advice} to resume" in said, said

    rerun = start_run(spec, prefect_api, logs, "--run-id", run_dir.name)
    assert rerun.wait(timeout=300) == 0, output_of(logs)
    assert [path.name for path in runs.iterdir()] == [run_dir.name], "a second run was started"
    assert answered_twice(slow_server) <= CONCURRENCY, "more than the requests in flight re-sent"
    assert len(slow_server.stats()["prompt_completions"]) == N_ITEMS
    assert pq.read_table(run_dir / "results.parquet").num_rows == N_ITEMS
