"""Making a running batch's finished items durable: parts, in a run-wide flush window.

A batch buffers its final outcomes and writes them as a small Parquet part (through
:meth:`RunStore.write_part`, the store's atomic write) at least every ``flush_every_s``
seconds or once the run's running batches hold ``flush_every_items`` unflushed items between
them (:class:`FlushWindow`). The write runs in a worker thread, never on the event loop that
carries the requests. An object store slower than the answers would let written-but-not-yet-
landed windows pile up (how many is the PUT's latency times the answer rate), so while the
run holds ``BEHIND_WINDOWS`` windows unwritten its new requests wait
(:attr:`shardeval.interrupt.RunStop.storage_behind`): a kill loses at most those windows and
the requests in flight. On local disk answers are journaled
as they arrive instead (:mod:`shardeval.journal`); there the flusher writes parts only for a
batch whose journal could not be written. When a write fails, the run stops sending
(:func:`shardeval.interrupt.stop_run`, ``storage_failed``) and the rows stay in memory while
the write is retried.
"""

from __future__ import annotations

import functools
import logging
import secrets
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from shardeval import interrupt
from shardeval.errors import ShardevalError
from shardeval.objectstore import describe_error
from shardeval.outcome import Outcome
from shardeval.results import outcomes_table
from shardeval.storage import RunStore

if TYPE_CHECKING:
    from shardeval.planning import PlannedRequest
    from shardeval.runner import BatchWork

logger = logging.getLogger("shardeval.runner")

WRITE_RETRY_DELAYS_S = (0.5, 1.0, 2.0)
"""Waits between the attempts to write a batch's buffered rows once writes fail (ENOSPC, an
S3 hiccup): a few seconds in all, so that a store that comes back keeps them."""
BEHIND_WINDOWS = 2
"""Windows of finished rows not yet written (one being written, one filling) at which the
run's new requests wait for the store: the bound on what a kill loses, beyond the requests in
flight. One would halve an object store's throughput for a fast endpoint (each window would
wait for the PUT before it)."""
STORAGE_GRACE_S = 5.0
"""Requests in flight when the first write fails get this long (their answers are buffered)."""


class FlushWindow:
    """The flush window of one run in this process, shared by all of its running batches.

    Several batches run at once and share the engine, so their finished items arrive
    interleaved. Counting ``flush_every_items`` per batch would let each of them hold a window
    of unflushed items, and a kill would lose one window per running batch. The count is
    therefore kept per run: whichever batch brings the run's unflushed items to the limit
    flushes every batch's buffer (one part per batch), so the run buffers at most one window;
    with the parts still uploading, what a kill can lose is bounded by ``BEHIND_WINDOWS``.
    """

    def __init__(self, run_id: str) -> None:
        self._lock = threading.Lock()
        self._flushers: set[PartFlusher] = set()
        self.run_id = run_id

    def register(self, flusher: PartFlusher) -> None:
        """A batch of the run started buffering."""
        with self._lock:
            self._flushers.add(flusher)

    def unregister(self, flusher: PartFlusher) -> None:
        """A batch of the run ended."""
        with self._lock:
            self._flushers.discard(flusher)
        self.note_backlog(flusher.work.flush_every_items)

    def note_backlog(self, limit: int) -> None:
        """Hold the run's new requests while ``BEHIND_WINDOWS`` windows wait to be written.

        Decided and set under the window's lock, so that the last change of the backlog
        (a part landing) always has the last word.
        """
        with self._lock:
            unflushed = sum(f.unflushed for f in self._flushers)
            interrupt.stop_for(self.run_id).storage_behind = unflushed >= BEHIND_WINDOWS * limit

    def full(self, limit: int) -> bool:
        """Whether the running batches hold ``limit`` unflushed items between them."""
        with self._lock:
            flushers = list(self._flushers)
        return sum(len(f.buffer) for f in flushers) >= limit

    def flush_all(self, caller: PartFlusher) -> None:
        """Start a part for every running batch with buffered rows (see :meth:`flush_soon`)."""
        with self._lock:
            flushers = [caller] + [f for f in self._flushers if f is not caller]
        for flusher in flushers:
            flusher.flush_soon()


