"""AuthorizationPolicies with HTTP attributes in the mesh file: read with file:line errors,
split between waypoints and node agents as istiod splits them (ambient/authorization.go,
policyattachment.go), and served to waypoints under security.istio.io/v1/AuthorizationPolicy."""

from __future__ import annotations

import ipaddress
import logging
import textwrap

import pytest

from nodeagent.controlplane.mesh import MeshConfig, MeshError, parse_mesh, waypoint_fields
from nodeagent.controlplane.resources import authorization_value, build_snapshot
from nodeagent.controlplane.server import MeshStore
from nodeagent.model import policy as pm
from nodeagent.model.constants import TYPE_URL_ADDRESS, TYPE_URL_AUTHORIZATION
from nodeagent.pb.istio.workload import workload_pb2 as workload_pb
from nodeagent.state.convert import http_authorization_from_bytes
from nodeagent.state.mcp import TYPE_URL_AUTHORIZATION_POLICY

pytestmark = pytest.mark.unit

HEAD = textwrap.dedent(
    """\
    nodes:
    - {name: node1, token: tok-1}
    workloads:
    - name: waypoint-0
      namespace: demo
      node: node1
      ip: 10.1.0.9
      serviceAccount: waypoint
      labels: {gateway.networking.k8s.io/gateway-name: waypoint}
    - name: echo-0
      namespace: demo
      node: node1
      ip: 10.1.0.5
      labels: {app: echo}
    services:
    - name: waypoint
      namespace: demo
      vip: 10.96.0.9
      ports: [{port: 15008}]
      selector: {gateway.networking.k8s.io/gateway-name: waypoint}
    - name: echo
      namespace: demo
      vip: 10.96.0.10
      ports: [{port: 80, targetPort: 8080}]
      selector: {app: echo}
      labels: {istio.io/use-waypoint: waypoint}
    authorizationPolicies:
    """
)

TARGETED = """\
- metadata: {name: public, namespace: demo}
  spec:
    targetRefs:
    - {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}
    rules:
    - to:
      - operation: {methods: [GET], paths: [/public*], hosts: ["*.demo"], notPorts: [9000]}
      when:
      - {key: "request.headers[x-user]", values: [ios], notValues: [android]}
"""


def mesh_with(policies: str) -> MeshConfig:
    return parse_mesh(HEAD + policies, "mesh.yaml")


def test_http_fields_target_refs_and_when_are_read() -> None:
    (p,) = mesh_with(TARGETED).policies
    assert p.for_waypoint
    assert [(t.kind, t.group, t.name) for t in p.target_refs] == [
        ("Gateway", "gateway.networking.k8s.io", "waypoint")
    ]
    (rule,) = p.rules
    (o,) = rule.operations
    assert (o.methods, o.paths, o.hosts, o.not_ports) == (
        ("GET",),
        ("/public*",),
        ("*.demo",),
        (9000,),
    )
    (c,) = rule.conditions
    assert (c.key, c.values, c.not_values) == ("request.headers[x-user]", ("ios",), ("android",))


def test_the_older_single_target_ref_is_read() -> None:
    (p,) = mesh_with(
        "- metadata: {name: p, namespace: demo}\n"
        "  spec:\n"
        "    targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}\n"
    ).policies
    assert p.target_refs[0].name == "waypoint" and p.for_waypoint


def test_waypoint_policy_goes_to_waypoints_only_whole() -> None:
    mesh = mesh_with(TARGETED)
    snapshot = build_snapshot(mesh)
    assert "demo/public" not in snapshot[TYPE_URL_AUTHORIZATION]
    for resource in snapshot[TYPE_URL_ADDRESS].values():
        address = workload_pb.Address()
        address.ParseFromString(resource.value)
        assert "demo/public" not in address.workload.authorization_policies
    served = snapshot[TYPE_URL_AUTHORIZATION_POLICY]["demo/public"].value
    value = http_authorization_from_bytes("demo/public", served)
    assert value.attaches_to("waypoint", "demo")
    assert not value.attaches_to("other-waypoint", "demo")
    (rule,) = value.rules
    assert rule.operations[0].paths == (pm.StringMatch.prefix("/public"),)
    assert rule.operations[0].not_ports == (9000,)
    assert rule.conditions[0].header == "x-user"


