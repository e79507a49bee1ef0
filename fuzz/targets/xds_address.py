"""Fuzz target: an `istio.workload.Address` resource (a Workload or a Service) from xDS.

Arbitrary bytes are converted as the agent converts `Any.value`; `ConversionError` is the
documented refusal (it becomes the NACK). A value that converts must then behave: it survives
encode -> convert unchanged (what `state/encode.py` promises), and the state store takes it
and lets it go again, leaving nothing behind.
"""

from __future__ import annotations

from google.protobuf import wrappers_pb2 as wrappers_pb

from nodeagent.model import workload as wm
from nodeagent.pb.istio.workload import workload_pb2 as workload_pb
from nodeagent.state.convert import ConversionError, address_from_bytes
from nodeagent.state.encode import address_resource_name, address_to_pb
from nodeagent.state.store import StateBatch, StateStore

INSTRUMENT = ("nodeagent",)
MAX_LEN = 4096


def fuzz_one(data: bytes) -> None:
    try:
        value = address_from_bytes("", data)
    except ConversionError:
        return
    name = address_resource_name(value)
    again = address_from_bytes(name, address_to_pb(value).SerializeToString(deterministic=True))
    assert again == value, f"encode -> convert changed the resource:\n{value!r}\n{again!r}"
    store = StateStore()
    if isinstance(value, wm.Workload):
        store.apply(StateBatch(workloads=(value,)))
        assert store.workload(value.uid) == value
        for ip in value.addresses:
            assert value in store.workloads_by_address(value.network, ip)
        for key in value.services:
            store.endpoints(key)
    else:
        store.apply(StateBatch(services=(value,)))
        assert store.service(name) == value
        for address in value.addresses:
            assert store.service_by_vip(address.network, address.address) == value
        store.endpoints(name)
    store.apply(StateBatch(removed_addresses=(name,)))
    assert not any(store.counts().values()), f"{name} left state behind after its removal"
    # ... nor in any index.
    if isinstance(value, wm.Workload):
        for ip in value.addresses:
            assert not store.workloads_by_address(value.network, ip), f"{name}: stale address"
        assert not store.workloads_on_node(value.node), f"{name}: stale node index"
        for key in value.services:
            assert not store.endpoints(key), f"{name}: stale endpoint of {key}"
    else:
        for address in value.addresses:
            assert store.service_by_vip(address.network, address.address) is None, "stale VIP"


def _address(msg: workload_pb.Workload | workload_pb.Service) -> bytes:
    if isinstance(msg, workload_pb.Workload):
        return workload_pb.Address(workload=msg).SerializeToString(deterministic=True)
    return workload_pb.Address(service=msg).SerializeToString(deterministic=True)


