"""The waypoint's L7 evaluator (nodeagent.policy.http): one table per attribute, then the
ALLOW/DENY order. Policies are written as Istio YAML (the JSON shape the waypoint gets)
and read by `parse_http_authorization`, so each row reads like the policy a user writes."""

from __future__ import annotations

import ipaddress
from types import MappingProxyType
from typing import Any

import pytest

from nodeagent.model.identity import Identity
from nodeagent.model.policy import HttpAuthorization, parse_http_authorization
from nodeagent.policy.http import ALLOWED_NO_POLICY, HttpAttributes, authorize, rule_matches

pytestmark = pytest.mark.unit

CLIENT = Identity("cluster.local", "demo", "client")


def request(
    method: str = "GET",
    path: str = "/",
    *,
    host: str = "backend.demo:8080",
    headers: dict[str, str] | None = None,
    identity: Identity | None = CLIENT,
    ip: str = "10.10.1.11",
    port: int = 8080,
    dst: str | None = "10.96.0.10",
) -> HttpAttributes:
    return HttpAttributes(
        source_identity=identity,
        source_ip=ipaddress.ip_address(ip),
        destination_port=port,
        method=method,
        path=path,
        host=host,
        headers=MappingProxyType(headers or {}),
        destination_ip=ipaddress.ip_address(dst) if dst else None,
    )


def policy(rules: list[Any], action: str = "ALLOW", name: str = "p") -> HttpAuthorization:
    spec = {"action": action, "rules": rules}
    return parse_http_authorization("demo", name, spec)


def op(**fields: list[str]) -> dict[str, Any]:
    return {"to": [{"operation": fields}]}


# (operation fields, request, matches)
OPERATIONS = [
    # paths: exact, prefix, suffix, presence; the query is not part of the path
    ({"paths": ["/public"]}, request(path="/public"), True),
    ({"paths": ["/public"]}, request(path="/public?x=1"), True),
    ({"paths": ["/public"]}, request(path="/public/"), False),
    ({"paths": ["/public"]}, request(path="/PUBLIC"), False),
    ({"paths": ["/public*"]}, request(path="/public/a"), True),
    ({"paths": ["/public*"]}, request(path="/publicity"), True),
    ({"paths": ["/public/*"]}, request(path="/public"), False),
    ({"paths": ["*.png"]}, request(path="/img/a.png"), True),
    ({"paths": ["*.png"]}, request(path="/img/a.png?v=2"), True),
    ({"paths": ["*.png"]}, request(path="/img/a.jpg"), False),
    ({"paths": ["*"]}, request(path="/"), True),
    ({"paths": ["/a", "/b"]}, request(path="/b"), True),
    ({"notPaths": ["/admin*"]}, request(path="/admin/x"), False),
    ({"notPaths": ["/admin*"]}, request(path="/public"), True),
    ({"paths": ["/x*"], "notPaths": ["/x/secret"]}, request(path="/x/secret"), False),
    ({"paths": ["/x*"], "notPaths": ["/x/secret"]}, request(path="/x/open"), True),
    # methods: exact and case-sensitive
    ({"methods": ["GET"]}, request("GET"), True),
    ({"methods": ["GET"]}, request("get"), False),
    ({"methods": ["GET", "HEAD"]}, request("HEAD"), True),
    ({"methods": ["GET"]}, request("POST"), False),
    ({"notMethods": ["POST"]}, request("POST"), False),
    ({"notMethods": ["POST"]}, request("GET"), True),
    # hosts: case-insensitive, as sent (with the port), prefix and suffix wildcards
    ({"hosts": ["backend.demo:8080"]}, request(host="Backend.DEMO:8080"), True),
    ({"hosts": ["BACKEND.demo:8080"]}, request(host="backend.demo:8080"), True),
    ({"hosts": ["backend.demo"]}, request(host="backend.demo:8080"), False),
    ({"hosts": ["*.demo:8080"]}, request(host="backend.DEMO:8080"), True),
    ({"hosts": ["backend*"]}, request(host="BACKEND.other"), True),
    ({"hosts": ["*"]}, request(host="anything"), True),
    ({"notHosts": ["*.internal"]}, request(host="a.INTERNAL"), False),
    ({"notHosts": ["*.internal"]}, request(host="a.example"), True),
    # ports: the port the client dialled
    ({"ports": ["8080"]}, request(port=8080), True),
    ({"ports": ["8080"]}, request(port=9090), False),
    ({"notPorts": ["8080"]}, request(port=8080), False),
    # fields of one operation are ANDed
    ({"methods": ["GET"], "paths": ["/public*"]}, request("GET", "/public"), True),
    ({"methods": ["GET"], "paths": ["/public*"]}, request("POST", "/public"), False),
    ({"methods": ["GET"], "paths": ["/public*"]}, request("GET", "/admin"), False),
    # an empty operation holds
    ({}, request("DELETE", "/anything"), True),
]


