"""End the command's process without tearing the interpreter down.

Once a command is done, Python's own shutdown still finalizes every module and object the
run loaded (Prefect, pydantic, pandas, pyarrow, matplotlib: a quarter of a million objects):
1-2 s on a 2-core machine after the last line was printed, on every run and every cached
rerun. Everything that must happen at exit happens first, in Python's order: non-daemon
threads are joined, then the ``atexit`` handlers run (Prefect drains its event and log
queues there, logging flushes its handlers), then the standard streams are flushed; only
the freeing of memory the operating system reclaims anyway is skipped.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading


def exit_now(code: object) -> None:
    """Exit with ``code`` as ``sys.exit(code)`` would, minus the interpreter's teardown."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): printed, status 1
        print(code, file=sys.stderr)
        status = 1
    # What the interpreter's shutdown calls first: the thread-exit hooks (thread pools stop
    # their workers there) and a join of every non-daemon thread.
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or gone (a closed pipe)
            stream.flush()
    os._exit(status)
