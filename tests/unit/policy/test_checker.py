"""Re-checking live connections when the policy set changes."""

from __future__ import annotations

from nodeagent.model.policy import (
    Action,
    Authorization,
    Clause,
    ConnectionAttributes,
    Match,
    Rule,
    Scope,
    StringMatch,
)
from nodeagent.policy import PolicyChecker, applicable_policies


def _deny_sa(sa: str) -> Authorization:
    return Authorization(
        name=f"deny-{sa}",
        namespace="default",
        scope=Scope.NAMESPACE,
        action=Action.DENY,
        rules=(Rule((Clause((Match(principals=(StringMatch.suffix(f"/sa/{sa}"),)),)),)),),
    )


class FakePolicyStore:
    """Stands in for the state store: policies by key, looked up per destination."""

    def __init__(self) -> None:
        self.policies: list[Authorization] = []

    def lookup(self, conn: ConnectionAttributes) -> tuple[Authorization, ...]:
        return applicable_policies(self.policies, conn.destination_namespace)


def _conn(sa: str | None, ns: str = "default") -> ConnectionAttributes:
    identity = f"spiffe://cluster.local/ns/default/sa/{sa}" if sa else None
    return ConnectionAttributes.build(
        "10.1.0.7", "10.2.0.5:8080", identity=identity, destination_namespace=ns
    )


def test_policy_update_revokes_only_newly_denied_connections() -> None:
    store = FakePolicyStore()
    checker = PolicyChecker(store.lookup)
    live = [("c1", _conn("sleep")), ("c2", _conn("curl")), ("c3", _conn("sleep", ns="ops"))]
    assert checker.recheck(live) == []

    store.policies = [_deny_sa("sleep")]
    revoked = checker.recheck(live)

    assert [r.handle for r in revoked] == ["c1"]  # c3's destination is in another namespace
    assert revoked[0].decision.policy == "default/deny-sleep"
    assert revoked[0].message == (
        "connection closed due to policy change: explicitly denied by: default/deny-sleep"
    )


def test_new_allow_policy_revokes_everything_it_does_not_allow() -> None:
    store = FakePolicyStore()
    checker = PolicyChecker(store.lookup)
    live = [(1, _conn("sleep")), (2, _conn(None))]
    store.policies = [
        Authorization(
            name="allow-sleep",
            namespace="default",
            scope=Scope.NAMESPACE,
            rules=(Rule((Clause((Match(principals=(StringMatch.suffix("/sa/sleep"),)),)),)),),
        )
    ]
    revoked = checker.recheck(live)
    assert [r.handle for r in revoked] == [2]
    assert revoked[0].message.endswith("allow policies exist, but none allowed")


def test_check_uses_the_current_policies() -> None:
    store = FakePolicyStore()
    checker = PolicyChecker(store.lookup)
    assert checker.check(_conn("curl")).allowed
    store.policies = [_deny_sa("curl")]
    assert not checker.check(_conn("curl")).allowed
