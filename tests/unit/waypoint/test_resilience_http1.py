"""Per-request resilience in the HTTP/1.1 codec over loopback sockets: retries on another
endpoint, per-try and route timeouts, replayed and streamed bodies, injected faults, mirrors
and maxRequestsPerConnection (the tries loop of attempts.py as serve_http1 drives it)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import h11
import pytest

from nodeagent.traffic.resilience import RetryPolicy
from nodeagent.waypoint.attempts import BODY_BUFFER_LIMIT
from nodeagent.waypoint.exchange import Endpoint, Forward, LocalReply, RequestHead, RequestRecord

from .conftest import (
    CLOSE,
    LOOPBACK,
    STALL,
    STALL_BODY,
    Client,
    FakeDispatcher,
    Response,
    closed_port,
    codec_server,
    endpoint,
    eventually,
    scripted_upstream,
)

RETRY_5XX = RetryPolicy(
    retries=1, per_try_timeout=None, retry_on=frozenset({"5xx"}), status_codes=frozenset()
)


def retry(retries: int = 1, per_try: float | None = None, *on: str) -> RetryPolicy:
    return RetryPolicy(retries, per_try, frozenset(on or ("5xx",)), frozenset())


def routed(**changes: object) -> Callable[[RequestHead], Forward]:
    def route(head: RequestHead) -> Forward:
        return replace(Forward(head), **changes)  # type: ignore[arg-type]

    return route


async def one_request(
    dispatcher: FakeDispatcher, method: str = "GET", body: bytes = b""
) -> tuple[Response, float]:
    """One request through a codec server: the response and how long it took."""
    async with codec_server(dispatcher) as address:
        client = await Client.connect(address)
        try:
            start = time.monotonic()
            async with asyncio.timeout(10):
                response = await client.request(method, "/r", body=body)
            return response, time.monotonic() - start
        finally:
            await client.close()


def only_record(dispatcher: FakeDispatcher) -> RequestRecord:
    assert len(dispatcher.records) == 1, dispatcher.records
    return dispatcher.records[0]


async def test_retriable_5xx_is_retried_on_the_next_endpoint() -> None:
    async with scripted_upstream("a", [500]) as a, scripted_upstream("b", [200]) as b:
        dispatcher = FakeDispatcher(
            [endpoint(a.address, "a"), endpoint(b.address, "b")], routed(retry=RETRY_5XX)
        )
        response, _ = await one_request(dispatcher)
    assert (response.status, response.body) == (200, b"b")
    assert dispatcher.tries == [("a", 500, False)]
    record = only_record(dispatcher)
    assert (record.status, record.attempts, record.flags) == (200, 2, "")
    assert record.endpoint is not None and record.endpoint.key == "b"
    assert len(a.requests) == len(b.requests) == 1


async def test_retries_exhausted_give_the_last_503_with_urx() -> None:
    async with (
        scripted_upstream("a", [503]) as a,
        scripted_upstream("b", [503]) as b,
    ):
        dispatcher = FakeDispatcher(
            [endpoint(a.address, "a"), endpoint(b.address, "b")], routed(retry=retry(2))
        )
        response, _ = await one_request(dispatcher)
    assert (response.status, response.body) == (503, b"a")  # a, b, a: the third try's
    record = only_record(dispatcher)
    assert (record.status, record.flags, record.attempts) == (503, "URX", 3)
    assert dispatcher.tries == [("a", 503, False), ("b", 503, False)]
    assert len(a.requests) == 2 and len(b.requests) == 1


async def test_connect_failure_is_retried_and_recorded_as_local_origin() -> None:
    dead = Endpoint(key="dead", address=f"{LOOPBACK}:{closed_port()}")
    async with scripted_upstream("b", [200]) as b:
        dispatcher = FakeDispatcher(
            [dead, endpoint(b.address, "b")], routed(retry=retry(1, None, "connect-failure"))
        )
        response, _ = await one_request(dispatcher)
    assert (response.status, response.body) == (200, b"b")
    assert dispatcher.tries == [("dead", 0, True)]
    record = only_record(dispatcher)
    assert (record.attempts, record.flags) == (2, "")


async def test_connect_failure_retried_under_5xx_too() -> None:
    dead = Endpoint(key="dead", address=f"{LOOPBACK}:{closed_port()}")
    async with scripted_upstream("b", [200]) as b:
        dispatcher = FakeDispatcher([dead, endpoint(b.address, "b")], routed(retry=retry(1)))
        response, _ = await one_request(dispatcher)
    assert response.status == 200
    assert dispatcher.tries == [("dead", 0, True)]


async def test_upstream_closing_before_its_head_is_retried_under_reset() -> None:
    async with scripted_upstream("a", [CLOSE]) as a, scripted_upstream("b", [200]) as b:
        dispatcher = FakeDispatcher(
            [endpoint(a.address, "a"), endpoint(b.address, "b")],
            routed(retry=retry(1, None, "reset")),
        )
        response, _ = await one_request(dispatcher, "POST", b"again")
    assert (response.status, response.body) == (200, b"b")
    assert dispatcher.tries == [("a", 0, True)]
    assert a.requests[0][1] == b.requests[0][1] == b"again"
    assert only_record(dispatcher).attempts == 2


async def test_upstream_closing_before_its_head_without_retries_gives_503_uf() -> None:
    async with scripted_upstream("a", [CLOSE]) as a:
        dispatcher = FakeDispatcher([endpoint(a.address, "a")], routed(retry=retry(0)))
        response, _ = await one_request(dispatcher)
    assert response.status == 503
    record = only_record(dispatcher)
    assert (record.flags, record.attempts) == ("UF,URX", 1)


async def test_the_client_connection_goes_on_after_retried_requests() -> None:
    async with scripted_upstream("a", [500, 200]) as a, scripted_upstream("b", [200]) as b:
        dispatcher = FakeDispatcher(
            [endpoint(a.address, "a"), endpoint(b.address, "b")], routed(retry=retry(1))
        )
        async with codec_server(dispatcher) as address:
            client = await Client.connect(address)
            bodies = [(await client.request("POST", "/r", body=b"x" * 10)).body for _ in range(3)]
            await client.close()
    assert bodies == [b"b", b"a", b"b"]  # a (500), b; then a; then b
    assert [r.attempts for r in dispatcher.records] == [2, 1, 1]
    assert len(a.connections) == 2  # the one that answered 500 was dropped


async def test_route_timeout_starts_when_the_request_has_ended() -> None:
    async with scripted_upstream("a", [200]) as a:
        dispatcher = FakeDispatcher([endpoint(a.address, "a")], routed(timeout=0.3))
        async with codec_server(dispatcher) as address:
            client = await Client.connect(address)

            async def slow_body() -> AsyncIterator[bytes]:
                yield b"abc"
                await asyncio.sleep(0.5)  # longer than the route timeout
                yield b"def"

            try:
                async with asyncio.timeout(5):
                    response = await slow_upload(client, slow_body())
            finally:
                await client.close()
    assert (response.status, response.body) == (200, b"a")
    assert a.requests[0][1] == b"abcdef"


async def slow_upload(client: Client, parts: AsyncIterator[bytes]) -> Response:
    """A POST whose content-length body arrives in parts, paced by `parts`."""
    conn = client.conn
    head = h11.Request(
        method="POST", target="/r", headers=[("host", "svc.example"), ("content-length", "6")]
    )
    client.writer.write(conn.send(head) or b"")
    async for part in parts:
        client.writer.write(conn.send(h11.Data(data=part)) or b"")
        await client.writer.drain()
    client.writer.write(conn.send(h11.EndOfMessage()) or b"")
    chunks = []
    status = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await client.reader.read(65536))
        elif type(event) is h11.Response:
            status = event.status_code
        elif type(event) is h11.Data:
            chunks.append(event.data)
        elif type(event) is h11.EndOfMessage:
            return Response(status, [], b"".join(chunks))
        else:
            raise AssertionError(event)


async def test_per_try_timeout_ends_at_the_response_head() -> None:
    """Envoy ignores a per-try timeout once the response has started downstream
    (upstream_request.cc onPerTryTimeout); a stalled body is the route timeout's."""
    async with scripted_upstream("a", [STALL_BODY]) as a:
        dispatcher = FakeDispatcher([endpoint(a.address, "a")], routed(retry=retry(1, 0.2)))
        async with codec_server(dispatcher) as address:
            reader, writer = await asyncio.open_connection(*address)
            writer.write(b"GET /r HTTP/1.1\r\nhost: svc.example\r\n\r\n")
            received = b""
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.8):  # four per-try timeouts
                    while chunk := await reader.read(65536):
                        received += chunk
            assert received.startswith(b"HTTP/1.1 200")
            assert received.endswith(b"partial")
            assert dispatcher.records == []  # the response is still going on, not reset
            writer.close()
    assert all("UT" not in r.flags.split(",") for r in dispatcher.records)


