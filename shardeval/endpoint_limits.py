"""Process-wide request limits per endpoint, shared by every run's engine in this process.

Each run has its own :class:`~shardeval.engine.Engine` (its own event loop thread and its own
``model.concurrency`` slots). When a suite runs several cells at once in one process and two of
them talk to the same endpoint, their limits would add up: ``concurrency: 4`` and ``8`` on one
server would mean 12 requests in flight. The suite therefore installs, before its cells start,
one limit per endpoint (the smallest ``concurrency`` among the cells using it) with
:func:`applied`, and every engine takes a slot of its endpoint's limit around each request
(:func:`slot`), in addition to its own.

Why aiologic's semaphore: the engines run on *different* event loops in different threads, and
an ``asyncio.Semaphore`` belongs to one loop, while a ``threading.Semaphore`` would block the
loop that waits on it (stalling every other request of that run). aiologic's
``BoundedSemaphore`` is awaited without blocking the loop and is safe across threads and
loops, so a waiter is woken in its own loop when any engine releases a slot.

An endpoint is ``(provider, base_url)`` (a python provider: its function). Without a limit
installed for an endpoint (a single run, the usual case) :func:`slot` costs one dict lookup.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Iterator, Mapping

import aiologic

from shardeval.spec import ModelSpec

EndpointKey = tuple[str, str]

_limits: dict[EndpointKey, tuple[int, aiologic.BoundedSemaphore]] = {}
_lock = threading.Lock()


def endpoint_key(model: ModelSpec) -> EndpointKey:
    """Which endpoint a model's requests go to: ``(provider, base_url or function)``."""
    where = model.base_url or model.function or model.model
    return (model.provider, (where or "").rstrip("/"))


def smallest_limits(models: list[ModelSpec]) -> dict[EndpointKey, int]:
    """For each endpoint among ``models``, the smallest ``concurrency`` of the models using it."""
    limits: dict[EndpointKey, int] = {}
    for model in models:
        key = endpoint_key(model)
        limits[key] = min(limits.get(key, model.concurrency), model.concurrency)
    return limits


@contextlib.contextmanager
def applied(limits: Mapping[EndpointKey, int]) -> Iterator[None]:
    """Install per-endpoint limits while the block runs (restoring any that were there).

    A limit already installed for an endpoint (another suite in this process) is kept when it
    is smaller: requests to one endpoint never exceed the smallest limit asked for.
    """
    with _lock:
        previous = {key: _limits.get(key) for key in limits}
        for key, value in limits.items():
            old = previous[key]
            if old is None or value < old[0]:
                _limits[key] = (value, aiologic.BoundedSemaphore(value))
    try:
        yield
    finally:
        with _lock:
            for key, old in previous.items():
                if old is None:
                    _limits.pop(key, None)
                else:
                    _limits[key] = old


def limit_of(model: ModelSpec) -> int | None:
    """The limit installed for a model's endpoint, if any (for tests and the display)."""
    found = _limits.get(endpoint_key(model))
    return None if found is None else found[0]


def semaphore(endpoint: EndpointKey) -> aiologic.BoundedSemaphore | None:
    """The limit installed for ``endpoint`` (None: no suite shares it, nothing to take)."""
    found = _limits.get(endpoint)
    return None if found is None else found[1]


@contextlib.asynccontextmanager
async def slot(model: ModelSpec) -> AsyncIterator[None]:
    """Hold a slot of the model's endpoint limit for one request (no limit: at once)."""
    limit = semaphore(endpoint_key(model))
    if limit is None:
        yield
        return
    async with limit:
        yield
