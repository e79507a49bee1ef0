"""WaypointAuthorizer: the store's AuthorizationPolicies that attach to this waypoint
(targetRefs to its Gateway or to the request's Service, or a selector on its pods'
gateway-name label), evaluated for the tunnel's caller and each request."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import pytest

from nodeagent.model.identity import Identity
from nodeagent.model.policy import HttpAuthorization, parse_http_authorization
from nodeagent.model.workload import Port
from nodeagent.state.store import StateBatch, StateStore
from nodeagent.traffic.http import HttpRequest
from nodeagent.waypoint.authz import WaypointAuthorizer
from nodeagent.waypoint.router import TunnelCaller
from tests.builders import service

pytestmark = pytest.mark.unit

NS = "demo"
BACKEND = service("backend", "10.96.0.10", namespace=NS, ports=(Port(8080, 8080),))
OTHER = service("other", "10.96.0.11", namespace=NS, ports=(Port(8080, 8080),))
CLIENT = TunnelCaller(
    identity=Identity("cluster.local", NS, "client"),
    address=("10.10.1.11", 40000),
    workload=None,
    forwarded='for="10.10.1.11:40000"',
    baggage="",
)
GATEWAY = {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}
GET_PUBLIC = [{"to": [{"operation": {"methods": ["GET"], "paths": ["/public*"]}}]}]


def policy(name: str, namespace: str = NS, **spec: Any) -> HttpAuthorization:
    return parse_http_authorization(namespace, name, {"rules": GET_PUBLIC, **spec})


def authorizer(*policies: HttpAuthorization) -> WaypointAuthorizer:
    store = StateStore()
    store.apply(StateBatch(http_policies=policies))
    return WaypointAuthorizer(store, "waypoint", NS)


def check(
    authz: WaypointAuthorizer, method: str, path: str, svc: Any = BACKEND, **headers: str
) -> str | None:
    request = HttpRequest(method, path, "backend.demo:8080", MappingProxyType(headers))
    return authz.check(CLIENT, svc, 8080, request)


@pytest.mark.parametrize(
    ("spec", "attached"),
    [
        ({"targetRefs": [GATEWAY]}, True),
        ({"targetRef": GATEWAY}, True),
        ({"targetRefs": [{**GATEWAY, "namespace": NS}]}, True),
        ({"targetRefs": [{**GATEWAY, "name": "other-waypoint"}]}, False),
        ({"targetRefs": [{**GATEWAY, "group": ""}]}, False),  # a Service-less "Gateway"
        ({"targetRefs": [{**GATEWAY, "namespace": "elsewhere"}]}, False),
        ({"targetRefs": [{"kind": "Service", "name": "backend"}]}, True),
        ({"targetRefs": [{"kind": "Service", "name": "other"}]}, False),
        (
            {"selector": {"matchLabels": {"gateway.networking.k8s.io/gateway-name": "waypoint"}}},
            True,
        ),
        ({"selector": {"matchLabels": {"gateway.networking.k8s.io/gateway-name": "w2"}}}, False),
        ({"selector": {"matchLabels": {"app": "backend"}}}, False),
        ({}, False),  # namespace-wide: Istio's waypoints never take it
    ],
)
def test_which_policies_attach(spec: dict[str, Any], attached: bool) -> None:
    authz = authorizer(policy("p", **spec))
    denied = check(authz, "POST", "/admin")
    assert (denied is not None) is attached, denied


def test_policy_in_another_namespace_does_not_attach() -> None:
    authz = authorizer(policy("p", namespace="elsewhere", targetRefs=[GATEWAY]))
    assert check(authz, "POST", "/admin") is None


def test_allow_get_public_denies_the_rest_with_a_reason() -> None:
    authz = authorizer(policy("public", targetRefs=[GATEWAY]))
    assert check(authz, "GET", "/public") is None
    assert check(authz, "GET", "/public/x?y=1") is None
    assert check(authz, "POST", "/admin") == ("no rule of the ALLOW policies (demo/public) matches")


def test_service_attached_policy_applies_to_that_service_only() -> None:
    authz = authorizer(policy("svc", targetRefs=[{"kind": "Service", "name": "backend"}]))
    assert check(authz, "POST", "/admin", BACKEND) is not None
    assert check(authz, "POST", "/admin", OTHER) is None


def test_source_is_the_original_client() -> None:
    spec = {
        "targetRefs": [GATEWAY],
        "rules": [
            {
                "from": [
                    {
                        "source": {
                            "principals": ["cluster.local/ns/demo/sa/client"],
                            "ipBlocks": ["10.10.1.11"],
                        }
                    }
                ]
            }
        ],
    }
    authz = authorizer(parse_http_authorization(NS, "client-only", spec))
    assert check(authz, "DELETE", "/x") is None


def test_deny_on_a_header() -> None:
    spec = {
        "targetRefs": [GATEWAY],
        "action": "DENY",
        "rules": [{"when": [{"key": "request.headers[x-user]", "values": ["blocked"]}]}],
    }
    authz = authorizer(parse_http_authorization(NS, "no-blocked", spec))
    assert check(authz, "GET", "/", **{"x-user": "blocked"}) == (
        "denied by DENY policy demo/no-blocked rules[0]"
    )
    assert check(authz, "GET", "/", **{"x-user": "ok"}) is None
