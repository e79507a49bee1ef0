"""serve_http1 over real loopback sockets: keep-alive with per-request balancing, bodies both
ways in both framings, local replies, upstream failures, malformed requests (answered as
Envoy does), Upgrade passthrough, header operations, and interop with curl and http.server."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import http.server
import os
import shutil
import socket
import struct
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from nodeagent.hbone.aio import HboneConnection, TunnelStream
from nodeagent.model.routing import HeaderOps
from nodeagent.traffic.resilience import RetryPolicy
from nodeagent.waypoint.exchange import Endpoint, Forward, LocalReply, RequestHead, UpstreamError
from nodeagent.waypoint.http1 import Http1Upstreams, serve_http1
from nodeagent.waypoint.streams import READ_SIZE, SocketByteStream, TunnelByteStream
from tests.unit.waypoint.conftest import (
    Client,
    FakeDispatcher,
    codec_server,
    echo_upstream,
    endpoint,
    eventually,
    listener,
    raw_exchange,
)

BAD_REQUEST = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 11\r\ncontent-type: text/plain\r\n"
    b"connection: close\r\n\r\nBad Request"
)


async def test_keep_alive_routes_and_picks_each_request() -> None:
    async with echo_upstream("a") as (addr_a, conns_a), echo_upstream("b") as (addr_b, conns_b):
        dispatcher = FakeDispatcher([endpoint(addr_a, "a"), endpoint(addr_b, "b")])
        async with codec_server(dispatcher) as address:
            client = await Client.connect(address)
            seen = [(await client.request("GET", f"/r{i}")).header("x-upstream") for i in range(20)]
            await client.close()
    assert seen == ["a", "b"] * 10
    assert len(dispatcher.routed) == len(dispatcher.picked) == 20
    assert [h.path for h in dispatcher.routed] == [f"/r{i}" for i in range(20)]
    # Kept upstream connections are reused: one per endpoint for the whole run.
    assert (len(conns_a), len(conns_b)) == (1, 1)
    assert [r.status for r in dispatcher.records] == [200] * 20
    assert dispatcher.records[0].endpoint == dispatcher.picked[0]


async def test_request_head_seen_by_the_router() -> None:
    async with echo_upstream() as (addr, _):
        dispatcher = FakeDispatcher([endpoint(addr)])
        async with codec_server(dispatcher) as address:
            client = await Client.connect(address)
            await client.request(
                "GET",
                "/p?q=1",
                [
                    ("X-Trace", "t1"),
                    ("Connection", "keep-alive, x-hop"),
                    ("X-Hop", "gone"),
                    ("Keep-Alive", "timeout=5"),
                    ("TE", "trailers"),
                ],
                host="reviews:9080",
            )
            await client.close()
    head = dispatcher.routed[0]
    assert (head.method, head.path, head.authority) == ("GET", "/p?q=1", "reviews:9080")
    assert head.headers == (("x-trace", "t1"),)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_bodies_both_ways_byte_exact(chunked: bool) -> None:
    body = os.urandom(300_000) + b"\r\n0\r\n\r\n" + os.urandom(1000)
    async with echo_upstream() as (addr, _):
        dispatcher = FakeDispatcher([endpoint(addr)])
        async with codec_server(dispatcher) as address:
            client = await Client.connect(address)
            parts = [body[i : i + 70_000] for i in range(0, len(body), 70_000)]
            for _ in range(3):
                response = await client.request(
                    "POST", "/echo", body=parts if chunked else body, chunked=chunked
                )
                assert response.status == 200
                assert response.body == body
                # The upstream saw the client's framing; the client gets the upstream's.
                seen = response.header("x-request-headers") or ""
                if chunked:
                    assert "transfer-encoding=chunked" in seen
                    assert response.header("transfer-encoding") == "chunked"
                else:
                    assert f"content-length={len(body)}" in seen
                    assert response.header("content-length") == str(len(body))
            await client.close()
    assert [r.request_bytes for r in dispatcher.records] == [len(body)] * 3
    assert [r.response_bytes for r in dispatcher.records] == [len(body)] * 3


async def test_large_body_streams_both_ways() -> None:
    """20 MiB echoed while it is still being sent: the upstream answers at once, so this
    needs both directions streaming at the same time (a buffering proxy would still pass,
    a proxy that waits for the whole request before reading the response would not, once
    the socket buffers fill)."""
    block = os.urandom(1 << 20)
    expected = hashlib.sha256(block * 20).hexdigest()
    async with echo_upstream() as (addr, _):
        dispatcher = FakeDispatcher([endpoint(addr)])
        async with codec_server(dispatcher) as address:
            client = await Client.connect(address)
            response = await client.request("PUT", "/big", body=[block] * 20, chunked=True)
            await client.close()
    assert hashlib.sha256(response.body).hexdigest() == expected
    assert dispatcher.records[0].request_bytes == 20 << 20


async def test_local_reply_keeps_the_connection() -> None:
    def route(head: RequestHead) -> Forward | LocalReply:
        if head.path == "/missing":
            return LocalReply(404, (("content-type", "text/plain"),), b"no route", flags="NR")
        return Forward(head)

    async with echo_upstream() as (addr, _):
        dispatcher = FakeDispatcher([endpoint(addr)], route)
        async with codec_server(dispatcher) as address:
            client = await Client.connect(address)
            missing = await client.request("GET", "/missing")
            # A body the reply did not need is read and dropped; the connection goes on.
            posted = await client.request("POST", "/missing", body=b"x" * 100_000)
            found = await client.request("GET", "/found")
            await client.close()
    assert (missing.status, missing.body) == (404, b"no route")
    assert missing.header("content-length") == "8"
    assert posted.status == 404
    assert found.status == 200
    assert [(r.status, r.flags) for r in dispatcher.records] == [
        (404, "NR"),
        (404, "NR"),
        (200, ""),
    ]
    assert len(dispatcher.picked) == 1


async def test_pick_local_reply() -> None:
    dispatcher = FakeDispatcher([])

    async def unhealthy(forward: Forward) -> LocalReply:
        return LocalReply(503, body=b"no healthy upstream", flags="UH")

    dispatcher.pick = unhealthy  # type: ignore[method-assign]
    async with codec_server(dispatcher) as address:
        client = await Client.connect(address)
        response = await client.request("GET", "/")
        await client.close()
    assert (response.status, response.body) == (503, b"no healthy upstream")
    assert dispatcher.records[0].flags == "UH"


async def test_upstream_error_is_its_reply() -> None:
    reply = LocalReply(503, body=b"upstream connect error", flags="UF")
    async with echo_upstream() as (addr, _):
        dispatcher = FakeDispatcher([endpoint(addr)], fail_open=UpstreamError(reply))
        async with codec_server(dispatcher) as address:
            client = await Client.connect(address)
            first = await client.request("GET", "/")
            second = await client.request("POST", "/", body=b"abc")
            await client.close()
    assert (first.status, first.body, second.status) == (503, b"upstream connect error", 503)
    assert [r.flags for r in dispatcher.records] == ["UF", "UF"]


async def test_upstream_closing_before_its_head_is_503_uf() -> None:
    async def hang_up(stream: SocketByteStream) -> None:
        await stream.read()
        stream.abort()

    async with listener(hang_up) as addr:
        dispatcher = FakeDispatcher([endpoint(addr)])
        async with codec_server(dispatcher) as address:
            client = await Client.connect(address)
            response = await client.request("GET", "/")
            again = await client.request("GET", "/")
            await client.close()
    assert response.status == again.status == 503
    assert response.body.startswith(b"upstream connect error or disconnect/reset before headers")
    assert [r.flags for r in dispatcher.records] == ["UF", "UF"]


async def test_upstream_closing_after_its_head_resets_the_client() -> None:
    async def short(stream: SocketByteStream) -> None:
        await stream.read()
        stream.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
        await stream.drain()
        stream.abort()

    async with listener(short) as addr:
        dispatcher = FakeDispatcher([endpoint(addr)])
        async with codec_server(dispatcher) as address:
            data = await raw_exchange(address, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert data.endswith(b"0123456789")  # and then the end, short of content-length
    assert (dispatcher.records[0].status, dispatcher.records[0].flags) == (200, "UC")
    assert dispatcher.records[0].response_bytes == 10


# -- a client that leaves while its response is awaited ----------------------------------------


class StallingUpstream:
    """Reads a request, optionally sends `head` (and stalls mid-body), then waits for the
    waypoint to drop the connection; `dropped` resolves when it did (EOF or reset)."""

    def __init__(self, head: bytes = b"") -> None:
        self.head = head
        self.asked = asyncio.Event()
        self.dropped: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def __call__(self, stream: SocketByteStream) -> None:
        await stream.read()
        if self.head:
            stream.write(self.head)
            await stream.drain()
        self.asked.set()
        try:
            while await stream.read():
                pass
        finally:
            if not self.dropped.done():
                self.dropped.set_result(None)


@pytest.mark.parametrize(
    ("head", "leave", "status"),
    [
        (b"", "close", 0),  # no response yet: Envoy logs response code 0
        (b"", "half-close", 0),  # a FIN is the client gone (Envoy: no half-close on HTTP)
        (b"", "reset", 0),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nstarted", "close", 200),
    ],
)
async def test_a_client_that_leaves_while_the_upstream_stalls_drops_it_dc(
    head: bytes, leave: str, status: int
) -> None:
    """Nothing reads the client between its request and the response, yet its end is seen: the
    stalled upstream request is dropped at once (no route timeout, Istio's default), DC."""
    upstream = StallingUpstream(head)
    async with listener(upstream) as addr:
        dispatcher = FakeDispatcher([endpoint(addr)])
        async with codec_server(dispatcher) as address:
            reader, writer = await asyncio.open_connection(*address)
            writer.write(b"GET /slow HTTP/1.1\r\nhost: a\r\n\r\n")
            await asyncio.wait_for(upstream.asked.wait(), 10)
            if head:
                assert (await reader.readexactly(len(head))).endswith(b"started")
            if leave == "close":
                writer.close()
            elif leave == "reset":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()  # RST
            else:
                writer.write_eof()
            await asyncio.wait_for(upstream.dropped, 10)
            await eventually(lambda: len(dispatcher.records) == 1)
            writer.close()
    record = dispatcher.records[0]
    assert (record.head.path, record.status, record.flags) == ("/slow", status, "DC")


async def test_a_fin_behind_pipelined_bytes_not_yet_read_is_seen() -> None:
    """The client's FIN arrives behind a pipelined request the waypoint has not read yet (it
    reads at most READ_SIZE at a time): its end is known from the transport, not from a read."""
    upstream = StallingUpstream()
    pool = Http1Upstreams()

    async def serve(stream: SocketByteStream) -> None:
        await asyncio.sleep(0.3)  # all of it, FIN included, arrives before the first read
        first = await stream.read()
        await serve_http1(stream, first, dispatcher, pool)

    async with listener(upstream) as addr:
        dispatcher = FakeDispatcher([endpoint(addr)])
        try:
            async with listener(serve) as address:
                _reader, writer = await asyncio.open_connection(*address)
                body = b"x" * (READ_SIZE + 50_000)
                writer.write(b"GET /slow HTTP/1.1\r\nhost: a\r\n\r\n")
                writer.write(
                    b"POST /next HTTP/1.1\r\nhost: a\r\ncontent-length: %d\r\n\r\n" % len(body)
                )
                writer.write(body)
                writer.write_eof()
                await asyncio.wait_for(upstream.dropped, 10)
                await eventually(lambda: len(dispatcher.records) == 1)
                writer.close()
        finally:
            pool.close()
    assert [(r.head.path, r.status, r.flags) for r in dispatcher.records] == [("/slow", 0, "DC")]


async def test_a_client_that_leaves_after_a_streamed_body_drops_the_stalled_upstream() -> None:
    """A body too large to keep is streamed by a pump, which arms the watch once it ends."""
    upstream = StallingUpstream()
    async with listener(upstream) as addr:
        dispatcher = FakeDispatcher([endpoint(addr)])
        async with codec_server(dispatcher) as address:
            _reader, writer = await asyncio.open_connection(*address)
            half = os.urandom(100_000)
            writer.write(
                b"PUT /up HTTP/1.1\r\nhost: a\r\ncontent-length: %d\r\n\r\n" % (2 * len(half))
            )
            writer.write(half)
            await asyncio.wait_for(upstream.asked.wait(), 10)
            writer.write(half)  # the body's end: the response is awaited from here
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.close()
            await asyncio.wait_for(upstream.dropped, 10)
            await eventually(lambda: len(dispatcher.records) == 1)
    record = dispatcher.records[0]
    assert (record.head.path, record.status, record.flags, record.request_bytes) == (
        "/up",
        0,
        "DC",
        2 * len(half),
    )


@pytest.mark.parametrize("leave", ["end", "reset"])
async def test_a_client_that_leaves_through_its_tunnel_drops_the_stalled_upstream(
    leave: str,
) -> None:
    """The waypoint's real downstream: the CONNECT stream's END_STREAM or reset is seen while
    nothing reads it (TunnelByteStream's hooks)."""
    upstream = StallingUpstream()
    served: list[asyncio.Task[None]] = []
    async with listener(upstream) as addr:
        dispatcher = FakeDispatcher([endpoint(addr)])
        pool = Http1Upstreams()

        def on_request(tunnel: TunnelStream) -> None:
            tunnel.respond(200)
            downstream = TunnelByteStream(tunnel)
            served.append(asyncio.create_task(serve_http1(downstream, b"", dispatcher, pool)))

        try:
            async with _hbone(on_request) as conn:
                stream = TunnelByteStream(
                    await asyncio.wait_for(conn.open_tunnel("10.0.0.5:80"), 10)
                )
                stream.write(b"GET /slow HTTP/1.1\r\nhost: a\r\n\r\n")
                await asyncio.wait_for(upstream.asked.wait(), 10)
                if leave == "end":
                    stream.write_eof()
                else:
                    stream.abort()
                await asyncio.wait_for(upstream.dropped, 10)
                await asyncio.wait_for(asyncio.gather(*served), 10)  # ended, not cancelled
        finally:
            pool.close()
    record = dispatcher.records[0]
    assert (record.status, record.flags) == (0, "DC")


async def test_a_shutdown_while_the_client_is_watched_still_cancels_the_session() -> None:
    """The session takes back only its own cancel: a shutdown's goes on (never swallowed)."""
    upstream = StallingUpstream()
    sessions: list[asyncio.Task[None]] = []

    async def serve(stream: SocketByteStream) -> None:
        first = await stream.read()
        session = asyncio.current_task()
        assert session is not None
        sessions.append(session)  # type: ignore[arg-type]
        await serve_http1(stream, first, dispatcher, pool)

    async with listener(upstream) as addr:
        dispatcher = FakeDispatcher([endpoint(addr)])
        pool = Http1Upstreams()
        try:
            async with listener(serve) as address:
                _reader, writer = await asyncio.open_connection(*address)
                writer.write(b"GET /slow HTTP/1.1\r\nhost: a\r\n\r\n")
                await asyncio.wait_for(upstream.asked.wait(), 10)
                sessions[0].cancel()
                await asyncio.wait_for(upstream.dropped, 10)
                with pytest.raises(asyncio.CancelledError):
                    await sessions[0]
                writer.close()
        finally:
            pool.close()


async def test_a_kept_connection_the_upstream_closed_is_replaced() -> None:
    """An upstream that closes idle connections silently: the next bodyless request is sent
    again on a new connection instead of failing."""
    conns: list[int] = []

    async def once(stream: SocketByteStream) -> None:
        conns.append(1)
        await stream.read()
        stream.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await stream.drain()
        await asyncio.sleep(0.05)
        stream.close()

    async with listener(once) as addr:
        dispatcher = FakeDispatcher([endpoint(addr)])
        async with codec_server(dispatcher) as address:
            client = await Client.connect(address)
            statuses = []
            for _ in range(3):
                statuses.append((await client.request("GET", "/")).status)
                await asyncio.sleep(0.2)
            await client.close()
    assert statuses == [200, 200, 200]
    assert len(conns) == 3


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # no Host
        b"GET / HTTP/1.1\r\nhost: a\r\nbad header\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: x\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        b"GET / HTTP/1.1\r\nhost: a\r\n\r\n\x16\x03\x01",  # garbage as the second request
    ],
)
async def test_malformed_request_gets_envoys_400(request_bytes: bytes) -> None:
    async with echo_upstream() as (addr, _):
        dispatcher = FakeDispatcher([endpoint(addr)])
        async with codec_server(dispatcher) as address:
            data = await raw_exchange(address, request_bytes)
    assert data.endswith(BAD_REQUEST)
    assert dispatcher.records[-1].status == 400
    assert dispatcher.records[-1].flags == "DPE"


