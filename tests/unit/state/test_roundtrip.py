"""Property: any valid model value survives encode -> bytes -> convert unchanged."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.model import workload as wm
from nodeagent.state.convert import address_from_bytes
from nodeagent.state.encode import address_resource_name, address_to_pb

names = st.text("abcdefghijklmnopqrstuvwxyz0123456789-.", min_size=1, max_size=12)
ips = st.one_of(
    st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
    st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address),
)
ports = st.builds(
    wm.Port,
    st.integers(1, 65535),
    st.integers(0, 65535),
    st.sampled_from(wm.AppProtocol),
)
network_addresses = ips.flatmap(
    lambda ip: st.builds(
        wm.NetworkAddress,
        names | st.just(""),
        st.just(ip),
        st.none() | st.integers(0, ip.max_prefixlen),
    )
)
gateways = st.builds(
    wm.GatewayAddress,
    st.builds(wm.NamespacedHostname, names, names) | network_addresses,
    st.integers(0, 65535),
)
extensions = st.builds(wm.Extension, names, names, st.binary(max_size=8))

workloads = st.builds(
    wm.Workload,
    uid=names,
    name=names,
    namespace=names,
    addresses=st.lists(ips, max_size=3).map(tuple),
    hostname=names | st.just(""),
    network=names | st.just(""),
    tunnel_protocol=st.sampled_from(wm.TunnelProtocol),
    trust_domain=names | st.just(""),
    service_account=names | st.just(""),
    waypoint=st.none() | gateways,
    network_gateway=st.none() | gateways,
    node=names,
    workload_type=st.sampled_from(wm.WorkloadType),
    native_tunnel=st.booleans(),
    application_tunnel=st.none()
    | st.builds(
        wm.ApplicationTunnel, st.sampled_from(wm.ApplicationTunnelProtocol), st.integers(0, 65535)
    ),
    services=st.dictionaries(
        st.builds("{}/{}".format, names, names), st.lists(ports, max_size=2).map(tuple), max_size=3
    ),
    authorization_policies=st.lists(names, max_size=2).map(tuple),
    status=st.sampled_from(wm.WorkloadStatus),
    locality=st.none() | st.builds(wm.Locality, names, names, names),
    network_mode=st.sampled_from(wm.NetworkMode),
    extensions=st.lists(extensions, max_size=2).map(tuple),
    capacity=st.none() | st.integers(0, 2**32 - 1),
)
services = st.builds(
    wm.Service,
    name=names,
    namespace=names,
    hostname=names,
    addresses=st.lists(network_addresses, max_size=2).map(tuple),
    ports=st.lists(ports, max_size=3).map(tuple),
    subject_alt_names=st.lists(names, max_size=2).map(tuple),
    waypoint=st.none() | gateways,
    load_balancing=st.none()
    | st.builds(
        wm.LoadBalancing,
        st.lists(st.sampled_from(wm.LoadBalancingScope), max_size=3).map(tuple),
        st.sampled_from(wm.LoadBalancingMode),
        st.sampled_from(wm.HealthPolicy),
    ),
    ip_families=st.sampled_from(wm.IPFamilies),
    extensions=st.lists(extensions, max_size=2).map(tuple),
    canonical=st.booleans(),
    ingress_use_waypoint=st.booleans(),
    weighted_waypoints=st.lists(
        st.builds(wm.WeightedWaypoint, gateways, st.integers(0, 2**32 - 1)), max_size=2
    ).map(tuple),
    visibility=st.sampled_from(wm.ServiceVisibility),
)


@settings(max_examples=60, deadline=None)
@given(workloads | services)
def test_any_valid_address_round_trips(value: wm.Workload | wm.Service) -> None:
    data = address_to_pb(value).SerializeToString()
    assert address_from_bytes(address_resource_name(value), data) == value
