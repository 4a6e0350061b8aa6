"""Helpers under the storage of results: one row per key, schema conforming, env numbers."""

from __future__ import annotations

import pyarrow as pa
import pytest

from shardeval.envvars import env_number
from shardeval.errors import SpecError, StorageError
from shardeval.results import GENERATION_SCHEMA, conform, conform_to, one_row_per_key


def rows(*pairs: tuple[str, str]) -> pa.Table:
    keys, statuses = zip(*pairs, strict=True)
    return pa.table(
        {
            "item_key": list(keys),
            "status": list(statuses),
            "n": list(range(len(keys))),
        }
    )


def test_ok_wins_then_latest() -> None:
    table = rows(("a", "error"), ("b", "ok"), ("a", "ok"), ("b", "ok"), ("c", "error"))
    table = pa.concat_tables([table, rows(("c", "error"), ("a", "error"))])
    kept = one_row_per_key(table)
    # a: its only ok row (index 2); b: the latest ok (3); c: the latest error (row 0 of the
    # second table); kept rows stay in their order in the input.
    assert kept.column("item_key").to_pylist() == ["a", "b", "c"]
    assert kept.column("n").to_pylist() == [2, 3, 0]
    assert kept.column("status").to_pylist() == ["ok", "ok", "error"]


def test_one_row_per_key_of_nothing() -> None:
    empty = GENERATION_SCHEMA.empty_table()
    assert one_row_per_key(empty).num_rows == 0


def test_conform_casts_and_fills() -> None:
    old = pa.table({"item_key": ["a"], "status": ["ok"], "http_status": pa.array([None])})
    conformed = conform(old)
    assert conformed.schema == GENERATION_SCHEMA
    assert conformed.column("http_status").type == pa.int64()
    assert conformed.column("response").to_pylist() == [None]
    schema = pa.schema([pa.field("x", pa.float64()), pa.field("y", pa.string())])
    assert conform_to(pa.table({"x": [1]}), schema).to_pylist() == [{"x": 1.0, "y": None}]


def test_env_number(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHARDEVAL_TEST_N", raising=False)
    assert env_number("SHARDEVAL_TEST_N", int, minimum=0) is None
    assert env_number("SHARDEVAL_TEST_N", int, minimum=0, default=6) == 6
    monkeypatch.setenv("SHARDEVAL_TEST_N", "  ")
    assert env_number("SHARDEVAL_TEST_N", float, minimum=0, default=1.5) == 1.5
    monkeypatch.setenv("SHARDEVAL_TEST_N", "3")
    assert env_number("SHARDEVAL_TEST_N", int, minimum=0) == 3
    monkeypatch.setenv("SHARDEVAL_TEST_N", "0.25")
    assert env_number("SHARDEVAL_TEST_N", float, minimum=0.001) == 0.25
    with pytest.raises(SpecError, match=r"SHARDEVAL_TEST_N='0.25' is not a valid setting"):
        env_number("SHARDEVAL_TEST_N", int, minimum=0)
    monkeypatch.setenv("SHARDEVAL_TEST_N", "-1")
    with pytest.raises(StorageError) as bad:
        env_number("SHARDEVAL_TEST_N", int, minimum=0, error=StorageError)
    assert "a whole number >= 0" in str(bad.value)
