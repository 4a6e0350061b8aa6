"""The backend protocol: what :class:`~shardeval.storage.RunStore` needs from a place to keep files.

The run's layout (which file is where, what is set aside, what a listing means) is the
store's; how a file is made visible whole, how a conditional create is done, and whether
independent calls may go out at once is the backend's. A new kind of storage is one subclass
of :class:`Backend`; the layout does not change.

Every method works on paths of the backend's filesystem (no protocol), raises
``FileNotFoundError`` only where it says so, and lets the store's failures (``OSError``,
botocore's errors, ...) through: the store turns those into a :class:`StorageError` that
names the file.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, TypeAlias

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

PARQUET_COMPRESSION = "zstd"


@dataclass(frozen=True)
class Damaged:
    """A file that exists but does not parse: the store sets it aside."""

    reason: str


TableRead: TypeAlias = pa.Table | Damaged | None
"""One file of :meth:`Backend.read_tables`: its table, :class:`Damaged`, or None if absent."""


class Backend(ABC):
    """Atomic file operations on one fsspec filesystem (see the module docstring)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, protocol: str) -> None:
        self.fs = fs
        self.protocol = protocol

    # ------------------------------------------------------------------ names
    def url_of(self, path: str) -> str:
        """A full URL (with protocol) of a path, for people, logs and links."""
        return path if self.protocol == "file" else f"{self.protocol}://{path}"

    # ------------------------------------------------------------------ looking
    def exists(self, path: str) -> bool:
        """Whether a file (or directory) is at ``path``."""
        return bool(self.fs.exists(path))

    def list_dir(self, path: str) -> list[str]:
        """The entries directly in ``path`` (files and directories); [] if it is absent."""
        try:
            return [str(name) for name in self.fs.ls(path, detail=False)]
        except FileNotFoundError:
            return []

    def list_files(self, path: str) -> list[str]:
        """The files directly in ``path``; [] if it is absent."""
        return [n for n in self.find(path) if n.rsplit("/", 1)[0] == path.rstrip("/")]

    def find(self, path: str) -> list[str]:
        """Every file below ``path``, at any depth; [] if it is absent."""
        try:
            return [str(name) for name in self.fs.find(path)]
        except FileNotFoundError:
            return []

    # ------------------------------------------------------------------ writing
    @abstractmethod
    def write(self, path: str, data: bytes, *, durable: bool = True) -> None:
        """Make ``path`` hold exactly ``data``; a reader sees the old file or the new, whole.

        Args:
            path: where.
            data: the whole file.
            durable: whether the file must also survive a machine crash once this returns
                (not only the death of this process). Provisional files (parts, which their
                batch file supersedes) pass False where that is cheaper.
        """

    @abstractmethod
    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Write ``data`` only if nothing is at ``path``; False if something is."""

    @abstractmethod
    def scratch_file(self, path: str) -> str:
        """A local file to build a large file in before :meth:`publish` makes it ``path``."""

    @abstractmethod
    def publish(self, local: str, path: str) -> None:
        """Make a finished :meth:`scratch_file` visible at ``path``, whole."""

    def discard(self, local: str) -> None:
        """Remove a scratch file (published or abandoned); gone already is fine."""
        with suppress(FileNotFoundError):
            os.unlink(local)

    # ------------------------------------------------------------------ reading
    def read(self, path: str) -> bytes | None:
        """The bytes at ``path``, or None if there is no such file."""
        try:
            return bytes(self.fs.cat_file(path))
        except FileNotFoundError:
            return None

    @abstractmethod
    def read_tables(self, paths: list[str], columns: list[str] | None) -> Iterator[TableRead]:
        """Each Parquet file of ``paths`` in order, column-pruned (see :data:`TableRead`)."""

    # ------------------------------------------------------------------ moving, removing
    def move(self, source: str, target: str) -> None:
        """Move a file (to quarantine); the source is gone afterwards."""
        self.fs.mv(source, target)

    def delete(self, paths: list[str]) -> None:
        """Delete files."""
        self.fs.rm(paths)

    def remove_empty_dir(self, path: str) -> None:  # noqa: B027 - a no-op is the default
        """Remove a directory if it is empty (object stores have none to remove)."""

    def clean_scratch(self) -> None:  # noqa: B027 - a no-op is the default
        """Remove what killed writers left in the backend's scratch space, if it has one."""

    # ------------------------------------------------------------------ concurrency
    def gather(self, calls: tuple[Callable[[], Any], ...]) -> list[Any]:
        """Run independent calls; results in the order given (see ``RunStore.gather``)."""
        return [call() for call in calls]

    def submit(self, call: Callable[[], None]) -> None:
        """Run a call that nobody waits for (see ``RunStore.submit``); at once by default."""
        call()


def parse_error(exc: BaseException) -> Damaged:
    """What a file that failed to parse is set aside for."""
    return Damaged(f"not a readable Parquet file: {exc}")


PARSE_ERRORS = (pa.ArrowException, OSError, ValueError)
"""What pyarrow raises for a file that is not (or no longer) a whole Parquet file."""


def read_parquet(path: str, columns: list[str] | None) -> pa.Table:
    """Read a local Parquet file by its path (never through a Python file object, see below)."""
    return pq.read_table(path, columns=columns)


def parse_parquet(data: bytes, columns: list[str] | None, *, missing_ok: bool = False) -> pa.Table:
    """Decode a Parquet file fetched whole, without a Python file object.

    pyarrow 26 makes the interpreter abort at exit in a share of the processes that read
    Parquet through a Python file object (``open()``, ``BytesIO``, fsspec files) or a
    ``BufferReader`` over Python ``bytes``: background work of the read still holds Python
    objects after the read returned. So the bytes are copied into a buffer Arrow owns and
    decoded by ``ParquetFile``, which finishes its work before it returns (docs/performance.md).
    Fetching the whole file in one GET (instead of handing pyarrow the filesystem, which makes
    a HEAD and ranged GETs per file) keeps object-store reads at one request a file.

    Raises:
        ValueError: a column asked for is not in the file (as ``pq.read_table`` does), unless
            ``missing_ok``: then only the columns the file has are read.
    """
    sink = pa.BufferOutputStream()
    sink.write(data)
    parquet = pq.ParquetFile(sink.getvalue())
    names = parquet.schema_arrow.names
    if missing_ok and columns is not None:
        columns = [c for c in columns if c in names]
    missing = sorted(set(columns or ()) - set(names))
    if missing:
        raise ValueError(f"no column {', '.join(missing)} in the file")
    return parquet.read(columns=columns)


_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def io_pool() -> concurrent.futures.ThreadPoolExecutor:
    """Threads for concurrent and background calls to remote stores (shared by all runs).

    They mostly wait: the I/O itself runs on fsspec's event loop.
    """
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="shardeval-io")
        return _pool
