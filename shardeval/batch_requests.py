"""A batch's requests as a small reference to the plan, rendered inside the batch task.

Before each task run Prefect walks the task's parameters (``visit_collection``, looking for
upstream futures) and again when it records the task run's inputs: a :class:`BatchWork`
holding a list of a thousand rendered requests costs that walk in every task run, on the
flow's thread, for nothing. :class:`PlanRequests` is not a collection to Prefect (an opaque
object), so the walk stops at it; the batch renders its requests from the plan when it runs.

Another process (a Dask worker) has no plan in memory: pickling a :class:`PlanRequests`
renders it, and the worker receives a plain list, as before.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any, overload

import pyarrow as pa
import pyarrow.compute as pc

from shardeval.planning import BatchRef, PlannedRequest, RunPlan


class PlanRequests(Sequence[PlannedRequest]):
    """The requests of one batch of ``plan``, rendered on first use (then kept)."""

    def __init__(self, plan: RunPlan, batch: BatchRef) -> None:
        self.plan = plan
        self.batch = batch
        self._rendered: list[PlannedRequest] | None = None
        self._lock = threading.Lock()

    def rendered(self) -> list[PlannedRequest]:
        """The requests, rendered once (thread-safe)."""
        with self._lock:
            if self._rendered is None:
                self._rendered = self.plan.requests(self.batch)
            return self._rendered

    def __len__(self) -> int:
        return self.batch.stop - self.batch.start

    @overload
    def __getitem__(self, index: int) -> PlannedRequest: ...
    @overload
    def __getitem__(self, index: slice) -> list[PlannedRequest]: ...
    def __getitem__(self, index: int | slice) -> PlannedRequest | list[PlannedRequest]:
        return self.rendered()[index]

    def __iter__(self) -> Iterator[PlannedRequest]:
        return iter(self.rendered())

    def __reduce__(self) -> tuple[Any, ...]:
        # Another process has no plan: it gets the rendered list.
        return (list, (self.rendered(),))

    def __repr__(self) -> str:
        return f"PlanRequests({self.batch.label}, {len(self)} requests)"


def duplicate_keys(plan: RunPlan) -> frozenset[str]:
    """Item keys that more than one row of the plan holds (the same request asked twice).

    A dataset with the same prompt under two ids gives the same key twice; the run's engine
    sends it once and serves both rows (see ``Engine.submit_batch``). Usually empty, and
    computed in Arrow: a million-row plan costs a few hundred milliseconds.
    """
    keys = plan.rows.column("item_key")
    if len(keys) < 2:
        return frozenset()
    counts = pc.value_counts(keys)
    if len(counts) == len(keys):
        return frozenset()
    values = counts.field("values")
    repeated = pc.greater(counts.field("counts"), pa.scalar(1, pa.int64()))
    return frozenset(values.filter(repeated).to_pylist())


def batch_shared(plan: RunPlan, batch: BatchRef, duplicates: frozenset[str]) -> frozenset[str]:
    """The keys of ``batch`` that are in ``duplicates`` (empty at no cost when it is)."""
    if not duplicates:
        return frozenset()
    keys = plan.rows.column("item_key").slice(batch.start, batch.stop - batch.start)
    return frozenset(k for k in keys.to_pylist() if k in duplicates)
