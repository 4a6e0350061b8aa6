"""A process-wide "stop sending" signal, set by Ctrl-C/SIGTERM and read by the request engine.

Why a flag and not an exception: Prefect runs batches in worker threads, where a
``KeyboardInterrupt`` never arrives. The flag lets every batch stop taking new requests, let
the requests in flight finish within a grace period, flush what finished, and only then end.
"""

from __future__ import annotations

import threading
import time

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
