"""Object stores through fsspec: a file is one PUT, a create is a conditional PUT.

An object appears whole or not at all: a single PutObject is atomic, and a multipart upload
(s3fs uses one above ~100 MiB) becomes visible only when it completes, so no scratch name
and no rename are needed. What costs here is round trips (tens of milliseconds each, and
billed per request), so independent calls go out at once and parts are written in the
background; see docs/storage-object.md.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import posixpath
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa

from shardeval.objectstore import S3_UPLOAD_CONCURRENCY, backend_errors
from shardeval.storage.backend import (
    PARSE_ERRORS,
    Backend,
    Damaged,
    TableRead,
    io_pool,
    parse_error,
    parse_parquet,
)

READ_CONCURRENCY = 32
"""Files fetched at once by :meth:`ObjectStoreBackend.read_tables` (one round trip a group)."""


class ObjectStoreBackend(Backend):
    """Any fsspec object store (GCS, Azure, ...); :class:`S3Backend` adds S3's specifics."""

    def write(self, path: str, data: bytes, *, durable: bool = True) -> None:
        """One PUT: the store keeps it once it has answered, ``durable`` or not."""
        try:
            self.fs.pipe_file(path, data)
        finally:
            self._invalidate(path)

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """A conditional PUT (``If-None-Match: *``): the store lets exactly one creator win.

        Some S3-compatible stores answer the lost race's 412 with a generic error (SeaweedFS:
        ``OSError(EINVAL)`` through s3fs): after an error we look, and report "exists" if so.
        """
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

    def scratch_file(self, path: str) -> str:
        """A local temporary file (the upload reads it)."""
        handle, local = tempfile.mkstemp(suffix=posixpath.splitext(path)[1])
        os.close(handle)
        return local

    def publish(self, local: str, path: str) -> None:
        """Upload in one go: one PUT, or a multipart upload that appears only when complete."""
        try:
            self._upload(local, path)
        finally:
            self._invalidate(path)

    def _upload(self, local: str, path: str) -> None:
        self.fs.put_file(local, path)

    def read_tables(self, paths: list[str], columns: list[str] | None) -> Iterator[TableRead]:
        """Fetch ``READ_CONCURRENCY`` files at once (one round trip a group, not one a file).

        Finalizing a run on an object store spends most of its time reading its batches back.
        A file whose fetch failed is fetched again alone, so that its error is the one raised.
        """
        for start in range(0, len(paths), READ_CONCURRENCY):
            group = paths[start : start + READ_CONCURRENCY]
            fetched = self.fs.cat(group, on_error="return") if len(group) > 1 else {}
            for path in group:
                data = fetched.get(path)
                if isinstance(data, FileNotFoundError):
                    yield None
                    continue
                if data is None or isinstance(data, BaseException):
                    data = self.read(path)
                    if data is None:
                        yield None
                        continue
                yield _parse(data, columns)

    def move(self, source: str, target: str) -> None:
        """Copy, then delete (what a move is on an object store)."""
        try:
            self.fs.mv(source, target)
        finally:
            self._invalidate(source)
            self._invalidate(target)

    def delete(self, paths: list[str]) -> None:  # noqa: D102
        try:
            self.fs.rm(paths)
        finally:
            for path in paths:
                self._invalidate(path)

    def gather(self, calls: tuple[Callable[[], Any], ...]) -> list[Any]:
        """Every call at once; the first error is raised once all have ended."""
        if len(calls) < 2:
            return [call() for call in calls]
        futures = [io_pool().submit(call) for call in calls]
        concurrent.futures.wait(futures)
        return [future.result() for future in futures]

    def submit(self, call: Callable[[], None]) -> None:
        """In the background: the caller goes on while the round trip is under way."""
        io_pool().submit(call)

    def _invalidate(self, path: str) -> None:
        # s3fs caches listings; a write by us must be seen by our next listing.
        with contextlib.suppress(Exception):  # cache invalidation is best effort
            self.fs.invalidate_cache(posixpath.dirname(path))


class S3Backend(ObjectStoreBackend):
    """S3 and S3-compatible stores (s3fs): bounded listings, concurrent multipart uploads."""

    def find(self, path: str) -> list[str]:
        """One paginated LIST of the prefix ``path/``.

        A plain ``find`` of an absent prefix adds a HEAD and a second LIST to tell "no such
        directory" from "a file of that name"; a run's directories are prefixes only.
        """
        parent, name = posixpath.split(path.rstrip("/"))
        try:
            return [str(n) for n in self.fs.find(parent, prefix=f"{name}/")]
        except FileNotFoundError:
            return []

    def _upload(self, local: str, path: str) -> None:
        # The parts of a multipart upload (results.parquet above ~50 MiB) go up at once.
        self.fs.put_file(local, path, max_concurrency=S3_UPLOAD_CONCURRENCY)


def _parse(data: bytes, columns: list[str] | None) -> pa.Table | Damaged:
    try:
        return parse_parquet(data, columns)
    except PARSE_ERRORS as exc:
        return parse_error(exc)
