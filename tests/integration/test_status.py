"""``shardeval status``: what a run holds, from another terminal, while it runs or after it died."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shardeval.catalog import RunNotFound
from shardeval.status import read_status
from shardeval.testing.server import ServerConfig, TestServer
from tests.conftest import cli_env
from tests.helpers.specs import arith_items, write_spec

N_ITEMS = 300
BATCH_SIZE = 50
N_BAD = 7  # items the server answers with HTTP 400: permanent errors, stored as error rows


@pytest.fixture
def slow_server() -> Iterator[TestServer]:
    """The test server in its own process, 20-50 ms per answer."""
    with TestServer.start_subprocess(ServerConfig(latency_min=0.02, latency_max=0.05)) as server:
        yield server


def status_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shardeval", "status", *args],
        env=cli_env(None, COLUMNS="250"),
        capture_output=True,
        text=True,
        timeout=60,
    )


def status_json(run_id: str, output: Path) -> dict[str, Any]:
    result = status_cli(run_id, "--output", str(output), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def start_run(spec: Path, prefect_api: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "shardeval", "run", str(spec), "--quiet"],
            env=cli_env(prefect_api),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


@pytest.mark.slow
def test_status_while_running_after_a_kill_and_when_complete(
    tmp_path: Path, prefect_api: str, slow_server: TestServer
) -> None:
    items = arith_items(N_ITEMS)
    for item in items[:N_BAD]:
        item["a"] = f"[[status:400]] {item['a']}"
    spec = write_spec(
        tmp_path / "eval",
        base_url=slow_server.url,
        items=items,
        batch_size=BATCH_SIZE,
        model={"concurrency": 4},
    )
    output = tmp_path / "eval" / "runs"
    log = tmp_path / "run.log"

    process = start_run(spec, prefect_api, log)
    deadline = time.monotonic() + 120
    while slow_server.stats()["completions"] < 120:
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    slow_server.configure(latency_min=5.0, latency_max=5.0)  # keep it running while we look
    run_id = next((output / "runs").iterdir()).name

    # While it runs: held by the process, part of the items done.
    running = status_json(run_id, output)
    assert running["state"] == "running"
    assert running["holder"]["pid"] == process.pid
    assert running["holder"]["host"] == socket.gethostname()
    assert running["holder_stale"] is False
    assert running["total"] == N_ITEMS
    assert 0 < running["done"] < N_ITEMS
    assert running["batches"]["total"] == N_ITEMS // BATCH_SIZE
    assert running["complete"] is False

    # After a SIGKILL: nobody holds it (the lease is stale), what was stored is counted.
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    stopped = read_status(str(output), run_id)
    assert stopped.state == "stopped"
    assert stopped.holder is not None and stopped.holder_stale is True
    assert stopped.done >= running["done"]
    assert stopped.errors_by_kind == {"http_400": N_BAD}
    assert stopped.list_calls <= 4
    table = status_cli(run_id, "--output", str(output))
    assert table.returncode == 0, table.stderr
    assert f"{stopped.done:,} of {N_ITEMS:,} done" in table.stdout
    assert "stale lock" in table.stdout
    assert f"pid {process.pid}" in table.stdout

    # Finished: complete, every row counted, tokens as in metrics.json.
    slow_server.configure(latency_min=0.02, latency_max=0.05)
    rerun = start_run(spec, prefect_api, log)
    assert rerun.wait(timeout=300) == 0, log.read_text()
    done = status_json(run_id, output)
    metrics = json.loads((output / "runs" / run_id / "metrics.json").read_text())
    assert done["state"] == "complete"
    assert (done["done"], done["total"]) == (N_ITEMS, N_ITEMS)
    assert (done["ok"], done["error"]) == (N_ITEMS - N_BAD, N_BAD)
    assert done["errors_by_kind"] == {"http_400": N_BAD} == metrics["errors_by_kind"]
    assert done["usage"] == metrics["usage"]
    assert done["batches"] == {"total": 6, "committed": 6, "in_progress": 0, "parts": 0}
    assert done["holder"] is None
    table = status_cli(run_id, "--output", str(output))
    assert "300 of 300 done" in table.stdout and "complete" in table.stdout


@pytest.mark.slow
def test_status_of_a_run_that_does_not_exist(tmp_path: Path) -> None:
    (tmp_path / "runs" / "some-run").mkdir(parents=True)
    result = status_cli("no-such-run", "--output", str(tmp_path))
    assert result.returncode == 2
    assert "no run 'no-such-run'" in result.stderr
    assert "some-run" in result.stderr  # the runs that are there
    with pytest.raises(RunNotFound):
        read_status(str(tmp_path / "elsewhere"), "no-such-run")


def test_status_counts_parts_and_ignores_what_it_cannot_read(tmp_path: Path) -> None:
    """Library level, no process: parts and committed batches, a damaged file, no plan yet."""
    from shardeval.outcome import Outcome
    from shardeval.results import outcomes_table
    from shardeval.storage import RunStore

    store = RunStore(str(tmp_path), "r")

    def outcomes(keys: list[str], status: str = "ok") -> Any:
        rows = [
            Outcome(key=k, status=status, response="1", prompt_tokens=3, completion_tokens=1)
            for k in keys
        ]
        return outcomes_table(rows, {}, {})

    store.write_table(store.batch_path("b1"), outcomes(["k1", "k2"]))
    store.write_table(store.path("parts", "b2", "0001.parquet"), outcomes(["k3"]))
    store.write_table(store.path("parts", "b2", "0002.parquet"), outcomes(["k3", "k4"], "error"))
    Path(store.path("parts", "b2", "0003.parquet")).write_bytes(b"PAR1 torn")
    found = read_status(str(tmp_path), "r")
    assert found.total is None and found.state == "stopped"
    assert (found.done, found.ok, found.error) == (4, 3, 1)  # k3: the ok row wins
    assert found.parts == 3 and found.batches_committed == 1
    assert len(found.unreadable) == 1
    assert (found.prompt_tokens, found.completion_tokens) == (12, 4)
    assert Path(store.path("parts", "b2", "0003.parquet")).exists()  # status never moves files
