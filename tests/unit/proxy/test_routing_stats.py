"""What the metrics and `nodeagent routes` see of traffic management: counters per cluster,
endpoints ejected now, open connections, summed per service and subset."""

from __future__ import annotations

import ipaddress
import random

import pytest

from nodeagent.model.workload import Port, Workload
from nodeagent.proxy.routing import ServicePlan, ServiceRouting
from nodeagent.state.store import StateBatch, StateStore
from nodeagent.traffic.balancer import EVENTS
from nodeagent.traffic.outlier import OutlierDetector
from tests.builders import destination_rule, service, virtual_service, workload

pytestmark = pytest.mark.unit

BACKEND = service("backend", "10.96.0.10", namespace="demo", ports=(Port(80, 8080),))
KEY = BACKEND.key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pod(name: str, addr: str, version: str) -> Workload:
    return workload(
        name,
        addr,
        namespace="demo",
        canonical_name="backend",
        canonical_revision=version,
        services={KEY: (Port(80, 8080),)},
    )


def routing_for(max_connections: int = 1) -> tuple[ServiceRouting, StateStore, Clock]:
    store = StateStore()
    rule = destination_rule(
        "backend",
        "demo",
        spec={
            "host": "backend",
            "trafficPolicy": {
                "connectionPool": {"tcp": {"maxConnections": max_connections}},
                "outlierDetection": {"consecutive5xxErrors": 1, "maxEjectionPercent": 100},
            },
            "subsets": [{"name": v, "labels": {"version": v}} for v in ("v1", "v2")],
        },
    )
    canary = virtual_service(
        "backend",
        "demo",
        spec={
            "hosts": ["backend"],
            "tcp": [
                {
                    "route": [
                        {"destination": {"host": "backend", "subset": "v1"}, "weight": 90},
                        {"destination": {"host": "backend", "subset": "v2"}, "weight": 10},
                    ]
                }
            ],
        },
    )
    store.apply(
        StateBatch(
            workloads=(
                pod("a", "10.0.0.1", "v1"),
                pod("b", "10.0.0.2", "v2"),
                pod("c", "10.0.0.3", "v2"),
            ),
            services=(BACKEND,),
            virtual_services=(canary,),
            destination_rules=(rule,),
        )
    )
    clock = Clock()
    return ServiceRouting(store, OutlierDetector(clock), random.Random(1)), store, clock


def v2_plan(routing: ServiceRouting) -> ServicePlan:
    """A plan whose weighted pick is v2 (the draw is seeded: search for one)."""
    for _ in range(200):
        plan = routing.plan(None, BACKEND, 80, ipaddress.ip_address("10.96.0.10"), "10.0.0.9")
        if plan.decision.target.subset == "v2":
            return plan
    raise AssertionError("no v2 decision in 200 draws")


def test_no_traffic_no_series() -> None:
    routing, _, _ = routing_for()
    assert routing.cluster_stats() == []


def test_overflow_and_ejection_are_counted_in_the_subset_they_hit() -> None:
    routing, _, clock = routing_for(max_connections=1)
    first, second = v2_plan(routing), v2_plan(routing)
    pick = routing.next_pick(first)
    assert pick is not None and pick.target.subset == "v2"
    assert routing.admit(first, pick.target)
    assert not routing.admit(second, pick.target)  # over maxConnections: UO
    assert routing.record(pick, ok=False)  # one failure ejects (consecutive5xxErrors: 1)
    [v2] = routing.cluster_stats()
    assert (v2.service, v2.subset, v2.open, v2.ejected) == (KEY, "v2", 1, 1)
    assert v2.events["overflow"] == 1 and v2.events["ejection"] == 1
    assert set(v2.events) == set(EVENTS)
    routing.release(first)
    clock.now += 31  # the 30 s base ejection time has passed
    [v2] = routing.cluster_stats()
    assert (v2.open, v2.ejected) == (0, 0)
    assert v2.events["ejection"] == 1  # counters are cumulative


def test_data_path_events_count_against_the_target() -> None:
    routing, _, _ = routing_for()
    plan = v2_plan(routing)
    for event in ("fault_abort", "fault_delay", "retry", "mirror_dropped", "retry"):
        routing.count(event, plan.decision.target)
    [v2] = routing.cluster_stats()
    assert v2.events == {
        "overflow": 0,
        "fault_abort": 1,
        "fault_delay": 1,
        "retry": 2,
        "mirror_dropped": 1,
        "ejection": 0,
    }
    with pytest.raises(ValueError, match="unknown cluster event"):
        routing.count("bogus", plan.decision.target)


def test_ports_of_a_subset_are_summed() -> None:
    routing, _, _ = routing_for(max_connections=5)
    plan = v2_plan(routing)
    target = plan.decision.target
    other = routing.table.target(KEY, 81, "v2")
    assert other is not None
    assert routing.balancer.admit(target) and routing.balancer.admit(other)
    [v2] = routing.cluster_stats()
    assert v2.open == 2
    assert routing.table.target(KEY, 80, "v3") is None  # no such subset
