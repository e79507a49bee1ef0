"""The control plane serves the mesh's routing config the way istiod's api generator does."""

from __future__ import annotations

from nodeagent.controlplane.mesh import parse_mesh
from nodeagent.controlplane.resources import build_snapshot
from nodeagent.controlplane.server import _to_response
from nodeagent.controlplane.stream import StreamResponse
from nodeagent.model.constants import (
    TYPE_URL_ADDRESS,
    TYPE_URL_DESTINATION_RULE,
    TYPE_URL_MCP_RESOURCE,
    TYPE_URL_VIRTUAL_SERVICE,
)
from nodeagent.pb.istio.mcp.v1alpha1 import resource_pb2 as mcp_pb
from nodeagent.pb.istio.networking.v1alpha3 import virtual_service_pb2 as vs_pb
from nodeagent.state.convert import virtual_service_from_bytes

MESH = """\
nodes: [{name: n1, token: t}]
services:
  - {name: backend, namespace: demo, vip: 10.96.0.2, ports: [{port: 9000}],
     selector: {app: backend}}
destinationRules:
  - apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: backend, namespace: demo}
    spec:
      host: backend
      subsets:
        - {name: v1, labels: {version: v1}}
        - {name: v2, labels: {version: v2}}
virtualServices:
  - apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: canary, namespace: demo}
    spec:
      hosts: [backend]
      tcp:
        - fault: {abort: {percentage: {value: 50}}}
          route:
            - {destination: {host: backend, subset: v1}, weight: 90}
            - {destination: {host: backend, subset: v2}, weight: 10}
"""


def test_routing_config_is_served_in_istiods_envelope_by_namespace_and_name() -> None:
    mesh = parse_mesh(MESH, "mesh.yaml")
    snapshot = build_snapshot(mesh)
    assert list(snapshot[TYPE_URL_VIRTUAL_SERVICE]) == ["demo/canary"]
    assert list(snapshot[TYPE_URL_DESTINATION_RULE]) == ["demo/backend"]
    envelope = mcp_pb.Resource.FromString(snapshot[TYPE_URL_VIRTUAL_SERVICE]["demo/canary"].value)
    assert envelope.metadata.name == "demo/canary"
    assert envelope.body.type_url == "type.googleapis.com/istio.networking.v1alpha3.VirtualService"
    spec = vs_pb.VirtualService()
    assert envelope.body.Unpack(spec)
    assert [r.weight for r in spec.tcp[0].route] == [90, 10]
    # The fault extension has no protobuf field: it travels as an annotation.
    assert "traffic.nodeagent.io/tcp-fault" in envelope.metadata.annotations


def test_what_is_served_reads_back_as_the_mesh_file_said() -> None:
    mesh = parse_mesh(MESH, "mesh.yaml")
    served = build_snapshot(mesh)[TYPE_URL_VIRTUAL_SERVICE]["demo/canary"].value
    got = virtual_service_from_bytes("demo/canary", served)
    (want,) = mesh.virtual_services
    assert (got.hosts, got.tcp) == (want.hosts, want.tcp)


def test_an_unchanged_mesh_serves_the_same_versions() -> None:
    a = build_snapshot(parse_mesh(MESH, "mesh.yaml"))[TYPE_URL_VIRTUAL_SERVICE]
    b = build_snapshot(parse_mesh(MESH, "mesh.yaml"))[TYPE_URL_VIRTUAL_SERVICE]
    assert a == b


def test_resource_any_type_is_the_envelope_for_config_kinds_only() -> None:
    for type_url, any_type in [
        (TYPE_URL_VIRTUAL_SERVICE, TYPE_URL_MCP_RESOURCE),
        (TYPE_URL_DESTINATION_RULE, TYPE_URL_MCP_RESOURCE),
        (TYPE_URL_ADDRESS, TYPE_URL_ADDRESS),
    ]:
        out = _to_response(
            StreamResponse(type_url=type_url, nonce="1", resources=(("a", "v", b""),), removed=())
        )
        assert out.type_url == type_url and out.resources[0].resource.type_url == any_type
