"""Wire compatibility: our generated messages put fields at Istio's / Envoy's numbers.

Each test encodes a message with one field set and checks the raw tag bytes, so a
wrong field number or type in proto/ fails here (tag = field_number << 3 | wire_type).
"""

from __future__ import annotations

import pytest
from google.protobuf import struct_pb2 as struct_pb
from google.protobuf.message import Message

from nodeagent.pb.envoy.config.core.v3 import base_pb2 as core_pb
from nodeagent.pb.envoy.service.discovery.v3 import ads_pb2 as ads_pb
from nodeagent.pb.envoy.service.discovery.v3 import discovery_pb2 as discovery_pb
from nodeagent.pb.istio.security import authorization_pb2 as auth_pb
from nodeagent.pb.istio.workload import workload_pb2 as workload_pb

VARINT, LEN = 0, 2


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (workload_pb.Workload(uid="u"), tag(20, LEN) + b"\x01u"),  # 0xa2 0x01
        (workload_pb.Workload(name="n"), tag(1, LEN) + b"\x01n"),
        (
            workload_pb.Workload(addresses=[b"\x0a\x00\x00\x01"]),
            tag(3, LEN) + b"\x04\x0a\x00\x00\x01",
        ),
        (workload_pb.Workload(hostname="h"), tag(21, LEN) + b"\x01h"),
        (workload_pb.Workload(tunnel_protocol=workload_pb.HBONE), tag(5, VARINT) + b"\x01"),
        (workload_pb.Workload(service_account="s"), tag(7, LEN) + b"\x01s"),
        (workload_pb.Workload(authorization_policies=["p"]), tag(16, LEN) + b"\x01p"),
        (workload_pb.Workload(status=workload_pb.UNHEALTHY), tag(17, VARINT) + b"\x01"),
        (workload_pb.Workload(network_mode=workload_pb.HOST_NETWORK), tag(25, VARINT) + b"\x01"),
        (workload_pb.Workload(capacity={"value": 3}), tag(27, LEN) + b"\x02\x08\x03"),
        (workload_pb.Workload(native_tunnel=True), tag(14, VARINT) + b"\x01"),
        (workload_pb.Service(hostname="h"), tag(3, LEN) + b"\x01h"),
        (workload_pb.Service(visibility=workload_pb.Service.NAMESPACE), tag(14, VARINT) + b"\x01"),
        (workload_pb.Service(ip_families=workload_pb.DUAL), tag(9, VARINT) + b"\x03"),
        (workload_pb.Address(service=workload_pb.Service()), tag(2, LEN) + b"\x00"),
        (workload_pb.Port(target_port=8080), tag(2, VARINT) + _varint(8080)),
        (workload_pb.GatewayAddress(hbone_mtls_port=15008), tag(3, VARINT) + _varint(15008)),
        (workload_pb.NetworkAddress(length=0), tag(3, VARINT) + b"\x00"),  # optional: presence
        (
            workload_pb.LoadBalancing(mode=workload_pb.LoadBalancing.PASSTHROUGH),
            tag(2, VARINT) + b"\x03",
        ),
        (workload_pb.ApplicationTunnel(port=1), tag(2, VARINT) + b"\x01"),
        (auth_pb.Authorization(rules=[auth_pb.Rule()]), tag(5, LEN) + b"\x00"),
        (auth_pb.Authorization(dry_run=True), tag(6, VARINT) + b"\x01"),
        (auth_pb.Clause(matches=[auth_pb.Match()]), tag(2, LEN) + b"\x00"),
        (auth_pb.Match(destination_ports=[80]), tag(9, LEN) + b"\x01\x50"),  # packed
        (
            auth_pb.Match(not_service_accounts=[auth_pb.ServiceAccountMatch()]),
            tag(12, LEN) + b"\x00",
        ),
        (auth_pb.ServiceAccountMatch(serviceAccount="s"), tag(2, LEN) + b"\x01s"),
        (auth_pb.StringMatch(presence={}), tag(4, LEN) + b"\x00"),
        (auth_pb.Address(length=24), tag(2, VARINT) + b"\x18"),
        (discovery_pb.DeltaDiscoveryRequest(response_nonce="n"), tag(6, LEN) + b"\x01n"),
        (discovery_pb.DeltaDiscoveryRequest(type_url="t"), tag(2, LEN) + b"\x01t"),
        (
            discovery_pb.DeltaDiscoveryRequest(error_detail={"message": "m"}),
            tag(7, LEN) + b"\x03\x12\x01m",
        ),
        (
            discovery_pb.DeltaDiscoveryRequest(initial_resource_versions={"a": "1"}),
            tag(5, LEN) + b"\x06\x0a\x01a\x12\x011",
        ),
        (discovery_pb.DeltaDiscoveryResponse(nonce="n"), tag(5, LEN) + b"\x01n"),
        (discovery_pb.DeltaDiscoveryResponse(removed_resources=["r"]), tag(6, LEN) + b"\x01r"),
        (discovery_pb.DeltaDiscoveryResponse(type_url="t"), tag(4, LEN) + b"\x01t"),
        (discovery_pb.Resource(name="r"), tag(3, LEN) + b"\x01r"),
        (discovery_pb.Resource(ttl={"seconds": 1}), tag(6, LEN) + b"\x02\x08\x01"),
        (core_pb.Node(id="i"), tag(1, LEN) + b"\x01i"),
        (core_pb.Node(metadata=struct_pb.Struct()), tag(3, LEN) + b"\x00"),
    ],
)
def test_field_is_at_the_reference_number(message: Message, expected: bytes) -> None:
    assert message.SerializeToString() == expected


