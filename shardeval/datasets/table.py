"""Rows to the item table: canonical JSON, item ids and their checks, and the fingerprint.

:class:`TableBuilder` turns each chunk a reader hands over into Arrow arrays and drops the
dicts; at the end it checks that given ids are unique (or makes content ids unique), and
fingerprints the table. Its errors point at rows through a :class:`Locator`, which counts
positions the way the format does.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shardeval.datasets.dataset import SCHEMA, Dataset
from shardeval.datasets.readers import Row
from shardeval.errors import DatasetError
from shardeval.hashing import HASH_VERSION, KEY_HEX_CHARS, canonical_json, fast_canonical_json

_CONTENT_ID_CHARS = 16  # hashing.content_id's length; see _content_ids
_MAX_DUPLICATES_SHOWN = 5
_MAX_POSITIONS_SHOWN = 10


class Locator:
    """Renders positions the way the format counts them (see :mod:`shardeval.datasets`)."""

    def __init__(self, url: str, fmt: str) -> None:
        self.url = url
        self.fmt = fmt

    def at(self, position: int) -> str:
        """``data.jsonl:12``, ``data.json:[3]`` or ``data.csv:row 3``."""
        return f"{self.url}:{self.short(position)}"

    def short(self, position: int) -> str:
        """``12``, ``[3]`` or ``row 3``."""
        if self.fmt == "jsonl":
            return str(position)
        return f"[{position}]" if self.fmt == "json" else f"row {position}"

    def many(self, positions: list[int]) -> str:
        """``lines 3, 9``, ``[3], [9]`` or ``rows 3, 9`` (at most a few, then "...")."""
        shown = [str(p) for p in positions[:_MAX_POSITIONS_SHOWN]]
        if self.fmt == "json":
            shown = [f"[{p}]" for p in shown]
        more = ", ..." if len(positions) > _MAX_POSITIONS_SHOWN else ""
        noun = {"jsonl": "lines ", "json": ""}.get(self.fmt, "rows ")
        return f"{noun}{', '.join(shown)}{more}"


_canonical_row = fast_canonical_json  # a row is JSON data: parsed rows cannot be circular


class TableBuilder:
    """Turns chunks of rows into Arrow arrays, then into the final table."""

    def __init__(self, url: str, id_field: str | None, locator: Locator) -> None:
        self._url = url
        self._id_field = id_field
        self._locator = locator
        self._ids: list[pa.Array] = []
        self._jsons: list[pa.Array] = []
        self._positions: list[pa.Array] = []
        self._fields: set[str] = set()

    def add(self, positions: list[int], rows: list[Row]) -> None:
        """Convert one chunk; the caller drops its dicts afterwards."""
        jsons = [_canonical_row(row) for row in rows]
        self._jsons.append(self._string_array(jsons, positions))  # first: it checks the text
        ids = self._given_ids(rows, positions) if self._id_field else _content_ids(jsons)
        self._ids.append(self._string_array(ids, positions))
        self._fields.update(*rows)
        self._positions.append(pa.array(positions, pa.int64()))

    def finish(self) -> Dataset:
        """Check ids, add content-id suffixes, fingerprint; raises if there are no rows."""
        if not self._jsons:
            raise DatasetError(f"{self._url}: the dataset has no items")
        ids = pa.chunked_array(self._ids, pa.string()).combine_chunks()
        positions = pa.chunked_array(self._positions, pa.int64())
        if self._id_field:
            self._check_unique(ids, positions)
        else:
            ids = _suffix_repeats(ids)
        jsons = pa.chunked_array(self._jsons, pa.string())
        index = pa.array(np.arange(len(ids), dtype=np.int64))
        table = pa.Table.from_arrays([index, ids, jsons], schema=SCHEMA)
        return Dataset(self._url, table, table_fingerprint(table), frozenset(self._fields))

    def _given_ids(self, rows: list[Row], positions: list[int]) -> list[str]:
        field = self._id_field
        assert field is not None
        ids = []
        for row, position in zip(rows, positions, strict=True):
            value = row.get(field)
            if value is None or value == "":
                what = "an empty" if value == "" else "no"
                raise DatasetError(
                    f"{self._locator.at(position)}: item has {what} {field!r} field (id_field)"
                )
            ids.append(value if isinstance(value, str) else _id_text(value))
        return ids

    def _check_unique(self, ids: pa.Array, positions: pa.ChunkedArray) -> None:
        counts = pc.value_counts(ids)
        repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
        if len(repeated) == 0:
            return
        shown = repeated.slice(0, _MAX_DUPLICATES_SHOWN)
        mask = pc.is_in(ids, value_set=shown)
        where: dict[str, list[int]] = {value: [] for value in shown.to_pylist()}
        duplicate_ids = ids.filter(mask).to_pylist()
        duplicate_positions = positions.combine_chunks().filter(mask).to_pylist()
        for value, position in zip(duplicate_ids, duplicate_positions, strict=True):
            where[value].append(position)
        listed = "; ".join(f"{v!r} at {self._locator.many(p)}" for v, p in where.items())
        more = f" (and {len(repeated) - len(shown)} more)" if len(repeated) > len(shown) else ""
        subject = "item id appears" if len(repeated) == 1 else "item ids appear"
        raise DatasetError(
            f"{self._url}: {len(repeated)} {subject} more than once "
            f"(id_field {self._id_field!r}): {listed}{more}",
            hint="ids must be unique; fix the rows, or remove dataset.id_field to use "
            "content hashes as ids",
        )

    def _string_array(self, values: list[str], positions: list[int]) -> pa.Array:
        try:
            return pa.array(values, pa.string())
        except (UnicodeEncodeError, pa.ArrowException):
            for value, position in zip(values, positions, strict=True):
                if not _is_encodable(value):
                    raise DatasetError(
                        f"{self._locator.at(position)}: item contains text that is not valid "
                        "Unicode (a lone surrogate such as \\ud800)"
                    ) from None
            raise


def _id_text(value: Any) -> str:
    """An id value as text: ``7`` → ``"7"``; lists and objects as canonical JSON."""
    return canonical_json(value) if isinstance(value, dict | list) else str(value)


def _content_ids(jsons: list[str]) -> list[str]:
    """``hashing.content_id`` of each row, hashing its canonical JSON that is already built.

    ``content_id(row)`` is the sha256 of ``canonical_json(row)``; serializing every row a
    second time would double the cost of reading. test_datasets checks the two agree.
    """
    sha256 = hashlib.sha256
    return [sha256(text.encode("utf-8")).hexdigest()[:_CONTENT_ID_CHARS] for text in jsons]


def _suffix_repeats(ids: pa.Array) -> pa.Array:
    """Make content ids unique: identical rows get ``<hash>``, ``<hash>-2``, ``<hash>-3``...

    Results are stored per item id, so ids must be unique. Identical rows still share one
    model call: their prompts, hence their item keys, are the same, and the cache answers
    the repeats. Only the repeated ids ever become Python objects.
    """
    counts = pc.value_counts(ids)
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    if len(repeated) == 0:
        return ids
    mask = pc.is_in(ids, value_set=repeated)
    seen: Counter[str] = Counter()
    renamed = []
    for value in ids.filter(mask).to_pylist():
        seen[value] += 1
        renamed.append(value if seen[value] == 1 else f"{value}-{seen[value]}")
    return pc.replace_with_mask(ids, mask, pa.array(renamed, pa.string()))


def _is_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def table_fingerprint(table: pa.Table) -> str:
    """Hex sha256 over every row's ``(item_id, item_json)`` in order, streamed from Arrow.

    Each row contributes ``<len(id)>:<id><json>`` and a newline: the length prefix keeps the
    encoding unambiguous whatever an id contains, and canonical JSON has no raw newline.
    The rows' bytes are hashed straight from Arrow buffers, without Python strings.
    """
    hasher = hashlib.sha256(f"shardeval-dataset\x1f{HASH_VERSION}\x1f".encode())
    for batch in table.select(["item_id", "item_json"]).to_batches(max_chunksize=100_000):
        ids, jsons = batch.column(0), batch.column(1)
        lengths = pc.cast(pc.utf8_length(ids), pa.string())
        rows = pc.binary_join_element_wise(lengths, ":", ids, jsons, "\n", "")
        hasher.update(_string_bytes(rows))
    return hasher.hexdigest()[:KEY_HEX_CHARS]


def _string_bytes(array: pa.Array) -> memoryview:
    """The concatenated UTF-8 bytes of a string array's values, without copying."""
    _validity, offsets, data = array.buffers()
    if data is None or len(array) == 0:
        return memoryview(b"")
    bounds = np.frombuffer(offsets, dtype=np.int32)
    start, end = bounds[array.offset], bounds[array.offset + len(array)]
    return memoryview(data)[start:end]
