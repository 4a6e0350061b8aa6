"""Continuing a run from its id alone: ``shardeval resume RUN_ID`` and ``shardeval.resume``.

Everything needed is in the run's spec.json: the public spec (model block without secrets:
the API key is read from the environment variable it names), and the absolute ``dataset_url``
recorded at the last attempt, so a resume works from any directory and without the spec
file. The run id is kept as it is (never derived again).

The dataset is read again. If it vanished, or its content differs from the fingerprint
recorded in spec.json, the resume stops with exit 2 and says so (for a change: how many
items were added, edited and removed, compared with the run's plan.parquet), unless
``allow_dataset_change``: then, as with ``run``, only the changed items are sent.
"""

from __future__ import annotations

from typing import Any

from shardeval.catalog import open_store
from shardeval.errors import DatasetError, SpecError
from shardeval.planning import PlanDiff, diff_plans
from shardeval.session import RunSession
from shardeval.spec import EvalSpec, resolve_relative
from shardeval.storage import RunStore


class DatasetChanged(DatasetError):
    """The run's dataset differs from the one its last attempt recorded (exit 2)."""


def recorded_spec(store: RunStore) -> tuple[EvalSpec, dict[str, Any]]:
    """The spec run ``store`` was made with, its dataset path made absolute; and spec.json."""
    record = store.read_json(store.spec_path)
    if not isinstance(record, dict) or not isinstance(record.get("spec"), dict):
        raise SpecError(
            f"run {store.run_id!r} has no readable spec.json at {store.url('spec.json')}",
            hint="a run can be resumed only from its spec.json; run its spec with "
            f"`shardeval run SPEC --run-id {store.run_id}` instead",
        )
    data = dict(record["spec"])
    source = record.get("spec_source")
    url = record.get("dataset_url") or resolve_relative(data["dataset"]["path"], source)
    data["dataset"] = {**data["dataset"], "path": url}
    try:
        spec = EvalSpec.model_validate(data)
    except Exception as exc:
        raise SpecError(
            f"run {store.run_id!r}: its spec.json no longer validates with this shardeval: {exc}"
        ) from None
    spec._source = source
    return spec, record


def prepare_resume(
    run_id: str,
    output: str,
    *,
    retry_failed: bool = False,
    allow_dataset_change: bool = False,
    limit: int | None = None,
) -> RunSession:
    """A session that continues run ``run_id`` under ``output`` (raises exit-2 errors).

    ``limit`` defaults to the last attempt's ``--limit``, as spec.json records it.
    """
    store = open_store(output, run_id)
    spec, record = recorded_spec(store)
    if limit is None and isinstance(record.get("limit"), int):
        limit = record["limit"]  # the last attempt's --limit (spec.json records it)
    try:
        session = RunSession.prepare(
            spec, output=output, run_id=run_id, retry_failed=retry_failed, limit=limit
        )
    except DatasetError as exc:
        raise DatasetError(
            f"run {run_id}: cannot read its dataset {spec.dataset.path}: {exc.message}",
            hint="the dataset was moved or deleted since the run's last attempt; put it back, "
            "or run a spec that points at its new place with "
            f"`shardeval run SPEC --run-id {run_id}`",
        ) from exc
    recorded = record.get("dataset_fingerprint")
    if recorded is None or session.validated.dataset.fingerprint == recorded:
        return session
    previous_limit = record.get("limit") if isinstance(record.get("limit"), int) else None
    diff = plan_diff(store, session, previous_limit, limit)
    if limit != previous_limit and diff is not None and not diff.changed:
        return session  # another --limit than last time: more (or fewer) items, same dataset
    if allow_dataset_change:
        return session
    hint = (
        "pass --allow-dataset-change to evaluate the changed items (the stored results "
        "of unchanged items are kept), or `shardeval run SPEC --fresh` for a new run"
    )
    only_added = diff is not None and diff.added and not diff.edited and not diff.removed
    if only_added and limit is None and "limit" not in record:  # spec.json of shardeval 0.1
        hint += "; if the last attempt used --limit N, pass --limit N to resume only those"
    raise DatasetChanged(
        f"run {run_id}: its dataset {spec.dataset.path} changed since the run's last "
        f"attempt: {describe_change(diff)}",
        hint=hint,
    )


def plan_diff(
    store: RunStore, session: RunSession, previous_limit: int | None, limit: int | None
) -> PlanDiff | None:
    """The session's plan against the run's plan.parquet (None if there is none)."""
    previous = store.read_table(store.plan_path, columns=["item_id", "item_key"])
    if previous is None:
        return None
    return diff_plans(previous, session.plan.rows, previous_limit=previous_limit, limit=limit)


def describe_change(diff: PlanDiff | None) -> str:
    """``3 added, 1 edited, 0 removed``, or what else differs."""
    if diff is None:
        return "its content differs from the fingerprint recorded in spec.json"
    if not diff.changed:
        return (
            "no prompt changed, but fields the prompt does not use (such as targets) did, "
            "so scores may differ"
        )
    return diff.describe()
