"""Run one batch: reuse what is stored, send the rest, flush as items finish, commit.

This is the library half of the batch task and does not import Prefect. A batch:

1. returns at once if its committed file exists and reads (the run's Parquet is the truth,
   whatever Prefect's cache says);
2. reads its flushed parts, and rows of other stored files the plan pointed it at (items
   stored under an older batching or dataset version), and sends only the remaining keys;
3. makes finished items durable as small Parquet parts at least every ``flush_every_s`` seconds
   or ``flush_every_items`` items (the flush runs in this worker thread, never on the event
   loop that carries the requests), so a SIGKILL loses at most one flush window;
4. when every row has a final outcome, writes the batch file in one atomic step and then
   removes its parts. Transient failures that outlasted the retries are never stored: the
   batch raises :class:`BatchIncomplete` and a rerun sends only those.
"""

from __future__ import annotations

import concurrent.futures
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from shardeval import interrupt
from shardeval.engine import Engine, Outcome
from shardeval.errors import RunInterrupted, TransientProviderError
from shardeval.planning import PlannedRequest
from shardeval.progress import RunProgress
from shardeval.providers.base import ProviderRequest
from shardeval.results import GENERATION_SCHEMA, conform, outcomes_table
from shardeval.spec import ModelSpec
from shardeval.storage import RunStore


@dataclass(frozen=True)
class RunRef:
    """Which run a task works for: enough to rebuild its store and engine in any process."""

    run_id: str
    output: str
    model: ModelSpec

    def store(self) -> RunStore:
        """The run's storage."""
        return RunStore(self.output, self.run_id)


@dataclass(frozen=True)
class BatchWork:
    """Everything a batch task needs: small, picklable, independent of the flow's memory."""

    run_id: str
    number: int
    total: int
    key: str
    requests: list[PlannedRequest]
    reuse: dict[str, list[str]] = field(default_factory=dict)
    """Other stored files (path → item keys) holding some of this batch's results."""
    retry_failed: bool = False
    flush_every_s: float = 2.0
    flush_every_items: int = 16

    @property
    def label(self) -> str:
        """``batch 12/40``."""
        return f"batch {self.number}/{self.total}"


