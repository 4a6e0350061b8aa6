"""Identical requests in one run are sent once, and their answer serves every row that asked."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from shardeval.session import RunSession
from shardeval.testing.server import TestServer
from tests.helpers.specs import arith_items, write_jsonl, write_spec
from tests.unit.test_session import run_without_prefect

N = 30


def doubled(items: list[dict[str, object]]) -> list[dict[str, object]]:
    """Every prompt twice, under two ids, the copies in later batches than the originals."""
    return items + [{**item, "id": f"{item['id']}-copy"} for item in items]


def test_a_prompt_under_two_ids_is_sent_once_and_both_rows_get_the_answer(
    tmp_path: Path, llm_server: TestServer
) -> None:
    items = doubled(arith_items(N, seed=3))
    spec = write_spec(
        tmp_path, base_url=llm_server.url, items=items, batch_size=7, output=str(tmp_path / "o")
    )
    session = RunSession.prepare(str(spec))
    assert session.plan.n_rows == 2 * N
    summary = run_without_prefect(session)
    assert summary["complete"] and summary["n_rows"] == 2 * N

    stats = llm_server.stats()
    assert stats["requests"] == N
    assert set(stats["prompts"].values()) == {1}
    results = pq.read_table(session.store.results_path).to_pylist()
    by_id = {row["item_id"]: row for row in results}
    assert len(by_id) == 2 * N
    for item in items[:N]:
        original, copy = by_id[str(item["id"])], by_id[f"{item['id']}-copy"]
        assert original["status"] == copy["status"] == "ok"
        assert original["response"] == copy["response"] is not None


def test_a_duplicate_of_a_stored_answer_is_not_sent_again(
    tmp_path: Path, llm_server: TestServer
) -> None:
    items = arith_items(N, seed=4)
    spec = write_spec(
        tmp_path, base_url=llm_server.url, items=items, batch_size=7, output=str(tmp_path / "o")
    )
    first = RunSession.prepare(str(spec))
    assert run_without_prefect(first)["complete"]
    assert llm_server.stats()["requests"] == N
    llm_server.reset()

    # The dataset gains a copy of every prompt under new ids: the same run, resumed.
    write_jsonl(tmp_path / "items.jsonl", doubled(items))
    again = RunSession.prepare(str(spec))
    assert again.run_id == first.run_id
    summary = run_without_prefect(again)
    assert summary["complete"] and summary["n_rows"] == 2 * N
    assert llm_server.stats()["requests"] == 0
    results = pq.read_table(again.store.results_path)
    assert set(results.column("status").to_pylist()) == {"ok"}
