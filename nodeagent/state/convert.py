"""Convert xDS resources (serialized protobuf) into model values, one at a time.

Each function takes the xDS resource name and the resource bytes (`Any.value`)
and returns a model value or raises `ConversionError` whose message names the
resource and the field, e.g. "workload default/pod-a: address 0: 5 bytes,
expected 4 or 16". The updater turns those messages into the NACK.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable
from types import MappingProxyType
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from nodeagent.model import policy as pm
from nodeagent.model import routing as rm
from nodeagent.model import workload as wm
from nodeagent.model.constants import TYPE_URL_DESTINATION_RULE, TYPE_URL_VIRTUAL_SERVICE
from nodeagent.pb.istio.security import authorization_pb2 as auth_pb
from nodeagent.pb.istio.workload import workload_pb2 as workload_pb
from nodeagent.state import mcp

E = TypeVar("E", bound=enum.Enum)
M = TypeVar("M", bound=Message)

_MAX_PORT = 0xFFFF


class ConversionError(ValueError):
    """A resource is malformed; the message names the resource and the field."""


class _FieldError(ValueError):
    """Raised inside a converter; the caller prefixes the resource's label."""


# Enum lookups by number, built once: calling the Enum class per field is slow.
_ENUM_TABLES: dict[type[enum.Enum], dict[int, enum.Enum]] = {}


def _enum(kind: type[E], value: int, field: str) -> E:
    table = _ENUM_TABLES.get(kind)
    if table is None:
        table = _ENUM_TABLES[kind] = {m.value: m for m in kind}
    member = table.get(value)
    if member is None:
        raise _FieldError(f"{field}: unknown value {value}")
    return member  # type: ignore[return-value]


def _port(value: int, field: str, *, allow_zero: bool) -> int:
    low = 0 if allow_zero else 1
    if not low <= value <= _MAX_PORT:
        raise _FieldError(f"{field}: port {value} is outside {low}..{_MAX_PORT}")
    return value


def _ip(raw: bytes, field: str) -> wm.IPAddress:
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw)
    if len(raw) == 16:
        return ipaddress.IPv6Address(raw)
    raise _FieldError(f"{field}: {len(raw)} bytes, expected 4 or 16")


def _network_address(msg: workload_pb.NetworkAddress, field: str) -> wm.NetworkAddress:
    address = _ip(msg.address, f"{field}: address")
    length: int | None = None
    if msg.HasField("length"):
        length = msg.length
        if length > address.max_prefixlen:
            raise _FieldError(f"{field}: length {length} exceeds {address.max_prefixlen}")
    return wm.NetworkAddress(msg.network, address, length)


def _gateway(msg: workload_pb.GatewayAddress, field: str) -> wm.GatewayAddress:
    which = msg.WhichOneof("destination")
    destination: wm.NamespacedHostname | wm.NetworkAddress
    if which == "hostname":
        if not msg.hostname.hostname:
            raise _FieldError(f"{field}: hostname is empty")
        destination = wm.NamespacedHostname(msg.hostname.namespace, msg.hostname.hostname)
    elif which == "address":
        destination = _network_address(msg.address, f"{field}: address")
    else:
        raise _FieldError(f"{field}: neither hostname nor address is set")
    port = _port(msg.hbone_mtls_port, f"{field}: hbone_mtls_port", allow_zero=True)
    return wm.GatewayAddress(destination, port)


def _ports(msgs: Iterable[workload_pb.Port], field: str) -> tuple[wm.Port, ...]:
    out = []
    for i, msg in enumerate(msgs):
        where = f"{field} {i}"
        out.append(
            wm.Port(
                _port(msg.service_port, f"{where}: service_port", allow_zero=False),
                _port(msg.target_port, f"{where}: target_port", allow_zero=True),
                _enum(wm.AppProtocol, msg.app_protocol, f"{where}: app_protocol"),
            )
        )
    return tuple(out)


def _extensions(msgs: Iterable[workload_pb.Extension]) -> tuple[wm.Extension, ...]:
    return tuple(wm.Extension(m.name, m.config.type_url, m.config.value) for m in msgs)


