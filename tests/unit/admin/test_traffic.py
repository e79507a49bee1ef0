"""`/routes` as the agent builds it from its route state, and explain's route part."""

from __future__ import annotations

import ipaddress
import random
from dataclasses import replace

import pytest

from nodeagent.admin.sources import MeshExplainer
from nodeagent.admin.traffic import RoutePreviewer, RoutesReport
from nodeagent.cli.agent import routes_text
from nodeagent.model.workload import GatewayAddress, NamespacedHostname, Port, Workload
from nodeagent.proxy.outbound import OutboundRouter
from nodeagent.proxy.routing import ServiceRouting
from nodeagent.state.store import StateBatch, StateStore
from nodeagent.traffic.outlier import OutlierDetector
from tests.builders import destination_rule, service, virtual_service, workload

pytestmark = pytest.mark.unit

BACKEND = service("backend", "10.96.0.10", namespace="demo", ports=(Port(80, 8080),))
ECHO = service("echo", "10.96.0.11", namespace="demo", ports=(Port(80, 8080),))
KEY = BACKEND.key
VIP = ipaddress.ip_address("10.96.0.10")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pod(name: str, addr: str, version: str, svc: str = KEY) -> Workload:
    return workload(
        name,
        addr,
        namespace="demo",
        canonical_name=svc.split("/")[1].split(".")[0],
        canonical_revision=version,
        services={svc: (Port(80, 8080),)},
    )


RULE = destination_rule(
    "backend",
    "demo",
    spec={
        "host": "backend",
        "trafficPolicy": {
            "connectionPool": {"tcp": {"maxConnections": 10}},
            "outlierDetection": {"consecutive5xxErrors": 1, "maxEjectionPercent": 100},
            "loadBalancer": {"simple": "ROUND_ROBIN"},
        },
        "subsets": [{"name": v, "labels": {"version": v}} for v in ("v1", "v2")],
    },
)
CANARY = virtual_service(
    "canary",
    "demo",
    spec={
        "hosts": ["backend"],
        "http": [{"route": [{"destination": {"host": "backend"}}]}],
        "tcp": [
            {
                "match": [{"port": 80, "sourceLabels": {"app": "web"}}],
                "route": [
                    {"destination": {"host": "backend", "subset": "v1"}, "weight": 90},
                    {"destination": {"host": "backend", "subset": "v3"}, "weight": 10},
                ],
                "fault": {"abort": {"percentage": {"value": 5}}},
            },
            {
                "route": [
                    {"destination": {"host": "backend", "subset": "v1"}, "weight": 90},
                    {"destination": {"host": "backend", "subset": "v2"}, "weight": 10},
                ],
                "fault": {"delay": {"fixedDelay": "1s", "percentage": {"value": 20}}},
                "mirror": {"host": "echo"},
                "mirrorPercentage": {"value": 50},
            },
        ],
    },
)


@pytest.fixture
def routing() -> tuple[ServiceRouting, StateStore, Clock]:
    store = StateStore()
    store.apply(
        StateBatch(
            workloads=(
                pod("a", "10.0.0.1", "v1"),
                pod("b", "10.0.0.2", "v2"),
                pod("c", "10.0.0.3", "v2"),
                pod("e", "10.0.0.4", "v1", ECHO.key),
                workload("web", "10.0.0.9", namespace="demo", canonical_name="web"),
            ),
            services=(BACKEND, ECHO),
            virtual_services=(CANARY,),
            destination_rules=(RULE,),
        )
    )
    clock = Clock()
    return ServiceRouting(store, OutlierDetector(clock), random.Random(1)), store, clock


