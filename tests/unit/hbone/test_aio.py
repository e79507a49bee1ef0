"""The asyncio adapter: our client and our server over real TLS 1.3 on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator, Callable

import pytest

from nodeagent.hbone.aio import HboneConnection, TunnelError, TunnelStream
from nodeagent.hbone.connection import ErrorCode
from tests.builders import self_signed


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert, key = self_signed(tmp_path_factory.mktemp("tls"), "hbone-aio")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cert)
    for ctx in (server, client):
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.set_alpn_protocols(["h2"])
    return server, client


@contextlib.asynccontextmanager
async def connected(
    tls, on_request: Callable[[TunnelStream], None]
) -> AsyncIterator[HboneConnection]:
    server_ctx, client_ctx = tls
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: HboneConnection(client_side=False, on_request=on_request),
        "127.0.0.1",
        0,
        ssl=server_ctx,
    )
    port = server.sockets[0].getsockname()[1]
    _, conn = await loop.create_connection(
        lambda: HboneConnection(client_side=True),
        "127.0.0.1",
        port,
        ssl=client_ctx,
        server_hostname="127.0.0.1",
    )
    try:
        yield conn
    finally:
        conn.close()
        await asyncio.wait_for(conn.closed, 10)
        server.close()
        await server.wait_closed()


def echo(stream: TunnelStream) -> None:
    stream.respond(200)
    stream.on_data = stream.write
    stream.on_end = stream.write_eof


async def read_all(stream: TunnelStream) -> bytes:
    out = bytearray()
    while chunk := await stream.read():
        out += chunk
    return bytes(out)


async def test_tunnel_carries_large_payload_and_half_close_over_tls(tls):
    async with connected(tls, echo) as conn:
        stream = await asyncio.wait_for(conn.open_tunnel("10.0.0.5:8080"), 10)
        payload = os.urandom(9 * 1024 * 1024 + 1)

        async def send() -> None:
            stream.write(payload)
            await stream.drain()
            stream.write_eof()  # FIN upstream; the reply keeps coming

        _, echoed = await asyncio.wait_for(asyncio.gather(send(), read_all(stream)), 60)
        assert echoed == payload
        assert stream.stream_id not in conn.streams  # both directions closed: forgotten


async def test_ping_returns_at_its_ack_not_at_its_deadline(tls):
    async with connected(tls, echo) as conn:
        await asyncio.wait_for(asyncio.shield(conn.ready), 10)
        for _ in range(3):
            # An hour to answer; the ACK of a live peer ends the wait long before the test's 10 s.
            assert await asyncio.wait_for(conn.ping(3600), 10) is True
        assert conn.pings_acked == 3
        assert not conn.closed.done()


async def test_ping_ends_false_when_the_connection_ends_first(tls):
    async with connected(tls, echo) as conn:
        await asyncio.wait_for(asyncio.shield(conn.ready), 10)
        conn.closed.set_result(None)  # what connection_lost does
        assert await asyncio.wait_for(conn.ping(3600), 10) is False


async def test_refusal_status_raises_tunnel_error(tls):
    async with connected(tls, lambda s: s.respond(401)) as conn:
        with pytest.raises(TunnelError, match="401"):
            await asyncio.wait_for(conn.open_tunnel("10.0.0.5:8080"), 10)


async def test_a_connect_given_up_before_its_answer_is_reset(tls):
    """Cancelled while awaiting its 200 (a timeout, a client gone): RST_STREAM, so the peer
    drops the stream and the connection's stream slot is free again."""
    arrived = asyncio.Event()
    reset: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def hold(stream: TunnelStream) -> None:
        arrived.set()  # and no answer
        stream.on_reset = reset.set_result

    async with connected(tls, hold) as conn:
        opening = asyncio.ensure_future(conn.open_tunnel("10.0.0.5:8080"))
        await asyncio.wait_for(arrived.wait(), 10)
        assert conn.open_outbound_streams == 1
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        assert await asyncio.wait_for(reset, 10) == ErrorCode.CANCEL
        assert conn.open_outbound_streams == 0 and not conn.streams


