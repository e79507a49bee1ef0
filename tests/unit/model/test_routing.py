"""VirtualService and DestinationRule read from Istio's JSON shape: fields, defaults, errors."""

from __future__ import annotations

import json
from typing import Any

import pytest

from nodeagent.model.routing import (
    CONNECT_ATTEMPTS_ANNOTATION,
    FAULT_ANNOTATION,
    MIRROR_ANNOTATION,
    Destination,
    HttpPool,
    LoadBalancer,
    OutlierDetection,
    RoutingSpecError,
    TcpPool,
    parse_destination_rule,
    parse_duration,
    parse_virtual_service,
    resolve_host,
    to_wire,
)

pytestmark = pytest.mark.unit

CANARY: dict[str, Any] = {
    "hosts": ["backend"],
    "tcp": [
        {
            "match": [{"port": 8080, "sourceLabels": {"app": "frontend"}}],
            "route": [
                {"destination": {"host": "backend", "subset": "v1"}, "weight": 90},
                {
                    "destination": {"host": "backend", "subset": "v2", "port": {"number": 8080}},
                    "weight": 10,
                },
            ],
        }
    ],
}


def test_canary_split_reads_weights_subsets_and_match() -> None:
    vs = parse_virtual_service("demo", "canary", CANARY)
    assert vs.key == "demo/canary"
    (route,) = vs.tcp
    assert [(r.destination.subset, r.weight) for r in route.route] == [("v1", 90), ("v2", 10)]
    assert route.route[1].destination == Destination("backend", "v2", 8080)
    assert route.match[0].port == 8080
    assert dict(route.match[0].source_labels) == {"app": "frontend"}
    assert route.max_connect_attempts == 3
    assert vs.applies_to_mesh and not vs.needs_waypoint


def test_single_destination_takes_all_traffic() -> None:
    vs = parse_virtual_service(
        "demo", "one", {"hosts": ["b"], "tcp": [{"route": [{"destination": {"host": "b"}}]}]}
    )
    assert vs.tcp[0].route[0].weight == 100


@pytest.mark.parametrize(
    ("spec", "path", "problem"),
    [
        ({"tcp": []}, "spec.hosts", "at least one host"),
        (
            {
                "hosts": ["b"],
                "tcp": [
                    {
                        "route": [
                            {"destination": {"host": "b"}, "weight": 60},
                            {"destination": {"host": "b"}, "weight": 30},
                        ]
                    }
                ],
            },
            "spec.tcp[0].route",
            "weights must sum to 100, got 60 + 30 = 90",
        ),
        (
            {"hosts": ["b"], "tcp": [{"route": [{"destination": {"host": "b"}, "weight": 101}]}]},
            "spec.tcp[0].route[0].weight",
            "out of range",
        ),
        (
            {"hosts": ["b"], "tcp": [{"route": [{"destination": {"subset": "v1"}}]}]},
            "spec.tcp[0].route[0].destination.host",
            "required",
        ),
        ({"hosts": ["b"], "tcp": [{"route": []}]}, "spec.tcp[0].route", "at least one"),
        (
            {
                "hosts": ["b"],
                "tcp": [
                    {
                        "route": [{"destination": {"host": "b"}}],
                        "fault": {"delay": {"fixedDelay": "-1s"}},
                    }
                ],
            },
            "spec.tcp[0].fault.delay.fixedDelay",
            "must not be negative",
        ),
        (
            {
                "hosts": ["b"],
                "tcp": [
                    {
                        "route": [{"destination": {"host": "b"}}],
                        "fault": {"delay": {"fixedDelay": "soon"}},
                    }
                ],
            },
            "spec.tcp[0].fault.delay.fixedDelay",
            "unparsable duration",
        ),
        (
            {
                "hosts": ["b"],
                "tcp": [
                    {
                        "route": [{"destination": {"host": "b"}}],
                        "fault": {"abort": {"percentage": {"value": 150}}},
                    }
                ],
            },
            "spec.tcp[0].fault.abort.percentage.value",
            "out of range 0..100",
        ),
        (
            {
                "hosts": ["b"],
                "tcp": [{"route": [{"destination": {"host": "b"}}], "maxConnectAttempts": 0}],
            },
            "spec.tcp[0].maxConnectAttempts",
            "out of range 1..10",
        ),
        (
            {
                "hosts": ["b"],
                "tcp": [
                    {"route": [{"destination": {"host": "b"}}], "mirrorPercentage": {"value": 5}}
                ],
            },
            "spec.tcp[0].mirrorPercentage",
            "without mirror",
        ),
        ({"hosts": ["b"], "tcpp": []}, "spec.tcpp", "unknown field"),
    ],
)
def test_bad_virtual_service_names_the_field(spec: dict[str, Any], path: str, problem: str) -> None:
    with pytest.raises(RoutingSpecError) as err:
        parse_virtual_service("demo", "bad", spec)
    assert err.value.path == path
    assert problem in err.value.problem


