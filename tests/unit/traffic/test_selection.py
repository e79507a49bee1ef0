"""Endpoint selection: health, STRICT/FAILOVER locality, capacity weights, passthrough."""

from __future__ import annotations

import ipaddress
import random
from collections import Counter

import pytest

from nodeagent.model.workload import (
    HealthPolicy,
    LoadBalancing,
    LoadBalancingMode,
    LoadBalancingScope,
    Locality,
    Workload,
    WorkloadStatus,
)
from nodeagent.traffic import (
    Candidate,
    EndpointSelector,
    SelectionOutcome,
    SourceLocation,
    rank,
)

REGION, ZONE, SUBZONE, NODE, CLUSTER, NETWORK = (
    LoadBalancingScope.REGION,
    LoadBalancingScope.ZONE,
    LoadBalancingScope.SUBZONE,
    LoadBalancingScope.NODE,
    LoadBalancingScope.CLUSTER,
    LoadBalancingScope.NETWORK,
)

SOURCE = SourceLocation(Locality("us", "us-a", "rack1"), node="n1", network="net1", cluster="c1")


def ep(
    uid: str,
    *,
    region: str = "us",
    zone: str = "us-a",
    subzone: str = "rack1",
    node: str = "n1",
    network: str = "net1",
    cluster: str = "c1",
    healthy: bool = True,
    weight: int = 1,
) -> Candidate:
    index = int(uid.strip("abcdefghijklmnopqrstuvwxyz-") or 1)
    return Candidate(
        workload_uid=uid,
        address=ipaddress.ip_address(f"10.0.0.{index}"),
        port=8080,
        healthy=healthy,
        locality=Locality(region, zone, subzone),
        node=node,
        network=network,
        cluster=cluster,
        weight=weight,
    )


def pick_many(selector: EndpointSelector, candidates, lb=None, n: int = 200) -> Counter[str]:
    counts: Counter[str] = Counter()
    for _ in range(n):
        selection = selector.select(candidates, SOURCE, lb)
        assert selection.endpoint is not None
        counts[selection.endpoint.workload_uid] += 1
    return counts


def lb(mode: LoadBalancingMode, *prefs: LoadBalancingScope, allow_all: bool = False):
    health = HealthPolicy.ALLOW_ALL if allow_all else HealthPolicy.ONLY_HEALTHY
    return LoadBalancing(routing_preference=prefs, mode=mode, health_policy=health)


STRICT = LoadBalancingMode.STRICT
FAILOVER = LoadBalancingMode.FAILOVER
UNSPECIFIED = LoadBalancingMode.UNSPECIFIED_MODE


@pytest.mark.parametrize(
    ("scope", "field", "value"),
    [
        (REGION, "region", "eu"),
        (ZONE, "zone", "us-b"),
        (SUBZONE, "subzone", "rack2"),
        (NODE, "node", "n2"),
        (CLUSTER, "cluster", "c2"),
        (NETWORK, "network", "net2"),
    ],
)
def test_strict_keeps_only_endpoints_in_each_scope(scope, field, value) -> None:
    local, remote = ep("ep-1"), ep("ep-2", **{field: value})
    eligible, _ = EndpointSelector().eligible([local, remote], SOURCE, lb(STRICT, scope))
    assert eligible == (local,)


def test_strict_needs_every_scope() -> None:
    same_zone_other_node = ep("ep-1", node="n2")
    selection = EndpointSelector().select([same_zone_other_node], SOURCE, lb(STRICT, ZONE, NODE))
    assert selection.outcome is SelectionOutcome.NO_HEALTHY_ENDPOINT
    assert selection.reason == "no healthy endpoint shares the source's ZONE, NODE (STRICT)"
    assert not selection.ok


def test_failover_prefers_the_best_tier_then_falls_back_in_order() -> None:
    prefs = (NETWORK, REGION, ZONE, NODE)
    same_node = ep("ep-1")
    same_zone = ep("ep-2", node="n9")
    same_region = ep("ep-3", zone="us-b", node="n9")
    other_region = ep("ep-4", region="eu", zone="eu-a", node="n9")
    other_network = ep("ep-5", network="net2")  # matches zone/node, but network comes first
    everyone = [other_network, other_region, same_region, same_zone, same_node]
    selector = EndpointSelector(random.Random(1))
    expectations = [
        (everyone, {same_node}),
        ([other_network, other_region, same_region, same_zone], {same_zone}),
        ([other_network, other_region, same_region], {same_region}),
        ([other_network, other_region], {other_region}),
        ([other_network], {other_network}),
    ]
    for pool, expected in expectations:
        eligible, _ = selector.eligible(pool, SOURCE, lb(FAILOVER, *prefs))
        assert set(eligible) == expected


def test_failover_falls_back_when_the_best_tier_is_unhealthy() -> None:
    near, far = ep("ep-1", healthy=False), ep("ep-2", region="eu")
    selection = EndpointSelector().select([near, far], SOURCE, lb(FAILOVER, REGION))
    assert selection.endpoint == far


