"""The engine's batch path for in-process providers: a batch's calls without per-request tasks.

A sync python provider answers in microseconds, so what a request costs is the engine's own
bookkeeping: a task, a tenacity retry loop, a slot, three context managers, two callbacks
(about 0.1 ms of CPU each, most of a million-item run). For such a provider
(``provider.batchable``; no Prefect limit, no endpoint limit shared with other runs) the
engine hands a batch's new requests here, and they go out in chunks of at most
``model.concurrency``, with the same guarantees as one by one:

* **concurrency**: a chunk holds one engine slot per request while it runs, so at most
  ``model.concurrency`` calls are in flight across all batches of the run;
* **stops**: before each chunk, a stopped run (signal, budget, lost lease) sends nothing
  more; the requests left end ``cancelled`` or not sent, as the per-request path ends them;
  the lease and the storage backlog are checked (``_wait_to_send``) before each chunk
  is sent;
* **retries**: a request whose call raised a transient error goes through the per-request
  path (``Engine._run``, tenacity's backoff and ``max_retries`` retries after it);
* **outcomes and cost**: the same :class:`~shardeval.engine.Outcome` fields (latency is the
  call's own), ``budget.charge`` per answer.

Identical requests are still sent once (the engine asks its shared answers first and hands
over only the requests no row is waiting for yet), and a stop's grace period abandons the
chunk task (``_inflight``) like any request.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any

from shardeval import budget, endpoint_limits, interrupt
from shardeval.errors import PermanentProviderError
from shardeval.outcome import Outcome
from shardeval.providers.base import Completion, ProviderRequest

if TYPE_CHECKING:
    from shardeval.answers import Answer
    from shardeval.engine import Engine

Pending = tuple[int, ProviderRequest, "Answer"]
"""``(position in the batch, request, the answer its rows wait for)``."""


def batch_path(engine: Engine) -> bool:
    """Whether the engine's requests may take the batch path (see the module docstring)."""
    provider: Any = engine._provider
    return (
        bool(getattr(provider, "batchable", False))
        and engine._prefect_limit is None
        and endpoint_limits.semaphore(engine._endpoint) is None
    )


def start_batch(
    engine: Engine,
    requests: Sequence[ProviderRequest],
    batch: int,
    on_done: Callable[[Outcome], None],
    shared: AbstractSet[str],
) -> None:
    """``Engine._start_batch`` for this path: ask the shared answers, send the new requests.

    One task sends the batch's requests that no row is waiting for yet; it is tracked in the
    engine's ``_inflight``, so a stop's grace period abandons it like any request.
    """
    pending: list[Pending] = []
    for position, request in enumerate(requests):
        answer = engine._answers.ask(request.key, on_done, request.key in shared)
        if answer is not None:  # the first row to ask: send it (else that answer serves it)
            pending.append((position, request, answer))
    if pending:
        sending = engine._loop.create_task(send_batch(engine, pending, batch))
        engine._inflight.add(sending)
        sending.add_done_callback(engine._inflight.discard)


async def send_batch(engine: Engine, pending: Sequence[Pending], batch: int) -> None:
    """Send ``pending`` in chunks; resolve each future with its outcome (see the docstring)."""
    done = 0
    try:
        while done < len(pending):
            done += await _send_chunk(engine, pending[done:], batch)
    except asyncio.CancelledError:
        for _, request, answer in pending[done:]:  # never stored: the rerun sends them
            _settle(engine, request, answer, Outcome(request.key, "cancelled", error="stopped"))
        raise


async def _send_chunk(engine: Engine, pending: Sequence[Pending], batch: int) -> int:
    """Send the next chunk of ``pending``; return how many requests it ended.

    The chunk waits for one slot, then takes as many more as are free at once (at most
    ``model.concurrency``): waiting for a second slot while holding one could deadlock
    against another batch doing the same.
    """
    if _stopped(engine, pending):
        return len(pending)
    await engine._slots.acquire((batch, pending[0][0]))
    acquired = 1
    try:
        limit = min(len(pending), max(1, engine.model.concurrency))
        while acquired < limit and engine._slots.try_acquire():
            acquired += 1
        chunk = pending[:acquired]
        stop = interrupt.stop_for(engine.run_id)
        if not stop.may_send():
            await engine._wait_to_send(stop)
        if _stopped(engine, chunk):
            return len(chunk)
        provider: Any = engine._provider
        results = await provider.complete_many([request for _, request, _ in chunk])
    finally:
        for _ in range(acquired):
            engine._slots.release()
    now = time.time()
    for (position, request, answer), (result, seconds) in zip(chunk, results, strict=True):
        if isinstance(result, Completion):
            tokens = (result.prompt_tokens, result.completion_tokens)
            budget.charge(engine.run_id, engine.model, *tokens)
            _settle(
                engine,
                request,
                answer,
                Outcome.answered(
                    request.key, result, latency_s=seconds, attempts=1, finished_at=now
                ),
            )
        elif isinstance(result, PermanentProviderError) and result.status not in AUTH:
            failed = Outcome.failed(request.key, "error", result, 1, latency_s=seconds)
            _settle(engine, request, answer, failed)
        else:  # transient (or a 401/403): the per-request path retries and classifies it
            _retry(engine, request, (batch, position), answer)

    return len(chunk)


def _stopped(engine: Engine, chunk: Sequence[Pending]) -> bool:
    """End the chunk's requests as the per-request path would if the run has stopped."""
    if engine.stopping():
        for _, request, answer in chunk:
            _settle(engine, request, answer, Outcome(key=request.key, status="cancelled"))
        return True
    if engine.stop_error is not None:
        for _, request, answer in chunk:
            _settle(engine, request, answer, engine._not_sent(request, 0))
        return True
    return False


def _settle(engine: Engine, request: ProviderRequest, answer: Answer, outcome: Outcome) -> None:
    """Deliver an outcome to every row waiting for this request (shared answers)."""
    engine._answers.settle(request.key, answer, outcome)


def _retry(
    engine: Engine, request: ProviderRequest, priority: tuple[int, int], answer: Answer
) -> None:
    """The per-request path for one request (backoff, ``max_retries``), as ``_start`` runs it."""
    task = engine._loop.create_task(engine._run(request, priority))
    engine._inflight.add(task)
    task.add_done_callback(functools.partial(engine._settle, request.key, answer, None))


AUTH = frozenset({401, 403})
