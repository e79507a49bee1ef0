"""Conversion of istio.workload / istio.security resources: every field, and rejections."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from nodeagent.model import policy as pm
from nodeagent.model import workload as wm
from nodeagent.model.identity import Identity
from nodeagent.pb.istio.security import authorization_pb2 as auth_pb
from nodeagent.pb.istio.workload import workload_pb2 as workload_pb
from nodeagent.state.convert import (
    ConversionError,
    address_from_bytes,
    authorization_from_bytes,
    service_from_pb,
    workload_from_pb,
)
from nodeagent.state.encode import (
    address_to_pb,
    authorization_to_pb,
    service_to_pb,
    workload_to_pb,
)

IP4 = ipaddress.IPv4Address
IP6 = ipaddress.IPv6Address
UID = "Kubernetes//Pod/default/pod-a"


# --- builders -------------------------------------------------------------------


def full_workload_pb(**overrides: Any) -> workload_pb.Workload:
    """A Workload with every field of the reference table set to a non-default value."""
    fields: dict[str, Any] = {
        "uid": UID,
        "name": "pod-a",
        "namespace": "default",
        "addresses": [IP4("10.1.0.5").packed, IP6("fd00::5").packed],
        "hostname": "pod-a.example",
        "network": "net1",
        "tunnel_protocol": workload_pb.HBONE,
        "trust_domain": "td.example",
        "service_account": "sa-a",
        "waypoint": workload_pb.GatewayAddress(
            hostname=workload_pb.NamespacedHostname(namespace="default", hostname="wp.svc"),
            hbone_mtls_port=15008,
        ),
        "network_gateway": workload_pb.GatewayAddress(
            address=workload_pb.NetworkAddress(network="net2", address=IP4("192.0.2.1").packed),
            hbone_mtls_port=15009,
        ),
        "node": "node-1",
        "canonical_name": "app-a",
        "canonical_revision": "v2",
        "workload_type": workload_pb.POD,
        "workload_name": "deploy-a",
        "native_tunnel": True,
        "application_tunnel": workload_pb.ApplicationTunnel(
            protocol=workload_pb.ApplicationTunnel.PROXY, port=15088
        ),
        "services": {
            "default/svc-a.default.svc.cluster.local": workload_pb.PortList(
                ports=[
                    workload_pb.Port(
                        service_port=80, target_port=8080, app_protocol=workload_pb.HTTP2
                    )
                ]
            ),
            "other/svc-b.other.svc.cluster.local": workload_pb.PortList(
                ports=[workload_pb.Port(service_port=443)]
            ),
        },
        "authorization_policies": ["default/allow-a", "default/deny-b"],
        "status": workload_pb.UNHEALTHY,
        "cluster_id": "cluster-1",
        "locality": workload_pb.Locality(region="r1", zone="z1", subzone="s1"),
        "network_mode": workload_pb.HOST_NETWORK,
        "extensions": [workload_pb.Extension(name="ext-1")],
        "capacity": {"value": 7},
    }
    fields.update(overrides)
    msg = workload_pb.Workload(**fields)
    msg.extensions[0].config.type_url = "type.googleapis.com/x.Y"
    msg.extensions[0].config.value = b"\x01\x02"
    return msg


def full_service_pb(**overrides: Any) -> workload_pb.Service:
    fields: dict[str, Any] = {
        "name": "svc-a",
        "namespace": "default",
        "hostname": "svc-a.default.svc.cluster.local",
        "addresses": [
            workload_pb.NetworkAddress(network="net1", address=IP4("10.96.0.10").packed),
            workload_pb.NetworkAddress(address=IP6("fd00:96::10").packed, length=128),
        ],
        "ports": [
            workload_pb.Port(service_port=80, target_port=8080, app_protocol=workload_pb.HTTP11),
            workload_pb.Port(service_port=9090, app_protocol=workload_pb.GRPC),
        ],
        "subject_alt_names": ["spiffe://td/ns/default/sa/extra"],
        "waypoint": workload_pb.GatewayAddress(
            address=workload_pb.NetworkAddress(address=IP4("10.96.0.99").packed),
            hbone_mtls_port=15008,
        ),
        "load_balancing": workload_pb.LoadBalancing(
            routing_preference=[workload_pb.LoadBalancing.ZONE, workload_pb.LoadBalancing.NODE],
            mode=workload_pb.LoadBalancing.FAILOVER,
            health_policy=workload_pb.LoadBalancing.ALLOW_ALL,
        ),
        "ip_families": workload_pb.DUAL,
        "extensions": [workload_pb.Extension(name="ext-s")],
        "canonical": True,
        "ingress_use_waypoint": True,
        "weighted_waypoints": [
            workload_pb.WeightedWaypoint(
                destination=workload_pb.GatewayAddress(
                    hostname=workload_pb.NamespacedHostname(namespace="wp", hostname="wp1.svc")
                ),
                weight=30,
            )
        ],
        "visibility": workload_pb.Service.NAMESPACE,
    }
    fields.update(overrides)
    return workload_pb.Service(**fields)


def full_authorization_pb(**overrides: Any) -> auth_pb.Authorization:
    match = auth_pb.Match(
        namespaces=[auth_pb.StringMatch(exact="ns1")],
        not_namespaces=[auth_pb.StringMatch(prefix="kube-")],
        principals=[auth_pb.StringMatch(suffix="/sa/client")],
        not_principals=[auth_pb.StringMatch(presence={})],
        source_ips=[auth_pb.Address(address=IP4("10.0.0.0").packed, length=8)],
        not_source_ips=[auth_pb.Address(address=IP4("10.9.9.9").packed, length=32)],
        destination_ips=[auth_pb.Address(address=IP6("fd00::").packed, length=64)],
        not_destination_ips=[auth_pb.Address(address=IP4("10.1.0.0").packed, length=16)],
        destination_ports=[80, 443],
        not_destination_ports=[22],
        service_accounts=[auth_pb.ServiceAccountMatch(namespace="ns1", serviceAccount="sa1")],
        not_service_accounts=[auth_pb.ServiceAccountMatch(namespace="ns2", serviceAccount="sa2")],
    )
    fields: dict[str, Any] = {
        "name": "allow-a",
        "namespace": "default",
        "scope": auth_pb.NAMESPACE,
        "action": auth_pb.DENY,
        "rules": [
            auth_pb.Rule(clauses=[auth_pb.Clause(matches=[match]), auth_pb.Clause()]),
            auth_pb.Rule(),
        ],
        "dry_run": True,
    }
    fields.update(overrides)
    return auth_pb.Authorization(**fields)


def address_bytes(msg: workload_pb.Workload | workload_pb.Service) -> bytes:
    if isinstance(msg, workload_pb.Workload):
        return workload_pb.Address(workload=msg).SerializeToString()
    return workload_pb.Address(service=msg).SerializeToString()


# --- every field ------------------------------------------------------------------


def test_workload_every_field_converts() -> None:
    w = address_from_bytes(UID, address_bytes(full_workload_pb()))
    assert isinstance(w, wm.Workload)
    assert w.uid == UID
    assert w.name == "pod-a"
    assert w.namespace == "default"
    assert w.addresses == (IP4("10.1.0.5"), IP6("fd00::5"))
    assert w.hostname == "pod-a.example"
    assert w.network == "net1"
    assert w.tunnel_protocol is wm.TunnelProtocol.HBONE
    assert w.trust_domain == "td.example"
    assert w.service_account == "sa-a"
    assert w.waypoint == wm.GatewayAddress(wm.NamespacedHostname("default", "wp.svc"), 15008)
    assert w.network_gateway == wm.GatewayAddress(
        wm.NetworkAddress("net2", IP4("192.0.2.1")), 15009
    )
    assert w.node == "node-1"
    assert w.canonical_name == "app-a"
    assert w.canonical_revision == "v2"
    assert w.workload_type is wm.WorkloadType.POD
    assert w.workload_name == "deploy-a"
    assert w.native_tunnel is True
    assert w.application_tunnel == wm.ApplicationTunnel(wm.ApplicationTunnelProtocol.PROXY, 15088)
    assert dict(w.services) == {
        "default/svc-a.default.svc.cluster.local": (wm.Port(80, 8080, wm.AppProtocol.HTTP2),),
        "other/svc-b.other.svc.cluster.local": (wm.Port(443, 0, wm.AppProtocol.UNKNOWN),),
    }
    assert w.authorization_policies == ("default/allow-a", "default/deny-b")
    assert w.status is wm.WorkloadStatus.UNHEALTHY
    assert w.cluster_id == "cluster-1"
    assert w.locality == wm.Locality("r1", "z1", "s1")
    assert w.network_mode is wm.NetworkMode.HOST_NETWORK
    assert w.extensions == (wm.Extension("ext-1", "type.googleapis.com/x.Y", b"\x01\x02"),)
    assert w.capacity == 7
    assert w.identity() == Identity("td.example", "default", "sa-a")


def test_workload_defaults_when_fields_are_absent() -> None:
    w = workload_from_pb("u1", workload_pb.Workload(uid="u1", name="p", namespace="ns"))
    assert w.waypoint is None and w.network_gateway is None
    assert w.application_tunnel is None and w.locality is None
    assert w.capacity is None
    assert w.tunnel_protocol is wm.TunnelProtocol.NONE
    assert dict(w.services) == {}
    assert w.identity() == Identity("cluster.local", "ns", "default")


def test_capacity_zero_is_distinct_from_absent() -> None:
    w = workload_from_pb("u1", full_workload_pb(uid="u1", capacity={"value": 0}))
    assert w.capacity == 0


def test_service_every_field_converts() -> None:
    key = "default/svc-a.default.svc.cluster.local"
    s = address_from_bytes(key, address_bytes(full_service_pb()))
    assert isinstance(s, wm.Service)
    assert s.key == key
    assert s.name == "svc-a"
    assert s.namespace == "default"
    assert s.hostname == "svc-a.default.svc.cluster.local"
    assert s.addresses == (
        wm.NetworkAddress("net1", IP4("10.96.0.10"), None),
        wm.NetworkAddress("", IP6("fd00:96::10"), 128),
    )
    assert s.ports == (
        wm.Port(80, 8080, wm.AppProtocol.HTTP11),
        wm.Port(9090, 0, wm.AppProtocol.GRPC),
    )
    assert s.subject_alt_names == ("spiffe://td/ns/default/sa/extra",)
    assert s.waypoint == wm.GatewayAddress(wm.NetworkAddress("", IP4("10.96.0.99")), 15008)
    assert s.load_balancing == wm.LoadBalancing(
        (wm.LoadBalancingScope.ZONE, wm.LoadBalancingScope.NODE),
        wm.LoadBalancingMode.FAILOVER,
        wm.HealthPolicy.ALLOW_ALL,
    )
    assert s.ip_families is wm.IPFamilies.DUAL
    assert s.extensions == (wm.Extension("ext-s"),)
    assert s.canonical is True
    assert s.ingress_use_waypoint is True
    assert s.weighted_waypoints == (
        wm.WeightedWaypoint(wm.GatewayAddress(wm.NamespacedHostname("wp", "wp1.svc")), 30),
    )
    assert s.visibility is wm.ServiceVisibility.NAMESPACE


def test_authorization_every_field_converts() -> None:
    a = authorization_from_bytes("default/allow-a", full_authorization_pb().SerializeToString())
    assert a.name == "allow-a"
    assert a.namespace == "default"
    assert a.key == "default/allow-a"
    assert a.scope is pm.Scope.NAMESPACE
    assert a.action is pm.Action.DENY
    assert a.dry_run is True
    assert len(a.rules) == 2 and a.rules[1] == pm.Rule(())
    assert len(a.rules[0].clauses) == 2 and a.rules[0].clauses[1] == pm.Clause(())
    (m,) = a.rules[0].clauses[0].matches
    assert m.namespaces == (pm.StringMatch.exact("ns1"),)
    assert m.not_namespaces == (pm.StringMatch.prefix("kube-"),)
    assert m.principals == (pm.StringMatch.suffix("/sa/client"),)
    assert m.not_principals == (pm.StringMatch.presence(),)
    assert m.source_ips == (ipaddress.ip_network("10.0.0.0/8"),)
    assert m.not_source_ips == (ipaddress.ip_network("10.9.9.9/32"),)
    assert m.destination_ips == (ipaddress.ip_network("fd00::/64"),)
    assert m.not_destination_ips == (ipaddress.ip_network("10.1.0.0/16"),)
    assert m.destination_ports == (80, 443)
    assert m.not_destination_ports == (22,)
    assert m.service_accounts == (pm.ServiceAccountMatch("ns1", "sa1"),)
    assert m.not_service_accounts == (pm.ServiceAccountMatch("ns2", "sa2"),)


def test_authorization_prefix_with_host_bits_keeps_the_prefix() -> None:
    msg = auth_pb.Authorization(
        name="p",
        namespace="ns",
        rules=[
            auth_pb.Rule(
                clauses=[
                    auth_pb.Clause(
                        matches=[
                            auth_pb.Match(
                                source_ips=[
                                    auth_pb.Address(address=IP4("10.1.2.3").packed, length=16)
                                ]
                            )
                        ]
                    )
                ]
            )
        ],
    )
    a = authorization_from_bytes("ns/p", msg.SerializeToString())
    assert a.rules[0].clauses[0].matches[0].source_ips == (ipaddress.ip_network("10.1.0.0/16"),)


# --- round trip through the encoder ---------------------------------------------------


def test_workload_service_and_policy_round_trip_through_encode() -> None:
    w = workload_from_pb(UID, full_workload_pb())
    assert workload_from_pb(UID, workload_to_pb(w)) == w
    assert address_from_bytes(UID, address_to_pb(w).SerializeToString()) == w
    s = service_from_pb("", full_service_pb())
    assert service_from_pb(s.key, service_to_pb(s)) == s
    a = authorization_from_bytes("default/allow-a", full_authorization_pb().SerializeToString())
    assert authorization_from_bytes(a.key, authorization_to_pb(a).SerializeToString()) == a


def test_encoded_workload_is_byte_identical_to_the_original() -> None:
    original = full_workload_pb()
    w = workload_from_pb(UID, original)
    assert workload_to_pb(w) == original


# --- rejections -----------------------------------------------------------------------


def _workload_error(**overrides: Any) -> str:
    msg = full_workload_pb(**overrides)
    with pytest.raises(ConversionError) as e:
        address_from_bytes(msg.uid, address_bytes(msg))
    return str(e.value)


def test_five_byte_address_is_rejected_naming_workload_and_index() -> None:
    bad = [IP4("10.1.0.5").packed, b"\x01\x02\x03\x04\x05"]
    assert _workload_error(addresses=bad) == (
        "workload default/pod-a: address 1: 5 bytes, expected 4 or 16"
    )


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"uid": ""}, "uid is empty"),
        ({"namespace": ""}, "namespace is empty"),
        ({"tunnel_protocol": 9}, "tunnel_protocol: unknown value 9"),
        ({"workload_type": 7}, "workload_type: unknown value 7"),
        (
            {"services": {"default/s": workload_pb.PortList(ports=[{"service_port": 70000}])}},
            "services[default/s]: port 0: service_port: port 70000 is outside 1..65535",
        ),
        (
            {"services": {"default/s": workload_pb.PortList(ports=[{"service_port": 0}])}},
            "service_port: port 0 is outside 1..65535",
        ),
        (
            {"services": {"nohost": workload_pb.PortList()}},
            "key 'nohost' is not namespace/hostname",
        ),
        ({"waypoint": workload_pb.GatewayAddress()}, "waypoint: neither hostname nor address"),
        (
            {"network_gateway": {"address": {"address": b"\x01\x02"}}},
            "network_gateway: address: address: 2 bytes, expected 4 or 16",
        ),
        ({"application_tunnel": {"port": 65536}}, "application_tunnel: port: port 65536"),
    ],
)
def test_malformed_workload_field_is_named(overrides: dict[str, Any], expected: str) -> None:
    assert expected in _workload_error(**overrides)


def test_workload_resource_name_must_be_its_uid() -> None:
    with pytest.raises(ConversionError, match="resource name 'other' differs from uid"):
        address_from_bytes("other", address_bytes(full_workload_pb()))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"hostname": ""}, "service default/svc-a: hostname is empty"),
        ({"namespace": ""}, "namespace is empty"),
        ({"ports": [{"service_port": 80, "target_port": 70000}]}, "port 0: target_port"),
        ({"addresses": [{"address": b"\x00" * 5}]}, "address 0: address: 5 bytes"),
        (
            {"addresses": [{"address": IP4("10.0.0.1").packed, "length": 33}]},
            "address 0: length 33 exceeds 32",
        ),
        ({"visibility": 5}, "visibility: unknown value 5"),
        ({"load_balancing": {"mode": 9}}, "load_balancing: mode: unknown value 9"),
        (
            {"weighted_waypoints": [{"weight": 1}]},
            "weighted_waypoint 0: destination: neither hostname nor address",
        ),
    ],
)
def test_malformed_service_field_is_named(overrides: dict[str, Any], expected: str) -> None:
    msg = full_service_pb(**overrides)
    with pytest.raises(ConversionError) as e:
        address_from_bytes("", address_bytes(msg))
    assert expected in str(e.value)


def test_service_resource_name_must_be_namespace_hostname() -> None:
    with pytest.raises(ConversionError, match="differs from namespace/hostname"):
        address_from_bytes("default/svc-a", address_bytes(full_service_pb()))


def test_bytes_that_do_not_decode_are_rejected() -> None:
    with pytest.raises(ConversionError, match=r"does not decode as istio\.workload\.Address"):
        address_from_bytes("x", b"\xff\xff\xff")
    with pytest.raises(ConversionError, match=r"does not decode as istio\.security"):
        authorization_from_bytes("x", b"\x0a\x05ab")


def test_empty_address_is_rejected() -> None:
    with pytest.raises(ConversionError, match="neither a workload nor a service"):
        address_from_bytes("x", b"")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"name": ""}, "name is empty"),
        ({"scope": 4}, "scope: unknown value 4"),
        ({"action": 2}, "action: unknown value 2"),
        (
            {"rules": [{"clauses": [{"matches": [{"destination_ports": [70000]}]}]}]},
            "rule 0: clause 0: match 0: destination_ports 0: port 70000",
        ),
        (
            {"rules": [{"clauses": [{"matches": [{"principals": [{}]}]}]}]},
            "match 0: principals 0: no match type set",
        ),
        (
            {"rules": [{"clauses": [{"matches": [{"source_ips": [{"address": b"\x01"}]}]}]}]},
            "source_ips 0: 1 bytes, expected 4 or 16",
        ),
        (
            {
                "rules": [
                    {
                        "clauses": [
                            {
                                "matches": [
                                    {
                                        "not_destination_ips": [
                                            {"address": b"\x00" * 16, "length": 129}
                                        ]
                                    }
                                ]
                            }
                        ]
                    }
                ]
            },
            "not_destination_ips 0: length 129 exceeds 128",
        ),
    ],
)
def test_malformed_authorization_field_is_named(overrides: dict[str, Any], expected: str) -> None:
    msg = full_authorization_pb(**overrides)
    with pytest.raises(ConversionError) as e:
        authorization_from_bytes("", msg.SerializeToString())
    assert str(e.value).startswith("authorization default/")
    assert expected in str(e.value)


def test_authorization_resource_name_must_be_namespace_name() -> None:
    with pytest.raises(ConversionError, match="differs from namespace/name"):
        authorization_from_bytes("other/x", full_authorization_pb().SerializeToString())
