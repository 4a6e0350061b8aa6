"""Local disk: write to a scratch name, fsync, rename; create with ``O_EXCL``.

``os.replace`` is atomic on POSIX filesystems, so a reader sees the old file or the new one.
The fsyncs (file, then its directory) make the rename survive a machine crash too: without
them a crash could leave a renamed but empty file. Writes that are only provisional skip them
(see :meth:`LocalBackend.write`). Scratch names live in one directory of the run, so that the
next holder of the run's lease can remove what a killed writer left.
"""

from __future__ import annotations

import errno
import os
import posixpath
import secrets
from collections.abc import Iterator
from contextlib import suppress

import fsspec

from shardeval.storage.backend import PARSE_ERRORS, Backend, TableRead, parse_error, read_parquet


class LocalBackend(Backend):
    """Files on a local (or locally mounted) filesystem."""

    def __init__(self, fs: fsspec.AbstractFileSystem, scratch: str) -> None:
        super().__init__(fs, "file")
        self.scratch = scratch

    def _scratch_name(self, path: str) -> str:
        _makedirs(self.scratch)
        return posixpath.join(self.scratch, f"{posixpath.basename(path)}.{secrets.token_hex(6)}")

    def exists(self, path: str) -> bool:  # noqa: D102
        return os.path.exists(path)

    def write(self, path: str, data: bytes, *, durable: bool = True) -> None:
        """Scratch name, then rename; with ``durable``, fsync the file and the directory.

        Without ``durable`` the write survives the death of this process (the page cache
        outlives it) but not a machine crash, which may leave the file empty or torn: such a
        file fails to parse, is set aside and recomputed like any damaged file.
        """
        tmp = self._scratch_name(path)
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                if durable:
                    handle.flush()
                    os.fsync(handle.fileno())
            self._publish(tmp, path, durable=durable)
        finally:
            with suppress(FileNotFoundError):
                os.unlink(tmp)

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """``O_EXCL`` on a scratch copy would race; create the name itself, then fill it.

        A reader of a lease that is being created may see it empty for an instant: the lease
        code reads it back and treats an unreadable record as "held" (see locking.py).
        """
        _makedirs(posixpath.dirname(path))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_dir(posixpath.dirname(path))
        return True

    def scratch_file(self, path: str) -> str:
        """A scratch name of the run: the rename into place stays on one filesystem."""
        return self._scratch_name(path)

    def publish(self, local: str, path: str) -> None:
        """fsync, then rename into place (and fsync the directory)."""
        with open(local, "rb+") as handle:
            os.fsync(handle.fileno())
        self._publish(local, path, durable=True)

    def _publish(self, tmp: str, path: str, *, durable: bool) -> None:
        directory = posixpath.dirname(path)
        _makedirs(directory)
        os.replace(tmp, path)
        if durable:
            _fsync_dir(directory)

    def read(self, path: str) -> bytes | None:  # noqa: D102
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    def read_tables(  # noqa: D102
        self, paths: list[str], columns: list[str] | None
    ) -> Iterator[TableRead]:
        for path in paths:
            if not os.path.isfile(path):
                yield None
                continue
            try:
                yield read_parquet(path, columns)
            except FileNotFoundError:
                yield None
            except PARSE_ERRORS as exc:
                yield parse_error(exc)

    def list_files(self, path: str) -> list[str]:
        """One directory read (files only)."""
        try:
            with os.scandir(path) as entries:
                return [posixpath.join(path, e.name) for e in entries if e.is_file()]
        except FileNotFoundError:
            return []

    def move(self, source: str, target: str) -> None:  # noqa: D102
        _makedirs(posixpath.dirname(target))
        os.replace(source, target)

    def delete(self, paths: list[str]) -> None:
        """Unlink each file; one that is already gone is not an error (a retried delete)."""
        for path in paths:
            with suppress(FileNotFoundError):
                os.unlink(path)

    def remove_empty_dir(self, path: str) -> None:  # noqa: D102
        with suppress(OSError):
            os.rmdir(path)

    def clean_scratch(self) -> None:
        """Remove every scratch file (only the lease holder calls this: none is in use)."""
        with suppress(FileNotFoundError):
            for name in os.listdir(self.scratch):
                with suppress(FileNotFoundError):
                    os.unlink(posixpath.join(self.scratch, name))


def _makedirs(path: str) -> None:
    """``os.makedirs``, where a file in the way is an error, not "already exists".

    ``FileExistsError`` means "someone else created it" to the store's callers (a lost
    create race); a file where a directory should be is a broken store.
    """
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError as exc:
        raise NotADirectoryError(errno.ENOTDIR, "a file is in the way", path) from exc


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
