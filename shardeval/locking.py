"""One writer per run: a lease file, ``lock.json``, in the run directory.

The lease is created exclusively (``O_EXCL`` on local disk, a conditional PUT on object
stores), names its holder (host, pid, since) and is renewed by a heartbeat thread. Another
process that finds it either refuses, naming the holder, or waits (``--wait``). A lease left
by a killed process never blocks forever: it is taken over when its holder is on this host
and no longer alive, or when the lease has not been renewed for ``lease_s`` seconds (the only
test possible across machines). A process that finds its lease taken over stops the run's
requests (:func:`shardeval.interrupt.stop_run`, reason ``lease_lost``) and ends with exit 1
naming the new holder; it holds new requests back as soon as its last renewal is old enough
for a takeover to be possible. On stores without conditional writes two processes racing in
the same instant could both believe they won; see docs/storage-object.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from datetime import UTC, datetime
from typing import Any

from shardeval import interrupt
from shardeval.envvars import env_number
from shardeval.errors import RunInterrupted, RunLockedError
from shardeval.processes import pid_alive
from shardeval.storage import RunStore

logger = logging.getLogger("shardeval.run")  # the CLI shows this logger's lines without -v

DEFAULT_LEASE_S = 60.0
LEASE_ENV = "SHARDEVAL_LEASE_S"
"""Overrides the lease length (seconds; tests use a few seconds to provoke a takeover)."""
SEND_MARGIN = 0.8
"""Requests are sent only while the last renewal is younger than this share of the lease:
after that another process may take the run over, and a request sent then could be paid twice."""


def default_lease_s() -> float:
    """``SHARDEVAL_LEASE_S`` if set (at least 1 s), else 60 s."""
    return env_number(LEASE_ENV, float, minimum=1.0, default=DEFAULT_LEASE_S)


class RunLock:
    """The lease of one run (:meth:`RunSession.lease` holds it for an attempt)."""

    def __init__(self, store: RunStore, *, lease_s: float | None = None) -> None:
        self.store = store
        self.path = store.path("lock.json")
        self.lease_s = lease_s if lease_s is not None else default_lease_s()
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False
        self.taken_by: dict[str, Any] | None = None
        """The record of whoever took the run over, once :attr:`lost`."""

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
        waiting = False
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
            if not waiting:  # said once: a --wait that only sits there looks like a hang
                waiting = True
                logger.info(
                    "waiting for run %s: held by host %s, pid %s, since %s",
                    self.store.run_id,
                    record.get("host"),
                    record.get("pid"),
                    record.get("since"),
                )
            if interrupt.stop_for(self.store.run_id).wait(poll_s):
                raise RunInterrupted(
                    f"stopped while waiting for run {self.store.run_id} (held by host "
                    f"{record.get('host')}, pid {record.get('pid')})"
                )
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
        self._confirmed(time.monotonic())
        self._thread = threading.Thread(target=self._heartbeat, name="shardeval-lease", daemon=True)
        self._thread.start()

    def _confirmed(self, at: float) -> None:
        """The lease was ours at ``at`` (monotonic): requests may go out until the margin."""
        interrupt.stop_for(self.store.run_id).send_until = at + self.lease_s * SEND_MARGIN

    def _heartbeat(self) -> None:
        """Renew the lease every third of it; stop the run the moment it is someone else's.

        The run's engine holds new requests once the last renewal is older than
        ``SEND_MARGIN`` of the lease (a process paused past its lease, a store that does not
        answer), so a process that lost its lease sends nothing after the takeover; the
        requests already in flight finish and are kept.
        """
        since = None
        while not self._stop.wait(self.lease_s / 3):
            try:
                started = time.monotonic()
                record = self.holder()
                if record is None or record.get("token") != self.token:
                    self._lose(record)
                    return
                since = since or record.get("since")
                self.store.write_bytes(self.path, json.dumps(self._record(since)).encode())
                self._confirmed(started)
            except Exception:  # a store hiccup: try again at the next beat
                continue

    def _lose(self, record: dict[str, Any] | None) -> None:
        self.lost = True
        self.taken_by = record
        if record is None:
            who = "its lease was removed by another process"
        else:
            who = (
                f"it was taken over by host {record.get('host')}, pid {record.get('pid')} "
                f"(since {record.get('since')}) after this process had not renewed its "
                f"{self.lease_s:g}s lease"
            )
        interrupt.stop_run(
            self.store.run_id, "lease_lost", f"run {self.store.run_id} stopped sending: {who}"
        )

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            interrupt.stop_for(self.store.run_id).send_until = None
        try:
            record = self.holder()
            if record is not None and record.get("token") == self.token:
                self.store.delete([self.path])
        except Exception:  # the lease expires by itself if the store is down
            pass
