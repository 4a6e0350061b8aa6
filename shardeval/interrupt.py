"""Per-run "stop sending" requests: a :class:`RunStop` per run, set by whatever must end it.

Why a flag and not an exception: Prefect runs batches in worker threads, where a
``KeyboardInterrupt`` never arrives. The flag lets every batch of the run stop taking new
requests, let the requests in flight finish within a grace period, flush what finished, and
only then end; the flow then raises :meth:`RunStop.error` (exit 130 for a signal, 1 otherwise).

Why per run and not per process: a notebook kernel or a served flow runs many runs in one
process, and a stop of one of them must neither cancel the next nor the others. Who stops a run:

* a signal (Ctrl-C, SIGTERM): :func:`stop_active` stops every run active in the process;
* the lease heartbeat when another process took the run over (``lease_lost``);
* the part writer when a write keeps failing (``storage_failed``);
* the request engine (``endpoint_unreachable``, ``auth_failed``) and a cost budget
  (``budget_reached``), through the same :func:`stop_run`.

The first stop wins: its reason and message are the ones the run ends with.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from shardeval.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    RunIncomplete,
    RunInterrupted,
    RunLockedError,
    ShardevalError,
    StorageError,
)

logger = logging.getLogger("shardeval.interrupt")

StopReason = Literal[
    "interrupted",
    "endpoint_unreachable",
    "auth_failed",
    "budget_reached",
    "lease_lost",
    "storage_failed",
]
RESUME_HINT = "run the same command to resume"


@dataclass
class RunStop:
    """The stop request of one run: why, what to say, and until when in-flight requests run."""

    run_id: str
    reason: StopReason | None = None
    message: str = ""
    deadline: float | None = None
    cause: ShardevalError | None = None
    """The error to end with when one is known (an endpoint's: it says what to fix)."""
    send_until: float | None = None
    """Set while the run holds a lease in this process: past this (monotonic) time the lease
    may have been taken over, so new requests wait for the next renewal (see locking.py)."""
    storage_behind: bool = False
    """Set while the run's finished answers waiting to be written reach two flush windows (an
    object store slower than the answers): new requests wait (see part_writer.py)."""
    _event: threading.Event = field(default_factory=threading.Event, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def request(
        self,
        reason: StopReason,
        message: str,
        grace_period_s: float = 0.0,
        cause: ShardevalError | None = None,
    ) -> bool:
        """Stop sending new requests; those in flight get ``grace_period_s`` to finish.

        Returns False (and changes nothing) when the run was already asked to stop.
        """
        with self._lock:
            if self._event.is_set():
                return False
            self.reason, self.message, self.cause = reason, message, cause
            self.deadline = time.monotonic() + grace_period_s
            self._event.set()
        return True

    @property
    def requested(self) -> bool:
        """Whether a stop was requested."""
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a stop is requested (or ``timeout``); True if it was."""
        return self._event.wait(timeout)

    def lease_current(self) -> bool:
        """Whether requests may go out as far as the lease is concerned (always, without one)."""
        until = self.send_until
        return until is None or time.monotonic() < until

    def may_send(self) -> bool:
        """Whether a new request may go out now: the lease is current and storage keeps up."""
        return not self.storage_behind and self.lease_current()

    def grace_expired(self) -> bool:
        """Whether requests still in flight should now be abandoned."""
        deadline = self.deadline
        return self.requested and deadline is not None and time.monotonic() >= deadline

    @property
    def exit_code(self) -> int:
        """130 for a signal, 1 for every other reason (the run could not finish)."""
        return EXIT_INTERRUPTED if self.reason == "interrupted" else EXIT_FAILED

    def error(self, progress: str = "") -> ShardevalError:
        """The error the run ends with; ``progress`` is e.g. ``"1,200 of 2,000 done"``."""
        if self.cause is not None:
            return type(self.cause)(self.cause.message, hint=self.cause.hint)
        text = self.message or f"run {self.run_id} stopped"
        if progress:
            text = f"{text}: {progress}"
        if self.reason == "interrupted":
            return RunInterrupted(f"{text}; {RESUME_HINT}")
        hint = f"what finished is kept; {RESUME_HINT}"
        if self.reason == "storage_failed":
            return StorageError(text, hint=f"free space or fix the output, then {RESUME_HINT}")
        if self.reason == "lease_lost":
            return RunLockedError(
                text, hint=f"the other process carries the run on; if it stops, {RESUME_HINT}"
            )
        return RunIncomplete(text, hint=hint)


_stops: dict[str, RunStop] = {}
_stops_lock = threading.Lock()


def root_run(run_id: str) -> str:
    """The run a run id belongs to: judgements (``<run>/judges/<metric>``) stop with their run."""
    return run_id.split("/", 1)[0]


_process_signalled: float | None = None
"""Set in a Dask worker process that got a signal: it is going away, so every run it meets
from then on (a queued batch of a run it had not seen yet) stops too."""


def stop_for(run_id: str) -> RunStop:
    """The stop of ``run_id`` in this process (created on first use)."""
    key = root_run(run_id)
    with _stops_lock:
        stop = _stops.get(key)
        if stop is None:
            stop = _stops[key] = RunStop(key)
            if _process_signalled is not None:
                stop.request("interrupted", "stopped by a signal", _process_signalled)
        return stop


def stop_run(
    run_id: str,
    reason: StopReason,
    message: str,
    *,
    grace_period_s: float = 0.0,
    cause: ShardevalError | None = None,
) -> bool:
    """Ask ``run_id`` to stop (see :meth:`RunStop.request`); False if it already was."""
    stopped = stop_for(run_id).request(reason, message, grace_period_s, cause)
    if stopped:
        logger.warning("stopping run %s (%s): %s", root_run(run_id), reason, message)
    return stopped


def stop_active(reason: StopReason, message: str, *, grace_period_s: float = 0.0) -> int:
    """Stop every run active in this process (a signal applies to all of them); how many."""
    with _stops_lock:
        stops = list(_stops.values())
    return sum(stop.request(reason, message, grace_period_s) for stop in stops)


def any_requested() -> bool:
    """Whether some run of this process was asked to stop (for a second signal)."""
    with _stops_lock:
        return any(stop.requested for stop in _stops.values())


def forget(run_id: str) -> None:
    """Drop the stop of a run that ended, so that a later run of the same id starts clean."""
    with _stops_lock:
        _stops.pop(root_run(run_id), None)


@contextmanager
def graceful_signal(
    signum: int,
    grace_period_s: float,
    run_id: str,
    *,
    defer: Callable[[], bool] | None = None,
    every_run: bool = False,
) -> Iterator[None]:
    """While the block runs, make ``signum`` stop ``run_id`` gracefully instead of its old action.

    Prefect's flow engine replaces the SIGTERM handler for a flow run with one that raises
    ``TerminationSignal`` in the main thread. The flow then unwinds at once: batches in worker
    threads are never told to stop, the engine is closed under them, and their finished but
    unflushed results are lost. Inside this block the first signal only stops the run, like
    the CLI's Ctrl-C: no new requests, ``grace_period_s`` for those in flight, flush, and the
    run ends with ``RunInterrupted``. A second signal, or one for which ``defer()`` is true
    (Prefect's runner cancelling a deployment run on purpose), gets the previous handler.

    ``every_run``: the signal also stops every other run active in this process (a suite's
    cells, each a run of its own).

    Outside the main thread (where handlers cannot be set) this does nothing.
    """
    try:
        previous = signal.getsignal(signum)
    except ValueError:
        previous = None

    def handler(number: int, frame: Any) -> None:
        if defer is not None and defer():
            _call_previous(previous, number, frame)
            return
        if stop_for(run_id).requested:
            if _second_signal is not None:
                _second_signal()  # the CLI: exit 130 now (Prefect's handler would crash the run)
            _call_previous(previous, number, frame)
            return
        logger.warning(
            "stopping: no new requests; %gs for those in flight, then saving "
            "(signal again to stop at once)",
            grace_period_s,
        )
        stop_run(run_id, "interrupted", "stopped by a signal", grace_period_s=grace_period_s)
        if every_run:
            stop_active("interrupted", "stopped by a signal", grace_period_s=grace_period_s)

    try:
        signal.signal(signum, handler)
    except (ValueError, TypeError):  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)


_second_signal: Callable[[], None] | None = None


def on_second_signal(action: Callable[[], None] | None) -> None:
    """What a second signal does inside :func:`graceful_signal` (the CLI: exit 130 at once).

    Without it the previous handler runs: under a flow run that is Prefect's, which crashes
    the flow run; a program that owns the process wants to end it instead.
    """
    global _second_signal
    _second_signal = action


GRACE_ENV = "SHARDEVAL_GRACE_PERIOD_S"
"""The CLI's grace period, for the Dask worker processes it starts (they inherit it)."""
_worker_handlers = False


def handle_signals_in_dask_worker(worker: Any = None) -> None:
    """In a Dask worker process, make SIGINT/SIGTERM stop its runs gracefully (once per process).

    A terminal's Ctrl-C and ``timeout``/``docker stop`` signal the whole process group, and a
    local cluster's workers are in it. Left alone, a worker dies at once (losing the finished
    items it had not flushed) and its nanny starts a new one, which runs the batch again and
    sends its requests. With these handlers a worker stops like the flow's process does:
    no new requests, the grace period, flush, and its batches end interrupted. A second
    signal ends the worker at once. Elsewhere (not in a Dask worker) this does nothing.

    Called when a worker starts (the preload :mod:`shardeval.dask_preload`, which the local
    cluster's workers get) and again by every batch (a worker of a cluster started by
    someone else); a worker signalled before either has nothing to lose yet.
    """
    global _worker_handlers
    if _worker_handlers or "distributed" not in sys.modules:
        return
    if worker is None:
        try:
            from distributed import get_worker

            worker = get_worker()
        except (ImportError, ValueError):  # not in a worker
            return
    _worker_handlers = True
    raw = os.environ.get(GRACE_ENV, "5")
    try:
        grace = float(raw)
    except ValueError:
        # A worker must not die over this: a stop still ends its requests, after 5 s.
        logger.warning("%s=%r is not a number of seconds: this worker uses 5", GRACE_ENV, raw)
        grace = 5.0

    def handler(number: int, frame: Any) -> None:
        global _process_signalled
        if _process_signalled is not None:
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)
            return
        _process_signalled = grace
        stop_active("interrupted", "stopped by a signal", grace_period_s=grace)

    def install() -> None:  # on the worker's event loop, which runs in the main thread
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, handler)

    worker.loop.add_callback(install)


def _call_previous(previous: Any, number: int, frame: Any) -> None:
    if callable(previous):
        previous(number, frame)
    elif previous == signal.SIG_IGN:
        return
    else:  # the default action (end the process): restore it and deliver the signal again
        signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
