"""Run progress counters: a batch that runs again is not counted twice."""

from __future__ import annotations

from shardeval.progress import RunProgress


def test_a_retried_batch_replaces_its_count_instead_of_adding_to_it() -> None:
    progress = RunProgress(run_id="r")
    progress.plan(total=10, batches=1, done=0)

    progress.batch_started("b1", stored_rows=0)
    for _ in range(9):
        progress.finished("ok", batch="b1")
    progress.finished("transient", "server_error", "b1")  # the attempt fails: retried
    assert (progress.done, progress.sent, progress.from_cache) == (9, 10, 0)

    # The retry finds the first attempt's 9 items stored (its flushed parts) and sends 1.
    progress.batch_started("b1", stored_rows=9)
    progress.finished("ok", batch="b1")
    assert (progress.done, progress.total) == (10, 10)
    assert progress.from_cache == 0  # those 9 were sent by this run, not found stored
    assert progress.sent == 11


def test_rows_stored_before_the_run_count_as_from_the_cache() -> None:
    progress = RunProgress(run_id="r")
    progress.plan(total=30, batches=3, done=0)
    progress.batch_started("b1", stored_rows=10)  # committed earlier
    progress.batch_started("b2", stored_rows=4)  # parts of an earlier run
    for _ in range(6):
        progress.finished("ok", batch="b2")
    progress.batch_started("b3", stored_rows=0)
    for _ in range(9):
        progress.finished("ok", batch="b3")
    progress.finished("error", "bad_request", "b3")
    assert (progress.done, progress.from_cache, progress.sent) == (30, 14, 16)
    assert (progress.ok, progress.errors) == (15, 1)
    assert progress.error_kinds == {"bad_request": 1}
