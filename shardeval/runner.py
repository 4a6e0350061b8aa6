"""Run one batch: reuse what is stored, send the rest, flush as items finish, commit.

This is the library half of the batch task and does not import Prefect. A batch:

1. returns at once if its committed file exists and reads (the run's Parquet is the truth,
   whatever Prefect's cache says); a first attempt skips the look when the flow's survey has
   just found nothing stored for it (:attr:`BatchWork.nothing_stored`);
2. reads its flushed parts, and rows of other stored files the plan pointed it at (items
   stored under an older batching or dataset version), and sends only the remaining keys;
3. makes finished items durable as small Parquet parts at least every ``flush_every_s`` seconds
   or ``flush_every_items`` items, counted across all the batches of the run running in this
   process (the flush runs in a worker thread, never on the event loop that carries the
   requests), so a SIGKILL loses at most one flush window;
4. when every row has a final outcome, writes the batch file in one atomic step (the items
   still buffered go straight into it) and then removes its parts. Transient failures that
   outlasted the retries are never stored: the batch raises :class:`BatchIncomplete` and a
   rerun sends only those.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import io
import logging
import os
import posixpath
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shardeval import interrupt
from shardeval.engine import Engine, Outcome
from shardeval.errors import (
    RunInterrupted,
    ShardevalError,
    StorageError,
    TransientProviderError,
)
from shardeval.finality import drop_auth_rows, has_auth_rows
from shardeval.objectstore import describe_error
from shardeval.planning import PlannedRequest
from shardeval.progress import RunProgress, progress_for
from shardeval.providers.base import ProviderRequest
from shardeval.results import GENERATION_SCHEMA, conform, outcomes_table
from shardeval.spec import ModelSpec
from shardeval.storage import PARQUET_COMPRESSION, RunStore

logger = logging.getLogger("shardeval.runner")

WRITE_RETRY_DELAYS_S = (0.5, 1.0, 2.0)
"""Waits between the attempts to write a batch's buffered rows once writes fail (ENOSPC, an
S3 hiccup): a few seconds in all, so that a store that comes back keeps them."""
STORAGE_GRACE_S = 5.0
"""Requests in flight when the first write fails get this long (their answers are buffered)."""


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
    requests: list[PlannedRequest]
    reuse: dict[str, list[str]] = field(default_factory=dict)
    """Other stored files (path → item keys) holding some of this batch's results."""
    retry_failed: bool = False
    nothing_stored: bool = False
    """The flow's survey, taken under the run's lease just before, found neither this batch's
    committed file nor any part of it: a first attempt need not look again (on an object store
    that is a GET and a LIST per batch, on the run's critical path). A retried attempt looks."""
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
        leftovers = store.list_batch_parts(work.key)
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

    flusher = _PartFlusher(store, work)
    try:
        outcomes, transient = _send(pending, engine, flusher, progress, work)
        complete = not transient and len(outcomes) == len(pending)
        if not complete:
            flusher.flush()
    finally:
        flusher.close()

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

    fresh = outcomes_table(outcomes, *_meta(work.requests)) if outcomes else None
    table = _merge(stored, fresh, unique_keys)
    # The batch file makes the items still buffered durable, so they are not written as a
    # part first (one PUT fewer per batch); if the commit fails, they are flushed after all.
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
    own_parts = [] if work.nothing_stored else store.list_batch_parts(work.key)
    sources: list[tuple[str, set[str] | None]] = [(path, None) for path in own_parts]
    sources += [(path, set(keys)) for path, keys in work.reuse.items()]
    if with_committed:
        # The committed file of a batch being retried for its error rows (its ok rows stand;
        # the caller drops the error rows), or holding 401/403 rows of an earlier version:
        # only the failed items are sent again.
        sources.append((store.batch_path(work.key), wanted))
    for path, keys in sources:
        table = store.read_table(path)
        if table is None:
            continue
        if keys is None:
            read_parts.append(path)
        table = drop_auth_rows(conform(table))  # never final (shardeval.finality)
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