async def test_per_try_timeout_retries_a_stalling_endpoint() -> None:
    async with scripted_upstream("a", [STALL]) as a, scripted_upstream("b", [200]) as b:
        dispatcher = FakeDispatcher(
            [endpoint(a.address, "a"), endpoint(b.address, "b")], routed(retry=retry(1, 0.2))
        )
        response, elapsed = await one_request(dispatcher)
    assert (response.status, response.body) == (200, b"b")
    assert elapsed >= 0.2
    assert dispatcher.tries == [("a", 0, True)]
    record = only_record(dispatcher)
    assert (record.attempts, record.flags) == (2, "")


async def test_per_try_timeouts_all_stall_give_504_urx_ut() -> None:
    async with scripted_upstream("a", [STALL]) as a, scripted_upstream("b", [STALL]) as b:
        dispatcher = FakeDispatcher(
            [endpoint(a.address, "a"), endpoint(b.address, "b")], routed(retry=retry(1, 0.2))
        )
        response, elapsed = await one_request(dispatcher)
    assert (response.status, response.body) == (504, b"upstream request timeout")
    assert elapsed >= 0.4
    record = only_record(dispatcher)
    assert (record.status, record.flags, record.attempts) == (504, "UT,URX", 2)
    assert dispatcher.tries == [("a", 0, True), ("b", 0, True)]


