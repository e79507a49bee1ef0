"""Outbound routing through waypoints, as a table (ztunnel's build_request cases)."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from nodeagent.datapath.netns import NetnsHandle
from nodeagent.model.constants import NO_CLUSTER_FOUND, NO_HEALTHY_UPSTREAM
from nodeagent.model.identity import Identity
from nodeagent.model.routing import VirtualService
from nodeagent.model.workload import (
    GatewayAddress,
    NamespacedHostname,
    NetworkAddress,
    Port,
    WorkloadStatus,
)
from nodeagent.proxy.connections import ConnectionRegistry, LiveConnection
from nodeagent.proxy.listeners import LocalPod
from nodeagent.proxy.outbound import OutboundHandler, OutboundRouter, RouteKind
from nodeagent.state.store import StateBatch, StateStore
from tests.builders import service, virtual_service, workload

ip = ipaddress.ip_address
NS = "demo"
WP_HOST = f"waypoint.{NS}.svc.cluster.local"
WP_KEY = f"{NS}/{WP_HOST}"
ECHO_KEY = f"{NS}/echo.{NS}.svc.cluster.local"
WP_ID = Identity("cluster.local", NS, "waypoint")
WP_SAN = "spiffe://cluster.local/ns/demo/sa/waypoint-alt"


def by_host(namespace: str, host: str, port: int = 15008) -> GatewayAddress:
    return GatewayAddress(NamespacedHostname(namespace, host), port)


def by_ip(address: str, port: int = 15008) -> GatewayAddress:
    return GatewayAddress(NetworkAddress("", ip(address)), port)


WAYPOINT = by_host(NS, WP_HOST)


@pytest.fixture
def store() -> StateStore:
    s = StateStore()
    s.apply(
        StateBatch(
            workloads=(
                workload("src", "10.0.0.2", namespace=NS, hbone=True, service_account="client"),
                workload(
                    "wp",
                    "10.0.0.9",
                    namespace=NS,
                    hbone=True,
                    service_account="waypoint",
                    services={WP_KEY: (Port(15008, 15008),)},
                ),
                workload(
                    "echo",
                    "10.0.0.5",
                    namespace=NS,
                    hbone=True,
                    service_account="echo",
                    services={ECHO_KEY: (Port(80, 8080),)},
                ),
                # A workload-addressed waypoint user (istio.io/use-waypoint on the pod).
                workload("pod", "10.0.0.6", namespace=NS, hbone=True, waypoint=WAYPOINT),
                workload(
                    "pod-ip", "10.0.0.7", namespace=NS, hbone=True, waypoint=by_ip("10.0.0.9")
                ),
                workload(
                    "pod-vip", "10.0.0.8", namespace=NS, hbone=True, waypoint=by_ip("10.96.0.9")
                ),
                workload(
                    "pod-gone", "10.0.0.10", namespace=NS, hbone=True, waypoint=by_ip("10.9.9.9")
                ),
            ),
            services=(
                service(
                    "waypoint",
                    "10.96.0.9",
                    namespace=NS,
                    ports=(Port(15008, 15008), Port(15021, 15021)),
                    subject_alt_names=(WP_SAN,),
                ),
                service(
                    "echo", "10.96.0.10", namespace=NS, ports=(Port(80, 8080),), waypoint=WAYPOINT
                ),
                service("plain", "10.96.0.11", namespace=NS, ports=(Port(80, 8080),)),
                service(
                    "lost",
                    "10.96.0.12",
                    namespace=NS,
                    ports=(Port(80, 8080),),
                    waypoint=by_host(NS, f"missing.{NS}.svc.cluster.local"),
                ),
                service(
                    "by-ip",
                    "10.96.0.13",
                    namespace=NS,
                    ports=(Port(80, 8080),),
                    waypoint=by_ip("10.0.0.9"),
                ),
                service(
                    "odd-port",
                    "10.96.0.14",
                    namespace=NS,
                    ports=(Port(80, 8080),),
                    waypoint=by_host(NS, WP_HOST, 15009),
                ),
            ),
        )
    )
    return s


CASES = [
    # original destination, kind, connect to, authority, flag
    # a service with a waypoint: to a waypoint endpoint, the VIP:port untranslated
    (("10.96.0.10", 80), RouteKind.HBONE, ("10.0.0.9", 15008), "10.96.0.10:80", ""),
    # a waypoint named by the IP of a waypoint workload: that IP
    (("10.96.0.13", 80), RouteKind.HBONE, ("10.0.0.9", 15008), "10.96.0.13:80", ""),
    # a workload with a waypoint, dialled by its own address: the pod ip:port as authority
    (("10.0.0.6", 8080), RouteKind.HBONE, ("10.0.0.9", 15008), "10.0.0.6:8080", ""),
    (("10.0.0.7", 8080), RouteKind.HBONE, ("10.0.0.9", 15008), "10.0.0.7:8080", ""),
    # named by the VIP of the waypoint's service: an endpoint of that service
    (("10.0.0.8", 8080), RouteKind.HBONE, ("10.0.0.9", 15008), "10.0.0.8:8080", ""),
    # an endpoint of a service with a waypoint, dialled directly: its own waypoint only
    (("10.0.0.5", 8080), RouteKind.HBONE, ("10.0.0.5", 15008), "10.0.0.5:8080", ""),
    # no waypoint: unchanged
    (("10.96.0.11", 80), RouteKind.REFUSE, None, "", ""),  # (no endpoint: UH via the plan)
    # named but unknown: refused, never direct
    (("10.96.0.12", 80), RouteKind.REFUSE, ("10.96.0.12", 80), "", NO_CLUSTER_FOUND),
    (("10.0.0.10", 8080), RouteKind.REFUSE, ("10.0.0.10", 8080), "", NO_CLUSTER_FOUND),
    # the waypoint's service lacks the named HBONE port: no endpoint to use
    (("10.96.0.14", 80), RouteKind.REFUSE, ("10.96.0.14", 80), "", NO_HEALTHY_UPSTREAM),
]


@pytest.mark.parametrize(("dst", "kind", "connect", "authority", "flag"), CASES)
def test_waypoint_route_table(store, dst, kind, connect, authority, flag):
    route = OutboundRouter(store).route(store.workload("src"), dst, source_ip="10.0.0.2")
    assert route.kind is kind, route
    if connect is not None:
        assert route.destination == connect
    assert route.authority == authority
    assert route.flags == flag
    if kind is RouteKind.REFUSE:
        assert route.reason


def test_service_waypoint_route_requires_the_waypoint_identity(store):
    route = OutboundRouter(store).route(store.workload("src"), ("10.96.0.10", 80))
    assert route.identities == {WP_ID, Identity.parse(WP_SAN)}
    assert route.waypoint == WP_KEY
    assert route.workload_uid == "wp"  # the next hop (ztunnel's actual_destination_workload)
    assert route.service == ECHO_KEY
    assert route.service_hostname == f"echo.{NS}.svc.cluster.local"  # forwarded: host=
    assert route.plan is None  # no agent traffic management: the waypoint does L7
    assert "waypoint demo/waypoint.demo.svc.cluster.local" in route.describe()


def test_service_waypoint_ignores_the_agents_virtual_service(store):
    vs = virtual_service(
        "echo",
        NS,
        spec={
            "hosts": [f"echo.{NS}.svc.cluster.local"],
            "tcp": [{"route": [{"destination": {"host": f"plain.{NS}.svc.cluster.local"}}]}],
        },
    )
    assert isinstance(vs, VirtualService)
    store.apply(StateBatch(virtual_services=(vs,)))
    route = OutboundRouter(store).route(store.workload("src"), ("10.96.0.10", 80))
    assert route.kind is RouteKind.HBONE and route.destination == ("10.0.0.9", 15008)


def test_waypoint_without_a_ready_endpoint_refuses(store):
    wp = store.workload("wp")
    assert wp is not None
    store.apply(
        StateBatch(
            workloads=(
                workload(
                    "wp",
                    "10.0.0.9",
                    namespace=NS,
                    hbone=True,
                    service_account="waypoint",
                    services=dict(wp.services),
                    status=WorkloadStatus.UNHEALTHY,
                ),
            )
        )
    )
    router = OutboundRouter(store)
    for dst in [("10.96.0.10", 80), ("10.0.0.6", 8080), ("10.96.0.13", 80)]:
        route = router.route(store.workload("src"), dst)
        assert route.kind is RouteKind.REFUSE, (dst, route)
        assert route.flags == NO_HEALTHY_UPSTREAM
        assert "waypoint" in route.reason


def test_traffic_from_the_workloads_own_waypoint_goes_direct(store):
    route = OutboundRouter(store).route(
        store.workload("wp"), ("10.0.0.6", 8080), source_ip="10.0.0.9"
    )
    assert route.kind is RouteKind.HBONE and route.destination == ("10.0.0.6", 15008)
    assert not route.waypoint


def test_service_waypoint_applies_even_from_the_waypoint(store):
    # ztunnel checks the source only for workload waypoints; a service VIP always goes to its
    # waypoint (a waypoint dials endpoints, not VIPs).
    route = OutboundRouter(store).route(
        store.workload("wp"), ("10.96.0.10", 80), source_ip="10.0.0.9"
    )
    assert route.waypoint == WP_KEY


# -- the handler: a refused waypoint route is counted with its flag, and the app is reset ----


class Recorder:
    def __init__(self) -> None:
        self.done: list[LiveConnection] = []

    def opened(self, conn: LiveConnection) -> None:
        pass

    def closed(self, conn: LiveConnection) -> None:
        self.done.append(conn)

    def decided(self, attributes: object, decision: object) -> None:
        pass


def _loopback_pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
    accepted.setblocking(False)
    return client, accepted


@pytest.mark.parametrize(
    ("dst", "flag"),
    [(("10.96.0.12", 80), NO_CLUSTER_FOUND), (("10.96.0.14", 80), NO_HEALTHY_UPSTREAM)],
)
async def test_refused_waypoint_connection_is_reset_with_its_flag(store, dst, flag):
    recorder = Recorder()
    registry = ConnectionRegistry(observer=recorder)
    handler = OutboundHandler(store, None, registry, destination_of=lambda _s: dst)
    pod = LocalPod(
        uid="src",
        namespace=NS,
        name="src",
        identity=Identity("cluster.local", NS, "client"),
        addresses=(ip("10.0.0.2"),),
        netns=NetnsHandle(path="/proc/self/ns/net"),
        sockets=None,  # type: ignore[arg-type]  # never reached: the route is refused
    )
    client, accepted = _loopback_pair()
    with client:
        await handler(pod, accepted, 15001)
        (conn,) = recorder.done
        assert conn.response_flags == flag
        assert "waypoint" in conn.closed_reason
        assert handler.counts == {"refused": 1}
        with pytest.raises(ConnectionResetError):
            client.recv(1)


async def test_without_a_tunnel_a_waypoint_route_is_refused_not_sent_direct(store):
    registry = ConnectionRegistry()
    handler = OutboundHandler(store, None, registry)
    route = handler.router.route(store.workload("src"), ("10.96.0.10", 80))
    plain = handler._plain_if_no_tunnel(route)
    assert plain.kind is RouteKind.REFUSE and "needs a tunnel" in plain.reason
