"""Mesh file -> xDS resources (istio.workload.Address, istio.security.Authorization, and
VirtualService / DestinationRule / waypoint AuthorizationPolicy in istiod's
istio.mcp.v1alpha1.Resource envelope).

AuthorizationPolicies are split as istiod splits them: those attached to a waypoint
(`targetRefs`, or a selector on a waypoint's gateway-name label) go to waypoints only,
whole, under `security.istio.io/v1/AuthorizationPolicy`; the others become ztunnel's
`istio.security.Authorization`, with HTTP attributes handled as istiod's ambient
converter handles them (pilot/pkg/serviceregistry/kube/controller/ambient/
authorization.go, handleRule): an ALLOW rule with any is omitted, a DENY rule keeps
only its L4 parts.

Each resource is keyed by its xDS name (workload uid, `namespace/hostname`,
`namespace/name`) and versioned by a hash of its serialized bytes, so an
unchanged resource is never re-sent and a client's `initial_resource_versions`
can be honoured across reconnects.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from nodeagent.controlplane.mesh import (
    GATEWAY_NAME,
    WAYPOINT_HBONE_PORT,
    ConditionSpec,
    MeshConfig,
    PolicySpec,
    RuleSpec,
    ServiceSpec,
    WorkloadSpec,
)
from nodeagent.model import policy as pm
from nodeagent.model import routing as rm
from nodeagent.model import workload as wm
from nodeagent.model.constants import (
    TYPE_URL_ADDRESS,
    TYPE_URL_AUTHORIZATION,
    TYPE_URL_DESTINATION_RULE,
    TYPE_URL_VIRTUAL_SERVICE,
)
from nodeagent.state import mcp
from nodeagent.state.encode import address_resource_name, address_to_pb, authorization_to_pb
from nodeagent.state.mcp import TYPE_URL_AUTHORIZATION_POLICY

log = logging.getLogger(__name__)

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
    workload_policies = [p for p in mesh.policies if not p.for_waypoint]
    policies_idx = _SelectorIndex(workload_policies, lambda p: p.selector)
    values: list[wm.Workload | wm.Service] = [
        workload_value(mesh, w, services.candidates(w), policies_idx.candidates(w))
        for w in mesh.workloads
    ]
    values += [service_value(s) for s in mesh.services]
    for value in values:
        msg = address_to_pb(value)
        addresses[address_resource_name(value)] = versioned(
            msg.SerializeToString(deterministic=True)
        )
    policies = {
        p.key: versioned(
            authorization_to_pb(authorization_value(mesh, p)).SerializeToString(deterministic=True)
        )
        for p in workload_policies
    }
    return {
        TYPE_URL_ADDRESS: addresses,
        TYPE_URL_AUTHORIZATION: policies,
        TYPE_URL_VIRTUAL_SERVICE: config_resources(TYPE_URL_VIRTUAL_SERVICE, mesh.virtual_services),
        TYPE_URL_DESTINATION_RULE: config_resources(
            TYPE_URL_DESTINATION_RULE, mesh.destination_rules
        ),
        TYPE_URL_AUTHORIZATION_POLICY: waypoint_policy_resources(
            p for p in mesh.policies if p.for_waypoint
        ),
    }


def waypoint_policy_resources(policies: Iterable[PolicySpec]) -> dict[str, VersionedResource]:
    """Waypoint AuthorizationPolicies as istiod's api generator serves config: named
    `namespace/name`, each an istio.mcp.v1alpha1.Resource around the spec."""
    out: dict[str, VersionedResource] = {}
    for p in policies:
        envelope = mcp.ConfigEnvelope(p.namespace, p.name, policy_spec(p))
        try:
            out[p.key] = versioned(mcp.encode(TYPE_URL_AUTHORIZATION_POLICY, envelope))
        except mcp.EnvelopeError as e:
            log.error("not serving AuthorizationPolicy %s: %s", p.key, e)
    return out


def policy_spec(p: PolicySpec) -> dict[str, Any]:
    """The policy's spec in Istio's JSON shape (what `kubectl get -o json` shows)."""
    spec: dict[str, Any] = {"action": p.action}
    if p.selector:
        spec["selector"] = {"matchLabels": dict(p.selector)}
    if p.target_refs:
        spec["targetRefs"] = [
            {
                k: v
                for k, v in (
                    ("group", t.group),
                    ("kind", t.kind),
                    ("name", t.name),
                    ("namespace", t.namespace),
                )
                if v
            }
            for t in p.target_refs
        ]
    spec["rules"] = [_rule_spec(r) for r in p.rules]
    return spec


def _rule_spec(r: RuleSpec) -> dict[str, Any]:
    def fields(pairs: Iterable[tuple[str, Iterable[Any]]]) -> dict[str, list[str]]:
        return {k: [str(v) for v in vs] for k, vs in pairs if vs}

    out: dict[str, Any] = {}
    if r.sources:
        out["from"] = [
            {
                "source": fields(
                    (
                        ("principals", s.principals),
                        ("notPrincipals", s.not_principals),
                        ("namespaces", s.namespaces),
                        ("notNamespaces", s.not_namespaces),
                        ("ipBlocks", s.ip_blocks),
                        ("notIpBlocks", s.not_ip_blocks),
                    )
                )
            }
            for s in r.sources
        ]
    if r.operations:
        out["to"] = [
            {
                "operation": fields(
                    (
                        ("hosts", o.hosts),
                        ("notHosts", o.not_hosts),
                        ("ports", o.ports),
                        ("notPorts", o.not_ports),
                        ("methods", o.methods),
                        ("notMethods", o.not_methods),
                        ("paths", o.paths),
                        ("notPaths", o.not_paths),
                    )
                )
            }
            for o in r.operations
        ]
    if r.conditions:
        out["when"] = [
            {"key": c.key, **fields((("values", c.values), ("notValues", c.not_values)))}
            for c in r.conditions
        ]
    return out


def config_resources(
    type_url: str, values: Iterable[rm.VirtualService | rm.DestinationRule]
) -> dict[str, VersionedResource]:
    """VirtualServices or DestinationRules as istiod's api generator serves them:
    named `namespace/name`, each an istio.mcp.v1alpha1.Resource."""
    out: dict[str, VersionedResource] = {}
    for value in values:
        spec, annotations = rm.to_wire(value)
        envelope = mcp.ConfigEnvelope(value.namespace, value.name, spec, annotations)
        try:
            out[value.key] = versioned(mcp.encode(type_url, envelope))
        except mcp.EnvelopeError as e:
            # The mesh file was validated; a spec that still does not fit the wire
            # form costs that resource only, and says so.
            log.error("not serving %s %s: %s", type_url, value.key, e)
    return out


# The mesh file becomes model values; state/encode.py is the one model -> xDS
# encoder (the same one tests and benches use), so the wire form has one author.


def workload_value(
    mesh: MeshConfig,
    w: WorkloadSpec,
    services: Iterable[ServiceSpec] | None = None,
    policies: Iterable[PolicySpec] | None = None,
) -> wm.Workload:
    """The Workload of `w`; `services`/`policies` narrow the candidates to check."""
    services = mesh.services if services is None else services
    policies = mesh.policies if policies is None else policies
    ports: dict[str, tuple[wm.Port, ...]] = {}
    for s in sorted(services, key=lambda s: s.key):
        if s.selects(w) and s.key not in ports:
            ports[s.key] = _ports(s)
    return wm.Workload(
        uid=w.effective_uid(mesh.cluster_id),
        name=w.name,
        namespace=w.namespace,
        addresses=tuple(ipaddress.ip_address(ip) for ip in w.ips),
        network=w.network,
        tunnel_protocol=wm.TunnelProtocol.HBONE,
        trust_domain=mesh.trust_domain,
        service_account=w.service_account,
        node=w.node,
        canonical_name=_first_label(w.labels, rm.CANONICAL_NAME_LABELS, w.name),
        canonical_revision=_first_label(w.labels, rm.CANONICAL_REVISION_LABELS, "latest"),
        workload_type=wm.WorkloadType.POD,
        workload_name=w.name,
        cluster_id=mesh.cluster_id,
        services=ports,
        authorization_policies=tuple(
            sorted({p.key for p in policies if p.selects(w) and not p.for_waypoint})
        ),
        waypoint=waypoint_address(w.waypoint),
        # A waypoint's pod terminates HBONE itself: agents neither capture it nor
        # listen in it (as istiod marks waypoints for ztunnel).
        native_tunnel=GATEWAY_NAME in w.labels,
    )


def _ports(s: ServiceSpec) -> tuple[wm.Port, ...]:
    return tuple(wm.Port(service_port=p.port, target_port=p.target_port) for p in s.ports)


def service_value(s: ServiceSpec) -> wm.Service:
    return wm.Service(
        name=s.name,
        namespace=s.namespace,
        hostname=s.hostname,
        addresses=tuple(wm.NetworkAddress("", ipaddress.ip_address(v)) for v in s.vips),
        ports=_ports(s),
        waypoint=waypoint_address(s.waypoint),
    )


def waypoint_address(key: str) -> wm.GatewayAddress | None:
    """The GatewayAddress istiod writes for a waypoint: its service by host name (the form
    ztunnel prefers: it follows the caller's IP family) and the HBONE port."""
    if not key:
        return None
    namespace, hostname = key.split("/", 1)
    return wm.GatewayAddress(wm.NamespacedHostname(namespace, hostname), WAYPOINT_HBONE_PORT)


def authorization_value(mesh: MeshConfig, p: PolicySpec) -> pm.Authorization:
    if p.selector:
        scope = pm.Scope.WORKLOAD_SELECTOR
    elif p.namespace == mesh.root_namespace:
        scope = pm.Scope.GLOBAL
    else:
        scope = pm.Scope.NAMESPACE
    return pm.Authorization(
        name=p.name,
        namespace=p.namespace,
        scope=scope,
        action=pm.Action.DENY if p.action == "DENY" else pm.Action.ALLOW,
        rules=tuple(
            rule
            for rule in (_rule(r, allow=p.action != "DENY") for r in p.rules)
            if rule is not None
        ),
    )


def _rule(r: RuleSpec, *, allow: bool = True) -> pm.Rule | None:
    """ztunnel's form of one rule, or None when istiod omits it: an ALLOW rule with HTTP
    attributes "never matches" for ztunnel, so it is left out (fewer requests allowed);
    a DENY rule loses its HTTP parts and so matches more (istiod's handleRule)."""
    if allow and r.http_fields:
        return None
    # `from` entries are OR-ed (one clause of matches), `to` entries likewise;
    # the two clauses are AND-ed. An empty rule has no clauses and matches all.
    clauses: list[pm.Clause] = []
    if r.sources:
        clauses.append(
            pm.Clause(
                tuple(
                    pm.Match(
                        principals=tuple(string_match(x, principal=True) for x in s.principals),
                        not_principals=tuple(
                            string_match(x, principal=True) for x in s.not_principals
                        ),
                        namespaces=tuple(string_match(x) for x in s.namespaces),
                        not_namespaces=tuple(string_match(x) for x in s.not_namespaces),
                        source_ips=tuple(_cidr(x) for x in s.ip_blocks),
                        not_source_ips=tuple(_cidr(x) for x in s.not_ip_blocks),
                    )
                    for s in r.sources
                )
            )
        )
    if r.operations:
        to = tuple(
            pm.Match(destination_ports=tuple(o.ports), not_destination_ports=tuple(o.not_ports))
            for o in r.operations
        )
        # An operation left without fields (only HTTP ones were written) holds for every
        # connection in ztunnel; the engine skips empty matches, so the clause is dropped.
        if not any(m.is_empty for m in to):
            clauses.append(pm.Clause(to))
    # Each L4 `when` condition is one more AND-ed clause (istiod's whenMatch); an HTTP key
    # becomes an empty match there, which always holds: no clause.
    clauses.extend(
        pm.Clause((_when_match(c),)) for c in r.conditions if c.key in pm.L4_CONDITION_KEYS
    )
    return pm.Rule(tuple(clauses))


def _when_match(c: ConditionSpec) -> pm.Match:
    key, values, nots = c.key, c.values, c.not_values
    if key == "source.namespace":
        return pm.Match(
            namespaces=tuple(string_match(v) for v in values),
            not_namespaces=tuple(string_match(v) for v in nots),
        )
    if key == "source.principal":
        return pm.Match(
            principals=tuple(string_match(v, principal=True) for v in values),
            not_principals=tuple(string_match(v, principal=True) for v in nots),
        )
    if key == "source.ip":
        return pm.Match(
            source_ips=tuple(_cidr(v) for v in values),
            not_source_ips=tuple(_cidr(v) for v in nots),
        )
    if key == "destination.ip":
        return pm.Match(
            destination_ips=tuple(_cidr(v) for v in values),
            not_destination_ips=tuple(_cidr(v) for v in nots),
        )
    return pm.Match(  # destination.port
        destination_ports=tuple(int(v) for v in values),
        not_destination_ports=tuple(int(v) for v in nots),
    )


def string_match(value: str, *, principal: bool = False) -> pm.StringMatch:
    """Istio's string matching: `*` = present, `x*` prefix, `*x` suffix, else exact."""
    if principal and value.startswith(_SPIFFE):
        value = value[len(_SPIFFE) :]
    if value == "*":
        return pm.StringMatch.presence()
    if value.endswith("*"):
        return pm.StringMatch.prefix(value[:-1])
    if value.startswith("*"):
        return pm.StringMatch.suffix(value[1:])
    return pm.StringMatch.exact(value)


def _cidr(text: str) -> pm.IPNetwork:
    return ipaddress.ip_network(text, strict=False)


def _first_label(labels: Mapping[str, str], keys: tuple[str, ...], default: str) -> str:
    return next((labels[k] for k in keys if k in labels), default)


# --- an edit: rebuild only what it touched -----------------------------------------

Changes = Mapping[str, frozenset[str]]
"""{type_url: names upserted or removed}; a type absent did not change."""

# Past this many changed services or policies, finding the workloads they select one by
# one costs more than building everything again.
_INCREMENTAL_SELECTOR_LIMIT = 50


def update_snapshot(
    old: MeshConfig, base: Snapshot, new: MeshConfig
) -> tuple[dict[str, dict[str, VersionedResource]], Changes]:
    """The snapshot of `new`, given `base` = build_snapshot(old), and the names that
    differ. Only resources whose inputs changed are built again: a workload that
    changed, or that a changed service or policy selects (before or after the edit),
    a changed service, a changed policy. Config kinds are few and built again when any
    of their kind changed. Equal to build_snapshot(new), by construction and by test."""
    if (old.trust_domain, old.cluster_id, old.root_namespace) != (
        new.trust_domain,
        new.cluster_id,
        new.root_namespace,
    ):
        return _rebuilt(base, build_snapshot(new))
    services = _changed_by_key(old.services, new.services)
    policies = _changed_by_key(
        (p for p in old.policies if not p.for_waypoint),
        (p for p in new.policies if not p.for_waypoint),
    )
    if len(services) + len(policies) > _INCREMENTAL_SELECTOR_LIMIT:
        return _rebuilt(base, build_snapshot(new))
    snapshot: dict[str, dict[str, VersionedResource]] = {}
    changes: dict[str, frozenset[str]] = {}
    snapshot[TYPE_URL_ADDRESS], changed = _updated_addresses(
        old, base.get(TYPE_URL_ADDRESS, {}), new, services, policies
    )
    if changed:
        changes[TYPE_URL_ADDRESS] = changed
    authz = dict(base.get(TYPE_URL_AUTHORIZATION, {}))
    for key, (_, policy) in policies.items():
        if policy is None:
            authz.pop(key, None)
        else:
            msg = authorization_to_pb(authorization_value(new, policy))
            authz[key] = versioned(msg.SerializeToString(deterministic=True))
    snapshot[TYPE_URL_AUTHORIZATION] = authz
    if policies:
        changes[TYPE_URL_AUTHORIZATION] = frozenset(policies)
    waypoint_policies = (
        tuple(p for p in old.policies if p.for_waypoint),
        tuple(p for p in new.policies if p.for_waypoint),
    )
    configs: list[tuple[str, bool, Callable[[], dict[str, VersionedResource]]]] = [
        (
            TYPE_URL_VIRTUAL_SERVICE,
            old.virtual_services == new.virtual_services,
            lambda: config_resources(TYPE_URL_VIRTUAL_SERVICE, new.virtual_services),
        ),
        (
            TYPE_URL_DESTINATION_RULE,
            old.destination_rules == new.destination_rules,
            lambda: config_resources(TYPE_URL_DESTINATION_RULE, new.destination_rules),
        ),
        (
            TYPE_URL_AUTHORIZATION_POLICY,
            waypoint_policies[0] == waypoint_policies[1],
            lambda: waypoint_policy_resources(waypoint_policies[1]),
        ),
    ]
    for type_url, same, build in configs:
        previous = base.get(type_url, {})
        if same:
            snapshot[type_url] = dict(previous)
        else:
            snapshot[type_url] = built = build()
            changes[type_url] = _differing(previous, built)
    return snapshot, changes


def _updated_addresses(
    old: MeshConfig,
    base: Mapping[str, VersionedResource],
    new: MeshConfig,
    services: Mapping[str, tuple[ServiceSpec | None, ServiceSpec | None]],
    policies: Mapping[str, tuple[PolicySpec | None, PolicySpec | None]],
) -> tuple[dict[str, VersionedResource], frozenset[str]]:
    """The Address resources of `new` and the names changed, given `base` of `old`."""
    old_workloads = {w.key: w for w in old.workloads}
    new_workloads = {w.key: w for w in new.workloads}
    touched = {
        k for k, w in new_workloads.items() if (was := old_workloads.get(k)) is not w and was != w
    }
    selectors: list[ServiceSpec | PolicySpec] = [
        s for pair in services.values() for s in pair if s is not None
    ]
    selectors += [p for pair in policies.values() for p in pair if p is not None]
    if selectors:
        touched.update(w.key for w in new.workloads if any(s.selects(w) for s in selectors))
    addresses = dict(base)
    changed: set[str] = set()
    # Every old name of a removed or touched workload goes first: a touched one is put
    # back under its (possibly new) uid below, whatever order the upserts come in.
    for key in (old_workloads.keys() - new_workloads.keys()) | (touched & old_workloads.keys()):
        changed.add(old_workloads[key].effective_uid(old.cluster_id))
    changed.update(was.key for was, now in services.values() if was is not None and now is None)
    for name in changed:
        addresses.pop(name, None)
    values: list[wm.Workload | wm.Service] = []
    if touched:
        svc_idx = _SelectorIndex(new.services, lambda s: s.selector)
        pol_idx = _SelectorIndex(
            [p for p in new.policies if not p.for_waypoint], lambda p: p.selector
        )
        for key in touched:
            w = new_workloads[key]
            values.append(workload_value(new, w, svc_idx.candidates(w), pol_idx.candidates(w)))
    values += [service_value(now) for _, now in services.values() if now is not None]
    for value in values:
        name = address_resource_name(value)
        addresses[name] = versioned(address_to_pb(value).SerializeToString(deterministic=True))
        changed.add(name)
    return addresses, frozenset(changed)


def _changed_by_key(old: Iterable[S], new: Iterable[S]) -> dict[str, tuple[S | None, S | None]]:
    """{key: (before, after)} for every item added, removed or different."""
    before = {x.key: x for x in old}
    after = {x.key: x for x in new}
    return {
        k: (before.get(k), after.get(k))
        for k in before.keys() | after.keys()
        if before.get(k) is not after.get(k) and before.get(k) != after.get(k)
    }


def _differing(
    old: Mapping[str, VersionedResource], new: Mapping[str, VersionedResource]
) -> frozenset[str]:
    return frozenset(
        n for n in old.keys() | new.keys() if (a := old.get(n)) is None or a != new.get(n)
    )


def _rebuilt(
    base: Snapshot, snapshot: dict[str, dict[str, VersionedResource]]
) -> tuple[dict[str, dict[str, VersionedResource]], Changes]:
    changes = {
        t: diff
        for t in base.keys() | snapshot.keys()
        if (diff := _differing(base.get(t, {}), snapshot.get(t, {})))
    }
    return snapshot, changes
