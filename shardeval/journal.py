"""The answer journal: every final outcome appended to a file the moment it arrives.

On local disk a batch writes each answer as one JSON line to its journal,
``parts/<batch>/<name>.journal.jsonl``, with one ``write`` system call per answer (no
buffering in this process). A process that is killed loses only the requests in flight: the
page cache outlives the process, and a provider bills those requests whatever we do.

fsync policy: none per answer. An fsync costs milliseconds here (hundreds under load), and
every answer that arrived meanwhile would be at risk in memory instead; a *process* crash
does not need it. A *machine* crash can lose the journal's tail or tear its last line: a line
without its newline, or one that does not parse as a complete row, is ignored on read (and
its item sent again), exactly like a damaged part. The batch file that takes the journal's
rows over is written with fsync, and then the journal is deleted.

Journals are read back like parts: by the batch that owns them (:func:`read_journal`), and
by the survey (:func:`list_journals`), which also points other batches at their rows (an
edited dataset, another batching). Object stores have no append: there the part flusher
writes Parquet parts every flush window, as before.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import secrets
import time
from collections.abc import Sequence

import orjson
import pyarrow as pa

from shardeval.outcome import Outcome, storable
from shardeval.results import GENERATION_FIELDS, GENERATION_SCHEMA
from shardeval.storage import RunStore

SUFFIX = ".journal.jsonl"
_N_FIELDS = len(GENERATION_FIELDS)


def _types(field: pa.Field) -> tuple[type, ...]:
    """The Python types a journal line may hold for ``field`` (JSON numbers, strings, null)."""
    if pa.types.is_integer(field.type):
        base: tuple[type, ...] = (int,)
    elif pa.types.is_floating(field.type):
        base = (int, float)
    else:
        base = (str,)
    return base + ((type(None),) if field.nullable else ())


_TYPES = [_types(f) for f in GENERATION_FIELDS]

logger = logging.getLogger("shardeval.journal")


def is_journal(path: str) -> bool:
    """Whether ``path`` names a journal (rather than a Parquet part)."""
    return path.endswith(SUFFIX)


class Journal:
    """One batch attempt's journal (local disk only; see the module docstring)."""

    def __init__(self, store: RunStore, batch_key: str) -> None:
        name = f"{time.time_ns():020d}-{secrets.token_hex(4)}{SUFFIX}"
        self.path = store.path("parts", batch_key, name)
        self._fd: int | None = None
        self._closed = False
        self.rows = 0

    def _open(self) -> int:
        """The file, created at the first answer (a batch that gets none leaves no file)."""
        if self._closed:
            raise OSError(f"journal {self.path} is closed")
        if self._fd is None:
            os.makedirs(posixpath.dirname(self.path), exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        return self._fd

    def append(self, outcome: Outcome, item_id: str | None, trial: int | None) -> None:
        """Write one final outcome as one line, in one system call (raises OSError)."""
        fd = self._open()
        data = _encode_line(
            [
                outcome.key,
                item_id,
                trial,
                outcome.status,
                outcome.error,
                outcome.error_kind,
                outcome.http_status,
                outcome.response,
                outcome.latency_s,
                outcome.prompt_tokens,
                outcome.completion_tokens,
                outcome.finish_reason,
                outcome.attempts,
                outcome.finished_at,
            ]
        )
        written = os.write(fd, data)
        if written != len(data):  # a full disk can cut a write short: that line is torn
            raise OSError(f"short write to {self.path} ({written} of {len(data)} bytes)")
        self.rows += 1

    def close(self) -> None:
        """Close the file (its content stays until the batch commits)."""
        self._closed = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def open_journal(store: RunStore, batch_key: str) -> Journal | None:
    """A new journal for one batch attempt on local disk; None on object stores."""
    return Journal(store, batch_key) if store.is_local else None


def batch_journals(store: RunStore, batch_key: str) -> list[str]:
    """The journals of one batch, oldest first (local disk; [] elsewhere)."""
    if not store.is_local:
        return []
    directory = store.parts_dir(batch_key)
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(posixpath.join(directory, n) for n in names if n.endswith(SUFFIX))


def list_journals(store: RunStore) -> dict[str, list[str]]:
    """Every journal by batch key (local disk; {} elsewhere)."""
    if not store.is_local:
        return {}
    root = store.path("parts")
    found: dict[str, list[str]] = {}
    try:
        batches = os.listdir(root)
    except OSError:
        return {}
    for batch in batches:
        paths = batch_journals(store, batch)
        if paths:
            found[batch] = paths
    return found


def with_journals(store: RunStore, parts: dict[str, list[str]]) -> dict[str, list[str]]:
    """``parts`` (batch → paths) with each batch's journals added."""
    merged = {batch: list(paths) for batch, paths in parts.items()}
    for batch, paths in list_journals(store).items():
        merged.setdefault(batch, []).extend(paths)
    return merged


def read_journal(path: str, columns: Sequence[str] | None = None) -> pa.Table | None:
    """The complete rows of a journal as a generation table; None if it is gone.

    A last line without its newline (the process died mid-write, or a machine crash tore it)
    and any line that is not a complete row are skipped: their items are sent again.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return None
    lines = data.split(b"\n")
    torn = lines.pop()  # after the last newline: b"" unless the last line was cut short
    skipped = 1 if torn else 0
    columns_out: list[list[object]] = [[] for _ in range(_N_FIELDS)]
    for raw in lines:
        row = _parse(raw)
        if row is None:
            skipped += 1
            continue
        for column, value in zip(columns_out, row, strict=True):
            column.append(value)
    if skipped:
        logger.info("%s: %d incomplete line(s) ignored (their items are sent again)", path, skipped)
    table = pa.Table.from_arrays(
        [pa.array(c, f.type) for c, f in zip(columns_out, GENERATION_FIELDS, strict=True)],
        schema=GENERATION_SCHEMA,
    )
    return table.select(list(columns)) if columns is not None else table


def _encode_line(row: list[object]) -> bytes:
    """One journal line.

    orjson because this runs on the engine's thread for every answer, and the stdlib encoder
    costs several times more per line; the stdlib (escaping) for a response orjson refuses
    (a lone surrogate).
    """
    try:
        return orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:
        return json.dumps(row, separators=(",", ":")).encode("ascii") + b"\n"


def _parse(raw: bytes) -> list[object] | None:
    try:
        row = orjson.loads(raw)
    except ValueError:
        try:  # a line the stdlib wrote (a lone surrogate's escape), or torn
            row = json.loads(raw)
        except ValueError:
            return None
        if isinstance(row, list):  # written before answers were mended: mend it on reading
            row = [storable(value) if isinstance(value, str) else value for value in row]
    if not isinstance(row, list) or len(row) != _N_FIELDS:
        return None
    for value, types in zip(row, _TYPES, strict=True):
        if not isinstance(value, types) or isinstance(value, bool):
            return None
    if row[3] not in ("ok", "error"):
        return None
    return row
