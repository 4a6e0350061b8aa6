"""What a resume says changed: a raised or lowered ``--limit`` is not a dataset change."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from shardeval.overrides import resolve_spec
from shardeval.planning import diff_plans
from shardeval.session import RunSession
from shardeval.storage import RunStore
from shardeval.survey import survey
from shardeval.validation import validate
from tests.helpers.specs import write_spec


def plan(ids: list[str], edited: frozenset[str] = frozenset()) -> pa.Table:
    return pa.table(
        {"item_id": ids, "item_key": [f"k-{i}" + ("-v2" if i in edited else "") for i in ids]}
    )


ALL = [f"q{i:03d}" for i in range(200)]


def test_limit_raised() -> None:
    diff = diff_plans(plan(ALL[:20]), plan(ALL), previous_limit=20, limit=None)
    assert (diff.limit_raised, diff.added, diff.changed) == (180, 0, False)
    assert diff.explain() == "limit raised: 180 more items"
    assert (
        diff_plans(plan(ALL[:20]), plan(ALL[:50]), previous_limit=20, limit=50).limit_raised == 30
    )


def test_limit_lowered() -> None:
    diff = diff_plans(plan(ALL), plan(ALL[:20]), previous_limit=None, limit=20)
    assert diff.explain() == "limit lowered: 180 fewer items"


def test_rows_appended_without_a_limit_are_a_dataset_change() -> None:
    diff = diff_plans(plan(ALL[:20]), plan(ALL))
    assert (diff.added, diff.limit_raised) == (180, 0)
    assert (
        diff.explain() == "dataset changed since the last attempt: 180 added, 0 edited, 0 removed"
    )


def test_an_edit_within_the_limit_is_still_reported() -> None:
    diff = diff_plans(
        plan(ALL[:20]), plan(ALL, edited=frozenset({"q003"})), previous_limit=20, limit=None
    )
    assert (diff.added, diff.edited, diff.limit_raised) == (180, 1, 0)
    assert diff.changed


def test_survey_reads_the_previous_attempts_limit(tmp_path: Path) -> None:
    """``--limit 5`` then a full run: spec.json recorded the 5, the survey says "raised"."""
    spec = resolve_spec(str(write_spec(tmp_path, n_items=12)))
    store = RunStore(str(tmp_path / "out"), "limits")
    with RunSession(validate(spec, limit=5), "limits", store).attempt():
        pass  # records the attempt (spec.json, plan.parquet)
    assert store.read_json(store.spec_path)["limit"] == 5

    found = survey(store, validate(spec).plan)
    assert found.diff is not None
    assert found.diff.explain() == "limit raised: 7 more items"
