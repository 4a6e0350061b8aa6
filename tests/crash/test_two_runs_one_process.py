"""Notebook-style: a run stopped gracefully does not stop the next run in the same process.

Both runs are the ``evaluate`` flow called in this process (as a notebook or a served flow
would), against the session's Prefect server and the real test model server. The first is
asked to stop through the library's stop API once it is busy; the second (same run id, so
it resumes) must start clean and complete, sending only what the first did not store.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardeval import interrupt
from shardeval.errors import RunInterrupted
from shardeval.testing.server import TestServer
from tests.crash.harness import CONCURRENCY, answered_twice, crash_spec

pytestmark = pytest.mark.slow

N_ITEMS = 400


@pytest.fixture
def use_server(prefect_api: str) -> Iterator[str]:
    """This process's Prefect pointed at the session's server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_api}):
        yield prefect_api
        # Send the flow runs' logs now, while the server is still up.
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)


def stop_when_answered(server: TestServer, run_id: str, answers: int) -> threading.Thread:
    """Stop ``run_id`` (as a notebook user would) once the server answered ``answers``."""

    def watch() -> None:
        while server.stats()["completions"] < answers:
            if interrupt.stop_for(run_id).wait(0.01):
                return
        interrupt.stop_run(run_id, "interrupted", "stopped from the notebook", grace_period_s=5)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_second_run_in_the_same_process_starts_clean(
    tmp_path: Path, use_server: str, slow_server: TestServer
) -> None:
    from flows.evaluate import evaluate

    spec = crash_spec(tmp_path / "eval", slow_server, n_items=N_ITEMS)
    output, run_id = str(tmp_path / "out"), "notebook-run"
    watcher = stop_when_answered(slow_server, run_id, 100)
    with pytest.raises(RunInterrupted, match=r"stopped from the notebook: .* run the same command"):
        evaluate(spec=str(spec), output=output, run_id=run_id)
    watcher.join(timeout=10)
    first = slow_server.stats()["completions"]
    assert 100 <= first < N_ITEMS

    summary = evaluate(spec=str(spec), output=output, run_id=run_id)
    assert summary["complete"] and summary["n_rows"] == N_ITEMS
    assert len(slow_server.stats()["prompt_completions"]) == N_ITEMS
    assert answered_twice(slow_server) <= CONCURRENCY
    assert not (tmp_path / "out" / "runs" / run_id / "lock.json").exists()


def test_a_fresh_run_stopped_in_python_names_the_run_id_to_resume(
    tmp_path: Path, prefect_api: str, slow_server: TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fresh=True`` again would start another run: the error names the ``run_id`` to pass."""
    import shardeval

    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    spec = crash_spec(tmp_path / "eval", slow_server, n_items=N_ITEMS)
    output = str(tmp_path / "out")

    def stop_once_busy() -> None:
        deadline = time.monotonic() + 120
        while slow_server.stats()["completions"] < 100 and time.monotonic() < deadline:
            time.sleep(0.01)
        interrupt.stop_active("interrupted", "stopped from the notebook", grace_period_s=5)

    watcher = threading.Thread(target=stop_once_busy, daemon=True)
    watcher.start()
    with pytest.raises(RunInterrupted) as raised:
        shardeval.run(str(spec), output=output, fresh=True)
    watcher.join(timeout=10)
    (run_dir,) = (tmp_path / "out" / "runs").iterdir()
    advice = f"call it again with run_id='{run_dir.name}' in place of fresh=True to resume"
    assert advice in str(raised.value)

    run = shardeval.run(str(spec), output=output, run_id=run_dir.name)
    assert run.id == run_dir.name and len(run.results()) == N_ITEMS
    assert answered_twice(slow_server) <= CONCURRENCY
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=5)  # the flow runs' logs, while the server is still up
