"""Per-request resilience in the HTTP/2 codec over loopback sockets: retries on another
endpoint, per-try and route timeouts, replayed and streamed bodies, injected faults, mirrors
and maxRequestsPerConnection (the tries loop of attempts.py as serve_http2 drives it)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import replace

import h2.exceptions
import pytest
from h2.errors import ErrorCodes

from nodeagent.traffic.resilience import RetryPolicy
from nodeagent.waypoint.attempts import BODY_BUFFER_LIMIT
from nodeagent.waypoint.exchange import (
    HTTP2,
    Endpoint,
    Forward,
    LocalReply,
    RequestHead,
    RequestRecord,
)

from .conftest import closed_port, eventually
from .h2_support import (
    GRPC_UNAVAILABLE,
    REFUSE,
    RESET,
    STALL,
    STALL_BODY,
    FakeDispatcher,
    H2Client,
    receive,
    scripted_h2_upstream,
    waypoint,
)


def retry(retries: int = 1, per_try: float | None = None, *on: str) -> RetryPolicy:
    return RetryPolicy(retries, per_try, frozenset(on or ("5xx",)), frozenset())


def routed(**changes: object) -> Callable[[Forward], Forward]:
    def change(forward: Forward) -> Forward:
        return replace(forward, **changes)  # type: ignore[arg-type]

    return change


def rotating(upstreams: dict[str, int], **changes: object) -> FakeDispatcher:
    """Picks the upstreams round-robin in the given order; the route's Forward changed."""
    return FakeDispatcher(upstreams, forward_fn=routed(**changes), rotate=list(upstreams))


class Answer:
    def __init__(self, client: H2Client, sid: int, elapsed: float) -> None:
        seen = client.seen
        self.status = int(seen.status[sid]) if sid in seen.status else 0
        self.body = bytes(seen.body.get(sid, b""))
        self.reset = seen.resets.get(sid)
        self.elapsed = elapsed


async def one_request(dispatcher: FakeDispatcher, method: str = "GET", body: bytes = b"") -> Answer:
    async with waypoint(dispatcher) as (port, _):
        client = await H2Client.connect(port)
        try:
            start = time.monotonic()
            async with asyncio.timeout(10):
                sid = await client.request(method, "/r", body)
            answer = Answer(client, sid, time.monotonic() - start)
            await eventually(lambda: bool(dispatcher.records))
            return answer
        finally:
            await client.close()


def only_record(dispatcher: FakeDispatcher) -> RequestRecord:
    assert len(dispatcher.records) == 1, dispatcher.records
    return dispatcher.records[0]


async def test_retriable_5xx_is_retried_on_the_next_endpoint() -> None:
    async with scripted_h2_upstream("a", [500]) as a, scripted_h2_upstream("b", [200]) as b:
        dispatcher = rotating({"a": a.port, "b": b.port}, retry=retry(1))
        answer = await one_request(dispatcher)
    assert (answer.status, answer.body) == (200, b"b")
    assert dispatcher.tries == [("a", 500, False)]
    record = only_record(dispatcher)
    assert (record.status, record.attempts, record.flags) == (200, 2, "")
    assert record.endpoint is not None and record.endpoint.key == "b"
    assert len(a.requests) == len(b.requests) == 1


async def test_retries_exhausted_give_the_last_503_with_urx() -> None:
    async with scripted_h2_upstream("a", [503]) as a, scripted_h2_upstream("b", [503]) as b:
        dispatcher = rotating({"a": a.port, "b": b.port}, retry=retry(2))
        answer = await one_request(dispatcher)
    assert (answer.status, answer.body) == (503, b"a")  # a, b, a: the third try's
    record = only_record(dispatcher)
    assert (record.status, record.flags, record.attempts) == (503, "URX", 3)
    assert dispatcher.tries == [("a", 503, False), ("b", 503, False)]
    assert len(a.requests) == 2 and len(b.requests) == 1


@pytest.mark.parametrize("retry_on", ["connect-failure", "5xx"])
async def test_connect_failure_is_retried_and_recorded_as_local_origin(retry_on: str) -> None:
    async with scripted_h2_upstream("b", [200]) as b:
        dispatcher = rotating({"dead": closed_port(), "b": b.port}, retry=retry(1, None, retry_on))
        answer = await one_request(dispatcher)
    assert (answer.status, answer.body) == (200, b"b")
    assert dispatcher.tries == [("dead", 0, True)]
    record = only_record(dispatcher)
    assert (record.attempts, record.flags) == (2, "")


