"""The request engine: one event loop, one provider, one concurrency limit per run.

Prefect runs each batch task in its own worker thread. If every batch opened its own client
and limit, ``concurrency: 16`` would mean 16 per batch, and connections would not be reused.
Instead each process keeps one :class:`Engine` per run: a daemon thread running an asyncio
loop that owns the provider (one aiohttp session) and one semaphore. Batches hand requests to
it with :meth:`Engine.submit` and wait on ordinary futures.

Retries (tenacity) use exponential backoff with jitter and honour ``Retry-After``; a 429 with
``Retry-After`` pauses *all* new attempts of the run until then, because in a rate-limit storm
every other request would only earn another 429.

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
import heapq
import itertools
import threading
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any, Literal

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from shardeval import endpoint_limits, interrupt
from shardeval.errors import PermanentProviderError, ProviderError, TransientProviderError
from shardeval.prefect_limit import PrefectLimit, loop_runner, prefect_limit_mode
from shardeval.providers.base import Provider, ProviderRequest, create_provider
from shardeval.spec import ModelSpec

OutcomeStatus = Literal["ok", "error", "transient", "cancelled"]
MAX_BACKOFF_S = 60.0


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


class Engine:
    """Sends requests for one run through one provider, at most ``concurrency`` at a time."""

    def __init__(self, model: ModelSpec) -> None:
        self.model = model
        self._limit_mode = prefect_limit_mode(model)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=loop_runner(self._loop, with_prefect_settings=self._limit_mode is not None),
            name="shardeval-engine",
            daemon=True,
        )
        self._thread.start()
        self._inflight: set[asyncio.Task[Outcome]] = set()
        self._closed = False
        self._paused_until = 0.0
        self._provider: Provider = self._call(self._setup()).result()
        self.requests_sent = 0

    async def _setup(self) -> Provider:
        self._slots = _Slots(self.model.concurrency)
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
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if interrupt.stop_requested():
                        return Outcome(key=request.key, status="cancelled", attempts=attempts)
                    await self._respect_pause()
                    await self._slots.acquire(priority)
                    try:
                        if interrupt.stop_requested():
                            return Outcome(key=request.key, status="cancelled", attempts=attempts)
                        # + the endpoint's limit shared with other runs (suite cells)
                        async with self._global_slot(), endpoint_limits.slot(self.model):
                            attempts += 1
                            self.requests_sent += 1
                            started = time.perf_counter()
                            try:
                                completion = await self._provider.complete(request)
                            except TransientProviderError as exc:
                                if exc.status == 429 and exc.retry_after:
                                    self._paused_until = max(
                                        self._paused_until, time.monotonic() + exc.retry_after
                                    )
                                raise
                    finally:
                        self._slots.release()
        except TransientProviderError as exc:
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

    async def _watch_interrupt(self) -> None:
        """After a stop's grace period, abandon the requests still in flight."""
        while True:
            await asyncio.sleep(0.1)
            if interrupt.grace_expired():
                for task in list(self._inflight):
                    task.cancel()

    def close(self) -> None:
        """Close the provider and stop the loop (idempotent)."""
        if not self._loop.is_running():
            return
        self._closed = True

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
            engine = _engines[key] = Engine(model)
        return engine


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