@dataclass(frozen=True)
class BatchPointer:
    """What the batch task returns (and Prefect caches): where the rows are, not the rows."""

    batch: str
    uri: str
    rows: int
    sent: int = 0
    reused: int = 0
    errors: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (Prefect's result serializer is JSON)."""
        return {
            "batch": self.batch,
            "uri": self.uri,
            "rows": self.rows,
            "sent": self.sent,
            "reused": self.reused,
            "errors": self.errors,
        }


class BatchIncomplete(TransientProviderError):
    """Some items of a batch failed transiently beyond the retries; they were not stored."""

    def __init__(self, label: str, failed: int, example: str | None) -> None:
        super().__init__(
            f"{label}: {failed} item(s) failed transiently after retries"
            + (f" (e.g. {example})" if example else "")
            + "; they were not stored and a rerun will retry them",
        )
        self.failed = failed


def run_batch(
    store: RunStore, work: BatchWork, engine: Engine, progress: RunProgress
) -> BatchPointer:
    """Run one batch to its committed file (see the module docstring)."""
    unique_keys = list(dict.fromkeys(r.key for r in work.requests))
    committed = _read_committed(store, work)
    if committed is not None:
        progress.reused(len(work.requests))
        progress.batch_finished()
        return BatchPointer(work.key, store.url_of(store.batch_path(work.key)), committed)

    stored, read_parts = _stored_rows(store, work)
    if work.retry_failed and stored.num_rows:
        stored = stored.filter(pc.equal(stored.column("status"), "ok"))
    have = set(stored.column("item_key").to_pylist())
    pending = [r for r in _unique(work.requests) if r.key not in have]
    progress.reused(sum(1 for r in work.requests if r.key in have))

    flusher = _PartFlusher(store, work)
    outcomes, transient = _send(pending, engine, flusher, progress, work)
    flusher.flush()

    if transient:
        example = transient[0].error
        raise BatchIncomplete(work.label, len(transient), example)
    if interrupt.stop_requested() and len(outcomes) < len(pending):
        raise RunInterrupted(f"{work.label}: stopped; finished items were saved")

    fresh = outcomes_table(outcomes, *_meta(work.requests)) if outcomes else None
    table = _merge(stored, fresh, unique_keys)
    store.write_table(store.batch_path(work.key), table)
    store.delete(read_parts + flusher.written)
    store.remove_empty_dir(store.parts_dir(work.key))
    progress.batch_finished()
    errors = int(pc.sum(pc.equal(table.column("status"), "error")).as_py() or 0)
    return BatchPointer(
        work.key,
        store.url_of(store.batch_path(work.key)),
        table.num_rows,
        sent=len(outcomes),
        reused=len(have),
        errors=errors,
    )


def _unique(requests: list[PlannedRequest]) -> list[PlannedRequest]:
    seen: set[str] = set()
    out = []
    for request in requests:
        if request.key not in seen:
            seen.add(request.key)
            out.append(request)
    return out


def _meta(requests: list[PlannedRequest]) -> tuple[dict[str, str], dict[str, int]]:
    return {r.key: r.item_id for r in requests}, {r.key: r.trial for r in requests}


def _read_committed(store: RunStore, work: BatchWork) -> int | None:
    """Rows of the committed batch file, or None if it must be (re)computed."""
    table = store.read_table(store.batch_path(work.key), columns=["item_key", "status"])
    if table is None:
        return None
    if work.retry_failed and pc.any(pc.equal(table.column("status"), "error")).as_py():
        return None
    return int(table.num_rows)


def _stored_rows(store: RunStore, work: BatchWork) -> tuple[pa.Table, list[str]]:
    """Rows already stored for this batch, and the parts that were read.

    Sources are the batch's own parts, then other files the plan named; the parts read are
    deleted once the batch is committed.
    """
    wanted = {r.key for r in work.requests}
    tables = []
    read_parts = []
    own_parts = store.list_batch_parts(work.key)
    sources: list[tuple[str, set[str] | None]] = [(path, None) for path in own_parts]
    sources += [(path, set(keys)) for path, keys in work.reuse.items()]
    for path, keys in sources:
        table = store.read_table(path)
        if table is None:
            continue
        if keys is None:
            read_parts.append(path)
        table = conform(table)
        mask = pc.is_in(table.column("item_key"), value_set=pa.array(sorted(keys or wanted)))
        tables.append(table.filter(mask))
    if not tables:
        return GENERATION_SCHEMA.empty_table(), read_parts
    return _last_per_key(pa.concat_tables(tables)), read_parts


def _last_per_key(table: pa.Table) -> pa.Table:
    """Keep one row per item key, preferring an ok row, then the latest."""
    best: dict[str, int] = {}
    keys = table.column("item_key").to_pylist()
    statuses = table.column("status").to_pylist()
    for index, (key, status) in enumerate(zip(keys, statuses, strict=True)):
        previous = best.get(key)
        if previous is None or status == "ok" or statuses[previous] != "ok":
            best[key] = index
    return table.take(sorted(best.values()))


def _merge(stored: pa.Table, fresh: pa.Table | None, order: list[str]) -> pa.Table:
    """Stored and fresh rows, one per key, in the batch's order."""
    tables = [stored] + ([fresh] if fresh is not None else [])
    merged = _last_per_key(pa.concat_tables(tables))
    position = {key: i for i, key in enumerate(merged.column("item_key").to_pylist())}
    missing = [k for k in order if k not in position]
    if missing:  # pragma: no cover - guarded by the caller; a bug if it happens
        raise RuntimeError(f"batch is missing {len(missing)} rows, e.g. {missing[0]}")
    return merged.take([position[k] for k in order])


class _PartFlusher:
    """Buffers final outcomes and writes them as a part when the window closes."""

    def __init__(self, store: RunStore, work: BatchWork) -> None:
        self.store = store
        self.work = work
        self.buffer: list[Outcome] = []
        self.written: list[str] = []
        self.last_flush = time.monotonic()
        self.ids, self.trials = _meta(work.requests)
        self.token = secrets.token_hex(4)

    def add(self, outcome: Outcome) -> None:
        self.buffer.append(outcome)
        if len(self.buffer) >= self.work.flush_every_items or self.due():
            self.flush()

    def due(self) -> bool:
        return bool(self.buffer) and time.monotonic() - self.last_flush >= self.work.flush_every_s

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.buffer:
            return
        path = self.store.path(
            "parts",
            self.work.key,
            f"{time.time_ns():020d}-{self.token}-{len(self.written):05d}.parquet",
        )
        self.store.write_table(path, outcomes_table(self.buffer, self.ids, self.trials))
        self.written.append(path)
        self.buffer = []


def _send(
    pending: list[PlannedRequest],
    engine: Engine,
    flusher: _PartFlusher,
    progress: RunProgress,
    work: BatchWork,
) -> tuple[list[Outcome], list[Outcome]]:
    """Send every pending request; return (final outcomes, transient failures)."""
    futures = {
        engine.submit(
            ProviderRequest(
                key=r.key, item_id=r.item_id, messages=r.messages, item=r.item, trial=r.trial
            )
        )
        for r in pending
    }
    final: list[Outcome] = []
    transient: list[Outcome] = []
    while futures:
        done, futures = concurrent.futures.wait(
            futures, timeout=work.flush_every_s / 2, return_when=concurrent.futures.FIRST_COMPLETED
        )
        for future in done:
            outcome = future.result()
            progress.finished(outcome.status, outcome.error_kind)
            if outcome.is_final:
                final.append(outcome)
                flusher.add(outcome)
            elif outcome.status == "transient":
                transient.append(outcome)
        if flusher.due():
            flusher.flush()
    return final, transient
