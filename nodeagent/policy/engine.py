"""L4 authorization with Istio ambient's semantics, and an explanation of every decision.

Order of evaluation (as ztunnel's `assert_rbac`):

1. Dry-run policies are evaluated and reported in the Decision, never enforced.
2. Any matching DENY policy rejects ("explicitly denied by: ns/name").
3. If there is no ALLOW policy, the connection is allowed.
4. If an ALLOW policy matches, the connection is allowed.
5. Otherwise it is rejected ("allow policies exist, but none allowed").

Matching:

* A policy matches when ANY of its rules matches. A policy with no rules matches
  nothing: an ALLOW with no rules is "allow nothing" (it still counts as an ALLOW
  policy, so it denies everything not allowed by another policy), and a DENY with
  no rules is a no-op. This is Istio's choice; we keep it.
* A rule matches when ALL its clauses match; a rule with no clauses matches
  everything (Istio's `rules: [{}]` "allow all").
* A clause matches when ANY of its non-empty matches matches. Empty matches are
  skipped; a clause with no non-empty match counts as true.
* In a match every set field must hold (AND); values inside one field are
  alternatives (OR); a `not_*` field holds when none of its values match.
* `principals` are compared with the identity without `spiffe://`; `namespaces`
  and `service_accounts` use the namespace/SA of the peer's SPIFFE identity.
  A plaintext connection has no identity: positive identity fields never match
  it, and every identity value counts as "not matching", so
  `not_principals: [presence]` holds (that is how STRICT mTLS is expressed).
* Destination ip/port are the real target (for HBONE, not 15008). IPv4-mapped
  IPv6 addresses are compared as the IPv4 address they carry.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from nodeagent.model.address import unmap
from nodeagent.model.identity import Identity
from nodeagent.model.policy import (
    Action,
    Authorization,
    Clause,
    ConnectionAttributes,
    IPAddress,
    IPNetwork,
    Match,
    Rule,
    Scope,
    ServiceAccountMatch,
    StringMatch,
    StringMatchKind,
)


class DecisionReason(enum.Enum):
    NO_POLICIES = "no_policies"  # nothing applies: allowed
    NO_ALLOW_POLICIES = "no_allow_policies"  # only DENY policies, none matched: allowed
    EXPLICITLY_ALLOWED = "explicitly_allowed"  # an ALLOW rule matched
    EXPLICITLY_DENIED = "explicitly_denied"  # a DENY rule matched
    NOT_ALLOWED = "not_allowed"  # ALLOW policies exist, none matched


@dataclass(frozen=True, slots=True)
class PolicyMatch:
    """A policy whose rule `rule` matched the connection."""

    policy: str  # namespace/name
    action: Action
    rule: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """The outcome of `evaluate`, with enough detail to explain it."""

    allowed: bool
    reason: DecisionReason
    policy: str | None = None  # the deciding policy (namespace/name), when one decided
    rule: int | None = None  # index of the deciding rule in that policy
    dry_run_matches: tuple[PolicyMatch, ...] = ()
    # What the decision would have been if the dry-run policies were enforced too
    # (None when no dry-run policy applies).
    dry_run_allowed: bool | None = None

    @property
    def error_message(self) -> str:
        """The rejection text ztunnel logs (empty when allowed)."""
        if self.reason is DecisionReason.EXPLICITLY_DENIED:
            return f"explicitly denied by: {self.policy}"
        if self.reason is DecisionReason.NOT_ALLOWED:
            return "allow policies exist, but none allowed"
        return ""

    def explain(self) -> str:
        """One line saying what decided, e.g. `denied by default/deny-sleep rule 0`."""
        if self.reason is DecisionReason.NO_POLICIES:
            text = "no policies: allowed"
        elif self.reason is DecisionReason.NO_ALLOW_POLICIES:
            text = "no allow policies and no deny policy matched: allowed"
        elif self.reason is DecisionReason.EXPLICITLY_ALLOWED:
            text = f"allowed by {self.policy} rule {self.rule}"
        elif self.reason is DecisionReason.EXPLICITLY_DENIED:
            text = f"denied by {self.policy} rule {self.rule}"
        else:
            text = "allow policies exist, but none allowed: denied"
        if self.dry_run_matches:
            matched = ", ".join(
                f"{m.action.name} {m.policy} rule {m.rule}" for m in self.dry_run_matches
            )
            verdict = "allow" if self.dry_run_allowed else "deny"
            text += f" (dry-run: {matched} matched; enforced they would {verdict})"
        return text


def string_matches(match: StringMatch, value: str | None) -> bool:
    """Whether `value` satisfies `match`; None (no identity) satisfies nothing."""
    if value is None:
        return False
    kind = match.kind
    if kind is StringMatchKind.EXACT:
        return value == match.value
    if kind is StringMatchKind.PREFIX:
        return value.startswith(match.value)
    if kind is StringMatchKind.SUFFIX:
        return value.endswith(match.value)
    return value != ""  # PRESENCE


def _any_string(matches: tuple[StringMatch, ...], value: str | None) -> bool:
    return any(string_matches(m, value) for m in matches)


def _any_ip(networks: tuple[IPNetwork, ...], ip: IPAddress) -> bool:
    # `in` is False (not an error) across address families.
    return any(ip in net for net in networks)


def _any_sa(accounts: tuple[ServiceAccountMatch, ...], peer: Identity | None) -> bool:
    if peer is None:
        return False
    return any(
        a.namespace == peer.namespace and a.service_account == peer.service_account
        for a in accounts
    )


@dataclass(frozen=True, slots=True)
class _Peer:
    """The connection's attributes in the form matching needs, computed once."""

    identity: Identity | None
    principal: str | None
    namespace: str | None
    source: IPAddress
    destination: IPAddress
    port: int


