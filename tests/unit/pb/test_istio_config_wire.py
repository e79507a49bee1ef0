"""Wire compatibility of our copies of Istio's config protos (networking v1alpha3, mcp v1alpha1).

Each case encodes one field and checks the raw tag bytes against Istio's field
number; the round-trip tests show that fields our copy lacks (Istio adds some
every release) survive a decode/encode through our messages.
"""

from __future__ import annotations

import pytest
from google.protobuf.message import Message

from nodeagent.pb.istio.mcp.v1alpha1 import metadata_pb2 as metadata_pb
from nodeagent.pb.istio.mcp.v1alpha1 import resource_pb2 as mcp_pb
from nodeagent.pb.istio.networking.v1alpha3 import destination_rule_pb2 as dr_pb
from nodeagent.pb.istio.networking.v1alpha3 import virtual_service_pb2 as vs_pb
from tests.unit.pb.test_wire import LEN, VARINT, tag

I64 = 1

CASES: list[tuple[Message, bytes]] = [
    (vs_pb.VirtualService(hosts=["h"]), tag(1, LEN) + b"\x01h"),
    (vs_pb.VirtualService(gateways=["g"]), tag(2, LEN) + b"\x01g"),
    (vs_pb.VirtualService(http=[vs_pb.HTTPRoute()]), tag(3, LEN) + b"\x00"),
    (vs_pb.VirtualService(tcp=[vs_pb.TCPRoute()]), tag(4, LEN) + b"\x00"),
    (vs_pb.VirtualService(tls=[vs_pb.TLSRoute()]), tag(5, LEN) + b"\x00"),
    (vs_pb.VirtualService(export_to=["."]), tag(6, LEN) + b"\x01."),
    (vs_pb.TCPRoute(match=[vs_pb.L4MatchAttributes()]), tag(1, LEN) + b"\x00"),
    (vs_pb.TCPRoute(route=[vs_pb.RouteDestination()]), tag(2, LEN) + b"\x00"),
    (vs_pb.L4MatchAttributes(port=80), tag(2, VARINT) + b"\x50"),
    (vs_pb.L4MatchAttributes(source_namespace="n"), tag(6, LEN) + b"\x01n"),
    (vs_pb.RouteDestination(weight=90), tag(2, VARINT) + b"\x5a"),
    (vs_pb.Destination(host="h"), tag(1, LEN) + b"\x01h"),
    (vs_pb.Destination(subset="s"), tag(2, LEN) + b"\x01s"),
    (vs_pb.Destination(port=vs_pb.PortSelector(number=8)), tag(3, LEN) + b"\x02\x08\x08"),
    (vs_pb.HTTPRoute(name="n"), tag(17, LEN) + b"\x01n"),
    (vs_pb.HTTPRoute(retries=vs_pb.HTTPRetry(attempts=3)), tag(7, LEN) + b"\x02\x08\x03"),
    (vs_pb.HTTPRoute(fault=vs_pb.HTTPFaultInjection()), tag(8, LEN) + b"\x00"),
    (vs_pb.HTTPRoute(mirror_percentage=vs_pb.Percent()), tag(19, LEN) + b"\x00"),
    (vs_pb.HTTPMatchRequest(source_namespace="n"), tag(13, LEN) + b"\x01n"),
    (vs_pb.HTTPFaultInjection.Abort(http_status=503), tag(2, VARINT) + b"\xf7\x03"),
    (
        vs_pb.HTTPFaultInjection.Delay(percentage=vs_pb.Percent(value=0.0)),
        tag(5, LEN) + b"\x00",
    ),
    (vs_pb.Percent(value=1.0), tag(1, I64) + b"\x00\x00\x00\x00\x00\x00\xf0\x3f"),
    (dr_pb.DestinationRule(host="h"), tag(1, LEN) + b"\x01h"),
    (dr_pb.DestinationRule(subsets=[dr_pb.Subset()]), tag(3, LEN) + b"\x00"),
    (dr_pb.TrafficPolicy(outlier_detection=dr_pb.OutlierDetection()), tag(3, LEN) + b"\x00"),
    (
        dr_pb.TrafficPolicy(port_level_settings=[dr_pb.TrafficPolicy.PortTrafficPolicy()]),
        tag(5, LEN) + b"\x00",
    ),
    (
        dr_pb.LoadBalancerSettings(simple=dr_pb.LoadBalancerSettings.LEAST_REQUEST),
        tag(1, VARINT) + b"\x05",
    ),
    (
        dr_pb.LoadBalancerSettings.ConsistentHashLB(use_source_ip=True),
        tag(3, VARINT) + b"\x01",
    ),
    (dr_pb.ConnectionPoolSettings.TCPSettings(max_connections=10), tag(1, VARINT) + b"\x0a"),
    (
        dr_pb.ConnectionPoolSettings.TCPSettings(idle_timeout={"seconds": 1}),
        tag(5, LEN) + b"\x02\x08\x01",
    ),
    (dr_pb.OutlierDetection(consecutive_5xx_errors={"value": 2}), tag(7, LEN) + b"\x02\x08\x02"),
    (
        dr_pb.OutlierDetection(consecutive_gateway_errors={"value": 2}),
        tag(6, LEN) + b"\x02\x08\x02",
    ),
    (dr_pb.OutlierDetection(max_ejection_percent=50), tag(4, VARINT) + b"\x32"),
    (mcp_pb.Resource(metadata=metadata_pb.Metadata()), tag(1, LEN) + b"\x00"),
    (mcp_pb.Resource(body={"type_url": "t"}), tag(2, LEN) + b"\x03" + tag(1, LEN) + b"\x01t"),
    (metadata_pb.Metadata(name="n"), tag(1, LEN) + b"\x01n"),
    (metadata_pb.Metadata(version="v"), tag(3, LEN) + b"\x01v"),
    (metadata_pb.Metadata(labels={"k": "v"}), tag(4, LEN) + b"\x06\x0a\x01k\x12\x01v"),
    (metadata_pb.Metadata(annotations={"k": "v"}), tag(5, LEN) + b"\x06\x0a\x01k\x12\x01v"),
]