def test_routes_shows_routes_subsets_endpoints_and_notes(routing) -> None:
    r, store, clock = routing
    target = r.table.target(KEY, 80, "v2")
    assert target is not None
    [b, _c] = r.endpoints_of(target)[0]
    r.balancer.admit(target)
    r.balancer.started(b)
    r.balancer.record(target, b, False, [b.key])  # ejected for 30 s
    r.count("retry", target)
    clock.now += 10
    data = RoutesReport(store, r).routes()
    [backend] = data["services"]  # echo: no route, no rule, no traffic yet
    assert (backend["service"], backend["virtualService"], backend["destinationRule"]) == (
        KEY,
        "demo/canary",
        "demo/backend",
    )
    first, second = backend["routes"]
    assert first["match"] == ["port 80, sourceLabels app=web"]
    assert [(d["subset"], d["weight"], d["service"]) for d in first["destinations"]] == [
        ("v1", 90, KEY),
        ("v3", 10, ""),  # defined by no DestinationRule: unresolved
    ]
    assert first["fault"] == {"abortPercent": 5.0, "delaySeconds": None, "delayPercent": None}
    assert second["match"] == ["any"]
    assert second["fault"]["delaySeconds"] == 1.0 and second["fault"]["delayPercent"] == 20.0
    assert second["mirror"]["service"] == ECHO.key and second["mirror"]["percent"] == 50.0
    assert second["maxConnectAttempts"] == 3
    subsets = {s["name"]: s for s in backend["subsets"]}
    assert list(subsets) == ["v1", "v2"]  # every route names a subset: no whole-service row
    v2 = subsets["v2"]
    assert v2["labels"] == {"version": "v2"}
    [port] = v2["ports"]
    assert (port["port"], port["open"], port["maxConnections"], port["loadBalancer"]) == (
        80,
        1,
        10,
        "ROUND_ROBIN",
    )
    assert port["events"]["ejection"] == 1 and port["events"]["retry"] == 1
    by_workload = {e["workload"]: e for e in v2["endpoints"]}
    assert by_workload["demo/b"] == {
        "workload": "demo/b",
        "address": "10.0.0.2:8080",
        "servicePort": 80,
        "version": "v2",
        "healthy": True,
        "ejectedSeconds": 20.0,
        "ejections": 1,
        "active": 1,
    }
    assert by_workload["demo/c"]["ejectedSeconds"] is None
    assert [e["workload"] for e in subsets["v1"]["endpoints"]] == ["demo/a"]
    assert any("subset v3" in n for n in backend["notes"])
    assert backend["needsWaypoint"] == ["demo/canary: spec.http"]
    assert data["notes"] == backend["notes"]


def test_a_service_without_config_shows_once_traffic_went_to_it(routing) -> None:
    r, store, _ = routing
    assert [s["service"] for s in RoutesReport(store, r).routes()["services"]] == [KEY]
    target = r.table.target(ECHO.key, 80)
    assert target is not None and r.balancer.admit(target)
    [_, echo] = RoutesReport(store, r).routes()["services"]
    assert (echo["virtualService"], echo["destinationRule"], echo["routes"]) == ("", "", [])
    [whole] = echo["subsets"]
    assert whole["name"] == "" and whole["ports"][0]["open"] == 1
    assert whole["ports"][0]["maxConnections"] is None
    assert [e["workload"] for e in whole["endpoints"]] == ["demo/e"]


def test_routes_say_when_a_service_is_behind_a_waypoint(routing) -> None:
    r, store, _ = routing
    [backend] = RoutesReport(store, r).routes()["services"]
    assert backend["waypoint"] == ""
    waypoint = GatewayAddress(NamespacedHostname("demo", "waypoint.demo.svc.cluster.local"), 15008)
    store.apply(StateBatch(services=(replace(BACKEND, waypoint=waypoint),)))
    data = RoutesReport(store, r).routes()
    [backend] = data["services"]
    assert backend["waypoint"] == "demo/waypoint.demo.svc.cluster.local"
    text = routes_text(data, data["services"], 100)
    assert "behind waypoint demo/waypoint.demo.svc.cluster.local: the agent sends" in text


