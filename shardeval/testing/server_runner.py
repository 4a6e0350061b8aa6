"""Running the test server's app on ``127.0.0.1``: in an event loop, or as a process until a signal.

Both :meth:`~shardeval.testing.server.TestServer.start_in_thread` and the command line
(``python -m shardeval.testing.server``) listen through :func:`start_listening`; the command
line then announces its URL with :data:`LISTENING_PREFIX`, the line
:meth:`~shardeval.testing.server.TestServer.start_subprocess` waits for.
"""

from __future__ import annotations

import asyncio
import signal

from aiohttp import web

from shardeval.testing.fake_model import create_app
from shardeval.testing.server_config import ServerConfig

HOST = "127.0.0.1"
LISTENING_PREFIX = "shardeval test server listening on "
# Graceful shutdown waits this long for in-flight handlers: a test that leaves a
# ``[[sleep:60]]`` call running must not make ``stop()`` hang for a minute.
_SHUTDOWN_TIMEOUT_S = 1.0
# Benchmarks open up to 256 connections at once; the default backlog of 128 would drop SYNs
# and add 1 s retransmission stalls that look like server latency.
_BACKLOG = 1024


async def start_listening(config: ServerConfig | None, port: int) -> tuple[web.AppRunner, int]:
    """Start listening on ``127.0.0.1:port`` (0 = any free port); returns the bound port."""
    runner = web.AppRunner(
        create_app(config),
        access_log=None,  # per-request logging would dominate CPU in the benchmarks
        handler_cancellation=True,  # a client timeout really ends the call, as on a real server
        shutdown_timeout=_SHUTDOWN_TIMEOUT_S,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, HOST, port, backlog=_BACKLOG)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = int(runner.addresses[0][1])
    return runner, bound_port


def base_url(port: int) -> str:
    """The OpenAI ``base_url`` for a server on ``port``."""
    return f"http://{HOST}:{port}/v1"


async def serve_until_signalled(config: ServerConfig, port: int) -> None:
    """Listen, announce the URL on stdout, and serve until SIGTERM or SIGINT."""
    runner, bound_port = await start_listening(config, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        print(f"{LISTENING_PREFIX}{base_url(bound_port)}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
