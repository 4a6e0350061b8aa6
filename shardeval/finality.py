"""Which stored rows are final: the one rule the runner, the survey and the CLI share.

A row is final (never sent again, unless ``--retry-failed``) when its status is ``ok`` or
``error``, except an error that was an HTTP 401/403 (or a proxy's 407). Such a row says the
key (or the proxy's login) was missing or wrong, not that the item failed; this version never
stores one (the run stops with exit 2 instead), but earlier versions did, and after the key
is set the same command must send those items again.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

AUTH_STATUSES = (401, 403, 407)
AUTH_KINDS = tuple(f"http_{status}" for status in AUTH_STATUSES)
FINAL_STATUSES = ("ok", "error")


def is_final(status: str | None, http_status: int | None = None) -> bool:
    """Whether a row with this status (and HTTP status) stands as the item's result."""
    return status in FINAL_STATUSES and not (status == "error" and http_status in AUTH_STATUSES)


def auth_mask(table: pa.Table) -> pa.ChunkedArray | pa.Array:
    """True for the rows stored as a 401/403 error (tables without ``http_status``: none)."""
    if "http_status" not in table.column_names:
        return pa.array([False] * table.num_rows)
    hit = pc.is_in(table.column("http_status"), value_set=pa.array(AUTH_STATUSES, pa.int64()))
    return pc.fill_null(pc.and_(pc.equal(table.column("status"), "error"), hit), False)


def drop_auth_rows(table: pa.Table) -> pa.Table:
    """``table`` without its 401/403 rows."""
    mask = auth_mask(table)
    return table if not pc.any(mask).as_py() else table.filter(pc.invert(mask))


def has_auth_rows(table: pa.Table) -> bool:
    """Whether ``table`` holds a 401/403 row."""
    return bool(table.num_rows) and bool(pc.any(auth_mask(table)).as_py())


def summary_has_auth_errors(summary: Any) -> bool:
    """Whether a metrics.json counted 401/403 errors (written by an earlier version)."""
    if not isinstance(summary, dict):
        return False
    kinds = summary.get("errors_by_kind")
    return isinstance(kinds, dict) and any(kinds.get(kind) for kind in AUTH_KINDS)
