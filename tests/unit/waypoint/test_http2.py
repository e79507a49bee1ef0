"""The HTTP/2 codec over real loopback sockets: curl and grpcio clients in, grpcio servers
upstream (independent HTTP/2 implementations on both sides of serve_http2)."""

from __future__ import annotations

import asyncio
import contextlib
import os

import grpc
import h2.config
import h2.connection
import h2.events
import hpack
import pytest
from h2.errors import ErrorCodes

from nodeagent.model.routing import HeaderOps
from nodeagent.waypoint.http2 import PREFACE, Http2Upstreams, request_head

from .h2_support import (
    ECHO,
    WHO,
    FakeDispatcher,
    Seen,
    curl,
    grpc_call,
    grpc_frame,
    grpc_server,
    receive,
    scripted_upstream,
    send_body,
    unary,
    waypoint,
)

GRPC_HEADERS = ("-H", "content-type: application/grpc", "-H", "te: trailers")
# The head of a gRPC call to ECHO, for raw h2 clients.
ECHO_REQUEST = [
    (":method", "POST"),
    (":scheme", "http"),
    (":authority", "x"),
    (":path", ECHO),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
]


def test_request_head_from_pseudo_headers() -> None:
    head = request_head(
        [
            (b":method", b"POST"),
            (b":scheme", b"https"),
            (b":authority", b"svc:80"),
            (b":path", b"/a?b=1"),
            (b"x-user", b"ios"),
            (b"x-raw", b"\xff"),
        ]
    )
    assert (head.method, head.path, head.authority, head.scheme) == (
        "POST",
        "/a?b=1",
        "svc:80",
        "https",
    )
    assert head.protocol == "HTTP/2"
    assert head.header("x-user") == "ios"
    assert head.header("x-raw") is not None  # a non-UTF-8 byte survives, escaped


async def test_curl_grpc_request_through_codec_has_trailers() -> None:
    with grpc_server("v1") as port:
        dispatcher = FakeDispatcher({"v1": port})
        async with waypoint(dispatcher) as (wp, _):
            result = await curl(
                f"http://127.0.0.1:{wp}{ECHO}", *GRPC_HEADERS, data=grpc_frame(b"hello")
            )
    assert result.head.startswith("HTTP/2 200")
    assert "grpc-status: 0" in result.head  # a trailer: curl dumps it after the headers
    assert "x-served-by: v1" in result.head
    assert result.body == grpc_frame(b"v1|hello")
    [record] = dispatcher.records
    assert (record.status, record.flags, record.route) == (200, "", "v1")
    assert record.request_bytes == len(grpc_frame(b"hello"))
    assert record.response_bytes == len(grpc_frame(b"v1|hello"))
    assert record.endpoint is not None and record.endpoint.key == "v1"
    assert record.head.protocol == "HTTP/2" and record.duration > 0


async def test_grpc_client_call_through_codec() -> None:
    with grpc_server("v1") as port:
        dispatcher = FakeDispatcher({"v1": port})
        async with waypoint(dispatcher) as (wp, _):
            reply, trailers = await asyncio.to_thread(grpc_call, wp, ECHO, b"ping")
            # A gRPC error travels as a trailers-only response.
            with pytest.raises(grpc.RpcError) as failure:
                await asyncio.to_thread(grpc_call, wp, "/echo.Echo/Fail", b"")
    assert reply == b"v1|ping"
    assert trailers["x-served-by"] == "v1"
    assert failure.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert failure.value.details() == "no v1"  # type: ignore[attr-defined]


