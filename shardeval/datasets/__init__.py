"""Read a dataset from any fsspec URL into an Arrow table, streaming, with errors that say where.

Every format becomes the same three-column table, one row per item::

    item_index  int64   0-based position in the dataset (after ``limit``)
    item_id     string  the ``id_field`` value as text, or the hash of the item's content
    item_json   string  the item as canonical JSON (:func:`shardeval.hashing.canonical_json`)

Why JSON text instead of typed columns: items of one dataset often disagree on types (an
``answer`` that is ``7`` in one row and ``"seven"`` in the next), which Arrow cannot hold in
one column, and every downstream consumer (prompt templates, metrics, the item key) wants the
item as a plain ``dict`` anyway. Canonical text also makes the dataset fingerprint exact.

Reading is streamed: at most ``chunk_rows`` Python dicts exist at a time, each chunk becomes
Arrow arrays (whose memory lives outside the Python heap) and the dicts are dropped. Duplicate
detection and content-id suffixes are computed on the Arrow columns at the end, so even the
set of ids never exists as Python objects.

Where an error points, by format:

* JSONL: ``data.jsonl:12`` is line 12 of the file (1-based, blank lines counted).
* JSON: ``data.json:[3]`` is element 3 of the top-level array (0-based, as in JSON paths).
* CSV and Parquet: ``data.csv:row 3`` is the third data row (1-based, the CSV header excluded).

The work is split by stage, each module with one job:

* :mod:`~shardeval.datasets.source`: where the bytes come from (format and compression from
  the name, opening through fsspec, store errors, :func:`redact_url`).
* :mod:`~shardeval.datasets.readers`: bytes to chunks of rows, one reader per format.
* :mod:`~shardeval.datasets.table`: rows to the item table (canonical JSON, ids and their
  checks, :func:`table_fingerprint`).
* :mod:`~shardeval.datasets.dataset`: the :class:`Dataset` that results, and its queries.

:func:`read_dataset`, here, runs them in that order.
"""

from __future__ import annotations

import dataclasses
import os

from shardeval.answer_record import file_stat
from shardeval.datasets.dataset import COLUMNS, SCHEMA, Dataset
from shardeval.datasets.readers import READERS, Chunk, ReadPlan, Row
from shardeval.datasets.source import (
    FORMATS,
    detect_format,
    open_dataset_file,
    redact_url,
    store_error,
)
from shardeval.datasets.table import Locator, TableBuilder, table_fingerprint

# Not public: tests/unit/test_datasets.py checks it against hashing.canonical_json.
from shardeval.datasets.table import _canonical_row as _canonical_row
from shardeval.errors import DatasetError
from shardeval.spec import DatasetSpec

__all__ = [
    "COLUMNS",
    "FORMATS",
    "SCHEMA",
    "Chunk",
    "Dataset",
    "Row",
    "detect_format",
    "read_dataset",
    "redact_url",
    "table_fingerprint",
]


def read_dataset(
    spec: DatasetSpec, url: str, *, limit: int | None = None, chunk_rows: int = 10_000
) -> Dataset:
    """Read the dataset ``spec`` describes from ``url`` (usually ``EvalSpec.dataset_url()``).

    Args:
        spec: The :class:`shardeval.spec.DatasetSpec` (format, id_field, storage_options).
        url: Any fsspec URL or local path; compression is inferred from the extension.
        limit: Keep only the first ``limit`` items (``--limit``); later rows are not read.
        chunk_rows: Rows held as Python dicts at once before becoming Arrow arrays.

    Returns:
        The dataset with its table, fingerprint and field names.

    Raises:
        DatasetError: the file is missing or unreadable, a row is malformed, an id is missing
            or duplicated, or there are no items. The message names the file and the line/row.
        ValueError: ``limit`` or ``chunk_rows`` is below 1.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    shown = redact_url(url)
    fmt = detect_format(url, spec.format)
    builder = TableBuilder(shown, spec.id_field, Locator(shown, fmt))
    plan = ReadPlan(shown, chunk_rows, limit)
    source_path = None if "://" in url else os.path.abspath(url)
    source_stat = None if source_path is None else file_stat(source_path)  # before reading
    with open_dataset_file(url, shown, dict(spec.storage_options)) as handle:
        try:
            for positions, rows in READERS[fmt](handle, plan):
                builder.add(positions, rows)
        except OSError as exc:
            raise DatasetError(f"cannot read dataset {shown}: {exc}") from exc
        except EOFError as exc:
            raise DatasetError(f"{shown}: the file is truncated: {exc}") from exc
        except Exception as exc:
            error = store_error(exc, shown)
            if error is None:
                raise
            raise error from exc
    dataset = builder.finish()
    if source_stat is None:
        return dataset
    return dataclasses.replace(dataset, source_path=source_path, source_stat=source_stat)
