"""The RunStore contract, on every backend: local disk, and real S3 servers over HTTP.

Every test runs once per place (``place`` is parametrized, see conftest.py: local disk in the
fast loop, moto, and SeaweedFS marked slow). What the rest of shardeval relies on: a file is
seen whole or not at all; a conditional create has one winner; listings are bounded and show
what other clients wrote; a damaged file is set aside, never deleted; a store that fails is a
:class:`StorageError` that says what failed, within seconds; the one-writer lease works on top
of all that.
"""

from __future__ import annotations

import json
import threading
import time

import pyarrow as pa
import pytest

from shardeval.errors import RunLockedError, StorageError
from shardeval.locking import RunLock
from shardeval.storage import RunStore
from tests.contract.conftest import Place


@pytest.fixture
def store(place: Place) -> RunStore:
    return place.store()


def table(n: int, start: int = 0) -> pa.Table:
    return pa.table(
        {
            "item_key": [f"k{i:04d}" for i in range(start, start + n)],
            "status": ["ok"] * n,
            "response": [f"answer {i}" * 20 for i in range(start, start + n)],
        }
    )


# ------------------------------------------------------------------ whole-file visibility
def test_write_then_read_whole(store: RunStore, place: Place) -> None:
    path = store.path("spec.json")
    assert store.read_bytes(path) is None
    assert not store.exists(path)
    store.write_json(path, {"a": 1})
    assert store.read_json(path) == {"a": 1}
    store.write_bytes(path, b'{"a": 2}')
    assert store.read_json(path) == {"a": 2}
    assert store.exists(path)
    # Another client sees the same bytes.
    assert place.other.cat_file(path) == b'{"a": 2}'
    assert store.url_of(path) == (path if store.is_local else f"s3://{path}")


def test_tables_round_trip_column_pruned(store: RunStore) -> None:
    path = store.batch_path("b1")
    store.write_table(path, table(50))
    pruned = store.read_table(path, columns=["item_key", "status"])
    assert pruned is not None
    assert pruned.column_names == ["item_key", "status"]
    assert pruned.num_rows == 50


def test_table_writer_publishes_only_when_complete(store: RunStore, place: Place) -> None:
    other = place.other
    path = store.results_path
    with store.open_table_writer(path, table(1).schema) as writer:
        writer.write_table(table(100))
        assert not other.exists(path)
        writer.write_table(table(100, start=100))
        assert not other.exists(path)
    result = store.read_table(path)
    assert result is not None and result.num_rows == 200

    failed = store.path("never.parquet")
    with pytest.raises(RuntimeError), store.open_table_writer(failed, table(1).schema) as writer:
        writer.write_table(table(10))
        raise RuntimeError("killed mid-write")
    assert not other.exists(failed)


def test_parts_and_many_reads(store: RunStore, place: Place) -> None:
    """Parts go through the same atomic write; many files read back in order, missing as None."""
    paths = [store.part_path("k1", f"{i:04d}-t-{i:05d}.parquet") for i in range(40)]
    for i, path in enumerate(paths):
        store.write_part(path, table(2, start=2 * i))
    assert store.list_batch_parts("k1") == paths
    assert all(place.other.exists(p) for p in paths)
    missing = store.batch_path("absent")
    reads = list(store.read_tables([*paths, missing], columns=["item_key"]))
    assert reads[-1] is None
    keys = [t.column("item_key").to_pylist() for t in reads[:-1] if t is not None]
    assert keys == [[f"k{2 * i:04d}", f"k{2 * i + 1:04d}"] for i in range(40)]
    # No scratch name is left behind (local disk writes under .tmp/ and renames).
    assert not [p for p in place.other.find(store.root) if "/.tmp/" in p]


def test_missing_column_is_damage(store: RunStore) -> None:
    """A file without a column the reader needs is set aside like any damaged file."""
    path = store.batch_path("old")
    store.write_table(path, table(3).drop_columns(["status"]))
    assert store.read_table(path, columns=["item_key", "status"]) is None
    assert not store.exists(path)


# ------------------------------------------------------------------ conditional create
def test_create_exclusive_has_one_winner(store: RunStore, place: Place) -> None:
    path = store.path("lock.json")
    assert store.create_exclusive(path, b"first")
    assert not store.create_exclusive(path, b"second")
    assert store.read_bytes(path) == b"first"

    other_path = store.path("other.json")
    place.other.pipe_file(other_path, b"theirs")
    assert not store.create_exclusive(other_path, b"mine")
    assert store.read_bytes(other_path) == b"theirs"


