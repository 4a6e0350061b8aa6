"""Run one batch: reuse what is stored, send the rest, flush as items finish, commit.

This is the library half of the batch task and does not import Prefect. A batch:

1. returns at once if its committed file exists and reads (the run's Parquet is the truth,
   whatever Prefect's cache says); a first attempt skips the look when the flow's survey has
   just found nothing stored for it (:attr:`BatchWork.nothing_stored`);
2. reads its flushed parts, and rows of other stored files the plan pointed it at (items
   stored under an older batching or dataset version), and sends only the remaining keys;
3. makes finished items durable as they arrive: on local disk each answer is appended to the
   batch's journal (:mod:`shardeval.journal`), so a SIGKILL loses only the requests in flight;
   on object stores as small Parquet parts at least every ``flush_every_s`` seconds or
   ``flush_every_items`` items, counted across all the batches of the run running in this
   process (the flush runs in a worker thread, never on the event loop that carries the
   requests), so a SIGKILL loses at most one flush window;
4. when every row has a final outcome, writes the batch file in one atomic step (the items
   still buffered go straight into it) and then removes its parts. Transient failures that
   outlasted the retries are never stored: the batch raises :class:`BatchIncomplete` and a
   rerun sends only those.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from shardeval import interrupt
from shardeval.engine import Engine
from shardeval.errors import (
    RunInterrupted,
    TransientProviderError,
)
from shardeval.finality import drop_auth_rows, has_auth_rows
from shardeval.journal import Journal, batch_journals, is_journal, open_journal, read_journal
from shardeval.outcome import Outcome
from shardeval.part_writer import PartFlusher, request_meta
from shardeval.planning import PlannedRequest
from shardeval.progress import RunProgress, progress_for
from shardeval.providers.base import ProviderRequest
from shardeval.results import GENERATION_SCHEMA, conform, one_row_per_key, outcomes_table
from shardeval.spec import ModelSpec
from shardeval.storage import RunStore

logger = logging.getLogger("shardeval.runner")
ARRIVALS_POLL_S = 0.1
"""How often a batch's thread takes the answers that have arrived (progress, object-store
parts); the last answer of the batch wakes it at once."""


@dataclass(frozen=True)
class RunRef:
    """Which run a task works for: enough to rebuild its store and engine in any process."""

    run_id: str
    output: str
    model: ModelSpec
    progress_id: str = ""
    """Whose progress counters its batches report to, when not ``run_id``'s own: an
    ``llm_judge`` metric's judgements count in their eval run's progress and model calls."""

    def store(self) -> RunStore:
        """The run's storage."""
        return RunStore(self.output, self.run_id)

    def progress(self) -> RunProgress:
        """The progress counters its batches report to (see :attr:`progress_id`)."""
        return progress_for(self.progress_id or self.run_id)


@dataclass(frozen=True)
class BatchWork:
    """Everything a batch task needs: small, picklable, independent of the flow's memory."""

    run_id: str
    number: int
    total: int
    key: str
    requests: Sequence[PlannedRequest]
    """A list, or a :class:`shardeval.batch_requests.PlanRequests` rendered in the task."""
    reuse: dict[str, list[str]] = field(default_factory=dict)
    """Other stored files (path → item keys) holding some of this batch's results."""
    retry_failed: bool = False
    nothing_stored: bool = False
    """The flow's survey, taken under the run's lease just before, found neither this batch's
    committed file nor any part of it: a first attempt need not look again (on an object store
    that is a GET and a LIST per batch, on the run's critical path). A retried attempt looks."""
    flush_every_s: float = 2.0
    flush_every_items: int = 16
    shared: frozenset[str] = frozenset()
    """Item keys of this batch that other rows of the run hold too: their answers are kept
    by the run's engine to serve the others (identical requests are sent once per run)."""

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

    def __init__(self, label: str, failed: int, example: str | None, run_id: str = "") -> None:
        super().__init__(
            f"{label}: {failed} item(s) failed transiently after retries"
            + (f" (e.g. {example})" if example else "")
            + "; they were not stored and a rerun will retry them",
        )
        self.failed = failed
        self.run_id = run_id