async def test_routing_by_header_per_request_on_one_connection() -> None:
    with grpc_server("v1") as p1, grpc_server("v2") as p2:
        dispatcher = FakeDispatcher({"v1": p1, "v2": p2})
        async with waypoint(dispatcher) as (wp, pool):

            def calls() -> list[bytes]:
                # One channel: every call rides the same downstream connection.
                out = []
                with grpc.insecure_channel(f"127.0.0.1:{wp}") as channel:
                    who = unary(channel, WHO)
                    for i in range(20):
                        md = (("x-user", "v2"),) if i % 2 else ()
                        out.append(who(b"", metadata=md, timeout=30))
                return out

            answers = await asyncio.to_thread(calls)
            # curl, another client, lands by the same rule.
            ios = await curl(
                f"http://127.0.0.1:{wp}{WHO}",
                *GRPC_HEADERS,
                "-H",
                "x-user: v2",
                data=grpc_frame(b""),
            )
            assert pool.connection_count() == 2  # one shared connection per endpoint
    assert answers == [b"v2 v2" if i % 2 else b"v1 v1" for i in range(20)]
    assert ios.body == grpc_frame(b"v2 v2")
    assert dispatcher.opened.count("v1") == 1 and dispatcher.opened.count("v2") == 1
    assert [r.endpoint.key for r in dispatcher.records if r.endpoint] == dispatcher.picked


async def test_concurrent_streams_and_large_bodies_byte_exact() -> None:
    bodies = [os.urandom(n) for n in (3 << 20, 1 << 20, 5 << 20 | 7, 17, 0)]
    with grpc_server("v1") as port:
        dispatcher = FakeDispatcher({"v1": port})
        async with waypoint(dispatcher) as (wp, _):

            def calls() -> list[bytes]:
                with grpc.insecure_channel(
                    f"127.0.0.1:{wp}",
                    options=[("grpc.max_receive_message_length", 64 << 20)],
                ) as channel:
                    echo = unary(channel, ECHO)
                    futures = [echo.future(b, timeout=60) for b in bodies]
                    return [f.result() for f in futures]

            grpc_replies, curl_reply = await asyncio.gather(
                asyncio.to_thread(calls),
                curl(f"http://127.0.0.1:{wp}{ECHO}", *GRPC_HEADERS, data=grpc_frame(bodies[0])),
            )
    assert grpc_replies == [b"v1|" + b for b in bodies]
    assert curl_reply.body == grpc_frame(b"v1|" + bodies[0])
    assert sorted(r.request_bytes for r in dispatcher.records) == sorted(
        len(grpc_frame(b)) for b in [*bodies, bodies[0]]
    )


async def test_local_reply_and_response_header_ops() -> None:
    with grpc_server("v1") as port:
        ops = HeaderOps(
            set=(("x-set", "1"),), add=(("x-added", "a"),), remove=("grpc-accept-encoding",)
        )
        dispatcher = FakeDispatcher({"v1": port}, response_headers=ops)
        async with waypoint(dispatcher) as (wp, _):
            local = await curl(f"http://127.0.0.1:{wp}/local/thing")
            forwarded = await curl(
                f"http://127.0.0.1:{wp}{ECHO}", *GRPC_HEADERS, data=grpc_frame(b"x")
            )
    assert local.head.startswith("HTTP/2 418")
    assert "x-local: yes" in local.head
    assert local.body == b"local /local/thing"
    assert "x-set: 1" in forwarded.head and "x-added: a" in forwarded.head
    assert "grpc-accept-encoding" not in forwarded.head
    assert [(r.status, r.flags) for r in dispatcher.records] == [(418, "XX"), (200, "")]


async def test_upstream_connect_failure_is_503_uf() -> None:
    dispatcher = FakeDispatcher({})  # v1 -> port 1: refused
    async with waypoint(dispatcher) as (wp, _):
        result = await curl(f"http://127.0.0.1:{wp}/x")
        none = await curl(f"http://127.0.0.1:{wp}/x", "-H", "x-user: none")
    assert result.head.startswith("HTTP/2 503")
    assert none.head.startswith("HTTP/2 503") and none.body == b"no healthy upstream"
    assert [(r.status, r.flags) for r in dispatcher.records] == [(503, "UF"), (503, "UH")]


def _raw_client() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    return conn


