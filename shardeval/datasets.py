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
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from fsspec.utils import infer_compression

from shardeval.errors import DatasetError, ShardevalError, StorageError
from shardeval.hashing import HASH_VERSION, KEY_HEX_CHARS, canonical_json
from shardeval.objectstore import filesystem_options, tune_filesystem
from shardeval.spec import DatasetSpec

FORMATS = ("jsonl", "json", "csv", "parquet")
"""The formats a dataset can have (besides ``auto``)."""

_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_COMPRESSION_EXTENSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".xz": "xz"}
_CONTENT_ID_CHARS = 16  # hashing.content_id's length; see _content_ids
_READ_BLOCK_BYTES = 1 << 18  # 256 KiB: as fast as bigger blocks, less transient memory
_MAX_DUPLICATES_SHOWN = 5
_MAX_POSITIONS_SHOWN = 10

COLUMNS = ("item_index", "item_id", "item_json")
"""Column names of :attr:`Dataset.table`, in order."""
SCHEMA = pa.schema(
    [("item_index", pa.int64()), ("item_id", pa.string()), ("item_json", pa.string())]
)
"""Schema of :attr:`Dataset.table`."""

Row = dict[str, Any]
Chunk = tuple[list[int], list[Row]]
"""Rows with their positions in the file (line, index or row number; see the module docstring).

Readers hand over whole chunks rather than one ``(position, row)`` tuple per row: besides the
per-row call overhead, short-lived tuples are what make Python's cyclic GC run full
collections over and over while a big file is read (the dicts of flat JSON rows are not
tracked by the GC at all).
"""


@dataclass(frozen=True)
class Dataset:
    """A dataset read into memory as Arrow columns (see the module docstring for the layout).

    Attributes:
        url: Where it was read from, with credentials removed (safe to print and store).
        table: Columns ``item_index``, ``item_id``, ``item_json``.
        fingerprint: Hex sha256 over every row's ``(item_id, item_json)`` in order: equal
            fingerprints mean the same items with the same ids in the same order.
        fields: Union of the top-level field names of all items.
    """

    url: str
    table: pa.Table
    fingerprint: str
    fields: frozenset[str]

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


def detect_format(url: str, declared: str) -> str:
    """The dataset's format: ``declared`` unless it is ``auto``, else from the file extension.

    A compression extension (``.gz``, ``.bz2``, ``.zst``, ``.xz``) is looked through, so
    ``train.jsonl.gz`` is JSONL; :func:`read_dataset` decompresses it.

    Raises:
        DatasetError: ``auto`` and an extension that names no known format, or an unknown
            declared format.
    """
    if declared != "auto":
        if declared not in FORMATS:
            raise DatasetError(
                f"unknown dataset format {declared!r}; known formats: auto, {', '.join(FORMATS)}"
            )
        return declared
    stem, _compression = _split_compression(_file_name(url).lower())
    dot = stem.rfind(".")
    extension = stem[dot:] if dot > 0 else ""
    if extension in _EXTENSIONS:
        return _EXTENSIONS[extension]
    known = ", ".join(f"{ext} ({fmt})" for ext, fmt in _EXTENSIONS.items())
    raise DatasetError(
        f"cannot tell the format of {redact_url(url)} from its extension "
        f"{extension or '(none)'!r}; known extensions: {known}, each optionally compressed "
        f"({', '.join(_COMPRESSION_EXTENSIONS)})",
        hint=f"set dataset.format in the spec to one of: {', '.join(FORMATS)}",
    )


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
    builder = _TableBuilder(shown, spec.id_field, _Locator(shown, fmt))
    plan = _Plan(shown, chunk_rows, limit)
    with _open(url, shown, dict(spec.storage_options)) as handle:
        try:
            for positions, rows in _READERS[fmt](handle, plan):
                builder.add(positions, rows)
        except OSError as exc:
            raise DatasetError(f"cannot read dataset {shown}: {exc}") from exc
        except EOFError as exc:
            raise DatasetError(f"{shown}: the file is truncated: {exc}") from exc
        except Exception as exc:
            error = _store_error(exc, shown)
            if error is None:
                raise
            raise error from exc
    return builder.finish()


def _store_error(exc: Exception, shown: str) -> ShardevalError | None:
    """A dataset store's failure that is not an ``OSError`` (botocore, aiohttp), or None.

    Missing or invalid credentials are the user's to fix (a DatasetError, exit 2); a store
    that cannot be reached is a StorageError (exit 1): the same command works once it is back.
    """
    botocore = sys.modules.get("botocore.exceptions")
    aiohttp = sys.modules.get("aiohttp")
    credential_errors = tuple(
        getattr(botocore, name)
        for name in ("NoCredentialsError", "PartialCredentialsError", "ProfileNotFound")
        if botocore is not None and hasattr(botocore, name)
    )
    if credential_errors and isinstance(exc, credential_errors):
        return DatasetError(
            f"cannot read dataset {shown}: {exc}",
            hint="set credentials for the store (environment variables, a profile, an "
            "instance role) or dataset.storage_options in the spec",
        )
    store_errors: tuple[type[BaseException], ...] = tuple(
        error
        for error in (
            getattr(botocore, "BotoCoreError", None),
            getattr(aiohttp, "ClientError", None),
        )
        if isinstance(error, type)
    )
    if store_errors and isinstance(exc, store_errors):
        return StorageError(
            f"cannot read dataset {shown}: the store failed: {type(exc).__name__}: {exc}",
            hint="check that the store is reachable (AWS_ENDPOINT_URL, network) and rerun",
        )
    return None