async def test_server_reset_reaches_client_reader(tls):
    def reset_after_reply(stream: TunnelStream) -> None:
        stream.respond(200)
        stream.write(b"partial")
        stream.reset(ErrorCode.CONNECT_ERROR)

    async with connected(tls, reset_after_reply) as conn:
        stream = await asyncio.wait_for(conn.open_tunnel("10.0.0.5:1"), 10)
        with pytest.raises(TunnelError, match="reset by peer"):
            await asyncio.wait_for(read_all(stream), 10)


async def test_failing_handler_resets_only_its_stream(tls):
    calls = []

    def flaky(stream: TunnelStream) -> None:
        calls.append(stream.authority)
        if len(calls) == 1:
            raise RuntimeError("handler bug")
        echo(stream)

    async with connected(tls, flaky) as conn:
        with pytest.raises(TunnelError):
            await asyncio.wait_for(conn.open_tunnel("10.0.0.5:1"), 10)
        stream = await asyncio.wait_for(conn.open_tunnel("10.0.0.5:2"), 10)
        stream.write(b"still works")
        stream.write_eof()
        assert await asyncio.wait_for(read_all(stream), 10) == b"still works"


async def test_a_dead_connection_tells_each_stream_once_after_closed(tls):
    """`on_lost` replaces a done-callback per stream on the connection's `closed` future."""
    async with connected(tls, echo) as conn:
        streams = [await asyncio.wait_for(conn.open_tunnel(f"10.0.0.5:{p}"), 10) for p in (1, 2)]
        told: list[tuple[int, bool, str]] = []
        for stream in streams:
            stream.on_lost = lambda error, s=stream: told.append(
                (s.stream_id, conn.closed.done(), str(error))
            )
        assert conn.transport is not None
        conn.transport.abort()
        await asyncio.wait_for(conn.closed, 10)
        await asyncio.sleep(0)  # the hooks run soon after, from the loop
        conn.connection_lost(None)  # a second end of the same connection tells no one again
        await asyncio.sleep(0)
        assert sorted(t[0] for t in told) == [s.stream_id for s in streams]
        assert all(closed for _, closed, _ in told)
        assert all(isinstance(s.error, TunnelError) for s in streams)


async def test_a_stream_whose_handler_fails_is_told_it_is_lost(tls):
    lost: list[str] = []

    def keep_but_fail(stream: TunnelStream) -> None:
        stream.respond(200)
        stream.on_lost = lambda error: lost.append(str(error))

        def bug(_data: memoryview) -> None:
            raise RuntimeError("handler bug")

        stream.on_data = bug

    async with connected(tls, keep_but_fail) as conn:
        stream = await asyncio.wait_for(conn.open_tunnel("10.0.0.5:1"), 10)
        stream.write(b"x")
        with pytest.raises(TunnelError, match="reset by peer"):
            await asyncio.wait_for(read_all(stream), 10)
        for _ in range(100):
            if lost:
                break
            await asyncio.sleep(0.01)
        assert len(lost) == 1 and "handler bug" in lost[0]