@pytest.mark.parametrize(("fields", "req", "expected"), OPERATIONS)
def test_operation_fields_match_as_istio(
    fields: dict[str, list[str]], req: HttpAttributes, expected: bool
) -> None:
    rule = policy([op(**fields)]).rules[0]
    assert rule_matches(rule, req) is expected


def test_operations_are_alternatives() -> None:
    rule = policy(
        [{"to": [{"operation": {"methods": ["GET"]}}, {"operation": {"paths": ["/up"]}}]}]
    ).rules[0]
    assert rule_matches(rule, request("GET", "/x"))
    assert rule_matches(rule, request("POST", "/up"))
    assert not rule_matches(rule, request("POST", "/x"))


OTHER = Identity("cluster.local", "other", "sleep")

# (source fields, request, matches)
SOURCES = [
    ({"principals": ["cluster.local/ns/demo/sa/client"]}, request(), True),
    ({"principals": ["spiffe://cluster.local/ns/demo/sa/client"]}, request(), True),
    ({"principals": ["cluster.local/ns/demo/sa/client"]}, request(identity=OTHER), False),
    ({"principals": ["*/sa/client"]}, request(), True),
    ({"principals": ["cluster.local/ns/demo/*"]}, request(), True),
    ({"principals": ["*"]}, request(), True),
    ({"principals": ["*"]}, request(identity=None), False),
    ({"notPrincipals": ["*"]}, request(identity=None), True),
    ({"notPrincipals": ["cluster.local/ns/demo/sa/client"]}, request(), False),
    ({"namespaces": ["demo"]}, request(), True),
    ({"namespaces": ["demo"]}, request(identity=OTHER), False),
    ({"namespaces": ["de*"]}, request(), True),
    ({"namespaces": ["demo"]}, request(identity=None), False),
    ({"notNamespaces": ["other"]}, request(identity=OTHER), False),
    ({"ipBlocks": ["10.10.1.0/24"]}, request(ip="10.10.1.11"), True),
    ({"ipBlocks": ["10.10.1.11"]}, request(ip="10.10.1.12"), False),
    ({"notIpBlocks": ["10.10.0.0/16"]}, request(ip="10.10.1.11"), False),
    ({"namespaces": ["demo"], "ipBlocks": ["10.0.0.0/8"]}, request(ip="192.168.0.1"), False),
]


@pytest.mark.parametrize(("fields", "req", "expected"), SOURCES)
def test_source_fields_match_the_original_client(
    fields: dict[str, list[str]], req: HttpAttributes, expected: bool
) -> None:
    rule = policy([{"from": [{"source": fields}]}]).rules[0]
    assert rule_matches(rule, req) is expected


# (when entry, request, matches)
CONDITIONS = [
    ({"key": "request.headers[x-user]", "values": ["ios"]}, {"x-user": "ios"}, True),
    ({"key": "request.headers[X-User]", "values": ["ios"]}, {"x-user": "ios"}, True),
    ({"key": "request.headers[x-user]", "values": ["ios"]}, {"x-user": "IOS"}, False),
    ({"key": "request.headers[x-user]", "values": ["ios"]}, {}, False),
    ({"key": "request.headers[x-user]", "values": ["i*"]}, {"x-user": "ios"}, True),
    ({"key": "request.headers[x-user]", "values": ["*os"]}, {"x-user": "ios"}, True),
    ({"key": "request.headers[x-user]", "values": ["*"]}, {"x-user": ""}, True),
    ({"key": "request.headers[x-user]", "values": ["*"]}, {}, False),
    ({"key": "request.headers[x-user]", "notValues": ["ios"]}, {}, True),
    ({"key": "request.headers[x-user]", "notValues": ["ios"]}, {"x-user": "ios"}, False),
    ({"key": "request.headers[x-user]", "notValues": ["*"]}, {"x-user": "a"}, False),
    # repeated values arrive joined by ","; patterns see the joined value (Envoy)
    ({"key": "request.headers[x-v]", "values": ["a"]}, {"x-v": "a,b"}, False),
    ({"key": "request.headers[x-v]", "values": ["a*"]}, {"x-v": "a,b"}, True),
    ({"key": "source.ip", "values": ["10.10.1.0/24"]}, {}, True),
    ({"key": "source.namespace", "values": ["demo"]}, {}, True),
    ({"key": "source.principal", "notValues": ["cluster.local/ns/demo/sa/client"]}, {}, False),
    ({"key": "destination.port", "values": ["8080"]}, {}, True),
    ({"key": "destination.port", "values": ["80"]}, {}, False),
    ({"key": "destination.ip", "values": ["10.96.0.0/16"]}, {}, True),
]


