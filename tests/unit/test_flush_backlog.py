"""An object store two flush windows behind the answers holds the run's new requests."""

from __future__ import annotations

from pathlib import Path

from shardeval import interrupt
from shardeval.outcome import Outcome
from shardeval.part_writer import BEHIND_WINDOWS, PartFlusher
from shardeval.planning import PlannedRequest
from shardeval.runner import BatchWork
from shardeval.storage import RunStore

WINDOW = 4


def batch(run_id: str, number: int, keys: list[str]) -> BatchWork:
    requests = [
        PlannedRequest(k, f"id-{k}", i, 0, [{"role": "user", "content": k}], {})
        for i, k in enumerate(keys)
    ]
    return BatchWork(
        run_id=run_id,
        number=number,
        total=2,
        key=f"b{number}",
        requests=requests,
        flush_every_s=3600.0,
        flush_every_items=WINDOW,
    )


def ok(key: str) -> Outcome:
    return Outcome(key=key, status="ok", response="42", attempts=1, finished_at=1.0)


def test_parts_not_yet_landed_hold_new_requests_until_they_land(tmp_path: Path) -> None:
    run_id = "backlog-run"
    store = RunStore(str(tmp_path), run_id)
    stop = interrupt.stop_for(run_id)
    one = PartFlusher(store, batch(run_id, 1, [f"a{i}" for i in range(12)]))
    two = PartFlusher(store, batch(run_id, 2, [f"b{i}" for i in range(12)]))
    try:
        # Two batches fill one window between them: parts are cut (and, on an object store,
        # uploading in the background): here each cut is held back, as a slow PUT would be.
        landing = []
        for i in range(WINDOW // 2):
            for flusher, prefix in ((one, "a"), (two, "b")):
                flusher.buffer.append(ok(f"{prefix}{i}"))
        for flusher in (one, two):
            cut = flusher.cut()
            assert cut is not None
            landing.append((flusher, cut))
        one.window.note_backlog(WINDOW)
        assert stop.may_send()  # one window being written: requests go on

        for i in range(WINDOW // 2, WINDOW + WINDOW // 2):
            one.buffer.append(ok(f"a{i}"))
        one.window.note_backlog(WINDOW)
        assert one.unflushed + two.unflushed == BEHIND_WINDOWS * WINDOW
        assert stop.storage_behind and not stop.may_send()  # a kill now loses two windows

        for flusher, (path, rows) in landing:
            flusher.write(path, rows)  # the slow PUTs land
        assert not stop.storage_behind and stop.may_send()
        assert one.unflushed == WINDOW
    finally:
        one.close()
        two.close()
    assert not stop.storage_behind  # nothing of the run is left unwritten in this process