def test_http_and_tls_routes_are_kept_as_needing_a_waypoint() -> None:
    vs = parse_virtual_service(
        "demo",
        "web",
        {"hosts": ["b"], "http": [{"route": [{"destination": {"host": "b"}}]}], "tls": [{}]},
    )
    assert vs.needs_waypoint == ("spec.http", "spec.tls")
    assert vs.tcp == ()


def test_gateway_only_virtual_service_does_not_apply_to_the_mesh() -> None:
    assert not parse_virtual_service(
        "d", "g", {"hosts": ["b"], "gateways": ["ingress"]}
    ).applies_to_mesh
    assert parse_virtual_service(
        "d", "g", {"hosts": ["b"], "gateways": ["ingress", "mesh"]}
    ).applies_to_mesh


def test_extensions_come_from_annotations_and_travel_back_as_annotations() -> None:
    spec = {
        "hosts": ["b"],
        "tcp": [
            {"route": [{"destination": {"host": "b"}}]},
            {"route": [{"destination": {"host": "c"}}]},
        ],
    }
    annotations = {
        FAULT_ANNOTATION: json.dumps({"1": {"abort": {"percentage": {"value": 50}}}}),
        MIRROR_ANNOTATION: json.dumps(
            {"0": {"mirror": {"host": "shadow"}, "mirrorPercentage": {"value": 25}}}
        ),
        CONNECT_ATTEMPTS_ANNOTATION: json.dumps({"0": 5}),
        "other": "kept",
    }
    vs = parse_virtual_service("demo", "ext", spec, annotations)
    first, second = vs.tcp
    assert first.mirror is not None and first.mirror.destination.host == "shadow"
    assert first.mirror.percent.value == 25
    assert first.max_connect_attempts == 5
    assert second.fault is not None and second.fault.abort_percent is not None
    assert second.fault.abort_percent.value == 50 and first.fault is None
    wire_spec, wire_annotations = to_wire(vs)
    assert wire_spec == spec and wire_annotations["other"] == "kept"
    again = parse_virtual_service("demo", "ext", wire_spec, wire_annotations)
    assert again.tcp == vs.tcp


def test_in_spec_extensions_move_to_annotations_on_the_wire() -> None:
    spec = {
        "hosts": ["b"],
        "tcp": [
            {
                "route": [{"destination": {"host": "b"}}],
                "fault": {"delay": {"fixedDelay": "1s", "percentage": {"value": 100}}},
            }
        ],
    }
    vs = parse_virtual_service("demo", "f", spec)
    wire_spec, wire_annotations = to_wire(vs)
    assert "fault" not in wire_spec["tcp"][0]
    assert json.loads(wire_annotations[FAULT_ANNOTATION]) == {"0": spec["tcp"][0]["fault"]}
    assert parse_virtual_service("demo", "f", wire_spec, wire_annotations).tcp == vs.tcp


def test_extension_in_both_places_is_refused() -> None:
    spec = {
        "hosts": ["b"],
        "tcp": [{"route": [{"destination": {"host": "b"}}], "maxConnectAttempts": 2}],
    }
    with pytest.raises(RoutingSpecError, match="set both here and in annotation"):
        parse_virtual_service("d", "x", spec, {CONNECT_ATTEMPTS_ANNOTATION: '{"0": 4}'})


def test_annotation_naming_a_missing_route_is_refused() -> None:
    with pytest.raises(RoutingSpecError, match="names tcp route 3"):
        parse_virtual_service(
            "d", "x", {"hosts": ["b"]}, {FAULT_ANNOTATION: '{"3": {"abort": {}}}'}
        )