async def test_malformed_input_is_contained() -> None:
    with grpc_server("v1") as port:
        dispatcher = FakeDispatcher({"v1": port})
        async with waypoint(dispatcher) as (wp, _):
            # Garbage after the preface: a GOAWAY, the connection ends, nothing else.
            reader, writer = await asyncio.open_connection("127.0.0.1", wp)
            writer.write(PREFACE + b"\x00\x00\x04\x09\x00\x00\x00\x00\x01garbage" * 4)
            garbage = await receive(reader, writer, _raw_client(), lambda seen: False)
            writer.close()
            assert garbage.goaway == [ErrorCodes.PROTOCOL_ERROR]

            # A request without :path is a PROTOCOL_ERROR for h2: a GOAWAY, after the good
            # request before it was answered.
            reader, writer = await asyncio.open_connection("127.0.0.1", wp)
            conn = _raw_client()
            bad = [(":method", "GET"), (":scheme", "http"), (":authority", "x")]
            conn.send_headers(1, [*bad, (":path", "/local/ok")], end_stream=True)
            writer.write(conn.data_to_send())
            seen = await receive(reader, writer, conn, lambda seen: 1 in seen.ended)
            # Hand-made HEADERS frame (h2 refuses to send it): stream 3, no :path.
            block = hpack.Encoder().encode(bad)
            frame = len(block).to_bytes(3, "big") + b"\x01\x05" + (3).to_bytes(4, "big")
            writer.write(frame + block)
            await receive(reader, writer, conn, lambda seen: False, seen)  # until it closes
            writer.close()
            good = await curl(f"http://127.0.0.1:{wp}{ECHO}", *GRPC_HEADERS, data=grpc_frame(b"ok"))
    assert seen.status == {1: b"418"}
    assert seen.goaway == [ErrorCodes.PROTOCOL_ERROR]
    assert good.body == grpc_frame(b"v1|ok")


async def test_upstream_connection_replaced_when_stream_ids_run_out() -> None:
    with grpc_server("v1") as port:
        dispatcher = FakeDispatcher({"v1": port})
        # Stream ids 1, 3, 5: the fourth request needs a new connection.
        async with waypoint(dispatcher, Http2Upstreams(max_stream_id=5)) as (wp, _):
            for i in range(4):
                reply, _ = await asyncio.to_thread(grpc_call, wp, ECHO, str(i).encode())
                assert reply == f"v1|{i}".encode()
    assert dispatcher.opened == ["v1", "v1"]


