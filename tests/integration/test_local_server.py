"""shardeval's local Prefect server: started in its own session, reused, stopped, idle shutdown.

Real processes throughout (a real ``prefect server start`` under the real supervisor); each
test has its own ``SHARDEVAL_HOME`` and stops what it started, whatever happens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardeval.errors import SpecError
from shardeval.local_server import (
    PrefectApi,
    ServerFiles,
    ensure_local_server,
    idle_seconds,
    is_healthy,
    pid_alive,
    read_state,
    server_settings,
    stop_local_server,
)
from tests.conftest import ROOT, cli_env


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A shardeval home of this test's own; whatever server it holds is stopped at the end."""
    path = tmp_path / "shardeval-home"
    try:
        yield path
    finally:
        stop_local_server(path)


def shardeval_cli(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shardeval", *args],
        env=cli_env(None, SHARDEVAL_HOME=str(home), COLUMNS="200", **env),
        capture_output=True,
        text=True,
        timeout=180,
    )


def wait_until_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(pid_alive(pid) for pid in pids):
            return True
        time.sleep(0.2)
    return False


def test_idle_time_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHARDEVAL_SERVER_IDLE_S", raising=False)
    assert idle_seconds() == 7200
    monkeypatch.setenv("SHARDEVAL_SERVER_IDLE_S", "30")
    assert idle_seconds() == 30
    for bad in ("0", "-1", "soon"):
        monkeypatch.setenv("SHARDEVAL_SERVER_IDLE_S", bad)
        with pytest.raises(SpecError, match="SHARDEVAL_SERVER_IDLE_S"):
            idle_seconds()


