"""Mesh file -> xDS resources (istio.workload.Address, istio.security.Authorization).

Each resource is keyed by its xDS name (workload uid, `namespace/hostname`,
`namespace/name`) and versioned by a hash of its serialized bytes, so an
unchanged resource is never re-sent and a client's `initial_resource_versions`
can be honoured across reconnects.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from google.protobuf import empty_pb2

from nodeagent.controlplane.mesh import MeshConfig, PolicySpec, RuleSpec, ServiceSpec, WorkloadSpec
from nodeagent.model.constants import TYPE_URL_ADDRESS, TYPE_URL_AUTHORIZATION
from nodeagent.pb.istio.security import authorization_pb2 as authorization_pb
from nodeagent.pb.istio.workload import workload_pb2 as workload_pb

_SPIFFE = "spiffe://"
S = TypeVar("S", ServiceSpec, PolicySpec)


@dataclass(frozen=True, slots=True)
class VersionedResource:
    version: str
    value: bytes
    """Serialized message: the Any.value; the Any type URL is the map's type URL."""


Snapshot = Mapping[str, Mapping[str, VersionedResource]]
"""{type_url: {resource name: resource}}."""


def versioned(value: bytes) -> VersionedResource:
    return VersionedResource(hashlib.sha256(value).hexdigest()[:16], value)


class _SelectorIndex(Generic[S]):
    """Candidates by (namespace, one selector label), so matching a workload
    costs its label count, not the number of services or policies."""

    def __init__(
        self, items: Iterable[S], selector: Callable[[S], Mapping[str, str] | None]
    ) -> None:
        self._by: dict[tuple[str, str, str], list[S]] = {}
        for item in items:
            sel = selector(item)
            if sel:
                k = min(sel)
                self._by.setdefault((item.namespace, k, sel[k]), []).append(item)

    def candidates(self, w: WorkloadSpec) -> list[S]:
        out: list[S] = []
        for k, v in w.labels.items():
            out.extend(self._by.get((w.namespace, k, v), ()))
        return out


def build_snapshot(mesh: MeshConfig) -> dict[str, dict[str, VersionedResource]]:
    """Every resource the mesh describes, by type URL and name."""
    addresses: dict[str, VersionedResource] = {}
    services = _SelectorIndex(mesh.services, lambda s: s.selector)
    policies_idx = _SelectorIndex(mesh.policies, lambda p: p.selector)
    for w in mesh.workloads:
        uid = w.effective_uid(mesh.cluster_id)
        msg = workload_pb.Address(
            workload=workload_message(mesh, w, services.candidates(w), policies_idx.candidates(w))
        )
        addresses[uid] = versioned(msg.SerializeToString(deterministic=True))
    for s in mesh.services:
        msg = workload_pb.Address(service=service_message(s))
        addresses[s.key] = versioned(msg.SerializeToString(deterministic=True))
    policies = {
        p.key: versioned(authorization_message(mesh, p).SerializeToString(deterministic=True))
        for p in mesh.policies
    }
    return {TYPE_URL_ADDRESS: addresses, TYPE_URL_AUTHORIZATION: policies}


def _ip_bytes(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


def workload_message(
    mesh: MeshConfig,
    w: WorkloadSpec,
    services: Iterable[ServiceSpec] | None = None,
    policies: Iterable[PolicySpec] | None = None,
) -> workload_pb.Workload:
    """The Workload of `w`; `services`/`policies` narrow the candidates to check."""
    services = mesh.services if services is None else services
    policies = mesh.policies if policies is None else policies
    msg = workload_pb.Workload(
        uid=w.effective_uid(mesh.cluster_id),
        name=w.name,
        namespace=w.namespace,
        addresses=[_ip_bytes(ip) for ip in w.ips],
        network=w.network,
        tunnel_protocol=workload_pb.HBONE,
        trust_domain=mesh.trust_domain,
        service_account=w.service_account,
        node=w.node,
        canonical_name=w.labels.get("app", w.name),
        canonical_revision=w.labels.get("version", "latest"),
        workload_type=workload_pb.POD,
        workload_name=w.name,
        cluster_id=mesh.cluster_id,
        authorization_policies=sorted({p.key for p in policies if p.selects(w)}),
    )
    for s in sorted(services, key=lambda s: s.key):
        if s.selects(w) and s.key not in msg.services:
            msg.services[s.key].ports.extend(
                workload_pb.Port(service_port=p.port, target_port=p.target_port) for p in s.ports
            )
    return msg


def service_message(s: ServiceSpec) -> workload_pb.Service:
    return workload_pb.Service(
        name=s.name,
        namespace=s.namespace,
        hostname=s.hostname,
        addresses=[workload_pb.NetworkAddress(address=_ip_bytes(v)) for v in s.vips],
        ports=[workload_pb.Port(service_port=p.port, target_port=p.target_port) for p in s.ports],
    )


def authorization_message(mesh: MeshConfig, p: PolicySpec) -> authorization_pb.Authorization:
    if p.selector:
        scope = authorization_pb.WORKLOAD_SELECTOR
    elif p.namespace == mesh.root_namespace:
        scope = authorization_pb.GLOBAL
    else:
        scope = authorization_pb.NAMESPACE
    return authorization_pb.Authorization(
        name=p.name,
        namespace=p.namespace,
        scope=scope,
        action=authorization_pb.DENY if p.action == "DENY" else authorization_pb.ALLOW,
        rules=[_rule(r) for r in p.rules],
    )


def _rule(r: RuleSpec) -> authorization_pb.Rule:
    # `from` entries are OR-ed (one clause of matches), `to` entries likewise;
    # the two clauses are AND-ed. An empty rule has no clauses and matches all.
    clauses = []
    if r.sources:
        clauses.append(
            authorization_pb.Clause(
                matches=[
                    authorization_pb.Match(
                        principals=[string_match(x, principal=True) for x in s.principals],
                        not_principals=[string_match(x, principal=True) for x in s.not_principals],
                        namespaces=[string_match(x) for x in s.namespaces],
                        not_namespaces=[string_match(x) for x in s.not_namespaces],
                        source_ips=[_cidr(x) for x in s.ip_blocks],
                        not_source_ips=[_cidr(x) for x in s.not_ip_blocks],
                    )
                    for s in r.sources
                ]
            )
        )
    if r.operations:
        clauses.append(
            authorization_pb.Clause(
                matches=[
                    authorization_pb.Match(
                        destination_ports=list(o.ports), not_destination_ports=list(o.not_ports)
                    )
                    for o in r.operations
                ]
            )
        )
    return authorization_pb.Rule(clauses=clauses)


def string_match(value: str, *, principal: bool = False) -> authorization_pb.StringMatch:
    """Istio's string matching: `*` = present, `x*` prefix, `*x` suffix, else exact."""
    if principal and value.startswith(_SPIFFE):
        value = value[len(_SPIFFE) :]
    if value == "*":
        return authorization_pb.StringMatch(presence=empty_pb2.Empty())
    if value.endswith("*"):
        return authorization_pb.StringMatch(prefix=value[:-1])
    if value.startswith("*"):
        return authorization_pb.StringMatch(suffix=value[1:])
    return authorization_pb.StringMatch(exact=value)


def _cidr(text: str) -> authorization_pb.Address:
    net = ipaddress.ip_network(text, strict=False)
    return authorization_pb.Address(address=net.network_address.packed, length=net.prefixlen)