async def test_oversized_headers_get_431() -> None:
    dispatcher = FakeDispatcher([])
    async with codec_server(dispatcher) as address:
        data = await raw_exchange(
            address, b"GET / HTTP/1.1\r\nhost: a\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n"
        )
    assert data.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert dispatcher.records[-1].flags == "DPE"


async def test_malformed_burst_does_not_touch_good_connections() -> None:
    async with echo_upstream() as (addr, _):
        dispatcher = FakeDispatcher([endpoint(addr)])
        async with codec_server(dispatcher) as address:
            clients = [await Client.connect(address) for _ in range(4)]

            async def good(client: Client) -> list[int]:
                statuses = []
                for i in range(25):
                    response = await client.request("POST", f"/{i}", body=b"%d" % i)
                    assert response.body == b"%d" % i
                    statuses.append(response.status)
                return statuses

            async def bad(i: int) -> bytes:
                garbage = [b"\x00\xff\r\n\r\n", b"GET /\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n"]
                return await raw_exchange(address, garbage[i % 3])

            results = await asyncio.gather(
                *(good(c) for c in clients), *(bad(i) for i in range(60))
            )
            for client in clients:
                await client.close()
    assert all(r == [200] * 25 for r in results[:4])
    assert all(isinstance(r, bytes) and r.endswith(BAD_REQUEST) for r in results[4:])