def _parse(message: M, data: bytes, what: str) -> M:
    try:
        message.ParseFromString(data)
    except DecodeError as e:
        raise ConversionError(f"does not decode as {what}: {e}") from None
    return message


def address_from_bytes(name: str, data: bytes) -> wm.Workload | wm.Service:
    """Convert one `istio.workload.Address` resource named `name`."""
    msg = _parse(workload_pb.Address(), data, "istio.workload.Address")
    which = msg.WhichOneof("type")
    if which == "workload":
        return workload_from_pb(name, msg.workload)
    if which == "service":
        return service_from_pb(name, msg.service)
    raise ConversionError("address holds neither a workload nor a service")


def workload_from_pb(name: str, msg: workload_pb.Workload) -> wm.Workload:
    """Convert a Workload message; `name` is its xDS resource name (must equal uid)."""
    label = f"{msg.namespace}/{msg.name}" if msg.name else (msg.uid or name)
    try:
        return _workload(name, msg)
    except _FieldError as e:
        raise ConversionError(f"workload {label}: {e}") from None


def _workload(name: str, msg: workload_pb.Workload) -> wm.Workload:
    if not msg.uid:
        raise _FieldError("uid is empty")
    if name and name != msg.uid:
        # Removals name the uid, so a differently named resource could never be removed.
        raise _FieldError(f"resource name {name!r} differs from uid {msg.uid!r}")
    if not msg.namespace:
        raise _FieldError("namespace is empty")
    services: dict[str, tuple[wm.Port, ...]] = {}
    for key in sorted(msg.services):
        if "/" not in key:
            raise _FieldError(f"services: key {key!r} is not namespace/hostname")
        services[key] = _ports(msg.services[key].ports, f"services[{key}]: port")
    app_tunnel = None
    if msg.HasField("application_tunnel"):
        app_tunnel = wm.ApplicationTunnel(
            _enum(
                wm.ApplicationTunnelProtocol,
                msg.application_tunnel.protocol,
                "application_tunnel: protocol",
            ),
            _port(msg.application_tunnel.port, "application_tunnel: port", allow_zero=True),
        )
    locality = None
    if msg.HasField("locality"):
        locality = wm.Locality(msg.locality.region, msg.locality.zone, msg.locality.subzone)
    return wm.Workload(
        uid=msg.uid,
        name=msg.name,
        namespace=msg.namespace,
        addresses=tuple(_ip(raw, f"address {i}") for i, raw in enumerate(msg.addresses)),
        hostname=msg.hostname,
        network=msg.network,
        tunnel_protocol=_enum(wm.TunnelProtocol, msg.tunnel_protocol, "tunnel_protocol"),
        trust_domain=msg.trust_domain,
        service_account=msg.service_account,
        waypoint=_gateway(msg.waypoint, "waypoint") if msg.HasField("waypoint") else None,
        network_gateway=(
            _gateway(msg.network_gateway, "network_gateway")
            if msg.HasField("network_gateway")
            else None
        ),
        node=msg.node,
        canonical_name=msg.canonical_name,
        canonical_revision=msg.canonical_revision,
        workload_type=_enum(wm.WorkloadType, msg.workload_type, "workload_type"),
        workload_name=msg.workload_name,
        native_tunnel=msg.native_tunnel,
        application_tunnel=app_tunnel,
        services=MappingProxyType(services),
        authorization_policies=tuple(msg.authorization_policies),
        status=_enum(wm.WorkloadStatus, msg.status, "status"),
        cluster_id=msg.cluster_id,
        locality=locality,
        network_mode=_enum(wm.NetworkMode, msg.network_mode, "network_mode"),
        extensions=_extensions(msg.extensions),
        capacity=msg.capacity.value if msg.HasField("capacity") else None,
    )


def service_from_pb(name: str, msg: workload_pb.Service) -> wm.Service:
    """Convert a Service message; `name` is its xDS resource name (`namespace/hostname`)."""
    label = f"{msg.namespace}/{msg.hostname or msg.name}"
    try:
        return _service(name, msg)
    except _FieldError as e:
        raise ConversionError(f"service {label}: {e}") from None


