"""One writer per run: a lease file, ``lock.json``, in the run directory.

The lease is created exclusively (``O_EXCL`` on local disk, a conditional PUT on object
stores), names its holder (host, pid, since) and is renewed by a heartbeat thread. Another
process that finds it either refuses, naming the holder, or waits (``--wait``). A lease left
by a killed process never blocks forever: it is taken over when its holder is on this host
and no longer alive, or when the lease has not been renewed for ``lease_s`` seconds (the only
test possible across machines). On stores without conditional writes two processes racing in
the same instant could both believe they won; see docs/storage-object.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from datetime import UTC, datetime
from typing import Any

from shardeval import interrupt
from shardeval.errors import RunInterrupted, RunLockedError
from shardeval.storage import RunStore

DEFAULT_LEASE_S = 60.0


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """The lease of one run. Use as a context manager."""

    def __init__(self, store: RunStore, *, lease_s: float = DEFAULT_LEASE_S) -> None:
        self.store = store
        self.path = store.path("lock.json")
        self.lease_s = lease_s
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def _record(self, since: str | None = None) -> dict[str, Any]:
        now = time.time()
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": since or datetime.now(UTC).isoformat(timespec="seconds"),
            "renewed_at": now,
            "lease_s": self.lease_s,
            "token": self.token,
        }

    def holder(self) -> dict[str, Any] | None:
        """The current lease record, if any (without quarantining a half-written one)."""
        data = self.store.read_bytes(self.path)
        if data is None:
            return None
        try:
            record = json.loads(data)
        except ValueError:
            return {"unreadable": True, "renewed_at": time.time()}
        return record if isinstance(record, dict) else None

    def is_stale(self, record: dict[str, Any]) -> bool:
        """Whether a lease's holder is gone (same host, dead pid) or its lease expired."""
        same_host = record.get("host") == socket.gethostname()
        if same_host and isinstance(record.get("pid"), int) and not pid_alive(record["pid"]):
            return True
        renewed = float(record.get("renewed_at", 0))
        return time.time() - renewed > float(record.get("lease_s", self.lease_s))

    def acquire(self, *, wait: bool = False, poll_s: float = 1.0) -> None:
        """Take the lease, or raise RunLockedError naming the holder (or wait for it)."""
        # Look first: on a store that ignores conditional writes the create below would
        # silently replace a live holder's lease; looking narrows that to a same-instant race.
        record = self.holder()
        while True:
            if record is None:
                payload = json.dumps(self._record()).encode()
                if self.store.create_exclusive(self.path, payload) and self._verify():
                    self._start_heartbeat()
                    return
                record = self.holder()
                if record is None:
                    continue  # released between our attempt and our look: try again
            if record.get("token") == self.token:
                # Our create went through but its answer was lost, and the retry found it.
                self._start_heartbeat()
                return
            if self.is_stale(record):
                self._take_over(record)
                record = None
                continue
            if not wait:
                raise RunLockedError(
                    f"run {self.store.run_id} is being written by another process: "
                    f"host {record.get('host')}, pid {record.get('pid')}, "
                    f"since {record.get('since')}",
                    hint="wait for it to finish, pass --wait to queue behind it, or use "
                    "--run-id/--fresh for a separate run",
                )
            if interrupt.stop_requested():
                raise RunInterrupted(
                    f"stopped while waiting for run {self.store.run_id} (held by host "
                    f"{record.get('host')}, pid {record.get('pid')})"
                )
            time.sleep(poll_s)
            record = self.holder()

    def _verify(self) -> bool:
        """Read the lease back: on a store without conditional writes a racer may have won."""
        record = self.holder()
        return record is not None and record.get("token") == self.token

    def clear_stale(self) -> bool:
        """Remove the lease if its holder is gone; True if one was removed.

        For a process that finds the run complete and so never takes the lease: a run killed
        after writing metrics.json but before releasing would otherwise leave lock.json behind.
        """
        record = self.holder()
        if record is None or record.get("unreadable") or not self.is_stale(record):
            return False
        self._take_over(record)
        return True

    def _take_over(self, record: dict[str, Any]) -> None:
        # Only delete the stale record we looked at; if someone else replaced it meanwhile,
        # our exclusive create will fail and we look again.
        current = self.holder()
        if current is not None and current.get("token") == record.get("token"):
            with contextlib.suppress(FileNotFoundError):
                self.store.delete([self.path])

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._heartbeat, name="shardeval-lease", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        since = None
        while not self._stop.wait(self.lease_s / 3):
            try:
                record = self.holder()
                if record is None or record.get("token") != self.token:
                    self.lost = True
                    return
                since = since or record.get("since")
                self.store.write_bytes(self.path, json.dumps(self._record(since)).encode())
            except Exception:  # a store hiccup: try again at the next beat
                continue

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            record = self.holder()
            if record is not None and record.get("token") == self.token:
                self.store.delete([self.path])
        except Exception:  # the lease expires by itself if the store is down
            pass

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