class _FlushWindow:
    """The flush window of one run in this process, shared by all of its running batches.

    Several batches run at once and share the engine, so their finished items arrive
    interleaved. Counting ``flush_every_items`` per batch would let each of them hold a window
    of unflushed items, and a kill would lose one window per running batch. The count is
    therefore kept per run: whichever batch brings the run's unflushed items to the limit
    flushes every batch's buffer (one part per batch), so a kill loses at most one window.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flushers: set[_PartFlusher] = set()

    def register(self, flusher: _PartFlusher) -> None:
        with self._lock:
            self._flushers.add(flusher)

    def unregister(self, flusher: _PartFlusher) -> None:
        with self._lock:
            self._flushers.discard(flusher)

    def full(self, limit: int) -> bool:
        """Whether the running batches hold ``limit`` unflushed items between them."""
        with self._lock:
            flushers = list(self._flushers)
        return sum(len(f.buffer) for f in flushers) >= limit

    def flush_all(self, caller: _PartFlusher) -> None:
        """Start a part for every running batch with buffered rows (see :meth:`flush_soon`)."""
        with self._lock:
            flushers = [caller] + [f for f in self._flushers if f is not caller]
        for flusher in flushers:
            flusher.flush_soon()


_windows: dict[str, _FlushWindow] = {}
_windows_lock = threading.Lock()


def _window_for(store: RunStore) -> _FlushWindow:
    with _windows_lock:
        return _windows.setdefault(store.root, _FlushWindow())


class _PartFlusher:
    """Buffers final outcomes and writes them as a part when the window closes.

    On an object store a part is written in the background (``RunStore.submit``): a PUT takes
    tens of milliseconds, and the batch's thread must keep taking outcomes meanwhile, or the
    last batches of a run wait for a queue of flushes before they can commit. A write that
    fails puts its rows back in the buffer and its error is raised in the batch's thread at
    its next outcome (or at the end). ``flush_soon`` may be called from another batch's
    thread (see :class:`_FlushWindow`).
    """

    def __init__(self, store: RunStore, work: BatchWork) -> None:
        self.store = store
        self.work = work
        self.buffer: list[Outcome] = []
        self.written: list[str] = []
        self.last_flush = time.monotonic()
        self.ids, self.trials = _meta(work.requests)
        self.token = secrets.token_hex(4)
        self._lock = threading.Condition()
        self._sequence = 0
        self._writing = 0
        self._failed: BaseException | None = None
        self.window = _window_for(store)
        self.window.register(self)

    def add(self, outcome: Outcome) -> None:
        with self._lock:
            self.buffer.append(outcome)
            failing = self._failed is not None
        if failing:  # writes fail: keep it in memory; flush() retries before giving up
            return
        if self.window.full(self.work.flush_every_items):
            self.window.flush_all(self)
        elif self.due():
            self.flush_soon()

    def due(self) -> bool:
        if self._failed is not None:  # writes fail: flush() retries them at the batch's end
            return False
        return bool(self.buffer) and time.monotonic() - self.last_flush >= self.work.flush_every_s

    def flush_soon(self) -> None:
        """Start writing the buffered rows as one part (at once, on local disk)."""
        cut = self.cut()
        if cut is not None:
            self.store.submit(functools.partial(self._write_noting_failure, *cut))

    def flush(self) -> None:
        """Write the buffered rows as one part and wait for every part of this batch to land.

        Raises the error of a part that could not be written (its rows are buffered again).
        """
        with self._lock:
            self._lock.wait_for(lambda: self._writing == 0)
        for delay in (*WRITE_RETRY_DELAYS_S, None):
            cut = self.cut()
            if cut is None:
                break
            try:
                self.write(*cut)
                break
            except Exception as exc:
                self.note_failure(exc, cut[0])
                if delay is None:
                    raise
                logger.info("%s: retrying the write in %gs", self.work.label, delay)
                time.sleep(delay)
        with self._lock:
            self._failed = None

    def cut(self) -> tuple[str, list[Outcome]] | None:
        """Take the buffered rows and name their part; None if there are none.

        The lock is held for this bookkeeping only, not for the write (a PUT to a remote
        store takes tens of milliseconds, and the batch's thread keeps adding meanwhile).
        Every cut must be followed by :meth:`write`.
        """
        with self._lock:
            self.last_flush = time.monotonic()
            if not self.buffer:
                return None
            rows, self.buffer = self.buffer, []
            name = f"{time.time_ns():020d}-{self.token}-{self._sequence:05d}.parquet"
            self._sequence += 1
            self._writing += 1
        return self.store.path("parts", self.work.key, name), rows

    def write(self, path: str, rows: list[Outcome]) -> None:
        """Write a part :meth:`cut` named; on failure its rows go back to the buffer."""
        try:
            _write_part(self.store, path, outcomes_table(rows, self.ids, self.trials))
        except BaseException:
            with self._lock:
                self.buffer = rows + self.buffer
                self._writing -= 1
                self._lock.notify_all()
            raise
        with self._lock:
            self.written.append(path)
            self._writing -= 1
            self._lock.notify_all()

    def _write_noting_failure(self, path: str, rows: list[Outcome]) -> None:
        try:
            self.write(path, rows)
        except Exception as exc:
            self.note_failure(exc, path)

    def note_failure(self, exc: BaseException, path: str = "") -> None:
        """A write failed: stop the run's requests at once; the rows stay in memory.

        Every answer that arrives after the store stopped taking writes is paid for and can
        only be lost, so the whole run stops sending (a full disk or an expired credential
        fails every batch alike). The requests in flight get a short grace, their answers are
        buffered, and :meth:`flush` retries the write before the batch gives up.
        """
        with self._lock:
            self._failed = exc
        if isinstance(exc, ShardevalError):
            text = exc.message
        else:  # e.g. FileNotFoundError of a vanished bucket, which the store passes through
            where = f" {self.store.url_of(path)}" if path else ""
            text = f"storage failed to write{where}: {describe_error(exc)}"
        # stop_run says it once for the run; every batch's failure is logged for --verbose.
        logger.info("could not flush %s: %s", self.work.label, text)
        interrupt.stop_run(self.work.run_id, "storage_failed", text, grace_period_s=STORAGE_GRACE_S)

    def take(self) -> list[Outcome]:
        """Empty the buffer for a caller that stores its rows another way (the batch file).

        Called after :meth:`close`. It waits for parts being written to land, so
        :attr:`written` is final once this returns (a part that failed has put its rows back
        in the buffer, and the batch file stores them).
        """
        with self._lock:
            self._lock.wait_for(lambda: self._writing == 0)
            rows, self.buffer = self.buffer, []
        return rows

    def restore(self, rows: list[Outcome]) -> None:
        """Put back rows :meth:`take` removed (their batch file could not be written)."""
        with self._lock:
            self.buffer = rows + self.buffer

    def close(self) -> None:
        """Leave the run's window (the buffer is empty by now, or abandoned on an error)."""
        self.window.unregister(self)


def _write_part(store: RunStore, path: str, table: pa.Table) -> None:
    """Write one part so that it survives the death of this process, without fsync.

    Parts are written at every flush window and are provisional: the batch file (written with
    fsync) takes their rows over and then they are removed. Surviving a killed process only
    takes an atomic rename, because the page cache outlives the process. fsync guards against
    a machine crash, which could leave a renamed part empty or torn; such a part fails to
    parse, is set aside and its items are recomputed, like any damaged file. The two fsyncs
    made a flush take ~20 ms here (300 ms under load), and every result that finished meanwhile
    was at risk; without them a flush takes ~1-2 ms. Object stores: one PUT, whole or absent.
    """
    if not store.is_local:
        store.write_table(path, table)
        return
    sink = io.BytesIO()
    pq.write_table(table, sink, compression=PARQUET_COMPRESSION)
    tmp = store.path(".tmp", f"{posixpath.basename(path)}.{secrets.token_hex(6)}")
    os.makedirs(posixpath.dirname(tmp), exist_ok=True)
    os.makedirs(posixpath.dirname(path), exist_ok=True)
    try:
        with open(tmp, "wb") as handle:
            handle.write(sink.getvalue())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise StorageError(
            f"storage failed to write {store.url_of(path)}: {type(exc).__name__}: {exc}"
        ) from exc


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
            ),
            priority=(work.number, position),
        )
        for position, r in enumerate(pending)
    }
    final: list[Outcome] = []
    transient: list[Outcome] = []
    while futures:
        done, futures = concurrent.futures.wait(
            futures, timeout=work.flush_every_s / 2, return_when=concurrent.futures.FIRST_COMPLETED
        )
        for future in done:
            try:
                outcome = future.result()
            except concurrent.futures.CancelledError:  # the engine closed before it started
                continue
            progress.finished(outcome.status, outcome.error_kind, work.key)
            if outcome.is_final:
                final.append(outcome)
                flusher.add(outcome)
            elif outcome.status == "transient":
                transient.append(outcome)
        if flusher.due():
            flusher.flush_soon()
    return final, transient