def test_create_exclusive_race(store: RunStore, place: Place) -> None:
    path = store.path("race.json")
    results: list[bool] = []
    barrier = threading.Barrier(6)

    def contender(n: int) -> None:
        racer = place.store(store.run_id)
        barrier.wait()
        results.append(racer.create_exclusive(path, f"racer {n}".encode()))

    threads = [threading.Thread(target=contender, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 5 + [True]
    winner = results.index(True)
    assert store.read_bytes(path) is not None and store.read_bytes(path).startswith(b"racer ")
    del winner


# ------------------------------------------------------------------ listing
def test_listing(store: RunStore) -> None:
    assert store.list_batches() == set()
    assert store.list_parts() == {}
    for key in ("aaa", "bbb"):
        store.write_table(store.batch_path(key), table(2))
    store.write_bytes(store.path("batches", "notes.txt"), b"not a batch")
    store.write_table(store.path("parts", "k1", "0002-x-00001.parquet"), table(1))
    store.write_table(store.path("parts", "k1", "0001-x-00000.parquet"), table(1))
    store.write_table(store.path("parts", "k2", "0001-y-00000.parquet"), table(1))
    assert store.list_batches() == {"aaa", "bbb"}
    parts = store.list_parts()
    assert sorted(parts) == ["k1", "k2"]
    assert [p.rsplit("/", 1)[1] for p in parts["k1"]] == [
        "0001-x-00000.parquet",
        "0002-x-00001.parquet",
    ]
    assert store.list_batch_parts("k1") == parts["k1"]
    assert store.list_batch_parts("nope") == []


def test_listing_shows_other_writers(store: RunStore, place: Place) -> None:
    store.write_table(store.batch_path("mine"), table(1))
    assert store.list_batches() == {"mine"}
    place.other.pipe_file(store.batch_path("theirs"), b"x")
    store.delete([store.batch_path("mine")])
    assert store.list_batches() == {"theirs"}


# ------------------------------------------------------------------ damage
def test_damaged_files_are_set_aside_and_kept(store: RunStore, place: Place) -> None:
    bad_parquet = store.batch_path("broken")
    store.write_bytes(bad_parquet, b"PAR1 this is not parquet")
    bad_json = store.metrics_path
    store.write_bytes(bad_json, b'{"truncated": ')

    assert store.read_table(bad_parquet) is None
    assert store.read_json(bad_json) is None

    other = place.other
    assert not other.exists(bad_parquet)
    assert not other.exists(bad_json)
    assert store.list_batches() == set()
    kept = {p.rsplit("/", 1)[1]: other.cat_file(p) for p in other.find(store.path("quarantine"))}
    assert len(kept) == 2
    assert sorted(kept.values()) == sorted([b"PAR1 this is not parquet", b'{"truncated": '])
    assert any(name.endswith("batches__broken.parquet") for name in kept)


def test_delete(store: RunStore, place: Place) -> None:
    paths = [store.path("parts", "k", f"{i}.parquet") for i in range(3)]
    for path in paths:
        store.write_bytes(path, b"x")
    store.delete(paths[:2])
    store.delete([])
    assert place.other.find(store.path("parts")) == [paths[2]]


# ------------------------------------------------------------------ outage
def test_outage_is_a_storage_error_and_keeps_data(store: RunStore, place: Place) -> None:
    kept = store.batch_path("kept")
    store.write_table(kept, table(3))
    with place.outage(store):
        started = time.monotonic()
        with pytest.raises(StorageError) as failure:
            store.write_table(store.batch_path("lost"), table(3))
        assert time.monotonic() - started < 20
        message = str(failure.value)
        assert "storage failed to write" in message
        assert store.url_of(store.batch_path("lost")) in message
        assert "rerun" in message
        with pytest.raises(StorageError, match="storage failed to list"):
            store.list_batches()
        with pytest.raises(StorageError, match="storage failed to create"):
            store.create_exclusive(store.path("lock.json"), b"x")
    result = store.read_table(kept)
    assert result is not None and result.num_rows == 3
    assert store.list_batches() == {"kept"}


# ------------------------------------------------------------------ the lease
def test_lease_one_writer_names_the_holder(store: RunStore) -> None:
    holder = RunLock(store)
    holder.acquire()
    try:
        record = json.loads(store.read_bytes(store.path("lock.json")) or b"{}")
        assert record["token"] == holder.token
        with pytest.raises(RunLockedError) as refused:
            RunLock(RunStore(store.output, store.run_id)).acquire()
        assert f"pid {record['pid']}" in str(refused.value)
        assert f"host {record['host']}" in str(refused.value)
    finally:
        holder.release()
    assert store.read_bytes(store.path("lock.json")) is None
    again = RunLock(store)
    again.acquire()
    again.release()


def test_stale_lease_is_taken_over(store: RunStore) -> None:
    stale = {
        "host": "a-machine-that-is-gone",
        "pid": 4242,
        "since": "2020-01-01T00:00:00+00:00",
        "renewed_at": time.time() - 3600,
        "lease_s": 60,
        "token": "stale-token",
    }
    store.write_json(store.path("lock.json"), stale)
    lock = RunLock(store)
    lock.acquire()
    try:
        record = json.loads(store.read_bytes(store.path("lock.json")) or b"{}")
        assert record["token"] == lock.token
    finally:
        lock.release()


def test_live_lease_on_another_host_is_respected(store: RunStore) -> None:
    live = {
        "host": "another-machine",
        "pid": 4242,
        "since": "2020-01-01T00:00:00+00:00",
        "renewed_at": time.time(),
        "lease_s": 60,
        "token": "live-token",
    }
    store.write_json(store.path("lock.json"), live)
    with pytest.raises(RunLockedError, match="host another-machine, pid 4242"):
        RunLock(store).acquire()
