"""``runs``, ``resume``, ``rm`` and ``tag`` from the command line, on local disk.

The scenario (:func:`runs_scenario`) is shared with the S3 version (tests/s3/test_runs_s3.py):
runs are written by ``shardeval run`` subprocesses against the project's test server, one of
them slow enough to be looked at while another process writes it, then SIGKILLed, then
resumed from another directory without its spec file.
"""

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

from shardeval.runcard import CARD_FILE
from shardeval.status import read_status
from shardeval.storage import RunStore
from shardeval.testing.server import ServerConfig, TestServer
from tests.conftest import cli_env
from tests.helpers.specs import arith_items, write_jsonl, write_spec

pytestmark = pytest.mark.slow

N_LIVE = 300
BATCH = 50


@pytest.fixture
def slow_server() -> Iterator[TestServer]:
    """The test server in its own process, 20-50 ms per answer."""
    with TestServer.start_subprocess(ServerConfig(latency_min=0.02, latency_max=0.05)) as server:
        yield server


class Cli:
    """``shardeval`` subprocesses with one environment (Prefect server, S3 variables)."""

    def __init__(self, prefect_api: str, **env: str) -> None:
        self.env = cli_env(prefect_api, COLUMNS="250", **env)

    def __call__(
        self, *args: str, cwd: Path | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "shardeval", *args],
            cwd=cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def ok(self, *args: str, cwd: Path | None = None) -> str:
        result = self(*args, cwd=cwd)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def runs(self, output: str, *args: str) -> dict[str, dict[str, Any]]:
        listed = json.loads(self.ok("runs", "--output", output, "--json", *args))
        return {entry["run_id"]: entry for entry in listed}

    def start(self, spec: Path, log: Path) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "shardeval", "run", str(spec), "--quiet"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )


def ci(metrics: dict[str, Any]) -> dict[str, Any]:
    return {"ci95": metrics["ci95"]}


def flat(result: subprocess.CompletedProcess[str]) -> str:
    return " ".join((result.stdout + result.stderr).split())


