"""Selection invariants over generated endpoint sets (Hypothesis)."""

from __future__ import annotations

import ipaddress
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.model.workload import (
    HealthPolicy,
    LoadBalancing,
    LoadBalancingMode,
    LoadBalancingScope,
    Locality,
)
from nodeagent.traffic import Candidate, EndpointSelector, SelectionOutcome, SourceLocation, rank

SOURCE = SourceLocation(Locality("r1", "z1", "s1"), node="n1", network="net1", cluster="c1")
two = st.sampled_from(["1", "2"])

candidates = st.lists(
    st.builds(
        lambda i, r, z, n, healthy, w: Candidate(
            f"ep-{i}",
            ipaddress.ip_address(f"10.0.0.{i}"),
            80,
            healthy=healthy,
            locality=Locality("r" + r, "z" + z, "s1"),
            node="n" + n,
            network="net1",
            cluster="c1",
            weight=w,
        ),
        st.integers(1, 250),
        two,
        two,
        two,
        st.booleans(),
        st.integers(0, 3),
    ),
    max_size=6,
    unique_by=lambda c: c.workload_uid,
)
load_balancing = st.builds(
    LoadBalancing,
    routing_preference=st.lists(
        st.sampled_from(
            [LoadBalancingScope.REGION, LoadBalancingScope.ZONE, LoadBalancingScope.NODE]
        ),
        max_size=3,
        unique=True,
    ).map(tuple),
    mode=st.sampled_from(
        [LoadBalancingMode.UNSPECIFIED_MODE, LoadBalancingMode.STRICT, LoadBalancingMode.FAILOVER]
    ),
    health_policy=st.sampled_from(HealthPolicy),
)


@settings(max_examples=200, deadline=None)
@given(candidates, load_balancing, st.integers(0, 2**32))
def test_selection_respects_health_and_strict_scopes(pool, lb, seed) -> None:
    selection = EndpointSelector(random.Random(seed)).select(pool, SOURCE, lb)
    usable = [c for c in pool if c.healthy or lb.health_policy is HealthPolicy.ALLOW_ALL]
    if lb.mode is LoadBalancingMode.STRICT:
        usable = [
            c
            for c in usable
            if rank(lb.routing_preference, SOURCE, c) == len(lb.routing_preference)
        ]
    if not usable:
        assert selection.outcome is SelectionOutcome.NO_HEALTHY_ENDPOINT
        return
    assert selection.endpoint in usable
    if lb.mode is LoadBalancingMode.FAILOVER:
        best = max(rank(lb.routing_preference, SOURCE, c) for c in usable)
        assert rank(lb.routing_preference, SOURCE, selection.endpoint) == best
    if any(c.weight for c in usable):
        best_ranked = EndpointSelector().eligible(pool, SOURCE, lb)[0]
        if any(c.weight for c in best_ranked):
            assert selection.endpoint.weight > 0
