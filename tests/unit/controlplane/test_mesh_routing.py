"""The mesh file's virtualServices and destinationRules: read, cross-checked, errors placed."""

from __future__ import annotations

import pytest

from nodeagent.controlplane.mesh import MeshError, parse_mesh

pytestmark = pytest.mark.unit

HEAD = """\
nodes: [{name: n1, token: t}]
services:
  - name: backend
    namespace: demo
    vip: 10.96.0.10
    ports: [{port: 8080}]
    selector: {app: backend}
"""

GOOD = (
    HEAD
    + """\
destinationRules:
  - apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: backend, namespace: demo}
    spec:
      host: backend
      trafficPolicy:
        connectionPool: {tcp: {maxConnections: 10}}
      subsets:
        - {name: v1, labels: {version: v1}}
        - {name: v2, labels: {version: v2}}
virtualServices:
  - apiVersion: networking.istio.io/v1beta1
    kind: VirtualService
    metadata: {name: canary, namespace: demo}
    spec:
      hosts: [backend]
      tcp:
        - route:
            - destination: {host: backend, subset: v1}
              weight: 90
            - destination: {host: backend, subset: v2}
              weight: 10
"""
)


def test_virtual_services_and_destination_rules_are_read() -> None:
    mesh = parse_mesh(GOOD, "mesh.yaml")
    (vs,) = mesh.virtual_services
    (dr,) = mesh.destination_rules
    assert vs.key == "demo/canary" and [d.weight for d in vs.tcp[0].route] == [90, 10]
    assert dr.key == "demo/backend" and [s.name for s in dr.subsets] == ["v1", "v2"]


@pytest.mark.parametrize(
    ("old", "new", "where"),
    [
        (
            "weight: 10",
            "weight: 20",
            "mesh.yaml:27:13: virtualServices[0].spec.tcp[0].route: "
            "weights must sum to 100, got 90 + 20 = 110",
        ),
        (
            "subset: v2}",
            "subset: v3}",
            "mesh.yaml:29:52: virtualServices[0].spec.tcp[0].route[1].destination.subset: "
            "subset 'v3' is defined by no DestinationRule for backend.demo.svc.cluster.local "
            "(defined: v1, v2)",
        ),
        (
            "hosts: [backend]",
            "hosts: [frontend]",
            "mesh.yaml:24:15: virtualServices[0].spec.hosts[0]: "
            "'frontend' (frontend.demo.svc.cluster.local) is not a service",
        ),
        (
            "maxConnections: 10",
            "maxConnections: -1",
            "mesh.yaml:15:48: destinationRules[0].spec.trafficPolicy.connectionPool."
            "tcp.maxConnections: "
            "-1 is out of range",
        ),
        (
            "{maxConnections: 10}",
            "{connectTimeout: 5 seconds}",
            "mesh.yaml:15:48: destinationRules[0].spec.trafficPolicy.connectionPool."
            "tcp.connectTimeout: "
            "unparsable duration '5 seconds'",
        ),
        (
            "{maxConnections: 10}",
            "{connectTimeout: -2s}",
            "connectTimeout: a duration must not be negative",
        ),
        (
            "connectionPool: {tcp: {maxConnections: 10}}",
            "loadBalancer: {simple: FASTEST}",
            "mesh.yaml:15:32: destinationRules[0].spec.trafficPolicy.loadBalancer.simple: "
            "unknown load balancer 'FASTEST'",
        ),
        (
            "      host: backend\n",
            "      host: nosuch\n",
            "mesh.yaml:13:13: destinationRules[0].spec.host: "
            "'nosuch' (nosuch.demo.svc.cluster.local) is not a service",
        ),
        (
            "networking.istio.io/v1beta1",
            "networking.istio.io/v2",
            "virtualServices[0].apiVersion: must be one of networking.istio.io/v1, ",
        ),
    ],
)
def test_bad_routing_is_refused_with_line_and_field(old: str, new: str, where: str) -> None:
    assert old in GOOD
    with pytest.raises(MeshError) as err:
        parse_mesh(GOOD.replace(old, new, 1), "mesh.yaml")
    assert where in str(err.value)


def test_duplicate_virtual_service_names_are_refused() -> None:
    text = GOOD + GOOD[GOOD.index("  - apiVersion: networking.istio.io/v1beta1") :]
    with pytest.raises(MeshError, match="virtualServices"):
        parse_mesh(text, "mesh.yaml")


def test_canonical_name_and_revision_follow_istios_label_precedence() -> None:
    from nodeagent.controlplane.resources import workload_value

    mesh = parse_mesh(
        HEAD
        + "workloads:\n"
        + "  - name: b1\n    namespace: demo\n    node: n1\n    ip: 10.1.0.5\n"
        + "    labels: {app: backend, version: v1, app.kubernetes.io/version: v3}\n"
        + "  - name: b2\n    namespace: demo\n    node: n1\n    ip: 10.1.0.6\n",
        "mesh.yaml",
    )
    first, second = (workload_value(mesh, w) for w in mesh.workloads)
    assert (first.canonical_name, first.canonical_revision) == ("backend", "v3")
    assert (second.canonical_name, second.canonical_revision) == ("b2", "latest")


def test_http_fields_are_reported_once_as_needing_a_waypoint(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from nodeagent.controlplane.server import MeshStore

    text = GOOD.replace(
        "      tcp:\n", "      http: [{route: [{destination: {host: backend}}]}]\n      tcp:\n"
    )
    caplog.set_level("WARNING", logger="nodeagent.controlplane.server")
    store = MeshStore(parse_mesh(text, "mesh.yaml"))
    store.replace(parse_mesh(text, "mesh.yaml"))
    store.report_waypoint_fields()
    lines = [r.getMessage() for r in caplog.records if "needs a waypoint" in r.getMessage()]
    assert lines == [
        "VirtualService demo/canary: spec.http needs a waypoint; the node agents do not apply it"
    ]


def test_a_second_destination_rule_for_a_host_is_refused() -> None:
    second = GOOD[
        GOOD.index("  - apiVersion: networking.istio.io/v1\n") : GOOD.index("virtualServices:")
    ]
    text = GOOD.replace(
        "virtualServices:", second.replace("name: backend,", "name: other,") + "virtualServices:"
    )
    with pytest.raises(MeshError, match="already has DestinationRule demo/backend"):
        parse_mesh(text, "mesh.yaml")
