"""One writer per run: a second process refuses (naming the holder) or waits; stale leases go."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from shardeval.errors import RunLockedError
from shardeval.locking import RunLock
from shardeval.storage import RunStore
from shardeval.testing.server import TestServer
from tests.crash.harness import crash_spec, output_of, start_run
from tests.helpers.waiting import wait_until

N_ITEMS = 1000


def dead_pid() -> int:
    """The pid of a process of this host that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def lease(pid: int, *, host: str | None = None, renewed_ago: float = 0.0) -> dict[str, Any]:
    return {
        "host": host or socket.gethostname(),
        "pid": pid,
        "since": "2026-01-01T00:00:00+00:00",
        "renewed_at": time.time() - renewed_ago,
        "lease_s": 60.0,
        "token": "someone-else",
    }


def test_two_concurrent_runs_one_runs_the_other_names_the_holder(
    tmp_path: Path, prefect_api: str, slow_server: TestServer
) -> None:
    spec = crash_spec(
        tmp_path / "eval",
        slow_server,
        n_items=N_ITEMS,
    )
    first_logs, second_logs = tmp_path / "first", tmp_path / "second"
    # Slow answers at first, so that whichever process wins still holds the run when the other
    # one gets there, however unevenly a loaded machine starts them.
    slow_server.configure(latency_min=1.0, latency_max=1.0)
    first = start_run(spec, prefect_api, first_logs)
    second = start_run(spec, prefect_api, second_logs)
    wait_until(
        lambda: first.poll() is not None or second.poll() is not None,
        timeout=120,
        what="one of the two runs exiting",
        every=0.1,
    )
    slow_server.configure(latency_min=0.02, latency_max=0.05)
    codes = {first.pid: first.wait(timeout=300), second.pid: second.wait(timeout=300)}
    assert sorted(codes.values()) == [0, 1], (output_of(first_logs), output_of(second_logs))

    winner = next(pid for pid, code in codes.items() if code == 0)
    loser_said = output_of(second_logs if winner == first.pid else first_logs)
    assert f"host {socket.gethostname()}, pid {winner}" in loser_said, loser_said
    assert slow_server.stats()["requests"] == N_ITEMS
    run_dir = next((tmp_path / "eval" / "runs" / "runs").iterdir())
    assert pq.read_table(run_dir / "results.parquet").num_rows == N_ITEMS
    assert not (run_dir / "lock.json").exists()


def test_live_holder_refuses_then_wait_queues_and_a_dead_holder_is_taken_over(
    tmp_path: Path, prefect_api: str, slow_server: TestServer
) -> None:
    spec = crash_spec(
        tmp_path / "eval",
        slow_server,
        n_items=100,
    )
    logs = tmp_path / "logs"
    run_id = "locked-run"
    lock_path = tmp_path / "eval" / "runs" / "runs" / run_id / "lock.json"
    lock_path.parent.mkdir(parents=True)

    # A live holder (this test process, its lease just renewed): refused, holder named.
    lock_path.write_text(json.dumps(lease(os.getpid())))
    refused = start_run(spec, prefect_api, logs, "--run-id", run_id)
    assert refused.wait(timeout=120) == 1, output_of(logs)
    said = output_of(logs)
    assert f"host {socket.gethostname()}, pid {os.getpid()}" in said, said
    assert "since 2026-01-01" in said, said
    assert slow_server.stats()["requests"] == 0

    # --wait queues behind it (it says so once it has found the holder) and goes on once the
    # holder lets go.
    waiting = start_run(spec, prefect_api, logs, "--run-id", run_id, "--wait")
    wait_until(
        lambda: f"waiting for run {run_id}: held by host" in output_of(logs),
        timeout=120,
        what="the --wait run saying whom it waits for",
        process=waiting,
    )
    assert f"pid {os.getpid()}" in output_of(logs), output_of(logs)
    assert waiting.poll() is None, output_of(logs)
    assert slow_server.stats()["requests"] == 0
    lock_path.unlink()
    assert waiting.wait(timeout=120) == 0, output_of(logs)
    assert slow_server.stats()["requests"] == 100

    # A lease left by a process of this host that is gone: taken over at once.
    (lock_path.parent / "metrics.json").unlink()
    lock_path.write_text(json.dumps(lease(dead_pid())))
    slow_server.reset()
    taken = start_run(spec, prefect_api, logs, "--run-id", run_id)
    assert taken.wait(timeout=120) == 0, output_of(logs)
    assert slow_server.stats()["requests"] == 0  # everything was stored
    assert not lock_path.exists()


def test_lease_from_another_host_is_honoured_until_it_expires(tmp_path: Path) -> None:
    store = RunStore(str(tmp_path), "run")
    path = Path(store.path("lock.json"))
    path.parent.mkdir(parents=True)

    path.write_text(json.dumps(lease(1, host="elsewhere", renewed_ago=5)))
    with pytest.raises(RunLockedError, match="host elsewhere, pid 1"):
        RunLock(store).acquire()

    path.write_text(json.dumps(lease(1, host="elsewhere", renewed_ago=120)))
    lock = RunLock(store)
    lock.acquire()
    try:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not path.exists()
