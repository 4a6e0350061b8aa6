"""RunStore: the storage layout of one run, over any fsspec filesystem.

Layout (see docs/storage.md)::

    <output>/runs/<run_id>/
      spec.json          resolved spec (no secrets), fingerprints, shardeval version
      plan.parquet       item ids and keys of the latest attempt (to say what changed)
      batches/<batch_key>.parquet          committed batch results (responses)
      parts/<batch_key>/<seq>-<token>.parquet   finished items of a running batch
      quarantine/        files that failed to parse: set aside, never deleted
      prefect/           Prefect cache records (small pointers, the fast path)
      .tmp/              temporary names of local writes in progress
      lock.json          the one-writer lease while a process holds the run
      results.parquet    every row in dataset order
      metrics.json       written last: its presence means the run is complete

Every file a reader can see is whole. On local disk a write goes to ``.tmp/`` and is renamed
into place (after fsync, so a machine crash cannot leave a renamed-but-empty file); on object
stores a write is a single PUT (or a multipart upload, which appears only when complete).
A file that fails to parse is moved to ``quarantine/`` with a warning and its items are
recomputed: a run never trusts, and never deletes, a damaged file.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import logging
import os
import posixpath
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from shardeval.errors import StorageError
from shardeval.objectstore import (
    BLOCK_PROTOCOL,
    S3_PROTOCOLS,
    S3_UPLOAD_CONCURRENCY,
    backend_errors,
    describe_error,
    filesystem_options,
    resolve_block,
    tune_filesystem,
)

logger = logging.getLogger("shardeval.storage")

PARQUET_COMPRESSION = "zstd"
READ_CONCURRENCY = 32
_EXTRAS = {"gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}
"""The pyproject extra that brings each protocol's filesystem."""


_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _io_pool() -> concurrent.futures.ThreadPoolExecutor:
    """Threads for :meth:`RunStore.gather` and :meth:`RunStore.submit`.

    They mostly wait: the I/O itself runs on fsspec's event loop.
    """
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="shardeval-io")
        return _pool


