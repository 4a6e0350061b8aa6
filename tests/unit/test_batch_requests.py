"""A batch's requests travel as a reference to the plan; another process gets them rendered."""

from __future__ import annotations

import pickle
from pathlib import Path

from prefect.utilities.collections import visit_collection

from shardeval.batch_requests import PlanRequests, batch_shared, duplicate_keys
from shardeval.session import RunSession
from tests.helpers.specs import arith_items, write_spec


def test_plan_requests_render_like_the_plan_and_pickle_as_a_list(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, n_items=12, batch_size=5, output=str(tmp_path / "out"))
    plan = RunSession.prepare(str(spec)).plan
    batch = plan.batches[1]
    lazy = PlanRequests(plan, batch)
    assert len(lazy) == 5
    assert list(lazy) == plan.requests(batch)
    assert lazy[0] == plan.requests(batch)[0]
    shipped = pickle.loads(pickle.dumps(lazy))  # what a Dask worker receives
    assert isinstance(shipped, list) and shipped == plan.requests(batch)


def test_prefect_does_not_walk_into_a_batch_s_requests(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, n_items=12, batch_size=5, output=str(tmp_path / "out"))
    plan = RunSession.prepare(str(spec)).plan
    lazy = PlanRequests(plan, plan.batches[0])
    visited: list[object] = []
    visit_collection({"work": lazy}, visit_fn=visited.append, return_data=False)
    assert lazy._rendered is None  # nothing was rendered for the walk
    assert not any(type(v).__name__ == "PlannedRequest" for v in visited)


def test_duplicate_keys_are_the_keys_two_rows_hold(tmp_path: Path) -> None:
    items = arith_items(6, seed=1)
    items += [{**items[0], "id": "again"}]
    spec = write_spec(tmp_path, items=items, batch_size=3, output=str(tmp_path / "out"))
    plan = RunSession.prepare(str(spec)).plan
    keys = plan.rows.column("item_key").to_pylist()
    assert duplicate_keys(plan) == frozenset({keys[0]})
    assert batch_shared(plan, plan.batches[0], duplicate_keys(plan)) == frozenset({keys[0]})
    assert batch_shared(plan, plan.batches[1], duplicate_keys(plan)) == frozenset()
    assert batch_shared(plan, plan.batches[2], duplicate_keys(plan)) == frozenset({keys[0]})
