"""Where the store contract runs: local disk, then each S3 server (fsspec's abstract style).

``place`` is parametrized: ``local`` (a temporary directory, in the fast loop), ``moto`` and
``seaweedfs`` (a real S3 server, marked slow like the rest of tests/s3's SeaweedFS runs).
Each place gives the test a store, a second client of its own to look with (what another
process would see), and a way to make the store fail.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
import pytest

from shardeval.storage import RunStore
from tests.s3.fixtures import BACKENDS
from tests.s3.servers import S3Backend


class Place:
    """One backend under test: the output URL, another client, and an outage."""

    def __init__(self, output: str, other: Any, s3: S3Backend | None = None) -> None:
        self.output = output
        self.other = other
        """A filesystem client independent of the store's (another process's view)."""
        self.s3 = s3

    def store(self, run_id: str = "run-1") -> RunStore:
        """A new store of the run (as another process would open it)."""
        return RunStore(self.output, run_id)

    @contextmanager
    def outage(self, store: RunStore) -> Iterator[None]:
        """The store fails while inside, and is whole again afterwards.

        S3: the server is stopped (connections refused). Local disk: the run's directory is
        replaced by a file of the same name, so every operation under it fails with an
        ``OSError`` (what a lost mount or a wrong path looks like; root ignores permissions).
        """
        if self.s3 is not None:
            self.s3.stop()
            try:
                yield
            finally:
                self.s3.start()
            return
        aside = f"{store.root}.aside"
        os.replace(store.root, aside)
        Path(store.root).write_bytes(b"not a directory")
        try:
            yield
        finally:
            os.unlink(store.root)
            os.replace(aside, store.root)


@pytest.fixture(params=["local", *BACKENDS])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Place]:
    """Each backend in turn (see the module docstring)."""
    if request.param == "local":
        yield Place(str(tmp_path / "out"), fsspec.filesystem("file"))
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        return
    request.getfixturevalue("fresh_s3_clients")
    backend: S3Backend = request.getfixturevalue(f"{request.param}_s3")
    backend.ensure_up()
    monkeypatch = request.getfixturevalue("monkeypatch")
    for name, value in backend.env().items():
        monkeypatch.setenv(name, value)
    yield Place(f"s3://{backend.make_bucket()}/out", backend.filesystem(), backend)