def _service(name: str, msg: workload_pb.Service) -> wm.Service:
    if not msg.hostname:
        raise _FieldError("hostname is empty")
    if not msg.namespace:
        raise _FieldError("namespace is empty")
    key = f"{msg.namespace}/{msg.hostname}"
    if name and name != key:
        raise _FieldError(f"resource name {name!r} differs from namespace/hostname {key!r}")
    load_balancing = None
    if msg.HasField("load_balancing"):
        lb = msg.load_balancing
        load_balancing = wm.LoadBalancing(
            tuple(
                _enum(wm.LoadBalancingScope, s, f"load_balancing: routing_preference {i}")
                for i, s in enumerate(lb.routing_preference)
            ),
            _enum(wm.LoadBalancingMode, lb.mode, "load_balancing: mode"),
            _enum(wm.HealthPolicy, lb.health_policy, "load_balancing: health_policy"),
        )
    return wm.Service(
        name=msg.name,
        namespace=msg.namespace,
        hostname=msg.hostname,
        addresses=tuple(_network_address(a, f"address {i}") for i, a in enumerate(msg.addresses)),
        ports=_ports(msg.ports, "port"),
        subject_alt_names=tuple(msg.subject_alt_names),
        waypoint=_gateway(msg.waypoint, "waypoint") if msg.HasField("waypoint") else None,
        load_balancing=load_balancing,
        ip_families=_enum(wm.IPFamilies, msg.ip_families, "ip_families"),
        extensions=_extensions(msg.extensions),
        canonical=msg.canonical,
        ingress_use_waypoint=msg.ingress_use_waypoint,
        weighted_waypoints=tuple(
            wm.WeightedWaypoint(
                _gateway(w.destination, f"weighted_waypoint {i}: destination"), w.weight
            )
            for i, w in enumerate(msg.weighted_waypoints)
        ),
        visibility=_enum(wm.ServiceVisibility, msg.visibility, "visibility"),
    )


def authorization_from_bytes(name: str, data: bytes) -> pm.Authorization:
    """Convert one `istio.security.Authorization` resource named `name` (`namespace/name`)."""
    msg = _parse(auth_pb.Authorization(), data, "istio.security.Authorization")
    return authorization_from_pb(name, msg)


def authorization_from_pb(name: str, msg: auth_pb.Authorization) -> pm.Authorization:
    label = f"{msg.namespace}/{msg.name}"
    try:
        return _authorization(name, msg)
    except (_FieldError, pm.PolicyError) as e:
        raise ConversionError(f"authorization {label}: {e}") from None


def _authorization(name: str, msg: auth_pb.Authorization) -> pm.Authorization:
    if not msg.name:
        raise _FieldError("name is empty")
    key = f"{msg.namespace}/{msg.name}"
    if name and name != key:
        raise _FieldError(f"resource name {name!r} differs from namespace/name {key!r}")
    rules = []
    for r, rule in enumerate(msg.rules):
        clauses = []
        for c, clause in enumerate(rule.clauses):
            matches = tuple(
                _match(m, f"rule {r}: clause {c}: match {i}") for i, m in enumerate(clause.matches)
            )
            clauses.append(pm.Clause(matches))
        rules.append(pm.Rule(tuple(clauses)))
    return pm.Authorization(
        name=msg.name,
        namespace=msg.namespace,
        scope=_enum(pm.Scope, msg.scope, "scope"),
        action=_enum(pm.Action, msg.action, "action"),
        rules=tuple(rules),
        dry_run=msg.dry_run,
    )


def _string_matches(msgs: Iterable[auth_pb.StringMatch], field: str) -> tuple[pm.StringMatch, ...]:
    out = []
    for i, m in enumerate(msgs):
        which = m.WhichOneof("match_type")
        if which == "exact":
            out.append(pm.StringMatch.exact(m.exact))
        elif which == "prefix":
            out.append(pm.StringMatch.prefix(m.prefix))
        elif which == "suffix":
            out.append(pm.StringMatch.suffix(m.suffix))
        elif which == "presence":
            out.append(pm.StringMatch.presence())
        else:
            raise _FieldError(f"{field} {i}: no match type set")
    return tuple(out)


