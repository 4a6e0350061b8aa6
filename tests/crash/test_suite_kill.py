"""SIGKILL a suite in the middle of a cell, rerun it: complete cells send nothing, the
interrupted cell sends only what it had not stored (at most what was in flight is paid twice).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from shardeval.status import read_status
from shardeval.testing.server import TestServer
from tests.crash.harness import output_of, start_run, wait_for_answers
from tests.helpers.suites import write_suite

pytestmark = pytest.mark.slow

N_ITEMS = 60
CONCURRENCY = 8  # write_spec's default for the test server
FLUSH_EVERY_ITEMS = 16  # the spec's default flush window


def done_of(output: Path, run_id: str) -> int:
    if not (output / "runs" / run_id).exists():
        return 0
    return read_status(str(output), run_id).done


def test_a_killed_suite_resumes_cell_by_cell(
    tmp_path: Path, prefect_api: str, slow_server: TestServer
) -> None:
    suite = write_suite(
        tmp_path,
        evals=2,
        n_items=N_ITEMS,
        base_url=slow_server.url,
        models=[{"model": "model-a"}, {"model": "model-b"}],
        parallel=1,  # one cell at a time: the kill lands in one of them
    )
    output = tmp_path / "out"
    logs = tmp_path / "logs"

    # Kill once the first cell is done and the second is well under way.
    process = start_run(suite, prefect_api, logs)
    assert wait_for_answers(slow_server, process, N_ITEMS + 25), output_of(logs)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    sent_first = slow_server.stats()["requests"]

    (suite_dir,) = (output / "suites").iterdir()
    cells = json.loads((suite_dir / "suite.json").read_text())["cells"]
    run_ids = [c["run_id"] for c in cells]
    done = {run_id: done_of(output, run_id) for run_id in run_ids}
    complete = [r for r in run_ids if (output / "runs" / r / "metrics.json").exists()]
    assert complete == run_ids[:1], (done, output_of(logs))
    assert 0 < done[run_ids[1]] < N_ITEMS, done

    slow_server.reset()
    rerun = start_run(suite, prefect_api, logs)
    assert rerun.wait(timeout=300) == 0, output_of(logs)
    stats = slow_server.stats()
    # Exactly what was not stored is sent: nothing for the complete cell, the interrupted
    # cell's missing items, and the two cells that had not started.
    missing = sum(N_ITEMS - d for d in done.values())
    assert stats["requests"] == missing, (stats["requests"], done)
    # What was paid twice is at most what was in flight (or answered but not yet flushed).
    wasted = sent_first + stats["requests"] - len(run_ids) * N_ITEMS
    assert 0 <= wasted <= CONCURRENCY + FLUSH_EVERY_ITEMS, wasted
    record = json.loads((suite_dir / "suite.json").read_text())
    assert [c["status"] for c in record["cells"]] == ["complete"] * 4
    assert json.loads((suite_dir / "summary.json").read_text())["complete"]
