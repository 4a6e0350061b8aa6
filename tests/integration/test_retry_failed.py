"""--retry-failed re-sends only the rows whose status is error, and keeps every ok row."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from shardeval.testing.server import TestServer
from tests.helpers.specs import arith_items, write_spec

RunCli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.mark.slow
def test_retry_failed_resends_only_error_rows(
    tmp_path: Path, llm_server: TestServer, run_cli: RunCli
) -> None:
    items = arith_items(30)
    for index in (3, 4, 17):  # two errors in one batch, one in another
        items[index]["a"] = f"[[status:400]] {items[index]['a']}"
    spec = write_spec(tmp_path, base_url=llm_server.url, items=items, batch_size=10)
    assert run_cli("run", str(spec)).returncode == 0
    assert llm_server.stats()["requests"] == 30
    (run,) = (tmp_path / "runs" / "runs").iterdir()
    before = pq.read_table(run / "results.parquet").to_pylist()

    result = run_cli("run", str(spec), "--retry-failed")

    assert result.returncode == 0, result.stderr
    assert llm_server.stats()["requests"] == 33  # the 3 error rows, nothing else
    after = pq.read_table(run / "results.parquet").to_pylist()
    assert [r["status"] for r in after] == [r["status"] for r in before]
    kept = [(r["item_id"], r["response"]) for r in before if r["status"] == "ok"]
    assert kept == [(r["item_id"], r["response"]) for r in after if r["status"] == "ok"]