async def websocket_echo(stream: SocketByteStream) -> None:
    """An upstream that accepts a WebSocket upgrade, then echoes upper-cased."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.read()
    head, rest = data.split(b"\r\n\r\n", 1)
    assert b"\r\nupgrade: websocket" in head.lower()
    assert b"\r\nconnection: upgrade" in head.lower()
    stream.write(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nx-up: 1\r\n\r\n" + b"hello:" + rest
    )
    while chunk := await stream.read():
        stream.write(chunk.upper())
        await stream.drain()
    stream.write_eof()


async def open_websocket(
    address: tuple[str, int], early: bytes = b""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A client's upgrade request (with `early` bytes after its head): the 101's head."""
    reader, writer = await asyncio.open_connection(*address)
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n" + early
    )
    return reader, writer, await reader.readuntil(b"\r\n\r\n")


async def test_upgrade_is_relayed_as_opaque_bytes() -> None:
    async with listener(websocket_echo) as addr:
        dispatcher = FakeDispatcher([endpoint(addr)])
        async with codec_server(dispatcher) as address:
            reader, writer, head = await open_websocket(address, b"early")
            assert head.startswith(b"HTTP/1.1 101 ")
            assert b"upgrade: websocket" in head.lower()
            # "early" came with the request head: relayed after the 101, echoed upper-cased
            # unless it reached the upstream in the same read as the head.
            assert (await reader.readexactly(11)).lower() == b"hello:early"
            writer.write(b"abc")
            assert await reader.readexactly(3) == b"ABC"
            writer.write_eof()
            assert await reader.read() == b""
            writer.close()
    assert dispatcher.routed[0].header("upgrade") == "websocket"
    assert dispatcher.records[0].status == 101


