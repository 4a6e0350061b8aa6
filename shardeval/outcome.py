"""What became of one request: the record the engine hands to a batch, one per request."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from shardeval.errors import ProviderError, TransientProviderError

OutcomeStatus = Literal["ok", "error", "transient", "cancelled"]


@dataclass(slots=True)
class Outcome:
    """What became of one request. Only ``ok`` and ``error`` are stored as final.

    Not frozen: a frozen dataclass sets each of its twelve fields through
    ``object.__setattr__``, and one is built per request on the engine's thread. Nothing
    changes an outcome after it is made.
    """

    key: str
    status: OutcomeStatus
    response: str | None = None
    error: str | None = None
    error_kind: str | None = None
    http_status: int | None = None
    latency_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    attempts: int = 0
    finished_at: float = 0.0

    @property
    def is_final(self) -> bool:
        """Whether the outcome may be stored (transient and cancelled ones are retried later)."""
        return self.status in ("ok", "error")

    @classmethod
    def failed(
        cls,
        key: str,
        status: OutcomeStatus,
        exc: ProviderError,
        attempts: int,
        *,
        latency_s: float | None = None,
    ) -> Outcome:
        """A request that ended on ``exc`` (``error``: stored as a row; ``transient``: not)."""
        return cls(
            key=key,
            status=status,
            error=exc.message,
            error_kind=error_kind(exc),
            http_status=exc.status,
            latency_s=latency_s,
            attempts=attempts,
            finished_at=time.time(),
        )


def error_kind(exc: ProviderError) -> str:
    """The ``error_kind`` column: ``http_<status>``, else transient or error."""
    if exc.status is not None:
        return f"http_{exc.status}"
    return "transient" if isinstance(exc, TransientProviderError) else "error"
