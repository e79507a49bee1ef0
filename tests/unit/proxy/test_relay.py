"""The relay over real loopback TCP: exact bytes, half-close, resets, backpressure."""

import asyncio
import contextlib
import errno
import hashlib
import os
import socket
import struct
import subprocess
import sys
from typing import Any

import pytest

from nodeagent.proxy.relay import RelayStats, TcpRelayEnd, connect_socket, relay_pair
from tests.builders import loopback_acceptor


@contextlib.asynccontextmanager
async def relay_to(upstream: tuple[str, int]):
    """A listener on loopback that relays each accepted connection to `upstream`."""
    loop = asyncio.get_running_loop()
    relays: list = []

    async def handle(sock: socket.socket) -> None:
        _, down = await loop.connect_accepted_socket(lambda: TcpRelayEnd("down"), sock)
        _, up = await loop.create_connection(lambda: TcpRelayEnd("up"), *upstream)
        relays.append(relay_pair(down, up))

    try:
        async with loopback_acceptor(handle) as address:
            yield address, relays
    finally:
        for r in relays:
            r.abort("test over")


@contextlib.asynccontextmanager
async def server(handler):
    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()
    finally:
        srv.close()
        await srv.wait_closed()


async def test_bytes_arrive_exactly_both_ways():
    payload = os.urandom(8 * 1024 * 1024 + 123)

    async def sink_and_answer(reader, writer):
        digest = hashlib.sha256()
        total = 0
        while chunk := await reader.read(1 << 16):
            digest.update(chunk)
            total += len(chunk)
        writer.write(f"{total} {digest.hexdigest()}".encode())
        await writer.drain()
        writer.close()

    async with server(sink_and_answer) as up, relay_to(up) as (addr, relays):
        reader, writer = await asyncio.open_connection(*addr)
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        answer = await reader.read()
        writer.close()
        assert answer.decode() == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}"
        stats = await asyncio.wait_for(relays[0].done, 5)
        assert stats == RelayStats(a_to_b=len(payload), b_to_a=len(answer), error="")


async def test_half_close_is_carried_and_reply_still_flows():
    async def reply_after_eof(reader, writer):
        data = await reader.read()  # returns only at EOF: the client's FIN arrived
        writer.write(b"got:" + data)
        await writer.drain()
        writer.close()

    async with server(reply_after_eof) as up, relay_to(up) as (addr, _):
        reader, writer = await asyncio.open_connection(*addr)
        writer.write(b"hello")
        writer.write_eof()  # shut our write side only
        assert await asyncio.wait_for(reader.read(), 5) == b"got:hello"
        writer.close()


async def test_upstream_reset_becomes_reset_downstream():
    async def reset_immediately(reader, writer):
        await reader.read(5)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async with server(reset_immediately) as up, relay_to(up) as (addr, relays):
        reader, writer = await asyncio.open_connection(*addr)
        writer.write(b"12345")
        await writer.drain()
        try:
            data = await asyncio.wait_for(reader.read(100), 5)
        except ConnectionResetError:
            data = None
        # A reset reads as ECONNRESET, never as a clean EOF (b"").
        assert data is None
        stats = await asyncio.wait_for(relays[0].done, 5)
        assert stats.error
        writer.close()


async def test_slow_reader_applies_backpressure_instead_of_buffering():
    release = asyncio.Event()
    received = 0

    async def slow(reader, writer):
        nonlocal received
        await release.wait()
        while chunk := await reader.read(1 << 16):
            received += len(chunk)
        writer.close()

    async with server(slow) as up, relay_to(up) as (addr, relays):
        sock = socket.create_connection(addr)
        sock.setblocking(False)
        sent = 0
        block = b"x" * 65536
        stalled = 0
        # Write until the whole path (our buffer, relay, upstream) pushes back.
        while stalled < 20:
            try:
                sent += sock.send(block)
                stalled = 0
            except BlockingIOError:
                stalled += 1
                await asyncio.sleep(0.01)
        relay = relays[0]
        buffered = relay.b.transport.get_write_buffer_size()
        # The relay holds at most about one high-water mark plus one read, not
        # everything the client sent.
        assert buffered < 1024 * 1024
        assert relay.a._paused
        release.set()
        sock.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(relay.done, 10)
        sock.close()
        assert received == sent


