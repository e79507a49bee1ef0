"""ServiceRouting and outlier detection: HTTP outcomes eject, minHealthPercent ignores ejections."""

from __future__ import annotations

import ipaddress
import random
from typing import Any

import pytest

from nodeagent.model.routing import parse_destination_rule
from nodeagent.model.workload import Port, WorkloadStatus
from nodeagent.proxy.routing import Pick, ServicePlan, ServiceRouting
from nodeagent.state.store import StateBatch, StateStore
from nodeagent.traffic.outlier import Outcome, OutlierDetector
from tests.builders import service, workload

pytestmark = pytest.mark.unit

KEY = "demo/backend.demo.svc.cluster.local"
BACKEND = service("backend", "10.96.0.10", namespace="demo", ports=(Port(8080, 8080),))


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def endpoint(i: int) -> Any:
    return workload(
        f"w{i}",
        f"10.1.0.{i + 1}",
        namespace="demo",
        hbone=True,
        canonical_name="backend",
        canonical_revision="v1",
        status=WorkloadStatus.HEALTHY,
        services={KEY: (Port(8080, 8080),)},
    )


def routing(size: int, outlier: dict[str, Any] | None) -> tuple[ServiceRouting, Clock]:
    rules = ()
    if outlier is not None:
        spec = {"host": "backend", "trafficPolicy": {"outlierDetection": outlier}}
        rules = (parse_destination_rule("demo", "backend", spec),)
    store = StateStore()
    store.apply(
        StateBatch(
            workloads=tuple(endpoint(i) for i in range(size)),
            services=(BACKEND,),
            destination_rules=rules,
        )
    )
    clock = Clock()
    return ServiceRouting(store, OutlierDetector(clock), random.Random(0)), clock


def plan(r: ServiceRouting) -> ServicePlan:
    return r.plan(None, BACKEND, 8080, ipaddress.ip_address("10.96.0.10"), "10.0.0.1")


def pick_of(r: ServiceRouting, uid: str) -> Pick:
    """A pick of one endpoint by name (as if the balancer had chosen it)."""
    target = plan(r).target
    assert target is not None
    every = r.endpoints_of(target)[0]
    [candidate] = [c for c in every if c.workload_uid == uid]
    return Pick(target, candidate, endpoint(int(uid[1:])), tuple(c.key for c in every))


def usable(r: ServiceRouting) -> set[str]:
    p = plan(r)
    assert p.target is not None
    pool, _, _ = r.candidates(p, p.target)
    return {c.workload_uid for c in pool}


def test_consecutive_5xx_responses_eject_and_are_counted() -> None:
    r, _ = routing(3, {"consecutive5xxErrors": 2, "maxEjectionPercent": 100})
    pick = pick_of(r, "w0")
    assert not r.record_outcome(pick, Outcome.response(503))
    assert r.record_outcome(pick, Outcome.response(500))
    assert r.balancer.counters(pick.target.cluster).ejections == 1
    assert usable(r) == {"w1", "w2"}


def test_a_good_response_resets_the_count() -> None:
    r, _ = routing(3, {"consecutive5xxErrors": 2, "maxEjectionPercent": 100})
    pick = pick_of(r, "w0")
    results = [r.record_outcome(pick, Outcome.response(s)) for s in (503, 200, 503, 404, 503)]
    assert results == [False] * 5
    assert usable(r) == {"w0", "w1", "w2"}


def test_gateway_errors_and_local_failures_share_a_counter_unless_split() -> None:
    r, _ = routing(3, {"consecutive5xxErrors": 0, "consecutiveGatewayErrors": 2})
    pick = pick_of(r, "w0")
    assert not r.record_outcome(pick, Outcome.connect_failure())
    assert r.record_outcome(pick, Outcome.response(504))
    split = {
        "consecutive5xxErrors": 0,
        "consecutiveGatewayErrors": 2,
        "splitExternalLocalOriginErrors": True,
        "consecutiveLocalOriginFailures": 3,
    }
    r, _ = routing(3, split)
    pick = pick_of(r, "w0")
    outcomes = [Outcome.connect_failure(), Outcome.response(502), Outcome.connect_failure()]
    assert [r.record_outcome(pick, o) for o in outcomes] == [False, False, False]
    assert r.record_outcome(pick, Outcome.response(503))


def test_without_outlier_detection_nothing_is_ejected() -> None:
    r, _ = routing(2, None)
    pick = pick_of(r, "w0")
    assert not any(r.record_outcome(pick, Outcome.response(503)) for _ in range(50))
    assert not any(r.record_outcome(pick, Outcome.connect_failure()) for _ in range(50))
    assert not any(r.record(pick, ok=False) for _ in range(50))
    assert usable(r) == {"w0", "w1"}


def test_record_keeps_counting_connect_failures_for_the_agent() -> None:
    r, _ = routing(2, {"consecutive5xxErrors": 2})
    pick = pick_of(r, "w0")
    assert [r.record(pick, ok=False) for _ in range(2)] == [False, True]
    other = pick_of(r, "w1")
    assert not r.record(other, ok=False)
    assert not r.record(other, ok=True)  # a connect is a success to the L4 path: reset
    assert not r.record(other, ok=False)


@pytest.mark.parametrize(
    ("min_health", "ejected", "usable_count"),
    [
        (0, 3, 1),  # disabled
        (50, 2, 2),  # 2 of 4 up: 50% is not below 50%
        (50, 3, 4),  # 1 of 4 up: below, every endpoint is used
        (100, 1, 4),  # any ejection is below 100%
    ],
)
def test_min_health_percent_ignores_ejections_below_it(
    min_health: int, ejected: int, usable_count: int
) -> None:
    outlier = {"consecutive5xxErrors": 1, "maxEjectionPercent": 100, "minHealthPercent": min_health}
    r, _ = routing(4, outlier)
    for i in range(ejected):
        assert r.record_outcome(pick_of(r, f"w{i}"), Outcome.response(503))
    assert len(usable(r)) == usable_count
    picked = r.next_pick(plan(r))
    assert picked is not None


def test_min_health_percent_panic_ends_with_the_ejections() -> None:
    outlier = {"consecutive5xxErrors": 1, "maxEjectionPercent": 100, "minHealthPercent": 50}
    r, clock = routing(2, outlier)
    assert r.record_outcome(pick_of(r, "w0"), Outcome.response(503))
    assert usable(r) == {"w1"}  # 1 of 2 up: 50%, not below
    assert r.record_outcome(pick_of(r, "w1"), Outcome.response(503))
    assert usable(r) == {"w0", "w1"}
    clock.now += 30.0  # baseEjectionTime (Istio's default)
    assert usable(r) == {"w0", "w1"}
    assert r.cluster_stats()[0].ejected == 0