@pytest.mark.parametrize(
    ("step", "retry_on", "retried"),
    [
        (REFUSE, "refused-stream", True),
        (RESET, "refused-stream", False),
        (RESET, "reset", True),
        (REFUSE, "5xx", True),
    ],
)
async def test_stream_reset_before_the_head(step: int, retry_on: str, retried: bool) -> None:
    async with scripted_h2_upstream("a", [step]) as a, scripted_h2_upstream("b", [200]) as b:
        dispatcher = rotating({"a": a.port, "b": b.port}, retry=retry(1, None, retry_on))
        answer = await one_request(dispatcher, "POST", b"again")
    record = only_record(dispatcher)
    if retried:
        assert (answer.status, answer.body) == (200, b"b")
        assert dispatcher.tries == [("a", 0, True)]
        assert b.requests[0][1] == b"again"
        assert record.attempts == 2
    else:
        assert answer.status == 503
        assert (record.flags, record.attempts) == ("UR", 1)
        assert b.requests == []


async def test_grpc_unavailable_in_a_trailers_only_answer_is_retried() -> None:
    async with (
        scripted_h2_upstream("a", [GRPC_UNAVAILABLE]) as a,
        scripted_h2_upstream("b", [200]) as b,
    ):
        dispatcher = rotating({"a": a.port, "b": b.port}, retry=retry(1, None, "unavailable"))
        answer = await one_request(dispatcher, "POST", b"call")
    assert (answer.status, answer.body) == (200, b"b")
    assert dispatcher.tries == [("a", 200, False)]
    assert only_record(dispatcher).attempts == 2


async def test_connections_go_on_after_a_per_try_timeout() -> None:
    async with scripted_h2_upstream("a", [STALL, 200]) as a, scripted_h2_upstream("b") as b:
        dispatcher = rotating({"a": a.port, "b": b.port}, retry=retry(1, 0.2))
        async with waypoint(dispatcher) as (port, _):
            client = await H2Client.connect(port)
            bodies = []
            for _ in range(3):
                sid = await client.request("POST", "/r", b"x" * 100)
                bodies.append(bytes(client.seen.body[sid]))
            await client.close()
    assert bodies == [b"b", b"a", b"b"]  # a (timed out), b; then a; then b
    assert [r.attempts for r in dispatcher.records] == [2, 1, 1]
    assert len(a.connections) == 1  # the timed-out stream was reset, its connection kept


async def test_route_timeout_starts_when_the_request_has_ended() -> None:
    async with scripted_h2_upstream("a") as a:
        dispatcher = rotating({"a": a.port}, timeout=0.3)
        async with waypoint(dispatcher) as (port, _):
            client = await H2Client.connect(port)
            conn = client.conn
            sid = conn.get_next_available_stream_id()
            head = [(":method", "POST"), (":scheme", "http"), (":authority", "s"), (":path", "/")]
            conn.send_headers(sid, head)
            conn.send_data(sid, b"abc")
            client.writer.write(conn.data_to_send())
            await asyncio.sleep(0.5)  # longer than the route timeout
            with contextlib.suppress(h2.exceptions.ProtocolError):  # the stream is over
                conn.send_data(sid, b"def", end_stream=True)
            client.writer.write(conn.data_to_send())
            await receive(
                client.reader,
                client.writer,
                conn,
                lambda seen: sid in seen.ended or sid in seen.resets,
                client.seen,
            )
            answer = Answer(client, sid, 0.0)
            await client.close()
    assert (answer.status, answer.body) == (200, b"a")
    assert a.requests[0][1] == b"abcdef"


async def test_per_try_timeout_ends_at_the_response_head() -> None:
    """Envoy ignores a per-try timeout once the response has started downstream
    (upstream_request.cc onPerTryTimeout); a stalled body is the route timeout's."""
    async with scripted_h2_upstream("a", [STALL_BODY]) as a:
        dispatcher = rotating({"a": a.port}, retry=retry(1, 0.2))
        async with waypoint(dispatcher) as (port, _):
            client = await H2Client.connect(port)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.8):  # four per-try timeouts
                    await client.request("GET", "/r")
            assert client.seen.resets == {}
            assert dispatcher.records == []  # the response is still going on
            await client.close()
            await eventually(lambda: bool(dispatcher.records))
    record = only_record(dispatcher)
    assert record.status == 200
    assert "UT" not in record.flags.split(",")


