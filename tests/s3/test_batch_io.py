"""What one batch costs in S3 requests, counted by the S3 server itself.

A batch of a fresh run needs no look-ups (the flow's survey has just found nothing for it) and,
when its items finish within one flush window, no part either: its cost is the one PUT of its
committed file. A batch with parts of an earlier attempt reads them and sends only the rest.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from shardeval.engines import close_engines, engine_for
from shardeval.overrides import resolve_spec
from shardeval.progress import forget, progress_for
from shardeval.runner import BatchIncomplete, BatchPointer, BatchWork, RunRef, run_batch
from shardeval.storage import RunStore
from shardeval.testing.server import TestServer
from shardeval.validation import Validated, validate
from tests.helpers.specs import arith_items, first_work, write_spec
from tests.s3.servers import S3Backend

N_ITEMS = 10
ONE_WINDOW = {"flush_every_items": 1000, "flush_every_s": 600}
"""A flush window no batch of this file fills: every flush is the batch's own."""


def first_batch(validated: Validated, store: RunStore, run: RunRef) -> BatchWork:
    """The first batch's work, as the evaluate flow builds it from a fresh survey."""
    return first_work(validated, store)


def run_one(store: RunStore, work: BatchWork, run: RunRef) -> BatchPointer:
    try:
        return run_batch(store, work, engine_for(run.run_id, run.model), progress_for(run.run_id))
    finally:
        close_engines(run.run_id)
        forget(run.run_id)


def setup(
    tmp_path: Path, bucket: str, server: TestServer, items: list[dict[str, object]]
) -> tuple[Validated, RunStore, RunRef]:
    spec = write_spec(tmp_path, base_url=server.url, items=items, batch_size=N_ITEMS, **ONE_WINDOW)
    validated = validate(resolve_spec(str(spec)))
    store = RunStore(f"s3://{bucket}/out", "batch-io")
    return validated, store, RunRef("batch-io", store.output, validated.spec.model)


def test_a_fresh_batch_costs_one_put(
    tmp_path: Path, s3_backend: S3Backend, bucket: str, llm_server: TestServer
) -> None:
    validated, store, run = setup(tmp_path, bucket, llm_server, arith_items(N_ITEMS))
    work = first_batch(validated, store, run)
    assert work.nothing_stored

    before = s3_backend.request_counts()
    pointer = run_one(store, work, run)

    assert s3_backend.request_counts() - before == Counter({"PUT": 1})
    assert (pointer.rows, pointer.sent) == (N_ITEMS, N_ITEMS)
    assert store.list_batches() == {work.key}
    assert store.list_parts() == {}
    assert llm_server.stats()["completions"] == N_ITEMS


def test_a_batch_with_parts_reads_them_and_sends_only_the_rest(
    tmp_path: Path, s3_backend: S3Backend, bucket: str, llm_server: TestServer
) -> None:
    items = arith_items(N_ITEMS, seed=3)
    items[4]["a"] = f"[[status:503]] {items[4]['a']}"  # fails transiently, every time
    validated, store, run = setup(tmp_path, bucket, llm_server, items)

    with pytest.raises(BatchIncomplete):
        run_one(store, first_batch(validated, store, run), run)
    # The items that finished were flushed as a part before the batch gave up.
    assert [len(paths) for paths in store.list_parts().values()] == [1]
    assert llm_server.stats()["completions"] == N_ITEMS - 1

    work = first_batch(validated, store, run)  # a rerun's survey sees the part
    assert not work.nothing_stored
    llm_server.reset()
    before = s3_backend.request_counts()
    with pytest.raises(BatchIncomplete):
        run_one(store, work, run)

    # It looks for its committed file (a GET: absent) and its parts (a LIST), reads the part
    # (a GET) and writes nothing (nothing new finished).
    assert s3_backend.request_counts() - before == Counter({"GET": 2, "LIST": 1})
    stats = llm_server.stats()
    assert stats["completions"] == 0
    assert stats["by_status"] == {503: stats["requests"]}
    assert len(stats["prompts"]) == 1
