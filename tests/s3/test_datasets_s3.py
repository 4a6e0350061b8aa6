"""Datasets read from S3 (moto and SeaweedFS): formats, credentials, and a store that is down."""

from __future__ import annotations

import io
import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardeval.datasets import read_dataset
from shardeval.errors import EXIT_FAILED, EXIT_USAGE, DatasetError, StorageError
from shardeval.spec import DatasetSpec
from tests.helpers.specs import arith_items
from tests.s3.servers import ACCESS_KEY, SECRET_KEY, S3Backend

ITEMS = arith_items(25)


def options(backend: S3Backend, secret: str = SECRET_KEY) -> dict[str, object]:
    return {"key": ACCESS_KEY, "secret": secret, "endpoint_url": backend.endpoint}


def upload(backend: S3Backend, bucket: str) -> dict[str, str]:
    fs = backend.filesystem()
    jsonl = "".join(json.dumps(item) + "\n" for item in ITEMS).encode()
    fs.pipe_file(f"{bucket}/d/items.jsonl", jsonl)
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(ITEMS), sink)
    fs.pipe_file(f"{bucket}/d/items.parquet", sink.getvalue())
    csv = "id,a,b,answer\n" + "".join(f"{i['id']},{i['a']},{i['b']},{i['answer']}\n" for i in ITEMS)
    fs.pipe_file(f"{bucket}/d/items.csv", csv.encode())
    return {fmt: f"s3://{bucket}/d/items.{fmt}" for fmt in ("jsonl", "parquet", "csv")}


def test_every_format_reads_from_s3_with_storage_options(
    s3_backend: S3Backend, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = upload(s3_backend, bucket)
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)  # the spec's storage_options alone must be enough
    for url in urls.values():
        spec = DatasetSpec(path=url, id_field="id", storage_options=options(s3_backend))
        dataset = read_dataset(spec, url)
        assert dataset.ids() == [item["id"] for item in ITEMS]
        assert SECRET_KEY not in dataset.url


def test_missing_dataset_is_a_usage_error(s3_backend: S3Backend, bucket: str) -> None:
    missing = f"s3://{bucket}/d/nope.jsonl"
    with pytest.raises(DatasetError, match="dataset not found") as failure:
        read_dataset(DatasetSpec(path=missing, storage_options=options(s3_backend)), missing)
    assert failure.value.exit_code == EXIT_USAGE


@pytest.mark.slow
@pytest.mark.parametrize("s3_backend", ["seaweedfs"], indirect=True)  # moto checks no signature
def test_rejected_credentials_are_a_usage_error(s3_backend: S3Backend, bucket: str) -> None:
    urls = upload(s3_backend, bucket)
    spec = DatasetSpec(path=urls["jsonl"], storage_options=options(s3_backend, secret="wrong"))
    with pytest.raises(DatasetError) as failure:
        read_dataset(spec, urls["jsonl"])
    assert failure.value.exit_code == EXIT_USAGE


def test_unreachable_dataset_store_is_a_storage_error(s3_backend: S3Backend, bucket: str) -> None:
    urls = upload(s3_backend, bucket)
    spec = DatasetSpec(path=urls["jsonl"], storage_options=options(s3_backend))
    s3_backend.stop()
    try:
        started = time.monotonic()
        with pytest.raises(StorageError, match="cannot read dataset") as failure:
            read_dataset(spec, urls["jsonl"])
        assert failure.value.exit_code == EXIT_FAILED
        assert time.monotonic() - started < 20
    finally:
        s3_backend.start()
