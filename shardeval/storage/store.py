"""RunStore: the storage layout of one run, over any backend.

Layout (see docs/storage.md)::

    <output>/runs/<run_id>/
      spec.json          resolved spec (no secrets), fingerprints, shardeval version
      plan.parquet       item ids and keys of the latest attempt (to say what changed)
      batches/<batch_key>.parquet          committed batch results (responses)
      parts/<batch_key>/<seq>-<token>.parquet   finished items of a running batch
      quarantine/        files that failed to parse: set aside, never deleted
      prefect/           Prefect cache records (small pointers, the fast path)
      .tmp/              scratch names of local writes in progress
      lock.json          the one-writer lease while a process holds the run
      results.parquet    every row in dataset order
      metrics.json       written last: its presence means the run is complete

Every file a reader can see is whole: how that is done is the backend's
(:mod:`shardeval.storage.local`, :mod:`shardeval.storage.objects`); this module only decides
which file is where. A file that fails to parse is moved to ``quarantine/`` with a warning and
its items are recomputed: a run never trusts, and never deletes, a damaged file.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from shardeval.errors import StorageError
from shardeval.objectstore import (
    BLOCK_PROTOCOL,
    S3_PROTOCOLS,
    backend_errors,
    describe_error,
    filesystem_options,
    resolve_block,
    tune_filesystem,
)
from shardeval.storage.backend import PARQUET_COMPRESSION, Backend, Damaged
from shardeval.storage.local import LocalBackend
from shardeval.storage.objects import ObjectStoreBackend, S3Backend

logger = logging.getLogger("shardeval.storage")

_EXTRAS = {"gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}
"""The pyproject extra that brings each protocol's filesystem."""

T = TypeVar("T")


