"""WaypointRouter / TunnelDispatcher over a real StateStore and ServiceRouting.

Routing is decided by the compiled route table and the cluster state the agent uses too;
these tests check what the waypoint adds: the tunnel's caller and service from the CONNECT,
a decision per request, one endpoint (and circuit-breaker slot) per request, and what a
finished request feeds back (outlier detection, the observer).
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import pytest

from nodeagent.hbone.aio import TunnelStream
from nodeagent.hbone.server import AcceptedStream
from nodeagent.model.identity import Identity
from nodeagent.model.routing import HeaderOps
from nodeagent.model.workload import Port, Service, Workload, WorkloadStatus
from nodeagent.proxy.pool import HbonePool
from nodeagent.proxy.routing import ServiceRouting
from nodeagent.state.store import StateBatch, StateStore
from nodeagent.traffic.outlier import OutlierDetector
from nodeagent.waypoint.exchange import (
    HTTP1,
    Endpoint,
    Forward,
    LocalReply,
    RequestHead,
    RequestRecord,
    UpstreamError,
)
from nodeagent.waypoint.router import (
    CONNECT_FAILURE,
    NO_HEALTHY_UPSTREAM,
    NO_ROUTE,
    OVERFLOW,
    RequestObserver,
    TunnelCaller,
    TunnelDispatcher,
    WaypointRouter,
)
from tests.builders import destination_rule, service, virtual_service, workload

pytestmark = pytest.mark.unit

NS = "demo"
KEY = "demo/backend.demo.svc.cluster.local"
VIP = "10.96.0.10"
BACKEND = service("backend", VIP, namespace=NS, ports=(Port(8080, 8080),))
OTHER_VIP = "10.96.0.99"  # no service
CLIENT_IP = "10.2.0.5"
WAYPOINT = Identity("cluster.local", NS, "waypoint")
CLIENT_ID = Identity("cluster.local", NS, "client")
CLIENT = workload("client", CLIENT_IP, namespace=NS, hbone=True, canonical_name="client")

HTTP_ROUTES: list[dict[str, Any]] = [
    {
        "name": "ios",
        "match": [{"headers": {"x-user": {"exact": "ios"}}}],
        "route": [{"destination": {"host": "backend", "subset": "v2"}}],
    },
    {
        "name": "api",
        "match": [{"uri": {"prefix": "/api/"}}],
        "rewrite": {"uri": "/rewritten/", "authority": "backend.internal"},
        "headers": {
            "request": {"set": {"x-set": "yes"}, "add": {"x-add": "1"}, "remove": ["x-drop"]},
            "response": {"set": {"x-served-by": "waypoint"}},
        },
        "route": [{"destination": {"host": "backend", "subset": "v1"}}],
    },
    {"name": "moved", "match": [{"uri": {"exact": "/old"}}], "redirect": {"uri": "/new"}},
    {
        "name": "teapot",
        "match": [{"uri": {"exact": "/teapot"}}],
        "directResponse": {"status": 418, "body": {"string": "short and stout"}},
    },
    {
        "name": "split",
        "match": [{"uri": {"prefix": "/split"}}],
        "route": [
            {"destination": {"host": "backend", "subset": "v1"}, "weight": 80},
            {"destination": {"host": "backend", "subset": "v2"}, "weight": 20},
        ],
    },
    {
        "name": "default",
        "match": [{"uri": {"prefix": "/app"}}],
        "route": [{"destination": {"host": "backend", "subset": "v1"}}],
    },
]
VS = virtual_service("backend", NS, spec={"hosts": ["backend"], "http": HTTP_ROUTES})


def rule(**policy: Any) -> Any:
    return destination_rule(
        "backend",
        NS,
        spec={
            "host": "backend",
            "trafficPolicy": {"outlierDetection": {"consecutive5xxErrors": 1}, **policy},
            "subsets": [{"name": v, "labels": {"version": v}} for v in ("v1", "v2")],
        },
    )


def endpoint(name: str, ip: str, version: str, *, hbone: bool = True, **fields: Any) -> Workload:
    return workload(
        name,
        ip,
        namespace=NS,
        hbone=hbone,
        canonical_name="backend",
        canonical_revision=version,
        services={KEY: (Port(8080, 8080),)},
        **fields,
    )


V1 = endpoint("b-v1", "10.1.0.1", "v1")
V2 = endpoint("b-v2", "10.1.0.2", "v2")


@dataclass
class Observed(RequestObserver):
    calls: list[tuple[RequestRecord, TunnelCaller, Service | None, Workload | None]] = field(
        default_factory=list
    )

    def request_done(
        self,
        record: RequestRecord,
        caller: TunnelCaller,
        service: Service | None,
        workload: Workload | None,
    ) -> None:
        self.calls.append((record, caller, service, workload))


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeTunnel:
    """What `accept` reads of a CONNECT stream."""

    authority: str
    headers: tuple[tuple[str, str], ...] = ()


@dataclass
class Setup:
    store: StateStore
    routing: ServiceRouting
    router: WaypointRouter
    observer: Observed


def setup(
    *endpoints: Workload,
    dr: Any = None,
    vs: Any = VS,
    seed: int = 7,
    connect: Any = None,
) -> Setup:
    store = StateStore()
    store.apply(
        StateBatch(
            workloads=(CLIENT, *endpoints),
            services=(BACKEND,),
            virtual_services=(vs,) if vs is not None else (),
            destination_rules=(dr if dr is not None else rule(),),
        )
    )
    routing = ServiceRouting(store, OutlierDetector(Clock()), random.Random(seed))
    observer = Observed()
    pool = HbonePool(cast(Any, None))  # never dialled here: endpoints are plain TCP
    router = WaypointRouter(
        store,
        routing,
        pool,
        WAYPOINT,
        "waypoint-uid",
        observer,
        rng=random.Random(seed),
        connect=connect,
    )
    return Setup(store, routing, router, observer)


def accepted(authority: str, *headers: tuple[str, str], peer: str = "10.9.9.9") -> AcceptedStream:
    stream = cast(TunnelStream, FakeTunnel(authority, tuple(headers)))
    return AcceptedStream(stream, (peer, 40000), CLIENT_ID)


def dispatcher(s: Setup, authority: str = f"{VIP}:8080") -> TunnelDispatcher:
    d = s.router.accept(accepted(authority, ("forwarded", f'for="{CLIENT_IP}:51234"')))
    assert isinstance(d, TunnelDispatcher), d
    return d


def head(path: str = "/app", *headers: tuple[str, str]) -> RequestHead:
    return RequestHead("GET", path, "backend:8080", headers)


def forward(d: TunnelDispatcher, path: str = "/app", *headers: tuple[str, str]) -> Forward:
    decided = d.route(head(path, *headers))
    assert isinstance(decided, Forward), decided
    return decided


T = TypeVar("T")


def now(step: Coroutine[Any, Any, T]) -> T:
    """The result of a pick that does not wait (no queue): its coroutine ends at once."""
    try:
        step.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    step.close()
    raise AssertionError("the pick waited for a slot")


def picked(d: TunnelDispatcher, fwd: Forward) -> Endpoint:
    ep = now(d.pick(fwd))
    assert isinstance(ep, Endpoint), ep
    return ep


def done(ep: Endpoint | None, status: int = 200, path: str = "/app") -> RequestRecord:
    return RequestRecord(head(path), status, "", 0.01, 0, 10, ep)


# accept


def test_accept_reads_the_service_vip_and_the_forwarded_caller() -> None:
    s = setup(V1, V2)
    d = s.router.accept(
        accepted(
            f"{VIP}:8080",
            ("forwarded", f'for="{CLIENT_IP}:51234"'),
            ("baggage", "k8s.pod.name=client"),
        )
    )
    assert isinstance(d, TunnelDispatcher)
    assert d.service is not None and d.service.key == KEY
    assert d.label == KEY
    assert d.caller.address == (CLIENT_IP, 51234)
    assert d.caller.workload is not None and d.caller.workload.uid == "client"
    assert d.caller.identity == CLIENT_ID
    assert d.caller.forwarded == f'for="{CLIENT_IP}:51234"'
    assert d.caller.baggage == "k8s.pod.name=client"


def test_accept_without_forwarded_takes_the_peer_address() -> None:
    s = setup(V1)
    d = s.router.accept(accepted(f"{VIP}:8080", peer=CLIENT_IP))
    assert isinstance(d, TunnelDispatcher)
    assert d.caller.address == (CLIENT_IP, 40000)
    assert d.caller.workload is not None and d.caller.workload.uid == "client"
    # An unparsable for= is not trusted either: the peer's address stands.
    d = s.router.accept(accepted(f"{VIP}:8080", ("forwarded", 'for="nonsense"'), peer="10.9.9.9"))
    assert isinstance(d, TunnelDispatcher)
    assert d.caller.address == ("10.9.9.9", 40000)
    assert d.caller.workload is None


def test_accept_of_an_unknown_address_has_no_service() -> None:
    s = setup(V1)
    d = s.router.accept(accepted(f"{OTHER_VIP}:80"))
    assert isinstance(d, TunnelDispatcher)
    assert d.service is None
    assert d.label == f"{OTHER_VIP}:80"
    assert d.route(head()) == NO_ROUTE
    assert d.pick_l4() == NO_ROUTE


@pytest.mark.parametrize("authority", ["backend:8080", "10.96.0.10", "10.96.0.10:http", ""])
def test_accept_refuses_an_authority_that_is_not_ip_port(authority: str) -> None:
    s = setup(V1)
    refused = s.router.accept(accepted(authority))
    assert isinstance(refused, str)
    assert "authority" in refused


# route


def test_no_matching_http_route_is_404_nr() -> None:
    d = dispatcher(setup(V1, V2))
    assert d.route(head("/nowhere")) == NO_ROUTE
    assert NO_ROUTE.status == 404 and NO_ROUTE.flags == "NR"


def test_without_http_routes_the_service_default_route_forwards_unchanged() -> None:
    d = dispatcher(setup(V1, vs=None))
    fwd = forward(d, "/anything", ("x-a", "1"))
    assert fwd.head == head("/anything", ("x-a", "1"))
    assert fwd.route == ""


def test_redirect_and_direct_response_are_local_replies() -> None:
    d = dispatcher(setup(V1, V2))
    moved = d.route(head("/old"))
    assert isinstance(moved, LocalReply)
    assert moved.status == 301
    assert dict(moved.headers)["location"].endswith("/new")
    assert moved.flags == ""
    teapot = d.route(head("/teapot"))
    assert isinstance(teapot, LocalReply)
    assert (teapot.status, teapot.body, teapot.flags) == (418, b"short and stout", "")


def test_forward_rewrites_the_head_and_carries_header_ops() -> None:
    d = dispatcher(setup(V1, V2))
    fwd = forward(d, "/api/items?x=1", ("x-drop", "gone"), ("x-set", "old"), ("x-keep", "k"))
    assert fwd.route == "demo/backend http[1]"  # the compiled route's name, for logs
    assert fwd.head.path == "/rewritten/items?x=1"
    assert fwd.head.authority == "backend.internal"
    assert fwd.head.method == "GET" and fwd.head.protocol == HTTP1
    assert fwd.head.headers == (("x-keep", "k"), ("x-set", "yes"), ("x-add", "1"))
    assert fwd.response_headers == HeaderOps(set=(("x-served-by", "waypoint"),))


def test_header_match_goes_to_its_subset() -> None:
    s = setup(V1, V2)
    d = dispatcher(s)
    for _ in range(5):
        ep = picked(d, forward(d, "/app", ("x-user", "ios")))
        assert ep.labels["version"] == "v2"
        d.record(done(ep))
        ep = picked(d, forward(d, "/app", ("x-user", "android")))
        assert ep.labels["version"] == "v1"
        d.record(done(ep))


# pick


def test_weighted_split_is_decided_per_request_from_the_seeded_rng() -> None:
    seed = 11
    s = setup(V1, V2, seed=seed)
    d = dispatcher(s)
    got = []
    for _ in range(50):
        ep = picked(d, forward(d, "/split"))
        got.append(ep.labels["version"])
        d.record(done(ep))
    # The route's weights draw from the router's rng, once per request (80 of 100 to v1).
    rng = random.Random(seed)
    expected = ["v1" if rng.random() * 100 < 80 else "v2" for _ in range(50)]
    assert got == expected
    assert {"v1", "v2"} <= set(got)


def test_pick_describes_the_endpoint() -> None:
    d = dispatcher(setup(V1))
    ep = picked(d, forward(d))
    assert ep.key == ("b-v1", "10.1.0.1", 8080)
    assert ep.address == "10.1.0.1:8080"
    assert dict(ep.labels) == {
        "workload": "b-v1",
        "namespace": NS,
        "principal": str(V1.identity()),
        "version": "v1",
        "app": "backend",
        "uid": "b-v1",
    }


def test_no_endpoint_is_503_uh() -> None:
    d = dispatcher(setup(V2))  # the default route wants v1; no v1 endpoint exists
    assert now(d.pick(forward(d))) == NO_HEALTHY_UPSTREAM
    assert (NO_HEALTHY_UPSTREAM.status, NO_HEALTHY_UPSTREAM.flags) == (503, "UH")
    unhealthy = endpoint("sick", "10.1.0.3", "v1", status=WorkloadStatus.UNHEALTHY)
    d = dispatcher(setup(unhealthy))
    assert now(d.pick(forward(d))) == NO_HEALTHY_UPSTREAM


async def test_max_connections_full_queues_up_to_max_pending_then_503_uo() -> None:
    pool = {"tcp": {"maxConnections": 1}, "http": {"http1MaxPendingRequests": 1}}
    s = setup(V1, dr=rule(connectionPool=pool))
    d = dispatcher(s)
    first = picked(d, forward(d))
    waiting = asyncio.ensure_future(d.pick(forward(d)))
    await asyncio.sleep(0)
    assert not waiting.done() and s.router.gate.waiting(first.token.pick.target) == 1
    assert now(d.pick(forward(d))) == OVERFLOW  # the queue is full too
    assert (OVERFLOW.status, OVERFLOW.flags) == (503, "UO")
    d.record(done(first))
    second = await asyncio.wait_for(waiting, 1)
    assert isinstance(second, Endpoint)
    d.record(done(second))
    d.record(done(second))  # recording twice releases once
    third = picked(d, forward(d))
    d.record(done(third))


async def test_without_a_pending_limit_a_full_cluster_queues() -> None:
    s = setup(V1, dr=rule(connectionPool={"tcp": {"maxConnections": 1}}))
    d = dispatcher(s)
    picked(d, forward(d))
    with pytest.raises(AssertionError, match="waited"):
        now(d.pick(forward(d)))  # Istio's default http1MaxPendingRequests: 2^32-1


# record


def test_a_5xx_counts_as_a_failure_for_outlier_detection() -> None:
    s = setup(V1, endpoint("b-v1b", "10.1.0.3", "v1"))
    d = dispatcher(s)
    ep = picked(d, forward(d))
    d.record(done(ep, 503))  # consecutive5xxErrors: 1 ejects it
    assert s.routing.balancer.outliers.is_ejected(ep.token.pick.candidate.key)
    for _ in range(4):
        other = picked(d, forward(d))
        assert other.key != ep.key
        d.record(done(other))


def test_a_2xx_or_4xx_does_not_eject() -> None:
    s = setup(V1)
    d = dispatcher(s)
    for status in (200, 404, 499):
        ep = picked(d, forward(d))
        d.record(done(ep, status))
        assert not s.routing.balancer.outliers.is_ejected(ep.token.pick.candidate.key)


@pytest.mark.parametrize("flags", ["DC", "DR"])
def test_a_client_gone_before_the_response_does_not_count_against_the_endpoint(
    flags: str,
) -> None:
    # consecutive5xxErrors: 1 would eject the endpoint on one counted failure.
    s = setup(
        V1,
        endpoint("b-v1b", "10.1.0.3", "v1"),
        dr=rule(connectionPool={"tcp": {"maxConnections": 1}}),
    )
    d = dispatcher(s)
    ep = picked(d, forward(d))
    d.record(RequestRecord(head(), 0, flags, 0.5, 0, 0, ep))
    assert not s.routing.balancer.outliers.is_ejected(ep.token.pick.candidate.key)
    d.record(done(picked(d, forward(d))))  # the slot was released all the same


def test_a_reset_before_the_head_from_upstream_counts_as_a_failure() -> None:
    s = setup(V1, endpoint("b-v1b", "10.1.0.3", "v1"))
    d = dispatcher(s)
    ep = picked(d, forward(d))
    d.record(RequestRecord(head(), 0, "UC", 0.5, 0, 0, ep))
    assert s.routing.balancer.outliers.is_ejected(ep.token.pick.candidate.key)


def test_record_reports_to_the_observer() -> None:
    s = setup(V1)
    d = dispatcher(s)
    ep = picked(d, forward(d))
    record = done(ep)
    d.record(record)
    local = RequestRecord(head("/nowhere"), 404, "NR", 0.0, 0, 0)
    d.record(local)
    assert len(s.observer.calls) == 2
    got, caller, svc, dest = s.observer.calls[0]
    assert got is record
    assert caller is d.caller
    assert svc is not None and svc.key == KEY
    assert dest is not None and dest.uid == "b-v1"
    got, _, svc, dest = s.observer.calls[1]
    assert got is local and svc is not None and dest is None


# open


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_refused_connect_is_503_uf_and_releases_the_slot() -> None:
    refused: list[tuple[str, int]] = []

    def connect(address: tuple[str, int]) -> asyncio.Future[socket.socket]:
        refused.append(address)
        future: asyncio.Future[socket.socket] = asyncio.get_running_loop().create_future()
        future.set_exception(ConnectionRefusedError(111, "Connection refused"))
        return future

    plain = endpoint("plain", "10.1.0.7", "v1", hbone=False)
    s = setup(plain, dr=rule(connectionPool={"tcp": {"maxConnections": 1}}), connect=connect)
    d = dispatcher(s)
    ep = picked(d, forward(d))
    with pytest.raises(UpstreamError) as caught:
        await d.open(ep, HTTP1)
    assert caught.value.reply == CONNECT_FAILURE
    assert (CONNECT_FAILURE.status, CONNECT_FAILURE.flags) == (503, "UF")
    assert refused == [("10.1.0.7", 8080)]
    # The try's end frees the slot (maxConnections 1) and counts the failure (ejected).
    d.attempt_done(ep, 0, local_origin=True)
    assert s.routing.balancer.outliers.is_ejected(ep.token.pick.candidate.key)
    again = now(d.pick(forward(d)))
    assert isinstance(again, Endpoint)
    # A later record of the failed request does not release a second time.
    d.record(RequestRecord(head(), 503, "UF", 0.0, 0, 0, ep))
    assert s.routing.balancer.counters(again.token.pick.target.cluster).open == 1


async def test_a_closed_loopback_port_is_503_uf() -> None:
    port = closed_port()
    local = workload(
        "local",
        "127.0.0.1",
        namespace=NS,
        canonical_name="backend",
        canonical_revision="v1",
        services={KEY: (Port(8080, port),)},
    )
    s = setup(local)
    d = dispatcher(s)
    ep = picked(d, forward(d))
    assert ep.address == f"127.0.0.1:{port}"
    with pytest.raises(UpstreamError) as caught:
        await d.open(ep, HTTP1)
    assert caught.value.reply.flags == "UF"


async def test_open_connects_a_plain_endpoint() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read(5))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    local = workload(
        "local",
        "127.0.0.1",
        namespace=NS,
        canonical_name="backend",
        canonical_revision="v1",
        services={KEY: (Port(8080, port),)},
    )
    try:
        d = dispatcher(setup(local))
        ep = picked(d, forward(d))
        stream = await d.open(ep, HTTP1)
        stream.write(b"hello")
        await stream.drain()
        assert await asyncio.wait_for(stream.read(), 5) == b"hello"
        stream.abort()
        d.record(done(ep))
    finally:
        server.close()
        await server.wait_closed()


def test_pick_l4_uses_the_tcp_default_and_finish_releases() -> None:
    s = setup(V1, vs=None, dr=rule(connectionPool={"tcp": {"maxConnections": 1}}))
    d = dispatcher(s)
    ep = d.pick_l4()
    assert isinstance(ep, Endpoint)
    assert d.pick_l4() == OVERFLOW
    d.finish_l4(ep)
    assert isinstance(d.pick_l4(), Endpoint)


async def test_an_endpoint_gone_since_the_pick_is_503_uf() -> None:
    s = setup(V1)
    d = dispatcher(s)
    ep = picked(d, forward(d))
    s.store.apply(StateBatch(removed_addresses=("b-v1",)))
    with pytest.raises(UpstreamError) as caught:
        await d.open(ep, HTTP1)
    assert caught.value.reply.flags == "UF"


def test_ip_addresses_are_parsed() -> None:
    # The dialled VIP is kept as an address object (for the plan's `dialled`).
    d = dispatcher(setup(V1))
    fwd = forward(d)
    assert fwd.plan.service.dialled == ipaddress.ip_address(VIP)
    assert fwd.plan.service.source_ip == CLIENT_IP


# retries, faults and mirrors as the router decides them


def test_retries_beyond_max_retries_in_flight_are_refused_until_one_ends() -> None:
    # Routes without `retries` carry Istio's default policy (2 retries); maxRetries: 1.
    s = setup(
        V1, endpoint("b-v1b", "10.1.0.3", "v1"), dr=rule(connectionPool={"http": {"maxRetries": 1}})
    )
    d = dispatcher(s)
    first, second = forward(d), forward(d)
    assert first.retry is not None and first.may_retry is not None
    now(d.pick(first))
    retry = now(d.pick(first))  # the plan has tried once: this is a retry
    assert isinstance(retry, Endpoint)
    now(d.pick(second))
    assert second.may_retry is not None and not second.may_retry()  # one retry in flight
    d.attempt_done(retry, 200, local_origin=False)
    assert second.may_retry()


def test_a_retry_goes_to_another_endpoint_then_back_when_all_were_tried() -> None:
    s = setup(V1, endpoint("b-v1b", "10.1.0.3", "v1"))
    d = dispatcher(s)
    fwd = forward(d)
    tries = [now(d.pick(fwd)) for _ in range(3)]  # Istio's default: 1 + 2 retries
    keys = [t.key for t in tries if isinstance(t, Endpoint)]
    assert len(keys) == 3 and keys[0] != keys[1] and keys[2] in keys[:2]
    for t in tries:
        assert isinstance(t, Endpoint)
        d.attempt_done(t, 200, local_origin=False)
    assert now(d.pick(fwd)) == NO_HEALTHY_UPSTREAM  # no try left


def test_fault_timeout_and_mirror_of_a_route_reach_the_forward() -> None:
    route = {
        "name": "chaos",
        "route": [{"destination": {"host": "backend", "subset": "v1"}}],
        "fault": {
            "delay": {"fixedDelay": "1.5s", "percentage": {"value": 100}},
            "abort": {"httpStatus": 502, "percentage": {"value": 100}},
        },
        "timeout": "3s",
        "retries": {"attempts": 0},
        "mirror": {"host": "backend", "subset": "v2"},
    }
    vs = virtual_service("backend", NS, spec={"hosts": ["backend"], "http": [route]})
    s = setup(V1, V2, vs=vs)
    d = dispatcher(s)
    fwd = forward(d)
    assert (fwd.delay, fwd.timeout, fwd.retry, fwd.mirror) == (1.5, 3.0, None, True)
    assert fwd.abort is not None and (fwd.abort.status, fwd.abort.flags) == (502, "FI")
    assert fwd.abort.body == b"fault filter abort"
    ((ep, head),) = d.mirrors(fwd)
    assert ep.labels["version"] == "v2"
    assert head.authority == "backend-shadow:8080"
    d.mirror_done(ep, 0)
    stats = {c.subset: c.events for c in s.routing.cluster_stats()}
    assert stats["v2"]["mirror_dropped"] == 1
    assert stats["v1"]["fault_abort"] == 1 and stats["v1"]["fault_delay"] == 1
