"""The L4 authorization engine as a table: every Match field, every combination rule."""

from __future__ import annotations

import ipaddress

import pytest

from nodeagent.model.policy import (
    Action,
    Authorization,
    Clause,
    ConnectionAttributes,
    Match,
    Rule,
    Scope,
    ServiceAccountMatch,
    StringMatch,
)
from nodeagent.policy import DecisionReason, applicable_policies, evaluate

SLEEP = "spiffe://cluster.local/ns/default/sa/sleep"
ADMIN = "spiffe://cluster.local/ns/ops/sa/admin"

exact = StringMatch.exact
prefix = StringMatch.prefix
suffix = StringMatch.suffix
presence = StringMatch.presence


def net(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


def conn(
    identity: str | None = SLEEP,
    src: str = "10.1.0.7",
    dst: str = "10.2.0.5:8080",
) -> ConnectionAttributes:
    return ConnectionAttributes.build(src, dst, identity=identity)


def policy(
    *matches: Match,
    action: Action = Action.ALLOW,
    name: str = "p",
    namespace: str = "default",
    dry_run: bool = False,
) -> Authorization:
    """A policy with one rule, one clause, holding `matches` (OR)."""
    return Authorization(
        name=name,
        namespace=namespace,
        action=action,
        rules=(Rule((Clause(matches),)),),
        dry_run=dry_run,
    )


def allowed_by(match: Match, connection: ConnectionAttributes) -> bool:
    """Whether a single ALLOW policy with this one match admits the connection."""
    return evaluate([policy(match)], connection).allowed


# (id, match, connection, expected match result). Each field appears positive and
# negated, with a matching and a non-matching connection.
FIELD_CASES = [
    # namespaces: from the peer's SPIFFE identity
    ("ns-exact-hit", Match(namespaces=(exact("default"),)), conn(), True),
    ("ns-exact-miss", Match(namespaces=(exact("ops"),)), conn(), False),
    ("ns-prefix-hit", Match(namespaces=(prefix("def"),)), conn(), True),
    ("ns-prefix-miss", Match(namespaces=(prefix("fault"),)), conn(), False),
    ("ns-suffix-hit", Match(namespaces=(suffix("ault"),)), conn(), True),
    ("ns-suffix-miss", Match(namespaces=(suffix("def"),)), conn(), False),
    ("ns-presence-hit", Match(namespaces=(presence(),)), conn(), True),
    ("ns-presence-plaintext", Match(namespaces=(presence(),)), conn(None), False),
    ("ns-values-or", Match(namespaces=(exact("ops"), exact("default"))), conn(), True),
    ("ns-plaintext", Match(namespaces=(exact("default"),)), conn(None), False),
    ("not-ns-hit", Match(not_namespaces=(exact("ops"),)), conn(), True),
    ("not-ns-miss", Match(not_namespaces=(exact("default"),)), conn(), False),
    ("not-ns-any-of", Match(not_namespaces=(exact("ops"), prefix("d"))), conn(), False),
    ("not-ns-plaintext", Match(not_namespaces=(exact("default"),)), conn(None), True),
    # principals: identity without spiffe://
    (
        "principal-exact-hit",
        Match(principals=(exact("cluster.local/ns/default/sa/sleep"),)),
        conn(),
        True,
    ),
    ("principal-with-scheme-never", Match(principals=(exact(SLEEP),)), conn(), False),
    (
        "principal-prefix-hit",
        Match(principals=(prefix("cluster.local/ns/default/"),)),
        conn(),
        True,
    ),
    ("principal-prefix-miss", Match(principals=(prefix("cluster.local/ns/ops/"),)), conn(), False),
    ("principal-suffix-hit", Match(principals=(suffix("/sa/sleep"),)), conn(), True),
    ("principal-suffix-miss", Match(principals=(suffix("/sa/admin"),)), conn(), False),
    ("principal-presence-hit", Match(principals=(presence(),)), conn(), True),
    ("principal-presence-plaintext", Match(principals=(presence(),)), conn(None), False),
    (
        "principal-values-or",
        Match(principals=(suffix("/sa/admin"), suffix("/sa/sleep"))),
        conn(),
        True,
    ),
    ("principal-exact-plaintext", Match(principals=(exact(""),)), conn(None), False),
    ("not-principal-hit", Match(not_principals=(suffix("/sa/admin"),)), conn(), True),
    ("not-principal-miss", Match(not_principals=(suffix("/sa/sleep"),)), conn(), False),
    ("not-principal-presence-mtls", Match(not_principals=(presence(),)), conn(), False),
    ("not-principal-presence-plaintext", Match(not_principals=(presence(),)), conn(None), True),
    # source_ips: IPv4 and IPv6 CIDRs
    ("src-v4-hit", Match(source_ips=net("10.1.0.0/16")), conn(), True),
    ("src-v4-host-hit", Match(source_ips=net("10.1.0.7/32")), conn(), True),
    ("src-v4-miss", Match(source_ips=net("10.2.0.0/16")), conn(), False),
    ("src-v4-values-or", Match(source_ips=net("192.168.0.0/16", "10.0.0.0/8")), conn(), True),
    ("src-v6-hit", Match(source_ips=net("fd00:1::/64")), conn(src="fd00:1::7"), True),
    ("src-v6-miss", Match(source_ips=net("fd00:2::/64")), conn(src="fd00:1::7"), False),
    ("src-v6-rule-v4-peer", Match(source_ips=net("::/0")), conn(), False),
    ("src-v4-mapped-peer", Match(source_ips=net("10.1.0.0/16")), conn(src="::ffff:10.1.0.7"), True),
    ("not-src-v4-hit", Match(not_source_ips=net("10.9.0.0/16")), conn(), True),
    ("not-src-v4-miss", Match(not_source_ips=net("10.1.0.0/16")), conn(), False),
    ("not-src-v6-miss", Match(not_source_ips=net("fd00:1::/64")), conn(src="fd00:1::7"), False),
    ("not-src-v6-hit", Match(not_source_ips=net("fd00:2::/64")), conn(src="fd00:1::7"), True),
    # destination_ips
    ("dst-v4-hit", Match(destination_ips=net("10.2.0.0/24")), conn(), True),
    ("dst-v4-miss", Match(destination_ips=net("10.3.0.0/24")), conn(), False),
    ("dst-v6-hit", Match(destination_ips=net("fd00:2::5/128")), conn(dst="[fd00:2::5]:80"), True),
    ("dst-v6-miss", Match(destination_ips=net("fd00:3::/48")), conn(dst="[fd00:2::5]:80"), False),
    ("not-dst-v4-hit", Match(not_destination_ips=net("10.3.0.0/24")), conn(), True),
    ("not-dst-v4-miss", Match(not_destination_ips=net("10.2.0.5/32")), conn(), False),
    (
        "not-dst-v6-miss",
        Match(not_destination_ips=net("fd00::/8")),
        conn(dst="[fd00:2::5]:80"),
        False,
    ),
    # destination_ports
    ("port-hit", Match(destination_ports=(8080,)), conn(), True),
    ("port-miss", Match(destination_ports=(9090,)), conn(), False),
    ("port-values-or", Match(destination_ports=(9090, 8080)), conn(), True),
    ("not-port-hit", Match(not_destination_ports=(9090,)), conn(), True),
    ("not-port-miss", Match(not_destination_ports=(8080, 9090)), conn(), False),
    # service_accounts: (namespace, sa) from the identity
    ("sa-hit", Match(service_accounts=(ServiceAccountMatch("default", "sleep"),)), conn(), True),
    ("sa-wrong-ns", Match(service_accounts=(ServiceAccountMatch("ops", "sleep"),)), conn(), False),
    ("sa-wrong-sa", Match(service_accounts=(ServiceAccountMatch("default", "x"),)), conn(), False),
    (
        "sa-values-or",
        Match(
            service_accounts=(
                ServiceAccountMatch("ops", "admin"),
                ServiceAccountMatch("default", "sleep"),
            )
        ),
        conn(),
        True,
    ),
    (
        "sa-plaintext",
        Match(service_accounts=(ServiceAccountMatch("default", "sleep"),)),
        conn(None),
        False,
    ),
    (
        "not-sa-hit",
        Match(not_service_accounts=(ServiceAccountMatch("ops", "admin"),)),
        conn(),
        True,
    ),
    (
        "not-sa-miss",
        Match(not_service_accounts=(ServiceAccountMatch("default", "sleep"),)),
        conn(),
        False,
    ),
    (
        "not-sa-plaintext",
        Match(not_service_accounts=(ServiceAccountMatch("default", "sleep"),)),
        conn(None),
        True,
    ),
    # fields in one Match are AND-ed
    (
        "fields-and-all-hold",
        Match(
            namespaces=(exact("default"),),
            source_ips=net("10.1.0.0/16"),
            destination_ports=(8080,),
        ),
        conn(),
        True,
    ),
    (
        "fields-and-one-fails",
        Match(
            namespaces=(exact("default"),),
            source_ips=net("10.1.0.0/16"),
            destination_ports=(9090,),
        ),
        conn(),
        False,
    ),
    (
        "positive-and-negative-same-field",
        Match(namespaces=(prefix("d"),), not_namespaces=(exact("default"),)),
        conn(),
        False,
    ),
]


@pytest.mark.parametrize(
    ("match", "connection", "expected"),
    [c[1:] for c in FIELD_CASES],
    ids=[c[0] for c in FIELD_CASES],
)
def test_match_field(match: Match, connection: ConnectionAttributes, expected: bool) -> None:
    assert allowed_by(match, connection) is expected


def test_every_match_field_is_covered_by_the_table() -> None:
    covered = {
        name
        for _, match, _, _ in FIELD_CASES
        for name in Match.__dataclass_fields__
        if getattr(match, name)
    }
    assert covered == set(Match.__dataclass_fields__)


def test_every_string_match_kind_is_covered() -> None:
    kinds = {
        sm.kind
        for _, match, _, _ in FIELD_CASES
        for sm in (*match.namespaces, *match.principals, *match.not_principals)
    }
    assert {k.value for k in kinds} == {"exact", "prefix", "suffix", "presence"}


# ---- combination rules -------------------------------------------------------

DENY_SLEEP = policy(Match(principals=(suffix("/sa/sleep"),)), action=Action.DENY, name="deny-sleep")
ALLOW_SLEEP = policy(Match(principals=(suffix("/sa/sleep"),)), name="allow-sleep")
ALLOW_ADMIN = policy(Match(principals=(suffix("/sa/admin"),)), name="allow-admin")
DENY_ADMIN = policy(Match(principals=(suffix("/sa/admin"),)), action=Action.DENY, name="deny-admin")


def test_no_policies_allow_and_say_so() -> None:
    decision = evaluate([], conn())
    assert decision.allowed
    assert decision.reason is DecisionReason.NO_POLICIES
    assert decision.explain() == "no policies: allowed"
    assert decision.error_message == ""


def test_matching_deny_wins_over_matching_allow() -> None:
    decision = evaluate([ALLOW_SLEEP, DENY_SLEEP], conn())
    assert not decision.allowed
    assert decision.reason is DecisionReason.EXPLICITLY_DENIED
    assert decision.policy == "default/deny-sleep"
    assert decision.rule == 0
    assert decision.explain() == "denied by default/deny-sleep rule 0"
    assert decision.error_message == "explicitly denied by: default/deny-sleep"


def test_only_deny_policies_that_do_not_match_allow() -> None:
    decision = evaluate([DENY_ADMIN], conn())
    assert decision.allowed
    assert decision.reason is DecisionReason.NO_ALLOW_POLICIES


def test_allow_policies_require_a_match() -> None:
    decision = evaluate([ALLOW_ADMIN], conn())
    assert not decision.allowed
    assert decision.reason is DecisionReason.NOT_ALLOWED
    assert decision.policy is None
    assert "allow policies exist, but none allowed" in decision.explain()
    assert decision.error_message == "allow policies exist, but none allowed"


def test_any_matching_allow_allows_and_is_named() -> None:
    decision = evaluate([ALLOW_ADMIN, ALLOW_SLEEP, DENY_ADMIN], conn())
    assert decision.allowed
    assert decision.reason is DecisionReason.EXPLICITLY_ALLOWED
    assert decision.explain() == "allowed by default/allow-sleep rule 0"


def test_rules_are_or_and_the_matching_rule_index_is_reported() -> None:
    p = Authorization(
        name="two-rules",
        namespace="ns1",
        rules=(
            Rule((Clause((Match(destination_ports=(1,)),)),)),
            Rule((Clause((Match(destination_ports=(8080,)),)),)),
        ),
    )
    decision = evaluate([p], conn())
    assert decision.allowed
    assert (decision.policy, decision.rule) == ("ns1/two-rules", 1)
    assert decision.explain() == "allowed by ns1/two-rules rule 1"


@pytest.mark.parametrize(
    ("second_port", "expected"),
    [(8080, True), (9090, False)],
)
def test_clauses_in_a_rule_are_and(second_port: int, expected: bool) -> None:
    rule = Rule(
        (
            Clause((Match(namespaces=(exact("default"),)),)),
            Clause((Match(destination_ports=(second_port,)),)),
        )
    )
    p = Authorization(name="and", namespace="default", rules=(rule,))
    assert evaluate([p], conn()).allowed is expected


def test_matches_in_a_clause_are_or() -> None:
    p = policy(Match(destination_ports=(1,)), Match(namespaces=(exact("default"),)))
    assert evaluate([p], conn()).allowed


def test_empty_match_is_skipped_in_a_clause() -> None:
    # The empty match must not make the clause true when a real one fails.
    p = policy(Match(), Match(destination_ports=(1,)))
    assert not evaluate([p], conn()).allowed


def test_clause_of_only_empty_matches_counts_as_true() -> None:
    assert evaluate([policy(Match())], conn()).allowed


def test_rule_with_no_clauses_matches_everything() -> None:
    allow_all = Authorization(name="allow-all", namespace="default", rules=(Rule(),))
    assert evaluate([allow_all], conn(None)).allowed


def test_allow_with_no_rules_denies_everything() -> None:
    allow_nothing = Authorization(name="allow-nothing", namespace="default")
    decision = evaluate([allow_nothing], conn())
    assert not decision.allowed
    assert decision.reason is DecisionReason.NOT_ALLOWED


def test_allow_with_no_rules_does_not_block_another_allow() -> None:
    allow_nothing = Authorization(name="allow-nothing", namespace="default")
    assert evaluate([allow_nothing, ALLOW_SLEEP], conn()).allowed


def test_deny_with_no_rules_is_a_noop() -> None:
    deny_nothing = Authorization(name="deny-nothing", namespace="default", action=Action.DENY)
    decision = evaluate([deny_nothing], conn())
    assert decision.allowed
    assert decision.reason is DecisionReason.NO_ALLOW_POLICIES


def test_dry_run_deny_is_reported_not_enforced() -> None:
    shadow = policy(
        Match(principals=(suffix("/sa/sleep"),)),
        action=Action.DENY,
        name="shadow-deny",
        dry_run=True,
    )
    decision = evaluate([shadow], conn())
    assert decision.allowed
    assert decision.reason is DecisionReason.NO_POLICIES
    assert [(m.policy, m.action, m.rule) for m in decision.dry_run_matches] == [
        ("default/shadow-deny", Action.DENY, 0)
    ]
    assert decision.dry_run_allowed is False
    assert "dry-run: DENY default/shadow-deny rule 0 matched" in decision.explain()
    assert "they would deny" in decision.explain()


def test_dry_run_allow_does_not_make_allow_policies_exist() -> None:
    shadow = policy(Match(destination_ports=(1,)), name="shadow-allow", dry_run=True)
    decision = evaluate([shadow], conn())
    assert decision.allowed
    assert decision.dry_run_matches == ()
    assert decision.dry_run_allowed is False  # enforced, it would deny this connection


def test_dry_run_absent_leaves_shadow_fields_empty() -> None:
    decision = evaluate([ALLOW_SLEEP], conn())
    assert decision.dry_run_matches == ()
    assert decision.dry_run_allowed is None


def test_strict_mtls_policy_refuses_plaintext_only() -> None:
    strict = Authorization(
        name="istio_converted_static_strict",
        namespace="istio-system",
        scope=Scope.WORKLOAD_SELECTOR,
        action=Action.DENY,
        rules=(Rule((Clause((Match(not_principals=(presence(),)),)),)),),
    )
    assert evaluate([strict], conn()).allowed
    plaintext = evaluate([strict], conn(None))
    assert not plaintext.allowed
    assert plaintext.explain() == "denied by istio-system/istio_converted_static_strict rule 0"


def test_principal_allow_refuses_plaintext_but_ip_allow_admits_it() -> None:
    by_ip = policy(Match(source_ips=net("10.1.0.0/16")), name="by-ip")
    assert not evaluate([ALLOW_SLEEP], conn(None)).allowed
    assert evaluate([by_ip], conn(None)).allowed


def test_first_matching_deny_is_named() -> None:
    other = policy(Match(destination_ports=(8080,)), action=Action.DENY, name="deny-port")
    assert evaluate([other, DENY_SLEEP], conn()).policy == "default/deny-port"


def test_applicable_policies_selects_by_scope_and_key() -> None:
    glob = Authorization(name="g", namespace="istio-system", scope=Scope.GLOBAL)
    mine = Authorization(name="n", namespace="default", scope=Scope.NAMESPACE)
    theirs = Authorization(name="n", namespace="ops", scope=Scope.NAMESPACE)
    selected = Authorization(name="s", namespace="default", scope=Scope.WORKLOAD_SELECTOR)
    unselected = Authorization(name="u", namespace="default", scope=Scope.WORKLOAD_SELECTOR)
    chosen = applicable_policies(
        [unselected, theirs, selected, mine, glob],
        "default",
        ["default/s", "default/missing"],
    )
    assert [p.key for p in chosen] == ["default/n", "default/s", "istio-system/g"]
