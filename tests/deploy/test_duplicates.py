"""Concurrent duplicates of one batch pay once (SERIALIZABLE isolation with a lock manager)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shardeval.engines import close_engines
from shardeval.overrides import resolve_spec
from shardeval.runner import RunRef
from shardeval.storage import RunStore
from shardeval.validation import validate
from tasks.batch import LOCKS_ENV, batch_task_for
from tests.helpers.specs import first_work, write_spec


def race(spec_path: Path, output: Path, run_id: str) -> list[str]:
    """Submit the first batch twice at once, in one flow run; the two task runs' state names."""
    from prefect import flow

    spec = resolve_spec(str(spec_path))
    validated = validate(spec)
    store = RunStore(str(output), run_id)
    run = RunRef(run_id=run_id, output=store.output, model=spec.model)
    work = first_work(validated, store)

    @flow(name="race")
    def both() -> list[str]:
        task = batch_task_for(run)
        futures = [task.submit(work, run), task.submit(work, run)]
        return sorted(f.state.name for f in futures if f.wait() is None)

    try:
        return both()
    finally:
        close_engines(run_id)


@pytest.mark.slow
def test_two_task_runs_racing_on_one_batch_send_it_once(
    use_server: str, llm_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm_server.configure(latency_min=0.02, latency_max=0.03)
    spec = write_spec(
        tmp_path / "eval",
        base_url=llm_server.url,
        n_items=20,
        batch_size=20,
        model={"concurrency": 2},
    )
    assert race(spec, tmp_path / "locked", "race") == ["Cached", "Completed"]
    assert llm_server.stats()["completions"] == 20

    # The control: without the lock manager both task runs run. In one process the engine
    # still sends each identical request once (both batches' rows share the answers), so
    # even then nothing is paid twice; across processes the lock manager is what prevents it.
    monkeypatch.setenv(LOCKS_ENV, "0")
    llm_server.reset()
    assert race(spec, tmp_path / "unlocked", "race") == ["Completed", "Completed"]
    assert llm_server.stats()["completions"] == 20