def test_selector_on_the_waypoint_pods_attaches_to_the_waypoint() -> None:
    mesh = mesh_with(
        "- metadata: {name: by-label, namespace: demo}\n"
        "  spec:\n"
        "    selector: {matchLabels: {gateway.networking.k8s.io/gateway-name: waypoint}}\n"
        "    rules: [{to: [{operation: {methods: [GET]}}]}]\n"
    )
    snapshot = build_snapshot(mesh)
    assert "demo/by-label" not in snapshot[TYPE_URL_AUTHORIZATION]
    value = http_authorization_from_bytes(
        "demo/by-label", snapshot[TYPE_URL_AUTHORIZATION_POLICY]["demo/by-label"].value
    )
    assert value.attaches_to("waypoint", "demo")
    assert not value.attaches_to("waypoint", "other")
    # It selects the waypoint's pod, but is never listed on a workload for the agents.
    for resource in snapshot[TYPE_URL_ADDRESS].values():
        address = workload_pb.Address()
        address.ParseFromString(resource.value)
        assert "demo/by-label" not in address.workload.authorization_policies


WORKLOAD_ALLOW = """\
- metadata: {name: allow, namespace: demo}
  spec:
    selector: {matchLabels: {app: echo}}
    rules:
    - to: [{operation: {ports: ["8080"], methods: [GET]}}]
    - from: [{source: {namespaces: [demo]}}]
      to: [{operation: {ports: ["8080"]}}]
      when: [{key: source.ip, values: [10.1.0.0/16]}]
"""

WORKLOAD_DENY = """\
- metadata: {name: deny, namespace: demo}
  spec:
    selector: {matchLabels: {app: echo}}
    action: DENY
    rules:
    - to: [{operation: {paths: [/admin*]}}]
    - to: [{operation: {ports: ["8080"], methods: [POST]}}]
      when:
      - {key: "request.headers[x-debug]", values: ["1"]}
      - {key: destination.port, notValues: ["9090"]}
"""


def test_workload_allow_rule_with_http_attributes_is_omitted_for_ztunnel() -> None:
    mesh = mesh_with(WORKLOAD_ALLOW)
    (p,) = mesh.policies
    assert not p.for_waypoint
    auth = authorization_value(mesh, p)
    # rules[0] (methods) is dropped; rules[1] is L4 only and kept, its `when` a clause.
    (rule,) = auth.rules
    assert rule.clauses == (
        pm.Clause((pm.Match(namespaces=(pm.StringMatch.exact("demo"),)),)),
        pm.Clause((pm.Match(destination_ports=(8080,)),)),
        pm.Clause((pm.Match(source_ips=(ipaddress.ip_network("10.1.0.0/16"),)),)),
    )


def test_workload_allow_policy_of_http_rules_only_allows_nothing() -> None:
    mesh = mesh_with(
        "- metadata: {name: get, namespace: demo}\n"
        "  spec:\n    selector: {matchLabels: {app: echo}}\n"
        "    rules: [{to: [{operation: {methods: [GET]}}]}]\n"
    )
    auth = authorization_value(mesh, mesh.policies[0])
    assert auth.action is pm.Action.ALLOW and auth.rules == ()


def test_workload_deny_rule_keeps_only_its_l4_parts() -> None:
    mesh = mesh_with(WORKLOAD_DENY)
    auth = authorization_value(mesh, mesh.policies[0])
    only_paths, post = auth.rules
    # Only paths: nothing left, the rule denies every connection (istiod: more restrictive).
    assert only_paths == pm.Rule(())
    # Ports kept; the header condition holds always; destination.port is a clause.
    assert post.clauses == (
        pm.Clause((pm.Match(destination_ports=(8080,)),)),
        pm.Clause((pm.Match(not_destination_ports=(9090,)),)),
    )


