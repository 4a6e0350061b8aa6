"""The :class:`Dataset` a read produces, and the questions asked of it without decoding it all.

The layout of its table is described in :mod:`shardeval.datasets`; this module holds the
schema and the read-only queries (a slice of items or ids, the first item missing a field).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from shardeval.hashing import canonical_json

COLUMNS = ("item_index", "item_id", "item_json")
"""Column names of :attr:`Dataset.table`, in order."""
SCHEMA = pa.schema(
    [("item_index", pa.int64()), ("item_id", pa.string()), ("item_json", pa.string())]
)
"""Schema of :attr:`Dataset.table`."""


@dataclass(frozen=True)
class Dataset:
    """A dataset read into memory as Arrow columns (see :mod:`shardeval.datasets` for the layout).

    Attributes:
        url: Where it was read from, with credentials removed (safe to print and store).
        table: Columns ``item_index``, ``item_id``, ``item_json``.
        fingerprint: Hex sha256 over every row's ``(item_id, item_json)`` in order: equal
            fingerprints mean the same items with the same ids in the same order.
        fields: Union of the top-level field names of all items.
        source_path: The local file read (absolute), None for an fsspec URL.
        source_stat: That file's ``[size, mtime_ns, ctime_ns, inode, device]``, taken before
            it was read: a rerun whose file still has this stat need not read it again
            (:mod:`shardeval.answer_record`); None for an fsspec URL.
    """

    url: str
    table: pa.Table
    fingerprint: str
    fields: frozenset[str]
    source_path: str | None = None
    source_stat: list[int] | None = None

    def __len__(self) -> int:
        return int(self.table.num_rows)

    def items(self, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
        """Decode the items ``[start:stop]`` (Python slice rules); only that slice is decoded.

        Batches call this for their own range, so a run never holds every item as a dict.
        """
        return [json.loads(text) for text in self._column_slice("item_json", start, stop)]

    def ids(self, start: int = 0, stop: int | None = None) -> list[str]:
        """The item ids ``[start:stop]`` (Python slice rules)."""
        return self._column_slice("item_id", start, stop)

    def missing_field(self, field: str) -> tuple[str, int] | None:
        """The first item whose top-level ``field`` is absent or null, else None.

        Used to fail before any model call when a prompt or metric needs a field some item
        lacks. It scans ``item_json`` with vectorized substring counts and decodes only the
        rows the counts cannot decide (those with nested objects that mention ``field``).

        Returns:
            ``(item_id, item_index)`` of the first such item, or None when every item has it.
        """
        if len(self) == 0:
            return None
        if field not in self.fields:
            return self._id_and_index(0)
        jsons = self.table.column("item_json")
        certain, undecided = _classify_missing(jsons, field)
        first_certain = _first_true(certain)
        limit = len(self) if first_certain is None else first_certain
        first_decoded = self._first_decoded_missing(undecided, field, limit)
        first = first_decoded if first_decoded is not None else first_certain
        return None if first is None else self._id_and_index(first)

    def _first_decoded_missing(
        self, undecided: pa.ChunkedArray, field: str, limit: int
    ) -> int | None:
        """Decode the undecided rows before ``limit`` in order; the first lacking ``field``."""
        candidates = self.table.slice(0, limit).filter(undecided.slice(0, limit))
        for batch in candidates.to_batches(max_chunksize=10_000):
            indexes = batch.column(0).to_pylist()
            for index, text in zip(indexes, batch.column(2).to_pylist(), strict=True):
                if json.loads(text).get(field) is None:
                    return int(index)
        return None

    def _id_and_index(self, index: int) -> tuple[str, int]:
        return self.ids(index, index + 1)[0], index

    def _column_slice(self, name: str, start: int, stop: int | None) -> list[Any]:
        begin, end, _ = slice(start, stop).indices(len(self))
        values: list[Any] = self.table.column(name).slice(begin, max(0, end - begin)).to_pylist()
        return values


def _first_true(mask: pa.ChunkedArray) -> int | None:
    found = pc.index(mask, True).as_py()
    return None if found < 0 else int(found)


def _classify_missing(
    jsons: pa.ChunkedArray, field: str
) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """Split rows into those surely lacking top-level ``field`` and those only decoding decides.

    In canonical (compact) JSON an object key is always preceded by ``{`` or ``,``, and
    inside a string every quote is escaped, so ``{"field":`` or ``,"field":`` occurs only
    where ``field`` is a key, at some depth. A row without it lacks the field. A row whose
    only ``{`` is its opening one has no nested objects, so there the key is top-level and
    ``"field":null`` means null. Rows with nested objects that mention the key are undecided.

    Returns:
        ``(certainly_missing, undecided)`` boolean masks.
    """
    key = canonical_json(field) + ":"
    mentioned = pc.or_(pc.match_substring(jsons, "{" + key), pc.match_substring(jsons, "," + key))
    null = pc.or_(
        pc.match_substring(jsons, "{" + key + "null"), pc.match_substring(jsons, "," + key + "null")
    )
    flat = pc.equal(pc.count_substring(jsons, "{"), 1)
    certain = pc.or_(pc.invert(mentioned), pc.and_(flat, null))
    undecided = pc.and_(pc.invert(flat), mentioned)
    return certain, undecided