def seeds() -> dict[str, bytes]:
    """A pod as istiod sends it, one with every field set, services plain and elaborate."""
    pod = workload_pb.Workload(
        uid="Kubernetes//Pod/default/frontend-1",
        name="frontend-1",
        namespace="default",
        addresses=[bytes([10, 10, 1, 11])],
        network="",
        tunnel_protocol=workload_pb.TunnelProtocol.HBONE,
        trust_domain="cluster.local",
        service_account="frontend",
        node="node1",
        canonical_name="frontend",
        canonical_revision="v1",
        workload_type=workload_pb.WorkloadType.POD,
        workload_name="frontend",
        services={
            "default/backend.default.svc.cluster.local": workload_pb.PortList(
                ports=[workload_pb.Port(service_port=8080, target_port=8080)]
            )
        },
        cluster_id="Kubernetes",
    )
    everything = workload_pb.Workload(
        uid="Kubernetes//Pod/prod/api-0",
        name="api-0",
        namespace="prod",
        addresses=[bytes([10, 10, 2, 12]), bytes(15) + b"\x01"],
        hostname="api-0.api.prod.svc.cluster.local",
        network="net-a",
        tunnel_protocol=workload_pb.TunnelProtocol.HBONE,
        trust_domain="example.org",
        service_account="api",
        waypoint=workload_pb.GatewayAddress(
            hostname=workload_pb.NamespacedHostname(namespace="prod", hostname="waypoint"),
            hbone_mtls_port=15008,
        ),
        network_gateway=workload_pb.GatewayAddress(
            address=workload_pb.NetworkAddress(network="net-b", address=bytes([192, 0, 2, 1])),
            hbone_mtls_port=15008,
        ),
        node="node2",
        workload_type=workload_pb.WorkloadType.DEPLOYMENT,
        native_tunnel=True,
        application_tunnel=workload_pb.ApplicationTunnel(
            protocol=workload_pb.ApplicationTunnel.Protocol.PROXY, port=15088
        ),
        services={
            "prod/api.prod.svc.cluster.local": workload_pb.PortList(
                ports=[
                    workload_pb.Port(service_port=80, target_port=8080, app_protocol="HTTP11"),
                    workload_pb.Port(service_port=443, target_port=0, app_protocol="GRPC"),
                ]
            ),
            "prod/headless.prod.svc.cluster.local": workload_pb.PortList(),
        },
        authorization_policies=["prod/allow-frontend"],
        status=workload_pb.WorkloadStatus.UNHEALTHY,
        cluster_id="c2",
        locality=workload_pb.Locality(region="eu", zone="eu-1", subzone="a"),
        network_mode=workload_pb.NetworkMode.HOST_NETWORK,
        extensions=[workload_pb.Extension(name="ext", config=None)],
        capacity=wrappers_pb.UInt32Value(value=3),
    )
    service = workload_pb.Service(
        name="backend",
        namespace="default",
        hostname="backend.default.svc.cluster.local",
        addresses=[workload_pb.NetworkAddress(network="", address=bytes([10, 96, 0, 10]))],
        ports=[workload_pb.Port(service_port=8080, target_port=8080)],
    )
    elaborate = workload_pb.Service(
        name="api",
        namespace="prod",
        hostname="api.prod.svc.cluster.local",
        addresses=[
            workload_pb.NetworkAddress(network="net-a", address=bytes([10, 96, 0, 20])),
            workload_pb.NetworkAddress(network="net-a", address=bytes(15) + b"\x14", length=128),
        ],
        ports=[
            workload_pb.Port(service_port=80, target_port=8080, app_protocol="HTTP11"),
            workload_pb.Port(service_port=9090, app_protocol="HTTP2"),
        ],
        subject_alt_names=["spiffe://example.org/ns/prod/sa/api"],
        waypoint=workload_pb.GatewayAddress(
            address=workload_pb.NetworkAddress(address=bytes([10, 10, 3, 3]), length=32),
            hbone_mtls_port=15008,
        ),
        load_balancing=workload_pb.LoadBalancing(
            routing_preference=["REGION", "ZONE", "NETWORK"],
            mode="FAILOVER",
            health_policy="ALLOW_ALL",
        ),
        ip_families="DUAL",
        canonical=True,
        ingress_use_waypoint=True,
        weighted_waypoints=[
            workload_pb.WeightedWaypoint(
                destination=workload_pb.GatewayAddress(
                    hostname=workload_pb.NamespacedHostname(namespace="prod", hostname="wp-a"),
                    hbone_mtls_port=15008,
                ),
                weight=90,
            )
        ],
        visibility="NAMESPACE",
    )
    return {
        "pod": _address(pod),
        "workload-every-field": _address(everything),
        "service": _address(service),
        "service-every-field": _address(elaborate),
        # Refused on purpose: a 5-byte address and an unknown enum value reach the error paths.
        "workload-bad-address": _address(
            workload_pb.Workload(uid="u", name="n", namespace="ns", addresses=[b"\x01" * 5])
        ),
        "service-unknown-enum": _address(_with_unknown_ip_families()),
    }


def _with_unknown_ip_families() -> workload_pb.Service:
    msg = workload_pb.Service(name="s", namespace="ns", hostname="h")
    msg.ip_families = 77  # type: ignore[assignment]  # proto3 enums are open: the wire allows it
    return msg
