"""The circuit breaker: when an endpoint that stops answering should stop the run."""

from __future__ import annotations

import time

from shardeval.errors import EndpointUnreachable, ProviderError
from shardeval.spec import ModelSpec

BREAKER_FAILURES = 3
"""Connection failures in a row (with ``model.unreachable_after_s`` since the last answer)
that open the breaker; the time condition is the one that matters in practice."""
PROBE_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)
"""Between attempts while the endpoint is suspect (see :class:`Breaker`)."""


class Breaker:
    """Decides when the endpoint is gone: connection failures in a row, for long enough.

    After ``failures`` connection failures in a row the endpoint is *suspect*: requests go
    out one at a time, at growing intervals (``PROBE_DELAYS_S``), instead of every queued
    request trying (and instantly failing) on its own; so a dead endpoint sees about one
    attempt per slot, then a handful of probes. A failure once ``quiet_s`` have passed since
    the last answer opens the breaker (the run stops). Any answer (even a 500 or a 429)
    clears it: the endpoint is there, only failing, and the ordinary retries handle that.
    """

    def __init__(self, quiet_s: float, failures: int = BREAKER_FAILURES) -> None:
        self.quiet_s = quiet_s
        self.failures = failures
        self.in_a_row = 0
        self.last_answer: float | None = None
        """When the endpoint last answered (None: not yet; the clock then starts at the first
        failure, not when the engine was built)."""
        self.next_probe = 0.0
        self._probes = 0

    @property
    def suspect(self) -> bool:
        """Whether requests should go one at a time (recent attempts all failed to connect)."""
        return self.in_a_row >= self.failures

    def answered(self) -> None:
        """The endpoint answered (whatever the status)."""
        self.in_a_row = 0
        self._probes = 0
        self.last_answer = time.monotonic()

    def connection_failed(self) -> bool:
        """Count one failure to connect; return whether the breaker is now open."""
        if self.last_answer is None:
            self.last_answer = time.monotonic()
        self.in_a_row += 1
        if self.suspect:
            delay = PROBE_DELAYS_S[min(self._probes, len(PROBE_DELAYS_S) - 1)]
            self.next_probe = time.monotonic() + delay
            self._probes += 1
        return self.suspect and self.silent_for() >= self.quiet_s

    def silent_for(self) -> float:
        """Seconds since the endpoint last answered (or first failed to, if it never did)."""
        return 0.0 if self.last_answer is None else time.monotonic() - self.last_answer

    def unreachable(
        self, model: ModelSpec, field: str, exc: ProviderError, *, proxy: str | None = None
    ) -> EndpointUnreachable:
        """The error that stops the run once the breaker opened.

        ``field`` is where ``model`` is in the spec; ``proxy`` the proxy the requests went
        through, if any: a proxy that went away fails every connection the same way as the
        endpoint, and the user has to know which of the two to look at.
        """
        base_url = model.base_url or "https://api.openai.com/v1"
        through = f" through the proxy {proxy}" if proxy else ""
        check = f"the proxy {proxy} (from the environment) and " if proxy else ""
        verb = "are" if proxy else "is"
        return EndpointUnreachable(
            f"the endpoint at {base_url} is unreachable{through}: {self.in_a_row} requests "
            f"in a row failed to connect over {self.silent_for():.0f} s (last: "
            f"{exc.message}); stopped sending, finished items are saved",
            hint=f"check that {check}the server at {field}.base_url {verb} up, then run the "
            "same command again to send only what is missing",
        )
