"""``model.prefect_limit``: a Prefect global concurrency limit (or rate limit) across processes.

With a Prefect server, every request the engine sends also holds a slot of the server's
global concurrency limit named in the spec while it is in flight, so the limit caps requests
in flight across every process that uses it (Dask workers, several flow runs, machines).
A limit with a slot decay (``prefect gcl create NAME --limit 10 --slot-decay-per-second 2``)
is a rate limit instead: one token per request. Without a server (ephemeral mode) there is
nothing to share and only ``model.concurrency`` applies; a warning says so once.

Prefect's own ``concurrency()`` context per request costs three API calls, a lease-renewal
thread and events each time (measured on 2 cores: ~90 ms of CPU per request, and 160
requests of 200 ms at concurrency 16 took 48 s instead of 2 s). :class:`PrefectLimit`
keeps Prefect's semantics (a slot per request in flight, leases that expire if the process
dies) at a fraction of the cost (the same 160 requests: 3.3 s and 0.2 s of CPU) by lending a
leased slot to the next waiting request of the same process. See docs/distributed.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from shardeval.errors import SpecError, TransientProviderError
from shardeval.spec import ModelSpec

LimitMode = Literal["concurrency", "rate_limit"]

logger = logging.getLogger("shardeval.engine")


class PrefectLimit:
    """A Prefect global concurrency limit (or rate limit) as seen by one engine.

    Concurrency limit: every request in flight holds one slot of the server's limit, so the
    limit caps requests in flight across every process that uses it. Taking Prefect's
    ``concurrency()`` context per request would cost three API calls, a lease-renewal thread
    and events each time (measured: ~90 ms of CPU per request, 24x slower than the request
    itself); instead a slot, once leased, is lent to this process's next waiting request. It
    goes back to the server after ``IDLE_S`` without use, or after ``HOLD_S`` of use so that
    other processes get a turn; leases are renewed in the background, and the slots of a
    process that dies come back when their lease expires. One request per process at a time
    asks the server for a slot (as Prefect's own client does), waiting its ``Retry-After``.

    Rate limit (a limit with a slot decay): one token per request, taken one request at a
    time per process.
    """

    IDLE_S = 0.5
    HOLD_S = 10.0
    MAX_WAIT_S = 2.0

    def __init__(self, name: str, mode: LimitMode, timeout_s: float) -> None:
        self.name = name
        self.mode = mode
        # A lease outlives any one request (the server's minimum is 60 s).
        self.lease_s = max(60.0, timeout_s + 30.0)
        self._idle: list[Any] = []
        self._leased_at: dict[Any, float] = {}
        self._renewed_at: dict[Any, float] = {}
        self._last_used: dict[Any, float] = {}
        self._asking = asyncio.Lock()
        self._changed = asyncio.Event()
        self._client: Any = None
        self._keeper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    async def _api(self) -> Any:
        if self._client is None:
            from prefect.client.orchestration import get_client

            client = get_client()
            await client.__aenter__()
            self._client = client
        return self._client

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a slot (or take a token) for one request.

        A failure to talk to the Prefect server is transient: the request is retried like a
        5xx and never stored as final.
        """
        try:
            lease = await self.acquire()
        except Exception as exc:
            raise TransientProviderError(f"prefect_limit {self.name!r}: {exc}") from exc
        try:
            yield
        finally:
            self.release(lease)

    async def acquire(self) -> Any:
        """A lease id to hold while one request is in flight (None for a rate-limit token)."""
        if self.mode == "rate_limit":
            async with self._asking:
                await self._ask("/increment")
            return None
        while True:
            if self._idle:
                return self._idle.pop()
            if not self._asking.locked():
                async with self._asking:
                    lease = await self._ask("/increment-with-lease")
                if lease is not None:
                    now = time.monotonic()
                    self._leased_at[lease] = self._renewed_at[lease] = now
                    self._start_keeper()
                    return lease
                continue  # a local slot came free while we waited for the server
            await self._wait_for_change(self.MAX_WAIT_S)

    async def _ask(self, endpoint: str) -> Any:
        """Ask the server for one slot until it grants one (or, for slots, one is free here)."""
        import httpx

        client = await self._api()
        while True:
            body: dict[str, Any] = {"names": [self.name], "slots": 1}
            if endpoint == "/increment-with-lease":
                body.update(mode="concurrency", lease_duration=self.lease_s)
            else:
                body.update(mode="rate_limit")
            try:
                response = await client.request(
                    "POST", f"/v2/concurrency_limits{endpoint}", json=body
                )
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != 423:
                    raise
                wait_s = float(exc.response.headers.get("Retry-After", 1.0))
                if endpoint == "/increment":
                    await asyncio.sleep(min(wait_s, self.MAX_WAIT_S))
                elif await self._wait_for_change(min(wait_s, self.MAX_WAIT_S)) and self._idle:
                    return None
                continue
            data = response.json()
            limits = data.get("limits", []) if isinstance(data, dict) else data
            if not limits:
                raise SpecError(f"the Prefect server has no active limit named {self.name!r}")
            return data.get("lease_id") if isinstance(data, dict) else None

    async def _wait_for_change(self, timeout: float) -> bool:
        """Wait until a slot is released here (True) or ``timeout`` passes (False)."""
        event = self._changed
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def release(self, lease: Any) -> None:
        """Lend the slot to the next request, or give it back to the server if held long."""
        if lease is None:
            return
        now = time.monotonic()
        if now - self._leased_at.get(lease, now) > self.HOLD_S:
            self._give_back(lease)
        else:
            self._last_used[lease] = now
            self._idle.append(lease)
        self._changed.set()
        self._changed = asyncio.Event()

    def _give_back(self, lease: Any) -> None:
        self._leased_at.pop(lease, None)
        self._renewed_at.pop(lease, None)
        self._last_used.pop(lease, None)
        task = asyncio.ensure_future(self._release_on_server(lease))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _release_on_server(self, lease: Any) -> None:
        with contextlib.suppress(Exception):  # the lease expires on its own
            client = await self._api()
            await client.request(
                "POST", "/v2/concurrency_limits/decrement-with-lease", json={"lease_id": lease}
            )

    def _start_keeper(self) -> None:
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.ensure_future(self._keep())

    async def _keep(self) -> None:
        """Give back idle slots, renew the leases of the others; stop when none is held."""
        while self._leased_at:
            await asyncio.sleep(min(self.IDLE_S / 2, 0.25))
            now = time.monotonic()
            for lease in [x for x in self._idle if now - self._last_used[x] > self.IDLE_S]:
                self._idle.remove(lease)
                self._give_back(lease)
            for lease, renewed in list(self._renewed_at.items()):
                if now - renewed > self.lease_s / 3:
                    self._renewed_at[lease] = now
                    try:
                        client = await self._api()
                        await client.renew_concurrency_lease(lease, self.lease_s)
                    except Exception as exc:  # the next renewal tries again
                        logger.warning("could not renew a lease of %r: %s", self.name, exc)

    async def aclose(self) -> None:
        """Give every slot back and close the API client."""
        if self._keeper is not None:
            self._keeper.cancel()
        for lease in list(self._leased_at):
            self._give_back(lease)
        self._idle.clear()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.__aexit__(None, None, None)
            self._client = None


def loop_runner(
    loop: asyncio.AbstractEventLoop, *, with_prefect_settings: bool
) -> Callable[[], None]:
    """The engine thread's body: run ``loop`` (inside the caller's Prefect settings, if asked).

    A new thread starts with Prefect's root settings; the ones in force where the engine is
    created (e.g. ``temporary_settings(PREFECT_API_URL=...)``) must also reach the limit calls.
    """
    if not with_prefect_settings:
        return loop.run_forever
    from prefect.context import SettingsContext

    settings = SettingsContext.get()

    def run() -> None:
        if settings is None:
            loop.run_forever()
            return
        with SettingsContext(profile=settings.profile, settings=settings.settings):
            loop.run_forever()

    return run


_limit_modes: dict[tuple[str, str], LimitMode] = {}
_limit_warned: set[str] = set()
_limit_lock = threading.Lock()


def prefect_limit_mode(model: ModelSpec) -> LimitMode | None:
    """How requests take the Prefect limit ``model.prefect_limit``: a slot, a token, or not at all.

    ``None`` without a limit name, or without a Prefect server (ephemeral mode: warns once per
    name). With a server the limit must exist: a concurrency limit (no slot decay) is held for
    the duration of each request; one with a slot decay is a rate limit, one token per request.
    The answer is cached per process and API URL.

    Raises:
        SpecError: the server has no limit of that name (or it is inactive).
    """
    name = model.prefect_limit
    if not name:
        return None
    from prefect.settings import get_current_settings

    api_url = get_current_settings().api.url
    if not api_url:
        with _limit_lock:
            first = name not in _limit_warned
            _limit_warned.add(name)
        if first:
            logger.warning(
                "model.prefect_limit %r is ignored: no Prefect server (PREFECT_API_URL is not "
                "set), so only model.concurrency (%d in flight in this process) applies",
                name,
                model.concurrency,
            )
        return None
    key = (str(api_url), name)
    with _limit_lock:
        if key in _limit_modes:
            return _limit_modes[key]
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    hint = (
        f"create it first: prefect gcl create {name} --limit 8 (a concurrency limit), or "
        f"--limit 10 --slot-decay-per-second 2 (a rate limit); see docs/distributed.md"
    )
    try:
        with get_client(sync_client=True) as client:
            limit = client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        raise SpecError(
            f"model.prefect_limit: the Prefect server at {api_url} has no global concurrency "
            f"limit named {name!r}",
            hint=hint,
        ) from None
    if not limit.active:
        raise SpecError(
            f"model.prefect_limit: the global concurrency limit {name!r} is inactive, so it "
            "would not throttle anything",
            hint=f"enable it: prefect gcl enable {name}",
        )
    mode: LimitMode = "rate_limit" if (limit.slot_decay_per_second or 0) > 0 else "concurrency"
    with _limit_lock:
        _limit_modes[key] = mode
    return mode
