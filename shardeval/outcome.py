"""What became of one request: the record the engine hands to a batch, one per request."""

from __future__ import annotations

import operator
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from shardeval.errors import ProviderError, TransientProviderError

if TYPE_CHECKING:
    from shardeval.providers.base import Completion

OutcomeStatus = Literal["ok", "error", "transient", "cancelled"]
_SURROGATE = re.compile("[\ud800-\udfff]")


def storable(text: str) -> str:
    r"""``text`` as UTF-8 can hold it: a surrogate pair joined, a lone surrogate as U+FFFD.

    A Python string may hold surrogates (half an emoji cut by a token limit, a function that
    builds text from UTF-16), but the journal and Parquet store UTF-8, which has no code for
    them: left in, the batch's file could never be written, and every rerun would fail on the
    same stored answer. Mended once, where an answer or an error becomes an outcome.
    """
    if text.isascii() or _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def token_count(value: object) -> int | None:
    """A token count as an ``int``, or None (unknown) if it is no whole number.

    The answer was paid for and is kept either way: a count a server sent as ``"12"`` (or a
    registered provider passed on) must not make the batch's Parquet write fail, and with it
    every rerun. numpy's integers are ints here; ``True`` is not a count.
    """
    if type(value) is int or value is None:
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        return None
    return operator.index(value)


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
    def answered(
        cls,
        key: str,
        completion: Completion,
        *,
        latency_s: float,
        attempts: int,
        finished_at: float,
    ) -> Outcome:
        """A request the model answered: an ``ok`` row (its fields as Parquet can store them)."""
        reason = completion.finish_reason
        return cls(
            key=key,
            status="ok",
            response=storable(completion.text),
            latency_s=latency_s,
            prompt_tokens=token_count(completion.prompt_tokens),
            completion_tokens=token_count(completion.completion_tokens),
            finish_reason=None if reason is None else storable(str(reason)),
            attempts=attempts,
            finished_at=finished_at,
        )

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
            error=storable(exc.message),
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
