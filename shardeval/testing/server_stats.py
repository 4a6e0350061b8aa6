"""What the test server counts (``GET /stats``), and the per-prompt key the counts are kept by.

Tests of a resumable evaluator assert *how many* calls were made, and for which prompts: the
counters are that record, and :func:`prompt_key` lets a test compute the key of the messages it
expects shardeval to send.
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass, field
from typing import Any

from shardeval.hashing import canonical_json

PROMPT_KEY_CHARS = 16


def prompt_key(messages: Any) -> str:
    """The key of one prompt in the per-prompt counters.

    It is the sha256 of the repository's canonical JSON of the messages (16 hex characters), so
    a test can compute the key of the messages it expects shardeval to send and look it up in
    ``stats()["prompts"]``.

    Args:
        messages: The ``messages`` list exactly as sent in the request body.

    Returns:
        16 lowercase hex characters.
    """
    encoded = canonical_json(messages).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()[:PROMPT_KEY_CHARS]


@dataclass
class RequestCounters:
    """What tests assert on; one instance per server, mutated only on its event loop."""

    requests: int = 0
    by_status: collections.Counter[int] = field(default_factory=collections.Counter)
    completions: int = 0
    cancelled: int = 0
    prompts: collections.Counter[str] = field(default_factory=collections.Counter)
    prompt_completions: collections.Counter[str] = field(default_factory=collections.Counter)
    in_flight: int = 0
    max_in_flight: int = 0
    first_request_at: float | None = None
    """Wall-clock time (epoch seconds) of the first chat request since the last reset."""
    last_completion_at: float | None = None
    """Wall-clock time of the latest successful answer: benchmarks time phases from these
    two instead of polling the counters (which costs the server CPU while it is measured)."""

    def reset(self) -> None:
        """Zero everything except the live ``in_flight`` gauge (running handlers still finish)."""
        self.requests = 0
        self.by_status.clear()
        self.completions = 0
        self.cancelled = 0
        self.prompts.clear()
        self.prompt_completions.clear()
        self.max_in_flight = self.in_flight
        self.first_request_at = None
        self.last_completion_at = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready snapshot (status codes become string keys, as JSON requires)."""
        return {
            "requests": self.requests,
            "by_status": {str(status): n for status, n in sorted(self.by_status.items())},
            "completions": self.completions,
            "cancelled": self.cancelled,
            "prompts": dict(self.prompts),
            "prompt_completions": dict(self.prompt_completions),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "first_request_at": self.first_request_at,
            "last_completion_at": self.last_completion_at,
        }