def run_batch(
    store: RunStore, work: BatchWork, engine: Engine, progress: RunProgress
) -> BatchPointer:
    """Run one batch to its committed file (see the module docstring)."""
    unique_keys = list(dict.fromkeys(r.key for r in work.requests))
    committed, keep_committed = (
        (None, False) if work.nothing_stored else _read_committed(store, work)
    )
    if committed is not None:
        # A kill between the commit and the removal of the parts leaves some behind; the
        # committed file holds every row, so they are only clutter. (No Prefect record was
        # written then, so this body runs again on the rerun.)
        leftovers = store.list_batch_parts(work.key) + batch_journals(store, work.key)
        if leftovers:
            store.delete(leftovers)
            store.remove_empty_dir(store.parts_dir(work.key))
        progress.batch_started(work.key, len(work.requests))
        progress.batch_finished()
        return BatchPointer(work.key, store.url_of(store.batch_path(work.key)), committed)

    stored, read_parts = _stored_rows(store, work, keep_committed or work.retry_failed)
    if work.retry_failed and stored.num_rows:
        stored = stored.filter(pc.equal(stored.column("status"), "ok"))
    have = set(stored.column("item_key").to_pylist())
    pending = [r for r in _unique(work.requests) if r.key not in have]
    progress.batch_started(work.key, sum(1 for r in work.requests if r.key in have))

    flusher = PartFlusher(store, work)
    # The batch stays in the run's flush window until it has committed: its last rows
    # are unwritten until the batch file lands (part_writer.BEHIND_WINDOWS counts them).
    try:
        journal = open_journal(store, work.key) if pending else None
        try:
            outcomes, transient = _send(pending, engine, flusher, journal, progress, work)
            complete = not transient and len(outcomes) == len(pending)
            if not complete:
                flusher.flush()
        finally:
            if journal is not None:
                journal.close()

        _raise_unless_complete(work, engine, complete, transient)
        fresh = outcomes_table(outcomes, *request_meta(work.requests)) if outcomes else None
        table = _merge(stored, fresh, unique_keys)
        journaled = [journal.path] if journal and journal.rows else []
        _commit(store, work, flusher, table, read_parts + journaled)
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
    finally:
        flusher.close()


def _raise_unless_complete(
    work: BatchWork, engine: Engine, complete: bool, transient: list[Outcome]
) -> None:
    """Why a batch that did not get every answer cannot commit (nothing if it did)."""
    stop = interrupt.stop_for(work.run_id)
    if stop.requested and not complete:
        # Transient failures while stopping are not worth a task retry (they are not
        # stored; the rerun sends them), and a retry would only delay the exit.
        raise RunInterrupted(f"{work.label}: stopped ({stop.reason}); finished items were saved")
    if transient:
        engine.raise_if_stopped()  # the endpoint is gone, or the key is wrong: say so
        example = transient[0].error
        raise BatchIncomplete(work.label, len(transient), example, work.run_id)
    if not complete:  # the rest were cancelled: a stop, or the engine closed
        raise RunInterrupted(f"{work.label}: stopped; finished items were saved")


def _commit(
    store: RunStore, work: BatchWork, flusher: PartFlusher, table: pa.Table, parts: list[str]
) -> None:
    """Write the batch file, then remove the batch's parts (``parts`` and the flusher's).

    The batch file makes the items still buffered durable, so they are not written as a part
    first (one PUT fewer per batch); if the commit fails, they are flushed after all.
    """
    unflushed = flusher.take()
    try:
        store.write_table(store.batch_path(work.key), table)
    except BaseException as exc:
        if isinstance(exc, Exception):
            flusher.note_failure(exc, store.batch_path(work.key))
        flusher.restore(unflushed)
        with contextlib.suppress(Exception):  # the commit's error is the one to report
            flusher.flush()
        raise
    if _holds_the_run(work.run_id):
        store.delete(parts + flusher.written)
        store.remove_empty_dir(store.parts_dir(work.key))