def split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/x`` → ("s3", "bucket/x"); a plain path → ("file", absolute path)."""
    if "://" in url:
        protocol, rest = url.split("://", 1)
        return protocol, rest.rstrip("/")
    return "file", os.path.abspath(os.path.expanduser(url))


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
            self.fs: fsspec.AbstractFileSystem = fsspec.filesystem(
                protocol, **filesystem_options(protocol, options)
            )
        except (ImportError, ValueError) as exc:
            extra = _EXTRAS.get(protocol, "s3")
            raise StorageError(
                f"cannot use output {output!r}: {exc}",
                hint=f"install the extra for that storage: pip install 'shardeval[{extra}]'",
            ) from exc
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.is_s3 = protocol in S3_PROTOCOLS
        self.root = posixpath.join(base, "runs", run_id)
        # Creating the S3 client can fail (e.g. a profile that does not exist).
        self._guard("connect to", base, lambda: tune_filesystem(self.fs, protocol))

    # ----------------------------------------------------------------- layout
    def path(self, *parts: str) -> str:
        """A path inside the run directory."""
        return posixpath.join(self.root, *parts)

    def url(self, *parts: str) -> str:
        """A full URL (with protocol) of a path inside the run, for people and links."""
        path = self.path(*parts)
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

    # ------------------------------------------------------------- listing
    def exists(self, path: str) -> bool:
        """Whether ``path`` exists (errors are storage errors, not a 'no')."""
        return bool(self._guard("check", path, lambda: self.fs.exists(path)))

    def list_batches(self) -> set[str]:
        """Keys of every committed batch file (one listing call)."""
        directory = self.path("batches")
        # On S3 a prefix listing: one LIST even when batches/ is empty (ls would list the
        # parent too). batches/ is flat, so it returns the same names.
        names = self._find(directory) if self.is_s3 else self._list(directory)
        return {
            posixpath.basename(n)[: -len(".parquet")]
            for n in names
            if n.endswith(".parquet") and posixpath.dirname(n) == directory
        }

    def list_parts(self) -> dict[str, list[str]]:
        """In-progress parts by batch key (one recursive listing)."""
        parts: dict[str, list[str]] = {}
        root = self.path("parts")
        for name in self._find(root):
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
        def run() -> list[str]:
            try:
                return [str(n) for n in self.fs.ls(path, detail=False)]
            except FileNotFoundError:
                return []

        return self._guard("list", path, run)  # type: ignore[no-any-return]

    def _find(self, path: str) -> list[str]:
        def run() -> list[str]:
            try:
                if self.is_s3:
                    # One paginated LIST: a plain find of an absent prefix adds a HEAD and
                    # a second LIST to tell "no such directory" from "a file of that name".
                    parent, name = posixpath.split(path)
                    return [str(n) for n in self.fs.find(parent, prefix=f"{name}/")]
                return [str(n) for n in self.fs.find(path)]
            except FileNotFoundError:
                return []

        return self._guard("list", path, run)  # type: ignore[no-any-return]

    # ------------------------------------------------------------- writing
    def write_bytes(self, path: str, data: bytes) -> None:
        """Make ``path`` hold exactly ``data``, never visible half-written."""
        if self.is_local:
            self._guard("write", path, lambda: self._write_local(path, data))
        else:
            self._guard("write", path, lambda: self.fs.pipe_file(path, data))
            self._invalidate(path)

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Write ``data`` to ``path`` only if nothing is there; False if something is.

        Local disk uses ``O_EXCL``; object stores a conditional PUT (``If-None-Match: *``).
        Some S3-compatible stores answer the conditional 412 with a generic error
        (SeaweedFS: ``OSError(EINVAL)``): after an error we look, and report "exists" if so.
        """
        if self.is_local:
            os.makedirs(posixpath.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            return True

        def attempt() -> bool:
            try:
                with self.fs.open(path, "xb") as handle:
                    handle.write(data)
            except FileExistsError:
                return False
            except backend_errors():
                if self.fs.exists(path):
                    return False
                raise
            finally:
                self._invalidate(path)
            return True

        return bool(self._guard("create", path, attempt))

    def write_json(self, path: str, value: Any) -> None:
        """Write pretty, key-sorted JSON atomically."""
        text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        self.write_bytes(path, text.encode("utf-8"))

    def write_table(self, path: str, table: pa.Table) -> None:
        """Write a Parquet file atomically (built in memory: parts and batches are small)."""
        sink = io.BytesIO()
        pq.write_table(table, sink, compression=PARQUET_COMPRESSION)
        self.write_bytes(path, sink.getvalue())

    @contextmanager
    def open_table_writer(self, path: str, schema: pa.Schema) -> Iterator[pq.ParquetWriter]:
        """Stream a large Parquet file (results.parquet) and publish it only when complete.

        Locally it is written under ``.tmp/`` and renamed; on object stores it is written to a
        local temporary file and uploaded in one go (s3fs uses one PUT below ~100 MiB and a
        multipart upload above, which becomes visible only once complete).
        """
        import tempfile

        if self.is_local:
            tmp = self._tmp_name(path)
            os.makedirs(posixpath.dirname(tmp), exist_ok=True)
        else:
            handle, tmp = tempfile.mkstemp(suffix=".parquet")
            os.close(handle)
        try:
            with pq.ParquetWriter(tmp, schema, compression=PARQUET_COMPRESSION) as writer:
                yield writer
            if self.is_local:
                self._fsync_file(tmp)
                os.makedirs(posixpath.dirname(path), exist_ok=True)
                os.replace(tmp, path)
                self._fsync_dir(posixpath.dirname(path))
            else:
                self._guard("write", path, lambda: self._upload(tmp, path))
                self._invalidate(path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _upload(self, local: str, path: str) -> None:
        if self.is_s3:  # parts of a multipart upload go up concurrently (reads are single GETs)
            self.fs.put_file(local, path, max_concurrency=S3_UPLOAD_CONCURRENCY)
        else:
            self.fs.put_file(local, path)

    def _tmp_name(self, path: str) -> str:
        return self.path(".tmp", f"{posixpath.basename(path)}.{secrets.token_hex(6)}")

    def _write_local(self, path: str, data: bytes) -> None:
        tmp = self._tmp_name(path)
        os.makedirs(posixpath.dirname(tmp), exist_ok=True)
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.makedirs(posixpath.dirname(path), exist_ok=True)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._fsync_dir(posixpath.dirname(path))

    @staticmethod
    def _fsync_file(path: str) -> None:
        with open(path, "rb+") as handle:
            os.fsync(handle.fileno())

    @staticmethod
    def _fsync_dir(path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def clean_tmp(self) -> None:
        """Remove temporary names a killed writer left (only the lock holder calls this)."""
        if self.is_local and os.path.isdir(self.path(".tmp")):
            for name in os.listdir(self.path(".tmp")):
                with suppress(FileNotFoundError):
                    os.unlink(self.path(".tmp", name))

    # ------------------------------------------------------------- reading
    def read_bytes(self, path: str) -> bytes | None:
        """The bytes at ``path``, or None if there is no such file."""

        def run() -> bytes | None:
            try:
                return bytes(self.fs.cat_file(path))
            except FileNotFoundError:
                return None

        return self._guard("read", path, run)  # type: ignore[no-any-return]

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

    def read_tables(
        self, paths: list[str], columns: list[str] | None = None
    ) -> Iterator[pa.Table | None]:
        """:meth:`read_table` of many files, fetched concurrently on object stores.

        Reads go out ``READ_CONCURRENCY`` at a time (one round trip per group instead of one
        per file), which is what finalizing a run on S3 spends most of its time on.
        """
        if self.is_local:
            for path in paths:
                yield self.read_table(path, columns)
            return
        for start in range(0, len(paths), READ_CONCURRENCY):
            group = paths[start : start + READ_CONCURRENCY]
            fetched = self._guard(
                "read", group[0], lambda g=group: self.fs.cat(g, on_error="return")
            )
            for path in group:
                data = fetched.get(path)
                if isinstance(data, FileNotFoundError) or data is None:
                    yield None
                elif isinstance(data, BaseException):
                    yield self.read_table(path, columns)  # retried alone, errors reported
                else:
                    yield self._parse_table(path, bytes(data), columns)

    def read_table(self, path: str, columns: list[str] | None = None) -> pa.Table | None:
        """A Parquet file (column-pruned), None if missing; set aside if it does not parse."""
        data = self.read_bytes(path)
        if data is None:
            return None
        return self._parse_table(path, data, columns)

    def _parse_table(self, path: str, data: bytes, columns: list[str] | None) -> pa.Table | None:
        try:
            return pq.read_table(pa.BufferReader(data), columns=columns)
        except (pa.ArrowException, OSError, ValueError) as exc:
            self.quarantine(path, f"not a readable Parquet file: {exc}")
            return None

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
        self._guard("quarantine", path, lambda: self._move(path, target))
        return target

    def _move(self, source: str, target: str) -> None:
        if self.is_local:
            os.makedirs(posixpath.dirname(target), exist_ok=True)
            os.replace(source, target)
        else:
            self.fs.mv(source, target)
            self._invalidate(source)

    def delete(self, paths: list[str]) -> None:
        """Delete files (parts after their batch committed; never a finished result)."""
        if not paths:
            return
        self._guard("delete", paths[0], lambda: self.fs.rm(paths))
        for path in paths:
            self._invalidate(path)

    def tidy(self) -> None:
        """Remove the in-progress directories once empty (a finished run has none)."""
        self.remove_empty_dir(self.path("parts"))
        self.remove_empty_dir(self.path(".tmp"))

    def remove_empty_dir(self, path: str) -> None:
        """Tidy an emptied directory on local disk (object stores have no directories)."""
        if self.is_local:
            with suppress(OSError):
                os.rmdir(path)

    # ------------------------------------------------------------- helpers
    def gather(self, *calls: Callable[[], Any]) -> list[Any]:
        """Run independent storage calls at once on an object store; in order on local disk.

        Each call to a remote store is a round trip of tens of milliseconds; a run's start
        (survey, recording the attempt) and end make several that do not depend on each
        other. Results come back in the order given; the first error is raised once all
        calls have ended (none is left running behind the caller's back).
        """
        if self.is_local or len(calls) < 2:
            return [call() for call in calls]
        futures = [_io_pool().submit(call) for call in calls]
        concurrent.futures.wait(futures)
        return [future.result() for future in futures]

    def submit(self, call: Callable[[], None]) -> None:
        """Run a storage call in the background on an object store; at once on local disk.

        Nobody waits for the call: it must deal with its own errors (see the part flusher).
        """
        if self.is_local:
            call()
        else:
            _io_pool().submit(call)

    def url_of(self, path: str) -> str:
        """A full URL for a path of this filesystem."""
        return path if self.protocol == "file" else f"{self.protocol}://{path}"

    def _invalidate(self, path: str) -> None:
        # s3fs caches listings; a write by us must be seen by our next listing.
        with contextlib.suppress(Exception):  # cache invalidation is best effort
            self.fs.invalidate_cache(posixpath.dirname(path))

    def _guard(self, action: str, path: str, operation: Any) -> Any:
        """Run a storage operation, turning backend errors into a StorageError that says what."""
        try:
            return operation()
        except StorageError:
            raise
        except (FileNotFoundError, FileExistsError):
            raise
        except backend_errors() as exc:
            raise StorageError(
                f"storage failed to {action} {self.url_of(path)}: {describe_error(exc)}",
                hint="check that the store is reachable and the credentials are valid; "
                "everything already committed is kept, rerun the same command to resume",
            ) from exc
