"""A TCP proxy the tests can cut: a broker or database outage without restarting it.

``cut()`` closes every open connection and refuses new ones (the port stops listening);
``restore()`` listens again on the same port. Runs on the test's event loop. ``SlowLink`` is
the same proxy with latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from types import TracebackType
from typing import Any, Self

from orderflow.devstand.embedded import free_port


class TcpProxy:
    """Between a client and ``target_port``, one upstream connection per client.

    Airtight: once ``cut()`` returns, no connection accepted before or during it carries
    another byte, whether it was serving, waiting for its upstream connection, or accepted
    by the loop with its handler not yet started; ``restore()`` revives none of them.
    """

    def __init__(self, target_port: int, *, listen_port: int | None = None) -> None:
        self.target_port = target_port
        self.port = listen_port or free_port()
        self._server: asyncio.Server | None = None
        #: A new token each time the proxy starts listening, None while it is cut: a
        #: connection is served only while the token it was accepted under is current.
        self._listening: object | None = None
        #: Both ends of every connection, the client's from the moment it is handled.
        self._writers: set[asyncio.StreamWriter] = set()
        #: Every connection's handler and pumps.
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> Self:
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
            # Current before the port listens: the first connection may come at once.
            listening = self._listening = object()
            try:
                self._server = await asyncio.start_server(
                    functools.partial(self._accept, listening),
                    "127.0.0.1",
                    self.port,
                    reuse_address=True,
                )
            except BaseException:
                self._listening = None
                raise

    async def cut(self) -> None:
        # First of all: a handler that starts from now on, or whose upstream connection
        # completes from now on, finds its token stale and closes its connection.
        self._listening = None
        if self._server is not None:
            # Stops listening; the connections already accepted are closed below.
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        # The handlers too: one waiting for its upstream connection stops waiting.
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def _accept(
        self,
        listening: object,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
    ) -> None:
        if listening is not self._listening:
            # Accepted before a cut that came since (the loop starts a connection's handler
            # a few turns after accepting it): it is never served.
            client_writer.transport.abort()
            return
        handler = asyncio.current_task()
        assert handler is not None
        # At once, before the first await: a cut from here on closes this connection.
        self._tasks.add(handler)
        self._writers.add(client_writer)
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            try:
                upstream_reader, upstream_writer = await self._connect_upstream()
            except OSError:
                return
            if listening is not self._listening:
                return  # cut while the upstream connection was being made
            self._writers.add(upstream_writer)
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
                self._tasks.difference_update(pumps)
        except asyncio.CancelledError:
            # By cut() (its token is stale then): the connection is closed below and the
            # handler ends without an error (asyncio's stream server would log a cancelled
            # handler as one). Any other cancellation goes on.
            if listening is self._listening:
                raise
        finally:
            for writer in (client_writer, upstream_writer):
                if writer is not None:
                    writer.transport.abort()
                    self._writers.discard(writer)
            self._tasks.discard(handler)

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
