"""The request engine: one event loop, one provider, one concurrency limit per run.

Prefect runs each batch task in its own worker thread. If every batch opened its own client
and limit, ``concurrency: 16`` would mean 16 per batch, and connections would not be reused.
Instead each process keeps one :class:`Engine` per run: a daemon thread running an asyncio
loop that owns the provider (one aiohttp session) and one semaphore. Batches hand requests to
it with :meth:`Engine.submit` and wait on ordinary futures.

Retries (tenacity) use exponential backoff with jitter and honour ``Retry-After``; a 429 with
``Retry-After`` pauses *all* new attempts of the run until then, because in a rate-limit storm
every other request would only earn another 429.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Literal

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from shardeval import interrupt
from shardeval.errors import PermanentProviderError, ProviderError, TransientProviderError
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


class Engine:
    """Sends requests for one run through one provider, at most ``concurrency`` at a time."""

    def __init__(self, model: ModelSpec) -> None:
        self.model = model
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="shardeval-engine", daemon=True
        )
        self._thread.start()
        self._inflight: set[asyncio.Task[Outcome]] = set()
        self._paused_until = 0.0
        self._provider: Provider = self._call(self._setup()).result()
        self.requests_sent = 0

    async def _setup(self) -> Provider:
        self._semaphore = asyncio.Semaphore(self.model.concurrency)
        self._watchdog = asyncio.ensure_future(self._watch_interrupt())
        return create_provider(self.model)

    def _call(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def submit(self, request: ProviderRequest) -> concurrent.futures.Future[Outcome]:
        """Queue one request; the future resolves to its :class:`Outcome` (never raises)."""
        return self._call(self._track(request))

    async def _track(self, request: ProviderRequest) -> Outcome:
        task = asyncio.ensure_future(self._run(request))
        self._inflight.add(task)
        try:
            return await task
        except asyncio.CancelledError:
            return Outcome(key=request.key, status="cancelled", error="stopped by a signal")
        finally:
            self._inflight.discard(task)

    async def _run(self, request: ProviderRequest) -> Outcome:
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
                    async with self._semaphore:
                        if interrupt.stop_requested():
                            return Outcome(key=request.key, status="cancelled", attempts=attempts)
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

        async def shutdown() -> None:
            self._watchdog.cancel()
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
