"""A damaged file never fails a run nor lies: it is set aside and its items are recomputed."""

from __future__ import annotations

import signal
from pathlib import Path

import pyarrow.parquet as pq

from shardeval.status import read_status
from shardeval.testing.server import TestServer
from tests.crash.harness import (
    BATCH_SIZE,
    crash_spec,
    output_of,
    stall,
    start_run,
    wait_for_answers,
)
from tests.helpers.waiting import wait_until

N_ITEMS = 400


def tear(path: Path) -> None:
    """Cut a journal in the middle of a line, as a machine crash can leave its tail."""
    data = path.read_bytes()
    assert data.count(b"\n") >= 2, "the journal should hold a few answers"
    path.write_bytes(data[: data.rindex(b"\n", 0, len(data) - 1) - 5])


def truncate(path: Path) -> list[str]:
    """Cut a Parquet file in half; return the item keys it held."""
    keys = pq.read_table(path, columns=["item_key"]).column("item_key").to_pylist()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return keys


def test_truncated_batch_and_part_are_set_aside_and_only_their_items_recomputed(
    tmp_path: Path, prefect_api: str, slow_server: TestServer
) -> None:
    spec = crash_spec(
        tmp_path / "eval",
        slow_server,
        n_items=N_ITEMS,
        flush_every_items=8,
    )
    output = tmp_path / "eval" / "runs"
    logs = tmp_path / "logs"

    # Kill a run once some batches are committed and a later one has journaled answers: stall the
    # server after a while, wait for those files, then kill.
    process = start_run(spec, prefect_api, logs)
    assert wait_for_answers(slow_server, process, 2 * BATCH_SIZE + 30), output_of(logs)
    stall(slow_server, process)

    def stored() -> tuple[list[Path], list[Path]] | None:
        """The committed batches and the journals, once there are two and one of 2+ answers."""
        run_dirs = sorted((output / "runs").glob("*"))
        if not run_dirs:
            return None
        batches = sorted((run_dirs[0] / "batches").glob("*.parquet"))
        # On local disk a running batch's answers are in its journal (one line per answer).
        journals = sorted((run_dirs[0] / "parts").glob("*/*.journal.jsonl"))
        if len(batches) < 2 or not journals or journals[0].read_bytes().count(b"\n") < 2:
            return None
        return batches, journals

    wait_until(stored, timeout=60, what="two committed batches and a journal", process=process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    slow_server.configure(latency_min=0.02, latency_max=0.05)
    run_dir = next((output / "runs").iterdir())
    found = stored()  # again after the kill: what the rest of the test works on
    assert found is not None, "the kill removed a committed batch or a journal"
    batches, journals = found

    damaged = truncate(batches[0])
    tear(journals[0])  # a machine crash's torn tail: the cut line's item is sent again
    before = read_status(str(output), run_dir.name)
    assert len(before.unreadable) == 1  # the batch; a torn journal line is skipped, not fatal
    slow_server.reset()

    rerun = start_run(spec, prefect_api, logs)
    assert rerun.wait(timeout=300) == 0, output_of(logs)
    said = output_of(logs)
    assert said.count("set aside") >= 1, said

    quarantined = sorted(p.name for p in (run_dir / "quarantine").iterdir())
    assert len(quarantined) == 1, quarantined
    assert any(batches[0].name in name for name in quarantined)

    # Exactly the items not stored (the damaged files' among them) were sent again.
    stats = slow_server.stats()
    assert stats["requests"] == N_ITEMS - before.done
    assert before.done <= N_ITEMS - len(damaged)
    results = pq.read_table(run_dir / "results.parquet")
    assert results.num_rows == N_ITEMS
    assert set(results.column("status").to_pylist()) == {"ok"}
    assert set(damaged) <= set(results.column("item_key").to_pylist())
