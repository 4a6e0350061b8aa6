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
import heapq
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, Literal

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from shardeval import budget, endpoint_limits, interrupt
from shardeval.errors import (
    ConnectionFailedError,
    EndpointError,
    EndpointUnreachable,
    PermanentProviderError,
    ProviderError,
    ShardevalError,
    TransientProviderError,
)
from shardeval.prefect_limit import PrefectLimit, loop_runner, prefect_limit_mode
from shardeval.providers.base import Provider, ProviderRequest, create_provider
from shardeval.spec import ModelSpec

OutcomeStatus = Literal["ok", "error", "transient", "cancelled"]
MAX_BACKOFF_S = 60.0
BREAKER_FAILURES = 3
"""Connection failures in a row (with ``model.unreachable_after_s`` since the last answer)
that open the breaker; the time condition is the one that matters in practice."""
AUTH_STATUSES = frozenset({401, 403})
PROBE_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)
"""Between attempts while the endpoint is suspect (see :class:`Breaker`)."""


@dataclass(frozen=True)
class Outcome:
    """What became of one request. Only ``ok`` and ``error`` are stored as final."""

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


def _error_kind(exc: ProviderError) -> str:
    if exc.status is not None:
        return f"http_{exc.status}"
    return "transient" if isinstance(exc, TransientProviderError) else "error"


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


class _Slots:
    """A semaphore whose waiters get a free slot lowest priority first (FIFO among equals).

    Batches are handed the slots in order (priority = batch number, position), so a batch's
    requests go out together instead of every running batch getting a trickle. Batches then
    finish (and commit) in turn, and fewer of them hold unflushed results at any moment.
    """

    def __init__(self, slots: int) -> None:
        self._free = slots
        self._waiters: list[tuple[tuple[int, int], int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    async def acquire(self, priority: tuple[int, int]) -> None:
        while self._waiters and self._waiters[0][2].done():
            heapq.heappop(self._waiters)  # cancelled waiters
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._order), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # the slot was handed over as we were cancelled: pass it on
            raise

    def release(self) -> None:
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)
                return
        self._free += 1