def test_the_servers_settings_leave_what_the_user_set() -> None:
    env = {"PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "7", "DO_NOT_TRACK": "0"}
    server_settings(env)
    assert env["PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE"] == "7"
    assert env["DO_NOT_TRACK"] == "0"
    assert env["PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL"] == "2"
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"


def test_an_unreadable_state_file_means_no_server(tmp_path: Path) -> None:
    files = ServerFiles(tmp_path)
    assert read_state(files) is None
    files.state.write_text("{not json")
    assert read_state(files) is None
    files.state.write_text(json.dumps({"pid": 1}))
    assert read_state(files) is None


def test_only_the_local_server_gets_the_once_per_run_message() -> None:
    local = PrefectApi("http://127.0.0.1:5/api", "local")
    assert local.message is not None
    assert "http://127.0.0.1:5/api" in local.message and "shardeval server stop" in local.message
    assert PrefectApi("http://elsewhere/api", "explicit").message is None
    assert PrefectApi(None, "ephemeral").message is None


@pytest.mark.slow
def test_start_reuse_status_stop(home: Path) -> None:
    url = ensure_local_server(home=home)
    files = ServerFiles(home)
    state = read_state(files)
    assert state is not None and state.url == url and is_healthy(url)
    for pid in (state.pid, state.supervisor_pid):
        assert os.getsid(pid) != os.getsid(0), "the server must not share this session"
        assert os.getpgid(pid) != os.getpgid(0), "nor this process group"
    assert (home / "prefect").is_dir(), "the server has a PREFECT_HOME of its own"
    with urllib.request.urlopen(url + "/admin/settings", timeout=10) as response:
        recorder = json.load(response)["server"]["services"]["task_run_recorder"]
    assert (recorder["batch_size"], recorder["flush_interval"]) == (100, 2), (
        "the server records task-run states in batches"
    )

    started = time.monotonic()
    assert ensure_local_server(home=home) == url
    reuse_s = time.monotonic() - started
    again = read_state(files)
    assert again is not None and again.pid == state.pid
    assert reuse_s < 5, f"reusing took {reuse_s:.1f}s: it must not start another server"

    status = shardeval_cli(home, "server", "status", "--json")
    assert status.returncode == 0, status.stderr
    found = json.loads(status.stdout)
    assert found["running"] and found["url"] == url and found["pid"] == state.pid
    assert found["health"] == "healthy" and found["log"] == str(files.log)
    text = shardeval_cli(home, "server", "status")
    assert url in text.stdout and "idle" in text.stdout and str(files.log) in text.stdout

    stopped = shardeval_cli(home, "server", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped the local Prefect server" in stopped.stdout
    assert not files.state.exists()
    assert wait_until_gone([state.pid, state.supervisor_pid], timeout=30)
    assert not is_healthy(url)
    after = shardeval_cli(home, "server", "status")
    assert after.returncode == 0 and "no local Prefect server is running" in after.stdout
    assert "no local Prefect server" in shardeval_cli(home, "server", "stop").stdout


@pytest.mark.slow
def test_the_server_stops_itself_when_idle(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDEVAL_SERVER_IDLE_S", "5")
    url = ensure_local_server(home=home)
    state = read_state(ServerFiles(home))
    assert state is not None and state.idle_s == 5
    assert wait_until_gone([state.pid, state.supervisor_pid], timeout=5 + 60), "still running"
    assert not (home / "server.json").exists()
    assert not is_healthy(url)
    assert "stopped (unused for 5 s)" in (home / "server.log").read_text()


@pytest.mark.slow
def test_a_url_set_after_prefect_is_imported_reaches_flow_runs(home: Path) -> None:
    """Prefect reads its settings at import; use_prefect_api must still redirect flow runs."""
    script = textwrap.dedent(
        """
        import json, prefect
        from prefect import flow
        from prefect.settings import PREFECT_API_URL
        from shardeval.local_server import use_prefect_api

        @flow
        def tiny() -> int:
            return 1

        api = use_prefect_api()
        tiny()
        setting = PREFECT_API_URL.value()
        print(json.dumps({"url": api.url, "source": api.source, "setting": setting}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=cli_env(None, SHARDEVAL_HOME=str(home)),
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    said = json.loads(done.stdout.strip().splitlines()[-1])
    state = read_state(ServerFiles(home))
    assert state is not None
    assert said == {"url": state.url, "source": "local", "setting": state.url}
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(state.url) as client:
        names = {run.name for run in client.read_flow_runs()}
        flows = {client.read_flow(run.flow_id).name for run in client.read_flow_runs()}
    assert names and flows == {"tiny"}, "the flow run must be recorded by the local server"


@pytest.mark.slow
@pytest.mark.parametrize("where", ["environment", "profile"])
def test_an_explicit_api_url_wins(home: Path, tmp_path: Path, where: str) -> None:
    """Neither an explicit URL in the environment nor one in the active profile starts a server."""
    url = "http://127.0.0.1:9/api"
    env = {"PREFECT_API_URL": url} if where == "environment" else {}
    if where == "profile":
        profiles = tmp_path / "profiles.toml"
        profiles.write_text(f'active = "mine"\n[profiles.mine]\nPREFECT_API_URL = "{url}"\n')
        env["PREFECT_PROFILES_PATH"] = str(profiles)
    script = "from shardeval.local_server import use_prefect_api; print(use_prefect_api())"
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**cli_env(None, SHARDEVAL_HOME=str(home)), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"url='{url}', source='explicit'" in done.stdout
    assert not (home / "server.json").exists()


@pytest.mark.slow
def test_local_server_off_keeps_prefects_ephemeral_mode(home: Path) -> None:
    script = "from shardeval.local_server import use_prefect_api; print(use_prefect_api())"
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=cli_env(None, SHARDEVAL_HOME=str(home), SHARDEVAL_LOCAL_SERVER="0"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "url=None, source='ephemeral'" in done.stdout
    assert not (home / "server.json").exists()


@pytest.mark.slow
def test_two_processes_starting_at_once_start_one_server(home: Path) -> None:
    script = (
        "from shardeval.local_server import ensure_local_server, read_state, ServerFiles\n"
        "from pathlib import Path\n"
        "import sys\n"
        "url = ensure_local_server(home=Path(sys.argv[1]))\n"
        "print(url, read_state(ServerFiles(Path(sys.argv[1]))).pid)\n"
    )
    starters = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(home)],
            env=cli_env(None),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    answers = []
    for starter in starters:
        out, err = starter.communicate(timeout=240)
        assert starter.returncode == 0, err[-3000:]
        answers.append(out.split())
    assert answers[0] == answers[1], "both must use the one server"
    processes = [p for p in Path("/proc").iterdir() if p.name.isdigit()]
    started_here = [
        p
        for p in processes
        if b"shardeval.server_supervisor" in _cmdline(p) and str(home).encode() in _cmdline(p)
    ]
    assert len(started_here) == 1, "exactly one supervisor for this home"


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.slow
def test_a_proxy_in_the_environment_does_not_come_between_a_run_and_its_local_server(
    home: Path, tmp_path: Path
) -> None:
    # A shell that exports a company proxy (and no NO_PROXY): the health check and Prefect's
    # client (httpx, which honours HTTP_PROXY) went through it, and the run waited 180 s for
    # a server the proxy cannot reach.
    from tests.conftest import free_port
    from tests.helpers.specs import write_spec

    spec = write_spec(tmp_path / "eval", n_items=6)
    dead = f"http://127.0.0.1:{free_port()}"
    proxies = {"HTTP_PROXY": dead, "HTTPS_PROXY": dead, "NO_PROXY": "", "no_proxy": ""}
    result = shardeval_cli(home, "run", str(spec), **proxies)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rows: 6 · ok 6" in result.stdout + result.stderr