async def test_per_try_timeout_retries_a_stalling_endpoint() -> None:
    async with scripted_h2_upstream("a", [STALL]) as a, scripted_h2_upstream("b", [200]) as b:
        dispatcher = rotating({"a": a.port, "b": b.port}, retry=retry(1, 0.2))
        answer = await one_request(dispatcher)
    assert (answer.status, answer.body) == (200, b"b")
    assert answer.elapsed >= 0.2
    assert dispatcher.tries == [("a", 0, True)]
    record = only_record(dispatcher)
    assert (record.attempts, record.flags) == (2, "")


async def test_per_try_timeouts_all_stall_give_504_urx_ut() -> None:
    async with scripted_h2_upstream("a", [STALL]) as a, scripted_h2_upstream("b", [STALL]) as b:
        dispatcher = rotating({"a": a.port, "b": b.port}, retry=retry(1, 0.2))
        answer = await one_request(dispatcher)
    assert (answer.status, answer.body) == (504, b"upstream request timeout")
    assert answer.elapsed >= 0.4
    record = only_record(dispatcher)
    assert (record.status, record.flags, record.attempts) == (504, "UT,URX", 2)
    assert dispatcher.tries == [("a", 0, True), ("b", 0, True)]


async def test_route_timeout_without_retries_gives_504_ut() -> None:
    async with scripted_h2_upstream("a", [STALL]) as a:
        dispatcher = rotating({"a": a.port}, timeout=0.3)
        answer = await one_request(dispatcher)
    assert (answer.status, answer.body) == (504, b"upstream request timeout")
    assert answer.elapsed >= 0.3
    record = only_record(dispatcher)
    assert (record.status, record.flags, record.attempts) == (504, "UT", 1)


async def test_route_timeout_after_the_head_resets_the_stream() -> None:
    async with scripted_h2_upstream("a", [STALL_BODY]) as a:
        dispatcher = rotating({"a": a.port}, timeout=0.3)
        answer = await one_request(dispatcher)
    assert answer.status == 200
    assert answer.body == b"partial"
    assert answer.reset == ErrorCodes.INTERNAL_ERROR
    assert answer.elapsed >= 0.3
    record = only_record(dispatcher)
    assert "UT" in record.flags.split(",")
    assert record.status == 200


async def test_post_body_is_replayed_byte_exact_on_the_retry() -> None:
    body = os.urandom(10 * 1024)
    async with scripted_h2_upstream("a", [500]) as a, scripted_h2_upstream("b", [200]) as b:
        dispatcher = rotating({"a": a.port, "b": b.port}, retry=retry(1))
        answer = await one_request(dispatcher, "POST", body)
    assert (answer.status, answer.body) == (200, b"b")
    assert a.requests[0][1] == body
    assert b.requests[0][1] == body
    record = only_record(dispatcher)
    assert (record.attempts, record.request_bytes) == (2, len(body))


async def test_body_over_the_buffer_limit_is_streamed_and_not_retried() -> None:
    body = os.urandom(BODY_BUFFER_LIMIT + 64 * 1024)
    async with scripted_h2_upstream("a", [503]) as a, scripted_h2_upstream("b", [200]) as b:
        dispatcher = rotating({"a": a.port, "b": b.port}, retry=retry(2))
        answer = await one_request(dispatcher, "POST", body)
    assert (answer.status, answer.body) == (503, b"a")
    assert len(a.requests) == 1 and a.requests[0][1] == body
    assert b.requests == []
    record = only_record(dispatcher)
    assert (record.attempts, record.flags, record.request_bytes) == (1, "", len(body))
    assert "no retry" in record.note and str(BODY_BUFFER_LIMIT) in record.note


async def test_fault_delay_holds_the_request() -> None:
    async with scripted_h2_upstream("a") as a:
        dispatcher = rotating({"a": a.port}, delay=0.3)
        answer = await one_request(dispatcher)
    assert answer.status == 200
    assert answer.elapsed >= 0.3
    assert only_record(dispatcher).flags == "DI"


ABORT = LocalReply(503, (("content-type", "text/plain"),), b"fault filter abort", flags="FI")


