"""A Prefect lock manager for batch tasks: lock files that a killed holder cannot leave behind.

The batch task runs with Prefect's ``SERIALIZABLE`` isolation, so two task runs racing on the
same batch of the same run (two flow runs, a duplicate batch, two Dask workers) take one
lock: the second waits, then finds the first one's cache record and shows as Cached instead
of sending the batch again.

Prefect's ``FileSystemLockManager`` would do, except that its locks have no owner check: a
process killed while holding one (``kill -9``, an OOM kill, a lost machine) leaves a lock file
that every later attempt waits on forever, since Prefect takes the lock without a timeout. Here
a lock file names its holder's host and pid, and a lock whose holder process is gone (on this
host), or that is older than ``stale_after_s`` (another host, which cannot be asked), is taken
over. Cost: one exclusive create, one small write and one unlink per batch (measured in
benchmarks/scale.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from prefect.locking.protocol import LockManager

from shardeval.processes import pid_alive

POLL_S = 0.05
UNREADABLE_GRACE_S = 10.0
"""A lock file that is still empty after this long was left by a holder killed mid-write."""


class BatchLockManager(LockManager):
    """Lock files ``<directory>/<key>.lock``, each naming its holder, host and pid."""

    def __init__(self, directory: Path | str, stale_after_s: float = 6 * 3600.0) -> None:
        self.directory = Path(directory)
        self.stale_after_s = stale_after_s

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, BatchLockManager)
            and other.directory == self.directory
            and other.stale_after_s == self.stale_after_s
        )

    def __hash__(self) -> int:
        return hash((self.directory, self.stale_after_s))

    def __repr__(self) -> str:
        return f"BatchLockManager({str(self.directory)!r})"

    # ------------------------------------------------------------------ helpers
    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.lock"

    def _read(self, path: Path) -> dict[str, Any] | None:
        """The lock record; ``{}`` while it is being written; None when there is no lock."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(data)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            try:
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                return None
            return {"unreadable_for": age}
        return record

    def _is_stale(self, record: dict[str, Any]) -> bool:
        if "unreadable_for" in record:
            return float(record["unreadable_for"]) > UNREADABLE_GRACE_S
        expires = record.get("expires")
        if isinstance(expires, (int, float)) and expires < time.time():
            return True
        if record.get("host") == socket.gethostname():
            pid = record.get("pid")
            return isinstance(pid, int) and not pid_alive(pid)
        return time.time() - float(record.get("at", 0)) > self.stale_after_s

    def _live_record(self, key: str) -> dict[str, Any] | None:
        """The lock's record if it is held by a live holder (stale locks are removed)."""
        path = self._path(key)
        record = self._read(path)
        if record is None:
            return None
        if self._is_stale(record):
            # Two waiters may both see the same stale lock; the worst case is that both run
            # the batch, which is safe (its commit is atomic and idempotent), only wasteful.
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return None
        return record

    # ------------------------------------------------------------ LockManager API
    def acquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        """Take the lock (waiting for a live holder); False if ``acquire_timeout`` passed."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(key)
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        while True:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                record = self._live_record(key)
                if record is not None and record.get("holder") == holder:
                    return True
                if record is not None or path.exists():
                    if deadline is not None and time.monotonic() >= deadline:
                        return False
                    time.sleep(POLL_S)
                continue
            now = time.time()
            record = {
                "holder": holder,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "at": now,
                "expires": None if hold_timeout is None else now + hold_timeout,
            }
            with os.fdopen(fd, "w") as handle:
                json.dump(record, handle)
            return True

    async def aacquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        """Async :meth:`acquire_lock` (in a worker thread)."""
        return await asyncio.to_thread(
            self.acquire_lock, key, holder, acquire_timeout, hold_timeout
        )

    def release_lock(self, key: str, holder: str) -> None:
        """Remove the lock if ``holder`` holds it; otherwise do nothing.

        (A lock that was taken over as stale belongs to someone else now: leave it.)
        """
        path = self._path(key)
        record = self._read(path)
        if record is not None and record.get("holder") == holder:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def is_locked(self, key: str) -> bool:
        """Whether a live holder holds the lock."""
        return self._live_record(key) is not None

    def is_lock_holder(self, key: str, holder: str) -> bool:
        """Whether ``holder`` holds the lock."""
        record = self._live_record(key)
        return record is not None and record.get("holder") == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """Wait until the lock is free; False if ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(POLL_S)
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """Async :meth:`wait_for_lock`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(POLL_S)
        return True
