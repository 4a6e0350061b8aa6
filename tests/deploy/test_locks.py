"""The batch lock manager: Prefect's SERIALIZABLE isolation without locks a crash leaves."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tasks.locks import BatchLockManager


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_second_holder_waits_for_the_first(tmp_path: Path) -> None:
    locks = BatchLockManager(tmp_path)
    assert locks.acquire_lock("k", "a")
    assert locks.is_locked("k") and locks.is_lock_holder("k", "a")
    assert not locks.is_lock_holder("k", "b")
    assert not locks.acquire_lock("k", "b", acquire_timeout=0.2)
    threading.Timer(0.2, locks.release_lock, args=("k", "a")).start()
    started = time.monotonic()
    assert locks.acquire_lock("k", "b", acquire_timeout=5)
    assert time.monotonic() - started >= 0.15
    assert locks.is_lock_holder("k", "b")
    locks.release_lock("k", "a")  # not the holder: nothing happens
    assert locks.is_lock_holder("k", "b")
    locks.release_lock("k", "b")
    assert not locks.is_locked("k") and locks.wait_for_lock("k", timeout=0)


def test_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    """What `kill -9` of a batch's process leaves: a lock whose holder is gone."""
    locks = BatchLockManager(tmp_path)
    record = {"holder": "killed", "host": socket.gethostname(), "pid": dead_pid(), "at": 0}
    (tmp_path / "k.lock").write_text(json.dumps(record))
    assert not locks.is_locked("k")
    assert locks.acquire_lock("k", "next", acquire_timeout=1)
    # A live holder on this host is never taken over, however old its lock.
    (tmp_path / "j.lock").write_text(json.dumps({**record, "pid": os.getpid()}))
    assert locks.is_locked("j")


def test_unreadable_lock_is_stale_only_after_a_grace_period(tmp_path: Path) -> None:
    locks = BatchLockManager(tmp_path)
    (tmp_path / "k.lock").write_text("")  # a holder killed between create and write
    assert locks.is_locked("k")
    old = time.time() - 60
    os.utime(tmp_path / "k.lock", (old, old))
    assert not locks.is_locked("k")
