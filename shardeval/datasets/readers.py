"""Bytes to rows, one reader per format, each handing over chunks with their positions.

Every reader takes an open binary file and a :class:`ReadPlan` and yields chunks (see
:data:`Chunk`) of at most ``chunk_rows`` rows, ``limit`` rows in all, so at most one chunk of
Python dicts exists at a time. A malformed row raises a
:class:`~shardeval.errors.DatasetError` that names the file and the line, element or row (see
:mod:`shardeval.datasets` for how each format counts).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from shardeval.errors import DatasetError

_READ_BLOCK_BYTES = 1 << 18  # 256 KiB: as fast as bigger blocks, less transient memory

Row = dict[str, Any]
Chunk = tuple[list[int], list[Row]]
"""Rows with their positions in the file (line, index or row number, as the format counts).

Readers hand over whole chunks rather than one ``(position, row)`` tuple per row: besides the
per-row call overhead, short-lived tuples are what make Python's cyclic GC run full
collections over and over while a big file is read (the dicts of flat JSON rows are not
tracked by the GC at all).
"""


# -- format readers: each yields chunks of at most chunk_rows rows, limit rows in all ----------


@dataclass(frozen=True)
class ReadPlan:
    """What every reader needs besides the file: names for errors, chunk size, row limit."""

    url: str
    chunk_rows: int
    limit: int | None

    def next_size(self, done: int) -> int:
        """Rows the next chunk may hold when ``done`` rows were already handed over."""
        if self.limit is None:
            return self.chunk_rows
        return min(self.chunk_rows, self.limit - done)


def _read_jsonl(handle: IO[bytes], plan: ReadPlan) -> Iterator[Chunk]:
    """One JSON object per line; blank lines are skipped. Streams with bounded memory.

    Stops reading as soon as ``limit`` rows are found, so a bad line after them is no error.
    """
    url, done = plan.url, 0
    positions: list[int] = []
    rows: list[Row] = []
    size = plan.next_size(done)
    for number, line in enumerate(_text_lines(handle, url), start=1):
        if not line or line.isspace():
            continue
        row = _parse_line(line, url, number)
        if not isinstance(row, dict):
            raise DatasetError(f"{url}:{number}: expected a JSON object, got {_kind(row)}")
        positions.append(number)
        rows.append(row)
        if len(rows) == size:
            yield positions, rows
            done += size
            size = plan.next_size(done)
            if size == 0:
                return
            positions, rows = [], []
    if rows:
        yield positions, rows


_scan_json: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _parse_line(line: str, url: str, number: int) -> Any:
    """``json.loads(line)`` at about half its cost for the usual line.

    ``json.loads`` spends most of its time on short lines around the C scanner (two regex
    whitespace matches, Python call layers). The scanner is called directly; a line it does
    not fully consume (leading spaces, trailing garbage, an error) goes through ``json.loads``,
    which gives the same result or the standard error message.
    """
    try:
        value, end = _scan_json(line, 0)
        if end == len(line) or line[end:].isspace():
            return value
    except (StopIteration, ValueError):
        pass
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{url}:{number}: not valid JSON: {exc.msg} (column {exc.colno})"
        ) from None


def _text_lines(handle: IO[bytes], url: str) -> Iterator[str]:
    """The lines of a UTF-8 file, read in 256 KiB blocks and decoded a block at a time.

    Faster than iterating the file object (remote fsspec files read lines in Python) and
    lets ``json.loads`` take ``str`` without sniffing each line's encoding.
    """
    pending: list[bytes] = []
    lines_before = 0
    while block := handle.read(_READ_BLOCK_BYTES):
        cut = block.rfind(b"\n")
        if cut < 0:  # no line ends in this block: keep it for the next one
            pending.append(block)
            continue
        complete = b"".join([*pending, block[:cut]])
        pending = [block[cut + 1 :]]
        lines = _decode(complete, url, lines_before, first=lines_before == 0).split("\n")
        lines_before += len(lines)
        yield from lines
    rest = b"".join(pending)
    if rest:
        yield _decode(rest, url, lines_before, first=lines_before == 0)


def _decode(data: bytes, url: str, lines_before: int, *, first: bool) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = lines_before + data.count(b"\n", 0, exc.start) + 1
        raise DatasetError(f"{url}:{line}: not valid UTF-8: {exc.reason}") from None
    return text.removeprefix("\ufeff") if first else text


def _read_json(handle: IO[bytes], plan: ReadPlan) -> Iterator[Chunk]:
    """A top-level JSON array of objects.

    The whole document is parsed at once with ``json.load``: a JSON array cannot be split
    into rows without a streaming parser, so memory grows with the file. Use JSONL for big
    datasets.
    """
    url = plan.url
    try:
        data = json.load(handle)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{url}:{exc.lineno}: not valid JSON: {exc.msg} (column {exc.colno})"
        ) from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{url}: not valid UTF-8: {exc.reason}") from None
    if not isinstance(data, list):
        raise DatasetError(
            f"{url}: expected a JSON array of objects, got {_kind(data)}",
            hint="use a top-level array [{...}, {...}], or JSONL with one object per line",
        )
    done = 0
    while size := min(plan.next_size(done), len(data) - done):
        rows = data[done : done + size]
        for index, row in enumerate(rows, start=done):
            if not isinstance(row, dict):
                raise DatasetError(f"{url}:[{index}]: expected a JSON object, got {_kind(row)}")
        yield list(range(done, done + size)), rows
        done += size


def _read_csv(handle: IO[bytes], plan: ReadPlan) -> Iterator[Chunk]:
    """CSV with a header row, through pyarrow's streaming reader; types are pyarrow's guess.

    Quoted values may span lines (prompts often do), which costs pyarrow some speed.
    """
    parse = pa_csv.ParseOptions(newlines_in_values=True)
    try:
        reader = pa_csv.open_csv(handle, parse_options=parse)
    except pa.ArrowInvalid as exc:
        if "Empty CSV file" in str(exc):
            return
        raise DatasetError(f"{plan.url}: not valid CSV: {exc}") from None
    try:
        yield from _batch_rows(reader, plan)
    except pa.ArrowInvalid as exc:
        raise DatasetError(
            f"{plan.url}: not valid CSV: {exc}",
            hint="column types are guessed from the start of the file; if a later value "
            "has another type, convert the file to JSONL or Parquet",
        ) from None


def _read_parquet(handle: IO[bytes], plan: ReadPlan) -> Iterator[Chunk]:
    """Parquet, one record batch of at most ``chunk_rows`` rows at a time.

    The file is read whole into a buffer Arrow owns and decoded from there: pyarrow 26 aborts
    the interpreter at exit in a share of the processes that read Parquet through a Python file
    object (docs/performance.md, "Storage details"). Parquet is compact, and the rows are still
    converted a chunk at a time.
    """
    sink = pa.BufferOutputStream()
    sink.write(handle.read())
    try:
        parquet = pq.ParquetFile(sink.getvalue())
    except pa.ArrowInvalid as exc:
        raise DatasetError(f"{plan.url}: not a valid Parquet file: {exc}") from None
    try:
        yield from _batch_rows(parquet.iter_batches(batch_size=plan.chunk_rows), plan)
    except pa.ArrowInvalid as exc:
        raise DatasetError(f"{plan.url}: cannot read Parquet data: {exc}") from None


def _batch_rows(batches: Iterable[pa.RecordBatch], plan: ReadPlan) -> Iterator[Chunk]:
    """Rows of record batches, numbered from 1, converted at most ``chunk_rows`` at a time."""
    done = 0
    for batch in batches:
        start = 0
        while size := min(plan.next_size(done), batch.num_rows - start):
            rows = batch.slice(start, size).to_pylist()
            yield list(range(done + 1, done + size + 1)), rows
            start += size
            done += size
        if plan.next_size(done) == 0:
            return


READERS: dict[str, Callable[[IO[bytes], ReadPlan], Iterator[Chunk]]] = {
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": _read_csv,
    "parquet": _read_parquet,
}


def _kind(value: object) -> str:
    """How an error names a JSON value's type (a list stays "list", as Python calls it)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {"dict": "object", "str": "string"}.get(type(value).__name__, type(value).__name__)


# -- building the table ----------------------------------------------------------------------
