"""TCP mirroring over loopback sockets, and the idle-timeout watchdog with a fake clock."""

from __future__ import annotations

import asyncio
import socket

import pytest

from nodeagent.proxy.mirror import MIRROR_BUFFER, Mirror
from nodeagent.proxy.outbound import close_when_idle

pytestmark = pytest.mark.unit


async def _sink() -> tuple[socket.socket, asyncio.Future[bytes]]:
    """A loopback server that keeps what one connection sends, answering a little."""
    loop = asyncio.get_running_loop()
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    got: asyncio.Future[bytes] = loop.create_future()

    async def serve() -> None:
        conn, _ = await loop.sock_accept(server)
        data = b""
        while chunk := await loop.sock_recv(conn, 65536):
            data += chunk
            await loop.sock_sendall(conn, b"reply the mirror must ignore")
        conn.close()
        got.set_result(data)

    task = loop.create_task(serve())
    got.add_done_callback(lambda _f: task.cancel())
    return server, got


def _opener(address: tuple[str, int]):  # type: ignore[no-untyped-def]
    async def open_upstream() -> socket.socket:
        sock = socket.socket()
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, address)
        return sock

    return open_upstream


async def test_mirror_copies_every_fed_byte_in_order() -> None:
    server, got = await _sink()
    drops: list[str] = []
    mirror = Mirror(_opener(server.getsockname()), drops.append)
    chunks = [bytes([i]) * 1000 for i in range(50)]
    for chunk in chunks:
        mirror.feed(chunk)  # fed before the shadow connection is even open
    mirror.close()
    assert await asyncio.wait_for(got, 10) == b"".join(chunks)
    await asyncio.wait_for(mirror.closed, 10)
    assert not drops and mirror.sent == 50_000
    server.close()


async def test_a_mirror_that_cannot_open_is_dropped_and_counted() -> None:
    async def refuse() -> socket.socket:
        raise ConnectionRefusedError("nobody there")

    drops: list[str] = []
    mirror = Mirror(refuse, drops.append)
    mirror.feed(b"x" * 100)
    await asyncio.wait_for(mirror.closed, 5)
    assert drops == ["cannot open: nobody there"]
    mirror.feed(b"more")  # after a drop, feeding is a no-op and never raises


async def test_a_mirror_that_falls_behind_is_dropped_without_blocking_the_feeder() -> None:
    never: asyncio.Future[socket.socket] = asyncio.get_running_loop().create_future()

    async def hang() -> socket.socket:
        return await never  # the shadow never opens: every fed byte waits

    drops: list[str] = []
    mirror = Mirror(hang, drops.append)
    for _ in range(MIRROR_BUFFER // 65536 + 2):
        mirror.feed(b"y" * 65536)  # returns at once every time
    assert drops == [f"more than {MIRROR_BUFFER} bytes behind"]
    await asyncio.wait_for(mirror.closed, 5)


class _End:
    def __init__(self) -> None:
        self.received = 0


class _Relay:
    def __init__(self) -> None:
        self.a, self.b = _End(), _End()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.finished = ""

    def finish(self, reason: str) -> None:
        self.finished = reason
        self.done.set_result(None)


async def test_idle_timeout_closes_after_the_quiet_time_and_not_before() -> None:
    relay = _Relay()
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) <= 6:
            relay.a.received += 10  # traffic for the first 6 quarter-periods
        await asyncio.sleep(0)

    await asyncio.wait_for(close_when_idle(relay, 8.0, sleep), 5)  # type: ignore[arg-type]
    assert relay.finished == "idle timeout"
    quiet = sum(slept[6:])
    assert 8.0 <= quiet <= 8.0 + 2.0  # closed once 8 s passed with no byte moving
