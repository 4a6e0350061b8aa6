"""The answer journal: torn lines ignored, journaled answers reused on resume, then removed."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from shardeval.journal import Journal, batch_journals, list_journals, read_journal
from shardeval.outcome import Outcome
from shardeval.session import RunSession
from shardeval.storage import RunStore
from shardeval.testing.server import TestServer, prompt_key
from tests.helpers.specs import write_spec
from tests.unit.test_session import run_without_prefect


def ok(key: str, response: str = "42") -> Outcome:
    return Outcome(key=key, status="ok", response=response, attempts=1, finished_at=1.0)


def test_a_torn_last_line_and_a_garbled_line_are_ignored(tmp_path: Path) -> None:
    store = RunStore(str(tmp_path), "r")
    journal = Journal(store, "b1")
    journal.append(ok("k1", "one"), "id1", 0)
    journal.append(Outcome(key="k2", status="error", error="bad", http_status=400), "id2", 0)
    journal.append(ok("k3", "three"), "id3", 1)
    journal.close()
    data = Path(journal.path).read_bytes()
    lines = data.split(b"\n")
    # The middle line garbled (a machine crash can leave zeros), the last one cut short.
    garbled = b"\x00" * len(lines[1])
    Path(journal.path).write_bytes(lines[0] + b"\n" + garbled + b"\n" + lines[2][:-5])

    table = read_journal(journal.path)
    assert table is not None
    assert table.to_pylist()[0]["item_key"] == "k1"
    assert table.column("item_key").to_pylist() == ["k1"]
    assert table.column("response").to_pylist() == ["one"]
    assert table.column("item_id").to_pylist() == ["id1"]
    assert batch_journals(store, "b1") == [journal.path]
    assert list_journals(store) == {"b1": [journal.path]}


def test_rows_of_a_complete_journal_round_trip(tmp_path: Path) -> None:
    store = RunStore(str(tmp_path), "r")
    journal = Journal(store, "b1")
    outcome = Outcome(
        key="k1",
        status="ok",
        response="ünïcode\nand a newline",
        latency_s=0.25,
        prompt_tokens=3,
        completion_tokens=1,
        finish_reason="stop",
        attempts=2,
        finished_at=12.5,
    )
    journal.append(outcome, "id1", 3)
    journal.close()
    table = read_journal(journal.path)
    assert table is not None
    (row,) = table.to_pylist()
    assert row["response"] == "ünïcode\nand a newline"
    assert (row["trial"], row["attempts"], row["latency_s"]) == (3, 2, 0.25)
    assert read_journal(str(tmp_path / "missing.journal.jsonl")) is None


def test_a_resume_reads_journaled_answers_and_the_commit_removes_the_journal(
    tmp_path: Path, llm_server: TestServer
) -> None:
    spec = write_spec(
        tmp_path, base_url=llm_server.url, n_items=12, batch_size=5, output=str(tmp_path / "out")
    )
    session = RunSession.prepare(str(spec))
    plan = session.plan
    first = plan.batches[0]
    requests = plan.requests(first)
    # A killed attempt journaled the first three answers of batch 1.
    journal = Journal(session.store, first.key)
    for request in requests[:3]:
        journal.append(ok(request.key, "journaled"), request.item_id, request.trial)
    journal.close()

    summary = run_without_prefect(session)
    assert summary["complete"]
    prompts = llm_server.stats()["prompts"]
    assert sum(prompts.values()) == 12 - 3
    for request in requests[:3]:
        assert prompt_key(request.messages) not in prompts
    batch = pq.read_table(session.store.batch_path(first.key))
    responses = dict(
        zip(batch.column("item_key").to_pylist(), batch.column("response").to_pylist(), strict=True)
    )
    assert [responses[r.key] for r in requests[:3]] == ["journaled"] * 3
    assert list_journals(session.store) == {}
    assert not (Path(session.store.root) / "parts").exists() or not any(
        p.is_file() for p in (Path(session.store.root) / "parts").rglob("*")
    )


def test_a_journal_of_another_batching_is_reused_item_by_item(
    tmp_path: Path, llm_server: TestServer
) -> None:
    spec = write_spec(
        tmp_path, base_url=llm_server.url, n_items=12, batch_size=5, output=str(tmp_path / "out")
    )
    session = RunSession.prepare(str(spec))
    requests = [r for b in session.plan.batches for r in session.plan.requests(b)]
    journal = Journal(session.store, "an-old-batching")
    for request in requests[3:9]:  # spans batches 1 and 2 of the current plan
        journal.append(ok(request.key, "old"), request.item_id, request.trial)
    journal.close()

    assert run_without_prefect(session)["complete"]
    assert sum(llm_server.stats()["prompts"].values()) == 12 - 6


def test_an_empty_journal_is_read_as_no_rows_and_removed_with_the_batch(
    tmp_path: Path, llm_server: TestServer
) -> None:
    spec = write_spec(
        tmp_path, base_url=llm_server.url, n_items=6, batch_size=5, output=str(tmp_path / "out")
    )
    session = RunSession.prepare(str(spec))
    first = session.plan.batches[0]
    empty = Path(session.store.parts_dir(first.key)) / "00000000000000000001-dead.journal.jsonl"
    empty.parent.mkdir(parents=True)
    empty.write_bytes(b"")  # killed between creating the file and its first line
    assert run_without_prefect(session)["complete"]
    assert llm_server.stats()["requests"] == 6
    assert not empty.exists()


def test_a_response_orjson_refuses_is_still_journaled_as_one_line(tmp_path: Path) -> None:
    # A python provider can return a str that is not valid UTF-8 (a lone surrogate): orjson
    # refuses to encode it, and the answer must still be written, on its own line.
    store = RunStore(str(tmp_path), "r")
    journal = Journal(store, "b1")
    journal.append(ok("k1", "half \ud83d of an emoji"), "id1", 0)
    journal.append(ok("k2", "plain"), "id2", 0)
    journal.close()
    first, second = Path(journal.path).read_bytes().splitlines()
    assert json.loads(first)[7] == "half \ud83d of an emoji"
    assert json.loads(second)[7] == "plain"


def test_an_answer_no_journal_line_can_hold_is_still_delivered(tmp_path: Path) -> None:
    # on_done runs on the engine's thread: had it raised, the batch's thread would have waited
    # for this outcome forever. The journal is turned off for the batch instead, and the
    # outcome goes on (unkept) to the batch's thread, whose part write then says what failed.
    from shardeval.part_writer import PartFlusher
    from shardeval.runner import _Arrivals
    from tests.unit.test_flush_backlog import batch

    store = RunStore(str(tmp_path), "r")
    work = batch("r", 1, ["k1", "k2"])
    journal = Journal(store, work.key)
    arrivals = _Arrivals(journal, PartFlusher(store, work), expected=2, label="batch 1/2")
    arrivals.on_done(ok("k1"))
    unencodable = Outcome(key="k2", status="ok", response="x", finish_reason=object())  # type: ignore[arg-type]
    arrivals.on_done(unencodable)
    journal.close()
    assert [(o.key, kept) for o, kept in arrivals.outcomes] == [("k1", True), ("k2", False)]
    assert arrivals.journal is None and arrivals.wake.is_set()
    table = read_journal(journal.path)
    assert table is not None and table.column("item_key").to_pylist() == ["k1"]