def split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/x`` → ("s3", "bucket/x"); a plain path → ("file", absolute path)."""
    if "://" in url:
        protocol, rest = url.split("://", 1)
        return protocol, rest.rstrip("/")
    return "file", os.path.abspath(os.path.expanduser(url))


def open_backend(protocol: str, fs: fsspec.AbstractFileSystem, scratch: str) -> Backend:
    """The backend for a filesystem: the one place that tells the kinds of storage apart."""
    if isinstance(fs, LocalFileSystem):
        return LocalBackend(fs, scratch)
    if protocol in S3_PROTOCOLS:
        tune_filesystem(fs, protocol)
        return S3Backend(fs, protocol)
    return ObjectStoreBackend(fs, protocol)


class RunStore:
    """Paths and atomic reads/writes for one run directory."""

    def __init__(self, output: str, run_id: str, storage_options: dict[str, Any] | None = None):
        self.output = output
        self.run_id = run_id
        protocol, base = split_url(output)
        options = dict(storage_options or {})
        if protocol == BLOCK_PROTOCOL:
            protocol, base, block_options = resolve_block(output)
            options = {**block_options, **options}
        self.protocol = protocol
        try:
            fs: fsspec.AbstractFileSystem = fsspec.filesystem(
                protocol, **filesystem_options(protocol, options)
            )
        except (ImportError, ValueError) as exc:
            extra = _EXTRAS.get(protocol, "s3")
            raise StorageError(
                f"cannot use output {output!r}: {exc}",
                hint=f"install the extra for that storage: pip install 'shardeval[{extra}]'",
            ) from exc
        self.root = posixpath.join(base, "runs", run_id)
        # Creating the S3 client can fail (e.g. a profile that does not exist).
        self.backend: Backend = self._guard(
            "connect to", base, lambda: open_backend(protocol, fs, self.path(".tmp"))
        )

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The fsspec filesystem under the backend (for callers that read with pyarrow)."""
        return self.backend.fs

    @property
    def is_local(self) -> bool:
        """Whether the run is on local disk (Prefect's result storage can then live in it)."""
        return isinstance(self.backend, LocalBackend)

    # ----------------------------------------------------------------- layout
    def path(self, *parts: str) -> str:
        """A path inside the run directory."""
        return posixpath.join(self.root, *parts)

    def url(self, *parts: str) -> str:
        """A full URL (with protocol) of a path inside the run, for people and links."""
        return self.url_of(self.path(*parts))

    def url_of(self, path: str) -> str:
        """A full URL for a path of this filesystem."""
        return path if self.protocol == "file" else f"{self.protocol}://{path}"

    @property
    def spec_path(self) -> str:  # noqa: D102
        return self.path("spec.json")

    @property
    def plan_path(self) -> str:  # noqa: D102
        return self.path("plan.parquet")

    @property
    def results_path(self) -> str:  # noqa: D102
        return self.path("results.parquet")

    @property
    def metrics_path(self) -> str:  # noqa: D102
        return self.path("metrics.json")

    @property
    def prefect_dir(self) -> str:
        """Where Prefect keeps its cache records for this run."""
        return self.path("prefect")

    def batch_path(self, batch_key: str) -> str:
        """The committed file of one batch."""
        return self.path("batches", f"{batch_key}.parquet")

    def parts_dir(self, batch_key: str) -> str:
        """The in-progress parts of one batch."""
        return self.path("parts", batch_key)

    def part_path(self, batch_key: str, name: str) -> str:
        """A part of one batch; names sort oldest first (see ``part_writer.PartFlusher``)."""
        return self.path("parts", batch_key, name)

    # ------------------------------------------------------------- listing
    def exists(self, path: str) -> bool:
        """Whether ``path`` exists (errors are storage errors, not a 'no')."""
        return self._guard("check", path, lambda: self.backend.exists(path))

    def list_batches(self) -> set[str]:
        """Keys of every committed batch file (one listing call)."""
        directory = self.path("batches")
        names = self._guard("list", directory, lambda: self.backend.list_files(directory))
        return {posixpath.basename(n)[: -len(".parquet")] for n in names if n.endswith(".parquet")}

    def list_parts(self) -> dict[str, list[str]]:
        """In-progress parts by batch key (one recursive listing)."""
        parts: dict[str, list[str]] = {}
        for name in self._find(self.path("parts")):
            if name.endswith(".parquet"):
                batch = posixpath.basename(posixpath.dirname(name))
                parts.setdefault(batch, []).append(name)
        for names in parts.values():
            names.sort()
        return parts

    def list_batch_parts(self, batch_key: str) -> list[str]:
        """The in-progress parts of one batch, oldest first."""
        return sorted(n for n in self._find(self.parts_dir(batch_key)) if n.endswith(".parquet"))

    def _list(self, path: str) -> list[str]:
        """Entries directly in a directory (files and directories); [] if absent."""
        return self._guard("list", path, lambda: self.backend.list_dir(path))

    def _find(self, path: str) -> list[str]:
        return self._guard("list", path, lambda: self.backend.find(path))

    # ------------------------------------------------------------- writing
    def write_bytes(self, path: str, data: bytes) -> None:
        """Make ``path`` hold exactly ``data``, never visible half-written."""
        self._guard("write", path, lambda: self.backend.write(path, data))

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Write ``data`` to ``path`` only if nothing is there; False if something is."""
        return self._guard("create", path, lambda: self.backend.create_exclusive(path, data))

    def write_json(self, path: str, value: Any) -> None:
        """Write pretty, key-sorted JSON atomically."""
        text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        self.write_bytes(path, text.encode("utf-8"))

    def write_table(self, path: str, table: pa.Table) -> None:
        """Write a Parquet file atomically (built in memory: parts and batches are small)."""
        data = _parquet_bytes(table)
        self._guard("write", path, lambda: self.backend.write(path, data))

    def write_part(self, path: str, table: pa.Table) -> None:
        """Write a part: atomic like every file, but provisional, so not necessarily durable.

        A part's rows are taken over by its batch file (written durably), after which the
        part is removed; a part lost or torn by a machine crash is set aside and its items
        recomputed. So a part needs to survive the death of this process only, which on local
        disk spares the two fsyncs every flush would wait for (docs/performance.md).
        """
        data = _parquet_bytes(table)
        self._guard("write", path, lambda: self.backend.write(path, data, durable=False))

    @contextmanager
    def open_table_writer(self, path: str, schema: pa.Schema) -> Iterator[pq.ParquetWriter]:
        """Stream a large Parquet file (results.parquet) and publish it only when complete.

        It is built in a scratch file of the backend and published whole (renamed into place
        on local disk, uploaded in one go to an object store); an error inside the block
        publishes nothing.
        """
        local = self.backend.scratch_file(path)
        try:
            with pq.ParquetWriter(local, schema, compression=PARQUET_COMPRESSION) as writer:
                yield writer
            self._guard("write", path, lambda: self.backend.publish(local, path))
        finally:
            self.backend.discard(local)

    def clean_tmp(self) -> None:
        """Remove scratch files a killed writer left (only the lease holder calls this)."""
        self._guard("clean", self.path(".tmp"), self.backend.clean_scratch)

    # ------------------------------------------------------------- reading
    def read_bytes(self, path: str) -> bytes | None:
        """The bytes at ``path``, or None if there is no such file."""
        return self._guard("read", path, lambda: self.backend.read(path))

    def read_json(self, path: str) -> Any | None:
        """Parsed JSON at ``path``; None if missing; set aside if it does not parse."""
        data = self.read_bytes(path)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError as exc:
            self.quarantine(path, f"not valid JSON: {exc}")
            return None

    def peek_json(self, path: str) -> Any | None:
        """Parsed JSON at ``path``; None if missing or if it does not parse, set aside or not.

        For the readers that never write (``status``, ``runs``): setting a damaged file aside
        is the lease holder's job, and the file may be in the middle of being replaced.
        """
        data = self.read_bytes(path)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError:
            return None

    def read_tables(
        self, paths: list[str], columns: list[str] | None = None
    ) -> Iterator[pa.Table | None]:
        """:meth:`read_table` of many files (fetched concurrently where the backend can)."""
        reads = self.backend.read_tables(paths, columns)
        for path in paths:
            read = self._guard("read", path, lambda: next(reads))
            if isinstance(read, Damaged):
                self.quarantine(path, read.reason)
                yield None
            else:
                yield read

    def read_table(self, path: str, columns: list[str] | None = None) -> pa.Table | None:
        """A Parquet file (column-pruned), None if missing; set aside if it does not parse."""
        return next(self.read_tables([path], columns))

    def quarantine(self, path: str, reason: str) -> str:
        """Move a damaged file under ``quarantine/`` (kept for inspection, never deleted)."""
        relative = posixpath.relpath(path, self.root).replace("/", "__")
        target = self.path("quarantine", f"{int(time.time())}-{secrets.token_hex(3)}-{relative}")
        logger.warning(
            "set aside %s (%s); moved to %s, its items will be recomputed",
            self.url_of(path),
            reason,
            self.url_of(target),
        )
        self._guard("quarantine", path, lambda: self.backend.move(path, target))
        return target

    def delete(self, paths: list[str]) -> None:
        """Delete files (parts after their batch committed; never a finished result)."""
        if paths:
            self._guard("delete", paths[0], lambda: self.backend.delete(paths))

    def tidy(self) -> None:
        """Remove the in-progress directories once empty (a finished run has none)."""
        self.remove_empty_dir(self.path("parts"))
        self.remove_empty_dir(self.path(".tmp"))

    def remove_empty_dir(self, path: str) -> None:
        """Tidy an emptied directory (object stores have no directories to remove)."""
        self.backend.remove_empty_dir(path)

    # ------------------------------------------------------------- helpers
    def gather(self, *calls: Callable[[], Any]) -> list[Any]:
        """Run independent storage calls at once where the backend gains by it (object stores).

        Each call to a remote store is a round trip of tens of milliseconds; a run's start
        (survey, recording the attempt) and end make several that do not depend on each
        other. Results come back in the order given; the first error is raised once all
        calls have ended (none is left running behind the caller's back).
        """
        return self.backend.gather(calls)

    def submit(self, call: Callable[[], None]) -> None:
        """Run a storage call in the background on an object store; at once on local disk.

        Nobody waits for the call: it must deal with its own errors (see the part flusher).
        """
        self.backend.submit(call)

    def _guard(self, action: str, path: str, operation: Callable[[], T]) -> T:
        """Run a storage operation, turning backend errors into a StorageError that says what."""
        try:
            return operation()
        except (StorageError, FileNotFoundError, FileExistsError):
            raise
        except backend_errors() as exc:
            raise StorageError(
                f"storage failed to {action} {self.url_of(path)}: {describe_error(exc)}",
                hint="check that the store is reachable and the credentials are valid; "
                "everything already committed is kept, rerun the same command to resume",
            ) from exc


def _parquet_bytes(table: pa.Table) -> bytes:
    """A whole Parquet file in memory (Arrow's own buffer: no Python file object involved)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=PARQUET_COMPRESSION)
    return bytes(sink.getvalue())
