"""The detailed trace says, per policy, which rule matched or what failed."""

from __future__ import annotations

import ipaddress

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
from nodeagent.policy import UnselectedPolicy, match_mismatch, trace, unselected
from tests.builders import workload

SLEEP = "spiffe://cluster.local/ns/default/sa/sleep"


def _conn(identity: str | None = SLEEP) -> ConnectionAttributes:
    return ConnectionAttributes.build("10.1.0.7", "10.2.0.5:8080", identity=identity)


def test_trace_names_the_failing_field_per_rule() -> None:
    policy = Authorization(
        name="allow-admin",
        namespace="default",
        rules=(
            Rule((Clause((Match(principals=(StringMatch.suffix("/sa/admin"),)),)),)),
            Rule(
                (
                    Clause((Match(namespaces=(StringMatch.exact("default"),)),)),
                    Clause((Match(destination_ports=(9090,)),)),
                )
            ),
        ),
    )
    (result,) = trace([policy], _conn())
    assert result.matched_rule is None
    assert result.why_not == (
        "rule 0 clause 0: principals [*/sa/admin] do not match cluster.local/ns/default/sa/sleep",
        "rule 1 clause 1: destination_ports [9090] do not include 8080",
    )
    assert result.render().startswith("ALLOW default/allow-admin: no match; rule 0 clause 0")


def test_trace_reports_the_matching_rule_and_dry_run() -> None:
    policy = Authorization(
        name="deny-plaintext",
        namespace="ns",
        action=Action.DENY,
        rules=(Rule((Clause((Match(not_principals=(StringMatch.presence(),)),)),)),),
        dry_run=True,
    )
    (mtls,) = trace([policy], _conn())
    assert mtls.why_not == (
        "rule 0 clause 0: not_principals [*] match cluster.local/ns/default/sa/sleep",
    )
    (plain,) = trace([policy], _conn(None))
    assert plain.matched_rule == 0
    assert plain.render() == "DENY (dry-run) ns/deny-plaintext: rule 0 matches"


def test_trace_of_policy_without_rules() -> None:
    (result,) = trace([Authorization(name="nothing", namespace="ns")], _conn())
    assert result.render() == "ALLOW ns/nothing: no rules, matches nothing"


def test_mismatch_text_for_each_field_kind() -> None:
    conn = _conn(None)
    cases = {
        Match(source_ips=(ipaddress.ip_network("10.9.0.0/16"),)): "source_ips",
        Match(not_destination_ips=(ipaddress.ip_network("10.2.0.0/16"),)): "not_destination_ips",
        Match(not_destination_ports=(8080,)): "not_destination_ports",
        Match(namespaces=(StringMatch.exact("default"),)): "plaintext peer",
        Match(service_accounts=(ServiceAccountMatch("default", "sleep"),)): "service_accounts",
    }
    for match, expected in cases.items():
        text = match_mismatch(match, conn)
        assert text is not None and expected in text


def _selector(name: str, namespace: str = "demo") -> Authorization:
    return Authorization(name=name, namespace=namespace, scope=Scope.WORKLOAD_SELECTOR)


def test_a_selector_policy_of_the_namespace_that_selects_nothing_is_named() -> None:
    server = workload("server", namespace="demo", authorization_policies=("demo/mine",))
    other = workload("other", namespace="demo", authorization_policies=("demo/others",))
    policies = [
        _selector("mine"),  # applies: not reported
        _selector("others"),  # selects another workload
        _selector("typo"),  # selects nothing at all
        _selector("elsewhere", namespace="shop"),  # another namespace: not reported
        Authorization(name="ns-wide", namespace="demo", scope=Scope.NAMESPACE),
    ]
    found = unselected(server, policies, [server, other])
    assert found == (
        UnselectedPolicy("demo/others", ("demo/other",)),
        UnselectedPolicy("demo/typo", ()),
    )
    assert [f.render("demo/server") for f in found] == [
        "policy demo/others does not select demo/server: its selector matches 1 other "
        "workload (demo/other)",
        "policy demo/typo is in the destination's namespace but its selector matches no "
        "workload: check its matchLabels against the pods' labels",
    ]
    assert unselected(other, policies[:1], [server, other]) == (
        UnselectedPolicy("demo/mine", ("demo/server",)),
    )
    assert unselected(server, [], [server]) == ()


def test_many_selected_workloads_are_counted_and_the_first_three_named() -> None:
    names = [f"w{i}" for i in range(5)]
    many = [workload(n, namespace="demo", authorization_policies=("demo/p",)) for n in names]
    found = unselected(workload("server", namespace="demo"), [_selector("p")], many)
    assert found[0].render("demo/server") == (
        "policy demo/p does not select demo/server: its selector matches 5 other workloads "
        "(demo/w0, demo/w1, demo/w2, ...)"
    )
