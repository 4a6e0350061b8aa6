"""A TCP proxy on 127.0.0.1 that makes a loopback S3 server as far away as a real one.

A store on loopback answers in about a millisecond; a bucket in a cloud region takes tens of
milliseconds per request. Every chunk the client sends is held for ``delay`` seconds before
it is forwarded (chunks keep their order, and chunks that arrive together leave together), so
each request pays the delay once, whatever its size, as it would in a real round trip.
Answers flow back undelayed. Headers pass through untouched, so signed requests still verify.

No pytest here: ``benchmarks/s3.py --s3-latency`` uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

HOST = "127.0.0.1"
_CHUNK = 1 << 16


class LatencyProxy:
    """Forward ``127.0.0.1:<port>`` to ``target_port``, each client chunk ``delay`` s late."""

    def __init__(self, target_port: int, delay: float) -> None:
        self.target_port = target_port
        self.delay = delay
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None

    @property
    def endpoint(self) -> str:
        """The proxy's URL, to use as ``AWS_ENDPOINT_URL``."""
        return f"http://{HOST}:{self.port}"

    def start(self) -> LatencyProxy:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        self.port = future.result(timeout=10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._connect, HOST, 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _connect(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        try:
            server_in, server_out = await asyncio.open_connection(HOST, self.target_port)
        except OSError:
            client_out.close()
            return
        await asyncio.gather(
            self._delayed(client_in, server_out),
            self._pipe(server_in, client_out),
            return_exceptions=True,
        )
        for writer in (client_out, server_out):
            with contextlib.suppress(Exception):
                writer.close()

    async def _delayed(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def receive() -> None:
            while data := await source.read(_CHUNK):
                queue.put_nowait((loop.time() + self.delay, data))
            queue.put_nowait((loop.time() + self.delay, b""))

        receiving = asyncio.create_task(receive())
        try:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if sink.can_write_eof():
                        sink.write_eof()
                    return
                sink.write(data)
                await sink.drain()
        finally:
            receiving.cancel()

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while data := await source.read(_CHUNK):
            sink.write(data)
            await sink.drain()
        sink.close()