async def test_an_upgrade_outlives_the_route_and_per_try_timeouts() -> None:
    """Envoy takes an upgrade's request as never ended, so neither timeout starts."""
    policy = RetryPolicy(1, 0.2, frozenset({"5xx"}), frozenset())

    def route(head: RequestHead) -> Forward:
        return Forward(head, timeout=0.2, retry=policy)

    async with listener(websocket_echo) as addr:
        dispatcher = FakeDispatcher([endpoint(addr)], route)
        async with codec_server(dispatcher) as address:
            reader, writer, head = await open_websocket(address)
            assert head.startswith(b"HTTP/1.1 101 ")
            assert await reader.readexactly(6) == b"hello:"
            await asyncio.sleep(0.5)  # past both timeouts
            writer.write(b"still")
            assert await reader.readexactly(5) == b"STILL"
            writer.write_eof()
            assert await reader.read() == b""
            writer.close()
    assert (dispatcher.records[0].status, dispatcher.records[0].flags) == (101, "")


async def test_a_shutdown_ends_an_upgraded_connection_both_ways() -> None:
    """Cancelled mid-relay (the waypoint stopping), the upstream's connection ends too."""
    upstream_done = asyncio.Event()

    async def echo_then_note(stream: SocketByteStream) -> None:
        try:
            await websocket_echo(stream)
        finally:
            upstream_done.set()

    async with listener(echo_then_note) as addr:
        dispatcher = FakeDispatcher([endpoint(addr)])
        async with codec_server(dispatcher) as address:
            reader, writer, _ = await open_websocket(address)
            assert await reader.readexactly(6) == b"hello:"
        # The codec server stopped (its sessions cancelled) with the WebSocket open.
        async with asyncio.timeout(3):
            await upstream_done.wait()
        writer.close()


