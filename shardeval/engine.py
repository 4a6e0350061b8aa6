"""The request engine: one event loop, one provider, one concurrency limit per run.

Prefect runs each batch task in its own worker thread. If every batch opened its own client
and limit, ``concurrency: 16`` would mean 16 per batch, and connections would not be reused.
Instead each process keeps one :class:`Engine` per run (:mod:`shardeval.engines`): a daemon
thread running an asyncio loop that owns the provider (one aiohttp session) and the slots.
A batch hands over all its requests at once (:meth:`Engine.submit_batch`) and gets each
outcome through a callback; identical requests are sent once (:mod:`shardeval.answers`).

Retries (:mod:`shardeval.retrying`) back off exponentially and honour ``Retry-After``; a 429
with ``Retry-After`` pauses *all* new attempts of the run until then, because in a
rate-limit storm every other request would only earn another 429. Two failures stop the
whole run instead of being paid for item by item (:meth:`Engine.stop_run`): an endpoint that
stops answering (:class:`~shardeval.breaker.Breaker`: exit 1, resumable) and a 401/403 (the
key is missing or wrong: exit 2, naming the variable); neither is stored as a row.
``model.prefect_limit`` adds a limit across processes (:mod:`shardeval.prefect_limit`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

from shardeval import budget, endpoint_limits, engine_batch, finality, interrupt
from shardeval.answers import Answer, SharedAnswers, outcome_of
from shardeval.breaker import Breaker
from shardeval.errors import (
    ConnectionFailedError,
    EndpointError,
    PermanentProviderError,
    ProviderError,
    ShardevalError,
    TransientProviderError,
)
from shardeval.outcome import Outcome
from shardeval.prefect_limit import PrefectLimit, loop_runner, prefect_limit_mode
from shardeval.providers.base import Provider, ProviderRequest, create_provider
from shardeval.retrying import Tries, first_retry_delay, retry_loop
from shardeval.slots import PrioritySlots
from shardeval.spec import ModelSpec

AUTH_STATUSES = frozenset(finality.AUTH_STATUSES)


class Engine:
    """Sends requests for one run through one provider, at most ``concurrency`` at a time."""

    def __init__(self, model: ModelSpec, *, field: str = "model", run_id: str = "") -> None:
        self.model = model
        self.field = field
        """Where ``model`` is in the spec (``model``, or a judge's ``metrics[0].model``)."""
        self.run_id = run_id
        """Whose stop (:func:`shardeval.interrupt.stop_for`) ends this engine's requests."""
        self.stop_error: ShardevalError | None = None
        """Why this run stopped sending (set once by :meth:`stop_run`); None while running."""
        self._breaker = Breaker(model.unreachable_after_s)
        self._endpoint = endpoint_limits.endpoint_key(model)
        self._limit_mode = prefect_limit_mode(model)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=loop_runner(self._loop, with_prefect_settings=self._limit_mode is not None),
            name="shardeval-engine",
            daemon=True,
        )
        self._thread.start()
        self._inflight: set[asyncio.Task[Any]] = set()
        self._answers = SharedAnswers()
        self._closed = False
        self._paused_until = 0.0
        self._provider: Provider = self._call(self._setup()).result()

    async def _setup(self) -> Provider:
        self._slots = PrioritySlots(self.model.concurrency)
        self._stopped = asyncio.Event()
        self._probe = asyncio.Lock()
        self._prefect_limit = (
            PrefectLimit(str(self.model.prefect_limit), self._limit_mode, self.model.timeout_s)
            if self._limit_mode is not None
            else None
        )
        self._watchdog = asyncio.ensure_future(self._watch_interrupt())
        return create_provider(self.model)

    def _call(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def submit(self, request: ProviderRequest) -> concurrent.futures.Future[Outcome]:
        """Queue one request; the future resolves to its :class:`Outcome` (never raises)."""
        future: concurrent.futures.Future[Outcome] = concurrent.futures.Future()
        self.submit_batch([request], 0, future.set_result)
        return future

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (nothing more will be sent)."""
        return self._closed

    def submit_batch(
        self,
        requests: Sequence[ProviderRequest],
        batch: int,
        on_done: Callable[[Outcome], None],
        shared: AbstractSet[str] = frozenset(),
    ) -> None:
        """Queue a batch's requests in one hand-over to the loop; ``on_done`` gets each outcome.

        One call per batch rather than one future per request: at a thousand answers a
        second the per-request hand-over between threads is a good part of the client's CPU.
        ``on_done`` runs on the engine's thread and must be quick and thread-safe (a queue's
        ``put``); it is called exactly once per request, with a ``cancelled`` outcome if the
        engine closes first. Identical requests (same item key) are sent once per run: a
        request whose key is in flight waits for that answer, and the final answers of keys in
        ``shared`` (keys other batches of the run hold too) are kept to serve them later.
        """
        requests = list(requests)
        if not self._closed:
            try:
                self._loop.call_soon_threadsafe(self._start_batch, requests, batch, on_done, shared)
                return
            except RuntimeError:  # the loop has closed meanwhile
                pass
        for request in requests:
            on_done(Outcome(key=request.key, status="cancelled", error="engine closed"))

    def _start_batch(
        self,
        requests: list[ProviderRequest],
        batch: int,
        on_done: Callable[[Outcome], None],
        shared: AbstractSet[str],
    ) -> None:
        """Queue each request for a slot (lowest batch and position first), once per key."""
        if engine_batch.batch_path(self):  # a sync in-process provider: engine_batch.py
            engine_batch.start_batch(self, requests, batch, on_done, shared)
            return
        for position, request in enumerate(requests):
            answer = self._answers.ask(request.key, on_done, request.key in shared)
            if answer is not None:  # the first row to ask: send it
                priority = (batch, position)
                self._slots.start_when_free(
                    priority, functools.partial(self._start, request, priority, answer)
                )

    def _start(self, request: ProviderRequest, priority: tuple[int, int], answer: Answer) -> None:
        """Start a request that now holds a slot: a task, tracked so a stop can abandon it.

        No task exists for a request until it gets its slot, so a batch of thousands queued
        behind ``concurrency`` costs a heap entry each instead of a task and a future.
        """
        if self._closed:  # the slot dies with the engine (releasing it would start the next)
            self._settle(request.key, answer, None, None)
            return
        tries = Tries(holding=True)
        task = self._loop.create_task(self._run(request, priority, tries))
        self._inflight.add(task)
        task.add_done_callback(functools.partial(self._settle, request.key, answer, tries))

    def _settle(
        self,
        key: str,
        answer: Answer,
        tries: Tries | None,
        task: asyncio.Future[Outcome] | None,
    ) -> None:
        """A request ended (None: never started, the engine closed): deliver it."""
        if tries is not None and tries.holding:  # cancelled before its first step
            tries.holding = False
            self._slots.release()
        if task is None:
            outcome = Outcome(key=key, status="cancelled", error="engine closed")
        else:
            self._inflight.discard(task)
            outcome = outcome_of(key, task)
        self._answers.settle(key, answer, outcome)

    async def _run(
        self, request: ProviderRequest, priority: tuple[int, int], tries: Tries | None = None
    ) -> Outcome:
        """One request to its final outcome: a first attempt, then retries if it failed.

        The first attempt is a plain call: tenacity's retry object and its iteration cost
        about a tenth of the engine thread's CPU per request at a thousand answers a second,
        and almost every request succeeds the first time. Only a request whose first attempt
        failed transiently enters tenacity's loop, which then waits and retries as before.
        """
        tries = tries or Tries()
        try:
            return await self._attempt(request, priority, tries)
        except TransientProviderError as exc:
            failure = exc
        if self.model.max_retries < 1 or self.stop_error is not None:
            return self._transient(request, failure, tries)
        await self._backoff(first_retry_delay(failure))
        retrying = retry_loop(self.model.max_retries, self._backoff)
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._attempt(request, priority, tries)
        except TransientProviderError as exc:
            return self._transient(request, exc, tries)
        raise AssertionError("unreachable: tenacity returns or reraises")  # pragma: no cover

    async def _attempt(
        self,
        request: ProviderRequest,
        priority: tuple[int, int],
        tries: Tries,
    ) -> Outcome:
        """One attempt, in a slot (taken here unless ``tries.holding`` one already).

        Raises only :class:`TransientProviderError` (for the retry loop); every other end is
        an outcome.
        """
        stop = interrupt.stop_for(self.run_id)
        if tries.holding:
            tries.holding = False  # no await before the ``try``: its ``finally`` releases it
        else:
            if stop.requested:
                return Outcome(key=request.key, status="cancelled", attempts=tries.sent)
            if self.stop_error is not None:
                return self._not_sent(request, tries.sent)
            await self._slots.acquire(priority)
        try:
            if self._paused_until:
                await self._respect_pause()
            if not stop.may_send():
                await self._wait_to_send(stop)
            if stop.requested:
                return Outcome(key=request.key, status="cancelled", attempts=tries.sent)
            if self.stop_error is not None:
                return self._not_sent(request, tries.sent)
            shared_limit = endpoint_limits.semaphore(self._endpoint)
            if not self._breaker.suspect and self._prefect_limit is None and shared_limit is None:
                return await self._send(request, tries)
            # + one at a time while the endpoint is suspect, the Prefect limit across
            # processes, the endpoint's limit shared with other runs (suite cells)
            async with self._gate(), self._prefect_slot(), endpoint_limits.slot(self.model):
                if self.stop_error is not None:
                    return self._not_sent(request, tries.sent)
                return await self._send(request, tries)
        finally:
            self._slots.release()

    async def _send(self, request: ProviderRequest, tries: Tries) -> Outcome:
        """Make the call and classify what came back (the breaker and a 429's pause learn)."""
        tries.sent += 1
        started = time.perf_counter()
        try:
            completion = await self._provider.complete(request)
        except ConnectionFailedError as exc:
            if self._breaker.connection_failed():
                proxy = getattr(self._provider, "proxy_label", None)
                self.stop_run(self._breaker.unreachable(self.model, self.field, exc, proxy=proxy))
            raise
        except TransientProviderError as exc:
            self._breaker.answered()
            if exc.status == 429 and exc.retry_after:
                self._paused_until = max(self._paused_until, time.monotonic() + exc.retry_after)
            raise
        except PermanentProviderError as exc:
            self._breaker.answered()
            if exc.status in AUTH_STATUSES:
                # A configuration error, not this item's: never a row.
                self.stop_run(self._auth_error(exc))
                return self._not_sent(request, tries.sent, exc)
            return Outcome.failed(
                request.key, "error", exc, tries.sent, latency_s=time.perf_counter() - started
            )
        self._breaker.answered()
        budget.charge(
            self.run_id, self.model, completion.prompt_tokens, completion.completion_tokens
        )
        return Outcome.answered(
            request.key,
            completion,
            latency_s=time.perf_counter() - started,
            attempts=tries.sent,
            finished_at=time.time(),
        )

    def _transient(
        self, request: ProviderRequest, exc: TransientProviderError, tries: Tries
    ) -> Outcome:
        """Out of attempts (or stopped) on a passing failure: never stored, the rerun sends it."""
        if self.stop_error is not None:
            return self._not_sent(request, tries.sent, exc)
        return Outcome.failed(request.key, "transient", exc, tries.sent)

    def stop_run(self, error: ShardevalError) -> None:
        """Stop sending for this run, for ``error`` (the breaker opened, or a 401/403).

        Requests waiting for a slot or a retry end at once as not sent (never stored); each
        batch then raises ``error`` (see :meth:`raise_if_stopped`) and the flow reports it.
        The run-wide stop (:func:`shardeval.interrupt.stop_run`) is set too, so every batch of
        the run, its judges and the flow stop taking work, in this process and on its path.
        """
        if self.stop_error is None:
            self.stop_error = error
            self._stopped.set()
            if isinstance(error, EndpointError):
                interrupt.stop_run(self.run_id, "auth_failed", error.message, cause=error)
            else:
                interrupt.stop_run(self.run_id, "endpoint_unreachable", error.message, cause=error)

    def raise_if_stopped(self) -> None:
        """Raise (a fresh copy of) the error that stopped this run, if one did."""
        error = self.stop_error
        if error is not None:
            raise type(error)(error.message, hint=error.hint)

    def _not_sent(
        self, request: ProviderRequest, attempts: int, exc: ProviderError | None = None
    ) -> Outcome:
        """A request the stopped run did not finish: transient, so it is never stored."""
        if exc is not None:
            return Outcome.failed(request.key, "transient", exc, attempts)
        error = self.stop_error
        return Outcome(
            key=request.key,
            status="transient",
            error=error.message if error else None,
            error_kind="not_sent",
            attempts=attempts,
            finished_at=time.time(),
        )

    def _auth_error(self, exc: ProviderError) -> ShardevalError:
        # Imported here: aiohttp is not needed by a run whose model is a python function.
        from shardeval.preflight import Endpoint, auth_error
        from shardeval.providers.http import proxy_login_error

        status = exc.status or 401
        if status == 407:
            return proxy_login_error(Endpoint(self.model, self.field).base_url, self.field)
        return auth_error(self.model, self.field, status, exc.message.split(": ", 1)[-1])

    @contextlib.asynccontextmanager
    async def _gate(self) -> AsyncIterator[None]:
        """While the endpoint is suspect, one request at a time, at the breaker's pace."""
        if not self._breaker.suspect:
            yield
            return
        async with self._probe:
            if self._breaker.suspect:
                await self._backoff(self._breaker.next_probe - time.monotonic())
            yield

    async def _backoff(self, seconds: float) -> None:
        """Tenacity's sleep between retries, cut short when the run stops."""
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), timeout=seconds)

    def _prefect_slot(self) -> contextlib.AbstractAsyncContextManager[None]:
        """A slot of the Prefect limit ``model.prefect_limit`` for one request (if any)."""
        limit = self._prefect_limit
        return contextlib.nullcontext() if limit is None else limit.slot()

    async def _respect_pause(self) -> None:
        """Wait out a 429's ``Retry-After`` (it pauses every new attempt of the run)."""
        delay = self._paused_until - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    def stopping(self) -> bool:
        """Whether the run was asked to stop: no new request (nor retry) is sent then.

        Looked up at every request rather than held: a run's stop is forgotten when the run
        ends, and an engine that outlives it (a Dask worker's) serves the next run clean.
        """
        return interrupt.stop_for(self.run_id).requested

    async def _wait_to_send(self, stop: interrupt.RunStop) -> None:
        """Hold a request while the lease may have been taken over, or storage is behind.

        The heartbeat either renews the lease (the request goes) or finds it lost and stops
        the run (the request is cancelled): either way nothing is paid twice (locking.py).
        An object store two flush windows behind the answers holds new requests until it
        catches up, so that a kill loses at most that (part_writer.py).
        """
        while not stop.may_send() and not stop.requested:
            await asyncio.sleep(0.05)

    async def _watch_interrupt(self) -> None:
        """After a stop's grace period, abandon the requests still in flight."""
        while True:
            await asyncio.sleep(0.1)
            if self._inflight and interrupt.stop_for(self.run_id).grace_expired():
                for task in list(self._inflight):
                    task.cancel()

    def close(self) -> None:
        """Close the provider and stop the loop (idempotent).

        The run is over for this engine then, so a stop the engine itself set is forgotten:
        a later run of the same id in this process (a notebook cell run again) starts clean.
        """
        if not self._loop.is_running():
            return
        self._closed = True
        if self.stop_error is not None:
            interrupt.forget(self.run_id)

        async def shutdown() -> None:
            self._watchdog.cancel()
            # Requests still queued or in flight end as "cancelled", so that no batch waits
            # forever on a future of a stopped loop (the flow closes the engine in a
            # ``finally``, also when an exception tears it down while batches still run).
            for start in self._slots.drain():
                start()  # closed: each queued request ends as cancelled
            current = asyncio.current_task()
            pending = [t for t in asyncio.all_tasks() if t is not current]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if self._prefect_limit is not None:
                await self._prefect_limit.aclose()
            await self._provider.aclose()

        with contextlib.suppress(Exception):  # closing is best effort
            self._call(shutdown()).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            # Closed here rather than by the collector: a loop collected in a cycle with its
            # self-pipe socket may find the socket finalized first, and print "Exception
            # ignored in BaseEventLoop.__del__ ... Invalid file descriptor: -1" (seen on the
            # console of a Ctrl-C'd run on Dask, whose workers close engines at exit).
            self._loop.close()
