"""``runs``, ``rm`` and ``resume`` with the output on S3 (moto, and SeaweedFS in CI).

* What ``runs`` costs: 50 runs are listed with one LIST and one GET per run, counted at the
  S3 server (every client, every retry).
* ``rm`` stopped half-way (the store fails its second delete request) never leaves a run that
  ``runs`` reports complete without its results.
* The command-line scenario of tests/integration/test_runs.py, on SeaweedFS.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shardeval.errors import StorageError
from shardeval.removal import delete, select
from shardeval.runcard import CARD_FILE
from shardeval.runlist import list_runs
from shardeval.session import RunSession
from shardeval.storage import RunStore
from shardeval.testing.server import ServerConfig, TestServer
from tests.helpers.specs import write_spec
from tests.s3.servers import S3Backend, SeaweedBackend
from tests.unit.test_session import run_without_prefect

N_RUNS = 50


def one_run(tmp_path: Path, output: str, name: str = "arith") -> RunSession:
    spec = write_spec(tmp_path / name, n_items=6, batch_size=3, name=name, output=output)
    session = RunSession.prepare(str(spec))
    run_without_prefect(session)
    return session


def copy_run(backend: S3Backend, bucket: str, source: str, target: str) -> None:
    """A copy of a run directory under another id (its card says the new id)."""
    fs = backend.filesystem()
    root = f"{bucket}/out/runs"
    for path in fs.find(f"{root}/{source}"):
        relative = path[len(f"{root}/{source}/") :]
        data = fs.cat_file(path)
        if relative == CARD_FILE:
            card = json.loads(data)
            card["run_id"] = target
            data = json.dumps(card).encode()
        fs.pipe_file(f"{root}/{target}/{relative}", data)


def test_listing_50_runs_costs_one_list_and_one_get_per_run(
    tmp_path: Path, s3_backend: S3Backend, bucket: str
) -> None:
    output = f"s3://{bucket}/out"
    first = one_run(tmp_path, output)
    for number in range(1, N_RUNS):
        copy_run(s3_backend, bucket, first.run_id, f"arith-copy{number:02d}")

    before = s3_backend.request_counts()
    listed = list_runs(output)
    spent = s3_backend.request_counts() - before
    assert len(listed) == N_RUNS
    assert {e.status for e in listed} == {"complete"}
    assert spent["LIST"] == 1, spent
    assert spent["GET"] == N_RUNS, spent
    assert sum(spent.values()) == N_RUNS + 1, spent

    # Five runs written by an older shardeval (no card): three more GETs each
    # (spec.json, metrics.json, tags.json) after the card's 404, and lock.json.
    fs = s3_backend.filesystem()
    for number in range(1, 6):
        fs.rm(f"{bucket}/out/runs/arith-copy{number:02d}/{CARD_FILE}")
    before = s3_backend.request_counts()
    listed = list_runs(output)
    spent = s3_backend.request_counts() - before
    assert len(listed) == N_RUNS and sum(e.legacy for e in listed) == 5
    assert spent["LIST"] == 1, spent
    assert spent["GET"] <= N_RUNS + 5 * 4, spent


def test_rm_stopped_half_way_never_leaves_a_complete_run_without_results(
    tmp_path: Path, s3_backend: S3Backend, bucket: str
) -> None:
    output = f"s3://{bucket}/out"
    base = one_run(tmp_path, output)
    fs = RunStore(output, base.run_id).fs
    for allowed in range(4):  # delete requests the store answers before it fails
        run_id = f"arith-half{allowed}"
        copy_run(s3_backend, bucket, base.run_id, run_id)
        fs.invalidate_cache()
        deletes = collections.Counter[str]()

        def fail_after(
            allowed: int = allowed, deletes: collections.Counter[str] = deletes, **kwargs: Any
        ) -> None:
            if kwargs.get("event_name", "").endswith((".DeleteObject", ".DeleteObjects")):
                deletes["sent"] += 1
                if deletes["sent"] > allowed:
                    raise ConnectionResetError("the store went away (test)")

        fs.s3.meta.events.register("before-call.s3", fail_after)
        try:
            # run.json, metrics.json, the rest: one request each; then the lease's own
            # lock.json, whose failed delete is left to expire (the run is gone by then).
            try:
                delete(output, select(output, [run_id], None, []))
                assert allowed == 3
            except StorageError:
                assert allowed < 3
        finally:
            fs.s3.meta.events.unregister("before-call.s3", fail_after)
        fs.invalidate_cache()
        entries = {e.run_id: e for e in list_runs(output)}
        store = RunStore(output, run_id)
        if run_id in entries and entries[run_id].status == "complete":
            assert store.exists(store.results_path), f"complete without results ({allowed})"
            assert store.exists(store.metrics_path)
        states = {e.run_id: e.status for e in list_runs(output)}
        assert allowed < 2 or states.get(run_id) != "complete", states
    # Once the store answers, rm goes through (the base run: every file).
    removal = delete(output, select(output, [base.run_id], None, []))
    assert removal.deleted == [base.run_id]
    fs.invalidate_cache()
    assert base.run_id not in {e.run_id for e in list_runs(output)}
    root = f"{bucket}/out/runs/{base.run_id}"
    # No object is left (SeaweedFS may keep the emptied directory itself, which is not listed).
    assert [p for p in fs.find(root) if p.startswith(f"{root}/")] == []


@pytest.fixture
def seaweed(
    seaweedfs_s3: SeaweedBackend, monkeypatch: pytest.MonkeyPatch
) -> Iterator[SeaweedBackend]:
    seaweedfs_s3.ensure_up()
    for name, value in seaweedfs_s3.env().items():
        monkeypatch.setenv(name, value)
    yield seaweedfs_s3


@pytest.mark.slow
def test_runs_resume_rm_and_tags_on_seaweedfs(
    tmp_path: Path, prefect_api: str, seaweed: SeaweedBackend
) -> None:
    from tests.integration.test_runs import Cli, runs_scenario

    bucket = seaweed.make_bucket()
    config = ServerConfig(latency_min=0.02, latency_max=0.05)
    with TestServer.start_subprocess(config) as server:
        runs_scenario(tmp_path, server, Cli(prefect_api, **seaweed.env()), f"s3://{bucket}/out")
