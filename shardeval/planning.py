"""From a spec and a dataset to a plan: every request's key, cut into batches.

A *row* of the plan is one (item, trial) pair, in dataset order then trial order. Batches are
contiguous runs of ``batch_size`` rows, so writing batches in order writes results in dataset
order. The plan keeps only ids and keys (Arrow arrays); a batch's messages are rendered again
when the batch is handed out, so a million-item plan never holds a million message lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from shardeval.datasets import Dataset
from shardeval.hashing import batch_key, digest, item_key, model_hash
from shardeval.prompts import PromptRenderer
from shardeval.spec import EvalSpec

RENDER_CHUNK = 2_000


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

    @property
    def n_rows(self) -> int:
        """Rows = items × trials."""
        return int(self.rows.num_rows)

    def fingerprint(self) -> str:
        """Digest of every row key in order: equal plans have equal fingerprints."""
        return digest([b.key for b in self.batches])

    def requests(self, batch: BatchRef) -> list[PlannedRequest]:
        """Render the requests of one batch (again: the plan keeps only keys)."""
        rows = self.rows.slice(batch.start, batch.stop - batch.start).to_pydict()
        first, last = rows["item_index"][0], rows["item_index"][-1]
        items = self.dataset.items(first, last + 1)
        renderer = PromptRenderer(self.spec.prompt)
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
    """Render every prompt once to compute every key (raises PromptError naming the item)."""
    renderer = PromptRenderer(spec.prompt)
    model_digest = model_hash(spec.model)
    # Python objects exist for one chunk at a time; the plan itself is Arrow arrays.
    chunks: list[pa.Table] = []
    for start in range(0, len(dataset), RENDER_CHUNK):
        stop = min(start + RENDER_CHUNK, len(dataset))
        indices: list[int] = []
        ids: list[str] = []
        trials: list[int] = []
        keys: list[str] = []
        for offset, (item, item_id) in enumerate(
            zip(dataset.items(start, stop), dataset.ids(start, stop), strict=True)
        ):
            messages = renderer.render(item, item_id)
            for trial in range(spec.trials):
                indices.append(start + offset)
                ids.append(item_id)
                trials.append(trial)
                keys.append(item_key(model_digest, messages, trial))
        chunks.append(
            pa.table(
                {
                    "item_index": pa.array(indices, pa.int64()),
                    "item_id": pa.array(ids, pa.string()),
                    "trial": pa.array(trials, pa.int64()),
                    "item_key": pa.array(keys, pa.string()),
                }
            )
        )
    rows = pa.concat_tables(chunks).combine_chunks()
    plan = RunPlan(spec=spec, dataset=dataset, rows=rows)
    plan.batches = cut_batches(rows.column("item_key").to_pylist(), spec.batch_size)
    return plan


def cut_batches(keys: list[str], size: int) -> list[BatchRef]:
    """Contiguous batches of ``size`` rows, each keyed by its item keys in order.

    The only place batch keys are computed: a run's plan and its judges' plans both cut here.
    """
    total = (len(keys) + size - 1) // size
    return [
        BatchRef(
            number=number,
            total=total,
            key=batch_key(keys[start : start + size]),
            start=start,
            stop=min(start + size, len(keys)),
        )
        for number, start in enumerate(range(0, len(keys), size), start=1)
    ]


@dataclass(frozen=True)
class PlanDiff:
    """How the dataset changed since the previous attempt of the same run."""

    added: int
    removed: int
    edited: int

    @property
    def changed(self) -> bool:
        """Whether anything changed."""
        return bool(self.added or self.removed or self.edited)

    def describe(self) -> str:
        """``3 added, 1 edited, 0 removed``."""
        return f"{self.added:,} added, {self.edited:,} edited, {self.removed:,} removed"


def diff_plans(previous: pa.Table, current: pa.Table) -> PlanDiff:
    """Compare two plans' (item_id → keys) maps."""

    def by_id(table: pa.Table) -> dict[str, tuple[str, ...]]:
        out: dict[str, list[str]] = {}
        for item_id, key in zip(
            table.column("item_id").to_pylist(), table.column("item_key").to_pylist(), strict=True
        ):
            out.setdefault(item_id, []).append(key)
        return {k: tuple(v) for k, v in out.items()}

    old, new = by_id(previous), by_id(current)
    added = sum(1 for k in new if k not in old)
    removed = sum(1 for k in old if k not in new)
    edited = sum(1 for k, v in new.items() if k in old and old[k] != v)
    return PlanDiff(added=added, removed=removed, edited=edited)