async def test_route_timeout_without_retries_gives_504_ut() -> None:
    async with scripted_upstream("a", [STALL]) as a:
        dispatcher = FakeDispatcher([endpoint(a.address, "a")], routed(timeout=0.3))
        response, elapsed = await one_request(dispatcher)
    assert (response.status, response.body) == (504, b"upstream request timeout")
    assert elapsed >= 0.3
    record = only_record(dispatcher)
    assert (record.status, record.flags, record.attempts) == (504, "UT", 1)


async def test_route_timeout_after_the_head_resets_the_client() -> None:
    async with scripted_upstream("a", [STALL_BODY]) as a:
        dispatcher = FakeDispatcher([endpoint(a.address, "a")], routed(timeout=0.3))
        async with codec_server(dispatcher) as address:
            reader, writer = await asyncio.open_connection(*address)
            start = time.monotonic()
            writer.write(b"GET /r HTTP/1.1\r\nhost: svc.example\r\n\r\n")
            received = b""
            with contextlib.suppress(ConnectionError):
                async with asyncio.timeout(5):
                    while chunk := await reader.read(65536):
                        received += chunk
            elapsed = time.monotonic() - start
            writer.close()
            await eventually(lambda: bool(dispatcher.records))
    assert received.startswith(b"HTTP/1.1 200")
    assert received.endswith(b"partial")  # 7 of its 100 bytes, then the connection ended
    assert elapsed >= 0.3
    record = only_record(dispatcher)
    assert "UT" in record.flags.split(",")
    assert record.status == 200


async def test_post_body_is_replayed_byte_exact_on_the_retry() -> None:
    body = os.urandom(10 * 1024)
    async with scripted_upstream("a", [500]) as a, scripted_upstream("b", [200]) as b:
        dispatcher = FakeDispatcher(
            [endpoint(a.address, "a"), endpoint(b.address, "b")], routed(retry=RETRY_5XX)
        )
        response, _ = await one_request(dispatcher, "POST", body)
    assert (response.status, response.body) == (200, b"b")
    assert a.requests[0][1] == body
    assert b.requests[0][1] == body
    record = only_record(dispatcher)
    assert (record.attempts, record.request_bytes) == (2, len(body))


async def test_body_over_the_buffer_limit_is_streamed_and_not_retried() -> None:
    body = os.urandom(BODY_BUFFER_LIMIT + 64 * 1024)
    async with scripted_upstream("a", [503]) as a, scripted_upstream("b", [200]) as b:
        dispatcher = FakeDispatcher(
            [endpoint(a.address, "a"), endpoint(b.address, "b")], routed(retry=retry(2))
        )
        response, _ = await one_request(dispatcher, "POST", body)
    assert (response.status, response.body) == (503, b"a")
    assert len(a.requests) == 1 and a.requests[0][1] == body
    assert b.requests == []
    record = only_record(dispatcher)
    assert (record.attempts, record.flags, record.request_bytes) == (1, "", len(body))
    assert "no retry" in record.note and str(BODY_BUFFER_LIMIT) in record.note


async def test_fault_delay_holds_the_request() -> None:
    async with scripted_upstream("a") as a:
        dispatcher = FakeDispatcher([endpoint(a.address, "a")], routed(delay=0.3))
        response, elapsed = await one_request(dispatcher)
    assert response.status == 200
    assert elapsed >= 0.3
    assert only_record(dispatcher).flags == "DI"


ABORT = LocalReply(503, (("content-type", "text/plain"),), b"fault filter abort", flags="FI")


