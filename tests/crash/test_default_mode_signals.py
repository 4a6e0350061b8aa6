"""Issue 11's crash scenario in the default mode: Ctrl-C / SIGTERM to the run's process group.

A terminal sends SIGINT to the whole foreground process group, ``timeout`` and CI runners send
SIGTERM to it. Without ``PREFECT_API_URL`` the run uses shardeval's local Prefect server, which
lives in a session of its own: the signal must stop the run gracefully (exit 130 within the
grace period + 10 s, lease released) and leave the server up for the rerun.

The first test of the module starts the server from the run itself (its ``SHARDEVAL_HOME`` is
fresh); the second reuses it. The module's fixture stops it at the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from shardeval.local_server import ServerFiles, is_healthy, read_state, stop_local_server
from shardeval.testing.server import TestServer
from tests.conftest import cli_env
from tests.crash.harness import CONCURRENCY, crash_spec, output_of, wait_for_answers

N_ITEMS = 600
GRACE_S = 5.0
SERVER_START_BUDGET_S = 240.0  # a fresh server is healthy in 28-60 s on 2 loaded cores


@pytest.fixture(scope="module")
def local_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A shardeval home for this module; the server the runs start in it is stopped at the end."""
    home = tmp_path_factory.mktemp("shardeval-home")
    try:
        yield home
    finally:
        stop_local_server(home)


def start_default_mode_run(spec: Path, home: Path, logs: Path) -> subprocess.Popen[bytes]:
    """``shardeval run`` with no PREFECT_API_URL, as a terminal would: leader of its own group."""
    logs.mkdir(parents=True, exist_ok=True)
    n = len(list(logs.glob("*.out")))
    with open(logs / f"{n:02d}.out", "wb") as out, open(logs / f"{n:02d}.err", "wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "shardeval", "run", str(spec), "--quiet"],
            env=cli_env(None, SHARDEVAL_HOME=str(home), COLUMNS="250"),
            stdout=out,
            stderr=err,
            start_new_session=True,  # so os.killpg reaches exactly what a terminal's would
        )


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_process_group_stops_the_run_and_spares_the_server(
    tmp_path: Path, local_home: Path, slow_server: TestServer, signum: signal.Signals
) -> None:
    spec = crash_spec(tmp_path / "eval", slow_server, n_items=N_ITEMS, grace_period_s=GRACE_S)
    logs = tmp_path / "logs"
    process = start_default_mode_run(spec, local_home, logs)
    assert wait_for_answers(slow_server, process, 150, timeout=SERVER_START_BUDGET_S), output_of(
        logs
    )
    server = read_state(ServerFiles(local_home))
    assert server is not None, "the run must have used the local server"

    sent = time.monotonic()
    in_flight = slow_server.stats()["in_flight"]
    os.killpg(process.pid, signum)
    assert process.wait(timeout=GRACE_S + 10) == 130, output_of(logs)
    assert time.monotonic() - sent <= GRACE_S + 10
    said = output_of(logs)
    assert "run the same command to resume" in said, said
    assert "EventsWorker" not in said, said
    assert "using the local Prefect server at" in said, said
    run_dir = next((tmp_path / "eval" / "runs" / "runs").iterdir())
    assert not (run_dir / "lock.json").exists(), "the lease must be released"
    first = slow_server.stats()
    assert first["completions"] < N_ITEMS, "the run finished before the signal: nothing tested"

    still = read_state(ServerFiles(local_home))
    assert still is not None and still.pid == server.pid, "the signal must not reach the server"
    assert is_healthy(still.url)

    rerun = start_default_mode_run(spec, local_home, logs)
    assert rerun.wait(timeout=300) == 0, output_of(logs)
    stats = slow_server.stats()
    resent = sum(n - 1 for n in stats["prompt_completions"].values() if n > 1)
    assert resent <= max(in_flight, CONCURRENCY), f"{resent} finished answers were paid twice"
    assert len(stats["prompt_completions"]) == N_ITEMS
    results = pq.read_table(run_dir / "results.parquet")
    assert results.num_rows == N_ITEMS
    assert set(results.column("status").to_pylist()) == {"ok"}
    after = read_state(ServerFiles(local_home))
    assert after is not None and after.pid == server.pid, "the rerun must reuse the server"
