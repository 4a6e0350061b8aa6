"""Crash-test fixtures: a model server slow enough to kill a run in the middle of its work."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from shardeval.testing.server import ServerConfig, TestServer


@pytest.fixture
def slow_server() -> Iterator[TestServer]:
    """The test server in its own process, 20-50 ms per answer."""
    with TestServer.start_subprocess(ServerConfig(latency_min=0.02, latency_max=0.05)) as server:
        yield server
