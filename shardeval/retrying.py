"""Retry timing for the engine: exponential backoff with jitter that honours ``Retry-After``.

The engine makes a request's first attempt without tenacity (almost every request succeeds
the first time, and tenacity's per-request objects cost CPU at thousands of answers a
second); a request that failed enters :func:`retry_loop`, tenacity's loop for the rest.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from shardeval.errors import TransientProviderError

MAX_BACKOFF_S = 60.0


class Tries:
    """How many times one request was sent (its attempts, over retries), and its slot.

    ``holding``: the request was given a slot before its task ran (a queued request), and
    its first attempt has not taken charge of it yet. A task cancelled before its first
    step (a stop abandoning what is in flight) never runs the attempt that would give the
    slot back, so whoever ends the task releases it then.
    """

    __slots__ = ("holding", "sent")

    def __init__(self, *, holding: bool = False) -> None:
        self.sent = 0
        self.holding = holding


def first_retry_delay(exc: TransientProviderError) -> float:
    """The wait after a first failure: ``Retry-After`` if given, else 0.5 s plus up to 1 s.

    tenacity's ``wait_exponential_jitter(initial=0.5)`` at attempt 1, which the retry loop
    (entered only after that failure) cannot compute for itself.
    """
    if exc.retry_after is not None:
        return min(MAX_BACKOFF_S, max(float(exc.retry_after), 0.0))
    return 0.5 + random.uniform(0, 1)


def honouring_retry_after(
    base: Callable[[RetryCallState], float],
) -> Callable[[RetryCallState], float]:
    """Wait ``base`` between attempts, or the server's ``Retry-After`` when it gave one."""

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return min(MAX_BACKOFF_S, max(float(retry_after), 0.0))
        return float(base(state))

    return wait


def retry_loop(retries: int, sleep: Callable[[float], Awaitable[None]]) -> AsyncRetrying:
    """Tenacity's loop for the ``retries`` attempts after a failed first one.

    Attempt n of this loop is the request's attempt n + 1, so its backoff starts at twice the
    first one's (``initial=1.0`` = 0.5 · 2): the same schedule as one loop over every attempt.
    """
    return AsyncRetrying(
        retry=retry_if_exception_type(TransientProviderError),
        stop=stop_after_attempt(retries),
        wait=honouring_retry_after(wait_exponential_jitter(initial=1.0, max=30.0)),
        sleep=sleep,
        reraise=True,
    )
