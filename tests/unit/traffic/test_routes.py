"""The route table: compile-time resolution and per-connection decisions, with exact draws."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.model.routing import (
    FAULT_ANNOTATION,
    LoadBalancer,
    parse_destination_rule,
    parse_virtual_service,
)
from nodeagent.traffic.routes import Caller, RouteTable, workload_labels

from ...builders import service, workload

pytestmark = pytest.mark.unit

BACKEND = service("backend", "10.96.0.10", namespace="demo")
ECHO = service("echo", "10.96.0.11", namespace="demo")
KEY = BACKEND.key


class Draws(random.Random):
    """A random source that returns the given values from random(), in order."""

    def __init__(self, *values: float) -> None:
        super().__init__(0)
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


def rule(**policy: Any) -> Any:
    return parse_destination_rule(
        "demo",
        "backend",
        {
            "host": "backend",
            "trafficPolicy": policy or None,
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {"name": "v2", "labels": {"version": "v2"}},
            ],
        },
    )


def split(v1: int, v2: int, **route: Any) -> Any:
    spec = {
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
    }
    return parse_virtual_service("demo", "canary", spec)


def table(*resources: Any, services: tuple[Any, ...] = (BACKEND, ECHO)) -> RouteTable:
    from nodeagent.model.routing import DestinationRule, VirtualService

    return RouteTable.compile(
        [r for r in resources if isinstance(r, VirtualService)],
        [r for r in resources if isinstance(r, DestinationRule)],
        services,
    )


def test_without_resources_the_whole_service_is_the_target() -> None:
    decision = table().decide(KEY, 8080, Caller(), Draws())
    assert [t.label for t in decision.targets] == [f"{KEY}:8080"]
    assert decision.target.selector is None and decision.route == ""


def test_weighted_pick_then_the_other_subset_as_fallback() -> None:
    t = table(split(90, 10), rule())
    first = t.decide(KEY, 8080, Caller(), Draws(0.5))
    assert [x.subset for x in first.targets] == ["v1", "v2"]
    second = t.decide(KEY, 8080, Caller(), Draws(0.95))
    assert [x.subset for x in second.targets] == ["v2", "v1"]
    assert dict(second.target.selector or {}) == {"version": "v2"}
    assert second.route == "demo/canary tcp[0]" and second.max_attempts == 3


def test_route_match_on_port_and_source_labels_else_default_route() -> None:
    vs = split(0, 100, match=[{"port": 9000, "sourceLabels": {"app": "frontend"}}])
    t = table(vs, rule())
    frontend = Caller(workload_labels(workload("f", canonical_name="frontend")), "demo")
    assert t.decide(KEY, 9000, frontend, Draws(0.1)).target.subset == "v2"
    assert t.decide(KEY, 8080, frontend, Draws(0.1)).target.subset == ""
    assert t.decide(KEY, 9000, Caller(), Draws(0.1)).target.subset == ""


def test_policy_precedence_reaches_the_target() -> None:
    dr = rule(loadBalancer={"simple": "ROUND_ROBIN"}, connectionPool={"tcp": {"maxConnections": 7}})
    decision = table(split(100, 0), dr).decide(KEY, 8080, Caller(), Draws(0.0))
    assert decision.target.policy.load_balancer is LoadBalancer.ROUND_ROBIN
    assert decision.target.policy.tcp is not None
    assert decision.target.policy.tcp.max_connections == 7
    # A DestinationRule alone applies to the default route.
    alone = table(dr).decide(KEY, 8080, Caller(), Draws())
    assert alone.target.policy.load_balancer is LoadBalancer.ROUND_ROBIN


def test_faults_are_drawn_per_connection() -> None:
    vs = split(
        100,
        0,
        fault={
            "abort": {"percentage": {"value": 50}},
            "delay": {"fixedDelay": "1s", "percentage": {"value": 20}},
        },
    )
    t = table(vs, rule())
    # draws: route pick, abort, delay
    assert t.decide(KEY, 80, Caller(), Draws(0.0, 0.49)).abort
    kept = t.decide(KEY, 80, Caller(), Draws(0.0, 0.5, 0.1))
    assert not kept.abort and kept.delay == 1.0
    none = t.decide(KEY, 80, Caller(), Draws(0.0, 0.9, 0.3))
    assert not none.abort and none.delay == 0.0


def test_mirror_is_drawn_by_its_percentage() -> None:
    vs = split(100, 0, mirror={"host": "echo"}, mirrorPercentage={"value": 30})
    t = table(vs, rule())
    assert t.decide(KEY, 80, Caller(), Draws(0.0, 0.29)).mirror is not None
    assert t.decide(KEY, 80, Caller(), Draws(0.0, 0.31)).mirror is None
    mirrored = t.decide(KEY, 80, Caller(), Draws(0.0, 0.0)).mirror
    assert mirrored is not None and mirrored.service == ECHO.key and mirrored.port == 80


def test_unresolvable_references_are_noted_and_skipped() -> None:
    vs = parse_virtual_service(
        "demo",
        "bad",
        {
            "hosts": ["backend", "nosuch"],
            "tcp": [
                {
                    "route": [
                        {"destination": {"host": "backend", "subset": "v3"}, "weight": 50},
                        {"destination": {"host": "backend", "subset": "v1"}, "weight": 50},
                    ]
                }
            ],
        },
    )
    t = table(vs, rule())
    assert any("host nosuch is not a service" in n for n in t.notes)
    assert any("subset v3" in n and "no DestinationRule" in n for n in t.notes)
    assert [x.subset for x in t.decide(KEY, 80, Caller(), Draws(0.0)).targets] == ["v1"]


def test_a_route_with_nothing_usable_refuses() -> None:
    vs = parse_virtual_service(
        "demo",
        "x",
        {
            "hosts": ["backend"],
            "tcp": [{"route": [{"destination": {"host": "backend", "subset": "v9"}}]}],
        },
    )
    assert table(vs).decide(KEY, 80, Caller(), Draws()).targets == ()


def test_second_virtual_service_for_a_host_is_ignored_with_a_note() -> None:
    a = parse_virtual_service(
        "demo",
        "a",
        {"hosts": ["backend"], "tcp": [{"route": [{"destination": {"host": "backend"}}]}]},
    )
    b = parse_virtual_service("demo", "b", {"hosts": ["backend.demo.svc.cluster.local"]})
    t = table(b, a)
    assert t.by_service[KEY].virtual_service == "demo/a"
    assert any("demo/b" in n and "already routed by demo/a" in n for n in t.notes)


def test_http_fields_are_listed_as_needing_a_waypoint() -> None:
    vs = parse_virtual_service(
        "demo",
        "web",
        {"hosts": ["backend"], "http": [{"route": [{"destination": {"host": "backend"}}]}]},
    )
    assert table(vs).by_service[KEY].needs_waypoint == ("demo/web: spec.http",)


def test_subset_on_a_label_the_workload_api_lacks_is_noted() -> None:
    dr = parse_destination_rule(
        "demo", "r", {"host": "backend", "subsets": [{"name": "gold", "labels": {"tier": "gold"}}]}
    )
    vs = parse_virtual_service(
        "demo",
        "v",
        {
            "hosts": ["backend"],
            "tcp": [{"route": [{"destination": {"host": "backend", "subset": "gold"}}]}],
        },
    )
    assert any("selects on tier" in n for n in table(vs, dr).notes)


def test_extension_annotation_reaches_the_decision() -> None:
    vs = parse_virtual_service(
        "demo",
        "ann",
        {"hosts": ["backend"], "tcp": [{"route": [{"destination": {"host": "backend"}}]}]},
        {FAULT_ANNOTATION: json.dumps({"0": {"abort": {"percentage": {"value": 100}}}})},
    )
    assert table(vs).decide(KEY, 80, Caller(), Draws(0.0, 0.99)).abort


@settings(max_examples=200, deadline=None)
@given(
    weights=st.lists(st.integers(0, 100), min_size=1, max_size=4),
    draws=st.lists(st.floats(0.0, 0.999999), min_size=8, max_size=8),
    port=st.integers(1, 65535),
)
def test_every_connection_gets_a_decision_within_the_weights(
    weights: list[int], draws: list[float], port: int
) -> None:
    if len(weights) == 1:
        weights = [100]
    elif sum(weights) != 100:
        weights[-1] = max(0, 100 - sum(weights[:-1]))
        if sum(weights) != 100:
            return
    subsets = [f"s{i}" for i in range(len(weights))]
    dr = parse_destination_rule(
        "demo",
        "r",
        {"host": "backend", "subsets": [{"name": s, "labels": {"version": s}} for s in subsets]},
    )
    spec = {
        "hosts": ["backend"],
        "tcp": [
            {
                "route": [
                    {"destination": {"host": "backend", "subset": s}, "weight": w}
                    for s, w in zip(subsets, weights, strict=True)
                ]
            }
        ],
    }
    vs = parse_virtual_service("demo", "v", spec)
    decision = table(vs, dr).decide(KEY, port, Caller(), Draws(*draws))
    assert decision.targets, "every connection gets a target"
    assert sorted(t.subset for t in decision.targets) == sorted(subsets)
    assert all(t.port == port for t in decision.targets)
    if len(weights) > 1:
        # The pick never lands on a zero-weight destination while another has weight.
        assert decision.target.weight > 0


def test_a_source_label_the_workload_api_lacks_is_noted() -> None:
    vs = split(100, 0, match=[{"sourceLabels": {"team": "a"}}])
    assert any("sourceLabels selects on team" in n for n in table(vs, rule()).notes)


def test_destination_subnets_match_only_addresses_inside_them() -> None:
    import ipaddress

    vs = split(0, 100, match=[{"destinationSubnets": ["10.96.0.0/24"]}])
    t = table(vs, rule())
    inside = t.decide(KEY, 80, Caller(), Draws(0.0), ipaddress.ip_address("10.96.0.10"))
    outside = t.decide(KEY, 80, Caller(), Draws(0.0), ipaddress.ip_address("10.97.0.10"))
    assert inside.target.subset == "v2" and outside.target.subset == ""


def test_the_port_index_answers_as_a_walk_over_every_route() -> None:
    spec = {
        "hosts": ["backend"],
        "tcp": [
            {
                "match": [{"port": 9000}],
                "route": [{"destination": {"host": "backend", "subset": "v2"}}],
            },
            {
                "match": [{"port": 8080, "sourceLabels": {"app": "x"}}, {"port": 7000}],
                "route": [{"destination": {"host": "backend", "subset": "v1"}}],
            },
            {
                "match": [{"gateways": ["ingress"]}],
                "route": [{"destination": {"host": "backend", "subset": "v2"}}],
            },
            {
                "match": [{"sourceNamespace": "other"}],
                "route": [{"destination": {"host": "backend", "subset": "v2"}}],
            },
            {
                "match": [{"port": 8080}],
                "route": [{"destination": {"host": "backend", "subset": "v1"}}],
            },
        ],
    }
    t = table(parse_virtual_service("demo", "ports", spec), rule())
    traffic = t.by_service[KEY]
    for port in (7000, 8080, 9000, 1234):
        for caller in (Caller(), Caller({"app": "x"}, "other")):
            walked = next((r for r in traffic.routes if r.matches(port, caller, None)), None)
            indexed = t.match(KEY, port, caller)
            assert (indexed.name if indexed else None) == (walked.name if walked else None)


@pytest.mark.parametrize(
    "selector",
    [
        {},
        {"version": "v1"},
        {"app": "backend", "version": "v1"},
        {"version": "v2"},
        {"service.istio.io/canonical-revision": "v1"},
        {"tier": "gold"},
        {"app": ""},
    ],
)
def test_the_fast_label_check_agrees_with_the_label_view(selector: dict[str, str]) -> None:
    from nodeagent.traffic.routes import labels_match, workload_has_labels

    for w in (workload("a", canonical_name="backend", canonical_revision="v1"), workload("b")):
        assert workload_has_labels(w, selector) == labels_match(selector, workload_labels(w))
