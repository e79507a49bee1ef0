"""`/routes` as the agent builds it from its route state, and explain's route part."""

from __future__ import annotations

import ipaddress
import random

import pytest

from nodeagent.admin.traffic import RoutesReport
from nodeagent.model.workload import Port, Workload
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