def test_enum_numbers_match_the_reference() -> None:
    assert workload_pb.TunnelProtocol.Value("LEGACY_ISTIO_MTLS") == 2
    assert workload_pb.AppProtocol.Value("TLS") == 5
    assert workload_pb.WorkloadType.Value("JOB") == 3
    assert workload_pb.LoadBalancing.Scope.Value("NETWORK") == 6
    assert auth_pb.Scope.Value("WORKLOAD_SELECTOR") == 2
    assert auth_pb.Action.Value("DENY") == 1


def test_package_and_service_names_match_istio_and_envoy() -> None:
    assert workload_pb.Address.DESCRIPTOR.full_name == "istio.workload.Address"
    assert auth_pb.Authorization.DESCRIPTOR.full_name == "istio.security.Authorization"
    assert core_pb.Node.DESCRIPTOR.full_name == "envoy.config.core.v3.Node"
    method = ads_pb.DESCRIPTOR.services_by_name["AggregatedDiscoveryService"].methods_by_name[
        "DeltaAggregatedResources"
    ]
    assert (
        method.full_name
        == "envoy.service.discovery.v3.AggregatedDiscoveryService.DeltaAggregatedResources"
    )
    assert method.client_streaming and method.server_streaming
    assert method.input_type.full_name == "envoy.service.discovery.v3.DeltaDiscoveryRequest"
    assert method.output_type.full_name == "envoy.service.discovery.v3.DeltaDiscoveryResponse"


def test_workload_field_15_is_reserved() -> None:
    fields = workload_pb.Workload.DESCRIPTOR.fields_by_number
    assert 15 not in fields
    assert sorted(fields) == [*range(1, 15), *range(16, 28)]


def test_fields_from_other_istio_versions_are_skipped_not_fatal() -> None:
    # Some istiod versions send Service field 11 as a Timestamp (we have `canonical`
    # bool there) and newer ones add LoadBalancing field 4; both must decode.
    service = workload_pb.Service(hostname="h").SerializeToString() + tag(11, LEN) + b"\x02\x08\x05"
    parsed = workload_pb.Service.FromString(service)
    assert parsed.hostname == "h" and parsed.canonical is False
    lb = workload_pb.LoadBalancing.FromString(tag(4, VARINT) + b"\x01" + tag(2, VARINT) + b"\x02")
    assert lb.mode == workload_pb.LoadBalancing.FAILOVER