def test_destination_rule_policies_and_precedence() -> None:
    dr = parse_destination_rule(
        "demo",
        "backend",
        {
            "host": "backend",
            "trafficPolicy": {
                "loadBalancer": {"simple": "LEAST_REQUEST"},
                "connectionPool": {"tcp": {"maxConnections": 10, "connectTimeout": "250ms"}},
                "outlierDetection": {
                    "consecutive5xxErrors": 2,
                    "baseEjectionTime": "5s",
                    "maxEjectionPercent": 50,
                },
                "portLevelSettings": [
                    {"port": {"number": 9000}, "loadBalancer": {"simple": "RANDOM"}}
                ],
            },
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {
                    "name": "v2",
                    "labels": {"version": "v2"},
                    "trafficPolicy": {"connectionPool": {"tcp": {"idleTimeout": "1m"}}},
                },
            ],
        },
    )
    assert dr.policy_for("v1", 8080).load_balancer is LoadBalancer.LEAST_REQUEST
    assert dr.policy_for("v1", 9000).load_balancer is LoadBalancer.RANDOM
    assert dr.policy_for("v1", 8080).tcp == TcpPool(10, 0.25, None)
    # A subset's connectionPool replaces the rule's whole (Istio merges at the top level).
    assert dr.policy_for("v2", 8080).tcp == TcpPool(None, None, 60.0)
    outlier = dr.policy_for("v2", 8080).outlier
    assert outlier == OutlierDetection(2, 0, 10.0, 5.0, 50, 0)
    assert outlier.threshold == 2
    assert dict(dr.subsets[1].labels) == {"version": "v2"}


@pytest.mark.parametrize(
    ("policy", "path", "problem"),
    [
        (
            {"loadBalancer": {"simple": "FASTEST"}},
            "spec.trafficPolicy.loadBalancer.simple",
            "unknown load balancer 'FASTEST'",
        ),
        (
            {"connectionPool": {"tcp": {"connectTimeout": "-5s"}}},
            "spec.trafficPolicy.connectionPool.tcp.connectTimeout",
            "negative",
        ),
        (
            {"outlierDetection": {"interval": "10"}},
            "spec.trafficPolicy.outlierDetection.interval",
            "unparsable",
        ),
        (
            {"outlierDetection": {"maxEjectionPercent": 120}},
            "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
            "out of range",
        ),
        (
            {"connectionPool": {"tcp": {"maxConnections": 0}}},
            "spec.trafficPolicy.connectionPool.tcp.maxConnections",
            "out of range",
        ),
    ],
)
def test_bad_destination_rule_names_the_field(
    policy: dict[str, Any], path: str, problem: str
) -> None:
    with pytest.raises(RoutingSpecError) as err:
        parse_destination_rule("demo", "bad", {"host": "backend", "trafficPolicy": policy})
    assert err.value.path == path
    assert problem in err.value.problem


@pytest.mark.parametrize("labels", [7, "v2", ["version"], True])
def test_subset_labels_that_are_not_a_mapping_are_refused_by_name(labels: Any) -> None:
    spec = {"host": "backend", "subsets": [{"name": "v2", "labels": labels}]}
    with pytest.raises(RoutingSpecError) as err:
        parse_destination_rule("demo", "bad", spec)
    assert err.value.path == "spec.subsets[0].labels"
    assert "expected a mapping" in err.value.problem


def test_duplicate_subset_is_refused() -> None:
    with pytest.raises(RoutingSpecError, match="duplicate subset 'v1'"):
        parse_destination_rule("d", "x", {"host": "b", "subsets": [{"name": "v1"}, {"name": "v1"}]})


def test_http_only_policy_fields_need_a_waypoint() -> None:
    dr = parse_destination_rule(
        "d",
        "x",
        {
            "host": "b",
            "trafficPolicy": {
                "connectionPool": {"http": {"http2MaxRequests": 5}},
                "tls": {"mode": "SIMPLE"},
            },
        },
    )
    assert dr.needs_waypoint == ("spec.trafficPolicy.connectionPool.http", "spec.trafficPolicy.tls")