def test_rank_counts_leading_matches_only() -> None:
    # Same zone but other region: REGION fails first, so ZONE does not count.
    assert rank((REGION, ZONE), SOURCE, ep("ep-1", region="eu")) == 0
    assert rank((REGION, ZONE), SOURCE, ep("ep-1", zone="us-b")) == 1
    assert rank((REGION, ZONE), SOURCE, ep("ep-1")) == 2


def test_no_mode_ignores_preferences_and_spreads_over_all() -> None:
    pool = [ep("ep-1"), ep("ep-2", region="eu"), ep("ep-3", node="n3")]
    counts = pick_many(EndpointSelector(random.Random(7)), pool, lb(UNSPECIFIED, REGION, NODE))
    assert set(counts) == {"ep-1", "ep-2", "ep-3"}


def test_default_without_load_balancing_uses_all_healthy() -> None:
    pool = [ep("ep-1"), ep("ep-2"), ep("ep-3", healthy=False)]
    counts = pick_many(EndpointSelector(random.Random(3)), pool)
    assert set(counts) == {"ep-1", "ep-2"}


def test_unhealthy_only_is_no_healthy_endpoint() -> None:
    selection = EndpointSelector().select([ep("ep-1", healthy=False)], SOURCE)
    assert selection.outcome is SelectionOutcome.NO_HEALTHY_ENDPOINT
    assert selection.endpoint is None
    assert selection.reason == "all 1 endpoints are unhealthy"


def test_allow_all_health_policy_uses_unhealthy_endpoints() -> None:
    selection = EndpointSelector().select(
        [ep("ep-1", healthy=False)], SOURCE, lb(UNSPECIFIED, allow_all=True)
    )
    assert selection.ok
    assert selection.endpoint is not None and selection.endpoint.workload_uid == "ep-1"


def test_no_endpoints_is_reported() -> None:
    selection = EndpointSelector().select([], SOURCE)
    assert selection.outcome is SelectionOutcome.NO_HEALTHY_ENDPOINT
    assert selection.reason == "service has no endpoints"


def test_passthrough_mode_keeps_the_original_destination() -> None:
    selection = EndpointSelector().select([ep("ep-1")], SOURCE, lb(LoadBalancingMode.PASSTHROUGH))
    assert selection.outcome is SelectionOutcome.PASSTHROUGH
    assert selection.endpoint is None


def test_weights_split_traffic_by_capacity() -> None:
    pool = [ep("ep-1", weight=1), ep("ep-2", weight=3)]
    counts = pick_many(EndpointSelector(random.Random(42)), pool, n=4000)
    share = counts["ep-2"] / 4000
    assert 0.72 < share < 0.78  # expected 0.75; seeded, so this is deterministic


def test_zero_weight_is_never_picked_while_others_have_weight() -> None:
    pool = [ep("ep-1", weight=0), ep("ep-2", weight=2)]
    assert pick_many(EndpointSelector(random.Random(5)), pool) == Counter({"ep-2": 200})


def test_all_zero_weights_are_treated_as_equal() -> None:
    pool = [ep("ep-1", weight=0), ep("ep-2", weight=0)]
    assert set(pick_many(EndpointSelector(random.Random(5)), pool)) == {"ep-1", "ep-2"}


def test_same_seed_same_choices() -> None:
    pool = [ep(f"ep-{i}") for i in range(1, 6)]

    def run() -> list[str]:
        selector = EndpointSelector(random.Random(99))
        picks = [selector.select(pool, SOURCE).endpoint for _ in range(20)]
        return [p.workload_uid for p in picks if p is not None]

    assert run() == run()


def test_candidate_from_workload() -> None:
    workload = Workload(
        uid="c1//Pod/default/a",
        name="a",
        namespace="default",
        node="n1",
        network="net1",
        cluster_id="c1",
        locality=Locality("us", "us-a"),
        status=WorkloadStatus.UNHEALTHY,
        capacity=4,
    )
    candidate = Candidate.from_workload(workload, ipaddress.ip_address("10.0.0.9"), 80)
    assert candidate.key == ("c1//Pod/default/a", ipaddress.ip_address("10.0.0.9"), 80)
    assert (candidate.healthy, candidate.weight, candidate.cluster) == (False, 4, "c1")
    assert SourceLocation.of(workload).locality == Locality("us", "us-a")
    no_capacity = Candidate.from_workload(
        Workload(uid="u", name="b", namespace="default"), ipaddress.ip_address("10.0.0.8"), 80
    )
    assert no_capacity.weight == 1


@pytest.mark.parametrize(("port", "weight"), [(0, 1), (70000, 1), (80, -1)])
def test_bad_candidate_is_refused(port: int, weight: int) -> None:
    with pytest.raises(ValueError, match="endpoint ep-1"):
        Candidate("ep-1", ipaddress.ip_address("10.0.0.1"), port, weight=weight)
