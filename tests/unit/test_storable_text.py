"""Text UTF-8 cannot hold (surrogates) is mended where it becomes an outcome, and on reading.

A python function can return a str holding a lone surrogate; left in, the batch's Parquet
file could never be written and every rerun would fail on the same journaled answer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from shardeval.journal import Journal
from shardeval.outcome import Outcome, storable
from shardeval.session import RunSession
from tests.helpers.specs import write_spec
from tests.unit import metric_functions
from tests.unit.test_session import run_without_prefect


def test_storable_joins_a_pair_and_replaces_a_lone_surrogate() -> None:
    plain = "ascii only"
    assert storable(plain) is plain
    assert storable("café") == "café"
    assert storable("a\ud83d\ude00b") == "a\U0001f600b"  # a pair, as two code points
    assert storable("half \ud83d, \udc00 alone") == "half \ufffd, \ufffd alone"
    storable("x\ud800").encode("utf-8")  # no longer raises


def complete_run(tmp_path: Path, function: str, n_items: int) -> dict[str, dict[str, Any]]:
    """Run ``metric_functions.<function>`` as the model, in batches of 3; its rows by item id."""
    model = {"provider": "python", "function": f"tests.unit.metric_functions:{function}"}
    spec = write_spec(
        tmp_path, n_items=n_items, batch_size=3, output=str(tmp_path / "out"), model=model
    )
    session = RunSession.prepare(str(spec))
    summary = run_without_prefect(session)
    assert summary["complete"] and summary["n_rows"] == n_items
    return {r["item_id"]: r for r in pq.read_table(session.store.results_path).to_pylist()}


@pytest.mark.parametrize("function", ["surrogate_model", "async_surrogate_model"])
def test_a_run_whose_model_returns_a_lone_surrogate_completes(
    tmp_path: Path, function: str
) -> None:
    rows = complete_run(tmp_path, function, n_items=6)
    assert rows["q00001"]["response"] == "half an emoji \ufffd"
    assert rows["q00002"]["status"] == "error"
    assert "cannot say \ufffd" in rows["q00002"]["error"]


def test_a_journaled_lone_surrogate_is_mended_on_reading_and_not_asked_again(
    tmp_path: Path,
) -> None:
    # A run made before answers were mended: its journal holds the raw surrogate, its batch
    # never committed. The rerun reads the answer back (mended) instead of calling again.
    model = {"provider": "python", "function": "tests.unit.metric_functions:surrogate_model"}
    spec = write_spec(tmp_path, n_items=3, batch_size=3, output=str(tmp_path / "out"), model=model)
    session = RunSession.prepare(str(spec))
    batch = session.plan.batches[0]
    journal = Journal(session.store, batch.key)
    for request in session.plan.requests(batch):
        raw = Outcome(key=request.key, status="ok", response="old \ud83d", finished_at=1.0)
        journal.append(raw, request.item_id, request.trial)
    journal.close()
    metric_functions.SURROGATE_CALLS.clear()

    summary = run_without_prefect(session)
    assert summary["complete"] and summary["n_rows"] == 3
    assert metric_functions.SURROGATE_CALLS == []
    responses = pq.read_table(session.store.results_path).column("response").to_pylist()
    assert responses == ["old \ufffd"] * 3


def test_a_token_count_of_the_wrong_type_is_an_error_row_and_the_run_completes(
    tmp_path: Path,
) -> None:
    # Journaled as the answer, "12" made the batch's Parquet write fail on every rerun.
    rows = complete_run(tmp_path, "badly_typed_model", n_items=4)
    assert rows["q00001"]["status"] == "error"
    assert rows["q00001"]["error"] == (
        "the function returned prompt_tokens='12' (str); expected an int or None"
    )
    assert rows["q00002"]["status"] == "error"
    assert "completion_tokens=1.5 (float)" in rows["q00002"]["error"]
    fine = rows["q00003"]
    assert (fine["status"], fine["prompt_tokens"], fine["finish_reason"]) == ("ok", 7, "Reason.X")