async def test_fault_abort_answers_without_going_upstream() -> None:
    async with scripted_h2_upstream("a") as a:
        dispatcher = rotating({"a": a.port}, abort=ABORT)
        answer = await one_request(dispatcher, "POST", b"payload")
    assert (answer.status, answer.body) == (503, b"fault filter abort")
    assert dispatcher.picked == [] and dispatcher.opened == []
    assert a.connections == []
    record = only_record(dispatcher)
    assert (record.flags, record.attempts) == ("FI", 0)


async def test_fault_delay_then_abort() -> None:
    async with scripted_h2_upstream("a") as a:
        dispatcher = rotating({"a": a.port}, delay=0.2, abort=ABORT)
        answer = await one_request(dispatcher)
    assert answer.status == 503
    assert answer.elapsed >= 0.2
    assert a.connections == []
    assert only_record(dispatcher).flags == "DI,FI"


SHADOW = RequestHead("POST", "/r", "svc-shadow", (), protocol=HTTP2)


async def test_mirror_gets_a_shadow_copy_and_does_not_delay_the_client() -> None:
    body = os.urandom(4096)
    async with scripted_h2_upstream("a") as a, scripted_h2_upstream("m", [STALL]) as m:
        dispatcher = rotating({"a": a.port}, mirror=True)
        dispatcher.mirror_to = [(Endpoint(key="m", address=f"127.0.0.1:{m.port}"), SHADOW)]
        async with waypoint(dispatcher) as (port, _):
            client = await H2Client.connect(port)
            start = time.monotonic()
            sid = await client.request("POST", "/r", body)
            answer = Answer(client, sid, time.monotonic() - start)
            await eventually(lambda: len(m.requests) == 1)
            await client.close()
            assert dispatcher.mirrored == []  # still stalled
    assert (answer.status, answer.body) == (200, b"a")
    assert answer.elapsed < 1.0  # the mirror stalls for far longer
    assert a.requests[0][1] == body
    assert m.requests[0][1] == body
    assert m.requests[0][0][b":authority"].endswith(b"-shadow")
    assert not a.requests[0][0][b":authority"].endswith(b"-shadow")


async def test_mirror_outcomes_are_recorded() -> None:
    dead = Endpoint(key="dead", address=f"127.0.0.1:{closed_port()}")
    async with scripted_h2_upstream("a") as a, scripted_h2_upstream("m", [202]) as m:
        dispatcher = rotating({"a": a.port}, mirror=True)
        shadow = replace(SHADOW, method="GET")
        mirror = Endpoint(key="m", address=f"127.0.0.1:{m.port}")
        dispatcher.mirror_to = [(mirror, shadow), (dead, shadow)]
        async with waypoint(dispatcher) as (port, _):
            client = await H2Client.connect(port)
            sid = await client.request("GET", "/r")
            await eventually(lambda: len(dispatcher.mirrored) == 2)
            await client.close()
    assert client.seen.status[sid] == b"200"
    assert sorted(dispatcher.mirrored) == [("dead", 0), ("m", 202)]
    assert m.requests[0][0][b":authority"] == b"svc-shadow"


@pytest.mark.parametrize(("max_requests", "connections"), [(1, 3), (None, 1)])
async def test_max_requests_per_connection(max_requests: int | None, connections: int) -> None:
    async with scripted_h2_upstream("a") as a:
        dispatcher = rotating({"a": a.port})
        if max_requests is not None:
            dispatcher.max_requests["a"] = max_requests
        async with waypoint(dispatcher) as (port, _):
            client = await H2Client.connect(port)
            for _ in range(3):
                sid = await client.request("GET", "/r")
                assert client.seen.status[sid] == b"200"
            await client.close()
    assert len(a.requests) == 3
    assert len(a.connections) == connections


async def test_a_retry_over_the_budget_is_flagged_uo() -> None:
    async with scripted_h2_upstream("a", [503]) as a, scripted_h2_upstream("b", [200]) as b:
        dispatcher = rotating({"a": a.port, "b": b.port}, retry=retry(1), may_retry=lambda: False)
        answer = await one_request(dispatcher)
    assert (answer.status, answer.body) == (503, b"a")  # not retried: that part holds
    assert b.requests == []
    record = only_record(dispatcher)
    assert (record.attempts, record.flags) == (1, "UO")
