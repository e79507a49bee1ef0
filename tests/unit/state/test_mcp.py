"""istiod's config envelope: istio.mcp.v1alpha1.Resource around a networking message.

Encoded here, decoded here, and decoded from bytes built the way istiod's api
generator builds them (metadata.name `namespace/name`, create_time, resourceVersion).
"""

from __future__ import annotations

import pytest

from nodeagent.model.constants import (
    TYPE_URL_ADDRESS,
    TYPE_URL_DESTINATION_RULE,
    TYPE_URL_MCP_RESOURCE,
    TYPE_URL_VIRTUAL_SERVICE,
)
from nodeagent.pb.istio.mcp.v1alpha1 import resource_pb2 as mcp_pb
from nodeagent.pb.istio.networking.v1alpha3 import destination_rule_pb2 as dr_pb
from nodeagent.pb.istio.networking.v1alpha3 import virtual_service_pb2 as vs_pb
from nodeagent.state import mcp

VS_SPEC = {
    "hosts": ["backend"],
    "tcp": [
        {
            "match": [{"port": 9000, "sourceLabels": {"app": "frontend"}}],
            "route": [
                {"destination": {"host": "backend", "subset": "v1"}, "weight": 90},
                {"destination": {"host": "backend", "subset": "v2"}, "weight": 10},
            ],
        }
    ],
}
DR_SPEC = {
    "host": "backend",
    "trafficPolicy": {
        "loadBalancer": {"simple": "LEAST_REQUEST"},
        "connectionPool": {"tcp": {"maxConnections": 10, "connectTimeout": "1.500s"}},
        "outlierDetection": {"consecutive5xxErrors": 3, "baseEjectionTime": "30s"},
    },
    "subsets": [{"name": "v1", "labels": {"version": "v1"}}],
}


def istiod_bytes(key: str, spec: vs_pb.VirtualService | dr_pb.DestinationRule) -> bytes:
    """A Resource as istiod's api generator writes it (configToResource)."""
    out = mcp_pb.Resource()
    out.metadata.name = key
    out.metadata.create_time.FromSeconds(1_700_000_000)
    out.metadata.version = "12345"
    out.metadata.labels["team"] = "shop"
    out.metadata.annotations["kubectl.kubernetes.io/last-applied-configuration"] = "{}"
    out.body.Pack(spec)
    return out.SerializeToString()


@pytest.mark.parametrize(
    ("type_url", "spec"),
    [(TYPE_URL_VIRTUAL_SERVICE, VS_SPEC), (TYPE_URL_DESTINATION_RULE, DR_SPEC)],
)
def test_envelope_round_trips_spec_labels_and_annotations(type_url: str, spec: dict) -> None:
    sent = mcp.ConfigEnvelope("shop", "backend", spec, {"a": "1"}, {"l": "2"}, "7")
    got = mcp.decode(type_url, "shop/backend", mcp.encode(type_url, sent))
    assert got == sent
    assert got.key == "shop/backend"


def test_istiods_resource_decodes_with_its_metadata() -> None:
    spec = vs_pb.VirtualService(hosts=["backend"])
    spec.tcp.add().route.add(weight=100).destination.host = "backend"
    got = mcp.decode(TYPE_URL_VIRTUAL_SERVICE, "shop/r", istiod_bytes("shop/r", spec))
    assert (got.namespace, got.name, got.version) == ("shop", "r", "12345")
    assert got.labels == {"team": "shop"}
    assert "kubectl.kubernetes.io/last-applied-configuration" in got.annotations
    assert got.spec == {
        "hosts": ["backend"],
        "tcp": [{"route": [{"destination": {"host": "backend"}, "weight": 100}]}],
    }


def test_durations_and_wrappers_come_out_in_istios_json_shape() -> None:
    envelope = mcp.ConfigEnvelope("shop", "backend", DR_SPEC)
    got = mcp.decode(
        TYPE_URL_DESTINATION_RULE,
        "shop/backend",
        mcp.encode(TYPE_URL_DESTINATION_RULE, envelope),
    )
    policy = got.spec["trafficPolicy"]
    assert policy["connectionPool"]["tcp"]["connectTimeout"] == "1.500s"
    assert policy["outlierDetection"]["consecutive5xxErrors"] == 3  # UInt32Value as a number
    assert policy["loadBalancer"]["simple"] == "LEAST_REQUEST"


def test_resource_any_type_is_the_envelope_for_config_kinds_only() -> None:
    assert mcp.resource_type_url(TYPE_URL_VIRTUAL_SERVICE) == TYPE_URL_MCP_RESOURCE
    assert mcp.resource_type_url(TYPE_URL_DESTINATION_RULE) == TYPE_URL_MCP_RESOURCE
    assert mcp.resource_type_url(TYPE_URL_ADDRESS) == TYPE_URL_ADDRESS
    assert mcp.body_type_url(TYPE_URL_VIRTUAL_SERVICE) == (
        "type.googleapis.com/istio.networking.v1alpha3.VirtualService"
    )


