"""The mesh file: a YAML description of nodes, workloads, services and policies.

`load_mesh(path)` parses and validates the whole file into a frozen `MeshConfig`
or raises `MeshError` naming the file, line and field that is wrong, so the
control plane can refuse a bad edit and keep serving the last good config.
The schema is documented in docs/mesh-file.md.

Besides the schema, the file is refused when it is almost certainly a mistake
that would take pods out of the mesh: an empty file (a truncated one, typically),
no `nodes`, a workload outside its node's `podCIDRs`. `check_reload` adds the
rule only a running server can apply: an edit may not take every workload away
from a node whose agent is connected. Emptiness is accepted only when written
out (`nodes: []`, `workloads: []`, a node's `allowEmpty: true`), and each such
acceptance comes back as a note for the server to log.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import itertools
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml

from nodeagent.model.constants import DEFAULT_SERVICE_ACCOUNT, DEFAULT_TRUST_DOMAIN
from nodeagent.model.httproute import API_VERSIONS as HTTPROUTE_VERSIONS
from nodeagent.model.httproute import GROUP as HTTPROUTE_GROUP
from nodeagent.model.httproute import KIND as HTTPROUTE_KIND
from nodeagent.model.httproute import parse_http_route
from nodeagent.model.identity import Identity
from nodeagent.model.policy import L4_CONDITION_KEYS, Condition, PolicyError, check_path
from nodeagent.model.routing import (
    API_VERSIONS,
    GROUP,
    DestinationRule,
    RoutingSpecError,
    VirtualService,
    parse_destination_rule,
    parse_virtual_service,
    resolve_host,
)
from nodeagent.model.yamlfile import (
    YamlSyntaxError,
    compose_yaml,
    construct,
    decode_yaml_bytes,
    locate_node,
)

T = TypeVar("T")

ACTIONS = ("ALLOW", "DENY")

# Istio's waypoint labels (istio/istio pilot/pkg/serviceregistry/kube/controller/ambient).
USE_WAYPOINT = "istio.io/use-waypoint"  # on a service, workload or namespace: NAME, or "none"
USE_WAYPOINT_NAMESPACE = "istio.io/use-waypoint-namespace"  # the waypoint's, when elsewhere
WAYPOINT_FOR = "istio.io/waypoint-for"  # on the waypoint's service: service|workload|all|none
GATEWAY_NAME = "gateway.networking.k8s.io/gateway-name"  # on a waypoint's pods: its NAME
WAYPOINT_FOR_VALUES = ("service", "workload", "all", "none")
WAYPOINT_HBONE_PORT = 15008


class MeshError(ValueError):
    """The mesh file is invalid; the message is `FILE:LINE:COL: FIELD: problem`."""


@dataclass(frozen=True, kw_only=True)
class NodeSpec:
    name: str
    token: str
    pod_cidrs: tuple[str, ...] = ()
    """The node's pod ranges; when given, every workload on the node must be inside."""
    allow_empty: bool = False
    """The node may be left without workloads while its agent is connected."""
    where: str = field(default="", compare=False)
    """`FILE:LINE:COL` of the node's entry, for errors found after parsing."""


@dataclass(frozen=True, kw_only=True)
class WorkloadSpec:
    name: str
    namespace: str
    node: str
    ips: tuple[str, ...]
    service_account: str = DEFAULT_SERVICE_ACCOUNT
    labels: Mapping[str, str] = field(default_factory=dict)
    uid: str = ""
    network: str = ""
    waypoint: str = ""
    """`namespace/hostname` of the waypoint's service (resolved from the labels)."""

    @functools.cached_property
    def key(self) -> str:
        # Cached: an edit's checks and diff ask it of every workload several times.
        return f"{self.namespace}/{self.name}"

    def effective_uid(self, cluster_id: str) -> str:
        return self.uid or f"{cluster_id}//Pod/{self.namespace}/{self.name}"


@dataclass(frozen=True, kw_only=True)
class ServicePort:
    port: int
    target_port: int


@dataclass(frozen=True, kw_only=True)
class ServiceSpec:
    name: str
    namespace: str
    hostname: str
    vips: tuple[str, ...]
    ports: tuple[ServicePort, ...]
    selector: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    waypoint: str = ""
    """`namespace/hostname` of the waypoint's service (resolved from the labels)."""

    @functools.cached_property
    def key(self) -> str:
        """xDS resource name of the service: `namespace/hostname`."""
        return f"{self.namespace}/{self.hostname}"

    def selects(self, workload: WorkloadSpec) -> bool:
        # An empty selector selects nothing (like a Kubernetes Service without one).
        return (
            bool(self.selector)
            and workload.namespace == self.namespace
            and all(workload.labels.get(k) == v for k, v in self.selector.items())
        )


@dataclass(frozen=True, kw_only=True)
class SourceSpec:
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class OperationSpec:
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    # HTTP fields, as written: only a waypoint can apply them.
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()

    @property
    def http_fields(self) -> tuple[str, ...]:
        """The HTTP fields set, by their YAML names (istiod's httpOperations)."""
        return tuple(
            name
            for name, values in (
                ("hosts", self.hosts),
                ("notHosts", self.not_hosts),
                ("methods", self.methods),
                ("notMethods", self.not_methods),
                ("paths", self.paths),
                ("notPaths", self.not_paths),
            )
            if values
        )


@dataclass(frozen=True, kw_only=True)
class ConditionSpec:
    """One `when` entry, checked by the model (`Condition.parse`)."""

    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class RuleSpec:
    sources: tuple[SourceSpec, ...] = ()
    operations: tuple[OperationSpec, ...] = ()
    conditions: tuple[ConditionSpec, ...] = ()

    @property
    def http_fields(self) -> tuple[str, ...]:
        """HTTP fields and `when` keys of this rule that ztunnel cannot check."""
        found = [f for o in self.operations for f in o.http_fields]
        found += [c.key for c in self.conditions if c.key not in L4_CONDITION_KEYS]
        return tuple(dict.fromkeys(found))


@dataclass(frozen=True, kw_only=True)
class TargetRefSpec:
    kind: str
    name: str
    group: str = ""
    namespace: str = ""


