"""The mesh file's httpRoutes: Gateway API HTTPRoutes served as VirtualServices."""

from __future__ import annotations

import pytest

from nodeagent.controlplane.mesh import MeshError, parse_mesh

from .test_mesh_routing import HEAD

pytestmark = pytest.mark.unit

ROUTE = (
    HEAD
    + """\
httpRoutes:
  - apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: {name: web, namespace: demo}
    spec:
      parentRefs: [{kind: Service, group: "", name: backend, port: 8080}]
      rules:
        - matches: [{headers: [{name: x-user, value: ios}]}]
          backendRefs: [{name: backend, port: 8080}]
"""
)


def test_http_route_becomes_a_virtual_service() -> None:
    (vs,) = parse_mesh(ROUTE, "mesh.yaml").virtual_services
    assert vs.key == "demo/httproute-web" and vs.http[0].match[0].headers[0][0] == "x-user"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "[{name: backend, port: 8080}]",
            "[{name: backend}]",
            "mesh.yaml:16:25: httpRoutes[0].spec.rules[0].backendRefs[0].port: "
            "port is required in backendRef",
        ),
        (
            "kind: HTTPRoute",
            "kind: VirtualService",
            "mesh.yaml:10:11: httpRoutes[0].kind: must be HTTPRoute",
        ),
        (
            "gateway.networking.k8s.io/v1",
            "gateway.networking.k8s.io/v9",
            "mesh.yaml:9:17: httpRoutes[0].apiVersion: must be one of "
            "gateway.networking.k8s.io/v1, gateway.networking.k8s.io/v1beta1",
        ),
        (
            "backendRefs: [{name: backend,",
            "backendRefs: [{name: nothere,",
            "httpRoutes[0] (demo/httproute-web).spec.http[0].route[0].destination.host: "
            "'nothere.demo.svc.cluster.local' (nothere.demo.svc.cluster.local) is not a service",
        ),
    ],
)
def test_errors_name_file_line_and_field(old: str, new: str, message: str) -> None:
    text = ROUTE.replace(old, new, 1)
    assert text != ROUTE
    with pytest.raises(MeshError) as caught:
        parse_mesh(text, "mesh.yaml")
    assert message in str(caught.value)