def _holds_the_run(run_id: str) -> bool:
    """Whether this process may still delete the run's parts after a commit.

    A process thawed after its lease expired (a paused VM) may find another process working
    on the run, which has just listed these parts and is about to read them: deleting them
    then would make it send their items again. Its committed file holds every row, so the
    parts are left behind as clutter, as after a kill between a commit and its clean-up.
    """
    stop = interrupt.stop_for(run_id)
    return stop.lease_current() and stop.reason != "lease_lost"


def _unique(requests: Sequence[PlannedRequest]) -> list[PlannedRequest]:
    seen: set[str] = set()
    out = []
    for request in requests:
        if request.key not in seen:
            seen.add(request.key)
            out.append(request)
    return out


def _read_committed(store: RunStore, work: BatchWork) -> tuple[int | None, bool]:
    """Rows of the committed batch file, or None if it must be (re)computed.

    The flag says whether the file exists but holds rows to send again (error rows with
    ``retry_failed``, 401/403 rows of an earlier version): its other rows are then reused.
    """
    table = store.read_table(
        store.batch_path(work.key), columns=["item_key", "status", "http_status"]
    )
    if table is None:
        return None, False
    if work.retry_failed and pc.any(pc.equal(table.column("status"), "error")).as_py():
        return None, True
    if has_auth_rows(table):  # 401/403 rows of an earlier version: send those again
        return None, True
    return int(table.num_rows), False


def _stored_rows(
    store: RunStore, work: BatchWork, with_committed: bool
) -> tuple[pa.Table, list[str]]:
    """Rows already stored for this batch, and the parts that were read.

    Sources are the batch's own parts, then other files the plan named (and, when
    ``with_committed``, its own committed file); the parts read are deleted once the batch
    is committed.
    """
    wanted = {r.key for r in work.requests}
    tables = []
    read_parts = []
    own_parts = []
    if not work.nothing_stored:
        own_parts = store.list_batch_parts(work.key) + batch_journals(store, work.key)
    sources: list[tuple[str, set[str] | None]] = [(path, None) for path in own_parts]
    sources += [(path, set(keys)) for path, keys in work.reuse.items()]
    if with_committed:
        # The committed file of a batch being retried for its error rows (its ok rows stand;
        # the caller drops the error rows), or holding 401/403 rows of an earlier version:
        # only the failed items are sent again.
        sources.append((store.batch_path(work.key), wanted))
    for path, keys in sources:
        table = read_journal(path) if is_journal(path) else store.read_table(path)
        if table is None:
            continue
        if not table.num_rows:  # an empty journal (killed before its first answer landed)
            if keys is None:
                read_parts.append(path)
            continue
        if keys is None:
            read_parts.append(path)
        table = drop_auth_rows(conform(table))  # never final (shardeval.finality)
        mask = pc.is_in(table.column("item_key"), value_set=pa.array(sorted(keys or wanted)))
        tables.append(table.filter(mask))
    if not tables:
        return GENERATION_SCHEMA.empty_table(), read_parts
    return one_row_per_key(pa.concat_tables(tables)), read_parts


def _merge(stored: pa.Table, fresh: pa.Table | None, order: list[str]) -> pa.Table:
    """Stored and fresh rows, one per key, in the batch's order."""
    tables = [stored] + ([fresh] if fresh is not None else [])
    merged = one_row_per_key(pa.concat_tables(tables))
    position = {key: i for i, key in enumerate(merged.column("item_key").to_pylist())}
    missing = [k for k in order if k not in position]
    if missing:  # pragma: no cover - guarded by the caller; a bug if it happens
        raise RuntimeError(f"batch is missing {len(missing)} rows, e.g. {missing[0]}")
    return merged.take([position[k] for k in order])


