"""Object-store plumbing under :class:`shardeval.storage.RunStore`: options, errors, blocks.

Three things that only matter when a run lives in S3 (or GCS, or Azure):

* **Bounded retries.** s3fs and botocore retry on their own, with defaults that make a store
  that stays down take anything from 10 s to several minutes to give up. shardeval sets them
  explicitly for ``s3://`` (botocore's ``standard`` retry mode: exponential backoff with jitter)
  so an outage ends the run in a predictable time, and lets the environment tune them:

  ``SHARDEVAL_STORAGE_RETRIES`` (default 6)
      retries of one S3 request after its first attempt (connection errors, timeouts, 5xx,
      throttling); ``0`` fails at the first error. ``AWS_MAX_ATTEMPTS``/``AWS_RETRY_MODE``
      are used instead when they are set and this is not.
  ``SHARDEVAL_STORAGE_TIMEOUT_S`` (default: s3fs's 5 s to connect, 15 s to read)
      seconds to wait for a connection and for an answer, per attempt.

  Options given explicitly (``config_kwargs`` in storage options) win over both.
  Uploads are sent without ``Expect: 100-continue`` (see :func:`tune_filesystem`), and
  whole-file reads are one GET (s3fs's ``max_concurrency=1``; it adds a HEAD otherwise).
* **Backend errors.** botocore's connection errors are not ``OSError``; :func:`backend_errors`
  lists what a filesystem may raise when the store fails, so callers can say "storage failed"
  instead of crashing with a traceback.
* **Prefect blocks.** ``block://s3-bucket/NAME[/sub/path]`` names a saved prefect-aws
  ``S3Bucket`` block: its bucket, folder and credentials are used, in memory only.
"""

from __future__ import annotations

import os
import posixpath
import sys
import threading
from typing import Any

from shardeval.envvars import env_number
from shardeval.errors import StorageError

RETRIES_ENV = "SHARDEVAL_STORAGE_RETRIES"
TIMEOUT_ENV = "SHARDEVAL_STORAGE_TIMEOUT_S"
DEFAULT_RETRIES = 6
S3FS_ATTEMPTS = 1
"""s3fs's own retry loops (nested: up to three deep for a read) would multiply botocore's
attempts; botocore alone retries, so that N retries mean N+1 attempts."""

S3_UPLOAD_CONCURRENCY = 8
"""Parts of one multipart upload in flight at once (results.parquet above ~50 MiB)."""

S3_PROTOCOLS = ("s3", "s3a")
BLOCK_PROTOCOL = "block"

_OPTIONAL_ERRORS = (
    ("botocore.exceptions", "BotoCoreError"),
    ("botocore.exceptions", "ClientError"),
    ("aiohttp", "ClientError"),
    ("google.auth.exceptions", "GoogleAuthError"),
    ("azure.core.exceptions", "AzureError"),
)


def backend_errors() -> tuple[type[BaseException], ...]:
    """Exception types a filesystem raises when the store (not our code) fails.

    Only modules already imported are consulted: a backend that was never loaded cannot have
    raised anything.
    """
    errors: list[type[BaseException]] = [OSError, RuntimeError, ValueError]
    for module_name, name in _OPTIONAL_ERRORS:
        module = sys.modules.get(module_name)
        error = getattr(module, name, None) if module is not None else None
        if isinstance(error, type) and issubclass(error, BaseException):
            errors.append(error)
    return tuple(errors)


def describe_error(exc: BaseException) -> str:
    """A store's error in a line: which endpoint failed how, without repeating the path.

    botocore's connection errors quote the whole request URL, which the caller already names.
    """
    endpoint = getattr(exc, "kwargs", {}).get("endpoint_url") if hasattr(exc, "kwargs") else None
    if isinstance(endpoint, str) and "://" in endpoint:
        scheme, rest = endpoint.split("://", 1)
        where = f"{scheme}://{rest.split('/', 1)[0]}"
        name = type(exc).__name__
        if "Timeout" in name:
            return f"{name}: no answer from {where} in time"
        return f"{name}: could not connect to {where}"
    return f"{type(exc).__name__}: {exc}"