class Recorder:
    """A StreamConsumer that writes down what it is told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def stream_data(self, data: memoryview) -> None:
        self.events.append(("data", bytes(data)))

    def stream_end(self) -> None:
        self.events.append(("end", None))

    def stream_reset(self, error_code: int) -> None:
        self.events.append(("reset", error_code))

    def stream_lost(self, error: BaseException) -> None:
        self.events.append(("lost", type(error).__name__))


async def test_a_consumer_takes_the_events_and_acks_for_itself(tls):
    consumers: list[Recorder] = []

    def consume(stream: TunnelStream) -> None:
        stream.respond(200)
        consumers.append(Recorder())
        stream.consume(consumers[-1])
        assert stream.manual_ack

    async with connected(tls, consume) as conn:
        stream = await asyncio.wait_for(conn.open_tunnel("10.0.0.5:1"), 10)
        stream.write(b"hello")
        stream.write_eof()
        for _ in range(200):
            if consumers and ("end", None) in consumers[0].events:
                break
            await asyncio.sleep(0.01)
        events = [e for e in consumers[0].events if e != ("data", b"")]  # END_STREAM's DATA
        assert events == [("data", b"hello"), ("end", None)]
        second = await asyncio.wait_for(conn.open_tunnel("10.0.0.5:2"), 10)
        second.reset(ErrorCode.CANCEL)
        for _ in range(200):
            if len(consumers) == 2 and consumers[1].events:
                break
            await asyncio.sleep(0.01)
        assert consumers[1].events == [("reset", ErrorCode.CANCEL)]


async def test_unread_data_holds_back_the_sender(tls):
    big = os.urandom(10 * 1024 * 1024)
    senders: list[TunnelStream] = []

    clear: list[bool] = []

    def flood(stream: TunnelStream) -> None:
        stream.respond(200)
        clear.append(stream.write(b"small"))  # fits: nothing to wait for
        clear.append(stream.write(big))  # beyond the window: the caller must drain
        stream.write_eof()
        senders.append(stream)

    async with connected(tls, flood) as conn:
        stream = await asyncio.wait_for(conn.open_tunnel("10.0.0.5:1"), 10)
        # Nothing is read yet, so the peer may send at most our 4 MiB stream window.
        for _ in range(500):
            if conn.conn.inbound_window(stream.stream_id) == 0:
                break
            await asyncio.sleep(0.01)
        assert conn.conn.inbound_window(stream.stream_id) == 0
        (sender,) = senders
        assert clear == [True, False]
        assert sender.owner.conn.buffered_bytes(sender.stream_id) == len(big) + 5 - 4 * 1024 * 1024
        assert await asyncio.wait_for(read_all(stream), 30) == b"small" + big


async def test_manual_ack_holds_the_peer_until_the_consumer_acks(tls):
    pieces: list[memoryview] = []
    streams: list[TunnelStream] = []

    def hold(stream: TunnelStream) -> None:
        stream.respond(200)
        stream.manual_ack = True
        stream.on_data = pieces.append
        streams.append(stream)

    async with connected(tls, hold) as conn:
        stream = await asyncio.wait_for(conn.open_tunnel("10.0.0.5:1"), 10)
        stream.write(bytes(6 * 1024 * 1024))
        for _ in range(500):
            if sum(map(len, pieces)) >= 4 * 1024 * 1024:
                break
            await asyncio.sleep(0.01)
        assert sum(map(len, pieces)) == 4 * 1024 * 1024  # exactly the server's stream window
        assert conn.conn.buffered_bytes(stream.stream_id) == 2 * 1024 * 1024
        streams[0].ack(4 * 1024 * 1024)
        await asyncio.wait_for(stream.drain(), 10)
        assert conn.conn.buffered_bytes(stream.stream_id) == 0


async def test_refused_tunnel_is_reset_with_no_error_so_its_data_stops(tls):
    refused: list[TunnelStream] = []

    def refuse(stream: TunnelStream) -> None:
        refused.append(stream)
        stream.respond(503)

    async with connected(tls, refuse) as conn:
        with pytest.raises(TunnelError, match="503"):
            await asyncio.wait_for(conn.open_tunnel("10.0.0.5:1"), 10)
        server_conn = refused[0].owner
        assert refused[0].stream_id not in server_conn.streams
        assert server_conn.conn.stream_state(refused[0].stream_id).name == "CLOSED"
        # the connection keeps its full window for the next tunnel
        assert server_conn.conn.inbound_window(0) == 16 * 1024 * 1024
