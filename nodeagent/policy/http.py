"""Pure L7 authorization for the waypoint: one HTTP request against AuthorizationPolicies.

Istio's semantics (istio/api security/v1beta1/authorization.proto; istiod compiles them
to Envoy RBAC in pilot/pkg/security/authz/model/model.go and generator.go):

1. any DENY policy with a matching rule denies;
2. no ALLOW policy: allowed;
3. an ALLOW policy with a matching rule allows;
4. otherwise denied.

A rule matches when one of its `from` sources (or none given), one of its `to`
operations (or none given) and every `when` condition hold. Within a source or an
operation every set field must hold; a field's values are alternatives and its
`not*` values must all miss. Patterns are Istio's (`*`, `x*`, `*x`, exact):

* paths are compared with the path alone, without query or fragment (Envoy's
  `url_path`), not normalized; methods exactly (case-sensitive);
* hosts with the authority as sent, case-insensitively (istiod's HostMatcher
  sets ignore_case);
* `request.headers[NAME]` with the header's value (repeated values joined by ","),
  `*` holding when the header is present;
* principals with the peer identity without `spiffe://`, namespaces with its
  namespace; both need an identity (a plaintext peer matches neither).

No I/O: the waypoint builds an `HttpAttributes` per request.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeVar

from nodeagent.model.identity import Identity
from nodeagent.model.policy import (
    Action,
    Condition,
    ConditionKey,
    HttpAuthorization,
    HttpOperation,
    HttpRule,
    HttpSource,
    IPAddress,
    StringMatch,
    StringMatchKind,
    parse_pattern,
    parse_principal,
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpAttributes:
    """What L7 authorization knows about one request."""

    source_identity: Identity | None  # the peer's verified identity (the client's)
    source_ip: IPAddress
    destination_port: int  # the service port the client dialled
    method: str
    path: str  # as sent, with its query
    host: str  # the authority as sent
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """Lowercase names; repeated values joined by ","."""
    destination_ip: IPAddress | None = None  # the address the client dialled

    @property
    def url_path(self) -> str:
        return self.path.split("?", 1)[0].split("#", 1)[0]

    @property
    def principal(self) -> str | None:
        if self.source_identity is None:
            return None
        return str(self.source_identity).removeprefix("spiffe://")


@dataclass(frozen=True, slots=True)
class HttpDecision:
    """The outcome, with the policy that decided it (`namespace/name`) and why."""

    allowed: bool
    reason: str
    policy: str = ""


ALLOWED_NO_POLICY = HttpDecision(True, "no authorization policy applies")


def authorize(policies: Iterable[HttpAuthorization], request: HttpAttributes) -> HttpDecision:
    """Decide `request` against the policies attached where it is served."""
    allow: list[HttpAuthorization] = []
    for policy in sorted(policies, key=lambda p: p.key):
        if policy.action is Action.DENY:
            index = matching_rule(policy, request)
            if index is not None:
                return HttpDecision(
                    False, f"denied by DENY policy {policy.key} rules[{index}]", policy.key
                )
        else:
            allow.append(policy)
    if not allow:
        return ALLOWED_NO_POLICY
    for policy in allow:
        index = matching_rule(policy, request)
        if index is not None:
            return HttpDecision(True, f"allowed by {policy.key} rules[{index}]", policy.key)
    names = ", ".join(p.key for p in allow)
    return HttpDecision(False, f"no rule of the ALLOW policies ({names}) matches")


def matching_rule(policy: HttpAuthorization, request: HttpAttributes) -> int | None:
    """Index of the first rule of `policy` that matches, or None (no rules: never)."""
    for index, rule in enumerate(policy.rules):
        if rule_matches(rule, request):
            return index
    return None


def rule_matches(rule: HttpRule, request: HttpAttributes) -> bool:
    return (
        (not rule.sources or any(_source_holds(s, request) for s in rule.sources))
        and (not rule.operations or any(_operation_holds(o, request) for o in rule.operations))
        and all(_condition_holds(c, request) for c in rule.conditions)
    )


def _source_holds(s: HttpSource, r: HttpAttributes) -> bool:
    principal = r.principal
    namespace = r.source_identity.namespace if r.source_identity is not None else None
    return (
        _field(s.principals, s.not_principals, lambda m: _string(m, principal))
        and _field(s.namespaces, s.not_namespaces, lambda m: _string(m, namespace))
        and _field(s.ip_blocks, s.not_ip_blocks, lambda n: r.source_ip in n)
    )


def _operation_holds(o: HttpOperation, r: HttpAttributes) -> bool:
    host = r.host.lower()
    path = r.url_path
    return (
        _field(o.ports, o.not_ports, lambda p: p == r.destination_port)
        and _field(o.methods, o.not_methods, lambda m: _string(m, r.method))
        and _field(o.paths, o.not_paths, lambda m: _string(m, path))
        and _field(o.hosts, o.not_hosts, lambda m: _string(m, host, fold=True))
    )


def _condition_holds(c: Condition, r: HttpAttributes) -> bool:
    def one(value: str) -> bool:
        attr = c.attribute
        if attr is ConditionKey.REQUEST_HEADER:
            present = r.headers.get(c.header)
            # Envoy's present_match holds for an empty value too.
            if value == "*":
                return present is not None
            return present is not None and _string(parse_pattern(value), present)
        if attr is ConditionKey.SOURCE_IP:
            return r.source_ip in ipaddress.ip_network(value, strict=False)
        if attr is ConditionKey.DESTINATION_IP:
            return r.destination_ip is not None and r.destination_ip in ipaddress.ip_network(
                value, strict=False
            )
        if attr is ConditionKey.DESTINATION_PORT:
            return int(value) == r.destination_port
        if attr is ConditionKey.SOURCE_PRINCIPAL:
            return _string(parse_principal(value), r.principal)
        namespace = r.source_identity.namespace if r.source_identity is not None else None
        return _string(parse_pattern(value), namespace)

    return _field(c.values, c.not_values, one)


def _field(values: tuple[T, ...], not_values: tuple[T, ...], holds: Callable[[T], bool]) -> bool:
    """Values are alternatives (one must hold, when given); not-values must all miss."""
    if values and not any(holds(v) for v in values):
        return False
    return not any(holds(v) for v in not_values)


def _string(m: StringMatch, value: str | None, *, fold: bool = False) -> bool:
    if value is None:
        return False
    expected = m.value.lower() if fold else m.value
    kind = m.kind
    if kind is StringMatchKind.PRESENCE:
        return value != ""
    if kind is StringMatchKind.PREFIX:
        return value.startswith(expected)
    if kind is StringMatchKind.SUFFIX:
        return value.endswith(expected)
    return value == expected
