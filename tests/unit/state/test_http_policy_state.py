"""Waypoint AuthorizationPolicies in the state layer: an MCP Resource under
security.istio.io/v1/AuthorizationPolicy converts to an HttpAuthorization (a bad one is
refused naming its field, which becomes the NACK), and the store keeps them by key."""

from __future__ import annotations

from typing import Any

import pytest

from nodeagent.model import policy as pm
from nodeagent.state import mcp
from nodeagent.state.convert import ConversionError, http_authorization_from_bytes
from nodeagent.state.mcp import TYPE_URL_AUTHORIZATION_POLICY
from nodeagent.state.store import StateBatch, StateStore
from nodeagent.state.updater import StateUpdater

pytestmark = pytest.mark.unit

SPEC: dict[str, Any] = {
    "targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}],
    "action": "DENY",
    "rules": [
        {
            "from": [{"source": {"notNamespaces": ["demo"], "ipBlocks": ["10.0.0.0/8"]}}],
            "to": [{"operation": {"methods": ["POST"], "notPaths": ["/ok*"], "ports": ["8080"]}}],
            "when": [{"key": "request.headers[X-Debug]", "notValues": ["0"]}],
        },
        {},
    ],
}


def resource(spec: dict[str, Any], name: str = "admin") -> bytes:
    return mcp.encode(TYPE_URL_AUTHORIZATION_POLICY, mcp.ConfigEnvelope("demo", name, spec))


def test_resource_converts_to_the_waypoint_model() -> None:
    value = http_authorization_from_bytes("demo/admin", resource(SPEC))
    assert value.key == "demo/admin"
    assert value.action is pm.Action.DENY
    assert value.target_refs == (
        pm.TargetRef(kind="Gateway", name="waypoint", group="gateway.networking.k8s.io"),
    )
    first, empty = value.rules
    assert empty == pm.HttpRule()
    (op,) = first.operations
    assert op.methods == (pm.StringMatch.exact("POST"),)
    assert op.not_paths == (pm.StringMatch.prefix("/ok"),)
    assert op.ports == (8080,)
    (cond,) = first.conditions
    assert (cond.attribute, cond.header, cond.not_values) == (
        pm.ConditionKey.REQUEST_HEADER,
        "x-debug",
        ("0",),
    )


def test_the_older_target_ref_is_read_when_target_refs_is_empty() -> None:
    spec = {"targetRef": {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "w"}}
    value = http_authorization_from_bytes("demo/admin", resource(spec))
    assert value.attaches_to("w", "demo")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"action": "CUSTOM"}, "spec.action: 'CUSTOM': the waypoint enforces ALLOW and DENY only"),
        ({"action": "AUDIT"}, "spec.action: 'AUDIT'"),
        (
            {"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]},
            "spec.rules[0].to[0].operation.ports[0]: 'http' is not a port",
        ),
        (
            {"rules": [{}, {"from": [{"source": {"ipBlocks": ["10.0.0.300"]}}]}]},
            "spec.rules[1].from[0].source.ipBlocks[0]: '10.0.0.300' is not an IP",
        ),
        (
            {"rules": [{"when": [{"key": "connection.sni", "values": ["a"]}]}]},
            "spec.rules[0].when[0]: 'connection.sni' is not supported here",
        ),
        (
            {"rules": [{"to": [{"operation": {"paths": ["/a/{**}"]}}]}]},
            "spec.rules[0].to[0].operation.paths[0]: '/a/{**}': path templates",
        ),
        (
            {
                "selector": {"matchLabels": {"a": "b"}},
                "targetRefs": [{"kind": "Gateway", "name": "w"}],
            },
            "spec: set at most one of selector and targetRefs",
        ),
        ({"targetRefs": [{"kind": "Gateway"}]}, "spec.targetRefs[0]: kind and name are required"),
    ],
)
def test_bad_resource_is_refused_naming_the_field(spec: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConversionError) as err:
        http_authorization_from_bytes("demo/admin", resource(spec))
    assert str(err.value).startswith("authorizationpolicy demo/admin: "), err.value
    assert expected in str(err.value)


def test_updater_applies_good_policies_and_names_the_bad_one() -> None:
    store = StateStore()
    updater = StateUpdater(store)
    rejected = updater.apply_delta(
        TYPE_URL_AUTHORIZATION_POLICY,
        [("demo/admin", resource(SPEC)), ("demo/bad", resource({"action": "CUSTOM"}, "bad"))],
        [],
    )
    assert list(rejected) == ["demo/bad"]
    assert [p.key for p in store.http_policies()] == ["demo/admin"]
    # Kept apart from the agents' L4 policies.
    assert list(store.policies()) == []
    assert updater.apply_delta(TYPE_URL_AUTHORIZATION_POLICY, [], ["demo/admin"]) == {}
    assert store.http_policies() == ()


def test_store_reports_http_policy_changes() -> None:
    store = StateStore()
    value = http_authorization_from_bytes("demo/admin", resource(SPEC))
    seen = []
    store.subscribe(seen.append)
    change = store.apply(StateBatch(http_policies=(value,)))
    assert change and change.http_policies.added == {"demo/admin"}
    assert not store.apply(StateBatch(http_policies=(value,)))  # unchanged resend: no event
    assert store.http_policy("demo/admin") == value
    removed = store.apply(StateBatch(removed_http_policies=("demo/admin",)))
    assert removed.http_policies.removed == {"demo/admin"}
    assert len(seen) == 2