def redact_url(url: str) -> str:
    """``url`` without credentials: user:password and query-string values are removed.

    Messages and stored metadata print dataset URLs, and a URL such as
    ``https://user:token@host/data.jsonl?sig=...`` must not leak what it carries.
    """
    return "::".join(_redact_one(part) for part in url.split("::"))


def _redact_one(url: str) -> str:
    if "://" not in url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = re.sub(r"=[^&]*", "=***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


# -- opening -------------------------------------------------------------------------------


def _file_name(url: str) -> str:
    """The name of the file ``url`` reads, for its extensions.

    In an fsspec chain the file read is named by the first segment that has a path
    (``zip://inner.csv::s3://b/a.zip`` reads ``inner.csv``; ``simplecache::s3://b/x.csv``
    reads ``x.csv``). A query string (``?token=...``) is not part of the name.
    """
    for segment in url.split("::"):
        if "://" in segment or "/" in segment or "." in segment:
            path = segment.split("://", 1)[-1]
            return path.rsplit("/", 1)[-1].split("?", 1)[0]
    return url


def _split_compression(name: str) -> tuple[str, str | None]:
    for extension, compression in _COMPRESSION_EXTENSIONS.items():
        if name.endswith(extension):
            return name[: -len(extension)], compression
    return name, None


@contextmanager
def _open(url: str, shown: str, storage_options: dict[str, Any]) -> Iterator[IO[bytes]]:
    """Open ``url`` for binary reading, turning fsspec's errors into DatasetErrors."""
    name = _file_name(url)
    _, compression = _split_compression(name.lower())
    if compression is not None and infer_compression(name) is None:
        raise DatasetError(
            f"cannot decompress {shown}: fsspec has no {compression} codec installed",
            hint="pip install zstandard" if compression == "zstd" else None,
        )
    if "://" in url and "::" not in url:  # one filesystem: shardeval's retry/timeout settings
        storage_options = filesystem_options(url.split("://", 1)[0], storage_options)
    try:
        opened = fsspec.open(url, "rb", compression="infer", **storage_options)
        tune_filesystem(opened.fs, url.split("://", 1)[0] if "://" in url else "file")
        handle = opened.open()
    except FileNotFoundError as exc:
        raise DatasetError(
            f"dataset not found: {shown}",
            hint="check dataset.path in the spec; a relative path is resolved against the "
            "directory of the spec file",
        ) from exc
    except (OSError, ValueError, ImportError) as exc:  # ValueError: unknown protocol
        raise DatasetError(f"cannot open dataset {shown}: {exc}") from exc
    except Exception as exc:
        error = _store_error(exc, shown)
        if error is None:
            raise
        raise error from exc
    with handle:
        yield handle


# -- format readers: each yields chunks of at most chunk_rows rows, limit rows in all ----------


@dataclass(frozen=True)
class _Plan:
    """What every reader needs besides the file: names for errors, chunk size, row limit."""

    url: str
    chunk_rows: int
    limit: int | None

    def next_size(self, done: int) -> int:
        """Rows the next chunk may hold when ``done`` rows were already handed over."""
        if self.limit is None:
            return self.chunk_rows
        return min(self.chunk_rows, self.limit - done)


def _read_jsonl(handle: IO[bytes], plan: _Plan) -> Iterator[Chunk]:
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


def _read_json(handle: IO[bytes], plan: _Plan) -> Iterator[Chunk]:
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


def _read_csv(handle: IO[bytes], plan: _Plan) -> Iterator[Chunk]:
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


def _read_parquet(handle: IO[bytes], plan: _Plan) -> Iterator[Chunk]:
    """Parquet, one record batch of at most ``chunk_rows`` rows at a time."""
    try:
        parquet = pq.ParquetFile(handle)
    except pa.ArrowInvalid as exc:
        raise DatasetError(f"{plan.url}: not a valid Parquet file: {exc}") from None
    try:
        yield from _batch_rows(parquet.iter_batches(batch_size=plan.chunk_rows), plan)
    except pa.ArrowInvalid as exc:
        raise DatasetError(f"{plan.url}: cannot read Parquet data: {exc}") from None


def _batch_rows(batches: Iterable[pa.RecordBatch], plan: _Plan) -> Iterator[Chunk]:
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


_READERS: dict[str, Callable[[IO[bytes], _Plan], Iterator[Chunk]]] = {
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


class _Locator:
    """Renders positions the way the format counts them (see the module docstring)."""

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


def _make_canonical_encoder() -> Callable[[Row], str]:
    """A faster :func:`shardeval.hashing.canonical_json` for rows: same text, a third the cost.

    ``json.dumps`` builds a ``JSONEncoder`` and then a C encoder on every call, which is most
    of the time spent on a short row. This builds the C encoder once, with exactly the
    arguments ``json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
    default=str)`` passes it, except that it skips the circular-reference check (parsed rows
    cannot be circular, and a shared check table would outlive a failed call). Without the
    C accelerator it is ``canonical_json`` itself.
    test_datasets checks that both give the same text for awkward values.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - CPython always has it
        return canonical_json
    encode = make(None, str, json.encoder.encode_basestring, None, ":", ",", True, False, True)
    join = "".join
    return lambda row: join(encode(row, 0))


_canonical_row = _make_canonical_encoder()


class _TableBuilder:
    """Turns chunks of rows into Arrow arrays, then into the final table."""

    def __init__(self, url: str, id_field: str | None, locator: _Locator) -> None:
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
