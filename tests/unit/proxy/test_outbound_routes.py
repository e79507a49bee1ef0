"""Outbound routing decisions as a table, from a small StateStore."""

from __future__ import annotations

import ipaddress
import random

import pytest

from nodeagent.model.identity import Identity
from nodeagent.model.workload import (
    LoadBalancing,
    LoadBalancingMode,
    Port,
    Service,
    Workload,
)
from nodeagent.proxy.outbound import OutboundRouter, RouteKind
from nodeagent.proxy.routing import ServiceRouting
from nodeagent.state.store import StateBatch, StateStore
from nodeagent.traffic.outlier import OutlierDetector, OutlierSettings
from tests.builders import service as build_service
from tests.builders import workload as build_workload

ip = ipaddress.ip_address
SVC = "ns-b/echo.ns-b.svc.cluster.local"
SVC_TCP = "ns-c/legacy.ns-c.svc.cluster.local"
ALT = "spiffe://cluster.local/ns/ns-b/sa/alt"
ID_B = Identity("cluster.local", "ns-b", "server")


def workload(uid: str, addr: str, *, hbone: bool = True, **kw: object) -> Workload:
    namespace = str(kw.pop("namespace", "ns-b"))
    return build_workload(
        uid, addr, namespace=namespace, hbone=hbone, service_account="server", **kw
    )


def service(name: str, ns: str, vip: str, ports: tuple[Port, ...], **kw: object) -> Service:
    return build_service(name, vip, namespace=ns, ports=ports, **kw)


@pytest.fixture
def store() -> StateStore:
    s = StateStore()
    s.apply(
        StateBatch(
            workloads=(
                workload("src", "10.0.0.2"),
                workload("b", "10.0.0.5", services={SVC: (Port(80, 8080),)}),
                workload("b6", "fd00::5"),
                workload(
                    "legacy",
                    "10.0.0.6",
                    hbone=False,
                    namespace="ns-c",
                    services={SVC_TCP: (Port(80, 9090),)},
                ),
            ),
            services=(
                service("echo", "ns-b", "10.96.0.10", (Port(80, 8080),), subject_alt_names=(ALT,)),
                service("legacy", "ns-c", "10.96.0.11", (Port(80, 9090),)),
                service("empty", "ns-b", "10.96.0.12", (Port(80, 8080),)),
                service(
                    "direct",
                    "ns-b",
                    "10.96.0.13",
                    (Port(80, 8080),),
                    load_balancing=LoadBalancing(mode=LoadBalancingMode.PASSTHROUGH),
                ),
            ),
        )
    )
    return s


CASES = [
    # original destination, kind, connect to, authority
    (("10.0.0.5", 8080), RouteKind.HBONE, ("10.0.0.5", 15008), "10.0.0.5:8080"),
    (("fd00::5", 8080), RouteKind.HBONE, ("fd00::5", 15008), "[fd00::5]:8080"),
    (("10.96.0.10", 80), RouteKind.HBONE, ("10.0.0.5", 15008), "10.0.0.5:8080"),
    (("10.96.0.11", 80), RouteKind.TCP, ("10.0.0.6", 9090), ""),
    (("10.96.0.13", 80), RouteKind.PASSTHROUGH, ("10.96.0.13", 80), ""),
    (("10.0.0.6", 80), RouteKind.PASSTHROUGH, ("10.0.0.6", 80), ""),
    (("93.184.216.34", 443), RouteKind.PASSTHROUGH, ("93.184.216.34", 443), ""),
    (("127.0.0.1", 8080), RouteKind.REFUSE, None, ""),
    (("::1", 8080), RouteKind.REFUSE, None, ""),
    (("0.0.0.0", 8080), RouteKind.REFUSE, None, ""),
    (("10.0.0.2", 15001), RouteKind.REFUSE, None, ""),  # the pod's own agent port: a loop
    (("10.96.0.12", 80), RouteKind.REFUSE, None, ""),  # service without endpoints
]


@pytest.mark.parametrize(("dst", "kind", "connect", "authority"), CASES)
def test_route_table(store, dst, kind, connect, authority):
    router = OutboundRouter(store)
    route = router.route(store.workload("src"), dst, lambda a: a == "10.0.0.2")
    assert route.kind is kind, route
    if connect is not None:
        assert route.destination == connect
    assert route.authority == authority
    if kind is RouteKind.REFUSE:
        assert route.reason


def test_service_route_accepts_workload_identity_and_service_sans(store):
    route = OutboundRouter(store).route(store.workload("src"), ("10.96.0.10", 80))
    assert route.identities == {ID_B, Identity.parse(ALT)}
    assert route.service == SVC and route.service_hostname == "echo.ns-b.svc.cluster.local"
    assert route.endpoint_key == ("b", ip("10.0.0.5"), 8080)


def test_direct_workload_route_accepts_only_its_identity(store):
    route = OutboundRouter(store).route(store.workload("src"), ("10.0.0.5", 8080))
    assert route.identities == {ID_B}
    assert route.workload_uid == "b"


def test_outlier_ejection_steers_away_from_a_failing_endpoint(store):
    store.apply(
        StateBatch(workloads=(workload("b2", "10.0.0.7", services={SVC: (Port(80, 8080),)}),))
    )
    now = [0.0]
    outliers = OutlierDetector(lambda: now[0], OutlierSettings())
    router = OutboundRouter(store, ServiceRouting(store, outliers, random.Random(1)))
    for _ in range(20):
        outliers.record_failure(("b", ip("10.0.0.5"), 8080))
    picked = {
        router.route(store.workload("src"), ("10.96.0.10", 80)).destination for _ in range(20)
    }
    assert picked == {("10.0.0.7", 15008)}


def test_a_workload_removed_moments_ago_stays_on_hbone_then_passes_through():
    now = [0.0]
    store = StateStore(clock=lambda: now[0], departed_grace=15.0)
    server = workload("b", "10.0.0.5")
    store.apply(StateBatch(workloads=(server,)))
    store.apply(StateBatch(removed_addresses=(server.uid,)))
    router = OutboundRouter(store)
    route = router.route(None, ("10.0.0.5", 8080))
    assert route.kind is RouteKind.HBONE
    assert route.destination == ("10.0.0.5", 15008) and route.authority == "10.0.0.5:8080"
    assert route.identities == frozenset({ID_B})
    assert "left the mesh" in route.reason
    now[0] = 15.0
    assert router.route(None, ("10.0.0.5", 8080)).kind is RouteKind.PASSTHROUGH


def test_a_removed_workload_without_hbone_passes_through_at_once():
    store = StateStore(clock=lambda: 0.0)
    legacy = workload("legacy", "10.0.0.6", hbone=False)
    store.apply(StateBatch(workloads=(legacy,)))
    store.apply(StateBatch(removed_addresses=(legacy.uid,)))
    assert OutboundRouter(store).route(None, ("10.0.0.6", 80)).kind is RouteKind.PASSTHROUGH
