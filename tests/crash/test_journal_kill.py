"""SIGKILL on local disk loses only the requests in flight: every answer received is journaled.

The run is killed mid-way; then, counting with the server's per-prompt counters, every prompt
the server answered (200) before the kill must be stored (committed batch, part or journal),
and the resumed run sends only the prompts that were never answered.

To make "answered before the kill" exact, the server is slowed to 60 s per answer just before
the kill and given a moment to deliver the answers already on their way: what was answered is
then fixed, and what is still waiting is in flight (the physical limit: a provider bills it).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from shardeval.journal import is_journal, read_journal, with_journals
from shardeval.session import RunSession
from shardeval.storage import RunStore
from shardeval.testing.server import TestServer, prompt_key
from tests.crash.harness import crash_spec, output_of, stall, start_run, wait_for_answers
from tests.helpers.specs import arith_items

N_ITEMS = 400


def stored_keys(store: RunStore) -> set[str]:
    """Item keys with a final row anywhere in the run directory."""
    paths = [store.batch_path(k) for k in store.list_batches()]
    paths += [p for ps in with_journals(store, store.list_parts()).values() for p in ps]
    keys: set[str] = set()
    for path in paths:
        columns = ["item_key", "status"]
        table = read_journal(path, columns) if is_journal(path) else pq.read_table(path)
        assert table is not None
        for key, status in zip(
            table.column("item_key").to_pylist(), table.column("status").to_pylist(), strict=True
        ):
            if status in ("ok", "error"):
                keys.add(key)
    return keys


@pytest.mark.slow
def test_sigkill_loses_no_answer_that_was_received(
    tmp_path: Path, slow_server: TestServer, prefect_api: str
) -> None:
    spec = crash_spec(tmp_path, slow_server, items=arith_items(N_ITEMS))
    session = RunSession.prepare(str(spec))
    prompt_of = {
        r.key: prompt_key(r.messages)
        for b in session.plan.batches
        for r in session.plan.requests(b)
    }
    logs = tmp_path / "logs"

    process = start_run(spec, prefect_api, logs)
    assert wait_for_answers(slow_server, process, N_ITEMS // 3), output_of(logs)
    stall(slow_server, process, latency_s=60.0)  # what is answered now stays answered
    # The answers the server sent must reach the client before the kill. The only event that
    # says one has is the journal line this test checks for, so this one wait is a bounded one.
    time.sleep(0.5)
    at_kill = slow_server.stats()
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert at_kill["in_flight"] > 0, "nothing was in flight: the kill tested nothing"

    answered = {p for p, n in at_kill["prompt_completions"].items() if n}
    stored = {prompt_of[k] for k in stored_keys(session.store)}
    assert answered - stored == set(), f"{len(answered - stored)} answered but lost"

    slow_server.configure(latency_min=0.02, latency_max=0.05)
    slow_server.reset()
    final = start_run(spec, prefect_api, logs)
    assert final.wait(timeout=300) == 0, output_of(logs)
    resent = slow_server.stats()["prompts"]
    assert not set(resent) & answered, "a prompt answered before the kill was sent again"
    assert len(resent) == len(set(prompt_of.values())) - len(answered)
    assert pq.read_table(session.store.results_path).num_rows == N_ITEMS