def filesystem_options(protocol: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """Storage options for ``protocol`` with shardeval's defaults filled in.

    Object stores get ``use_listings_cache=False``: a listing must show what other processes
    wrote since (a stale listing would make a resume send stored items again). ``s3://`` gets
    the retry and timeout settings described in the module docstring.
    """
    merged = dict(options or {})
    if protocol in ("file", "local"):
        return merged
    merged.setdefault("use_listings_cache", False)
    if protocol not in S3_PROTOCOLS:
        return merged
    # s3fs reads a whole file as HEAD (for its size) + GET when max_concurrency > 1; the run's
    # files are small, so one GET each (uploads pass their own concurrency).
    merged.setdefault("max_concurrency", 1)
    config = dict(merged.get("config_kwargs") or {})
    retries = env_number(RETRIES_ENV, int, minimum=0, error=StorageError)
    botocore_env = os.environ.get("AWS_MAX_ATTEMPTS") or os.environ.get("AWS_RETRY_MODE")
    if retries is None and not botocore_env:
        retries = DEFAULT_RETRIES
    if retries is not None:
        config.setdefault("retries", {"total_max_attempts": retries + 1, "mode": "standard"})
    timeout = env_number(TIMEOUT_ENV, float, minimum=0.001, error=StorageError)
    if timeout is not None:
        config.setdefault("connect_timeout", timeout)
        config.setdefault("read_timeout", timeout)
    merged["config_kwargs"] = config
    return merged


def tune_filesystem(fs: Any, protocol: str) -> None:
    """What cannot be passed to s3fs's constructor: its retry loops, and no 100-continue.

    botocore sends ``Expect: 100-continue`` with every upload, and aiohttp waits for the
    interim answer without any timeout: a store that accepts connections but hangs (frozen,
    overloaded) would hang the run forever. Without the header the read timeout applies.
    """
    if protocol not in S3_PROTOCOLS or not hasattr(fs, "retries"):
        return
    fs.retries = S3FS_ATTEMPTS
    if getattr(fs, "_shardeval_tuned", False) or getattr(fs, "asynchronous", False):
        return
    fs.s3.meta.events.register_last("before-call.s3", _drop_expect_header)
    fs._shardeval_tuned = True


def _drop_expect_header(params: dict[str, Any], **kwargs: Any) -> None:
    params.get("headers", {}).pop("Expect", None)


# ------------------------------------------------------------------------- Prefect blocks
_block_cache: dict[str, tuple[str, dict[str, Any]]] = {}
_block_lock = threading.Lock()


def resolve_block(url: str) -> tuple[str, str, dict[str, Any]]:
    """``block://s3-bucket/NAME[/sub]`` → ("s3", "bucket/folder/sub", storage options).

    The block is loaded once per process (every batch task rebuilds its store); the
    credentials it holds stay in memory and are never written anywhere.
    """
    rest = url.split("://", 1)[1].strip("/")
    parts = rest.split("/", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise StorageError(
            f"cannot use output {url!r}: expected block://s3-bucket/NAME[/path]",
        )
    block_type, name = parts[0], parts[1]
    sub = parts[2] if len(parts) > 2 else ""
    if block_type != "s3-bucket":
        raise StorageError(
            f"cannot use output {url!r}: block type {block_type!r} is not supported",
            hint="use an S3Bucket block (block://s3-bucket/NAME), or an s3://, gs:// or az:// URL",
        )
    key = f"{block_type}/{name}"
    with _block_lock:
        if key not in _block_cache:
            _block_cache[key] = _load_s3_bucket(name)
        base, options = _block_cache[key]
    return "s3", posixpath.join(base, sub).rstrip("/"), dict(options)


def _load_s3_bucket(name: str) -> tuple[str, dict[str, Any]]:
    try:
        from prefect_aws import S3Bucket
    except ImportError as exc:
        raise StorageError(
            f"cannot load the S3Bucket block {name!r}: prefect-aws is not installed",
            hint="pip install 'shardeval[s3]'",
        ) from exc
    try:
        # _sync: a plain call even when an event loop runs in this thread (Prefect's dispatch).
        block: Any = S3Bucket.load(name, _sync=True)  # type: ignore[call-arg]
    except ValueError as exc:
        raise StorageError(
            f"there is no S3Bucket block named {name!r} on the Prefect server",
            hint="create it in the Prefect UI (Blocks) or with S3Bucket(...).save(name); "
            "check PREFECT_API_URL",
        ) from exc
    base = posixpath.join(block.bucket_name, (block.bucket_folder or "").strip("/")).rstrip("/")
    return base, credentials_options(block.credentials)


def credentials_options(credentials: Any) -> dict[str, Any]:
    """s3fs storage options from a prefect-aws ``AwsCredentials`` or ``MinIOCredentials``."""
    options: dict[str, Any] = {}
    client_kwargs: dict[str, Any] = {}
    region = getattr(credentials, "region_name", None)
    if region:
        client_kwargs["region_name"] = region
    params = getattr(credentials, "aws_client_parameters", None)
    if params is not None:
        if getattr(params, "endpoint_url", None):
            options["endpoint_url"] = params.endpoint_url
        if getattr(params, "use_ssl", True) is False:
            options["use_ssl"] = False
        if getattr(params, "verify", True) is False:
            client_kwargs["verify"] = False
        elif getattr(params, "verify_cert_path", None):
            client_kwargs["verify"] = str(params.verify_cert_path)
    if hasattr(credentials, "minio_root_user"):
        options["key"] = credentials.minio_root_user
        options["secret"] = _secret(credentials.minio_root_password)
    elif getattr(credentials, "assume_role_arn", None):
        # Temporary credentials of the assumed role (they expire: fine for a run of hours).
        frozen = credentials.get_boto3_session().get_credentials().get_frozen_credentials()
        options.update(key=frozen.access_key, secret=frozen.secret_key, token=frozen.token)
    elif getattr(credentials, "aws_access_key_id", None):
        options["key"] = credentials.aws_access_key_id
        options["secret"] = _secret(credentials.aws_secret_access_key)
        if getattr(credentials, "aws_session_token", None):
            options["token"] = credentials.aws_session_token
    elif getattr(credentials, "profile_name", None):
        options["profile"] = credentials.profile_name
    if client_kwargs:
        options["client_kwargs"] = client_kwargs
    return options


def _secret(value: Any) -> Any:
    return value.get_secret_value() if hasattr(value, "get_secret_value") else value
