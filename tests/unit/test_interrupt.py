"""A stop belongs to a run: the first reason wins, it maps to its exit code, and it is forgotten."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from shardeval import interrupt
from shardeval.errors import RunIncomplete, RunInterrupted, RunLockedError, StorageError


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    yield
    for run_id in ("a", "b"):
        interrupt.forget(run_id)


def test_first_stop_wins_and_sets_the_error_and_exit_code() -> None:
    assert interrupt.stop_run("a", "lease_lost", "taken over by host h, pid 7")
    assert not interrupt.stop_run("a", "interrupted", "stopped by a signal")
    stop = interrupt.stop_for("a")
    assert stop.reason == "lease_lost" and stop.exit_code == 1
    error = stop.error("3 of 10 done")
    assert isinstance(error, RunLockedError)
    assert error.message == "taken over by host h, pid 7: 3 of 10 done"
    assert not interrupt.stop_for("b").requested, "another run is not stopped"


@pytest.mark.parametrize(
    ("reason", "kind", "code"),
    [
        ("interrupted", RunInterrupted, 130),
        ("storage_failed", StorageError, 1),
        ("endpoint_unreachable", RunIncomplete, 1),
        ("auth_failed", RunIncomplete, 1),
        ("budget_reached", RunIncomplete, 1),
    ],
)
def test_reasons_map_to_errors(reason: interrupt.StopReason, kind: type, code: int) -> None:
    interrupt.stop_run("a", reason, "why")
    error = interrupt.stop_for("a").error("1 of 2 done")
    assert type(error) is kind and error.exit_code == code
    assert "run the same command to resume" in str(error)


def test_judgements_stop_with_their_run_and_forget_starts_clean() -> None:
    interrupt.stop_run("a/judges/quality", "interrupted", "stopped by a signal")
    assert interrupt.stop_for("a").requested
    interrupt.forget("a")
    assert not interrupt.stop_for("a").requested
    assert not interrupt.stop_for("a/judges/quality").requested


def test_a_signal_stops_every_active_run_with_its_grace_period() -> None:
    interrupt.stop_for("a"), interrupt.stop_for("b")
    assert interrupt.stop_active("interrupted", "stopped by a signal", grace_period_s=0.2) >= 2
    stop = interrupt.stop_for("b")
    assert stop.requested and not stop.grace_expired()
    deadline = time.monotonic() + 5
    while not stop.grace_expired():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_lease_gate() -> None:
    stop = interrupt.stop_for("a")
    assert stop.lease_current()
    stop.send_until = time.monotonic() - 1
    assert not stop.lease_current()
    stop.send_until = time.monotonic() + 60
    assert stop.lease_current()
