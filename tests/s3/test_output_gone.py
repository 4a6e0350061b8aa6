"""An S3 output whose bucket disappears mid-run: exit 1 with the cause in one line; rerun completes.

A real ``shardeval run`` writes to moto (server mode, in a process of its own); the test
deletes the bucket while the run is busy (with the server slowed down first, so that the run
cannot finish before the deletion takes effect). The run must stop sending, say which path failed
and why in one line (no botocore or Prefect traceback on the console), and once the bucket
is back the same command completes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardeval.testing.server import ServerConfig, TestServer
from tests.crash.harness import (
    crash_spec,
    output_of,
    stall,
    start_run,
    stderr_of,
    wait_for_answers,
)
from tests.s3.servers import MotoBackend

pytestmark = pytest.mark.slow

N_ITEMS = 600
# Once the bucket is going, answers come this slowly: the rest of the run would take 15 s at
# the spec's 16 in flight, so a run that went on sending after its writes failed is caught
# whatever the load, while the bucket's deletion (which races with the run's part writes and
# takes seconds on a busy machine) no longer races with the run finishing.
SLOW_LATENCY_S = 0.5


def delete_bucket(fs: object, bucket: str, timeout: float = 30) -> None:
    """Empty and delete ``bucket`` (again while the run's writes race with the deletion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):  # FileNotFoundError included
            fs.rm(bucket, recursive=True)  # type: ignore[attr-defined]
        fs.invalidate_cache()  # type: ignore[attr-defined]
        if not fs.exists(bucket):  # type: ignore[attr-defined]
            return
    raise AssertionError(f"could not delete bucket {bucket} within {timeout:g}s")


@pytest.fixture
def slow_server() -> Iterator[TestServer]:
    """The test server in its own process, 20-50 ms per answer."""
    config = ServerConfig(latency_min=0.02, latency_max=0.05)
    with TestServer.start_subprocess(config) as server:
        yield server


def test_bucket_deleted_mid_run(
    tmp_path: Path,
    prefect_api: str,
    moto_s3: MotoBackend,
    slow_server: TestServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    moto_s3.ensure_up()
    for name, value in moto_s3.env().items():  # this process's own client (no metadata service)
        monkeypatch.setenv(name, value)
    bucket = moto_s3.make_bucket()
    spec = crash_spec(tmp_path / "eval", slow_server, n_items=N_ITEMS, output=f"s3://{bucket}/e")
    logs = tmp_path / "logs"
    env = moto_s3.env()
    first = start_run(spec, prefect_api, logs, env=env)
    assert wait_for_answers(slow_server, first, 100), output_of(logs)
    stall(slow_server, first, latency_s=SLOW_LATENCY_S)
    delete_bucket(moto_s3.filesystem(), bucket)
    assert first.wait(timeout=120) == 1, output_of(logs)
    err = stderr_of(logs)
    assert "Traceback" not in err and "ERROR" not in err, err
    said = output_of(logs)
    assert f"storage failed to write s3://{bucket}/e/runs/" in said, said
    assert "NoSuchBucket" in said or "does not exist" in said, said
    assert slow_server.stats()["completions"] < N_ITEMS, "the run went on sending"

    moto_s3.filesystem().mkdir(bucket)
    slow_server.configure(latency_min=0.02, latency_max=0.05)
    rerun = start_run(spec, prefect_api, logs, env=env)
    assert rerun.wait(timeout=300) == 0, output_of(logs)
    assert "items: 600" in output_of(logs)