@dataclass(frozen=True, kw_only=True)
class PolicySpec:
    name: str
    namespace: str
    action: str = "ALLOW"
    selector: Mapping[str, str] | None = None
    """matchLabels; None (or empty) means the whole namespace."""
    rules: tuple[RuleSpec, ...] = ()
    target_refs: tuple[TargetRefSpec, ...] = ()
    """`targetRefs` (or the older `targetRef`): attached to a waypoint, not to workloads."""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def for_waypoint(self) -> bool:
        """Attached to a waypoint: by targetRefs (istiod never sends those to ztunnel), or
        by a selector on the gateway-name label of a waypoint's pods. Served to waypoints
        only; the node agents neither get nor enforce it."""
        return bool(self.target_refs) or GATEWAY_NAME in (self.selector or {})

    @property
    def needs_waypoint(self) -> tuple[str, ...]:
        """For a workload policy: `spec.rules[i] (fields)` per rule with HTTP attributes,
        and what ztunnel's conversion does with it (istiod ambient/authorization.go)."""
        if self.for_waypoint:
            return ()
        what = (
            "DENY rule enforced without its HTTP parts (more restrictive than written)"
            if self.action == "DENY"
            else "ALLOW rule omitted (more restrictive than written)"
        )
        return tuple(
            f"spec.rules[{i}] ({', '.join(rule.http_fields)}): {what}"
            for i, rule in enumerate(self.rules)
            if rule.http_fields
        )

    def selects(self, workload: WorkloadSpec) -> bool:
        return (
            bool(self.selector)
            and workload.namespace == self.namespace
            and all(workload.labels.get(k) == v for k, v in (self.selector or {}).items())
        )


