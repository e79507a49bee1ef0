"""VirtualService and DestinationRule resources through convert, updater and store.

Resources arrive as istiod sends them (istio.mcp.v1alpha1.Resource envelopes); each
is converted on its own, a bad one is NACKed by name while the rest apply in one
batch, and the store tells subscribers that routing changed.
"""

from __future__ import annotations

from typing import Any

import pytest

from nodeagent.model.constants import TYPE_URL_DESTINATION_RULE as DR
from nodeagent.model.constants import TYPE_URL_DESTINATION_RULE_V1, TYPE_URL_VIRTUAL_SERVICE_V1
from nodeagent.model.constants import TYPE_URL_VIRTUAL_SERVICE as VS
from nodeagent.model.routing import DestinationRule, VirtualService, to_wire
from nodeagent.state import mcp
from nodeagent.state.convert import (
    ConversionError,
    destination_rule_from_bytes,
    virtual_service_from_bytes,
)
from nodeagent.state.store import StateChange, StateStore
from nodeagent.state.updater import StateUpdater
from tests.builders import destination_rule, virtual_service

SPLIT_70 = {
    "hosts": ["backend"],
    "tcp": [
        {
            "route": [
                {"destination": {"host": "backend", "subset": "v1"}, "weight": 50},
                {"destination": {"host": "backend", "subset": "v2"}, "weight": 20},
            ]
        }
    ],
}


def wire(value: VirtualService | DestinationRule) -> tuple[str, bytes]:
    """(resource name, Any.value) as the control plane serves `value`."""
    spec, annotations = to_wire(value)
    type_url = VS if isinstance(value, VirtualService) else DR
    envelope = mcp.ConfigEnvelope(value.namespace, value.name, spec, annotations)
    return value.key, mcp.encode(type_url, envelope)


def raw(type_url: str, key: str, spec: dict[str, Any]) -> tuple[str, bytes]:
    """A resource whose spec fits the protobuf message but not the model (unvalidated)."""
    namespace, name = key.split("/")
    return key, mcp.encode(type_url, mcp.ConfigEnvelope(namespace, name, spec))


@pytest.fixture
def store() -> StateStore:
    return StateStore()


@pytest.fixture
def changes(store: StateStore) -> list[StateChange]:
    seen: list[StateChange] = []
    store.subscribe(seen.append)
    return seen


def test_virtual_service_resource_converts_to_the_model() -> None:
    sent = virtual_service("backend", "shop")
    name, data = wire(sent)
    assert virtual_service_from_bytes(name, data) == sent


def test_tcp_extensions_travel_as_annotations_and_come_back_on_the_route() -> None:
    spec = {
        "hosts": ["backend"],
        "tcp": [
            {
                "fault": {"abort": {"percentage": {"value": 50}}},
                "maxConnectAttempts": 5,
                "route": [{"destination": {"host": "backend"}}],
            }
        ],
    }
    sent = virtual_service("chaos", "shop", spec=spec)
    got = virtual_service_from_bytes(*wire(sent))
    assert got.tcp[0].fault == sent.tcp[0].fault
    assert got.tcp[0].max_connect_attempts == 5


def test_destination_rule_resource_converts_to_the_model() -> None:
    sent = destination_rule(
        "backend",
        "shop",
        spec={
            "host": "backend",
            "trafficPolicy": {
                "loadBalancer": {"simple": "LEAST_REQUEST"},
                "connectionPool": {"tcp": {"maxConnections": 10, "connectTimeout": "1.5s"}},
                "outlierDetection": {"consecutive5xxErrors": 3, "baseEjectionTime": "30s"},
            },
            "subsets": [{"name": "v1", "labels": {"version": "v1"}}],
        },
    )
    got = destination_rule_from_bytes(*wire(sent))
    assert got.traffic_policy == sent.traffic_policy
    assert got.subsets == sent.subsets
    assert got.policy_for("v1", 80).tcp is not None
    assert got.policy_for("v1", 80).tcp.connect_timeout == 1.5


def test_unusable_spec_is_a_conversion_error_naming_resource_and_field() -> None:
    with pytest.raises(ConversionError) as e:
        virtual_service_from_bytes(*raw(VS, "shop/split", SPLIT_70))
    assert str(e.value).startswith("virtualservice shop/split: spec.tcp[0].route: ")
    assert "sum to 100" in str(e.value)


def test_bad_virtual_service_is_nacked_alone_while_the_others_apply(
    store: StateStore, changes: list[StateChange]
) -> None:
    good = virtual_service("backend", "shop")
    other = virtual_service("db", "shop")
    rejected = StateUpdater(store).apply_delta(
        VS, [wire(good), raw(VS, "shop/split", SPLIT_70), wire(other)], []
    )
    assert list(rejected) == ["shop/split"]
    assert "spec.tcp[0].route" in rejected["shop/split"]
    assert store.virtual_services() == (good, other)
    assert store.virtual_service("shop/split") is None
    (change,) = changes
    assert change.virtual_services.added == {"shop/backend", "shop/db"}
    assert change.routing and not change.workloads


def test_undecodable_destination_rule_is_nacked_by_name(store: StateStore) -> None:
    good = destination_rule("backend", "shop")
    rejected = StateUpdater(store).apply_delta(DR, [("shop/junk", b"\xff\xff"), wire(good)], [])
    assert rejected["shop/junk"].startswith("destinationrule shop/junk: does not decode")
    assert store.destination_rules() == (good,)


