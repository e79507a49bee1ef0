"""Model values back into their xDS protobuf messages (the inverse of `convert`).

For whoever serves resources (the shipped control plane, tests, benchmarks):
`convert.*_from_pb(name, to_pb(value))` gives back an equal value.
"""

from __future__ import annotations

from nodeagent.model import policy as pm
from nodeagent.model import workload as wm
from nodeagent.pb.istio.security import authorization_pb2 as auth_pb
from nodeagent.pb.istio.workload import workload_pb2 as workload_pb


def _network_address(value: wm.NetworkAddress) -> workload_pb.NetworkAddress:
    msg = workload_pb.NetworkAddress(network=value.network, address=value.address.packed)
    if value.length is not None:
        msg.length = value.length
    return msg


def _gateway(value: wm.GatewayAddress) -> workload_pb.GatewayAddress:
    msg = workload_pb.GatewayAddress(hbone_mtls_port=value.hbone_mtls_port)
    if isinstance(value.destination, wm.NamespacedHostname):
        msg.hostname.namespace = value.destination.namespace
        msg.hostname.hostname = value.destination.hostname
    else:
        msg.address.CopyFrom(_network_address(value.destination))
    return msg


def _ports(values: tuple[wm.Port, ...]) -> list[workload_pb.Port]:
    return [
        workload_pb.Port(
            service_port=p.service_port,
            target_port=p.target_port,
            app_protocol=p.app_protocol.name,
        )
        for p in values
    ]


def _extensions(values: tuple[wm.Extension, ...]) -> list[workload_pb.Extension]:
    out = []
    for ext in values:
        msg = workload_pb.Extension(name=ext.name)
        if ext.type_url or ext.value:
            msg.config.type_url = ext.type_url
            msg.config.value = ext.value
        out.append(msg)
    return out


def workload_to_pb(value: wm.Workload) -> workload_pb.Workload:
    msg = workload_pb.Workload(
        uid=value.uid,
        name=value.name,
        namespace=value.namespace,
        addresses=[ip.packed for ip in value.addresses],
        hostname=value.hostname,
        network=value.network,
        tunnel_protocol=value.tunnel_protocol.name,
        trust_domain=value.trust_domain,
        service_account=value.service_account,
        node=value.node,
        canonical_name=value.canonical_name,
        canonical_revision=value.canonical_revision,
        workload_type=value.workload_type.name,
        workload_name=value.workload_name,
        native_tunnel=value.native_tunnel,
        authorization_policies=list(value.authorization_policies),
        status=value.status.name,
        cluster_id=value.cluster_id,
        network_mode=value.network_mode.name,
        extensions=_extensions(value.extensions),
    )
    if value.waypoint is not None:
        msg.waypoint.CopyFrom(_gateway(value.waypoint))
    if value.network_gateway is not None:
        msg.network_gateway.CopyFrom(_gateway(value.network_gateway))
    if value.application_tunnel is not None:
        msg.application_tunnel.CopyFrom(
            workload_pb.ApplicationTunnel(
                protocol=value.application_tunnel.protocol.name,
                port=value.application_tunnel.port,
            )
        )
    for key, ports in value.services.items():
        msg.services[key].ports.extend(_ports(ports))
    if value.locality is not None:
        msg.locality.region = value.locality.region
        msg.locality.zone = value.locality.zone
        msg.locality.subzone = value.locality.subzone
    if value.capacity is not None:
        msg.capacity.value = value.capacity
    return msg


def service_to_pb(value: wm.Service) -> workload_pb.Service:
    msg = workload_pb.Service(
        name=value.name,
        namespace=value.namespace,
        hostname=value.hostname,
        addresses=[_network_address(a) for a in value.addresses],
        ports=_ports(value.ports),
        subject_alt_names=list(value.subject_alt_names),
        ip_families=value.ip_families.name,
        extensions=_extensions(value.extensions),
        canonical=value.canonical,
        ingress_use_waypoint=value.ingress_use_waypoint,
        weighted_waypoints=[
            workload_pb.WeightedWaypoint(destination=_gateway(w.destination), weight=w.weight)
            for w in value.weighted_waypoints
        ],
        visibility=value.visibility.name,
    )
    if value.waypoint is not None:
        msg.waypoint.CopyFrom(_gateway(value.waypoint))
    if value.load_balancing is not None:
        lb = value.load_balancing
        msg.load_balancing.CopyFrom(
            workload_pb.LoadBalancing(
                routing_preference=[s.name for s in lb.routing_preference],
                mode=lb.mode.name,
                health_policy=lb.health_policy.name,
            )
        )
    return msg


def address_to_pb(value: wm.Workload | wm.Service) -> workload_pb.Address:
    """Wrap a workload or service in the `istio.workload.Address` resource."""
    if isinstance(value, wm.Workload):
        return workload_pb.Address(workload=workload_to_pb(value))
    return workload_pb.Address(service=service_to_pb(value))


def address_resource_name(value: wm.Workload | wm.Service) -> str:
    """The xDS resource name: the workload uid or the service's `namespace/hostname`."""
    return value.uid if isinstance(value, wm.Workload) else value.key


def _string_match(value: pm.StringMatch) -> auth_pb.StringMatch:
    msg = auth_pb.StringMatch()
    if value.kind is pm.StringMatchKind.EXACT:
        msg.exact = value.value
    elif value.kind is pm.StringMatchKind.PREFIX:
        msg.prefix = value.value
    elif value.kind is pm.StringMatchKind.SUFFIX:
        msg.suffix = value.value
    else:
        msg.presence.SetInParent()
    return msg


def _addresses(values: tuple[pm.IPNetwork, ...]) -> list[auth_pb.Address]:
    return [auth_pb.Address(address=n.network_address.packed, length=n.prefixlen) for n in values]


def _sa(values: tuple[pm.ServiceAccountMatch, ...]) -> list[auth_pb.ServiceAccountMatch]:
    return [
        auth_pb.ServiceAccountMatch(namespace=s.namespace, serviceAccount=s.service_account)
        for s in values
    ]


def _match(m: pm.Match) -> auth_pb.Match:
    return auth_pb.Match(
        namespaces=[_string_match(s) for s in m.namespaces],
        not_namespaces=[_string_match(s) for s in m.not_namespaces],
        principals=[_string_match(s) for s in m.principals],
        not_principals=[_string_match(s) for s in m.not_principals],
        source_ips=_addresses(m.source_ips),
        not_source_ips=_addresses(m.not_source_ips),
        destination_ips=_addresses(m.destination_ips),
        not_destination_ips=_addresses(m.not_destination_ips),
        destination_ports=list(m.destination_ports),
        not_destination_ports=list(m.not_destination_ports),
        service_accounts=_sa(m.service_accounts),
        not_service_accounts=_sa(m.not_service_accounts),
    )


def authorization_to_pb(value: pm.Authorization) -> auth_pb.Authorization:
    return auth_pb.Authorization(
        name=value.name,
        namespace=value.namespace,
        scope=value.scope.name,
        action=value.action.name,
        rules=[
            auth_pb.Rule(
                clauses=[
                    auth_pb.Clause(matches=[_match(m) for m in clause.matches])
                    for clause in rule.clauses
                ]
            )
            for rule in value.rules
        ],
        dry_run=value.dry_run,
    )
