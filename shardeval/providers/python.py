"""A Python callable as the model: ``function: "package.module:callable"``.

The callable receives ``(item, messages)`` and returns the response text (or a mapping with
``text`` and optional ``prompt_tokens``/``completion_tokens``). It may be ``async``. A sync
callable runs in worker threads so a slow one (a local model, a blocking client) never stalls
the event loop that serves every other request. The calls that arrive in one turn of the loop
go to the threads together (:class:`_ThreadCalls`): one hand-over per group instead of two
thread switches per call, which at a few microseconds per call were most of a run's time. Raising
:class:`~shardeval.errors.TransientProviderError` asks for a retry; any other exception
becomes an error row.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from shardeval.errors import PermanentProviderError, ProviderError, SpecError
from shardeval.outcome import token_count
from shardeval.providers.base import Completion, ProviderRequest
from shardeval.registry import import_object
from shardeval.spec import ModelSpec


class PythonProvider:
    """Calls a user function for each request."""

    def __init__(self, model: ModelSpec) -> None:
        self._function = self.load(model)
        self._is_async = inspect.iscoroutinefunction(self._function)
        self._threads = _ThreadCalls(self._function)

    @staticmethod
    def load(model: ModelSpec) -> Callable[..., Any]:
        """Import the callable the spec names, or explain why not."""
        if not model.function:
            raise SpecError("model.function: required for the python provider ('module:callable')")
        try:
            function = import_object(model.function)
        except (ImportError, AttributeError) as exc:
            raise SpecError(
                f"model.function: cannot import {model.function!r}: {exc}",
                hint="make sure the module is importable (installed, or on PYTHONPATH)",
            ) from None
        if not callable(function):
            raise SpecError(f"model.function: {model.function!r} is not callable")
        return function

    check = load

    async def complete(self, request: ProviderRequest) -> Completion:
        """Call the function and normalise what it returns."""
        try:
            if self._is_async:
                result = await self._function(dict(request.item), list(request.messages))
            else:
                result = await self._threads.call(dict(request.item), list(request.messages))
        except ProviderError:
            raise
        except Exception as exc:
            raise _permanent(exc) from exc
        return _to_completion(result)

    @property
    def batchable(self) -> bool:
        """Whether :meth:`complete_many` may serve a batch (a sync function: see there)."""
        return not self._is_async

    async def complete_many(
        self, requests: Sequence[ProviderRequest]
    ) -> list[tuple[Completion | ProviderError, float]]:
        """Call the sync function for each request; ``(completion or error, seconds)`` each.

        The engine's in-process batch path (:mod:`shardeval.engine_batch`) uses this instead
        of one :meth:`complete` per request. Errors are returned, classified as
        :meth:`complete` raises them, so one failing item does not fail its neighbours.
        """
        calls = [(dict(r.item), list(r.messages)) for r in requests]
        results = await self._threads.call_many(calls)
        out: list[tuple[Completion | ProviderError, float]] = []
        for ok, value, seconds in results:
            if not ok:
                error = value if isinstance(value, ProviderError) else _permanent(value)
                out.append((error, seconds))
                continue
            try:
                out.append((_to_completion(value), seconds))
            except ProviderError as exc:
                out.append((exc, seconds))
        return out

    async def aclose(self) -> None:
        """Nothing to release."""


class _ThreadCalls:
    """Calls of a sync function on the loop's default executor, handed over in groups.

    The calls queued while the loop runs its current callbacks are split into as many groups
    as the executor has threads, each run by one thread, call after call. Finished calls go
    back to the loop together, at most every :data:`DELIVER_EVERY_S`: a slow function's
    answers still arrive one by one (and are journaled at once), as many run at a time as
    before, while a fast one pays two thread switches per group instead of per call.
    """

    def __init__(self, function: Callable[..., Any]) -> None:
        self._function = function
        self._groups = min(32, (os.cpu_count() or 1) + 4)  # the default executor's threads
        self._queued: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []

    async def call(self, *args: Any) -> Any:
        """``function(*args)`` in a worker thread; raises what it raised."""
        ok, value, _seconds = (await self.call_many([args]))[0]
        if not ok:
            raise value
        return value

    async def call_many(self, calls: Sequence[tuple[Any, ...]]) -> list[tuple[bool, Any, float]]:
        """``(ok, result or exception, seconds)`` of ``function(*args)`` for each of ``calls``."""
        loop = asyncio.get_running_loop()
        if not self._queued:
            loop.call_soon(self._dispatch, loop)  # after the callbacks that queue more calls
        # Each call runs in a copy of its caller's context, as with asyncio.to_thread.
        context = contextvars.copy_context()
        futures = []
        for args in calls:
            future: asyncio.Future[Any] = loop.create_future()
            self._queued.append(((context, *args), future))
            futures.append(future)
        return list(await asyncio.gather(*futures))

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        queued, self._queued = self._queued, []
        size = -(-len(queued) // self._groups)
        for start in range(0, len(queued), size):
            group = queued[start : start + size]
            running = loop.run_in_executor(None, self._run_group, loop, group)
            running.add_done_callback(functools.partial(_fail_unsettled, group))

    def _run_group(
        self, loop: asyncio.AbstractEventLoop, group: list[tuple[tuple[Any, ...], _Future]]
    ) -> None:
        finished: list[tuple[_Future, tuple[bool, Any, float]]] = []
        delivered = time.monotonic()
        clock = time.perf_counter
        for (context, *args), future in group:
            started = clock()
            try:
                result = context.copy().run(self._function, *args)
                finished.append((future, (True, result, clock() - started)))
            except BaseException as exc:  # the caller's await raises it, as with to_thread
                finished.append((future, (False, exc, clock() - started)))
            if time.monotonic() - delivered >= DELIVER_EVERY_S:
                loop.call_soon_threadsafe(_settle, finished)
                finished, delivered = [], time.monotonic()
        if finished:
            loop.call_soon_threadsafe(_settle, finished)


def _permanent(exc: BaseException) -> PermanentProviderError:
    """Any other exception of the function: an error row naming it."""
    error = PermanentProviderError(f"{type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


_Future = asyncio.Future[Any]
DELIVER_EVERY_S = 0.002


def _settle(finished: list[tuple[_Future, tuple[bool, Any, float]]]) -> None:
    """Resolve finished calls' futures on the loop (a cancelled caller's is skipped)."""
    for future, result in finished:
        if not future.done():
            future.set_result(result)


def _fail_unsettled(group: list[tuple[tuple[Any, ...], _Future]], running: _Future) -> None:
    """A group the executor could not run (shut down): its callers get the error."""
    if running.cancelled() or running.exception() is None:
        return
    error = running.exception()
    for _, future in group:
        if not future.done() and error is not None:
            future.set_exception(error)


def _to_completion(result: Any) -> Completion:
    """The function's result as a :class:`Completion`, or an error row saying what was wrong.

    Checked here rather than trusted: a token count of the wrong type (``"12"``, ``1.5``)
    would be journaled as the answer and then fail the batch's Parquet write, on every
    rerun, so the run could never finish.
    """
    if isinstance(result, str):
        return Completion(text=result)
    if isinstance(result, Completion):
        fields: Mapping[str, Any] = vars(result)
    elif isinstance(result, Mapping) and "text" in result:
        fields = result
    else:
        raise PermanentProviderError(
            f"the function returned {type(result).__name__}; expected str or a mapping with 'text'"
        )
    reason = fields.get("finish_reason")
    return Completion(
        text=str(fields["text"]),
        prompt_tokens=_token_count(fields, "prompt_tokens"),
        completion_tokens=_token_count(fields, "completion_tokens"),
        finish_reason=None if reason is None else str(reason),
    )


def _token_count(fields: Mapping[str, Any], name: str) -> int | None:
    """``fields[name]`` as an int (numpy's integers included), None if absent or None."""
    value = fields.get(name)
    count = token_count(value)
    if count is None and value is not None:
        raise PermanentProviderError(
            f"the function returned {name}={value!r} ({type(value).__name__}); "
            "expected an int or None"
        )
    return count