async def test_response_header_operations_and_rewrite() -> None:
    def route(head: RequestHead) -> Forward:
        rewritten = dataclasses.replace(head, path="/v2" + head.path, authority="reviews-v2")
        ops = HeaderOps(
            set=(("x-upstream", "overridden"),), add=(("x-added", "1"),), remove=("x-method",)
        )
        return Forward(rewritten, ops, route="r1")

    async with echo_upstream() as (addr, _):
        dispatcher = FakeDispatcher([endpoint(addr)], route)
        async with codec_server(dispatcher) as address:
            client = await Client.connect(address)
            response = await client.request("GET", "/x")
            await client.close()
    assert response.header("x-upstream") == "overridden"
    assert response.header("x-added") == "1"
    assert response.header("x-method") is None
    assert response.header("x-path") == "/v2/x"
    assert "host=reviews-v2" in (response.header("x-request-headers") or "")
    assert dispatcher.records[0].route == "r1"


async def test_expect_100_continue() -> None:
    async with echo_upstream() as (addr, _):
        dispatcher = FakeDispatcher([endpoint(addr)])
        async with codec_server(dispatcher) as address:
            reader, writer = await asyncio.open_connection(*address)
            writer.write(
                b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\ncontent-length: 5\r\n\r\n"
            )
            interim = await reader.readuntil(b"\r\n\r\n")
            assert interim.startswith(b"HTTP/1.1 100 ")
            writer.write(b"hello")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            assert b"expect" not in head.lower()  # ours answered it; not sent upstream
            assert await reader.readexactly(5) == b"hello"
            writer.close()


