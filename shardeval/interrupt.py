"""A process-wide "stop sending" signal, set by Ctrl-C/SIGTERM and read by the request engine.

Why a flag and not an exception: Prefect runs batches in worker threads, where a
``KeyboardInterrupt`` never arrives. The flag lets every batch stop taking new requests, let
the requests in flight finish within a grace period, flush what finished, and only then end.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger("shardeval.interrupt")

_stop = threading.Event()
_deadline: float | None = None


def request_stop(grace_period_s: float) -> None:
    """Stop sending new requests; requests in flight get ``grace_period_s`` to finish."""
    global _deadline
    if not _stop.is_set():
        _deadline = time.monotonic() + grace_period_s
        _stop.set()


def stop_requested() -> bool:
    """Whether a stop was requested."""
    return _stop.is_set()


def grace_expired() -> bool:
    """Whether requests still in flight should now be abandoned."""
    return _stop.is_set() and _deadline is not None and time.monotonic() >= _deadline


def reset() -> None:
    """Clear the flag (tests, and a new run in the same process)."""
    global _deadline
    _stop.clear()
    _deadline = None


@contextmanager
def graceful_signal(
    signum: int, grace_period_s: float, *, defer: Callable[[], bool] | None = None
) -> Iterator[None]:
    """While the block runs, make ``signum`` request a graceful stop instead of its old action.

    Prefect's flow engine replaces the SIGTERM handler for a flow run with one that raises
    ``TerminationSignal`` in the main thread. The flow then unwinds at once: batches in worker
    threads are never told to stop, the engine is closed under them, and their finished but
    unflushed results are lost. Inside this block the first signal only sets the stop flag,
    like the CLI's Ctrl-C: no new requests, ``grace_period_s`` for those in flight, flush, and
    the run ends with ``RunInterrupted``. A second signal, or one for which ``defer()`` is true
    (Prefect's runner cancelling a deployment run on purpose), gets the previous handler.

    Outside the main thread (where handlers cannot be set) this does nothing.
    """
    try:
        previous = signal.getsignal(signum)
    except ValueError:
        previous = None

    def handler(number: int, frame: Any) -> None:
        if stop_requested() or (defer is not None and defer()):
            _call_previous(previous, number, frame)
            return
        logger.warning(
            "stopping: no new requests; %gs for those in flight, then saving "
            "(signal again to stop at once)",
            grace_period_s,
        )
        request_stop(grace_period_s)

    try:
        signal.signal(signum, handler)
    except (ValueError, TypeError):  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)


def _call_previous(previous: Any, number: int, frame: Any) -> None:
    if callable(previous):
        previous(number, frame)
    elif previous == signal.SIG_IGN:
        return
    else:  # the default action (end the process): restore it and deliver the signal again
        signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
