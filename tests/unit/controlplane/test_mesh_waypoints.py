"""Waypoints in the mesh file: `istio.io/use-waypoint` on a service, workload or namespace
becomes Service.waypoint / Workload.waypoint as istiod fills them; a label naming no
waypoint is refused with file, line and field."""

from __future__ import annotations

import textwrap

import pytest

from nodeagent.controlplane.mesh import MeshError, parse_mesh
from nodeagent.controlplane.resources import build_snapshot
from nodeagent.model.constants import TYPE_URL_ADDRESS
from nodeagent.pb.istio.workload import workload_pb2 as workload_pb

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
    - name: pod-0
      namespace: demo
      node: node1
      ip: 10.1.0.6
      labels: {app: pod, istio.io/use-waypoint: waypoint}
    - name: other-0
      namespace: other
      node: node1
      ip: 10.1.0.7
      labels: {app: other}
    services:
    - name: waypoint
      namespace: demo
      vip: 10.96.0.9
      ports: [{port: 15021}, {port: 15008}]
      selector: {gateway.networking.k8s.io/gateway-name: waypoint}
      labels: {istio.io/waypoint-for: WAYPOINT_FOR}
    - name: echo
      namespace: demo
      vip: 10.96.0.10
      ports: [{port: 80, targetPort: 8080}]
      selector: {app: echo}
      labels: {istio.io/use-waypoint: waypoint}
    - name: plain
      namespace: demo
      vip: 10.96.0.11
      ports: [{port: 80}]
      selector: {app: echo}
    - name: other
      namespace: other
      vip: 10.96.0.12
      ports: [{port: 80}]
      selector: {app: other}
    """
)
WP = "demo/waypoint.demo.svc.cluster.local"


def mesh(waypoint_for: str = "all", tail: str = "") -> str:
    return HEAD.replace("WAYPOINT_FOR", waypoint_for) + textwrap.dedent(tail)


def records(text: str) -> dict[str, workload_pb.Address]:
    out = {}
    for name, r in build_snapshot(parse_mesh(text))[TYPE_URL_ADDRESS].items():
        msg = workload_pb.Address()
        msg.ParseFromString(r.value)
        out[name] = msg
    return out


def gateway(key: str) -> workload_pb.GatewayAddress:
    namespace, hostname = key.split("/", 1)
    return workload_pb.GatewayAddress(
        hostname=workload_pb.NamespacedHostname(namespace=namespace, hostname=hostname),
        hbone_mtls_port=15008,
    )


def test_a_labelled_service_and_workload_name_the_waypoint_by_host_name() -> None:
    got = records(mesh())
    assert got["demo/echo.demo.svc.cluster.local"].service.waypoint == gateway(WP)
    assert got["Kubernetes//Pod/demo/pod-0"].workload.waypoint == gateway(WP)
    # Unlabelled: none; and being an endpoint of a waypointed service does not give one.
    assert not got["demo/plain.demo.svc.cluster.local"].service.HasField("waypoint")
    assert not got["Kubernetes//Pod/demo/echo-0"].workload.HasField("waypoint")
    # A waypoint never has a waypoint.
    assert not got[WP].service.HasField("waypoint")
    assert not got["Kubernetes//Pod/demo/waypoint-0"].workload.HasField("waypoint")


@pytest.mark.parametrize(
    ("waypoint_for", "service", "workload"),
    [("service", True, False), ("workload", False, True), ("all", True, True)],
)
def test_a_namespace_label_applies_by_waypoint_for(
    waypoint_for: str, service: bool, workload: bool
) -> None:
    text = (
        mesh(waypoint_for)
        .replace("labels: {istio.io/use-waypoint: waypoint}", "labels: {tier: x}")
        .replace("labels: {app: pod, istio.io/use-waypoint: waypoint}", "labels: {app: pod}")
    )
    text += "namespaces:\n- name: demo\n  labels: {istio.io/use-waypoint: waypoint}\n"
    got = records(text)
    for key in ("demo/echo.demo.svc.cluster.local", "demo/plain.demo.svc.cluster.local"):
        assert got[key].service.HasField("waypoint") is service
    assert got["Kubernetes//Pod/demo/echo-0"].workload.HasField("waypoint") is workload
    assert not got["Kubernetes//Pod/demo/waypoint-0"].workload.HasField("waypoint")
    assert not got["other/other.other.svc.cluster.local"].service.HasField("waypoint")


def test_none_opts_out_of_the_namespace_waypoint() -> None:
    text = mesh().replace(
        "labels: {istio.io/use-waypoint: waypoint}", "labels: {istio.io/use-waypoint: none}"
    )
    text += "namespaces:\n- name: demo\n  labels: {istio.io/use-waypoint: waypoint}\n"
    got = records(text)
    assert not got["demo/echo.demo.svc.cluster.local"].service.HasField("waypoint")
    assert got["demo/plain.demo.svc.cluster.local"].service.waypoint == gateway(WP)


def test_a_waypoint_in_another_namespace() -> None:
    text = mesh().replace(
        "  selector: {app: other}\n",
        "  selector: {app: other}\n  labels: {istio.io/use-waypoint: waypoint, "
        "istio.io/use-waypoint-namespace: demo}\n",
    )
    got = records(text)
    assert got["other/other.other.svc.cluster.local"].service.waypoint == gateway(WP)


def _error(text: str) -> str:
    with pytest.raises(MeshError) as err:
        parse_mesh(text, "mesh.yaml")
    return str(err.value)


def test_a_label_naming_no_waypoint_is_refused_at_its_line() -> None:
    text = mesh().replace(
        "labels: {istio.io/use-waypoint: waypoint}", "labels: {istio.io/use-waypoint: wp2}"
    )
    line = text.splitlines().index("  labels: {istio.io/use-waypoint: wp2}") + 1
    message = _error(text)
    assert message.startswith(f"mesh.yaml:{line}:"), message
    assert "services[1].labels.istio.io/use-waypoint: waypoint 'wp2' is not declared" in message


def test_a_namespace_naming_no_waypoint_is_refused() -> None:
    text = mesh() + "namespaces:\n- name: demo\n  labels: {istio.io/use-waypoint: nope}\n"
    assert "namespaces[0].labels.istio.io/use-waypoint: waypoint 'nope'" in _error(text)


def test_a_waypoint_service_without_the_hbone_port_is_refused() -> None:
    text = mesh().replace("ports: [{port: 15021}, {port: 15008}]", "ports: [{port: 15021}]")
    assert "its service has no port 15008 (HBONE)" in _error(text)


def test_an_explicit_label_on_a_waypoint_of_the_wrong_kind_is_refused() -> None:
    message = _error(mesh("workload"))
    assert "services[1].labels.istio.io/use-waypoint: waypoint demo/waypoint is for workload" in (
        message
    )


def test_a_bad_waypoint_for_is_refused() -> None:
    assert "'sometimes' is not one of service, workload, all, none" in _error(mesh("sometimes"))