_windows: dict[str, FlushWindow] = {}
_windows_lock = threading.Lock()


def request_meta(
    requests: Sequence[PlannedRequest],
) -> tuple[dict[str, str], dict[str, int]]:
    """Item id and trial of each request key (the columns a part or batch file stores)."""
    return {r.key: r.item_id for r in requests}, {r.key: r.trial for r in requests}


def window_for(store: RunStore) -> FlushWindow:
    """The flush window of ``store``'s run in this process."""
    with _windows_lock:
        return _windows.setdefault(store.root, FlushWindow(store.run_id))


class PartFlusher:
    """Buffers final outcomes and writes them as a part when the window closes.

    On an object store a part is written in the background (``RunStore.submit``): a PUT takes
    tens of milliseconds, and the batch's thread must keep taking outcomes meanwhile, or the
    last batches of a run wait for a queue of flushes before they can commit. A write that
    fails puts its rows back in the buffer and its error is raised in the batch's thread at
    its next outcome (or at the end). ``flush_soon`` may be called from another batch's
    thread (see :class:`FlushWindow`).
    """

    def __init__(self, store: RunStore, work: BatchWork) -> None:
        self.store = store
        self.work = work
        self.buffer: list[Outcome] = []
        self.written: list[str] = []
        self.last_flush = time.monotonic()
        self.ids, self.trials = request_meta(work.requests)
        self.token = secrets.token_hex(4)
        self._lock = threading.Condition()
        self._sequence = 0
        self._writing = 0
        self._writing_rows = 0
        self._committing = 0
        """Rows :meth:`take` handed to the batch file, counted until :meth:`close`."""
        self._failed: BaseException | None = None
        self.window = window_for(store)
        self.window.register(self)

    @property
    def unflushed(self) -> int:
        """Finished rows of this batch not yet durable: buffered, or in a part being written."""
        return len(self.buffer) + self._writing_rows + self._committing

    def add(self, outcome: Outcome) -> None:
        """Buffer a final outcome; start a part when the run's window is full."""
        with self._lock:
            self.buffer.append(outcome)
            failing = self._failed is not None
        if failing:  # writes fail: keep it in memory; flush() retries before giving up
            return
        if self.window.full(self.work.flush_every_items):
            self.window.flush_all(self)
        elif self.due():
            self.flush_soon()
        self.window.note_backlog(self.work.flush_every_items)

    def due(self) -> bool:
        """Whether the buffer has waited ``flush_every_s`` (the time half of the window)."""
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
            self._writing_rows += len(rows)
        return self.store.part_path(self.work.key, name), rows

    def write(self, path: str, rows: list[Outcome]) -> None:
        """Write a part :meth:`cut` named; on failure its rows go back to the buffer."""
        try:
            self.store.write_part(path, outcomes_table(rows, self.ids, self.trials))
        except BaseException:
            with self._lock:
                self.buffer = rows + self.buffer
                self._writing -= 1
                self._writing_rows -= len(rows)
                self._lock.notify_all()
            raise
        with self._lock:
            self.written.append(path)
            self._writing -= 1
            self._writing_rows -= len(rows)
            self._lock.notify_all()
        self.window.note_backlog(self.work.flush_every_items)

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
            self._committing = len(rows)  # unwritten until the batch file lands
        return rows

    def restore(self, rows: list[Outcome]) -> None:
        """Put back rows :meth:`take` removed (their batch file could not be written)."""
        with self._lock:
            self.buffer = rows + self.buffer
            self._committing = 0

    def close(self) -> None:
        """Leave the run's window: the batch committed (or gave up on an error)."""
        self.window.unregister(self)
