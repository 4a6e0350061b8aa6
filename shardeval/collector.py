"""Python's cyclic garbage collector while a run's requests are in flight.

The request path allocates a few dozen short-lived containers per request (aiohttp's
request and response objects, a task, a coroutine, an outcome), thousands of times a second,
in a process that holds everything Prefect, pandas and pyarrow imported. With the default
thresholds the collector runs a young collection every 700 net allocations, promotes
in-flight objects that would have died a moment later, and so triggers full collections
that walk every imported object: a good part of a fast endpoint's request phase
(docs/performance.md). While engines are open this process therefore

* freezes what exists when the first engine opens (modules, the plan: they outlive the run,
  so the collector stops walking them), and
* raises the young generation's threshold, so that objects die by reference count before a
  collection sees them.

Both are undone when the last engine closes. Garbage that is not cyclic is freed exactly as
before; cyclic garbage waits for a larger young generation (bounded by the threshold).
"""

from __future__ import annotations

import gc
import threading

YOUNG_THRESHOLD = 50_000
"""Net allocations of container objects between young collections while engines are open
(Python's default is 700)."""

_lock = threading.Lock()
_holders = 0
_saved_thresholds: tuple[int, int, int] | None = None


def hold() -> None:
    """An engine opened: relax the collector if it is the first one."""
    global _holders, _saved_thresholds
    with _lock:
        _holders += 1
        if _holders > 1:
            return
        young, middle, old = gc.get_threshold()
        _saved_thresholds = (young, middle, old)
        if young == 0:  # the collector is off (the user's choice): leave it so
            return
        gc.freeze()
        gc.set_threshold(max(young, YOUNG_THRESHOLD), middle, old)


def release() -> None:
    """An engine closed: restore the collector once the last one has."""
    global _holders, _saved_thresholds
    with _lock:
        if _holders == 0:
            return
        _holders -= 1
        if _holders > 0 or _saved_thresholds is None:
            return
        saved, _saved_thresholds = _saved_thresholds, None
        if saved[0] == 0:
            return
        gc.set_threshold(*saved)
        gc.unfreeze()