async def test_client_reset_propagates_and_session_survives() -> None:
    with grpc_server("v1") as port:
        dispatcher = FakeDispatcher({"v1": port})
        async with waypoint(dispatcher) as (wp, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", wp)
            conn = _raw_client()
            conn.send_headers(1, ECHO_REQUEST)
            conn.send_data(1, b"\x00\x00\x00\x00\x10partial")
            writer.write(conn.data_to_send())
            await asyncio.sleep(0.2)
            conn.reset_stream(1)
            # The next stream on the same connection still works.
            conn.send_headers(3, ECHO_REQUEST)
            conn.send_data(3, grpc_frame(b"again"), end_stream=True)
            writer.write(conn.data_to_send())
            seen = await receive(reader, writer, conn, lambda seen: 3 in seen.trailers)
            writer.close()
    assert seen.body[3] == grpc_frame(b"v1|again")
    assert seen.trailers[3][b"grpc-status"] == b"0"
    first = next(r for r in dispatcher.records if r.request_bytes < 20 and r.status != 200)
    assert first.flags == "DR"


async def test_backpressure_slow_client_holds_upstream() -> None:
    """A client that grants no window: the codec stops acknowledging upstream DATA, so the
    upstream's sending stalls at about one stream window; then all of it arrives intact."""
    body = os.urandom(6 << 20)
    with grpc_server("v1") as port:
        dispatcher = FakeDispatcher({"v1": port})
        async with waypoint(dispatcher) as (wp, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", wp)
            conn = _raw_client()  # 64 KiB windows, acknowledged only later
            conn.send_headers(1, ECHO_REQUEST)
            writer.write(conn.data_to_send())
            message = memoryview(grpc_frame(body))
            got = bytearray()
            trailers: dict[bytes, bytes] = {}
            reading = False

            async def pump_in() -> None:
                nonlocal message
                while message:
                    n = min(len(message), conn.local_flow_control_window(1), 16384)
                    if n:
                        conn.send_data(1, message[:n], end_stream=n == len(message))
                        message = message[n:]
                        writer.write(conn.data_to_send())
                        await writer.drain()
                    else:
                        await asyncio.sleep(0.001)

            async def read_out() -> None:
                nonlocal trailers
                while not trailers:
                    data = await asyncio.wait_for(reader.read(65536), 30)
                    assert data
                    for event in conn.receive_data(data):
                        if isinstance(event, h2.events.DataReceived):
                            got.extend(event.data)
                            if reading:
                                conn.acknowledge_received_data(event.flow_controlled_length, 1)
                        elif isinstance(event, h2.events.TrailersReceived):
                            trailers = dict(event.headers)
                    writer.write(conn.data_to_send())

            reader_task = asyncio.create_task(read_out())
            await pump_in()
            # Wait for the upstream to start answering, then see it held back.
            for _ in range(200):
                if len(got) >= 65535 - 9:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            held = dispatcher.received["v1"]
            assert len(got) <= 65535
            assert held < len(body) // 2, held  # about one 1 MiB stream window, not 6 MiB
            # The stalled client holds only its stream: another client, on the same
            # upstream connection, is answered meanwhile.
            other = os.urandom(3 << 20)
            reply, _ = await asyncio.to_thread(grpc_call, wp, ECHO, other)
            assert reply == b"v1|" + other
            assert dispatcher.opened == ["v1"]
            reading = True
            # Acknowledge what is already in; the rest then flows.
            conn.acknowledge_received_data(len(got), 1)
            writer.write(conn.data_to_send())
            await reader_task
            writer.close()
    assert bytes(got) == grpc_frame(b"v1|" + body)
    assert trailers[b"grpc-status"] == b"0"


async def test_upstream_goaway_and_idle_connections_are_replaced() -> None:
    # grpcio sends GOAWAY once a connection is older than max_connection_age.
    age = ("grpc.max_connection_age_ms", 300)
    with (
        grpc_server("v1", age, ("grpc.max_connection_age_grace_ms", 100)) as p1,
        grpc_server("v2") as p2,
    ):
        dispatcher = FakeDispatcher({"v1": p1, "v2": p2})
        async with waypoint(dispatcher, Http2Upstreams(idle_timeout=0.3)) as (wp, pool):
            for user in ("v1", "v2"):
                reply, _ = await asyncio.to_thread(grpc_call, wp, ECHO, b"a", (("x-user", user),))
                assert reply == f"{user}|a".encode()
            await asyncio.sleep(0.8)
            assert pool.connection_count() == 0  # v1: GOAWAY; v2: idle
            for user in ("v1", "v2"):
                reply, _ = await asyncio.to_thread(grpc_call, wp, ECHO, b"b", (("x-user", user),))
                assert reply == f"{user}|b".encode()
    assert sorted(dispatcher.opened) == ["v1", "v1", "v2", "v2"]


async def test_upstream_closing_before_response_is_503_uc() -> None:
    async def slam(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # took the connection, then drops it
        writer.close()

    server = await asyncio.start_server(slam, "127.0.0.1", 0)
    dispatcher = FakeDispatcher({"v1": server.sockets[0].getsockname()[1]})
    try:
        async with waypoint(dispatcher) as (wp, _):
            result = await curl(f"http://127.0.0.1:{wp}/x")
            again = await curl(f"http://127.0.0.1:{wp}/y")
    finally:
        server.close()
        await server.wait_closed()
    assert result.head.startswith("HTTP/2 503") and again.head.startswith("HTTP/2 503")
    assert {r.flags for r in dispatcher.records} <= {"UC", "UF"}
    assert dispatcher.records[0].flags == "UC"


async def test_upstream_reset_is_503_ur_before_head_and_rst_stream_after() -> None:
    async with scripted_upstream() as port:
        dispatcher = FakeDispatcher({"v1": port})
        async with waypoint(dispatcher) as (wp, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", wp)
            conn = _raw_client()
            get = [(":method", "GET"), (":scheme", "http"), (":authority", "x")]
            conn.send_headers(1, [*get, (":path", "/before")], end_stream=True)
            conn.send_headers(3, [*get, (":path", "/after")], end_stream=True)
            writer.write(conn.data_to_send())
            seen = await receive(
                reader, writer, conn, lambda seen: len(seen.resets) + len(seen.ended) == 2
            )
            writer.close()
    assert seen.status == {1: b"503", 3: b"200"}
    assert seen.ended == {1}
    assert seen.resets == {3: ErrorCodes.ENHANCE_YOUR_CALM}  # the upstream's code, passed on
    flags = {r.head.path: (r.status, r.flags) for r in dispatcher.records}
    assert flags == {"/before": (503, "UR"), "/after": (200, "UR")}


async def test_request_trailers_reach_the_upstream() -> None:
    async with scripted_upstream() as port:
        dispatcher = FakeDispatcher({"v1": port})
        async with waypoint(dispatcher) as (wp, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", wp)
            conn = _raw_client()
            post = [(":method", "POST"), (":scheme", "http"), (":authority", "x")]
            conn.send_headers(1, [*post, (":path", "/echo"), ("te", "trailers")])
            conn.send_data(1, b"body bytes")
            conn.send_headers(1, [("x-checksum", "abc")], end_stream=True)
            writer.write(conn.data_to_send())
            seen = await receive(reader, writer, conn, lambda seen: 1 in seen.trailers)
            writer.close()
    assert seen.body[1] == b"body bytes"
    assert seen.trailers == {1: {b"x-checksum": b"abc"}}
    [record] = dispatcher.records
    assert (record.status, record.flags, record.request_bytes, record.response_bytes) == (
        200,
        "",
        10,
        10,
    )


async def test_burst_of_malformed_connections_between_good_requests() -> None:
    bad_inputs = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # not HTTP/2 at all
        PREFACE + b"\xff" * 64,  # frame header of a huge frame
        PREFACE + b"\x00\x00\x08\x06\x00\x00\x00\x00\x01",  # PING on stream 1
        PREFACE + b"\x00\x00\x05\x01\x05\x00\x00\x00\x02hello",  # even stream id
        PREFACE + b"\x00\x00",  # truncated, then the client leaves
        PREFACE,  # no SETTINGS: leaves at once
    ]

    async def bad(payload: bytes) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", wp)
        writer.write(payload)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            await asyncio.wait_for(reader.read(65536), 5)
        writer.close()

    with grpc_server("v1") as port:
        dispatcher = FakeDispatcher({"v1": port})
        async with waypoint(dispatcher) as (wp, _):
            for round_ in range(3):
                results = await asyncio.gather(
                    *(bad(p) for p in bad_inputs),
                    asyncio.to_thread(grpc_call, wp, ECHO, b"good %d" % round_),
                    *(bad(p) for p in bad_inputs),
                )
                assert results[len(bad_inputs)][0] == b"v1|good %d" % round_
    assert [r.status for r in dispatcher.records] == [200, 200, 200]


async def test_credit_of_reset_streams_is_returned() -> None:
    """Streams reset mid-body, 24 MiB of them on one connection (more than its 16 MiB window):
    the credit comes back, and a large call on the same connection still completes."""
    with grpc_server("v1") as port:
        dispatcher = FakeDispatcher({"v1": port})
        async with waypoint(dispatcher) as (wp, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", wp)
            conn = _raw_client()
            writer.write(conn.data_to_send())
            seen = Seen()
            for i in range(24):
                sid = 1 + 2 * i
                conn.send_headers(sid, ECHO_REQUEST)
                # A message announced as 2 MiB, of which 1 MiB comes before the reset.
                announce = b"\x00\x00\x20\x00\x00"
                await send_body(reader, writer, conn, sid, announce + bytes(1 << 20), seen, False)
                conn.reset_stream(sid)
                writer.write(conn.data_to_send())
            last = 1 + 2 * 24
            body = os.urandom(4 << 20)
            conn.send_headers(last, ECHO_REQUEST)
            await send_body(reader, writer, conn, last, grpc_frame(body), seen)
            seen = await receive(reader, writer, conn, lambda seen: last in seen.trailers, seen)
            writer.close()
    assert bytes(seen.body[last]) == grpc_frame(b"v1|" + body)
    assert [r.flags for r in dispatcher.records].count("DR") == 24