def test_spec_of_the_wrong_shape_is_refused_naming_the_resource() -> None:
    bad = mcp.ConfigEnvelope("shop", "r", {"hosts": "not-a-list", "tcp": [{"route": 3}]})
    with pytest.raises(mcp.EnvelopeError, match=r"^shop/r: spec: "):
        mcp.encode(TYPE_URL_VIRTUAL_SERVICE, bad)


def test_field_newer_than_our_copy_is_left_out_not_the_whole_resource() -> None:
    spec = {**DR_SPEC, "trafficPolicy": {**DR_SPEC["trafficPolicy"], "retryBudget": {}}}
    data = mcp.encode(TYPE_URL_DESTINATION_RULE, mcp.ConfigEnvelope("shop", "b", spec))
    got = mcp.decode(TYPE_URL_DESTINATION_RULE, "shop/b", data)
    assert "retryBudget" not in got.spec["trafficPolicy"]
    assert got.spec["host"] == "backend"


@pytest.mark.parametrize(
    ("name", "data", "problem"),
    [
        ("shop/r", b"\xff\xff\xff", "does not decode as istio.mcp.v1alpha1.Resource"),
        ("shop/r", istiod_bytes("r", vs_pb.VirtualService()), "is not namespace/name"),
        ("shop/r", istiod_bytes("shop/a/b", vs_pb.VirtualService()), "is not namespace/name"),
        ("shop/x", istiod_bytes("shop/r", vs_pb.VirtualService()), "differs from metadata.name"),
        (
            "shop/r",
            istiod_bytes("shop/r", dr_pb.DestinationRule(host="h")),
            "body is 'type.googleapis.com/istio.networking.v1alpha3.DestinationRule'",
        ),
        ("shop/r", mcp_pb.Resource(metadata={"name": "shop/r"}).SerializeToString(), "empty"),
    ],
)
def test_malformed_envelope_says_what_is_wrong(name: str, data: bytes, problem: str) -> None:
    with pytest.raises(mcp.EnvelopeError, match=problem):
        mcp.decode(TYPE_URL_VIRTUAL_SERVICE, name, data)


def test_body_that_does_not_decode_is_refused() -> None:
    out = mcp_pb.Resource()
    out.metadata.name = "shop/r"
    out.body.type_url = mcp.body_type_url(TYPE_URL_VIRTUAL_SERVICE)
    out.body.value = b"\x0a\xff"  # hosts: a length running past the end
    with pytest.raises(mcp.EnvelopeError, match="body does not decode"):
        mcp.decode(TYPE_URL_VIRTUAL_SERVICE, "shop/r", out.SerializeToString())


def test_durations_as_istio_users_write_them_go_on_the_wire() -> None:
    # YAML says 250ms or 1m30s (Go's form); protobuf's JSON takes only seconds.
    spec = {
        "host": "backend",
        "trafficPolicy": {"outlierDetection": {"interval": "1m30s", "baseEjectionTime": "2h"}},
        "subsets": [
            {
                "name": "v1",
                "trafficPolicy": {"connectionPool": {"tcp": {"connectTimeout": "250ms"}}},
            }
        ],
    }
    data = mcp.encode(TYPE_URL_DESTINATION_RULE, mcp.ConfigEnvelope("shop", "b", spec))
    got = mcp.decode(TYPE_URL_DESTINATION_RULE, "shop/b", data).spec
    assert got["trafficPolicy"]["outlierDetection"] == {
        "interval": "90s",
        "baseEjectionTime": "7200s",
    }
    assert got["subsets"][0]["trafficPolicy"]["connectionPool"]["tcp"] == {
        "connectTimeout": "0.250s"
    }


def test_unparsable_duration_is_refused_naming_the_field() -> None:
    spec = {"host": "b", "trafficPolicy": {"connectionPool": {"tcp": {"connectTimeout": "soon"}}}}
    with pytest.raises(mcp.EnvelopeError, match="connectTimeout"):
        mcp.encode(TYPE_URL_DESTINATION_RULE, mcp.ConfigEnvelope("shop", "b", spec))


def test_body_without_a_json_form_is_refused() -> None:
    # Found by fuzzing: a Duration's nanos beyond a second decode, but have no JSON form.
    spec = vs_pb.VirtualService(hosts=["h"])
    spec.http.add().retries.per_try_timeout.nanos = 1_036_870_912
    with pytest.raises(mcp.EnvelopeError, match=r"body has no JSON form: .*per_try_timeout"):
        mcp.decode(TYPE_URL_VIRTUAL_SERVICE, "shop/r", istiod_bytes("shop/r", spec))
