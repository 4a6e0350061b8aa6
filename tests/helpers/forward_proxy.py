"""An HTTP forward proxy on 127.0.0.1 for tests: what a company proxy does to a run's requests.

It takes requests in absolute form (``POST http://model.internal:8000/v1/chat/completions``),
as clients send them to a proxy, and passes each to one upstream (the test server) whatever
host it names, so a spec can name a host that resolves nowhere but through the proxy. With
``login`` it answers 407 to any request without that ``Proxy-Authorization``. It records what
it was asked and the login headers it saw.
"""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType

import aiohttp
from aiohttp import web
from yarl import URL

HOP_BY_HOP = {"host", "connection", "proxy-authorization", "proxy-connection", "keep-alive"}


class ForwardProxy:
    """A forward proxy in a thread of its own (``with ForwardProxy(upstream) as proxy:``)."""

    def __init__(self, upstream: str, login: tuple[str, str] | None = None) -> None:
        self.upstream = URL(upstream)
        self.expected = aiohttp.encode_basic_auth(*login) if login else None
        self.requests: list[str] = []
        """``METHOD url`` of every request it was asked to pass on (or refused)."""
        self.logins: list[str | None] = []
        """The ``Proxy-Authorization`` header of each request (None: none sent)."""
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.ServerRunner | None = None
        self._client: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ForwardProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _start(self) -> None:
        self._client = aiohttp.ClientSession()
        self._runner = web.ServerRunner(web.Server(self._handle))
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._client is not None:
            await self._client.close()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.requests.append(f"{request.method} {request.raw_path}")
        login = request.headers.get("Proxy-Authorization")
        self.logins.append(login)
        if self.expected is not None and login != self.expected:
            return web.Response(
                status=407, headers={"Proxy-Authenticate": 'Basic realm="test"'}, text="login"
            )
        target = URL(request.raw_path)
        if not target.is_absolute():  # a request meant for a server, not a proxy
            return web.Response(status=400, text="absolute URL expected")
        upstream = self.upstream.with_path(target.path).with_query(target.query)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        assert self._client is not None
        async with self._client.request(
            request.method, upstream, headers=headers, data=await request.read()
        ) as answer:
            body = await answer.read()
            return web.Response(status=answer.status, body=body, content_type=answer.content_type)