async def test_pipelined_requests() -> None:
    async with echo_upstream() as (addr, _):
        dispatcher = FakeDispatcher([endpoint(addr)])
        async with codec_server(dispatcher) as address:
            data = await raw_exchange(
                address,
                b"GET /1 HTTP/1.1\r\nhost: a\r\n\r\n"
                b"POST /2 HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\n\r\nhi"
                b"GET /3 HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
            )
    assert data.count(b"HTTP/1.1 200 OK\r\n") == 3
    assert [h.path for h in dispatcher.routed] == ["/1", "/2", "/3"]


async def test_upstreams_cap_idle_connections() -> None:
    pool = Http1Upstreams(max_idle_per_key=2)
    async with echo_upstream() as (addr, conns):
        dispatcher = FakeDispatcher([endpoint(addr, "k")])
        async with codec_server(dispatcher, pool) as address:
            clients = [await Client.connect(address) for _ in range(5)]
            await asyncio.gather(*(c.request("GET", "/") for c in clients))
            for client in clients:
                await client.close()
            assert pool.idle("k") == 2
    assert len(conns) == 5  # all at once: none idle to share
    assert pool.idle("k") == 0  # closed with the server


async def test_a_kept_connection_without_idle_timeout_closes_after_the_default() -> None:
    pool = Http1Upstreams(idle_timeout=0.2)  # stands in for Envoy's 1 h
    assert Http1Upstreams().idle_timeout == 3600.0
    async with echo_upstream() as (addr, conns):
        dispatcher = FakeDispatcher([Endpoint(key="k", address=f"{addr[0]}:{addr[1]}")])
        async with codec_server(dispatcher, pool) as address:
            client = await Client.connect(address)
            await client.request("GET", "/")
            assert pool.idle("k") == 1
            await asyncio.sleep(0.4)
            assert pool.idle("k") == 0
            await client.request("GET", "/")
            await client.close()
    assert len(conns) == 2  # the expired one was not reused


async def test_a_shorter_idle_timeout_given_later_still_closes_first() -> None:
    pool = Http1Upstreams(idle_timeout=5.0)
    async with echo_upstream() as (addr, conns):
        text = f"{addr[0]}:{addr[1]}"
        long_idle = Endpoint(key="long", address=text)
        short_idle = Endpoint(key="short", address=text, idle_timeout=0.2)
        dispatcher = FakeDispatcher([long_idle])
        async with codec_server(dispatcher, pool) as address:
            client = await Client.connect(address)
            await client.request("GET", "/")
            dispatcher.endpoints[:] = [short_idle]
            await client.request("GET", "/")
            assert (pool.idle("long"), pool.idle("short")) == (1, 1)
            await asyncio.sleep(0.5)
            assert (pool.idle("long"), pool.idle("short")) == (1, 0)
            await client.close()
    assert len(conns) == 2


async def test_idle_timeout_closes_a_kept_connection_and_max_requests_retires_it() -> None:
    pool = Http1Upstreams()
    async with echo_upstream() as (addr, conns):
        text = f"{addr[0]}:{addr[1]}"
        idle = Endpoint(key="idle", address=text, idle_timeout=0.2)
        once = Endpoint(key="once", address=text, max_requests=1)
        dispatcher = FakeDispatcher([idle])
        async with codec_server(dispatcher, pool) as address:
            client = await Client.connect(address)
            await client.request("GET", "/")
            assert pool.idle("idle") == 1
            await asyncio.sleep(0.4)
            assert pool.idle("idle") == 0  # connectionPool.http.idleTimeout
            dispatcher.endpoints[:] = [once]
            for _ in range(3):
                assert (await client.request("GET", "/")).status == 200
            assert pool.idle("once") == 0  # maxRequestsPerConnection: 1
            await client.close()
    assert len(conns) == 4  # one for `idle`, then one per request to `once`


# --- interop: curl in front, Python's http.server behind ---

_SIZE = 100 << 20
_BLOCK = hashlib.sha256(b"seed").digest() * (1 << 15)  # 1 MiB, deterministic


