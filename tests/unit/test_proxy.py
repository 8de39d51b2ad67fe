"""The test proxies themselves (``tests.proxy``), against a local echo server: after ``cut()``
returns, no connection carries a byte, whatever state it was in at the cut; ``restore()``
serves new connections and revives none of the old.

The outage tests rely on it: a connection that slips through a cut is a broker or database
that is not down at all.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from tests.proxy import SlowLink, TcpProxy

pytestmark = pytest.mark.timeout(30)

#: Long enough for a leaked connection to show itself, short enough for a unit test.
WITHIN = 5.0


@pytest.fixture(autouse=True)
async def no_loop_errors() -> AsyncIterator[None]:
    """Whatever the event loop reports as an error (a handler's failure, say) fails the test."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        yield
        for _ in range(3):  # callbacks of tasks that ended with the test
            await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    assert errors == []


@dataclass
class Echo:
    """A local server that sends back what it receives, and counts what reached it."""

    port: int = 0
    connections: int = 0
    received: bytearray = field(default_factory=bytearray)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                self.received += data
                writer.write(data)
                await writer.drain()
        writer.close()


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    server = Echo()
    listening = await asyncio.start_server(server.serve, "127.0.0.1", 0)
    server.port = listening.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listening.close()


class Gate:
    """Holds connections in the windows every accept passes through, until told to go on:
    before the proxy's handler runs (the loop starts it a few turns after the accept) while
    ``admit`` is clear, and before the upstream connection is made until ``release`` is set.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        #: Set once a connection is accepted.
        self.accepted = asyncio.Event()
        self.admit = asyncio.Event()
        self.admit.set()
        #: Set once a connection waits for its upstream connection.
        self.connecting = asyncio.Event()
        self.release = asyncio.Event()

    async def _accept(self, *args: object) -> None:
        self.accepted.set()
        await self.admit.wait()
        await super()._accept(*args)  # type: ignore[misc]

    async def _connect_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self.connecting.set()
        await self.release.wait()
        return await super()._connect_upstream()  # type: ignore[misc]


class GatedProxy(Gate, TcpProxy):
    pass


class GatedSlowLink(Gate, SlowLink):
    pass


Proxy = GatedProxy | GatedSlowLink

PROXIES: dict[str, Callable[[int], Proxy]] = {
    "TcpProxy": GatedProxy,
    "SlowLink": lambda port: GatedSlowLink(port, delay=0.01),
}


@pytest.fixture(params=sorted(PROXIES))
def make_proxy(request: pytest.FixtureRequest) -> Callable[[int], Proxy]:
    return PROXIES[request.param]


async def connect(proxy: TcpProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    """Send ``data``; what comes back before the connection closes (b"" if it is closed)."""
    with contextlib.suppress(ConnectionError):
        writer.write(data)
        await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(65536), WITHIN)
    except ConnectionError:
        return b""


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def test_the_proxy_carries_both_ways(echo: Echo, make_proxy: Callable[[int], Proxy]) -> None:
    async with make_proxy(echo.port) as proxy:
        proxy.release.set()
        reader, writer = await connect(proxy)
        try:
            assert await answer(reader, writer, b"ping") == b"ping"
        finally:
            await close(writer)


async def test_an_open_connection_carries_nothing_after_the_cut(
    echo: Echo, make_proxy: Callable[[int], Proxy]
) -> None:
    async with make_proxy(echo.port) as proxy:
        proxy.release.set()
        reader, writer = await connect(proxy)
        try:
            assert await answer(reader, writer, b"before") == b"before"
            await proxy.cut()
            assert await answer(reader, writer, b"after") == b""
        finally:
            await close(writer)
    assert echo.received == b"before"


async def test_a_connection_accepted_before_the_cut_carries_nothing_after_it(
    echo: Echo, make_proxy: Callable[[int], Proxy]
) -> None:
    """Accepted, its upstream connect still under way at the cut: once the connect could
    complete, the connection must still be dead (it is what let a relay publish through a
    'broker outage')."""
    async with make_proxy(echo.port) as proxy:
        reader, writer = await connect(proxy)
        try:
            await asyncio.wait_for(proxy.connecting.wait(), WITHIN)
            await proxy.cut()
            proxy.release.set()
            assert await answer(reader, writer, b"after the cut") == b""
        finally:
            await close(writer)
    assert (echo.connections, echo.received) == (0, b"")


async def test_restore_revives_no_connection_of_before_the_cut(
    echo: Echo, make_proxy: Callable[[int], Proxy]
) -> None:
    async with make_proxy(echo.port) as proxy:
        old_reader, old_writer = await connect(proxy)
        try:
            await asyncio.wait_for(proxy.connecting.wait(), WITHIN)
            await proxy.cut()
            await proxy.restore()
            proxy.release.set()
            reader, writer = await connect(proxy)
            try:
                assert await answer(reader, writer, b"new") == b"new"
            finally:
                await close(writer)
            assert await answer(old_reader, old_writer, b"old") == b""
        finally:
            await close(old_writer)
    assert (echo.connections, echo.received) == (1, b"new")


async def test_a_connection_accepted_before_the_cut_and_handled_after_it_carries_nothing(
    echo: Echo, make_proxy: Callable[[int], Proxy]
) -> None:
    async with make_proxy(echo.port) as proxy:
        proxy.admit.clear()
        proxy.release.set()
        reader, writer = await connect(proxy)
        try:
            await asyncio.wait_for(proxy.accepted.wait(), WITHIN)
            await proxy.cut()
            proxy.admit.set()
            assert await answer(reader, writer, b"after the cut") == b""
        finally:
            await close(writer)
    assert (echo.connections, echo.received) == (0, b"")