def _peer(conn: ConnectionAttributes) -> _Peer:
    identity = conn.source_identity
    return _Peer(
        identity,
        identity.principal if identity is not None else None,
        identity.namespace if identity is not None else None,
        unmap(conn.source_ip),
        unmap(conn.destination_ip),
        conn.destination_port,
    )


def _match_holds(match: Match, v: _Peer) -> bool:
    # Cheapest first; each set field must hold.
    if match.destination_ports and v.port not in match.destination_ports:
        return False
    if match.not_destination_ports and v.port in match.not_destination_ports:
        return False
    if match.source_ips and not _any_ip(match.source_ips, v.source):
        return False
    if match.not_source_ips and _any_ip(match.not_source_ips, v.source):
        return False
    if match.destination_ips and not _any_ip(match.destination_ips, v.destination):
        return False
    if match.not_destination_ips and _any_ip(match.not_destination_ips, v.destination):
        return False
    if match.principals and not _any_string(match.principals, v.principal):
        return False
    if match.not_principals and _any_string(match.not_principals, v.principal):
        return False
    if match.namespaces and not _any_string(match.namespaces, v.namespace):
        return False
    if match.not_namespaces and _any_string(match.not_namespaces, v.namespace):
        return False
    if match.service_accounts and not _any_sa(match.service_accounts, v.identity):
        return False
    return not (match.not_service_accounts and _any_sa(match.not_service_accounts, v.identity))


def _clause_holds(clause: Clause, v: _Peer) -> bool:
    failed = False
    for match in clause.matches:
        if _match_holds(match, v):
            if not match.is_empty:  # an empty match "holds" but is skipped
                return True
        else:
            failed = True  # only a non-empty match can fail
    return not failed


def _matching_rule(policy: Authorization, v: _Peer) -> int | None:
    for index, rule in enumerate(policy.rules):
        for clause in rule.clauses:
            if not _clause_holds(clause, v):
                break
        else:
            return index
    return None


def match_holds(match: Match, conn: ConnectionAttributes) -> bool:
    """Whether every set field of `match` holds for `conn` (an empty match holds)."""
    return _match_holds(match, _peer(conn))


def clause_holds(clause: Clause, conn: ConnectionAttributes) -> bool:
    """ANY non-empty match; a clause with none counts as true."""
    return _clause_holds(clause, _peer(conn))


def rule_holds(rule: Rule, conn: ConnectionAttributes) -> bool:
    """ALL clauses (a rule with no clauses matches everything)."""
    v = _peer(conn)
    return all(_clause_holds(c, v) for c in rule.clauses)


def matching_rule(policy: Authorization, conn: ConnectionAttributes) -> int | None:
    """Index of the first rule of `policy` that matches `conn`, or None."""
    return _matching_rule(policy, _peer(conn))


def _enforce(
    policies: Sequence[Authorization], v: _Peer
) -> tuple[bool, DecisionReason, str | None, int | None]:
    if not policies:
        return True, DecisionReason.NO_POLICIES, None, None
    has_allow = False
    for policy in policies:
        if policy.action is Action.DENY:
            rule = _matching_rule(policy, v)
            if rule is not None:
                return False, DecisionReason.EXPLICITLY_DENIED, policy.key, rule
        else:
            has_allow = True
    if not has_allow:
        return True, DecisionReason.NO_ALLOW_POLICIES, None, None
    for policy in policies:
        if policy.action is Action.ALLOW:
            rule = _matching_rule(policy, v)
            if rule is not None:
                return True, DecisionReason.EXPLICITLY_ALLOWED, policy.key, rule
    return False, DecisionReason.NOT_ALLOWED, None, None


def evaluate(policies: Iterable[Authorization], conn: ConnectionAttributes) -> Decision:
    """Authorize `conn` against the policies that apply to its destination.

    `policies` should already be the destination's policy set (see
    `applicable_policies`). Policies are checked in the order given; when several
    match, the first one is named as the decider.
    """
    v = _peer(conn)
    ordered = policies if isinstance(policies, (tuple, list)) else tuple(policies)
    if not any(p.dry_run for p in ordered):  # the common case
        allowed, reason, key, rule = _enforce(ordered, v)
        return Decision(allowed=allowed, reason=reason, policy=key, rule=rule)
    allowed, reason, key, rule = _enforce([p for p in ordered if not p.dry_run], v)
    dry_matches: list[PolicyMatch] = []
    for policy in ordered:
        if policy.dry_run:
            index = _matching_rule(policy, v)
            if index is not None:
                dry_matches.append(PolicyMatch(policy.key, policy.action, index))
    dry_allowed: bool | None = _enforce(ordered, v)[0]
    return Decision(
        allowed=allowed,
        reason=reason,
        policy=key,
        rule=rule,
        dry_run_matches=tuple(dry_matches),
        dry_run_allowed=dry_allowed,
    )


def applicable_policies(
    policies: Iterable[Authorization], namespace: str, selected: Iterable[str] = ()
) -> tuple[Authorization, ...]:
    """The policy set of a workload in `namespace` that lists the keys `selected`.

    GLOBAL policies, NAMESPACE policies of the workload's namespace, and the
    WORKLOAD_SELECTOR policies whose key the workload lists. Keys that name no
    known policy are ignored (the caller may warn). The result is ordered by key
    so that the named decider is stable.
    """
    wanted = set(selected)
    chosen = [
        p
        for p in policies
        if p.scope is Scope.GLOBAL
        or (p.scope is Scope.NAMESPACE and p.namespace == namespace)
        or p.key in wanted
    ]
    return tuple(sorted(chosen, key=lambda p: p.key))