class _Upstream(http.server.BaseHTTPRequestHandler):
    """Reads the request body (either framing), answers 100 MiB (framing by path) and the
    body's sha256 in a header."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        digest = hashlib.sha256()
        received = 0
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                remaining = size
                while remaining:
                    chunk = self.rfile.read(min(remaining, 1 << 20))
                    digest.update(chunk)
                    remaining -= len(chunk)
                received += size
                self.rfile.readline()
        else:
            remaining = int(self.headers["content-length"])
            while remaining:
                chunk = self.rfile.read(min(remaining, 1 << 20))
                digest.update(chunk)
                remaining -= len(chunk)
                received += len(chunk)
        chunked = self.path == "/chunked"
        self.send_response(200)
        self.send_header("x-request-sha256", digest.hexdigest())
        self.send_header("x-request-bytes", str(received))
        if chunked:
            self.send_header("transfer-encoding", "chunked")
        else:
            self.send_header("content-length", str(_SIZE))
        self.end_headers()
        for _ in range(_SIZE // len(_BLOCK)):
            if chunked:
                self.wfile.write(b"%x\r\n" % len(_BLOCK) + _BLOCK + b"\r\n")
            else:
                self.wfile.write(_BLOCK)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")


@contextlib.contextmanager
def _http_server() -> Iterator[tuple[str, int]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[:2]  # type: ignore[misc]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.asynccontextmanager
async def _served_http_server() -> AsyncIterator[tuple[tuple[str, int], FakeDispatcher]]:
    with _http_server() as upstream:
        dispatcher = FakeDispatcher([endpoint(upstream)])
        async with codec_server(dispatcher) as address:
            yield address, dispatcher


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_interop_curl_and_http_server_100_mib(chunked: bool, tmp_path: Path) -> None:
    upload = tmp_path / "upload"
    with upload.open("wb") as f:
        for _ in range(_SIZE // len(_BLOCK)):
            f.write(_BLOCK[::-1])
    download = tmp_path / "download"
    headers = tmp_path / "headers"
    args = ["-sS", "--fail", "--data-binary", f"@{upload}", "-D", str(headers), "-o", str(download)]
    args += ["-H", "content-type: application/octet-stream", "-H", "expect:"]
    if chunked:
        args += ["-H", "transfer-encoding: chunked"]
    async with _served_http_server() as (address, dispatcher):
        url = f"http://{address[0]}:{address[1]}/{'chunked' if chunked else 'length'}"
        curl = await asyncio.create_subprocess_exec("curl", *args, url)
        assert await curl.wait() == 0
    sent = hashlib.sha256(_BLOCK[::-1] * (_SIZE // len(_BLOCK))).hexdigest()
    head = headers.read_text().lower()
    assert f"x-request-sha256: {sent}" in head
    assert f"x-request-bytes: {_SIZE}" in head
    assert ("transfer-encoding: chunked" in head) == chunked
    assert download.stat().st_size == _SIZE
    digest = hashlib.sha256()
    with download.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    assert digest.hexdigest() == hashlib.sha256(_BLOCK * (_SIZE // len(_BLOCK))).hexdigest()
    record = dispatcher.records[0]
    assert (record.status, record.request_bytes, record.response_bytes) == (200, _SIZE, _SIZE)


@contextlib.asynccontextmanager
async def _hbone(on_request: Callable[[TunnelStream], None]) -> AsyncIterator[HboneConnection]:
    """An HBONE client connected to an HBONE server on loopback (plain TCP: TLS changes
    nothing for the codec)."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: HboneConnection(client_side=False, on_request=on_request), "127.0.0.1", 0
    )
    _, conn = await loop.create_connection(
        lambda: HboneConnection(client_side=True), "127.0.0.1", server.sockets[0].getsockname()[1]
    )
    try:
        yield conn
    finally:
        conn.close()
        await asyncio.wait_for(conn.closed, 10)
        server.close()
        await server.wait_closed()


