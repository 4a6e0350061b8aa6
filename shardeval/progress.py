"""Live counters of a run in this process, read by the CLI's progress display.

Batches run in Prefect worker threads and report here; the CLI polls. Counting is a few
integer additions under a lock per finished item, far below the per-item budget.

A batch can run more than once in one process (Prefect retries it after transient failures),
and its second attempt finds the first one's flushed items stored. Counts are therefore kept
per batch as well, and a batch that starts again replaces its earlier count instead of adding
to it: ``done`` never passes ``total``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class RunProgress:
    """Thread-safe counters for one run."""

    run_id: str
    total: int = 0
    done: int = 0
    from_cache: int = 0
    sent: int = 0
    ok: int = 0
    errors: int = 0
    transient: int = 0
    batches_total: int = 0
    batches_done: int = 0
    phase: str = "starting"
    started: float = field(default_factory=time.monotonic)
    error_kinds: Counter[str] = field(default_factory=Counter)
    _batch_done: dict[str, int] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def plan(self, total: int, batches: int, done: int) -> None:
        """The run's size, and how much was already stored before it started."""
        with self._lock:
            self.total, self.batches_total = total, batches
            self.done = self.from_cache = done

    def batch_started(self, batch: str, stored_rows: int) -> None:
        """A batch starts (or starts again) with ``stored_rows`` of its rows already stored.

        Rows an earlier attempt of the batch counted in this process are not counted twice,
        and rows it sent are not "from the cache".
        """
        with self._lock:
            counted = self._batch_done.get(batch, 0)
            self.done += stored_rows - counted
            self.from_cache += max(0, stored_rows - counted)
            self._batch_done[batch] = stored_rows

    def finished(self, status: str, error_kind: str | None = None, batch: str = "") -> None:
        """One request's final outcome (``batch``: the batch it belongs to)."""
        with self._lock:
            self.sent += 1
            if status in ("ok", "error"):
                self.done += 1
                self._batch_done[batch] = self._batch_done.get(batch, 0) + 1
            if status == "ok":
                self.ok += 1
            elif status == "error":
                self.errors += 1
                self.error_kinds[error_kind or "error"] += 1
            elif status == "transient":
                self.transient += 1
                self.error_kinds[error_kind or "transient"] += 1

    def batch_finished(self) -> None:
        """A batch committed."""
        with self._lock:
            self.batches_done += 1

    def set_phase(self, phase: str) -> None:
        """What the run is doing now, for the spinner."""
        with self._lock:
            self.phase = phase


_runs: dict[str, RunProgress] = {}
_lock = threading.Lock()


def progress_for(run_id: str) -> RunProgress:
    """The counters of ``run_id`` in this process (created on first use)."""
    with _lock:
        if run_id not in _runs:
            _runs[run_id] = RunProgress(run_id=run_id)
        return _runs[run_id]


def forget(run_id: str) -> None:
    """Drop a run's counters."""
    with _lock:
        _runs.pop(run_id, None)