def test_http_pool_and_split_outlier_are_read_for_the_waypoint() -> None:
    dr = parse_destination_rule(
        "d",
        "x",
        {
            "host": "b",
            "trafficPolicy": {
                "connectionPool": {
                    "http": {
                        "http1MaxPendingRequests": 1,
                        "http2MaxRequests": 0,
                        "maxRequestsPerConnection": 1,
                        "maxRetries": 4,
                        "idleTimeout": "30s",
                    }
                },
                "outlierDetection": {
                    "consecutive5xxErrors": 3,
                    "splitExternalLocalOriginErrors": True,
                    "consecutiveLocalOriginFailures": 2,
                },
            },
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {
                    "name": "v2",
                    "labels": {"version": "v2"},
                    "trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": 3}}},
                },
            ],
        },
    )
    policy = dr.policy_for("v1", 8080)
    assert policy.http == HttpPool(1, None, 1, 4, 30.0)  # 0 is Envoy's default: unlimited
    assert policy.outlier is not None
    assert (policy.outlier.consecutive_5xx_errors, policy.outlier.threshold) == (3, 2)
    # A subset's connectionPool replaces the rule's whole, its http part too.
    assert dr.policy_for("v2", 8080).http is None


@pytest.mark.parametrize(
    ("pool", "field"),
    [
        ({"http1MaxPendingRequests": -1}, "http1MaxPendingRequests"),
        ({"maxRetries": "many"}, "maxRetries"),
        ({"idleTimeout": "soon"}, "idleTimeout"),
        ({"h2UpgradePolicy": "SOMETIMES"}, "h2UpgradePolicy"),
        ({"maxPending": 1}, "maxPending"),
    ],
)
def test_bad_http_pool_names_the_field(pool: dict[str, Any], field: str) -> None:
    with pytest.raises(RoutingSpecError) as err:
        parse_destination_rule(
            "d", "x", {"host": "b", "trafficPolicy": {"connectionPool": {"http": pool}}}
        )
    assert err.value.path == f"spec.trafficPolicy.connectionPool.http.{field}"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("1.5s", 1.5),
        ("100ms", 0.1),
        ("1m30s", 90.0),
        ("2h", 7200.0),
        ("0.030s", 0.03),
        ("250us", 0.00025),
    ],
)
def test_durations_as_istio_writes_them(text: str, seconds: float) -> None:
    assert parse_duration(text, "x") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "1", "s", "1 s", "1sm", "-1s", "1d"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(RoutingSpecError):
        parse_duration(text, "x")


@pytest.mark.parametrize(
    ("host", "namespace", "full"),
    [
        ("backend", "demo", "backend.demo.svc.cluster.local"),
        ("backend.other", "demo", "backend.other"),  # a dot: taken as a full name (Istio)
        ("10.96.0.10", "demo", "10.96.0.10"),
        ("backend.demo.svc.cluster.local", "x", "backend.demo.svc.cluster.local"),
        ("*.example.com", "demo", "*.example.com"),
    ],
)
def test_hosts_resolve_as_istio_resolves_them(host: str, namespace: str, full: str) -> None:
    assert resolve_host(host, namespace) == full


@pytest.mark.parametrize(
    "block",
    [{"1": {"mibror": {"host": "b"}}}, {"0": {"mirror": {"host": "b"}, "extra": 1}}, {"0": 5}],
)
def test_a_bad_mirror_annotation_is_refused_by_name(block: dict[str, Any]) -> None:
    # {"1": {"mibror": ...}} used to raise StopIteration (found by fuzzing the xDS converter).
    with pytest.raises(RoutingSpecError) as err:
        parse_virtual_service(
            "d",
            "x",
            {"hosts": ["b"], "tcp": [{"route": [{"destination": {"host": "b"}}]}]},
            {MIRROR_ANNOTATION: json.dumps(block)},
        )
    assert err.value.path.startswith(f"metadata.annotations[{MIRROR_ANNOTATION}]")


def test_destination_subnets_must_be_addresses_or_cidrs() -> None:
    spec = {
        "hosts": ["b"],
        "tcp": [
            {
                "match": [{"destinationSubnets": ["10.0.0.0/8", "nope"]}],
                "route": [{"destination": {"host": "b"}}],
            }
        ],
    }
    with pytest.raises(RoutingSpecError) as err:
        parse_virtual_service("d", "x", spec)
    assert err.value.path == "spec.tcp[0].match[0].destinationSubnets[1]"
