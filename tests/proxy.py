"""A TCP proxy the tests can cut: a broker or database outage without restarting it.

``cut()`` closes every open connection and refuses new ones (the port stops listening);
``restore()`` listens again on the same port. Runs on the test's event loop. ``SlowLink`` is
the same proxy with latency.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

from orderflow.embedded import free_port


class TcpProxy:
    def __init__(self, target_port: int, *, listen_port: int | None = None) -> None:
        self.target_port = target_port
        self.port = listen_port or free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> TcpProxy:
        await self.restore()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.cut()

    async def restore(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(
                self._accept, "127.0.0.1", self.port, reuse_address=True
            )

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks))

    async def _accept(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        try:
            upstream_reader, upstream_writer = await self._connect_upstream()
        except OSError:
            client_writer.transport.abort()
            return
        self._writers |= {client_writer, upstream_writer}
        pumps = [
            asyncio.create_task(self._pump(client_reader, upstream_writer)),
            asyncio.create_task(self._pump(upstream_reader, client_writer)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            for writer in (client_writer, upstream_writer):
                writer.transport.abort()
                self._writers.discard(writer)
            self._tasks.difference_update(pumps)

    async def _connect_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to the target, for one accepted client."""
        return await asyncio.open_connection("127.0.0.1", self.target_port)

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()


class SlowLink(TcpProxy):
    """A TCP proxy that holds every chunk ``delay`` seconds each way: a distant database.

    It widens every window of a batch (before, during and after the commit), so that kills
    at random moments land in all of them, and keeps a consumer busy long enough to be hit.
    """

    def __init__(self, target_port: int, *, delay: float) -> None:
        super().__init__(target_port)
        self.delay = delay

    async def _pump(  # type: ignore[override]
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                await asyncio.sleep(self.delay)
                writer.write(data)
                await writer.drain()