def runs_scenario(tmp_path: Path, server: TestServer, cli: Cli, output: str) -> None:
    """Every behaviour of the issue, against ``output`` (a local path or an s3:// URL)."""
    done_spec = write_spec(
        tmp_path / "done", base_url=server.url, n_items=30, name="done", output=output
    )
    live_items = arith_items(N_LIVE, seed=1)
    live_spec = write_spec(
        tmp_path / "live",
        base_url=server.url,
        items=live_items,
        name="live",
        batch_size=BATCH,
        model={"concurrency": 4},
        output=output,
    )
    cli.ok("run", str(done_spec), "--quiet")
    log = tmp_path / "live.log"
    process = cli.start(live_spec, log)
    deadline = time.monotonic() + 180
    while server.stats()["completions"] < 30 + 80:
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    server.configure(latency_min=5.0, latency_max=5.0)  # keep it running while we look
    listed = cli.runs(output)
    assert len(listed) == 2
    (live_id,) = [r for r in listed if r.startswith("live-")]
    (done_id,) = [r for r in listed if r.startswith("done-")]

    # While another process writes it: running, held by that process; the other complete.
    live, done = listed[live_id], listed[done_id]
    assert live["status"] == "running", live
    assert live["holder"] == {"host": socket.gethostname(), "pid": process.pid}
    assert live["n_total"] == N_LIVE and live["name"] == "live" and live["model"] == "test-model"
    assert done["status"] == "complete"
    assert (done["n_done"], done["n_total"], done["n_error"]) == (30, 30, 0)
    done_store = RunStore(output, done_id)
    metrics = done_store.read_json(done_store.metrics_path)["metrics"]["exact_match"]
    assert done["main_metric"] == {"name": "exact_match", "mean": metrics["mean"], **ci(metrics)}
    assert done["tokens"]["prompt_tokens"] > 0
    assert list(listed) == [live_id, done_id]  # newest first
    assert list(cli.runs(output, "--status", "running")) == [live_id]
    # rm refuses a run held by a live process, even with --yes.
    refused = cli("rm", live_id, "--output", output, "--yes")
    assert refused.returncode == 1, flat(refused)
    assert f"held by host {socket.gethostname()}, pid {process.pid}" in flat(refused)

    # After a SIGKILL: incomplete at once (same host, dead pid), what was stored is kept.
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    server.configure(latency_min=0.002, latency_max=0.005)
    deadline = time.monotonic() + 30
    while server.stats()["in_flight"]:  # the killed client's requests are cancelled
        assert time.monotonic() < deadline
        time.sleep(0.05)
    killed = cli.runs(output)[live_id]
    assert killed["status"] == "incomplete" and killed["card_status"] == "running"
    stored = read_status(output, live_id).done
    assert 0 < stored < N_LIVE

    # resume from another directory, without the spec file: only the missing items are sent.
    live_spec.unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    before = server.stats()["completions"]
    out = cli.ok("resume", live_id, "--output", output, "--quiet", cwd=elsewhere)
    assert server.stats()["completions"] - before == N_LIVE - stored, out
    resumed = cli.runs(output)[live_id]
    assert resumed["status"] == "complete" and resumed["n_done"] == N_LIVE

    # The dataset edited since: exit 2 naming the change; then only the changed items.
    for item in live_items[:2]:
        item["a"] += 1000
        item["answer"] += 1000
    live_items.append({"id": "extra", "a": 1, "b": 2, "answer": 3})
    write_jsonl(tmp_path / "live" / "items.jsonl", live_items)
    before = server.stats()["completions"]
    changed = cli("resume", live_id, "--output", output, "--quiet", cwd=elsewhere)
    assert changed.returncode == 2, flat(changed)
    assert "1 added, 2 edited, 0 removed" in flat(changed)
    assert str(tmp_path / "live" / "items.jsonl") in flat(changed)
    assert server.stats()["completions"] == before
    cli.ok("resume", live_id, "--output", output, "--allow-dataset-change", "-q", cwd=elsewhere)
    assert server.stats()["completions"] - before == 3
    assert cli.runs(output)[live_id]["n_done"] == N_LIVE + 1

    # Tags and filters.
    assert "tags baseline" in cli.ok("tag", done_id, "baseline", "--output", output)
    bad = cli("tag", done_id, "not ok", "--output", output)
    assert bad.returncode == 2 and "invalid tag" in flat(bad)
    assert list(cli.runs(output, "--tag", "baseline")) == [done_id]
    assert cli.runs(output)[done_id]["tags"] == ["baseline"]
    assert list(cli.runs(output, "--name", "live")) == [live_id]
    assert set(cli.runs(output, "--model", "test-*")) == {live_id, done_id}
    assert set(cli.runs(output, "--since", "1h")) == {live_id, done_id}
    assert cli.runs(output, "--since", "2099-01-01") == {}
    assert cli.runs(output, "--status", "incomplete") == {}
    table = cli.ok("runs", "--output", output)
    assert live_id in table and "baseline" in table
    assert f"exact_match={metrics['mean']:.3f}" in table
    cli.ok("untag", done_id, "baseline", "--output", output)
    assert cli.runs(output, "--tag", "baseline") == {}
    cli.ok("tag", done_id, "baseline", "--output", output)
    unknown = cli("resume", live_id[:-1], "--output", output)
    assert unknown.returncode == 2 and live_id in flat(unknown)

    # A run written by an older shardeval (no run.json) is listed, and resumable.
    store = RunStore(output, done_id)
    store.delete([store.path(CARD_FILE)])
    old = cli.runs(output)[done_id]
    assert old["legacy"] and old["status"] == "complete" and old["tags"] == ["baseline"]
    answered = cli("resume", done_id, "--output", output, "--quiet", cwd=elsewhere)
    assert answered.returncode == 0 and "answered from storage" in flat(answered)
    assert not cli.runs(output)[done_id]["legacy"]  # the answer wrote its card

    # rm: asks (no terminal: exit 2), keeps the tagged run, deletes the rest.
    scratch_spec = write_spec(
        tmp_path / "scratch", base_url=server.url, n_items=5, name="scratch", output=output
    )
    cli.ok("run", str(scratch_spec), "--quiet")
    unasked = cli("rm", "--older-than", "0s", "--output", output)
    assert unasked.returncode == 2 and "--yes" in flat(unasked)
    assert len(cli.runs(output)) == 3
    removed = cli("rm", "--older-than", "0s", "--output", output, "--yes")
    assert removed.returncode == 0, flat(removed)
    assert f"deleted {live_id}" in flat(removed)
    assert "keep: tagged baseline" in flat(removed)
    left = cli.runs(output)
    assert list(left) == [done_id] and left[done_id]["status"] == "complete"
    nothing = cli("rm", "--output", output, "--yes")
    assert nothing.returncode == 2


def test_runs_resume_rm_and_tags_on_local_disk(
    tmp_path: Path, prefect_api: str, slow_server: TestServer
) -> None:
    runs_scenario(tmp_path, slow_server, Cli(prefect_api), str(tmp_path / "out"))
    assert [p.name for p in (tmp_path / "out" / "runs").iterdir()] == [
        next(iter(Cli(prefect_api).runs(str(tmp_path / "out"))))
    ]