# -- connect_socket --------------------------------------------------------------------------


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_connect_socket_connects_to_an_address_and_to_a_host_name():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        for host in ("127.0.0.1", "localhost"):  # a name goes through the loop's resolver
            with socket.socket() as sock:
                sock.setblocking(False)
                await asyncio.wait_for(connect_socket(sock, (host, port)), 5)
                assert sock.getpeername() == ("127.0.0.1", port)
                listener.accept()[0].close()


async def test_connect_socket_raises_the_connect_error_with_its_errno():
    with socket.socket() as sock:
        sock.setblocking(False)
        with pytest.raises(OSError) as caught:
            await asyncio.wait_for(connect_socket(sock, ("127.0.0.1", unused_port())), 5)
    assert caught.value.errno == errno.ECONNREFUSED
    assert "Connect call failed ('127.0.0.1'" in str(caught.value)


class FinishedButInProgress(socket.socket):
    """A socket whose connect finishes and then says EINPROGRESS, as a non-blocking connect
    to an address of this host normally does (the handshake runs inside connect(2));
    made deterministic here, since where the kernel runs that handshake may vary."""

    def connect(self, address: Any) -> None:
        self.setblocking(True)
        super().connect(address)
        self.setblocking(False)
        raise BlockingIOError(errno.EINPROGRESS, "Operation now in progress")


async def test_a_connect_finished_inside_connect_does_not_wait_on_the_loop(monkeypatch):
    # connect_socket must see that the connect is done and set no writer watch on the loop.
    loop = asyncio.get_running_loop()

    def no_watch(*args: object) -> None:
        raise AssertionError("connect_socket waited on the loop for a finished connect")

    monkeypatch.setattr(loop, "add_writer", no_watch)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        with FinishedButInProgress() as sock:
            sock.setblocking(False)
            await connect_socket(sock, listener.getsockname())
            assert sock.getpeername() == listener.getsockname()
        listener.accept()[0].close()


async def test_a_connect_still_in_flight_waits_on_the_loop_until_it_finishes():
    # A listener whose accept queue is full drops the SYN, so the connect stays in flight
    # until the queue has room and the SYN is sent again (about a second later).
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # the kernel queues backlog + 1 connections
        queued = [socket.socket(), socket.socket()]
        for early in queued:
            early.settimeout(5)
            early.connect(listener.getsockname())
        with socket.socket() as sock:
            sock.setblocking(False)
            connecting = asyncio.ensure_future(connect_socket(sock, listener.getsockname()))
            await asyncio.sleep(0.2)
            assert not connecting.done()
            listener.accept()[0].close()
            await asyncio.wait_for(connecting, 10)
            assert sock.getpeername() == listener.getsockname()
        for early in queued:
            early.close()


_LIBUV_POOL = """
import asyncio, os, socket, sys, uvloop
from nodeagent.proxy.relay import connect_socket

async def main(use_loop):
    loop = asyncio.get_running_loop()
    listener = socket.socket(); listener.bind(("127.0.0.1", 0)); listener.listen(64)
    for _ in range(20):
        sock = socket.socket(); sock.setblocking(False)
        if use_loop:
            await loop.sock_connect(sock, listener.getsockname())
        else:
            await connect_socket(sock, listener.getsockname())
        sock.close(); listener.accept()[0].close()
    tasks = os.listdir("/proc/self/task")
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in tasks]
    print(names.count("libuv-worker"))

uvloop.run(main(sys.argv[1] == "loop"))
"""


@pytest.mark.parametrize(("how", "uses_pool"), [("ours", False), ("loop", True)])
def test_under_uvloop_connect_socket_stays_off_its_thread_pool(how: str, uses_pool: bool):
    # uvloop's sock_connect resolves even a literal address on libuv's thread pool, whose
    # threads start on first use; connect_socket must not start them. ("loop" shows the
    # count can tell the two apart.)
    run = subprocess.run(
        [sys.executable, "-c", _LIBUV_POOL, how], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert (int(run.stdout) > 0) is uses_pool, run.stdout
