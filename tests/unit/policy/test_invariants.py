"""Properties of the engine over generated policies and connections (Hypothesis)."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.model.identity import Identity
from nodeagent.model.policy import (
    Action,
    Authorization,
    Clause,
    ConnectionAttributes,
    Match,
    Rule,
    ServiceAccountMatch,
    StringMatch,
)
from nodeagent.policy import DecisionReason, evaluate, matching_rule, trace

NAMES = st.sampled_from(["default", "ops", "sleep", "admin", "d", ""])
string_matches = st.one_of(
    st.builds(StringMatch.exact, NAMES),
    st.builds(StringMatch.prefix, NAMES),
    st.builds(StringMatch.suffix, NAMES),
    st.just(StringMatch.presence()),
)
networks = st.sampled_from(
    [ipaddress.ip_network(c) for c in ("10.0.0.0/8", "10.1.0.0/16", "192.168.0.0/16", "fd00::/8")]
)
ports = st.sampled_from([80, 8080, 9090])
sas = st.builds(ServiceAccountMatch, NAMES, NAMES)


def _values(elements: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(elements, min_size=1, max_size=2).map(tuple)


FIELDS = {
    "namespaces": _values(string_matches),
    "not_namespaces": _values(string_matches),
    "principals": _values(string_matches),
    "not_principals": _values(string_matches),
    "source_ips": _values(networks),
    "not_source_ips": _values(networks),
    "destination_ips": _values(networks),
    "not_destination_ips": _values(networks),
    "destination_ports": _values(ports),
    "not_destination_ports": _values(ports),
    "service_accounts": _values(sas),
    "not_service_accounts": _values(sas),
}
# Sparse matches (a few fields set), like real policies, and cheap to generate.
matches = (
    st.lists(st.sampled_from(sorted(FIELDS)), max_size=3, unique=True)
    .flatmap(lambda names: st.fixed_dictionaries({n: FIELDS[n] for n in names}))
    .map(lambda kw: Match(**kw))
)
rules = st.builds(
    Rule,
    st.lists(st.builds(Clause, st.lists(matches, max_size=2).map(tuple)), max_size=2).map(tuple),
)
policies = st.builds(
    Authorization,
    name=st.sampled_from(["a", "b", "c"]),
    namespace=st.just("default"),
    action=st.sampled_from(Action),
    rules=st.lists(rules, max_size=2).map(tuple),
    dry_run=st.booleans(),
)
identities = st.none() | st.builds(
    Identity, st.just("cluster.local"), st.sampled_from(["default", "ops"]), NAMES.filter(bool)
)
connections = st.builds(
    ConnectionAttributes,
    source_ip=st.sampled_from([ipaddress.ip_address(a) for a in ("10.1.0.7", "fd00::7")]),
    source_identity=identities,
    destination_ip=st.sampled_from([ipaddress.ip_address(a) for a in ("10.2.0.5", "fd00::5")]),
    destination_port=ports,
)
policy_lists = st.lists(policies, max_size=4)


@settings(max_examples=100, deadline=None)
@given(policy_lists, connections)
def test_any_enforced_matching_deny_denies(pols: list[Authorization], conn: ConnectionAttributes):
    deny_matched = any(
        p.action is Action.DENY and not p.dry_run and matching_rule(p, conn) is not None
        for p in pols
    )
    decision = evaluate(pols, conn)
    if deny_matched:
        assert not decision.allowed
        assert decision.reason is DecisionReason.EXPLICITLY_DENIED


@settings(max_examples=100, deadline=None)
@given(policy_lists, connections)
def test_allowed_iff_no_deny_and_allow_satisfied(
    pols: list[Authorization], conn: ConnectionAttributes
):
    enforced = [p for p in pols if not p.dry_run]
    denies = [p for p in enforced if p.action is Action.DENY]
    allows = [p for p in enforced if p.action is Action.ALLOW]
    expected = not any(matching_rule(p, conn) is not None for p in denies) and (
        not allows or any(matching_rule(p, conn) is not None for p in allows)
    )
    assert evaluate(pols, conn).allowed is expected


@settings(max_examples=100, deadline=None)
@given(policy_lists, connections)
def test_dry_run_policies_never_change_the_decision(
    pols: list[Authorization], conn: ConnectionAttributes
):
    without = [p for p in pols if not p.dry_run]
    assert evaluate(pols, conn).allowed is evaluate(without, conn).allowed


@settings(max_examples=100, deadline=None)
@given(
    policy_lists,
    st.builds(
        Authorization,
        name=st.just("z"),
        namespace=st.just("x"),
        action=st.just(Action.DENY),
        rules=st.lists(rules, max_size=2).map(tuple),
    ),
    connections,
)
def test_adding_a_deny_never_turns_deny_into_allow(
    pols: list[Authorization], deny: Authorization, conn: ConnectionAttributes
):
    if not evaluate(pols, conn).allowed:
        assert not evaluate([*pols, deny], conn).allowed


@settings(max_examples=100, deadline=None)
@given(policy_lists, connections)
def test_trace_agrees_with_the_engine(pols: list[Authorization], conn: ConnectionAttributes):
    for policy, result in zip(pols, trace(pols, conn), strict=True):
        assert result.matched_rule == matching_rule(policy, conn)
        assert (result.matched_rule is None) == bool(result.why_not) or not policy.rules
