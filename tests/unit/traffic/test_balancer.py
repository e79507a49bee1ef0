"""Cluster state: circuit breaking, load balancers, ejections with a DestinationRule's settings."""

from __future__ import annotations

import ipaddress
import random

import pytest

from nodeagent.model.routing import (
    ConsistentHash,
    LoadBalancer,
    OutlierDetection,
    TcpPool,
    TrafficPolicy,
)
from nodeagent.traffic.balancer import ClusterBalancer, outlier_settings
from nodeagent.traffic.outlier import OutlierDetector
from nodeagent.traffic.routes import Target
from nodeagent.traffic.selection import Candidate

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def endpoints(n: int) -> list[Candidate]:
    return [Candidate(f"w{i}", ipaddress.ip_address(f"10.0.0.{i + 1}"), 8080) for i in range(n)]


def balancer(seed: int = 1) -> tuple[ClusterBalancer, Clock]:
    clock = Clock()
    return ClusterBalancer(random.Random(seed), OutlierDetector(clock)), clock


def target(**policy: object) -> Target:
    return Target("demo/backend", 8080, policy=TrafficPolicy(**policy))  # type: ignore[arg-type]


def test_max_connections_admits_exactly_the_limit_and_counts_overflows() -> None:
    b, _ = balancer()
    t = target(tcp=TcpPool(max_connections=10))
    admitted = [b.admit(t) for _ in range(30)]
    assert admitted.count(True) == 10 and admitted[:10] == [True] * 10
    assert b.counters(t.cluster).overflows == 20 and b.counters(t.cluster).open == 10
    b.release(t)
    assert b.admit(t)


def test_no_limit_admits_everything() -> None:
    b, _ = balancer()
    assert all(b.admit(target()) for _ in range(1000))


def test_round_robin_takes_turns_and_skips_tried() -> None:
    b, _ = balancer()
    t, pool = target(load_balancer=LoadBalancer.ROUND_ROBIN), endpoints(3)
    picks = [b.pick(t, pool) for _ in range(6)]
    assert [p.workload_uid for p in picks if p] == ["w0", "w1", "w2", "w0", "w1", "w2"]
    assert b.pick(t, pool, tried=[c.key for c in pool]) is None
    left = b.pick(t, pool, tried=[pool[0].key, pool[1].key])
    assert left is not None and left.workload_uid == "w2"


def test_least_request_prefers_the_less_busy() -> None:
    b, _ = balancer()
    t, pool = target(load_balancer=LoadBalancer.LEAST_REQUEST), endpoints(2)
    for _ in range(5):
        b.started(pool[0])
    picks = {b.pick(t, pool).workload_uid for _ in range(50)}  # type: ignore[union-attr]
    assert picks == {"w1"}
    for _ in range(5):
        b.ended(pool[0])
    assert b.active(pool[0].key) == 0


def test_source_ip_hash_is_sticky() -> None:
    b, _ = balancer()
    t, pool = target(consistent_hash=ConsistentHash(use_source_ip=True)), endpoints(5)
    first = b.pick(t, pool, source_ip="10.1.1.1")
    assert all(b.pick(t, pool, source_ip="10.1.1.1") == first for _ in range(20))
    spread = {b.pick(t, pool, source_ip=f"10.1.1.{i}") for i in range(1, 60)}
    assert len(spread) > 1


def test_rule_outlier_settings_eject_and_grow() -> None:
    b, clock = balancer()
    od = OutlierDetection(
        consecutive_5xx_errors=2, base_ejection_time=5.0, max_ejection_percent=100
    )
    t, pool = target(outlier=od), endpoints(2)
    keys = [c.key for c in pool]
    assert not b.record(t, pool[0], False, keys)
    assert b.record(t, pool[0], False, keys)
    assert b.outliers.is_ejected(pool[0].key)
    clock.now += 5.0
    assert not b.outliers.is_ejected(pool[0].key)
    b.record(t, pool[0], False, keys)
    assert b.record(t, pool[0], False, keys)
    assert b.outliers.ejected_until(pool[0].key) == pytest.approx(clock.now + 10.0)


def test_max_ejection_percent_keeps_the_rest_in() -> None:
    b, _ = balancer()
    od = OutlierDetection(consecutive_5xx_errors=1, max_ejection_percent=10)
    t, pool = target(outlier=od), endpoints(2)
    keys = [c.key for c in pool]
    assert b.record(t, pool[0], False, keys)  # 0% out < 10%: the first ejection is allowed
    assert not b.record(t, pool[1], False, keys)  # 50% out: no more
    assert not b.outliers.is_ejected(pool[1].key)


def test_disabled_outlier_detection_never_ejects() -> None:
    b, _ = balancer()
    t, pool = target(outlier=OutlierDetection(consecutive_5xx_errors=0)), endpoints(1)
    assert outlier_settings(OutlierDetection(consecutive_5xx_errors=0)) is None
    assert not any(b.record(t, pool[0], False, [pool[0].key]) for _ in range(50))


def test_gateway_errors_threshold_counts_connect_failures_too() -> None:
    od = OutlierDetection(consecutive_5xx_errors=0, consecutive_gateway_errors=3)
    settings = outlier_settings(od)
    assert settings is not None and settings.consecutive_failures == 3


def test_events_are_counted_per_cluster() -> None:
    b, _ = balancer()
    t = target(outlier=OutlierDetection(consecutive_5xx_errors=1, max_ejection_percent=100))
    [ep] = endpoints(1)
    assert b.record(t, ep, False, [ep.key])
    b.count(t.cluster, "retry")
    assert b.counters(t.cluster).events() == {
        "overflow": 0,
        "fault_abort": 0,
        "fault_delay": 0,
        "retry": 1,
        "mirror_dropped": 0,
        "ejection": 1,
    }
    assert dict(b.clusters()) == {t.cluster: b.counters(t.cluster)}
    with pytest.raises(ValueError):
        b.count(t.cluster, "nope")
