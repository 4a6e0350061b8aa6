"""The request engine: one event loop, one provider, one concurrency limit per run.

Prefect runs each batch task in its own worker thread. If every batch opened its own client
and limit, ``concurrency: 16`` would mean 16 per batch, and connections would not be reused.
Instead each process keeps one :class:`Engine` per run: a daemon thread running an asyncio
loop that owns the provider (one aiohttp session) and one semaphore. Batches hand requests to
it with :meth:`Engine.submit` and wait on ordinary futures.

Retries (tenacity) use exponential backoff with jitter and honour ``Retry-After``; a 429 with
``Retry-After`` pauses *all* new attempts of the run until then, because in a rate-limit storm
every other request would only earn another 429.

Two failures stop the whole run instead of being paid for item by item (see
:class:`Breaker` and :meth:`Engine.stop_run`): an endpoint that stops answering altogether
(every request failing to connect for ``model.unreachable_after_s``: exit 1, resumable) and a
401/403 (the key is missing or wrong: exit 2, naming the variable). Neither is stored as a
row, so the same command sends those items once the endpoint or the key is back.

``model.prefect_limit: NAME`` adds a limit across processes (Dask workers, several flow runs,
several machines): with a Prefect server, every request also takes a slot of the server's
global concurrency limit ``NAME`` while it is in flight, or, when that limit has a slot decay
(``prefect gcl create NAME --limit 10 --slot-decay-per-second 2``), one token of it as a rate
limit. Without a server (ephemeral mode) there is nothing to share, and only
``model.concurrency`` applies (a warning says so once). See :mod:`shardeval.prefect_limit` and
docs/distributed.md.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import functools
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from shardeval import budget, endpoint_limits, interrupt
from shardeval.breaker import Breaker
from shardeval.errors import (
    ConnectionFailedError,
    EndpointError,
    EndpointUnreachable,
    PermanentProviderError,
    ProviderError,
    ShardevalError,
    TransientProviderError,
)
from shardeval.outcome import Outcome
from shardeval.prefect_limit import PrefectLimit, loop_runner, prefect_limit_mode
from shardeval.providers.base import Provider, ProviderRequest, create_provider
from shardeval.slots import PrioritySlots
from shardeval.spec import ModelSpec

MAX_BACKOFF_S = 60.0
AUTH_STATUSES = frozenset({401, 403})


def _error_kind(exc: ProviderError) -> str:
    if exc.status is not None:
        return f"http_{exc.status}"
    return "transient" if isinstance(exc, TransientProviderError) else "error"


class _Tries:
    """How many times one request was sent (its attempts, over retries)."""

    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent = 0


def _first_retry_delay(exc: TransientProviderError) -> float:
    """The wait after a first failure: ``Retry-After`` if given, else 0.5 s plus up to 1 s.

    tenacity's ``wait_exponential_jitter(initial=0.5)`` at attempt 1, which the retry loop
    (entered only after that failure) cannot compute for itself.
    """
    if exc.retry_after is not None:
        return min(MAX_BACKOFF_S, max(float(exc.retry_after), 0.0))
    return 0.5 + random.uniform(0, 1)


def _honouring_retry_after(
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


class _Answer:
    """One distinct request of the run: the rows waiting for it, and its kept outcome."""

    __slots__ = ("keep", "on_done", "outcome")

    def __init__(self, on_done: Callable[[Outcome], None], keep: bool) -> None:
        self.on_done = [on_done]
        self.keep = keep
        """Whether to keep the final outcome for rows that ask later (other batches)."""
        self.outcome: Outcome | None = None


def _outcome_of(key: str, task: asyncio.Future[Outcome]) -> Outcome:
    """A finished request's outcome (a stop that abandoned it: ``cancelled``)."""
    if task.cancelled():
        return Outcome(key=key, status="cancelled", error="stopped by a signal")
    error = task.exception()
    if error is not None:  # pragma: no cover - _run returns every failure
        return Outcome(key=key, status="transient", error=f"{type(error).__name__}: {error}")
    return task.result()


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
        self._inflight: set[asyncio.Task[Outcome]] = set()
        self._answers: dict[str, _Answer] = {}
        """Item key → its request (queued, in flight, or answered for a key other batches
        hold too)."""
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
        for position, request in enumerate(requests):
            key = request.key
            answer = self._answers.get(key)
            if answer is None:
                answer = self._answers[key] = _Answer(on_done, key in shared)
                priority = (batch, position)
                self._slots.start_when_free(
                    priority, functools.partial(self._start, request, priority, answer)
                )
            elif answer.outcome is not None:  # answered for another row: serves this one too
                on_done(answer.outcome)
            else:  # the same request, in flight or queued for another row: wait for it
                answer.on_done.append(on_done)
                answer.keep = answer.keep or key in shared

    def _start(self, request: ProviderRequest, priority: tuple[int, int], answer: _Answer) -> None:
        """Start a request that now holds a slot: a task, tracked so a stop can abandon it.

        No task exists for a request until it gets its slot, so a batch of thousands queued
        behind ``concurrency`` costs a heap entry each instead of a task and a future.
        """
        if self._closed:  # the slot dies with the engine (releasing it would start the next)
            self._settle(request.key, answer, None)
            return
        task = self._loop.create_task(self._run(request, priority, holding=True))
        self._inflight.add(task)
        task.add_done_callback(functools.partial(self._settle, request.key, answer))

    def _settle(self, key: str, answer: _Answer, task: asyncio.Future[Outcome] | None) -> None:
        """A request ended: deliver it to every row that asked; keep it if others will ask."""
        if task is None:
            outcome = Outcome(key=key, status="cancelled", error="engine closed")
        else:
            self._inflight.discard(task)
            outcome = _outcome_of(key, task)
        if answer.keep and outcome.is_final:
            answer.outcome = outcome
        elif self._answers.get(key) is answer:
            del self._answers[key]
        waiting, answer.on_done = answer.on_done, []
        for on_done in waiting:
            on_done(outcome)

    async def _run(
        self, request: ProviderRequest, priority: tuple[int, int], *, holding: bool = False
    ) -> Outcome:
        """One request to its final outcome: a first attempt, then retries if it failed.

        The first attempt is a plain call: tenacity's retry object and its iteration cost
        about a tenth of the engine thread's CPU per request at a thousand answers a second,
        and almost every request succeeds the first time. Only a request whose first attempt
        failed transiently enters tenacity's loop, which then waits and retries as before.
        """
        tries = _Tries()
        try:
            return await self._attempt(request, priority, tries, holding=holding)
        except TransientProviderError as exc:
            failure = exc
        if self.model.max_retries < 1 or self.stop_error is not None:
            return self._transient(request, failure, tries)
        await self._backoff(_first_retry_delay(failure))
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(TransientProviderError),
            stop=stop_after_attempt(self.model.max_retries),
            # attempt n of this loop is the run's attempt n + 1: initial 1.0 = 0.5 · 2
            wait=_honouring_retry_after(wait_exponential_jitter(initial=1.0, max=30.0)),
            sleep=self._backoff,
            reraise=True,
        )
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
        tries: _Tries,
        *,
        holding: bool = False,
    ) -> Outcome:
        """One attempt, in a slot (taken here unless ``holding`` one already).

        Raises only :class:`TransientProviderError` (for the retry loop); every other end is
        an outcome.
        """
        stop = interrupt.stop_for(self.run_id)
        if not holding:
            if stop.requested:
                return Outcome(key=request.key, status="cancelled", attempts=tries.sent)
            if self.stop_error is not None:
                return self._not_sent(request, tries.sent)
            await self._slots.acquire(priority)
        try:
            if self._paused_until:
                await self._respect_pause()
            if not stop.lease_current():
                await self._wait_for_lease(stop)
            if stop.requested:
                return Outcome(key=request.key, status="cancelled", attempts=tries.sent)
            if self.stop_error is not None:
                return self._not_sent(request, tries.sent)
            shared_limit = endpoint_limits.semaphore(self._endpoint)
            if not self._breaker.suspect and self._prefect_limit is None and shared_limit is None:
                return await self._send(request, tries)
            # + one at a time while the endpoint is suspect, the Prefect limit across
            # processes, the endpoint's limit shared with other runs (suite cells)
            async with self._gate(), self._global_slot(), endpoint_limits.slot(self.model):
                if self.stop_error is not None:
                    return self._not_sent(request, tries.sent)
                return await self._send(request, tries)
        finally:
            self._slots.release()

    async def _send(self, request: ProviderRequest, tries: _Tries) -> Outcome:
        """Make the call and classify what came back (the breaker and a 429's pause learn)."""
        tries.sent += 1
        started = time.perf_counter()
        try:
            completion = await self._provider.complete(request)
        except ConnectionFailedError as exc:
            if self._breaker.connection_failed():
                self.stop_run(self._unreachable(exc))
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
            return Outcome(
                key=request.key,
                status="error",
                error=exc.message,
                error_kind=_error_kind(exc),
                http_status=exc.status,
                latency_s=time.perf_counter() - started,
                attempts=tries.sent,
                finished_at=time.time(),
            )
        self._breaker.answered()
        budget.charge(
            self.run_id, self.model, completion.prompt_tokens, completion.completion_tokens
        )
        return Outcome(
            key=request.key,
            status="ok",
            response=completion.text,
            latency_s=time.perf_counter() - started,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            finish_reason=completion.finish_reason,
            attempts=tries.sent,
            finished_at=time.time(),
        )

    def _transient(
        self, request: ProviderRequest, exc: TransientProviderError, tries: _Tries
    ) -> Outcome:
        """Out of attempts (or stopped) on a passing failure: never stored, the rerun sends it."""
        if self.stop_error is not None:
            return self._not_sent(request, tries.sent, exc)
        return Outcome(
            key=request.key,
            status="transient",
            error=exc.message,
            error_kind=_error_kind(exc),
            http_status=exc.status,
            attempts=tries.sent,
            finished_at=time.time(),
        )

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
        error = self.stop_error
        return Outcome(
            key=request.key,
            status="transient",
            error=exc.message if exc is not None else (error.message if error else None),
            error_kind=_error_kind(exc) if exc is not None else "not_sent",
            http_status=exc.status if exc is not None else None,
            attempts=attempts,
            finished_at=time.time(),
        )

    def _unreachable(self, exc: ProviderError) -> EndpointUnreachable:
        base_url = self.model.base_url or "https://api.openai.com/v1"
        return EndpointUnreachable(
            f"the endpoint at {base_url} is unreachable: {self._breaker.in_a_row} requests in "
            f"a row failed to connect over {self._breaker.silent_for():.0f} s (last: "
            f"{exc.message}); stopped sending, finished items are saved",
            hint=f"check that the server at {self.field}.base_url is up, then run the same "
            "command again to send only what is missing",
        )

    def _auth_error(self, exc: ProviderError) -> ShardevalError:
        from shardeval.preflight import auth_error

        status = exc.status or 401
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

    @contextlib.asynccontextmanager
    async def _global_slot(self) -> AsyncIterator[None]:
        """Hold a slot of the Prefect limit ``model.prefect_limit`` (if any) for one request.

        A failure to talk to the Prefect server is transient: the request is retried like a
        5xx and never stored as final.
        """
        limit = self._prefect_limit
        if limit is None:
            yield
            return
        try:
            lease = await limit.acquire()
        except Exception as exc:
            raise TransientProviderError(f"prefect_limit {limit.name!r}: {exc}") from exc
        try:
            yield
        finally:
            limit.release(lease)

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

    async def _wait_for_lease(self, stop: interrupt.RunStop) -> None:
        """Hold a request while the run's lease may have been taken over (see locking.py).

        The heartbeat either renews the lease (the request goes) or finds it lost and stops
        the run (the request is cancelled): either way nothing is paid twice.
        """
        while not stop.lease_current() and not stop.requested:
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