@dataclass(frozen=True, kw_only=True)
class NamespaceSpec:
    """A namespace's labels (only `istio.io/use-waypoint` means something today)."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class MeshConfig:
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    root_namespace: str = "istio-system"
    cluster_id: str = "Kubernetes"
    nodes: tuple[NodeSpec, ...] = ()
    namespaces: tuple[NamespaceSpec, ...] = ()
    workloads: tuple[WorkloadSpec, ...] = ()
    services: tuple[ServiceSpec, ...] = ()
    policies: tuple[PolicySpec, ...] = ()
    virtual_services: tuple[VirtualService, ...] = ()
    destination_rules: tuple[DestinationRule, ...] = ()
    workloads_explicitly_empty: bool = False
    """`workloads: []` was written: every node may be left without workloads."""
    where: Mapping[str, str] = field(default_factory=dict, compare=False)
    """`FILE:LINE:COL` of each top-level key given, and "" for the file itself."""
    notes: tuple[str, ...] = field(default=(), compare=False)
    """Emptiness the file asks for explicitly and was accepted (for the log)."""

    def locate(self, key: str = "") -> str:
        return self.where.get(key) or self.where.get("", "<mesh>")

    def node_for_token(self, token: str) -> str | None:
        """The node whose agent presents this bearer token (the CA's node authorizer)."""
        if not token:
            return None
        for n in self.nodes:
            if n.token == token:
                return n.name
        return None

    def identities_on_node(self, node: str) -> set[Identity]:
        """SPIFFE identities of the workloads scheduled on `node`."""
        return {
            Identity.for_workload(self.trust_domain, w.namespace, w.service_account)
            for w in self.workloads
            if w.node == node
        }


# --- reading -----------------------------------------------------------------

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_NULL = "tag:yaml.org,2002:null"
_BOOL = "tag:yaml.org,2002:bool"


class _Reader:
    """Walks the composed YAML node tree, checking types and naming positions."""

    def __init__(self, source: str) -> None:
        self.source = source

    def where(self, node: yaml.Node) -> str:
        m = node.start_mark
        return f"{self.source}:{m.line + 1}:{m.column + 1}"

    def error(self, node: yaml.Node | None, path: str, problem: str) -> MeshError:
        if node is None:
            return MeshError(f"{self.source}: {path}: {problem}")
        return MeshError(f"{self.where(node)}: {path}: {problem}")

    def mapping(
        self, node: yaml.Node, path: str, required: tuple[str, ...], optional: tuple[str, ...]
    ) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, path, f"expected a mapping, got {_kind(node)}")
        out: dict[str, yaml.Node] = {}
        allowed = required + optional
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode) or k.tag != _STR:
                raise self.error(k, path, "mapping keys must be strings")
            sub = _join(path, k.value)
            if k.value in out:
                raise self.error(k, sub, "duplicate key")
            if k.value not in allowed:
                raise self.error(k, sub, f"unknown field (allowed: {', '.join(allowed)})")
            out[k.value] = v
        for r in required:
            if r not in out or _is_null(out[r]):
                raise self.error(node, _join(path, r), "required field is missing")
        return {k: v for k, v in out.items() if not _is_null(v)}

    def sequence(self, node: yaml.Node, path: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(node, path, f"expected a list, got {_kind(node)}")
        return list(node.value)

    def string(self, node: yaml.Node, path: str, *, nonempty: bool = True) -> str:
        if not isinstance(node, yaml.ScalarNode) or node.tag != _STR:
            raise self.error(node, path, f"expected a string, got {_kind(node)}")
        if nonempty and not node.value:
            raise self.error(node, path, "must not be empty")
        return str(node.value)

    def integer(self, node: yaml.Node, path: str, lo: int, hi: int) -> int:
        value: int | None = None
        if isinstance(node, yaml.ScalarNode):
            if node.tag == _INT:
                # YAML 1.1 also tags sexagesimal `1:30` as an int; int() refuses those.
                with contextlib.suppress(ValueError):
                    value = int(node.value.replace("_", ""), 0)
            elif node.tag == _STR and node.value.isdigit():
                # Istio's AuthorizationPolicy writes ports as strings.
                value = int(node.value)
        if value is None:
            raise self.error(node, path, f"expected an integer, got {_kind(node)}")
        if not lo <= value <= hi:
            raise self.error(node, path, f"{value} is out of range {lo}..{hi}")
        return value

    def boolean(self, node: yaml.Node, path: str) -> bool:
        if not isinstance(node, yaml.ScalarNode) or node.tag != _BOOL:
            raise self.error(node, path, f"expected true or false, got {_kind(node)}")
        return str(node.value).lower() in ("true", "yes", "on")

    def labels(self, node: yaml.Node, path: str) -> dict[str, str]:
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, path, f"expected a mapping, got {_kind(node)}")
        out: dict[str, str] = {}
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode) or not k.value:
                raise self.error(k, path, "label keys must be non-empty strings")
            if not isinstance(v, yaml.ScalarNode):
                raise self.error(v, _join(path, k.value), f"expected a string, got {_kind(v)}")
            if k.value in out:
                raise self.error(k, _join(path, k.value), "duplicate key")
            out[str(k.value)] = str(v.value)
        return out

    def strings(self, node: yaml.Node, path: str) -> tuple[str, ...]:
        return tuple(
            self.string(n, f"{path}[{i}]") for i, n in enumerate(self.sequence(node, path))
        )

    def items(
        self, node: yaml.Node, path: str, read: Callable[[yaml.Node, str], T]
    ) -> list[tuple[yaml.Node, T]]:
        return [(n, read(n, f"{path}[{i}]")) for i, n in enumerate(self.sequence(node, path))]

    def ip(self, node: yaml.Node, path: str) -> str:
        text = self.string(node, path)
        try:
            return str(ipaddress.ip_address(text))
        except ValueError:
            raise self.error(node, path, f"{text!r} is not an IP address") from None

    def cidr(self, node: yaml.Node, path: str) -> str:
        text = self.string(node, path)
        try:
            return str(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise self.error(node, path, f"{text!r} is not an IP address or CIDR") from None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == _NULL


def _child(node: yaml.Node, key: str) -> yaml.Node | None:
    """The value node of `key` in a mapping node, if there."""
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return v
    return None


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    tag = node.tag.rsplit(":", 1)[-1]
    return f"{tag} {node.value!r}"


def load_mesh(path: str | Path) -> MeshConfig:
    """Read and validate a mesh file; raise MeshError naming file, line and field."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise MeshError(f"{p}: cannot read: {e.strerror or e}") from None
    try:
        text = decode_yaml_bytes(raw, str(p))
    except YamlSyntaxError as e:
        raise MeshError(str(e)) from None
    return parse_mesh(text, str(p))


def parse_mesh(text: str, source: str = "<mesh>") -> MeshConfig:
    """Validate mesh YAML text (see load_mesh)."""
    try:
        root = compose_yaml(text, source)
    except YamlSyntaxError as e:
        raise MeshError(str(e)) from None
    return mesh_from_tree(root, source)


EntryMemo = dict[int, tuple[yaml.Node, Any]]
"""An entry's validated value by its node's id (the node is kept so the id stays its)."""


def mesh_from_tree(
    root: yaml.Node | None, source: str, memo: EntryMemo | None = None
) -> MeshConfig:
    """Validate a composed mesh file. An entry (a workload, a service, ...) whose node is
    in `memo` is not read again (a node is not changed once composed, so its value
    stands); an entry read is added to it. The checks across entries (unique names and
    IPs, references, waypoints) always run whole."""
    r = _Reader(source)
    if root is None or _is_null(root):
        # What a truncated file looks like (`: > mesh.yaml`, an editor's save):
        # serving it would take every pod out of the mesh.
        raise MeshError(
            f"{source}:1:1: nodes: the file is empty (truncated?); "
            "write `nodes: []` to serve an empty mesh on purpose"
        )
    top = r.mapping(
        root,
        "",
        (),
        (
            "meshConfig",
            "nodes",
            "namespaces",
            "workloads",
            "services",
            "authorizationPolicies",
            "virtualServices",
            "destinationRules",
            "httpRoutes",
        ),
    )
    where = {"": r.where(root)}
    for k, _ in root.value:
        where[str(k.value)] = r.where(k)
    mesh_kw: dict[str, Any] = {}
    if "meshConfig" in top:
        mc = r.mapping(
            top["meshConfig"], "meshConfig", (), ("trustDomain", "rootNamespace", "clusterId")
        )
        if "trustDomain" in mc:
            mesh_kw["trust_domain"] = r.string(mc["trustDomain"], "meshConfig.trustDomain")
        if "rootNamespace" in mc:
            mesh_kw["root_namespace"] = r.string(mc["rootNamespace"], "meshConfig.rootNamespace")
        if "clusterId" in mc:
            mesh_kw["cluster_id"] = r.string(mc["clusterId"], "meshConfig.clusterId")

    def items(key: str, read: Callable[[yaml.Node, str], T]) -> list[tuple[yaml.Node, T]]:
        if key not in top:
            return []
        return r.items(top[key], key, _memoized(read, memo))

    nodes = items("nodes", lambda n, p: _node(r, n, p))
    namespaces = items("namespaces", lambda n, p: _namespace(r, n, p))
    workloads = items("workloads", lambda n, p: _workload(r, n, p))
    services = items("services", lambda n, p: _service(r, n, p))
    policies = items("authorizationPolicies", lambda n, p: _policy(r, n, p))
    virtual_services = items("virtualServices", lambda n, p: _routing(r, n, p, _VS))
    destination_rules = items("destinationRules", lambda n, p: _routing(r, n, p, _DR))
    # Gateway API HTTPRoutes become VirtualServices (as istiod converts them), served alike.
    http_routes = items("httpRoutes", lambda n, p: _http_route(r, n, p))
    converted = [(n, vs) for n, group in http_routes for vs in group]
    _check_unique(r, "nodes", nodes, lambda s: s.name, "name")
    _check_unique(r, "nodes", nodes, lambda s: s.token, "token")
    _check_pod_ranges_apart(r, nodes)
    node_specs = {s.name: s for _, s in nodes}
    _check_unique(r, "workloads", workloads, lambda s: s.key, "name")
    _check_unique(r, "workloads", workloads, lambda s: s.uid or None, "uid")
    seen_ips: dict[tuple[str, str], str] = {}
    for i, (n, w) in enumerate(workloads):
        if w.node not in node_specs:
            raise r.error(n, f"workloads[{i}].node", f"node {w.node!r} is not declared in nodes")
        for ip in w.ips:
            other = seen_ips.setdefault((w.network, ip), w.key)
            if other != w.key:
                raise r.error(n, f"workloads[{i}].ip", f"{ip} is already used by workload {other}")
        _check_in_pod_range(r, n, f"workloads[{i}]", w, node_specs)
    _check_unique(r, "services", services, lambda s: s.key, "name/hostname")
    seen_vips: dict[str, str] = {}
    for i, (n, s) in enumerate(services):
        for vip in s.vips:
            other = seen_vips.setdefault(vip, s.key)
            if other != s.key:
                raise r.error(n, f"services[{i}].vip", f"{vip} is already used by service {other}")
    _check_unique(r, "namespaces", namespaces, lambda s: s.name, "name")
    workloads, services = _place_behind_waypoints(r, namespaces, workloads, services)
    _check_unique(r, "authorizationPolicies", policies, lambda s: s.key, "metadata.name")
    _check_unique(r, "virtualServices", virtual_services, lambda s: s.key, "metadata.name")
    _check_unique(r, "destinationRules", destination_rules, lambda s: s.key, "metadata.name")
    _check_unique(r, "httpRoutes", http_routes, lambda s: s[0].key if s else None, "metadata.name")
    _check_routing_references(
        r,
        {s.hostname for _, s in services},
        [(n, vs) for n, vs in virtual_services if isinstance(vs, VirtualService)],
        [(n, dr) for n, dr in destination_rules if isinstance(dr, DestinationRule)],
        converted,
    )
    notes = _check_emptiness(r, root, top, nodes, workloads, where)
    return MeshConfig(
        **mesh_kw,
        nodes=tuple(s for _, s in nodes),
        namespaces=tuple(s for _, s in namespaces),
        workloads=tuple(s for _, s in workloads),
        services=tuple(s for _, s in services),
        policies=tuple(s for _, s in policies),
        virtual_services=tuple(s for _, s in virtual_services if isinstance(s, VirtualService))
        + tuple(vs for _, vs in converted),
        destination_rules=tuple(s for _, s in destination_rules if isinstance(s, DestinationRule)),
        workloads_explicitly_empty=_explicit_empty_list(top.get("workloads")),
        where=where,
        notes=notes,
    )


def _memoized(
    read: Callable[[yaml.Node, str], T], memo: EntryMemo | None
) -> Callable[[yaml.Node, str], T]:
    """`read`, answered from `memo` for a node already read, recording a new one there."""
    if memo is None:
        return read

    def memoized(node: yaml.Node, path: str) -> T:
        hit = memo.get(id(node))
        if hit is not None and hit[0] is node:
            value: T = hit[1]
        else:
            value = read(node, path)
            memo[id(node)] = (node, value)
        return value

    return memoized


def _explicit_empty_list(node: yaml.Node | None) -> bool:
    return isinstance(node, yaml.SequenceNode) and not node.value


def _check_emptiness(
    r: _Reader,
    root: yaml.Node,
    top: dict[str, yaml.Node],
    nodes: list[tuple[yaml.Node, NodeSpec]],
    workloads: list[tuple[yaml.Node, WorkloadSpec]],
    where: Mapping[str, str],
) -> tuple[str, ...]:
    """Refuse a mesh without nodes unless `nodes: []` says so; the accepted
    emptiness, one note each."""
    notes: list[str] = []
    if not nodes:
        if not _explicit_empty_list(top.get("nodes")):
            # Missing, or `nodes:` with nothing after it (a file cut short).
            at = _child(root, "nodes") or root
            raise r.error(
                at, "nodes", "no nodes declared; write `nodes: []` to serve no nodes on purpose"
            )
        notes.append(f"{where['nodes']}: nodes: [] given: serving no nodes")
    elif _explicit_empty_list(top.get("workloads")):
        notes.append(f"{where['workloads']}: workloads: [] given: serving no workloads")
    count = Counter(w.node for _, w in workloads)
    for i, (n, s) in enumerate(nodes):
        if s.allow_empty and count[s.name]:
            # A stale flag would let a later edit (or a truncation) empty the node unseen.
            raise r.error(
                _child(n, "allowEmpty") or n,
                f"nodes[{i}].allowEmpty",
                f"node {s.name} has {count[s.name]} workload(s); "
                "remove allowEmpty (it is only for a node left without workloads)",
            )
    return tuple(notes)


def _check_pod_ranges_apart(r: _Reader, nodes: list[tuple[yaml.Node, NodeSpec]]) -> None:
    seen: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]] = []
    for i, (n, s) in enumerate(nodes):
        for j, cidr in enumerate(s.pod_cidrs):
            net = ipaddress.ip_network(cidr)
            for other, owner in seen:
                if net.version == other.version and net.overlaps(other):
                    ranges = _child(n, "podCIDRs")
                    at = ranges.value[j] if isinstance(ranges, yaml.SequenceNode) else n
                    raise r.error(
                        at, f"nodes[{i}].podCIDRs[{j}]", f"{cidr} overlaps {owner}'s {other}"
                    )
            seen.append((net, s.name))


def _check_in_pod_range(
    r: _Reader, node: yaml.Node, path: str, w: WorkloadSpec, nodes: Mapping[str, NodeSpec]
) -> None:
    """Every IP of a workload lies in its node's pod ranges, when the node has them."""
    ranges = nodes[w.node].pod_cidrs
    if not ranges:
        return
    for j, ip in enumerate(w.ips):
        addr = ipaddress.ip_address(ip)
        if any(addr in ipaddress.ip_network(c) for c in ranges):
            continue
        ips = _child(node, "ips")
        if isinstance(ips, yaml.SequenceNode):
            at, field_path = ips.value[j], f"{path}.ips[{j}]"
        else:
            at, field_path = _child(node, "ip") or node, f"{path}.ip"
        owner = next(
            (
                s.name
                for s in nodes.values()
                if any(addr in ipaddress.ip_network(c) for c in s.pod_cidrs)
            ),
            None,
        )
        elsewhere = f"; it is in {owner}'s range" if owner else ""
        raise r.error(
            at,
            field_path,
            f"{ip} is outside the pod range of node {w.node} ({', '.join(ranges)}){elsewhere}",
        )


def check_reload(old: MeshConfig, new: MeshConfig, connected: Collection[str]) -> tuple[str, ...]:
    """Refuse (MeshError) an edit that takes every workload away from a node whose
    agent is connected, unless the new file says so (`allowEmpty: true` on the
    node, or `workloads: []`); return a note per node emptied on purpose."""
    before = Counter(w.node for w in old.workloads)
    after = Counter(w.node for w in new.workloads)
    index = {s.name: (i, s) for i, s in enumerate(new.nodes)}
    notes: list[str] = []
    for name in sorted(connected):
        if not before[name] or after[name]:
            continue
        gone = _names(w.key for w in old.workloads if w.node == name)
        lost = f"{before[name]} workload(s) before: {gone}"
        if new.workloads_explicitly_empty:
            notes.append(
                f"{new.locate('workloads')}: workloads: [] given: node {name} (agent connected) "
                f"loses every workload ({lost})"
            )
            continue
        if name not in index:
            raise MeshError(
                f"{new.locate('nodes')}: nodes: this edit removes node {name} and every workload "
                f"on it ({lost}) while its agent is connected; keep the node with "
                "`allowEmpty: true` and no workloads first, or stop its agent"
            )
        i, spec = index[name]
        if not spec.allow_empty:
            raise MeshError(
                f"{spec.where or new.locate('nodes')}: nodes[{i}]: this edit removes every "
                f"workload of node {name} ({lost}) while its agent is connected; add "
                "`allowEmpty: true` to the node if that is intended"
            )
        notes.append(
            f"{spec.where}: nodes[{i}].allowEmpty: node {name} (agent connected) is left "
            f"without workloads on purpose ({lost})"
        )
    return tuple(notes)


def _names(keys: Iterable[str], limit: int = 3) -> str:
    items = sorted(keys)
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _check_unique(
    r: _Reader,
    path: str,
    items: list[tuple[yaml.Node, T]],
    key: Callable[[T], str | None],
    what: str,
) -> None:
    seen: set[str] = set()
    for i, (n, item) in enumerate(items):
        k = key(item)
        if k is None:
            continue
        if k in seen:
            raise r.error(n, f"{path}[{i}].{what}", f"duplicate {what} {k!r}")
        seen.add(k)


def _node(r: _Reader, node: yaml.Node, path: str) -> NodeSpec:
    m = r.mapping(node, path, ("name", "token"), ("podCIDRs", "allowEmpty"))
    cidrs: tuple[str, ...] = ()
    if "podCIDRs" in m:
        seq = r.sequence(m["podCIDRs"], f"{path}.podCIDRs")
        if not seq:
            raise r.error(
                m["podCIDRs"], f"{path}.podCIDRs", "must not be empty (leave it out instead)"
            )
        cidrs = tuple(r.cidr(n, f"{path}.podCIDRs[{i}]") for i, n in enumerate(seq))
    allow_empty = "allowEmpty" in m and r.boolean(m["allowEmpty"], f"{path}.allowEmpty")
    return NodeSpec(
        name=r.string(m["name"], f"{path}.name"),
        token=r.string(m["token"], f"{path}.token"),
        pod_cidrs=cidrs,
        allow_empty=allow_empty,
        where=r.where(node),
    )


def _workload(r: _Reader, node: yaml.Node, path: str) -> WorkloadSpec:
    m = r.mapping(
        node,
        path,
        ("name", "node"),
        ("namespace", "ip", "ips", "serviceAccount", "labels", "uid", "network"),
    )
    if "ip" in m and "ips" in m:
        raise r.error(m["ips"], f"{path}.ips", "give either ip or ips, not both")
    if "ip" in m:
        ips: tuple[str, ...] = (r.ip(m["ip"], f"{path}.ip"),)
    elif "ips" in m:
        ips = tuple(
            r.ip(n, f"{path}.ips[{i}]") for i, n in enumerate(r.sequence(m["ips"], f"{path}.ips"))
        )
        if not ips:
            raise r.error(m["ips"], f"{path}.ips", "must not be empty")
    else:
        raise r.error(node, f"{path}.ip", "required field is missing (ip or ips)")
    return WorkloadSpec(
        name=r.string(m["name"], f"{path}.name"),
        namespace=r.string(m["namespace"], f"{path}.namespace") if "namespace" in m else "default",
        node=r.string(m["node"], f"{path}.node"),
        ips=ips,
        service_account=(
            r.string(m["serviceAccount"], f"{path}.serviceAccount")
            if "serviceAccount" in m
            else DEFAULT_SERVICE_ACCOUNT
        ),
        labels=r.labels(m["labels"], f"{path}.labels") if "labels" in m else {},
        uid=r.string(m["uid"], f"{path}.uid") if "uid" in m else "",
        network=r.string(m["network"], f"{path}.network") if "network" in m else "",
    )


def _service(r: _Reader, node: yaml.Node, path: str) -> ServiceSpec:
    m = r.mapping(
        node, path, ("name",), ("namespace", "hostname", "vip", "ports", "selector", "labels")
    )
    name = r.string(m["name"], f"{path}.name")
    namespace = r.string(m["namespace"], f"{path}.namespace") if "namespace" in m else "default"
    ports: list[ServicePort] = []
    if "ports" in m:
        for i, pn in enumerate(r.sequence(m["ports"], f"{path}.ports")):
            pp = f"{path}.ports[{i}]"
            pm = r.mapping(pn, pp, ("port",), ("targetPort", "name"))
            port = r.integer(pm["port"], f"{pp}.port", 1, 65535)
            target = (
                r.integer(pm["targetPort"], f"{pp}.targetPort", 1, 65535)
                if "targetPort" in pm
                else port
            )
            if "name" in pm:
                r.string(pm["name"], f"{pp}.name")
            if any(p.port == port for p in ports):
                raise r.error(pm["port"], f"{pp}.port", f"duplicate port {port}")
            ports.append(ServicePort(port=port, target_port=target))
    return ServiceSpec(
        name=name,
        namespace=namespace,
        hostname=(
            r.string(m["hostname"], f"{path}.hostname")
            if "hostname" in m
            else f"{name}.{namespace}.svc.cluster.local"
        ),
        vips=(r.ip(m["vip"], f"{path}.vip"),) if "vip" in m else (),
        ports=tuple(ports),
        selector=r.labels(m["selector"], f"{path}.selector") if "selector" in m else {},
        labels=r.labels(m["labels"], f"{path}.labels") if "labels" in m else {},
    )


def _namespace(r: _Reader, node: yaml.Node, path: str) -> NamespaceSpec:
    m = r.mapping(node, path, ("name",), ("labels",))
    return NamespaceSpec(
        name=r.string(m["name"], f"{path}.name"),
        labels=r.labels(m["labels"], f"{path}.labels") if "labels" in m else {},
    )


def _label_at(node: yaml.Node, key: str) -> yaml.Node:
    """The value node of label `key` under the item's `labels` (the item when absent)."""
    labels = _child(node, "labels")
    if isinstance(labels, yaml.MappingNode):
        for k, v in labels.value:
            if k.value == key:
                return v
    return labels or node


def _place_behind_waypoints(
    r: _Reader,
    namespaces: list[tuple[yaml.Node, NamespaceSpec]],
    workloads: list[tuple[yaml.Node, WorkloadSpec]],
    services: list[tuple[yaml.Node, ServiceSpec]],
) -> tuple[list[tuple[yaml.Node, WorkloadSpec]], list[tuple[yaml.Node, ServiceSpec]]]:
    """Resolve `istio.io/use-waypoint` as istiod does (waypoints.go): the label of the
    service or workload itself (`none` opts out), else its namespace's; the value names
    the service of a waypoint in the same namespace, or in `istio.io/use-waypoint-namespace`.
    That service must have port 15008; its `istio.io/waypoint-for` (service by default)
    says whether services, workloads or both may use it. A waypoint (its service, the
    workloads it selects, pods labelled gateway-name) never gets one itself.

    Unlike istiod, which leaves a service direct while its waypoint is not ready, a label
    naming no waypoint is an error here: the file says where."""
    if not any(
        labels.get(USE_WAYPOINT, "none") != "none"
        for labels in itertools.chain(
            (ns.labels for _, ns in namespaces),
            (svc.labels for _, svc in services),
            (w.labels for _, w in workloads),
        )
    ):
        return workloads, services  # no waypoint anywhere (and "none" resolves to none)
    by_key = {(svc.namespace, svc.name): (n, svc) for n, svc in services}
    ns_labels = {
        nsp.name: (n, f"namespaces[{i}]", nsp.labels) for i, (n, nsp) in enumerate(namespaces)
    }
    for name, (n, path, labels) in ns_labels.items():
        if USE_WAYPOINT in labels:
            # Checked once here so that the error names the namespace entry.
            _waypoint_of(r, n, path, name, labels, by_key, "")
    labelled = [(ns.name, ns.labels) for _, ns in namespaces]
    labelled += [(svc.namespace, svc.labels) for _, svc in services]
    labelled += [(w.namespace, w.labels) for _, w in workloads]
    waypoint_services = {
        (labels.get(USE_WAYPOINT_NAMESPACE, namespace), labels[USE_WAYPOINT])
        for namespace, labels in labelled
        if labels.get(USE_WAYPOINT, "none") != "none"
    }
    waypoint_pods = {
        w.key
        for _, w in workloads
        if GATEWAY_NAME in w.labels
        or any(by_key[k][1].selects(w) for k in waypoint_services if k in by_key)
    }

    def resolve(
        node: yaml.Node, path: str, namespace: str, labels: Mapping[str, str], kind: str
    ) -> str:
        if USE_WAYPOINT in labels:
            return _waypoint_of(r, node, path, namespace, labels, by_key, kind)
        inherited = ns_labels.get(namespace)
        if inherited is None or USE_WAYPOINT not in inherited[2]:
            return ""
        # Inherited: a waypoint that does not take this kind of traffic is skipped.
        ns_node, ns_path, ns_labels_of = inherited
        return _waypoint_of(
            r, ns_node, ns_path, namespace, ns_labels_of, by_key, kind, strict=False
        )

    placed_services = []
    for i, (n, svc) in enumerate(services):
        if (svc.namespace, svc.name) in waypoint_services:
            if svc.labels.get(USE_WAYPOINT, "none") != "none":
                raise r.error(
                    _label_at(n, USE_WAYPOINT),
                    f"services[{i}].labels.{USE_WAYPOINT}",
                    f"service {svc.name} is a waypoint; a waypoint cannot use a waypoint",
                )
            placed_services.append((n, svc))
            continue
        wp = resolve(n, f"services[{i}]", svc.namespace, svc.labels, "service")
        placed_services.append((n, replace(svc, waypoint=wp) if wp else svc))
    placed_workloads = []
    for i, (n, w) in enumerate(workloads):
        wp = (
            ""
            if w.key in waypoint_pods
            else resolve(n, f"workloads[{i}]", w.namespace, w.labels, "workload")
        )
        placed_workloads.append((n, replace(w, waypoint=wp) if wp else w))
    return placed_workloads, placed_services


def _waypoint_of(
    r: _Reader,
    node: yaml.Node,
    path: str,
    namespace: str,
    labels: Mapping[str, str],
    by_key: Mapping[tuple[str, str], tuple[yaml.Node, ServiceSpec]],
    kind: str,
    *,
    strict: bool = True,
) -> str:
    """The `namespace/hostname` of the waypoint service `labels` name ("" for `none`, or
    when it does not serve `kind` and not `strict`); MeshError naming the label if there is
    no such waypoint. An empty `kind` checks the waypoint only."""
    name = labels[USE_WAYPOINT]
    field_path = f"{path}.labels.{USE_WAYPOINT}"
    if name == "none":
        return ""
    wp_ns = labels.get(USE_WAYPOINT_NAMESPACE, namespace)
    found = by_key.get((wp_ns, name))
    if found is None:
        raise r.error(
            _label_at(node, USE_WAYPOINT),
            field_path,
            f"waypoint {name!r} is not declared: no service {name} in namespace {wp_ns} "
            f"(declare the waypoint's workloads and a service {name} with port "
            f"{WAYPOINT_HBONE_PORT})",
        )
    wp_node, wp = found
    if not any(p.port == WAYPOINT_HBONE_PORT for p in wp.ports):
        raise r.error(
            _label_at(node, USE_WAYPOINT),
            field_path,
            f"waypoint {wp_ns}/{name}: its service has no port {WAYPOINT_HBONE_PORT} (HBONE)",
        )
    serves = wp.labels.get(WAYPOINT_FOR, "service")
    if serves not in WAYPOINT_FOR_VALUES:
        raise r.error(
            _label_at(wp_node, WAYPOINT_FOR),
            f"service {wp_ns}/{name}: labels.{WAYPOINT_FOR}",
            f"{serves!r} is not one of {', '.join(WAYPOINT_FOR_VALUES)}",
        )
    if kind and serves not in (kind, "all"):
        if not strict:
            return ""
        raise r.error(
            _label_at(node, USE_WAYPOINT),
            field_path,
            f"waypoint {wp_ns}/{name} is for {serves} traffic ({WAYPOINT_FOR}), not {kind}",
        )
    return f"{wp.namespace}/{wp.hostname}"


def _policy(r: _Reader, node: yaml.Node, path: str) -> PolicySpec:
    m = r.mapping(node, path, ("metadata",), ("apiVersion", "kind", "spec"))
    if "kind" in m and r.string(m["kind"], f"{path}.kind") != "AuthorizationPolicy":
        raise r.error(m["kind"], f"{path}.kind", "must be AuthorizationPolicy")
    if "apiVersion" in m:
        r.string(m["apiVersion"], f"{path}.apiVersion")
    md = r.mapping(
        m["metadata"], f"{path}.metadata", ("name",), ("namespace", "labels", "annotations")
    )
    name = r.string(md["name"], f"{path}.metadata.name")
    namespace = (
        r.string(md["namespace"], f"{path}.metadata.namespace") if "namespace" in md else "default"
    )
    action = "ALLOW"
    selector: dict[str, str] | None = None
    rules: list[RuleSpec] = []
    target_refs: list[TargetRefSpec] = []
    if "spec" in m:
        sp = f"{path}.spec"
        spec = r.mapping(
            m["spec"], sp, (), ("action", "selector", "rules", "targetRef", "targetRefs")
        )
        if "targetRefs" in spec:
            target_refs = [
                ref
                for _, ref in r.items(spec["targetRefs"], f"{sp}.targetRefs", _target_ref_reader(r))
            ]
        elif "targetRef" in spec:
            target_refs = [_target_ref_reader(r)(spec["targetRef"], f"{sp}.targetRef")]
        if target_refs and "selector" in spec:
            # Istio's validation: a policy attaches either way, not both.
            raise r.error(
                spec["selector"], f"{sp}.selector", "set at most one of selector and targetRefs"
            )
        if "action" in spec:
            action = r.string(spec["action"], f"{sp}.action")
            if action not in ACTIONS:
                raise r.error(
                    spec["action"],
                    f"{sp}.action",
                    f"{action!r} is not supported (use ALLOW or DENY)",
                )
        if "selector" in spec:
            sel = r.mapping(spec["selector"], f"{sp}.selector", (), ("matchLabels",))
            if "matchLabels" in sel:
                selector = r.labels(sel["matchLabels"], f"{sp}.selector.matchLabels") or None
        if "rules" in spec:
            for i, rn in enumerate(r.sequence(spec["rules"], f"{sp}.rules")):
                rules.append(_rule(r, rn, f"{sp}.rules[{i}]"))
    return PolicySpec(
        name=name,
        namespace=namespace,
        action=action,
        selector=selector,
        rules=tuple(rules),
        target_refs=tuple(target_refs),
    )


def _target_ref_reader(r: _Reader) -> Callable[[yaml.Node, str], TargetRefSpec]:
    def read(node: yaml.Node, path: str) -> TargetRefSpec:
        m = r.mapping(node, path, ("kind", "name"), ("group", "namespace"))
        return TargetRefSpec(
            kind=r.string(m["kind"], f"{path}.kind"),
            name=r.string(m["name"], f"{path}.name"),
            group=r.string(m["group"], f"{path}.group", nonempty=False) if "group" in m else "",
            namespace=(r.string(m["namespace"], f"{path}.namespace") if "namespace" in m else ""),
        )

    return read


def _rule(r: _Reader, node: yaml.Node, path: str) -> RuleSpec:
    if _is_null(node):
        return RuleSpec()
    m = r.mapping(node, path, (), ("from", "to", "when"))
    sources: list[SourceSpec] = []
    operations: list[OperationSpec] = []
    conditions: list[ConditionSpec] = []
    for i, fn in enumerate(r.sequence(m["from"], f"{path}.from") if "from" in m else []):
        fp = f"{path}.from[{i}]"
        src = r.mapping(
            r.mapping(fn, fp, ("source",), ())["source"], f"{fp}.source", (), _SOURCE_FIELDS
        )
        sp = f"{fp}.source"
        strs = {
            k: r.strings(v, f"{sp}.{k}")
            for k, v in src.items()
            if k not in ("ipBlocks", "notIpBlocks")
        }
        blocks = {
            k: tuple(r.cidr(n, f"{sp}.{k}[{j}]") for j, n in enumerate(r.sequence(v, f"{sp}.{k}")))
            for k, v in src.items()
            if k in ("ipBlocks", "notIpBlocks")
        }
        sources.append(
            SourceSpec(
                principals=strs.get("principals", ()),
                not_principals=strs.get("notPrincipals", ()),
                namespaces=strs.get("namespaces", ()),
                not_namespaces=strs.get("notNamespaces", ()),
                ip_blocks=blocks.get("ipBlocks", ()),
                not_ip_blocks=blocks.get("notIpBlocks", ()),
            )
        )
    for i, tn in enumerate(r.sequence(m["to"], f"{path}.to") if "to" in m else []):
        tp = f"{path}.to[{i}]"
        op = r.mapping(
            r.mapping(tn, tp, ("operation",), ())["operation"],
            f"{tp}.operation",
            (),
            ("ports", "notPorts", *_HTTP_OPERATION_FIELDS),
        )
        ports = {
            k: tuple(
                r.integer(n, f"{tp}.operation.{k}[{j}]", 1, 65535)
                for j, n in enumerate(r.sequence(v, f"{tp}.operation.{k}"))
            )
            for k, v in op.items()
            if k in ("ports", "notPorts")
        }
        http = {
            k: r.strings(v, f"{tp}.operation.{k}")
            for k, v in op.items()
            if k in _HTTP_OPERATION_FIELDS
        }
        for k in ("paths", "notPaths"):
            for j, n in enumerate(r.sequence(op[k], "") if k in op else []):
                try:
                    check_path(str(n.value))
                except PolicyError as e:
                    raise r.error(n, f"{tp}.operation.{k}[{j}]", str(e)) from None
        operations.append(
            OperationSpec(
                ports=ports.get("ports", ()),
                not_ports=ports.get("notPorts", ()),
                hosts=http.get("hosts", ()),
                not_hosts=http.get("notHosts", ()),
                methods=http.get("methods", ()),
                not_methods=http.get("notMethods", ()),
                paths=http.get("paths", ()),
                not_paths=http.get("notPaths", ()),
            )
        )
    for i, wn in enumerate(r.sequence(m["when"], f"{path}.when") if "when" in m else []):
        wp = f"{path}.when[{i}]"
        when = r.mapping(wn, wp, ("key",), ("values", "notValues"))
        condition = ConditionSpec(
            key=r.string(when["key"], f"{wp}.key"),
            values=r.strings(when["values"], f"{wp}.values") if "values" in when else (),
            not_values=(
                r.strings(when["notValues"], f"{wp}.notValues") if "notValues" in when else ()
            ),
        )
        try:
            Condition.parse(condition.key, condition.values, condition.not_values)
        except PolicyError as e:
            # Name the key when the key is wrong, else the entry.
            if repr(condition.key) in str(e):
                raise r.error(when["key"], f"{wp}.key", str(e)) from None
            raise r.error(wn, wp, str(e)) from None
        conditions.append(condition)
    return RuleSpec(
        sources=tuple(sources), operations=tuple(operations), conditions=tuple(conditions)
    )


_HTTP_OPERATION_FIELDS = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
_SOURCE_FIELDS = (
    "principals",
    "notPrincipals",
    "namespaces",
    "notNamespaces",
    "ipBlocks",
    "notIpBlocks",
)


# --- VirtualService and DestinationRule ---------------------------------------

_VS = "VirtualService"
_DR = "DestinationRule"


@dataclass(frozen=True, slots=True)
class _Envelope:
    """What every Kubernetes-style resource carries around its spec."""

    name: str
    namespace: str
    annotations: Mapping[str, str]
    spec: Any


def _envelope(
    r: _Reader, node: yaml.Node, path: str, kind: str, group: str, versions: Sequence[str]
) -> _Envelope:
    """Check kind and apiVersion, read metadata, and build the spec as plain data."""
    m = r.mapping(node, path, ("metadata", "spec"), ("apiVersion", "kind", "status"))
    if "kind" in m and r.string(m["kind"], f"{path}.kind") != kind:
        raise r.error(m["kind"], f"{path}.kind", f"must be {kind}")
    if "apiVersion" in m:
        version = r.string(m["apiVersion"], f"{path}.apiVersion")
        allowed = [f"{group}/{v}" for v in versions]
        if version not in allowed:
            raise r.error(
                m["apiVersion"], f"{path}.apiVersion", f"must be one of {', '.join(allowed)}"
            )
    md = r.mapping(
        m["metadata"], f"{path}.metadata", ("name",), ("namespace", "labels", "annotations")
    )
    name = r.string(md["name"], f"{path}.metadata.name")
    namespace = (
        r.string(md["namespace"], f"{path}.metadata.namespace") if "namespace" in md else "default"
    )
    annotations = (
        r.labels(md["annotations"], f"{path}.metadata.annotations") if "annotations" in md else {}
    )
    try:
        spec = construct(m["spec"], r.source)
    except YamlSyntaxError as e:
        raise MeshError(str(e)) from None
    return _Envelope(name, namespace, annotations, spec)


def _routing(r: _Reader, node: yaml.Node, path: str, kind: str) -> VirtualService | DestinationRule:
    """One Istio resource of `kind`, with errors at the line of the field they name."""
    env = _envelope(r, node, path, kind, GROUP, API_VERSIONS)
    read = parse_virtual_service if kind == _VS else parse_destination_rule
    try:
        return read(env.namespace, env.name, env.spec, env.annotations)
    except RoutingSpecError as e:
        raise r.error(locate_node(node, e.path), f"{path}.{e.path}", e.problem) from None


def _http_route(r: _Reader, node: yaml.Node, path: str) -> tuple[VirtualService, ...]:
    """One Gateway API HTTPRoute, as the VirtualServices it compiles to (model/httproute.py)."""
    env = _envelope(r, node, path, HTTPROUTE_KIND, HTTPROUTE_GROUP, HTTPROUTE_VERSIONS)
    try:
        return parse_http_route(env.namespace, env.name, env.spec)
    except RoutingSpecError as e:
        raise r.error(locate_node(node, e.path), f"{path}.{e.path}", e.problem) from None


def _check_routing_references(
    r: _Reader,
    hostnames: set[str],
    virtual_services: list[tuple[yaml.Node, VirtualService]],
    destination_rules: list[tuple[yaml.Node, DestinationRule]],
    converted: Sequence[tuple[yaml.Node, VirtualService]] = (),
) -> None:
    """Every host names a service and every subset is defined by that service's rule."""
    subsets: dict[str, set[str]] = {}
    owner: dict[str, str] = {}
    for i, (node, dr) in enumerate(destination_rules):
        host = resolve_host(dr.host, dr.namespace)
        if host not in hostnames:
            raise _not_a_service(r, node, f"destinationRules[{i}]", "spec.host", dr.host, host)
        if host in owner:
            # The agents apply one rule per service; a second would be silently ignored.
            raise r.error(
                locate_node(node, "spec.host"),
                f"destinationRules[{i}].spec.host",
                f"{host} already has DestinationRule {owner[host]}: give each host one rule",
            )
        owner[host] = dr.key
        subsets[host] = {s.name for s in dr.subsets}
    sources = [(f"virtualServices[{i}]", n, vs) for i, (n, vs) in enumerate(virtual_services)]
    index = {id(n): i for i, n in enumerate(dict.fromkeys(n for n, _ in converted))}
    sources += [(f"httpRoutes[{index[id(n)]}] ({vs.key})", n, vs) for n, vs in converted]
    for path, node, vs in sources:
        for j, host in enumerate(vs.hosts):
            full = resolve_host(host, vs.namespace)
            if full not in hostnames and not host.startswith("*"):
                raise _not_a_service(r, node, path, f"spec.hosts[{j}]", host, full)
        places = [
            (f"spec.http[{j}].route[{k}].destination", d.destination)
            for j, http in enumerate(vs.http)
            for k, d in enumerate(http.route)
        ]
        for j, route in enumerate(vs.tcp):
            places += [
                (f"spec.tcp[{j}].route[{k}].destination", d.destination)
                for k, d in enumerate(route.route)
            ]
            if route.mirror is not None:
                places.append((f"spec.tcp[{j}].mirror", route.mirror.destination))
        for where, dest in places:
            full = resolve_host(dest.host, vs.namespace)
            if full not in hostnames:
                raise _not_a_service(r, node, path, f"{where}.host", dest.host, full)
            if dest.subset and dest.subset not in subsets.get(full, set()):
                defined = ", ".join(sorted(subsets.get(full, ()))) or "none"
                raise r.error(
                    locate_node(node, f"{where}.subset"),
                    f"{path}.{where}.subset",
                    f"subset {dest.subset!r} is defined by no DestinationRule for {full} "
                    f"(defined: {defined})",
                )


def _not_a_service(
    r: _Reader, node: yaml.Node, path: str, field_path: str, host: str, full: str
) -> MeshError:
    return r.error(
        locate_node(node, field_path),
        f"{path}.{field_path}",
        f"{host!r} ({full}) is not a service",
    )


def waypoint_fields(mesh: MeshConfig) -> list[str]:
    """`Kind namespace/name: field` for each field the node agents accept but do not apply
    (HTTP routes, HTTP-only policies): they need a waypoint."""
    return [
        f"{kind} {r.key}: {path}"
        for kind, resources in (
            ("VirtualService", mesh.virtual_services),
            ("DestinationRule", mesh.destination_rules),
        )
        for r in resources
        for path in r.needs_waypoint
    ] + [f"AuthorizationPolicy {p.key}: {what}" for p in mesh.policies for what in p.needs_waypoint]
