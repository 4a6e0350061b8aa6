"""Where a dataset's bytes come from: its format, its compression, and opening it through fsspec.

The format and the compression are read from the file name (``train.jsonl.gz`` is gzipped
JSONL) unless the spec declares the format. Opening goes through fsspec, so any URL it knows
works; its errors, and those of the stores behind it (botocore, aiohttp), become
:class:`~shardeval.errors.DatasetError` or :class:`~shardeval.errors.StorageError` with a
message that names the file. Every URL shown in a message goes through :func:`redact_url`.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.utils import infer_compression

from shardeval.errors import DatasetError, ShardevalError, StorageError
from shardeval.objectstore import filesystem_options, tune_filesystem

FORMATS = ("jsonl", "json", "csv", "parquet")
"""The formats a dataset can have (besides ``auto``)."""

_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_COMPRESSION_EXTENSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".xz": "xz"}


def detect_format(url: str, declared: str) -> str:
    """The dataset's format: ``declared`` unless it is ``auto``, else from the file extension.

    A compression extension (``.gz``, ``.bz2``, ``.zst``, ``.xz``) is looked through, so
    ``train.jsonl.gz`` is JSONL; :func:`~shardeval.datasets.read_dataset` decompresses it.

    Raises:
        DatasetError: ``auto`` and an extension that names no known format, or an unknown
            declared format.
    """
    if declared != "auto":
        if declared not in FORMATS:
            raise DatasetError(
                f"unknown dataset format {declared!r}; known formats: auto, {', '.join(FORMATS)}"
            )
        return declared
    stem, _compression = _split_compression(_file_name(url).lower())
    dot = stem.rfind(".")
    extension = stem[dot:] if dot > 0 else ""
    if extension in _EXTENSIONS:
        return _EXTENSIONS[extension]
    known = ", ".join(f"{ext} ({fmt})" for ext, fmt in _EXTENSIONS.items())
    raise DatasetError(
        f"cannot tell the format of {redact_url(url)} from its extension "
        f"{extension or '(none)'!r}; known extensions: {known}, each optionally compressed "
        f"({', '.join(_COMPRESSION_EXTENSIONS)})",
        hint=f"set dataset.format in the spec to one of: {', '.join(FORMATS)}",
    )


def store_error(exc: Exception, shown: str) -> ShardevalError | None:
    """A dataset store's failure that is not an ``OSError`` (botocore, aiohttp), or None.

    Missing or invalid credentials are the user's to fix (a DatasetError, exit 2); a store
    that cannot be reached is a StorageError (exit 1): the same command works once it is back.
    """
    botocore = sys.modules.get("botocore.exceptions")
    aiohttp = sys.modules.get("aiohttp")
    credential_errors = tuple(
        getattr(botocore, name)
        for name in ("NoCredentialsError", "PartialCredentialsError", "ProfileNotFound")
        if botocore is not None and hasattr(botocore, name)
    )
    if credential_errors and isinstance(exc, credential_errors):
        return DatasetError(
            f"cannot read dataset {shown}: {exc}",
            hint="set credentials for the store (environment variables, a profile, an "
            "instance role) or dataset.storage_options in the spec",
        )
    store_errors: tuple[type[BaseException], ...] = tuple(
        error
        for error in (
            getattr(botocore, "BotoCoreError", None),
            getattr(aiohttp, "ClientError", None),
        )
        if isinstance(error, type)
    )
    if store_errors and isinstance(exc, store_errors):
        return StorageError(
            f"cannot read dataset {shown}: the store failed: {type(exc).__name__}: {exc}",
            hint="check that the store is reachable (AWS_ENDPOINT_URL, network) and rerun",
        )
    return None


def redact_url(url: str) -> str:
    """``url`` without credentials: user:password and query-string values are removed.

    Messages and stored metadata print dataset URLs, and a URL such as
    ``https://user:token@host/data.jsonl?sig=...`` must not leak what it carries.
    """
    return "::".join(_redact_one(part) for part in url.split("::"))


def _redact_one(url: str) -> str:
    if "://" not in url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = re.sub(r"=[^&]*", "=***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


# -- opening -------------------------------------------------------------------------------


def _file_name(url: str) -> str:
    """The name of the file ``url`` reads, for its extensions.

    In an fsspec chain the file read is named by the first segment that has a path
    (``zip://inner.csv::s3://b/a.zip`` reads ``inner.csv``; ``simplecache::s3://b/x.csv``
    reads ``x.csv``). A query string (``?token=...``) is not part of the name.
    """
    for segment in url.split("::"):
        if "://" in segment or "/" in segment or "." in segment:
            path = segment.split("://", 1)[-1]
            return path.rsplit("/", 1)[-1].split("?", 1)[0]
    return url


def _split_compression(name: str) -> tuple[str, str | None]:
    for extension, compression in _COMPRESSION_EXTENSIONS.items():
        if name.endswith(extension):
            return name[: -len(extension)], compression
    return name, None


@contextmanager
def open_dataset_file(url: str, shown: str, storage_options: dict[str, Any]) -> Iterator[IO[bytes]]:
    """Open ``url`` for binary reading, turning fsspec's errors into DatasetErrors."""
    name = _file_name(url)
    _, compression = _split_compression(name.lower())
    if compression is not None and infer_compression(name) is None:
        raise DatasetError(
            f"cannot decompress {shown}: fsspec has no {compression} codec installed",
            hint="pip install zstandard" if compression == "zstd" else None,
        )
    if "://" in url and "::" not in url:  # one filesystem: shardeval's retry/timeout settings
        storage_options = filesystem_options(url.split("://", 1)[0], storage_options)
    try:
        opened = fsspec.open(url, "rb", compression="infer", **storage_options)
        tune_filesystem(opened.fs, url.split("://", 1)[0] if "://" in url else "file")
        handle = opened.open()
    except FileNotFoundError as exc:
        raise DatasetError(
            f"dataset not found: {shown}",
            hint="check dataset.path in the spec; a relative path is resolved against the "
            "directory of the spec file",
        ) from exc
    except (OSError, ValueError, ImportError) as exc:  # ValueError: unknown protocol
        raise DatasetError(f"cannot open dataset {shown}: {exc}") from exc
    except Exception as exc:
        error = store_error(exc, shown)
        if error is None:
            raise
        raise error from exc
    with handle:
        yield handle