_engines: dict[tuple[str, str], Engine] = {}
_engines_lock = threading.Lock()


def engine_for(run_id: str, model: ModelSpec) -> Engine:
    """The engine of a run in this process, created on first use.

    Keyed by run id and the model's whole spec (including endpoint and concurrency), so every
    batch of a run shares one limit, and a Dask worker process builds its own on demand.
    """
    key = (run_id, model.model_dump_json())
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            judge = run_id.split("/judges/", 1)[1] if "/judges/" in run_id else None
            field = "model" if judge is None else f"metric {judge!r}: model"
            engine = _engines[key] = Engine(model, field=field, run_id=run_id)
    interrupt.handle_signals_in_dask_worker()
    return engine


def run_stopped(run_id: str | None = None) -> bool:
    """Whether an engine of ``run_id`` (or any, with None) in this process stopped its run."""
    with _engines_lock:
        engines = [
            e
            for (r, _), e in _engines.items()
            if run_id is None or r == run_id or r.startswith(run_id + "/")
        ]
    return any(e.stop_error is not None for e in engines)


def stop_error(run_id: str) -> ShardevalError | None:
    """The error that stopped ``run_id`` (its model's or a judge's engine), if any."""
    with _engines_lock:
        engines = [e for (r, _), e in _engines.items() if r == run_id or r.startswith(run_id + "/")]
    for engine in engines:
        if engine.stop_error is not None:
            error = engine.stop_error
            return type(error)(error.message, hint=error.hint)
    return None


def close_engines(run_id: str | None = None) -> None:
    """Close the engines of one run, its judges included (or all of them)."""
    with _engines_lock:
        keys = [
            k for k in _engines if run_id is None or k[0] == run_id or k[0].startswith(run_id + "/")
        ]
        engines = [_engines.pop(k) for k in keys]
    for engine in engines:
        engine.close()


atexit.register(close_engines)