async def test_over_an_hbone_tunnel() -> None:
    """The waypoint's real downstream: a CONNECT tunnel, through TunnelByteStream (plain TCP
    here; TLS changes nothing for the codec)."""
    served: list[asyncio.Task[None]] = []
    async with echo_upstream() as (addr, _):
        dispatcher = FakeDispatcher([endpoint(addr)])
        pool = Http1Upstreams()

        def on_request(tunnel: TunnelStream) -> None:
            tunnel.respond(200)
            served.append(
                asyncio.create_task(serve_http1(TunnelByteStream(tunnel), b"", dispatcher, pool))
            )

        try:
            async with _hbone(on_request) as conn:
                stream = TunnelByteStream(
                    await asyncio.wait_for(conn.open_tunnel("10.0.0.5:80"), 10)
                )
                body = os.urandom(200_000)
                stream.write(
                    b"POST /t HTTP/1.1\r\nhost: a\r\ncontent-length: %d\r\n\r\n" % len(body) + body
                )
                stream.write(b"GET /u HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
                received = bytearray()
                async with asyncio.timeout(10):
                    while chunk := await stream.read():
                        received += chunk
                    await asyncio.gather(*served)
                stream.write_eof()
        finally:
            pool.close()
    assert bytes(received).count(b"HTTP/1.1 200 OK\r\n") == 2
    assert body in bytes(received)
    assert [r.path for r in dispatcher.routed] == ["/t", "/u"]


async def test_upstream_framings_head_and_close() -> None:
    """An HTTP/1.0 upstream whose body runs to its close reaches an HTTP/1.1 client chunked;
    a response that says `connection: close` is not kept; HEAD gets no body."""
    conns: list[str] = []

    async def old_server(stream: SocketByteStream) -> None:
        data = await stream.read()
        conns.append(data.split(b" ", 2)[1].decode())
        if data.startswith(b"HEAD "):
            stream.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n")
            await stream.drain()
            await stream.read()
            return
        if b"/close" in data:
            stream.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok")
        else:
            stream.write(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
        await stream.drain()
        stream.write_eof()
        await stream.read()

    async with listener(old_server) as addr:
        dispatcher = FakeDispatcher([endpoint(addr)])
        pool = Http1Upstreams()
        async with codec_server(dispatcher, pool) as address:
            client = await Client.connect(address)
            old = await client.request("GET", "/old")
            closing = await client.request("GET", "/close")
            head = await client.request("HEAD", "/head")
            await client.close()
            idle = pool.idle(dispatcher.picked[0].key)
    assert (old.status, old.body, old.header("transfer-encoding")) == (
        200,
        b"until the end",
        "chunked",
    )
    assert (closing.body, closing.header("connection")) == (b"ok", None)
    assert (head.status, head.body, head.header("content-length")) == (200, b"", "1234")
    assert conns == ["/old", "/close", "/head"]  # none of the first two was reused
    assert idle == 1  # the HEAD's connection


async def test_a_header_h11_refuses_to_write_ends_only_that_connection() -> None:
    def route(head: RequestHead) -> Forward:
        if head.path == "/bad":
            return Forward(head, HeaderOps(set=(("x-bad", "a\r\nb"),)))
        return Forward(head)

    async with echo_upstream() as (addr, _):
        dispatcher = FakeDispatcher([endpoint(addr)], route)
        async with codec_server(dispatcher) as address:
            try:
                data = await raw_exchange(address, b"GET /bad HTTP/1.1\r\nhost: a\r\n\r\n")
            except ConnectionResetError:
                data = b""  # an abort: a reset or a bare end, either way no response
            client = await Client.connect(address)
            good = await client.request("GET", "/good")
            await client.close()
    assert data == b""
    assert good.status == 200
    assert [(r.head.path, r.status) for r in dispatcher.records] == [("/bad", 0), ("/good", 200)]


async def test_tunnel_byte_stream_after_a_reset_raises_connection_error() -> None:
    def on_request(tunnel: TunnelStream) -> None:
        tunnel.respond(200)

    async with _hbone(on_request) as conn:
        stream = TunnelByteStream(await asyncio.wait_for(conn.open_tunnel("10.0.0.5:80"), 10))
        stream.write(b"x")
        stream.write_eof()
        with pytest.raises(ConnectionError):
            stream.write(b"after the end")
        stream.abort()
        stream.abort()  # twice: still quiet
        with pytest.raises(ConnectionError):
            stream.write_eof()


async def test_an_upgrade_refused_keeps_the_connection_as_http() -> None:
    def route(head: RequestHead) -> Forward | LocalReply:
        return LocalReply(404, flags="NR") if head.path == "/none" else Forward(head)

    upgrade = [("connection", "upgrade"), ("upgrade", "websocket")]
    async with echo_upstream() as (addr, _):
        dispatcher = FakeDispatcher([endpoint(addr)], route)
        async with codec_server(dispatcher) as address:
            client = await Client.connect(address)
            refused = await client.request("GET", "/none", upgrade)
            plain = await client.request("GET", "/ws", upgrade)  # the echo answers 200
            after = await client.request("GET", "/after")
            await client.close()
    assert (refused.status, plain.status, after.status) == (404, 200, 200)
    assert "upgrade=websocket" in (plain.header("x-request-headers") or "")
    assert plain.header("upgrade") is None
