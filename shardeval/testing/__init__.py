"""Test doubles for shardeval: an OpenAI-compatible fake server and offline python models.

:class:`TestServer` and :class:`ServerConfig` are loaded lazily so that importing
:mod:`shardeval.testing.models` (the quickstart's ``provider: python`` model) does not pay for
importing aiohttp.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shardeval.testing.server import ServerConfig, TestServer

__all__ = ["ServerConfig", "TestServer"]


def __getattr__(name: str) -> Any:
    """Import the server module on first use of one of its exports."""
    if name in __all__:
        from shardeval.testing import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