def _networks(msgs: Iterable[auth_pb.Address], field: str) -> tuple[pm.IPNetwork, ...]:
    out: list[pm.IPNetwork] = []
    for i, m in enumerate(msgs):
        where = f"{field} {i}"
        address = _ip(m.address, where)
        if m.length > address.max_prefixlen:
            raise _FieldError(f"{where}: length {m.length} exceeds {address.max_prefixlen}")
        # Host bits beyond the prefix are ignored, as a prefix match would.
        out.append(ipaddress.ip_network((address, m.length), strict=False))
    return tuple(out)


def _sa_matches(
    msgs: Iterable[auth_pb.ServiceAccountMatch],
) -> tuple[pm.ServiceAccountMatch, ...]:
    return tuple(pm.ServiceAccountMatch(m.namespace, m.serviceAccount) for m in msgs)


def _match_ports(values: Iterable[int], field: str) -> tuple[int, ...]:
    return tuple(_port(p, f"{field} {i}", allow_zero=True) for i, p in enumerate(values))


def _match(m: auth_pb.Match, where: str) -> pm.Match:
    return pm.Match(
        namespaces=_string_matches(m.namespaces, f"{where}: namespaces"),
        not_namespaces=_string_matches(m.not_namespaces, f"{where}: not_namespaces"),
        principals=_string_matches(m.principals, f"{where}: principals"),
        not_principals=_string_matches(m.not_principals, f"{where}: not_principals"),
        source_ips=_networks(m.source_ips, f"{where}: source_ips"),
        not_source_ips=_networks(m.not_source_ips, f"{where}: not_source_ips"),
        destination_ips=_networks(m.destination_ips, f"{where}: destination_ips"),
        not_destination_ips=_networks(m.not_destination_ips, f"{where}: not_destination_ips"),
        destination_ports=_match_ports(m.destination_ports, f"{where}: destination_ports"),
        not_destination_ports=_match_ports(
            m.not_destination_ports, f"{where}: not_destination_ports"
        ),
        service_accounts=_sa_matches(m.service_accounts),
        not_service_accounts=_sa_matches(m.not_service_accounts),
    )


def virtual_service_from_bytes(name: str, data: bytes) -> rm.VirtualService:
    """Convert one VirtualService resource (an istio.mcp.v1alpha1.Resource) named
    `namespace/name`: unwrap it, then read its spec as the YAML front end does."""
    envelope = _envelope(TYPE_URL_VIRTUAL_SERVICE, "virtualservice", name, data)
    try:
        return rm.parse_virtual_service(
            envelope.namespace, envelope.name, envelope.spec, envelope.annotations
        )
    except rm.RoutingSpecError as e:
        raise ConversionError(f"virtualservice {envelope.key}: {e}") from None


def destination_rule_from_bytes(name: str, data: bytes) -> rm.DestinationRule:
    """Convert one DestinationRule resource (an istio.mcp.v1alpha1.Resource) named
    `namespace/name`."""
    envelope = _envelope(TYPE_URL_DESTINATION_RULE, "destinationrule", name, data)
    try:
        return rm.parse_destination_rule(
            envelope.namespace, envelope.name, envelope.spec, envelope.annotations
        )
    except rm.RoutingSpecError as e:
        raise ConversionError(f"destinationrule {envelope.key}: {e}") from None


def _envelope(type_url: str, kind: str, name: str, data: bytes) -> mcp.ConfigEnvelope:
    try:
        return mcp.decode(type_url, name, data)
    except mcp.EnvelopeError as e:
        raise ConversionError(f"{kind} {name}: {e}") from None


def http_authorization_from_bytes(name: str, data: bytes) -> pm.HttpAuthorization:
    """Convert one AuthorizationPolicy resource (an istio.mcp.v1alpha1.Resource) named
    `namespace/name`, as the waypoint applies it."""
    envelope = _envelope(mcp.TYPE_URL_AUTHORIZATION_POLICY, "authorizationpolicy", name, data)
    try:
        return pm.parse_http_authorization(envelope.namespace, envelope.name, envelope.spec)
    except pm.PolicyError as e:
        raise ConversionError(f"authorizationpolicy {envelope.key}: {e}") from None
