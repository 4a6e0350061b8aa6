"""From a spec and a dataset to a plan: every request's key, cut into batches.

A *row* of the plan is one (item, trial) pair, in dataset order then trial order. Batches are
contiguous runs of ``batch_size`` rows, so writing batches in order writes results in dataset
order. The plan keeps only ids and keys (Arrow arrays); a batch's messages are rendered again
when the batch is handed out, so a million-item plan never holds a million message lists.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from shardeval.datasets import Dataset
from shardeval.hashing import batch_key, digest, item_key, model_hash
from shardeval.prompts import PromptRenderer
from shardeval.spec import EvalSpec

RENDER_CHUNK = 10_000


@dataclass(frozen=True)
class PlannedRequest:
    """One request of a batch: what to send and where its row goes."""

    key: str
    item_id: str
    item_index: int
    trial: int
    messages: list[dict[str, str]]
    item: dict[str, Any]


@dataclass(frozen=True)
class BatchRef:
    """A batch's place in the plan (rows ``start:stop``)."""

    number: int
    total: int
    key: str
    start: int
    stop: int

    @property
    def label(self) -> str:
        """``batch 12/40``: how Prefect names the task run."""
        return f"batch {self.number}/{self.total}"


@dataclass
class RunPlan:
    """Every row's identity, and the batches."""

    spec: EvalSpec
    dataset: Dataset
    rows: pa.Table  # item_index, item_id, trial, item_key
    batches: list[BatchRef] = field(default_factory=list)
    limit: int | None = None
    """``--limit``, if the plan covers only the first N items (recorded in spec.json)."""

    @property
    def n_rows(self) -> int:
        """Rows = items × trials."""
        return int(self.rows.num_rows)

    def fingerprint(self) -> str:
        """Digest of every row key in order: equal plans have equal fingerprints."""
        return digest([b.key for b in self.batches])

    @functools.cached_property
    def _renderer(self) -> PromptRenderer:
        """One renderer for every batch (building one parses and compiles the templates)."""
        return PromptRenderer(self.spec.prompt)

    def requests(self, batch: BatchRef) -> list[PlannedRequest]:
        """Render the requests of one batch (again: the plan keeps only keys)."""
        rows = self.rows.slice(batch.start, batch.stop - batch.start).to_pydict()
        first, last = rows["item_index"][0], rows["item_index"][-1]
        items = self.dataset.items(first, last + 1)
        renderer = self._renderer
        rendered: dict[int, list[dict[str, str]]] = {}
        out = []
        for index, item_id, trial, key in zip(
            rows["item_index"], rows["item_id"], rows["trial"], rows["item_key"], strict=True
        ):
            item = items[index - first]
            if index not in rendered:
                rendered[index] = renderer.render(item, item_id)
            out.append(PlannedRequest(key, item_id, index, trial, rendered[index], item))
        return out


def build_plan(spec: EvalSpec, dataset: Dataset) -> RunPlan:
    """Render every prompt once to compute every key (raises PromptError naming the item).

    Only the keys are computed per row in Python; indices, ids and trials are Arrow/numpy
    columns built in one go (at a million rows the per-row appends were a third of planning).
    """
    render = PromptRenderer(spec.prompt).render
    model_digest = model_hash(spec.model)
    trials = spec.trials
    # Python objects exist for one chunk at a time; the plan itself is Arrow arrays.
    chunks: list[pa.Table] = []
    for start in range(0, len(dataset), RENDER_CHUNK):
        stop = min(start + RENDER_CHUNK, len(dataset))
        keys = [
            item_key(model_digest, messages, trial)
            for item, item_id in zip(
                dataset.items(start, stop), dataset.ids(start, stop), strict=True
            )
            for messages in (render(item, item_id),)
            for trial in range(trials)
        ]
        positions = np.repeat(np.arange(start, stop, dtype=np.int64), trials)
        ids = dataset.table.column("item_id").slice(start, stop - start)
        chunks.append(
            pa.table(
                {
                    "item_index": pa.array(positions, pa.int64()),
                    "item_id": ids.take(pa.array(positions - start)) if trials > 1 else ids,
                    "trial": pa.array(np.tile(np.arange(trials, dtype=np.int64), stop - start)),
                    "item_key": pa.array(keys, pa.string()),
                }
            )
        )
    rows = pa.concat_tables(chunks).combine_chunks()
    plan = RunPlan(spec=spec, dataset=dataset, rows=rows)
    plan.batches = cut_batches(rows.column("item_key"), spec.batch_size)
    return plan