def test_update_resend_and_removal_feed_the_subscribers(
    store: StateStore, changes: list[StateChange]
) -> None:
    updater = StateUpdater(store)
    rule = destination_rule("backend", "shop")
    assert updater.apply_delta(DR, [wire(rule)], []) == {}
    assert updater.apply_delta(DR, [wire(rule)], []) == {}  # unchanged resend: no event
    assert len(changes) == 1
    narrowed = destination_rule(
        "backend", "shop", spec={"host": "backend", "subsets": [{"name": "v1"}]}
    )
    updater.apply_delta(DR, [wire(narrowed)], [])
    assert changes[-1].destination_rules.updated == {"shop/backend"}
    assert store.destination_rule("shop/backend") == narrowed
    updater.apply_delta(DR, [], ["shop/backend", "shop/never-sent"])
    assert changes[-1].destination_rules.removed == {"shop/backend"}
    assert changes[-1].routing
    assert store.destination_rules() == ()
    assert store.counts()["destination_rules"] == 0


def test_removal_and_re_add_in_one_batch_is_an_update(store: StateStore) -> None:
    updater = StateUpdater(store)
    first = virtual_service("backend", "shop")
    updater.apply_delta(VS, [wire(first)], [])
    seen: list[StateChange] = []
    store.subscribe(seen.append)
    changed = virtual_service("backend", "shop", spec={"hosts": ["backend", "backend-alias"]})
    updater.apply_delta(VS, [wire(changed)], ["shop/backend"])
    assert seen[-1].virtual_services.updated == {"shop/backend"}
    assert store.virtual_service("shop/backend") == changed


ROUND_TRIP_VS = [
    {"hosts": ["backend"], "tcp": [{"route": [{"destination": {"host": "backend"}}]}]},
    {
        "hosts": ["backend", "backend.shop.svc.cluster.local"],
        "gateways": ["mesh"],
        "tcp": [
            {
                "match": [
                    {"port": 9000, "sourceLabels": {"app": "web"}, "sourceNamespace": "shop"}
                ],
                "route": [
                    {"destination": {"host": "backend", "subset": "v1", "port": {"number": 9000}}},
                ],
                "fault": {"delay": {"fixedDelay": "1500ms", "percentage": {"value": 12.5}}},
                "mirror": {"host": "backend", "subset": "v2"},
                "mirrorPercentage": {"value": 5},
                "maxConnectAttempts": 2,
            },
            {
                "route": [
                    {"destination": {"host": "backend", "subset": "v1"}, "weight": 100},
                    {"destination": {"host": "backend", "subset": "v2"}, "weight": 0},
                ]
            },
        ],
        "http": [
            {
                "match": [{"uri": {"prefix": "/api"}}],
                "route": [{"destination": {"host": "backend"}}],
                "retries": {"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx"},
                "timeout": "10s",
            }
        ],
        "tls": [
            {
                "match": [{"sniHosts": ["backend.example.com"], "port": 443}],
                "route": [{"destination": {"host": "backend"}}],
            }
        ],
    },
]
ROUND_TRIP_DR = [
    {"host": "backend"},
    {
        "host": "backend",
        "trafficPolicy": {
            "loadBalancer": {"consistentHash": {"useSourceIp": True}},
            "connectionPool": {
                "tcp": {"maxConnections": 10, "connectTimeout": "250ms", "idleTimeout": "1h"},
                "http": {"http1MaxPendingRequests": 5},
            },
            "outlierDetection": {
                "consecutive5xxErrors": 0,
                "consecutiveGatewayErrors": 2,
                "interval": "1m30s",
                "baseEjectionTime": "30s",
                "maxEjectionPercent": 50,
            },
            "portLevelSettings": [
                {"port": {"number": 9000}, "loadBalancer": {"simple": "RANDOM"}},
            ],
            "tls": {"mode": "ISTIO_MUTUAL"},
        },
        "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {
                "name": "v2",
                "labels": {"version": "v2"},
                "trafficPolicy": {"loadBalancer": {"simple": "LEAST_REQUEST"}},
            },
        ],
    },
]


@pytest.mark.parametrize("spec", ROUND_TRIP_VS)
def test_virtual_service_reads_the_same_after_the_wire(spec: dict[str, Any]) -> None:
    sent = virtual_service("backend", "shop", spec=spec)
    got = virtual_service_from_bytes(*wire(sent))
    for name in ("namespace", "name", "hosts", "tcp", "gateways", "needs_waypoint"):
        assert getattr(got, name) == getattr(sent, name), name


@pytest.mark.parametrize("spec", ROUND_TRIP_DR)
def test_destination_rule_reads_the_same_after_the_wire(spec: dict[str, Any]) -> None:
    sent = destination_rule("backend", "shop", spec=spec)
    got = destination_rule_from_bytes(*wire(sent))
    for name in ("namespace", "name", "host", "traffic_policy", "subsets", "needs_waypoint"):
        assert getattr(got, name) == getattr(sent, name), name


def test_v1_type_url_carries_the_same_kind(store: StateStore) -> None:
    # A recent istiod answers the v1 type URL (its store's version); the body is the same.
    updater = StateUpdater(store)
    rule = destination_rule("backend", "shop")
    canary = virtual_service("backend", "shop")
    assert updater.apply_delta(TYPE_URL_DESTINATION_RULE_V1, [wire(rule)], []) == {}
    assert updater.apply_delta(TYPE_URL_VIRTUAL_SERVICE_V1, [wire(canary)], []) == {}
    assert store.destination_rules() == (rule,) and store.virtual_services() == (canary,)
    updater.apply_delta(TYPE_URL_VIRTUAL_SERVICE_V1, [], [canary.key])
    assert store.virtual_services() == ()