def explainer(r: ServiceRouting, store: StateStore) -> MeshExplainer:
    """As app.py builds it: routing over a preview copy, plus the route preview."""
    return MeshExplainer(
        store,
        lambda *args: OutboundRouter(store, r.preview()).route(*args),
        RoutePreviewer(store, r),
    )


def test_explain_names_route_subsets_candidates_fault_and_mirror(routing) -> None:
    r, store, clock = routing
    target = r.table.target(KEY, 80, "v2")
    assert target is not None
    b = r.endpoints_of(target)[0][0]
    r.balancer.record(target, b, False, [b.key])  # b ejected for 30 s
    clock.now += 9
    result = explainer(r, store).explain("demo/a", "10.96.0.10", 80)
    traffic = result["traffic"]
    assert traffic["route"] == "demo/canary tcp[1]"  # a has no app=web label: not tcp[0]
    v1, v2 = traffic["destinations"]
    assert (v1["subset"], v1["weight"], v2["subset"], v2["weight"]) == ("v1", 90, "v2", 10)
    assert (v2["open"], v2["maxConnections"], v2["loadBalancer"]) == (0, 10, "ROUND_ROBIN")
    cands = {c["address"]: c for c in v2["candidates"]}
    assert cands["10.0.0.2:8080"]["ejectedSeconds"] == 21.0
    assert not cands["10.0.0.2:8080"]["eligible"] and cands["10.0.0.3:8080"]["eligible"]
    assert traffic["fault"]["delayPercent"] == 20.0 and traffic["fault"]["abortPercent"] is None
    assert traffic["mirror"]["service"] == ECHO.key and traffic["mirror"]["percent"] == 50.0
    steps = result["steps"]
    assert "route demo/canary tcp[1] (match any): v1 90%, v2 10%" in steps
    assert (
        "subset v2 (10%): 10.0.0.3:8080; ejected: 10.0.0.2:8080 (21s left); 0/10 connections"
        in steps
    )
    assert "fault: 20% of connections are held 1s before they open (DI)" in steps
    assert "mirror: 50% of connections copy their client bytes to echo" in steps


def test_explain_from_a_matching_caller_shows_the_unresolved_subset(routing) -> None:
    r, store, _ = routing
    result = explainer(r, store).explain("demo/web", "10.96.0.10", 80)
    traffic = result["traffic"]
    assert traffic["route"] == "demo/canary tcp[0]"
    assert traffic["destinations"][1] == {
        "service": "",
        "subset": "v3",
        "weight": 10,
        "note": "backend v3 resolves to nothing",
        "candidates": [],
    }
    assert "fault: 5% of connections are refused (FI)" in result["steps"]
    assert "subset v3: backend v3 resolves to nothing" in result["steps"]


def test_explain_takes_no_turn_no_draw_and_no_slot(routing) -> None:
    r, store, _ = routing
    twin = ServiceRouting(store, r.balancer.outliers, random.Random(1))
    explain = explainer(r, store)
    for _ in range(5):
        explain.explain("demo/a", "10.96.0.10", 80)
    assert dict(r.balancer.clusters()) == {}

    def picks(routing: ServiceRouting) -> list[str]:
        out = []
        for _ in range(6):
            plan = routing.plan(None, BACKEND, 80, VIP, "10.0.0.9")
            pick = routing.next_pick(plan)
            assert pick is not None
            out.append(pick.workload.name)
        return out

    assert picks(r) == picks(twin)  # the same draws and round-robin turns as if never asked


def test_explain_of_a_service_without_config_shows_the_whole_service(routing) -> None:
    r, store, _ = routing
    result = explainer(r, store).explain("demo/a", "10.96.0.11", 80)
    traffic = result["traffic"]
    assert traffic["route"] == "" and traffic.get("fault") is None
    [whole] = traffic["destinations"]
    assert whole["subset"] == "" and [c["workload"] for c in whole["candidates"]] == ["demo/e"]
    assert f"no route of a VirtualService for {ECHO.key}:80: the whole service" in result["steps"]