def _deliver(key: str, on_done: Callable[[Outcome], None], future: asyncio.Future[Outcome]) -> None:
    """Hand a request's outcome to its batch (a stop that abandoned it: ``cancelled``)."""
    if future.cancelled():
        outcome = Outcome(key=key, status="cancelled", error="stopped by a signal")
    elif future.exception() is not None:  # pragma: no cover - _run returns every failure
        error = future.exception()
        outcome = Outcome(key=key, status="transient", error=f"{type(error).__name__}: {error}")
    else:
        outcome = future.result()
    on_done(outcome)


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
        self._limit_mode = prefect_limit_mode(model)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=loop_runner(self._loop, with_prefect_settings=self._limit_mode is not None),
            name="shardeval-engine",
            daemon=True,
        )
        self._thread.start()
        self._inflight: set[asyncio.Task[Outcome]] = set()
        self._answers: dict[str, asyncio.Future[Outcome]] = {}
        """Item key → its request (in flight, or answered for a key other batches hold too)."""
        self._closed = False
        self._paused_until = 0.0
        self._provider: Provider = self._call(self._setup()).result()
        self.requests_sent = 0

    async def _setup(self) -> Provider:
        self._slots = _Slots(self.model.concurrency)
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

    def submit(
        self, request: ProviderRequest, priority: tuple[int, int] = (0, 0)
    ) -> concurrent.futures.Future[Outcome]:
        """Queue one request; the future resolves to its :class:`Outcome` (never raises).

        Waiting requests get a free slot lowest ``priority`` first (the runner passes the
        batch number and the position in the batch).
        """
        if self._closed:
            future: concurrent.futures.Future[Outcome] = concurrent.futures.Future()
            future.set_result(Outcome(key=request.key, status="cancelled", error="engine closed"))
            return future
        return self._call(self._track(request, priority))

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
        for position, request in enumerate(requests):
            future = self._answers.get(request.key)
            if future is None:
                # One task per request (what :meth:`_track` does with two): tracked in
                # ``_inflight`` so that a stop's grace period can abandon it.
                task = asyncio.ensure_future(self._run(request, (batch, position)))
                self._inflight.add(task)
                self._answers[request.key] = task
                task.add_done_callback(
                    functools.partial(self._settle, request.key, request.key in shared, on_done)
                )
            else:  # the same request, asked by another row: that answer serves both
                future.add_done_callback(functools.partial(_deliver, request.key, on_done))

    def _settle(
        self,
        key: str,
        keep: bool,
        on_done: Callable[[Outcome], None],
        task: asyncio.Future[Outcome],
    ) -> None:
        """A request ended: deliver it; forget it unless its answer serves other rows later."""
        self._inflight.discard(task)
        final = not task.cancelled() and task.exception() is None and task.result().is_final
        if not (keep and final) and self._answers.get(key) is task:
            del self._answers[key]
        _deliver(key, on_done, task)

    async def _track(self, request: ProviderRequest, priority: tuple[int, int]) -> Outcome:
        task = asyncio.ensure_future(self._run(request, priority))
        self._inflight.add(task)
        try:
            return await task
        except asyncio.CancelledError:
            return Outcome(key=request.key, status="cancelled", error="stopped by a signal")
        finally:
            self._inflight.discard(task)

    async def _run(self, request: ProviderRequest, priority: tuple[int, int]) -> Outcome:
        attempts = 0
        started = 0.0

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            retry_after = getattr(exc, "retry_after", None)
            base = wait_exponential_jitter(initial=0.5, max=30.0)(state)
            if retry_after is not None:
                return min(MAX_BACKOFF_S, max(float(retry_after), 0.0))
            return float(base)

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(TransientProviderError),
            stop=stop_after_attempt(self.model.max_retries + 1),
            wait=wait,
            sleep=self._backoff,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if self.stopping():
                        return Outcome(key=request.key, status="cancelled", attempts=attempts)
                    if self.stop_error is not None:
                        return self._not_sent(request, attempts)
                    await self._respect_pause()
                    await self._slots.acquire(priority)
                    try:
                        await self._wait_for_lease()
                        if self.stopping():
                            return Outcome(key=request.key, status="cancelled", attempts=attempts)
                        if self.stop_error is not None:
                            return self._not_sent(request, attempts)
                        # + the endpoint's limit shared with other runs (suite cells)
                        async with (
                            self._gate(),
                            self._global_slot(),
                            endpoint_limits.slot(self.model),
                        ):
                            if self.stop_error is not None:
                                return self._not_sent(request, attempts)
                            attempts += 1
                            self.requests_sent += 1
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
                                    self._paused_until = max(
                                        self._paused_until, time.monotonic() + exc.retry_after
                                    )
                                raise
                            except PermanentProviderError as exc:
                                self._breaker.answered()
                                if exc.status in AUTH_STATUSES:
                                    # A configuration error, not this item's: never a row.
                                    self.stop_run(self._auth_error(exc))
                                    return self._not_sent(request, attempts, exc)
                                raise
                            self._breaker.answered()
                    finally:
                        self._slots.release()
        except TransientProviderError as exc:
            if self.stop_error is not None:
                return self._not_sent(request, attempts, exc)
            return Outcome(
                key=request.key,
                status="transient",
                error=exc.message,
                error_kind=_error_kind(exc),
                http_status=exc.status,
                attempts=attempts,
                finished_at=time.time(),
            )
        except PermanentProviderError as exc:
            return Outcome(
                key=request.key,
                status="error",
                error=exc.message,
                error_kind=_error_kind(exc),
                http_status=exc.status,
                latency_s=time.perf_counter() - started,
                attempts=attempts,
                finished_at=time.time(),
            )
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
            attempts=attempts,
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
        delay = self._paused_until - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    def stopping(self) -> bool:
        """Whether the run was asked to stop: no new request (nor retry) is sent then.

        Looked up at every request rather than held: a run's stop is forgotten when the run
        ends, and an engine that outlives it (a Dask worker's) serves the next run clean.
        """
        return interrupt.stop_for(self.run_id).requested

    async def _wait_for_lease(self) -> None:
        """Hold a request while the run's lease may have been taken over (see locking.py).

        The heartbeat either renews the lease (the request goes) or finds it lost and stops
        the run (the request is cancelled): either way nothing is paid twice.
        """
        stop = interrupt.stop_for(self.run_id)
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
