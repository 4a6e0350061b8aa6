"""Identical requests are sent once per run: which rows wait for which request's answer.

An item key (model fingerprint, rendered messages, trial) names one paid call. Rows with the
same key (the same prompt under two ids, in any batches) share that call: a row whose key is
queued or in flight waits for it, and the final answers of keys that other batches of the
run hold too are kept to serve them when they ask.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from shardeval.outcome import Outcome

OnDone = Callable[[Outcome], None]


class Answer:
    """One distinct request of the run: the rows waiting for it, and its kept outcome."""

    __slots__ = ("keep", "on_done", "outcome")

    def __init__(self, on_done: OnDone, keep: bool) -> None:
        self.on_done = [on_done]
        self.keep = keep
        """Whether to keep the final outcome for rows that ask later (other batches)."""
        self.outcome: Outcome | None = None


class SharedAnswers:
    """Item key → its request (queued, in flight, or answered for rows that ask later)."""

    def __init__(self) -> None:
        self._by_key: dict[str, Answer] = {}

    def ask(self, key: str, on_done: OnDone, keep: bool) -> Answer | None:
        """A row asks for ``key``: the :class:`Answer` to send if it is the first, else None.

        A kept answer serves the row at once; a request queued or in flight gets the row as
        one more waiter. ``keep``: other batches of the run hold the key too.
        """
        answer = self._by_key.get(key)
        if answer is None:
            answer = self._by_key[key] = Answer(on_done, keep)
            return answer
        if answer.outcome is not None:
            on_done(answer.outcome)
        else:
            answer.on_done.append(on_done)
            answer.keep = answer.keep or keep
        return None

    def settle(self, key: str, answer: Answer, outcome: Outcome) -> None:
        """The request ended: deliver it to every row that asked; keep it if others will ask."""
        if answer.keep and outcome.is_final:
            answer.outcome = outcome
        elif self._by_key.get(key) is answer:
            del self._by_key[key]
        waiting, answer.on_done = answer.on_done, []
        for on_done in waiting:
            on_done(outcome)


def outcome_of(key: str, task: asyncio.Future[Outcome]) -> Outcome:
    """A finished request's outcome (a stop that abandoned it: ``cancelled``)."""
    if task.cancelled():
        return Outcome(key=key, status="cancelled", error="stopped by a signal")
    error = task.exception()
    if error is not None:  # pragma: no cover - _run returns every failure
        return Outcome(key=key, status="transient", error=f"{type(error).__name__}: {error}")
    return task.result()
