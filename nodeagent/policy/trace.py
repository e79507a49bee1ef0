"""A detailed account of how each policy treated a connection, for humans.

`evaluate` stays lean for the connection path; `trace` is for `explain` output in
the CLI and admin API: per policy, the rule that matched, or for every rule the
first clause and field that failed, e.g.
`rule 0 clause 0: principals [*/sa/admin] do not match cluster.local/ns/default/sa/sleep`.

`unselected` answers the other question a user asks when a policy seems to do
nothing: it exists in the destination's namespace, but does its selector pick
this workload, or any workload at all? (The control plane resolves selectors; the
agent only sees which workloads name the policy.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from nodeagent.model.address import unmap
from nodeagent.model.policy import (
    Action,
    Authorization,
    Clause,
    ConnectionAttributes,
    Match,
    Scope,
    ServiceAccountMatch,
    StringMatch,
)
from nodeagent.model.workload import Workload
from nodeagent.policy.engine import _any_ip, _any_sa, _any_string


@dataclass(frozen=True, slots=True)
class PolicyTrace:
    policy: str  # namespace/name
    action: Action
    dry_run: bool
    matched_rule: int | None  # first matching rule, None when the policy did not match
    why_not: tuple[str, ...]  # when it did not match: one line per rule

    def render(self) -> str:
        head = f"{self.action.name}{' (dry-run)' if self.dry_run else ''} {self.policy}"
        if self.matched_rule is not None:
            return f"{head}: rule {self.matched_rule} matches"
        if not self.why_not:
            return f"{head}: no rules, matches nothing"
        return f"{head}: no match; " + "; ".join(self.why_not)


def _strings(values: tuple[StringMatch, ...]) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"


def _sas(values: tuple[ServiceAccountMatch, ...]) -> str:
    return "[" + ", ".join(f"{v.namespace}/{v.service_account}" for v in values) + "]"


def match_mismatch(match: Match, conn: ConnectionAttributes) -> str | None:
    """The first field of `match` that fails for `conn`, as text; None when it holds."""
    peer = conn.source_identity
    principal = peer.principal if peer is not None else None
    namespace = peer.namespace if peer is not None else None
    who = principal if principal is not None else "a plaintext peer (no identity)"
    ns = namespace if namespace is not None else "a plaintext peer (no identity)"
    src, dst, port = (
        unmap(conn.source_ip),
        unmap(conn.destination_ip),
        conn.destination_port,
    )
    if match.destination_ports and port not in match.destination_ports:
        return f"destination_ports {list(match.destination_ports)} do not include {port}"
    if match.not_destination_ports and port in match.not_destination_ports:
        return f"not_destination_ports {list(match.not_destination_ports)} include {port}"
    if match.source_ips and not _any_ip(match.source_ips, src):
        return f"source_ips {[str(n) for n in match.source_ips]} do not contain {src}"
    if match.not_source_ips and _any_ip(match.not_source_ips, src):
        return f"not_source_ips {[str(n) for n in match.not_source_ips]} contain {src}"
    if match.destination_ips and not _any_ip(match.destination_ips, dst):
        return f"destination_ips {[str(n) for n in match.destination_ips]} do not contain {dst}"
    if match.not_destination_ips and _any_ip(match.not_destination_ips, dst):
        return f"not_destination_ips {[str(n) for n in match.not_destination_ips]} contain {dst}"
    if match.principals and not _any_string(match.principals, principal):
        return f"principals {_strings(match.principals)} do not match {who}"
    if match.not_principals and _any_string(match.not_principals, principal):
        return f"not_principals {_strings(match.not_principals)} match {who}"
    if match.namespaces and not _any_string(match.namespaces, namespace):
        return f"namespaces {_strings(match.namespaces)} do not match {ns}"
    if match.not_namespaces and _any_string(match.not_namespaces, namespace):
        return f"not_namespaces {_strings(match.not_namespaces)} match {ns}"
    if match.service_accounts and not _any_sa(match.service_accounts, peer):
        return f"service_accounts {_sas(match.service_accounts)} do not match {who}"
    if match.not_service_accounts and _any_sa(match.not_service_accounts, peer):
        return f"not_service_accounts {_sas(match.not_service_accounts)} match {who}"
    return None


def _clause_mismatch(clause: Clause, conn: ConnectionAttributes) -> str | None:
    reasons = []
    for match in clause.matches:
        if match.is_empty:
            continue
        reason = match_mismatch(match, conn)
        if reason is None:
            return None
        reasons.append(reason)
    return " or ".join(reasons) if reasons else None


def trace_policy(policy: Authorization, conn: ConnectionAttributes) -> PolicyTrace:
    why_not: list[str] = []
    for r, rule in enumerate(policy.rules):
        failed = None
        for c, clause in enumerate(rule.clauses):
            reason = _clause_mismatch(clause, conn)
            if reason is not None:
                failed = f"rule {r} clause {c}: {reason}"
                break
        if failed is None:
            return PolicyTrace(policy.key, policy.action, policy.dry_run, r, ())
        why_not.append(failed)
    return PolicyTrace(policy.key, policy.action, policy.dry_run, None, tuple(why_not))


def trace(policies: Iterable[Authorization], conn: ConnectionAttributes) -> tuple[PolicyTrace, ...]:
    """How every policy treated `conn`, in the order given."""
    return tuple(trace_policy(p, conn) for p in policies)


@dataclass(frozen=True, slots=True)
class UnselectedPolicy:
    """A selector policy of the destination's namespace that does not apply to it."""

    policy: str  # namespace/name
    selects: tuple[str, ...]  # namespace/name of the workloads it does select, sorted

    def render(self, destination: str) -> str:
        if not self.selects:
            return (
                f"policy {self.policy} is in the destination's namespace but its selector "
                "matches no workload: check its matchLabels against the pods' labels"
            )
        shown = ", ".join(self.selects[:3]) + (", ..." if len(self.selects) > 3 else "")
        return (
            f"policy {self.policy} does not select {destination}: its selector matches "
            f"{len(self.selects)} other workload{'' if len(self.selects) == 1 else 's'} ({shown})"
        )


def unselected(
    destination: Workload, policies: Iterable[Authorization], workloads: Iterable[Workload]
) -> tuple[UnselectedPolicy, ...]:
    """The WORKLOAD_SELECTOR policies of `destination`'s namespace that it does not
    name, each with the workloads that do name it, sorted by key."""
    candidates = sorted(
        (
            p.key
            for p in policies
            if p.scope is Scope.WORKLOAD_SELECTOR
            and p.namespace == destination.namespace
            and p.key not in destination.authorization_policies
        ),
    )
    if not candidates:
        return ()
    selected: dict[str, list[str]] = {key: [] for key in candidates}
    for w in workloads:
        for key in w.authorization_policies:
            if key in selected:
                selected[key].append(f"{w.namespace}/{w.name}")
    return tuple(UnselectedPolicy(key, tuple(sorted(selected[key]))) for key in candidates)
