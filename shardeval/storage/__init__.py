"""Storage of runs: one layout (:class:`RunStore`) over interchangeable backends.

``store.py`` decides which file of a run is where; a backend (``local.py`` for local disk,
``objects.py`` for fsspec object stores) decides how a file becomes visible whole. A new kind
of storage is a new :class:`~shardeval.storage.backend.Backend` subclass plus one line in
:func:`~shardeval.storage.store.open_backend`.
"""

from shardeval.storage.backend import PARQUET_COMPRESSION, Backend
from shardeval.storage.local import LocalBackend
from shardeval.storage.objects import READ_CONCURRENCY, ObjectStoreBackend, S3Backend
from shardeval.storage.store import RunStore, open_backend, split_url

__all__ = [
    "PARQUET_COMPRESSION",
    "READ_CONCURRENCY",
    "Backend",
    "LocalBackend",
    "ObjectStoreBackend",
    "RunStore",
    "S3Backend",
    "open_backend",
    "split_url",
]
