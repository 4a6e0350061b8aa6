"""A process whose lease is taken over stops sending within one heartbeat and names the taker.

Two real ``shardeval run`` processes on one run on SeaweedFS, with a 3 s lease. The first is
frozen (SIGSTOP: a paused VM, a laptop lid, a network partition) until its lease expires; the
second takes the run over; then the first is thawed. It must send nothing more, keep what it
had finished, and exit 1 naming the host and pid that took the run; the second completes.
The model server must have answered each prompt once, beyond what the first process could
not have stored when it froze: the requests it had in flight (their answers arrived while it
was frozen) and its unflushed window of finished answers (it writes them as parts once
thawed, but the second process had sent them again by then). A frozen process is a killed
one for as long as it is frozen.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from shardeval.part_writer import BEHIND_WINDOWS
from shardeval.testing.server import ServerConfig, TestServer
from tests.crash.harness import (
    CONCURRENCY,
    answered_twice,
    crash_spec,
    output_of,
    start_run,
    wait_for_answers,
)
from tests.s3.servers import SeaweedBackend

pytestmark = pytest.mark.slow

N_ITEMS = 600
LEASE_S = 3.0
FLUSH_WINDOW = 16
"""``flush_every_items`` (the default): finished answers a process may hold unwritten."""


def lease_record(fs: Any, pattern: str) -> dict[str, Any] | None:
    fs.invalidate_cache()
    paths = fs.glob(pattern)
    if not paths:
        return None
    try:
        record = json.loads(fs.cat_file(paths[0]))
    except (FileNotFoundError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def poll(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout:g}s")


def test_lost_lease_stops_the_old_holder_and_names_the_new_one(
    tmp_path: Path, prefect_api: str, seaweedfs_s3: SeaweedBackend
) -> None:
    backend = seaweedfs_s3
    backend.ensure_up()
    bucket = backend.make_bucket()
    # Generous storage timeouts: the frozen process's pending calls must not time out the
    # moment it is thawed (that would stop it for a storage failure, not for the lease).
    env = {**backend.env(retries=3, timeout_s=60.0), "SHARDEVAL_LEASE_S": f"{LEASE_S:g}"}
    config = ServerConfig(latency_min=0.05, latency_max=0.1)
    with TestServer.start_subprocess(config) as server:
        spec = crash_spec(tmp_path / "eval", server, n_items=N_ITEMS, output=f"s3://{bucket}/evals")
        fs = backend.filesystem()
        pattern = f"{bucket}/evals/runs/*/lock.json"
        first_logs, second_logs = tmp_path / "first", tmp_path / "second"
        first = start_run(spec, prefect_api, first_logs, env=env)
        try:
            assert wait_for_answers(server, first, 100), output_of(first_logs)
            os.kill(first.pid, signal.SIGSTOP)
            poll(
                lambda: (
                    (r := lease_record(fs, pattern)) is not None
                    and time.time() - float(r["renewed_at"]) > LEASE_S + 0.5
                ),
                30,
                "the frozen process's lease did not expire",
            )
            second = start_run(spec, prefect_api, second_logs, env=env)
            poll(
                lambda: (r := lease_record(fs, pattern)) is not None and r["pid"] == second.pid,
                180,
                "the second process did not take the run over",
            )
            os.kill(first.pid, signal.SIGCONT)
            assert first.wait(timeout=60) == 1, output_of(first_logs)
        finally:
            if first.poll() is None:
                os.kill(first.pid, signal.SIGCONT)
                first.kill()
        said = output_of(first_logs)
        assert f"taken over by host {socket.gethostname()}, pid {second.pid}" in said, said
        assert "Traceback" not in said, said
        assert second.wait(timeout=300) == 0, output_of(second_logs)
        stats = server.stats()
        assert len(stats["prompt_completions"]) == N_ITEMS
        again = answered_twice(server)
        # What the frozen holder had answered but not yet stored when it froze: requests in
        # flight, and the finished rows not yet written (the window filling, the window whose
        # part was uploading): a run whose store falls two windows behind holds its new
        # requests (part_writer.BEHIND_WINDOWS). Observed: 0-18. A thawed holder that deleted
        # the parts of a batch it committed on waking made the new holder, which had just
        # listed them, send the batch again: 52-68 (runner._holds_the_run).
        assert again <= CONCURRENCY + BEHIND_WINDOWS * FLUSH_WINDOW, (
            f"{again} paid twice: the old holder kept sending"
        )
