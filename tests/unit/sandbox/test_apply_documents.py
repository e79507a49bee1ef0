"""`sandbox apply` of Kubernetes documents of Istio kinds: read, merged, errors placed."""

from __future__ import annotations

import pytest

from nodeagent.sandbox.mesh import ApplyError, merge_resources, parse_user_file, place_error

pytestmark = pytest.mark.unit

CANARY = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: backend, namespace: demo}
spec:
  host: backend
  subsets:
    - {name: v1, labels: {version: v1}}
    - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: backend-canary
  namespace: demo
spec:
  hosts: [backend]
  tcp:
    - route:
        - destination: {host: backend, subset: v1}
          weight: 90
        - destination: {host: backend, subset: v2}
          weight: 10
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: demo}
spec: {}
"""


def test_documents_become_sections_keyed_by_kind_namespace_name() -> None:
    user = parse_user_file(CANARY, "canary.yaml")
    assert user.documents
    assert [d["metadata"]["name"] for d in user.sections["destinationRules"]] == ["backend"]
    assert [d["metadata"]["name"] for d in user.sections["virtualServices"]] == ["backend-canary"]
    assert len(user.sections["authorizationPolicies"]) == 1
    assert user.where[("virtualServices", 0)] == "canary.yaml:10:1"
    merged, summary = merge_resources({"nodes": []}, user)
    assert summary.added == (
        "policy demo/deny-all",
        "virtualservice demo/backend-canary",
        "destinationrule demo/backend",
    )
    gone, summary = merge_resources(merged, user, delete=True)
    assert summary.deleted and not gone["virtualServices"] and not gone["destinationRules"]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "weight: 10",
            "weight: 20",
            "canary.yaml:19:9: VirtualService demo/backend-canary: spec.tcp[0].route: "
            "weights must sum to 100, got 90 + 20 = 110",
        ),
        ("kind: VirtualService", "kind: Gateway", "canary.yaml:11:7: kind: 'Gateway' cannot be"),
        (
            "  host: backend\n",
            "  host: backend\n  trafficPolicy: {loadBalancer: {simple: FASTEST}}\n",
            "canary.yaml:6:42: DestinationRule demo/backend: "
            "spec.trafficPolicy.loadBalancer.simple: unknown load balancer 'FASTEST'",
        ),
        (
            "  name: backend-canary\n",
            "",
            "canary.yaml:10:1: VirtualService: metadata.name: required",
        ),
    ],
)
def test_bad_documents_are_refused_on_their_line(old: str, new: str, expected: str) -> None:
    assert old in CANARY
    with pytest.raises(ApplyError) as err:
        parse_user_file(CANARY.replace(old, new, 1), "canary.yaml")
    assert str(err.value).startswith(expected), str(err.value)


def test_documents_without_kind_are_refused() -> None:
    with pytest.raises(ApplyError, match="several YAML documents, but none has a `kind:`"):
        parse_user_file("a: 1\n---\nb: 2\n", "x.yaml")


def test_a_merged_mesh_error_is_placed_on_the_users_line() -> None:
    user = parse_user_file(CANARY, "canary.yaml")
    merged, _ = merge_resources(
        {"nodes": [], "virtualServices": [{"metadata": {"name": "x"}}]}, user
    )
    message = (
        "/var/run/mesh.yaml:120:7: virtualServices[1].spec.tcp[0].route[1].destination.subset: "
        "subset 'v2' is defined by no DestinationRule"
    )
    assert place_error(message, merged, user) == (
        "canary.yaml:21:48: virtualservice demo/backend-canary: "
        "spec.tcp[0].route[1].destination.subset: subset 'v2' is defined by no DestinationRule"
    )
    other = "/var/run/mesh.yaml:3:1: virtualServices[0].spec.hosts: problem"
    assert place_error(other, merged, user) == other  # not the user's resource: as it was


def test_a_key_yaml_cannot_construct_is_a_one_line_refusal() -> None:
    # Found by the apply_file fuzz target (fuzz/crashes/apply_file/crash-c3216cf...): `[]: x`
    # composes, but a list cannot be a mapping key.
    with pytest.raises(ApplyError, match=r"^x\.yaml:1:1: YAML syntax error: "):
        parse_user_file("[]: x\n", "x.yaml")
    with pytest.raises(ApplyError, match=r"^x\.yaml:2:1: YAML syntax error: "):
        parse_user_file("kind: VirtualService\n[]: x\n", "x.yaml")
