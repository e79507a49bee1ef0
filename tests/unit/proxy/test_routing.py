"""ServiceRouting: a connection's plan through targets and endpoints, from a real StateStore."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.model.routing import parse_destination_rule, parse_virtual_service
from nodeagent.model.workload import Port, WorkloadStatus
from nodeagent.proxy.routing import ServicePlan, ServiceRouting
from nodeagent.state.store import StateBatch, StateStore
from nodeagent.traffic.outlier import OutlierDetector
from tests.builders import service, workload

pytestmark = pytest.mark.unit

KEY = "demo/backend.demo.svc.cluster.local"
BACKEND = service("backend", "10.96.0.10", namespace="demo", ports=(Port(8080, 8080),))
RULE = parse_destination_rule(
    "demo",
    "backend",
    {
        "host": "backend",
        "trafficPolicy": {"outlierDetection": {"consecutive5xxErrors": 1}},
        "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}},
        ],
    },
)


def split(v1: int, v2: int, **route: object) -> object:
    return parse_virtual_service(
        "demo",
        "split",
        {
            "hosts": ["backend"],
            "tcp": [
                {
                    "route": [
                        {"destination": {"host": "backend", "subset": "v1"}, "weight": v1},
                        {"destination": {"host": "backend", "subset": "v2"}, "weight": v2},
                    ],
                    **route,
                }
            ],
        },
    )


def endpoint(name: str, ip: str, version: str, healthy: bool = True) -> object:
    return workload(
        name,
        ip,
        namespace="demo",
        hbone=True,
        canonical_name="backend",
        canonical_revision=version,
        status=WorkloadStatus.HEALTHY if healthy else WorkloadStatus.UNHEALTHY,
        services={KEY: (Port(8080, 8080),)},
    )


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def routing(*endpoints: object, vs: object = None, seed: int = 0) -> tuple[ServiceRouting, Clock]:
    store = StateStore()
    store.apply(
        StateBatch(
            workloads=tuple(endpoints),  # type: ignore[arg-type]
            services=(BACKEND,),
            virtual_services=(vs,) if vs is not None else (),  # type: ignore[arg-type]
            destination_rules=(RULE,),
        )
    )
    clock = Clock()
    return ServiceRouting(store, OutlierDetector(clock), random.Random(seed)), clock


def plan(r: ServiceRouting) -> ServicePlan:
    import ipaddress

    return r.plan(None, BACKEND, 8080, ipaddress.ip_address("10.96.0.10"), "10.0.0.1")


def test_a_failed_subset_falls_back_to_the_other_subset() -> None:
    r, _ = routing(
        endpoint("a1", "10.1.0.1", "v1"), endpoint("b1", "10.1.0.2", "v2"), vs=split(0, 100)
    )
    p = plan(r)
    first = r.next_pick(p)
    assert first is not None and first.workload.uid == "b1"
    assert r.record(first, ok=False)  # one failure ejects (consecutive5xxErrors: 1)
    second = r.next_pick(p)
    assert second is not None and second.workload.uid == "a1"
    assert second.target.subset == "v1"
    # New connections skip the ejected v2 while v1 has a healthy endpoint.
    again = r.next_pick(plan(r))
    assert again is not None and again.workload.uid == "a1"


def test_attempts_are_bounded_by_max_connect_attempts() -> None:
    eps = [endpoint(f"w{i}", f"10.1.0.{i + 1}", "v1") for i in range(5)]
    r, _ = routing(*eps, vs=split(100, 0, maxConnectAttempts=2))
    p = plan(r)
    picks = [r.next_pick(p), r.next_pick(p), r.next_pick(p)]
    assert picks[0] is not None and picks[1] is not None and picks[2] is None
    assert "2 connect attempt(s) failed" in p.note


def test_ejected_endpoints_are_used_when_nothing_else_is_left() -> None:
    r, _ = routing(endpoint("b1", "10.1.0.2", "v2"), vs=split(0, 100))
    first = r.next_pick(plan(r))
    assert first is not None and r.record(first, ok=False)
    # Only the ejected endpoint exists anywhere: better a failing endpoint than none (panic).
    again = r.next_pick(plan(r))
    assert again is not None and again.workload.uid == "b1"


def test_max_connections_slot_moves_with_the_target() -> None:
    r, _ = routing(endpoint("a1", "10.1.0.1", "v1"), endpoint("b1", "10.1.0.2", "v2"))
    p = plan(r)
    pick = r.next_pick(p)
    assert pick is not None and r.admit(p, pick.target)
    assert r.balancer.counters(pick.target.cluster).open == 1
    r.release(p)
    assert r.balancer.counters(pick.target.cluster).open == 0


@settings(max_examples=150, deadline=None)
@given(
    versions=st.lists(st.sampled_from(["v1", "v2"]), min_size=0, max_size=5),
    healthy=st.lists(st.booleans(), min_size=5, max_size=5),
    v1=st.integers(0, 100),
    seed=st.integers(0, 1000),
)
def test_no_subset_without_endpoints_is_picked_while_another_has_one(
    versions: list[str], healthy: list[bool], v1: int, seed: int
) -> None:
    eps = [endpoint(f"w{i}", f"10.1.0.{i + 1}", v, healthy[i]) for i, v in enumerate(versions)]
    r, _ = routing(*eps, vs=split(v1, 100 - v1), seed=seed)
    pick = r.next_pick(plan(r))
    usable = {v for v, h in zip(versions, healthy, strict=False) if h}
    if not usable:
        assert pick is None  # nothing healthy anywhere: refused, never a made-up endpoint
        return
    assert pick is not None, "a connection gets an endpoint while any healthy one exists"
    assert pick.target.subset in usable
    assert pick.workload.canonical_revision == pick.target.subset
