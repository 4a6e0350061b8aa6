"""Waiting in tests: poll for the condition, never sleep for a guessed time.

A sleep long enough for a loaded CI machine makes every run slow, and one short enough to be
fast makes the test flaky; polling returns as soon as the condition holds and fails with a
message naming what never happened.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T],
    *,
    timeout: float,
    what: str,
    every: float = 0.05,
    process: subprocess.Popen[bytes] | subprocess.Popen[str] | None = None,
) -> T:
    """Poll ``condition`` until it returns something truthy, and return that.

    Raises:
        AssertionError: ``what`` did not happen within ``timeout`` seconds, or ``process``
            (when given: the process the test waits on) exited first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process exited ({process.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g} s")
        time.sleep(every)