@pytest.mark.parametrize(("when", "headers", "expected"), CONDITIONS)
def test_when_conditions(when: dict[str, Any], headers: dict[str, str], expected: bool) -> None:
    rule = policy([{"when": [when]}]).rules[0]
    assert rule_matches(rule, request(headers=headers)) is expected


def test_rule_needs_a_source_an_operation_and_every_condition() -> None:
    rule = policy(
        [
            {
                "from": [{"source": {"namespaces": ["demo"]}}],
                "to": [{"operation": {"methods": ["GET"]}}],
                "when": [
                    {"key": "request.headers[x-a]", "values": ["1"]},
                    {"key": "request.headers[x-b]", "values": ["2"]},
                ],
            }
        ]
    ).rules[0]
    good = {"x-a": "1", "x-b": "2"}
    assert rule_matches(rule, request(headers=good))
    assert not rule_matches(rule, request(headers={"x-a": "1"}))
    assert not rule_matches(rule, request("POST", headers=good))
    assert not rule_matches(rule, request(headers=good, identity=OTHER))


GET_PUBLIC = policy([op(methods=["GET"], paths=["/public*"])], name="public")
DENY_ADMIN = policy([op(paths=["/admin*"])], "DENY", name="no-admin")
ALLOW_NOTHING = policy([], name="nothing")
ALLOW_ALL = policy([{}], name="all")


@pytest.mark.parametrize(
    ("policies", "req", "allowed", "by"),
    [
        ((), request("POST", "/admin"), True, ""),
        ((GET_PUBLIC,), request("GET", "/public"), True, "demo/public"),
        ((GET_PUBLIC,), request("POST", "/admin"), False, ""),
        ((GET_PUBLIC,), request("POST", "/public"), False, ""),
        ((DENY_ADMIN,), request("GET", "/public"), True, ""),
        ((DENY_ADMIN,), request("GET", "/admin"), False, "demo/no-admin"),
        # DENY first: an ALLOW that matches does not save a denied request
        ((ALLOW_ALL, DENY_ADMIN), request("GET", "/admin"), False, "demo/no-admin"),
        ((ALLOW_ALL, DENY_ADMIN), request("GET", "/x"), True, "demo/all"),
        # an ALLOW policy without rules matches nothing: everything is denied
        ((ALLOW_NOTHING,), request("GET", "/"), False, ""),
        # any ALLOW that matches allows
        ((ALLOW_NOTHING, GET_PUBLIC), request("GET", "/public"), True, "demo/public"),
        # a DENY policy without rules denies nothing
        ((policy([], "DENY"),), request("GET", "/"), True, ""),
    ],
)
def test_deny_then_allow_then_default_deny(
    policies: tuple[HttpAuthorization, ...], req: HttpAttributes, allowed: bool, by: str
) -> None:
    decision = authorize(policies, req)
    assert decision.allowed is allowed, decision.reason
    assert decision.policy == by


def test_decisions_say_why() -> None:
    assert authorize((), request()) == ALLOWED_NO_POLICY
    denied = authorize((DENY_ADMIN,), request(path="/admin"))
    assert denied.reason == "denied by DENY policy demo/no-admin rules[0]"
    unmatched = authorize((GET_PUBLIC, ALLOW_NOTHING), request("POST"))
    assert unmatched.reason == "no rule of the ALLOW policies (demo/nothing, demo/public) matches"
