"""HTTP proxies on 127.0.0.1 for tests: what a company proxy does to a run's requests.

:class:`ForwardProxy` takes requests in absolute form (``POST http://model.internal:8000/v1/
chat/completions``), as clients send them to a proxy for an http:// endpoint.
:class:`TunnelProxy` takes ``CONNECT host:port``, as for an https:// endpoint, in front of a
:class:`TlsFront`. Both lead to one upstream whatever host the request names, so a spec can
name a host that resolves nowhere but through the proxy. With ``login`` a proxy answers 407
to a request without that ``Proxy-Authorization``. Each records what it was asked and the
login headers it saw.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from pathlib import Path
from types import TracebackType
from typing import Self

import aiohttp
from aiohttp import web
from yarl import URL

HOP_BY_HOP = {"host", "connection", "proxy-authorization", "proxy-connection", "keep-alive"}


class _ServedInThread:
    """A server on an event loop in a daemon thread of its own (``with Server(...) as s:``)."""

    def __init__(self) -> None:
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> Self:
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
        raise NotImplementedError

    async def _stop(self) -> None:
        raise NotImplementedError


class _PassingOn(_ServedInThread):
    """An aiohttp server (no routing) that passes requests on to an upstream HTTP server."""

    def __init__(self, upstream: str, context: ssl.SSLContext | None = None) -> None:
        super().__init__()
        self.upstream = URL(upstream)
        self._context = context
        self._runner: web.ServerRunner | None = None
        self._client: aiohttp.ClientSession | None = None

    async def _start(self) -> None:
        self._client = aiohttp.ClientSession()
        self._runner = web.ServerRunner(web.Server(self._handle))
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._context)
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
        raise NotImplementedError

    async def _pass_on(self, request: web.BaseRequest, path: str, query: str) -> web.Response:
        upstream = self.upstream.with_path(path).with_query(query)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        assert self._client is not None
        async with self._client.request(
            request.method, upstream, headers=headers, data=await request.read()
        ) as answer:
            body = await answer.read()
            return web.Response(status=answer.status, body=body, content_type=answer.content_type)


class ForwardProxy(_PassingOn):
    """A proxy for http:// endpoints (``with ForwardProxy(upstream) as proxy:``)."""

    def __init__(self, upstream: str, login: tuple[str, str] | None = None) -> None:
        super().__init__(upstream)
        self.expected = aiohttp.encode_basic_auth(*login) if login else None
        self.requests: list[str] = []
        """``METHOD url`` of every request it was asked to pass on (or refused)."""
        self.logins: list[str | None] = []
        """The ``Proxy-Authorization`` header of each request (None: none sent)."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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
        return await self._pass_on(request, target.path, target.query_string)


class TlsFront(_PassingOn):
    """An https:// endpoint on 127.0.0.1 for ``hostname``, passing requests to ``upstream``.

    Its certificate comes from a test CA (trustme): a client that trusts ``ca_file``
    (``SSL_CERT_FILE``) verifies it as a real one. It records the headers of every request,
    so a test can check what reached the endpoint through a tunnel.
    """

    def __init__(self, upstream: str, hostname: str, directory: Path) -> None:
        import trustme

        authority = trustme.CA()
        self.ca_file = directory / "test-ca.pem"
        authority.cert_pem.write_to_path(str(self.ca_file))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        authority.issue_cert(hostname).configure_cert(context)
        super().__init__(upstream, context)
        self.headers: list[dict[str, str]] = []

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.headers.append(dict(request.headers))
        return await self._pass_on(request, request.path, request.query_string)


class TunnelProxy(_ServedInThread):
    """A proxy for https:// endpoints: ``CONNECT host:port`` opens a tunnel to ``upstream_port``
    on 127.0.0.1 (a :class:`TlsFront`), whatever host it names."""

    def __init__(self, upstream_port: int, login: tuple[str, str] | None = None) -> None:
        super().__init__()
        self.upstream_port = upstream_port
        self.expected = aiohttp.encode_basic_auth(*login) if login else None
        self.connects: list[str] = []
        """``CONNECT host:port`` of every tunnel it was asked for (or refused)."""
        self.logins: list[str | None] = []
        """The ``Proxy-Authorization`` header of each CONNECT (None: none sent)."""
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        method, target, _ = head[0].split(" ", 2)
        fields = dict(line.split(": ", 1) for line in head[1:] if ": " in line)
        login = next((v for k, v in fields.items() if k.lower() == "proxy-authorization"), None)
        self.connects.append(f"{method} {target}")
        self.logins.append(login)
        if method != "CONNECT" or (self.expected is not None and login != self.expected):
            status = "407 Proxy Authentication Required" if method == "CONNECT" else "405 No"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n".encode())
            await writer.drain()
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()
