"""L4 authorization policies, mirroring the `istio.security.Authorization` xDS resource.

These are plain frozen values: the state layer converts protobuf into them, and
`nodeagent.policy` evaluates them against a `ConnectionAttributes`. Field names
follow the protobuf (`Rule.clauses`, `Clause.matches`, `Match.not_principals`, ...)
so that reading one next to the other is easy.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from typing import Any

from nodeagent.model.identity import Identity

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class PolicyError(ValueError):
    """A policy value is malformed (bad port, bad string match, ...)."""


class Scope(enum.Enum):
    """Which workloads a policy applies to (same numbers as the protobuf enum)."""

    GLOBAL = 0  # every workload in the mesh (policies in the root namespace)
    NAMESPACE = 1  # every workload in `Authorization.namespace`
    WORKLOAD_SELECTOR = 2  # workloads that list the policy's key


class Action(enum.Enum):
    """What a matching policy does (ztunnel enforces only these two)."""

    ALLOW = 0
    DENY = 1


class StringMatchKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    PRESENCE = "presence"  # the value is non-empty


@dataclass(frozen=True, slots=True)
class StringMatch:
    """One `istio.security.StringMatch`; build with `exact()`, `prefix()`, ... ."""

    kind: StringMatchKind
    value: str = ""

    def __post_init__(self) -> None:
        if self.kind is StringMatchKind.PRESENCE and self.value:
            raise PolicyError(f"a presence match takes no value, got {self.value!r}")

    @classmethod
    def exact(cls, value: str) -> StringMatch:
        return cls(StringMatchKind.EXACT, value)

    @classmethod
    def prefix(cls, value: str) -> StringMatch:
        return cls(StringMatchKind.PREFIX, value)

    @classmethod
    def suffix(cls, value: str) -> StringMatch:
        return cls(StringMatchKind.SUFFIX, value)

    @classmethod
    def presence(cls) -> StringMatch:
        return cls(StringMatchKind.PRESENCE)

    def __str__(self) -> str:
        if self.kind is StringMatchKind.PRESENCE:
            return "*"
        if self.kind is StringMatchKind.PREFIX:
            return f"{self.value}*"
        if self.kind is StringMatchKind.SUFFIX:
            return f"*{self.value}"
        return self.value


@dataclass(frozen=True, slots=True)
class ServiceAccountMatch:
    """A (namespace, service account) pair compared with the peer identity's."""

    namespace: str
    service_account: str


def _check_ports(field: str, ports: tuple[int, ...]) -> None:
    for port in ports:
        if not 0 <= port <= 0xFFFF:
            raise PolicyError(f"{field}: port {port} is outside 0..65535")