def cut_batches(keys: list[str] | pa.Array | pa.ChunkedArray, size: int) -> list[BatchRef]:
    """Contiguous batches of ``size`` rows, each keyed by its item keys in order.

    The only place batch keys are computed: a run's plan and its judges' plans both cut here.
    Arrow keys become Python strings one batch at a time (a million at once is ~90 MB).
    """
    total = (len(keys) + size - 1) // size
    batches = []
    for number, start in enumerate(range(0, len(keys), size), start=1):
        chunk = keys[start : start + size]
        if not isinstance(chunk, list):
            chunk = chunk.to_pylist()
        batches.append(
            BatchRef(
                number=number,
                total=total,
                key=batch_key(chunk),
                start=start,
                stop=min(start + size, len(keys)),
            )
        )
    return batches


@dataclass(frozen=True)
class PlanDiff:
    """How the plan changed since the previous attempt of the same run.

    Items that came or went because ``--limit`` changed (the plans are then a prefix of one
    another) are counted apart: the dataset did not change.
    """

    added: int
    removed: int
    edited: int
    limit_raised: int = 0
    """Items in the plan now because the limit was raised (or dropped)."""
    limit_lowered: int = 0
    """Items out of the plan now because the limit was lowered."""

    @property
    def changed(self) -> bool:
        """Whether the dataset changed (a changed ``--limit`` alone is not a change)."""
        return bool(self.added or self.removed or self.edited)

    def describe(self) -> str:
        """``3 added, 1 edited, 0 removed``."""
        return f"{self.added:,} added, {self.edited:,} edited, {self.removed:,} removed"

    def explain(self) -> str:
        """What a person is told on resume (empty when nothing changed)."""
        notes = []
        if self.limit_raised:
            notes.append(f"limit raised: {self.limit_raised:,} more items")
        if self.limit_lowered:
            notes.append(f"limit lowered: {self.limit_lowered:,} fewer items")
        if self.changed:
            notes.append(f"dataset changed since the last attempt: {self.describe()}")
        return "; ".join(notes)


def diff_plans(
    previous: pa.Table,
    current: pa.Table,
    *,
    previous_limit: int | None = None,
    limit: int | None = None,
) -> PlanDiff:
    """Compare two plans' (item_id → keys) maps.

    With the limits of both attempts: when one plan's items are the first items of the other
    and the shorter one was cut by its limit, the difference is the limit's, not the dataset's.
    """

    def by_id(table: pa.Table) -> dict[str, tuple[str, ...]]:
        out: dict[str, list[str]] = {}
        for item_id, key in zip(
            table.column("item_id").to_pylist(), table.column("item_key").to_pylist(), strict=True
        ):
            out.setdefault(item_id, []).append(key)
        return {k: tuple(v) for k, v in out.items()}

    old, new = by_id(previous), by_id(current)
    if (
        previous_limit is not None
        and len(old) == previous_limit < len(new)
        and (limit is None or limit > previous_limit)
        and _is_prefix(old, new)
    ):
        return PlanDiff(0, 0, 0, limit_raised=len(new) - len(old))
    if (
        limit is not None
        and len(new) == limit < len(old)
        and (previous_limit is None or previous_limit > limit)
        and _is_prefix(new, old)
    ):
        return PlanDiff(0, 0, 0, limit_lowered=len(old) - len(new))
    added = sum(1 for k in new if k not in old)
    removed = sum(1 for k in old if k not in new)
    edited = sum(1 for k, v in new.items() if k in old and old[k] != v)
    return PlanDiff(added=added, removed=removed, edited=edited)


def _is_prefix(short: dict[str, tuple[str, ...]], long: dict[str, tuple[str, ...]]) -> bool:
    """Whether ``short``'s items (in order, same keys) are the first items of ``long``."""
    return all(a == b and short[a] == long[b] for a, b in zip(short, long, strict=False))
