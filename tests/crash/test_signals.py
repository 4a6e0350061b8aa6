"""Graceful stop: SIGTERM/Ctrl-C stop sending, finish what is in flight, save, exit 130.

Real signals to a real ``shardeval run`` subprocess. Under the CLI, Prefect's flow engine
owns SIGTERM during the flow run (it would raise ``TerminationSignal`` and tear the run down
without telling the batches), so these tests cover the path that makes it graceful.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from shardeval.testing.server import TestServer
from tests.crash.harness import (
    crash_spec,
    output_of,
    stall,
    start_run,
    wait_for_answers,
)
from tests.helpers.waiting import wait_until

N_ITEMS = 1000


def test_sigterm_saves_what_finished_and_the_rerun_resends_nothing(
    tmp_path: Path, prefect_api: str, slow_server: TestServer
) -> None:
    spec = crash_spec(
        tmp_path / "eval",
        slow_server,
        n_items=N_ITEMS,
    )
    logs = tmp_path / "logs"
    process = start_run(spec, prefect_api, logs)
    assert wait_for_answers(slow_server, process, 300), output_of(logs)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 130, output_of(logs)
    said = output_of(logs)
    assert "run the same command to resume" in said, said
    first = slow_server.stats()
    assert 300 <= first["completions"] < N_ITEMS

    rerun = start_run(spec, prefect_api, logs)
    assert rerun.wait(timeout=300) == 0, output_of(logs)
    stats = slow_server.stats()
    answered_twice = {k: n for k, n in stats["prompt_completions"].items() if n > 1}
    assert answered_twice == {}, f"finished items sent again: {len(answered_twice)}"
    assert len(stats["prompt_completions"]) == N_ITEMS
    results = pq.read_table(next((tmp_path / "eval" / "runs" / "runs").glob("*/results.parquet")))
    assert results.num_rows == N_ITEMS
    assert set(results.column("status").to_pylist()) == {"ok"}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_second_signal_stops_at_once_without_damage(
    tmp_path: Path, prefect_api: str, slow_server: TestServer, signum: signal.Signals
) -> None:
    spec = crash_spec(
        tmp_path / "eval",
        slow_server,
        n_items=300,
        grace_period_s=60,
    )
    logs = tmp_path / "logs"
    process = start_run(spec, prefect_api, logs)
    assert wait_for_answers(slow_server, process, 60), output_of(logs)
    stall(slow_server, process)  # what is in flight now hangs
    process.send_signal(signum)
    wait_until(
        lambda: "stopping: no new requests" in output_of(logs),
        timeout=30,
        what="the run acknowledging the first signal",
        process=process,
    )
    # "Still waiting for the requests in flight" has no event of its own; a stop that did not
    # wait would already be tearing down (closing those requests), so give it a moment to.
    time.sleep(0.5)
    assert process.poll() is None, "the first signal must wait for the requests in flight"
    assert slow_server.stats()["in_flight"] > 0, "the requests in flight were dropped"
    sent = time.monotonic()
    process.send_signal(signum)
    assert process.wait(timeout=20) == 130, output_of(logs)
    assert time.monotonic() - sent < 15, "the second signal must not wait for the grace period"

    slow_server.configure(latency_min=0.02, latency_max=0.05)
    rerun = start_run(spec, prefect_api, logs)
    assert rerun.wait(timeout=300) == 0, output_of(logs)
    run_dir = next((tmp_path / "eval" / "runs" / "runs").iterdir())
    assert not (run_dir / "quarantine").exists(), "a file was damaged by the hard stop"
    results = pq.read_table(run_dir / "results.parquet")
    assert results.num_rows == 300
    assert set(results.column("status").to_pylist()) == {"ok"}
