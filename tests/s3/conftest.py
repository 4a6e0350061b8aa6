"""S3 fixtures for tests/s3: the shared servers and clients come from tests/s3/fixtures.py.

Every test here gets a clean s3fs instance cache (see :func:`fresh_s3_clients`).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _fresh_s3_clients(fresh_s3_clients: None) -> Iterator[None]:
    """No s3fs instance (and its cached listings and settings) outlives a test."""
    yield