@dataclass(frozen=True, slots=True)
class Match:
    """One `istio.security.Match`.

    Within a Match every non-empty field must hold (AND); the values inside one
    field are alternatives (OR); a `not_*` field holds when none of its values match.
    """

    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    source_ips: tuple[IPNetwork, ...] = ()
    not_source_ips: tuple[IPNetwork, ...] = ()
    destination_ips: tuple[IPNetwork, ...] = ()
    not_destination_ips: tuple[IPNetwork, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()

    def __post_init__(self) -> None:
        _check_ports("destination_ports", self.destination_ports)
        _check_ports("not_destination_ports", self.not_destination_ports)

    @property
    def is_empty(self) -> bool:
        """True when no field is set (such a Match is skipped by the engine)."""
        return not (
            self.namespaces
            or self.not_namespaces
            or self.principals
            or self.not_principals
            or self.source_ips
            or self.not_source_ips
            or self.destination_ips
            or self.not_destination_ips
            or self.destination_ports
            or self.not_destination_ports
            or self.service_accounts
            or self.not_service_accounts
        )


@dataclass(frozen=True, slots=True)
class Clause:
    """`istio.security.Clause`: the matches are alternatives (OR)."""

    matches: tuple[Match, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    """`istio.security.Rule`: every clause must hold (AND)."""

    clauses: tuple[Clause, ...] = ()


@dataclass(frozen=True, slots=True)
class Authorization:
    """`istio.security.Authorization`: rules are alternatives (OR)."""

    name: str
    namespace: str
    scope: Scope = Scope.WORKLOAD_SELECTOR
    action: Action = Action.ALLOW
    rules: tuple[Rule, ...] = ()
    dry_run: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise PolicyError("an authorization policy needs a name")

    @property
    def key(self) -> str:
        """`namespace/name`, the key workloads use in `authorization_policies`."""
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ConnectionAttributes:
    """What authorization knows about one inbound connection.

    `source_identity` is the peer's verified SPIFFE identity (HBONE/mTLS), or None
    for plaintext. `destination_port` is the real target port (for HBONE the
    CONNECT authority's port, never 15008).
    """

    source_ip: IPAddress
    source_identity: Identity | None
    destination_ip: IPAddress
    destination_port: int
    destination_namespace: str = ""
    destination_name: str = ""
    # The destination workload's uid, when known: host-network workloads share an IP,
    # so policy lookups for re-checks should prefer it over the address.
    destination_uid: str = ""

    def __post_init__(self) -> None:
        _check_ports("destination_port", (self.destination_port,))

    @classmethod
    def build(
        cls,
        source_ip: str,
        destination: str,
        *,
        identity: Identity | str | None = None,
        destination_namespace: str = "",
        destination_name: str = "",
    ) -> ConnectionAttributes:
        """Convenience constructor from text: `destination` is `ip:port` (`[v6]:port`)."""
        host, sep, port = destination.rpartition(":")
        if not sep or not port.isdigit():
            raise PolicyError(f"destination must be ip:port, got {destination!r}")
        peer = Identity.parse(identity) if isinstance(identity, str) else identity
        return cls(
            source_ip=ipaddress.ip_address(source_ip),
            source_identity=peer,
            destination_ip=ipaddress.ip_address(host.strip("[]")),
            destination_port=int(port),
            destination_namespace=destination_namespace,
            destination_name=destination_name,
        )


# --- L7: AuthorizationPolicies the waypoint enforces ----------------------------------
#
# Istio's own AuthorizationPolicy (security.istio.io, istio.security.v1beta1), for the
# policies attached to a waypoint: their rules need HTTP (paths, methods, hosts, request
# headers), which the workload API's Authorization cannot carry. Values are read as
# written; `nodeagent.policy.http` evaluates them per request.

GATEWAY_GROUP = "gateway.networking.k8s.io"
GATEWAY_KIND = "Gateway"
SERVICE_KIND = "Service"
# The label Istio puts on a waypoint's pods: a selector on it names the waypoint.
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
_SPIFFE = "spiffe://"


class PolicySpecError(PolicyError):
    """A field of an AuthorizationPolicy spec is wrong; `path` names it (`rules[0].when[1].key`)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}" if path else problem)
        self.path = path
        self.problem = problem


def parse_pattern(value: str) -> StringMatch:
    """Istio's string pattern: `*` = present (non-empty), `*x` suffix, `x*` prefix, else
    exact. The suffix form is checked first, as istiod's matchers do (`*` alone aside)."""
    if value == "*":
        return StringMatch.presence()
    if value.startswith("*"):
        return StringMatch.suffix(value[1:])
    if value.endswith("*"):
        return StringMatch.prefix(value[:-1])
    return StringMatch.exact(value)


def parse_principal(value: str) -> StringMatch:
    """A principal pattern; a leading `spiffe://` is dropped (as for the agent's L4 policies)."""
    return parse_pattern(value[len(_SPIFFE) :] if value.startswith(_SPIFFE) else value)


def check_path(value: str) -> None:
    """Refuse what would silently never match: Envoy's URI templates are not evaluated here."""
    if "{*}" in value or "{**}" in value:
        raise PolicyError(f"{value!r}: path templates ({{*}}, {{**}}) are not supported")


class ConditionKey(enum.Enum):
    """The `when` attributes the waypoint evaluates (Istio's condition keys)."""

    REQUEST_HEADER = "request.headers"
    SOURCE_IP = "source.ip"
    SOURCE_NAMESPACE = "source.namespace"
    SOURCE_PRINCIPAL = "source.principal"
    DESTINATION_IP = "destination.ip"
    DESTINATION_PORT = "destination.port"


# The keys ztunnel can check too (istiod's l4WhenAttributes); any other needs HTTP.
L4_CONDITION_KEYS = frozenset(k.value for k in ConditionKey if k is not ConditionKey.REQUEST_HEADER)


@dataclass(frozen=True, slots=True)
class Condition:
    """One `when` entry: the attribute must match one of `values` (if any) and none of
    `not_values`. Values are checked for their attribute when built (`parse`)."""

    attribute: ConditionKey
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()
    header: str = ""  # lowercase, for REQUEST_HEADER

    @property
    def key(self) -> str:
        if self.attribute is ConditionKey.REQUEST_HEADER:
            return f"request.headers[{self.header}]"
        return str(self.attribute.value)

    @classmethod
    def parse(cls, key: str, values: tuple[str, ...], not_values: tuple[str, ...]) -> Condition:
        """Raise PolicyError naming the key or the value that is not supported."""
        header = ""
        if key.startswith("request.headers"):
            rest = key[len("request.headers") :]
            if not (rest.startswith("[") and rest.endswith("]") and len(rest) > 2):
                raise PolicyError(f"{key!r}: write request.headers[NAME]")
            attribute, header = ConditionKey.REQUEST_HEADER, rest[1:-1].lower()
        else:
            try:
                attribute = ConditionKey(key)
            except ValueError:
                known = ", ".join(k.value for k in ConditionKey if k.value != "request.headers")
                raise PolicyError(
                    f"{key!r} is not supported here (request.headers[NAME], {known})"
                ) from None
        if not values and not not_values:
            raise PolicyError(f"{key}: give values or notValues")
        for value in values + not_values:
            _check_condition_value(attribute, value)
        return cls(attribute, values, not_values, header)


def _check_condition_value(attribute: ConditionKey, value: str) -> None:
    if attribute in (ConditionKey.SOURCE_IP, ConditionKey.DESTINATION_IP):
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise PolicyError(f"{value!r} is not an IP address or CIDR") from None
    elif attribute is ConditionKey.DESTINATION_PORT and not (
        value.isascii() and value.isdigit() and 0 <= int(value) <= 0xFFFF
    ):
        raise PolicyError(f"{value!r} is not a port (0..65535)")


@dataclass(frozen=True, slots=True)
class HttpSource:
    """`rules[].from[].source`: every set field must hold (AND)."""

    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    ip_blocks: tuple[IPNetwork, ...] = ()
    not_ip_blocks: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class HttpOperation:
    """`rules[].to[].operation`: every set field must hold (AND)."""

    hosts: tuple[StringMatch, ...] = ()
    not_hosts: tuple[StringMatch, ...] = ()
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    methods: tuple[StringMatch, ...] = ()
    not_methods: tuple[StringMatch, ...] = ()
    paths: tuple[StringMatch, ...] = ()
    not_paths: tuple[StringMatch, ...] = ()

    def __post_init__(self) -> None:
        _check_ports("ports", self.ports)
        _check_ports("not_ports", self.not_ports)


@dataclass(frozen=True, slots=True)
class HttpRule:
    """One rule: any source (or none given) AND any operation (or none) AND every condition."""

    sources: tuple[HttpSource, ...] = ()
    operations: tuple[HttpOperation, ...] = ()
    conditions: tuple[Condition, ...] = ()


@dataclass(frozen=True, slots=True)
class TargetRef:
    """`targetRefs[]` (or the older `targetRef`): the resource a policy attaches to."""

    kind: str
    name: str
    group: str = ""
    namespace: str = ""


@dataclass(frozen=True, slots=True)
class HttpAuthorization:
    """An AuthorizationPolicy as a waypoint applies it; rules are alternatives (OR)."""

    name: str
    namespace: str
    action: Action = Action.ALLOW
    rules: tuple[HttpRule, ...] = ()
    selector: tuple[tuple[str, str], ...] = ()  # matchLabels, sorted
    target_refs: tuple[TargetRef, ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise PolicyError("an authorization policy needs a name")

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def attaches_to(
        self, waypoint: str, waypoint_namespace: str, service: tuple[str, str] | None = None
    ) -> bool:
        """Whether the waypoint `waypoint_namespace/waypoint` applies this policy to traffic
        for `service` (name, namespace), as istiod's ShouldAttachPolicy decides: a
        targetRef to the Gateway (same namespace), or to the Service when the waypoint
        serves it. Istio ignores selector policies at waypoints; here a selector naming
        the waypoint's pods by gateway-name also attaches (the mesh file's older form)."""
        if self.target_refs:
            for ref in self.target_refs:
                if ref.namespace and ref.namespace != self.namespace:
                    continue  # cross-namespace references never match (Istio)
                if (
                    ref.kind == GATEWAY_KIND
                    and ref.group == GATEWAY_GROUP
                    and ref.name == waypoint
                    and self.namespace == waypoint_namespace
                ):
                    return True
                if (
                    ref.kind == SERVICE_KIND
                    and ref.group in ("", "core")
                    and service is not None
                    and (ref.name, self.namespace) == service
                ):
                    return True
            return False
        return (
            bool(self.selector)
            and self.namespace == waypoint_namespace
            and dict(self.selector).items() <= {GATEWAY_NAME_LABEL: waypoint}.items()
        )


def parse_http_authorization(namespace: str, name: str, spec: Any) -> HttpAuthorization:
    """An AuthorizationPolicy spec in Istio's JSON shape (camelCase, as the YAML and
    protobuf's JSON write it) -> HttpAuthorization; PolicySpecError names the field."""
    spec = _mapping(spec, "spec")
    action_text = _str(spec.get("action", "ALLOW"), "spec.action")
    if action_text not in ("ALLOW", "DENY"):
        raise PolicySpecError(
            "spec.action", f"{action_text!r}: the waypoint enforces ALLOW and DENY only"
        )
    selector: dict[str, str] = {}
    if "selector" in spec:
        labels = _mapping(_mapping(spec["selector"], "spec.selector").get("matchLabels", {}), "")
        selector = {str(k): _str(v, f"spec.selector.matchLabels.{k}") for k, v in labels.items()}
    refs = list(_list(spec.get("targetRefs", []), "spec.targetRefs"))
    ref_path = "spec.targetRefs"
    if not refs and "targetRef" in spec:
        refs, ref_path = [spec["targetRef"]], "spec.targetRef"
    target_refs = tuple(
        _target_ref(r, f"{ref_path}[{i}]" if ref_path.endswith("s") else ref_path)
        for i, r in enumerate(refs)
    )
    if selector and target_refs:
        raise PolicySpecError("spec", "set at most one of selector and targetRefs")
    rules = tuple(
        _http_rule(r, f"spec.rules[{i}]")
        for i, r in enumerate(_list(spec.get("rules", []), "spec.rules"))
    )
    return HttpAuthorization(
        name=name,
        namespace=namespace,
        action=Action[action_text],
        rules=rules,
        selector=tuple(sorted(selector.items())),
        target_refs=target_refs,
    )


def _target_ref(value: Any, path: str) -> TargetRef:
    ref = _mapping(value, path)
    kind = _str(ref.get("kind", ""), f"{path}.kind")
    name = _str(ref.get("name", ""), f"{path}.name")
    if not kind or not name:
        raise PolicySpecError(path, "kind and name are required")
    return TargetRef(
        kind=kind,
        name=name,
        group=_str(ref.get("group", ""), f"{path}.group"),
        namespace=_str(ref.get("namespace", ""), f"{path}.namespace"),
    )


def _http_rule(value: Any, path: str) -> HttpRule:
    rule = _mapping(value if value is not None else {}, path)
    sources = []
    for i, item in enumerate(_list(rule.get("from", []), f"{path}.from")):
        sp = f"{path}.from[{i}].source"
        src = _mapping(_mapping(item, f"{path}.from[{i}]").get("source", {}), sp)
        sources.append(
            HttpSource(
                principals=_patterns(src, "principals", sp, parse_principal),
                not_principals=_patterns(src, "notPrincipals", sp, parse_principal),
                namespaces=_patterns(src, "namespaces", sp),
                not_namespaces=_patterns(src, "notNamespaces", sp),
                ip_blocks=_networks(src, "ipBlocks", sp),
                not_ip_blocks=_networks(src, "notIpBlocks", sp),
            )
        )
    operations = []
    for i, item in enumerate(_list(rule.get("to", []), f"{path}.to")):
        op_path = f"{path}.to[{i}].operation"
        op = _mapping(_mapping(item, f"{path}.to[{i}]").get("operation", {}), op_path)
        for key in ("paths", "notPaths"):
            for j, text in enumerate(_strings(op, key, op_path)):
                try:
                    check_path(text)
                except PolicyError as e:
                    raise PolicySpecError(f"{op_path}.{key}[{j}]", str(e)) from None
        operations.append(
            HttpOperation(
                hosts=_patterns(op, "hosts", op_path),
                not_hosts=_patterns(op, "notHosts", op_path),
                ports=_ports(op, "ports", op_path),
                not_ports=_ports(op, "notPorts", op_path),
                methods=_patterns(op, "methods", op_path),
                not_methods=_patterns(op, "notMethods", op_path),
                paths=_patterns(op, "paths", op_path),
                not_paths=_patterns(op, "notPaths", op_path),
            )
        )
    conditions = []
    for i, item in enumerate(_list(rule.get("when", []), f"{path}.when")):
        wp = f"{path}.when[{i}]"
        when = _mapping(item, wp)
        try:
            conditions.append(
                Condition.parse(
                    _str(when.get("key", ""), f"{wp}.key"),
                    _strings(when, "values", wp),
                    _strings(when, "notValues", wp),
                )
            )
        except PolicySpecError:
            raise
        except PolicyError as e:
            raise PolicySpecError(wp, str(e)) from None
    return HttpRule(tuple(sources), tuple(operations), tuple(conditions))


def _mapping(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PolicySpecError(path, f"expected a mapping, got {type(value).__name__}")
    return value


def _list(value: Any, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise PolicySpecError(path, f"expected a list, got {type(value).__name__}")
    return value


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise PolicySpecError(path, f"expected a string, got {type(value).__name__}")
    return value


def _strings(m: dict[str, Any], key: str, path: str) -> tuple[str, ...]:
    return tuple(
        _str(v, f"{path}.{key}[{i}]") for i, v in enumerate(_list(m.get(key, []), f"{path}.{key}"))
    )


def _patterns(
    m: dict[str, Any], key: str, path: str, parse: Any = parse_pattern
) -> tuple[StringMatch, ...]:
    return tuple(parse(v) for v in _strings(m, key, path))


def _networks(m: dict[str, Any], key: str, path: str) -> tuple[IPNetwork, ...]:
    out = []
    for i, text in enumerate(_strings(m, key, path)):
        try:
            out.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise PolicySpecError(
                f"{path}.{key}[{i}]", f"{text!r} is not an IP address or CIDR"
            ) from None
    return tuple(out)


def _ports(m: dict[str, Any], key: str, path: str) -> tuple[int, ...]:
    out = []
    for i, text in enumerate(_strings(m, key, path)):
        if not (text.isascii() and text.isdigit()) or not 0 <= int(text) <= 0xFFFF:
            raise PolicySpecError(f"{path}.{key}[{i}]", f"{text!r} is not a port (0..65535)")
        out.append(int(text))
    return tuple(out)