def test_http_attributes_of_workload_policies_are_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    mesh = mesh_with(WORKLOAD_ALLOW + WORKLOAD_DENY + TARGETED)
    assert waypoint_fields(mesh) == [
        "AuthorizationPolicy demo/allow: spec.rules[0] (methods): "
        "ALLOW rule omitted (more restrictive than written)",
        "AuthorizationPolicy demo/deny: spec.rules[0] (paths): "
        "DENY rule enforced without its HTTP parts (more restrictive than written)",
        "AuthorizationPolicy demo/deny: spec.rules[1] (methods, request.headers[x-debug]): "
        "DENY rule enforced without its HTTP parts (more restrictive than written)",
    ]
    with caplog.at_level(logging.WARNING, logger="nodeagent.controlplane.server"):
        MeshStore(mesh)
    assert "AuthorizationPolicy demo/allow: spec.rules[0] (methods)" in caplog.text


@pytest.mark.parametrize(
    ("policy", "line", "expected"),
    [
        (
            "- metadata: {name: p}\n  spec:\n    rules:\n    - to: [{operation: {methods: GET}}]\n",
            4,
            "authorizationPolicies[0].spec.rules[0].to[0].operation.methods: expected a list",
        ),
        (
            "- metadata: {name: p}\n  spec:\n    rules:\n    - to: [{operation: {verbs: [GET]}}]\n",
            4,
            "authorizationPolicies[0].spec.rules[0].to[0].operation.verbs: unknown field",
        ),
        (
            "- metadata: {name: p}\n  spec:\n    rules:\n"
            "    - to:\n      - operation:\n          paths: [/a, '/b/{*}']\n",
            6,
            "rules[0].to[0].operation.paths[1]: '/b/{*}': path templates",
        ),
        (
            "- metadata: {name: p}\n  spec:\n    rules:\n"
            "    - when:\n      - {key: 'request.headers', values: [a]}\n",
            5,
            "rules[0].when[0].key: 'request.headers': write request.headers[NAME]",
        ),
        (
            "- metadata: {name: p}\n  spec:\n    rules:\n"
            "    - when:\n      - {key: 'request.auth.claims[iss]', values: [a]}\n",
            5,
            "rules[0].when[0].key: 'request.auth.claims[iss]' is not supported here",
        ),
        (
            "- metadata: {name: p}\n  spec:\n    rules:\n"
            "    - when:\n      - {key: source.ip, values: [not-an-ip]}\n",
            5,
            "rules[0].when[0]: 'not-an-ip' is not an IP address or CIDR",
        ),
        (
            "- metadata: {name: p}\n  spec:\n    rules:\n"
            "    - when:\n      - {key: 'request.headers[x]'}\n",
            5,
            "rules[0].when[0]: request.headers[x]: give values or notValues",
        ),
        (
            "- metadata: {name: p}\n  spec:\n    rules:\n    - when:\n      - {values: [a]}\n",
            5,
            "rules[0].when[0].key: required field is missing",
        ),
        (
            "- metadata: {name: p}\n  spec:\n    targetRefs: [{kind: Gateway}]\n",
            3,
            "authorizationPolicies[0].spec.targetRefs[0].name: required field is missing",
        ),
        (
            "- metadata: {name: p}\n  spec:\n"
            "    targetRefs: [{kind: Gateway, name: waypoint}]\n"
            "    selector: {matchLabels: {app: echo}}\n",
            4,
            "authorizationPolicies[0].spec.selector: set at most one of selector and targetRefs",
        ),
    ],
)
def test_bad_http_fields_are_refused_naming_file_line_and_field(
    policy: str, line: int, expected: str
) -> None:
    with pytest.raises(MeshError) as err:
        mesh_with(policy)
    message = str(err.value)
    head_lines = HEAD.count("\n")
    assert message.startswith(f"mesh.yaml:{head_lines + line}:"), message
    assert expected in message, message