async def test_fault_abort_answers_without_going_upstream() -> None:
    async with scripted_upstream("a") as a:
        dispatcher = FakeDispatcher([endpoint(a.address, "a")], routed(abort=ABORT))
        response, _ = await one_request(dispatcher, "POST", b"payload")
    assert (response.status, response.body) == (503, b"fault filter abort")
    assert dispatcher.picked == [] and dispatcher.opened == []
    assert a.connections == []
    record = only_record(dispatcher)
    assert (record.flags, record.attempts) == ("FI", 0)


async def test_fault_delay_then_abort() -> None:
    async with scripted_upstream("a") as a:
        dispatcher = FakeDispatcher([endpoint(a.address, "a")], routed(delay=0.2, abort=ABORT))
        response, elapsed = await one_request(dispatcher)
    assert response.status == 503
    assert elapsed >= 0.2
    assert a.connections == []
    assert only_record(dispatcher).flags == "DI,FI"


async def test_mirror_gets_a_shadow_copy_and_does_not_delay_the_client() -> None:
    body = os.urandom(4096)
    async with scripted_upstream("a") as a, scripted_upstream("m", [STALL]) as m:
        dispatcher = FakeDispatcher([endpoint(a.address, "a")], routed(mirror=True))
        shadow = RequestHead("POST", "/r", "svc.example-shadow", ())
        dispatcher.mirror_to = [(endpoint(m.address, "m"), shadow)]
        async with codec_server(dispatcher) as address:
            client = await Client.connect(address)
            start = time.monotonic()
            response = await client.request("POST", "/r", body=body)
            elapsed = time.monotonic() - start
            await eventually(lambda: len(m.requests) == 1)
            await client.close()
            assert dispatcher.mirrored == []  # still stalled
    assert (response.status, response.body) == (200, b"a")
    assert elapsed < 1.0  # the mirror stalls for far longer
    assert a.requests[0][1] == body
    assert m.requests[0][1] == body
    assert m.host(0).endswith("-shadow")
    assert not a.host(0).endswith("-shadow")
    assert only_record(dispatcher).attempts == 1


async def test_mirror_outcomes_are_recorded() -> None:
    dead = Endpoint(key="dead", address=f"{LOOPBACK}:{closed_port()}")
    async with scripted_upstream("a") as a, scripted_upstream("m", [202]) as m:
        dispatcher = FakeDispatcher([endpoint(a.address, "a")], routed(mirror=True))
        shadow = RequestHead("GET", "/r", "svc.example-shadow", ())
        dispatcher.mirror_to = [(endpoint(m.address, "m"), shadow), (dead, shadow)]
        async with codec_server(dispatcher) as address:
            client = await Client.connect(address)
            response = await client.request("GET", "/r")
            await eventually(lambda: len(dispatcher.mirrored) == 2)
            await client.close()
    assert response.status == 200
    assert sorted(dispatcher.mirrored) == [("dead", 0), ("m", 202)]
    assert m.host(0) == "svc.example-shadow"


@pytest.mark.parametrize(("max_requests", "connections"), [(1, 3), (None, 1)])
async def test_max_requests_per_connection(max_requests: int | None, connections: int) -> None:
    async with scripted_upstream("a") as a:
        ep = Endpoint(key="a", address=f"{a.address[0]}:{a.address[1]}", max_requests=max_requests)
        dispatcher = FakeDispatcher([ep])
        async with codec_server(dispatcher) as address:
            client = await Client.connect(address)
            for _ in range(3):
                assert (await client.request("GET", "/r")).status == 200
            await client.close()
    assert len(a.requests) == 3
    assert len(a.connections) == connections


async def test_a_retry_over_the_budget_is_flagged_uo() -> None:
    async with scripted_upstream("a", [503]) as a, scripted_upstream("b", [200]) as b:
        dispatcher = FakeDispatcher(
            [endpoint(a.address, "a"), endpoint(b.address, "b")],
            routed(retry=retry(1), may_retry=lambda: False),
        )
        response, _ = await one_request(dispatcher)
    assert (response.status, response.body) == (503, b"a")  # not retried: that part holds
    assert b.requests == []
    record = only_record(dispatcher)
    assert (record.attempts, record.flags) == (1, "UO")


async def test_a_failed_connect_whose_retry_is_over_the_budget_is_flagged_uf_and_uo() -> None:
    dead = Endpoint(key="dead", address=f"{LOOPBACK}:{closed_port()}")
    async with scripted_upstream("b", [200]) as b:
        dispatcher = FakeDispatcher(
            [dead, endpoint(b.address, "b")], routed(retry=retry(1), may_retry=lambda: False)
        )
        response, _ = await one_request(dispatcher)
    assert response.status == 503  # the connect failure's own reply, not retried
    assert b.requests == []
    record = only_record(dispatcher)
    assert record.attempts == 1
    assert set(record.flags.split(",")) == {"UF", "UO"}