def _send(
    pending: list[PlannedRequest],
    engine: Engine,
    flusher: PartFlusher,
    journal: Journal | None,
    progress: RunProgress,
    work: BatchWork,
) -> tuple[list[Outcome], list[Outcome]]:
    """Send every pending request; return (final outcomes, transient failures).

    A final outcome is made durable by the engine's thread the moment it arrives
    (:class:`_Arrivals`), before this thread even wakes up: journaled on local disk, handed to
    the part flusher on an object store.
    """
    arrivals = _Arrivals(journal, flusher, len(pending), work.label)
    engine.submit_batch(
        [
            ProviderRequest(
                key=r.key, item_id=r.item_id, messages=r.messages, item=r.item, trial=r.trial
            )
            for r in pending
        ],
        work.number,
        arrivals.on_done,
        shared=work.shared,
    )
    final: list[Outcome] = []
    transient: list[Outcome] = []
    taken = 0
    while taken < len(pending):
        arrivals.wake.wait(timeout=ARRIVALS_POLL_S)
        arrivals.wake.clear()  # before reading: an answer arriving meanwhile sets it again
        arrived = len(arrivals.outcomes)
        for outcome, kept in arrivals.outcomes[taken:arrived]:
            progress.finished(outcome.status, outcome.error_kind, work.key)
            if outcome.is_final:
                final.append(outcome)
                if not kept:  # the journal failed (a full disk): parts instead
                    flusher.add(outcome)
            elif outcome.status == "transient":
                transient.append(outcome)
        taken = arrived
        if flusher.due():
            flusher.flush_soon()
    return final, transient


class _Arrivals:
    """Outcomes as they arrive: kept on the engine's thread, read by the batch's thread.

    Keeping on the thread that receives the answer closes the gap in which a kill would lose
    an answer already received (a wake-up of the batch's thread takes milliseconds on a busy
    machine). On local disk an answer is journaled there; on an object store it is handed to
    the part flusher there, so the run's flush window, and the hold of a run whose store falls
    behind (part_writer.py), count every answer the moment it arrives. The batch's thread is
    not woken for every answer (at thousands of answers a second the wake-ups cost more than
    the answers): it reads what has arrived every ``ARRIVALS_POLL_S``, and the last answer
    wakes it at once. A journal write that fails (a full disk) turns the journal off for the
    batch: its outcomes then go to the part flusher from the batch's thread, whose failure
    handling stops the run.
    """

    def __init__(
        self, journal: Journal | None, flusher: PartFlusher, expected: int, label: str
    ) -> None:
        self.journal = journal
        self.flusher = flusher if journal is None else None
        """The part flusher, fed from the engine's thread (object stores only)."""
        self.ids, self.trials = flusher.ids, flusher.trials
        self.expected = expected
        self.label = label
        self.outcomes: list[tuple[Outcome, bool]] = []
        """Appended by the engine's thread only (whether each was kept there)."""
        self.wake = threading.Event()

    def on_done(self, outcome: Outcome) -> None:
        journal = self.journal
        kept = False
        if outcome.is_final:
            if journal is not None:
                try:
                    journal.append(outcome, self.ids.get(outcome.key), self.trials.get(outcome.key))
                    kept = True
                except Exception as exc:  # a full disk, or a value no line can hold
                    # Never raised on: the engine would drop this outcome, and the batch's
                    # thread would wait for it forever.
                    logger.warning("%s: cannot append to %s: %s", self.label, journal.path, exc)
                    self.journal = None
            elif self.flusher is not None:
                self.flusher.add(outcome)
                kept = True
        self.outcomes.append((outcome, kept))
        if not kept or len(self.outcomes) >= self.expected:
            self.wake.set()
