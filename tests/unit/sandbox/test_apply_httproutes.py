"""`sandbox apply` of Gateway API HTTPRoute documents: read, merged, errors placed."""

from __future__ import annotations

import pytest

from nodeagent.sandbox.mesh import ApplyError, merge_resources, parse_user_file

pytestmark = pytest.mark.unit

ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: ios, namespace: demo}
spec:
  parentRefs: [{kind: Service, group: "", name: backend, port: 8080}]
  rules:
    - matches: [{headers: [{name: x-user, value: ios}]}]
      backendRefs: [{name: backend, port: 8080}]
"""


def test_http_route_document_is_an_http_routes_section() -> None:
    user = parse_user_file(ROUTE, "route.yaml")
    assert [d["metadata"]["name"] for d in user.sections["httpRoutes"]] == ["ios"]
    merged, summary = merge_resources({"nodes": []}, user)
    assert summary.added == ("httproute demo/ios",)
    assert merged["httpRoutes"][0]["kind"] == "HTTPRoute"


def test_bad_http_route_is_refused_on_its_line() -> None:
    with pytest.raises(ApplyError) as caught:
        parse_user_file(
            ROUTE.replace("port: 8080}]\n", "}]\n").replace(
                "backend}]", "backend, port: 8080}]", 1
            ),
            "route.yaml",
        )
    assert str(caught.value) == (
        "route.yaml:8:21: HTTPRoute demo/ios: spec.rules[0].backendRefs[0].port: "
        "port is required in backendRef"
    )