@pytest.mark.parametrize(("message", "expected"), CASES, ids=lambda v: type(v).__name__)
def test_field_sits_at_istios_number(message: Message, expected: bytes) -> None:
    assert message.SerializeToString() == expected


def test_full_names_match_istios_packages() -> None:
    # The Any type URLs istiod writes name these.
    assert vs_pb.VirtualService.DESCRIPTOR.full_name == "istio.networking.v1alpha3.VirtualService"
    assert dr_pb.DestinationRule.DESCRIPTOR.full_name == "istio.networking.v1alpha3.DestinationRule"
    assert mcp_pb.Resource.DESCRIPTOR.full_name == "istio.mcp.v1alpha1.Resource"


def test_fields_newer_than_our_copy_survive_a_round_trip() -> None:
    # A field number we do not declare, inside a nested message and at the top level,
    # as an istiod newer than our copy would send it.
    unknown_top = tag(99, LEN) + b"\x03new"
    unknown_nested = tag(42, VARINT) + b"\x07"
    route = vs_pb.TCPRoute(route=[vs_pb.RouteDestination(weight=1)]).SerializeToString()
    data = (
        vs_pb.VirtualService(hosts=["h"]).SerializeToString()
        + tag(4, LEN)
        + bytes([len(route) + len(unknown_nested)])
        + route
        + unknown_nested
        + unknown_top
    )
    msg = vs_pb.VirtualService.FromString(data)
    assert list(msg.hosts) == ["h"] and msg.tcp[0].route[0].weight == 1
    again = msg.SerializeToString()
    assert unknown_top in again and unknown_nested in again
    assert vs_pb.VirtualService.FromString(again) == msg


def test_envelope_keeps_unknown_fields_of_its_body() -> None:
    body = vs_pb.VirtualService(hosts=["h"]).SerializeToString() + tag(77, VARINT) + b"\x01"
    resource = mcp_pb.Resource()
    resource.body.type_url = "type.googleapis.com/istio.networking.v1alpha3.VirtualService"
    resource.body.value = body
    decoded = mcp_pb.Resource.FromString(resource.SerializeToString())
    spec = vs_pb.VirtualService.FromString(decoded.body.value)
    assert spec.SerializeToString() == body
