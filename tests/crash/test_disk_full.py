"""A full disk mid-run: stop sending at the first failed write, lose at most what was in flight.

The run's output is a 4 MiB tmpfs the test mounts (root only; skipped elsewhere), and the
test server echoes long, incompressible prompts, so the disk fills up while the run is busy.
The run must exit 1 naming the path and the cause, leave no partial file, and have paid for
at most the requests in flight at the first failure plus one flush window that it could not
keep; once the disk is bigger, the same command completes, sending only what is missing.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from shardeval.testing.server import ServerConfig, TestServer
from tests.crash.harness import (
    CONCURRENCY,
    answered_twice,
    crash_spec,
    output_of,
    start_run,
)

pytestmark = pytest.mark.slow

N_ITEMS = 2500
TEXT_CHARS = 3000
"""~2.2 KB of Parquet per answer after compression: 2,500 answers need more than 4 MiB."""
FLUSH_WINDOW = 16


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs at ``tmp_path/disk`` (unmounted afterwards)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_disk_full_stops_sending_and_the_same_command_completes(
    tmp_path: Path, prefect_api: str, small_disk: Path
) -> None:
    items = [
        {"id": f"item-{n}", "text": secrets.token_urlsafe(TEXT_CHARS * 3 // 4), "answer": "-"}
        for n in range(N_ITEMS)
    ]
    config = ServerConfig(mode="echo", latency_min=0.02, latency_max=0.05)
    with TestServer.start_subprocess(config) as server:
        spec = crash_spec(
            tmp_path / "eval",
            server,
            items=items,
            prompt={"user": "{{ text }}"},
            metrics=[{"type": "includes", "target": "answer"}],
            output=str(small_disk),
            flush_every_items=FLUSH_WINDOW,
        )
        logs = tmp_path / "logs"
        first = start_run(spec, prefect_api, logs)
        assert first.wait(timeout=300) == 1, output_of(logs)
        said = output_of(logs)
        assert "No space" in said and str(small_disk) in said, said
        assert "Traceback" not in said, said
        sent = server.stats()["completions"]
        assert sent < N_ITEMS, "the disk never filled up: make the answers longer"

        # Whatever a reader can see is whole: every Parquet file parses, no temporary is left.
        (run_dir,) = (small_disk / "runs").iterdir()
        for path in run_dir.rglob("*.parquet"):
            pq.read_table(path)
        tmp = run_dir / ".tmp"
        assert not tmp.exists() or not list(tmp.iterdir()), "a temporary file was left behind"
        assert not (run_dir / "lock.json").exists()

        subprocess.run(["mount", "-o", "remount,size=256m", str(small_disk)], check=True)
        rerun = start_run(spec, prefect_api, logs)
        assert rerun.wait(timeout=600) == 0, output_of(logs)
        stats = server.stats()
        assert len(stats["prompt_completions"]) == N_ITEMS
        lost = answered_twice(server)
        print(f"disk full: {sent} answers before the stop, {lost} of them lost")  # for -s
        assert lost <= CONCURRENCY + FLUSH_WINDOW, (
            f"{lost} paid answers lost (sent {sent} before the disk filled up)"
        )
        assert stats["completions"] - sent == N_ITEMS - (sent - lost), "the rerun re-sent more"
        results = pq.read_table(run_dir / "results.parquet")
        assert results.num_rows == N_ITEMS
