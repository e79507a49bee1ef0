"""The mesh file loader: a good file becomes resources; bad input names line and field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from nodeagent.controlplane.mesh import MeshError, check_reload, load_mesh, parse_mesh
from nodeagent.controlplane.resources import build_snapshot
from nodeagent.model.constants import TYPE_URL_ADDRESS, TYPE_URL_AUTHORIZATION
from nodeagent.model.identity import Identity
from nodeagent.pb.istio.security import authorization_pb2 as authorization_pb
from nodeagent.pb.istio.workload import workload_pb2 as workload_pb

GOOD = textwrap.dedent(
    """\
    meshConfig:
      trustDomain: example.org
    nodes:
    - {name: node1, token: tok-1}
    - {name: node2, token: tok-2}
    workloads:
    - name: web-0
      namespace: shop
      node: node1
      ip: 10.1.0.5
      serviceAccount: web
      labels: {app: web, version: v2}
    - name: db-0
      namespace: shop
      node: node2
      ips: [10.2.0.7, "fd00::7"]
      serviceAccount: db
      labels: {app: db}
    services:
    - name: web
      namespace: shop
      vip: 10.96.0.10
      ports: [{port: 80, targetPort: 8080}, {port: 443}]
      selector: {app: web}
    authorizationPolicies:
    - apiVersion: security.istio.io/v1
      kind: AuthorizationPolicy
      metadata: {name: web-allow, namespace: shop}
      spec:
        action: ALLOW
        selector: {matchLabels: {app: web}}
        rules:
        - from:
          - source:
              principals: ["spiffe://example.org/ns/shop/sa/front", "example.org/ns/ops/*"]
              ipBlocks: [10.0.0.0/8]
          - source: {namespaces: ["*"], notNamespaces: ["kube-*"]}
          to:
          - operation: {ports: ["8080"], notPorts: [9090]}
    - metadata: {name: deny-all-plain, namespace: istio-system}
      spec:
        action: DENY
        rules: [{from: [{source: {notPrincipals: ["*"]}}]}]
    - metadata: {name: ns-wide, namespace: shop}
      spec: {}
    """
)


def addresses(text: str) -> dict[str, workload_pb.Address]:
    snap = build_snapshot(parse_mesh(text))
    out = {}
    for name, r in snap[TYPE_URL_ADDRESS].items():
        msg = workload_pb.Address()
        msg.ParseFromString(r.value)
        out[name] = msg
    return out


def policies(text: str) -> dict[str, authorization_pb.Authorization]:
    snap = build_snapshot(parse_mesh(text))
    out = {}
    for name, r in snap[TYPE_URL_AUTHORIZATION].items():
        msg = authorization_pb.Authorization()
        msg.ParseFromString(r.value)
        out[name] = msg
    return out


def test_good_file_becomes_workloads_services_and_policies_by_xds_name() -> None:
    addrs = addresses(GOOD)
    assert set(addrs) == {
        "Kubernetes//Pod/shop/web-0",
        "Kubernetes//Pod/shop/db-0",
        "shop/web.shop.svc.cluster.local",
    }
    web = addrs["Kubernetes//Pod/shop/web-0"].workload
    assert web.uid == "Kubernetes//Pod/shop/web-0"
    assert list(web.addresses) == [bytes([10, 1, 0, 5])]
    assert web.trust_domain == "example.org" and web.service_account == "web"
    assert web.node == "node1"
    assert web.tunnel_protocol == workload_pb.HBONE and web.workload_type == workload_pb.POD
    assert [
        (p.service_port, p.target_port)
        for p in web.services["shop/web.shop.svc.cluster.local"].ports
    ] == [
        (80, 8080),
        (443, 443),
    ]
    assert list(web.authorization_policies) == ["shop/web-allow"]
    db = addrs["Kubernetes//Pod/shop/db-0"].workload
    assert [len(a) for a in db.addresses] == [4, 16]
    assert dict(db.services) == {} and list(db.authorization_policies) == []
    svc = addrs["shop/web.shop.svc.cluster.local"].service
    assert svc.hostname == "web.shop.svc.cluster.local"
    assert [a.address for a in svc.addresses] == [bytes([10, 96, 0, 10])]


def test_policies_convert_scope_action_and_istio_string_matching() -> None:
    pols = policies(GOOD)
    allow = pols["shop/web-allow"]
    assert (
        allow.scope == authorization_pb.WORKLOAD_SELECTOR and allow.action == authorization_pb.ALLOW
    )
    (rule,) = allow.rules
    src, dst = rule.clauses
    first, second = src.matches
    assert first.principals[0].exact == "example.org/ns/shop/sa/front"
    assert first.principals[1].prefix == "example.org/ns/ops/"
    assert (first.source_ips[0].address, first.source_ips[0].length) == (bytes([10, 0, 0, 0]), 8)
    assert second.namespaces[0].HasField("presence")
    assert second.not_namespaces[0].prefix == "kube-"
    assert list(dst.matches[0].destination_ports) == [8080]
    assert list(dst.matches[0].not_destination_ports) == [9090]
    deny = pols["istio-system/deny-all-plain"]
    assert deny.scope == authorization_pb.GLOBAL and deny.action == authorization_pb.DENY
    assert deny.rules[0].clauses[0].matches[0].not_principals[0].HasField("presence")
    ns_wide = pols["shop/ns-wide"]
    assert ns_wide.scope == authorization_pb.NAMESPACE and list(ns_wide.rules) == []


def test_versions_are_content_hashes() -> None:
    a = build_snapshot(parse_mesh(GOOD))
    b = build_snapshot(parse_mesh(GOOD.replace("10.2.0.7", "10.2.0.8")))
    assert (
        a[TYPE_URL_ADDRESS]["Kubernetes//Pod/shop/web-0"]
        == b[TYPE_URL_ADDRESS]["Kubernetes//Pod/shop/web-0"]
    )
    assert (
        a[TYPE_URL_ADDRESS]["Kubernetes//Pod/shop/db-0"].version
        != b[TYPE_URL_ADDRESS]["Kubernetes//Pod/shop/db-0"].version
    )


def test_ca_lookups_map_token_to_node_and_node_to_identities() -> None:
    mesh = parse_mesh(GOOD)
    assert mesh.node_for_token("tok-2") == "node2"
    assert mesh.node_for_token("nope") is None and mesh.node_for_token("") is None
    assert mesh.identities_on_node("node1") == {Identity("example.org", "shop", "web")}
    assert mesh.identities_on_node("node3") == set()


@pytest.mark.parametrize(
    ("text", "line", "expected"),
    [
        # A truncated file (`: > mesh.yaml`) would take every pod out of the mesh.
        ("", 1, "nodes: the file is empty (truncated?); write `nodes: []`"),
        ("# only a comment\n\n", 1, "nodes: the file is empty"),
        ("meshConfig: {trustDomain: x}\n", 1, "nodes: no nodes declared; write `nodes: []`"),
        ("meshConfig: {trustDomain: x}\nnodes:\n", 2, "nodes: no nodes declared"),
    ],
)
def test_an_empty_file_or_one_without_nodes_is_refused(text: str, line: int, expected: str) -> None:
    with pytest.raises(MeshError) as err:
        parse_mesh(text, "mesh.yaml")
    assert str(err.value).startswith(f"mesh.yaml:{line}:"), err.value
    assert expected in str(err.value)


def test_emptiness_written_out_is_accepted_with_a_note() -> None:
    nothing = parse_mesh("nodes: []\n", "mesh.yaml")
    assert nothing.nodes == () and nothing.workloads == ()
    assert nothing.notes == ("mesh.yaml:1:1: nodes: [] given: serving no nodes",)
    idle = parse_mesh("nodes: [{name: n1, token: t}]\nworkloads: []\n", "mesh.yaml")
    assert idle.workloads_explicitly_empty
    assert idle.notes == ("mesh.yaml:2:1: workloads: [] given: serving no workloads",)
    # Leaving the section out is no statement at all: no note, no licence.
    quiet = parse_mesh("nodes: [{name: n1, token: t}]\n", "mesh.yaml")
    assert not quiet.workloads_explicitly_empty and quiet.notes == ()


def test_pod_ranges_place_each_workload_on_its_node() -> None:
    mesh = parse_mesh(
        "nodes:\n"
        "- {name: n1, token: t1, podCIDRs: [10.10.1.0/24, 'fd00:1::/64']}\n"
        "- {name: n2, token: t2, allowEmpty: true}\n"
        "workloads:\n"
        "- {name: a, node: n1, ips: [10.10.1.11, 'fd00:1::11']}\n"
    )
    assert mesh.nodes[0].pod_cidrs == ("10.10.1.0/24", "fd00:1::/64")
    assert mesh.nodes[1].allow_empty and not mesh.nodes[0].allow_empty
    assert mesh.nodes[1].pod_cidrs == ()  # no ranges: its workloads are not checked


BASE = "nodes: [{name: n1, token: t}]\n"
RANGES = (
    "nodes:\n- {name: n1, token: t1, podCIDRs: [10.10.1.0/24]}\n"
    "- {name: n2, token: t2, podCIDRs: [10.10.2.0/24]}\n"
)


@pytest.mark.parametrize(
    ("text", "line", "expected"),
    [
        ("workloads: [\n", 2, "YAML syntax error"),
        (BASE + "bogus: 1\n", 2, "bogus: unknown field"),
        (
            BASE + "workloads:\n- {name: a, node: n1, ip: 10.0.0.1, color: red}\n",
            3,
            "workloads[0].color: unknown field",
        ),
        (
            BASE + "workloads:\n- {name: a, node: n1, ip: 10.0.0.300}\n",
            3,
            "workloads[0].ip: '10.0.0.300' is not an IP",
        ),
        (
            BASE + "workloads:\n- {name: a, node: n1}\n",
            3,
            "workloads[0].ip: required field is missing",
        ),
        (
            BASE + "workloads:\n- {name: a, node: n9, ip: 10.0.0.1}\n",
            3,
            "workloads[0].node: node 'n9' is not declared",
        ),
        (
            BASE + "workloads:\n- {name: [a], node: n1, ip: 10.0.0.1}\n",
            3,
            "workloads[0].name: expected a string, got a list",
        ),
        (
            BASE + "workloads:\n- {name: a, node: n1, ip: 10.0.0.1}\n"
            "- {name: a, node: n1, ip: 10.0.0.2}\n",
            4,
            "workloads[1].name: duplicate name 'default/a'",
        ),
        (
            BASE + "workloads:\n- {name: a, node: n1, ip: 10.0.0.1}\n"
            "- {name: b, node: n1, ip: 10.0.0.1}\n",
            4,
            "workloads[1].ip: 10.0.0.1 is already used by workload default/a",
        ),
        ("nodes:\n- {name: n1}\n", 2, "nodes[0].token: required field is missing"),
        (
            "services:\n- name: s\n  ports:\n  - port: 70000\n",
            4,
            "services[0].ports[0].port: 70000 is out of range",
        ),
        (
            "services:\n- name: s\n  ports:\n  - {port: 80, targetPort: 0}\n",
            4,
            "targetPort: 0 is out of range",
        ),
        (
            "services:\n- name: s\n  ports:\n  - port: 1:20:30\n",
            4,
            "services[0].ports[0].port: expected an integer, got int '1:20:30'",
        ),
        (
            "services:\n- name: s\n  ports:\n  - port: eighty\n",
            4,
            "services[0].ports[0].port: expected an integer",
        ),
        ("services:\n- name: s\n  vip: nope\n", 3, "services[0].vip: 'nope' is not an IP"),
        (
            "authorizationPolicies:\n- metadata: {name: p}\n  spec: {action: AUDIT}\n",
            3,
            "authorizationPolicies[0].spec.action: 'AUDIT' is not supported",
        ),
        (
            "authorizationPolicies:\n- metadata: {name: p}\n  spec:\n    rules:\n"
            "    - when: [{key: x}]\n",
            5,
            "authorizationPolicies[0].spec.rules[0].when[0].key: 'x' is not supported here",
        ),
        (
            "authorizationPolicies:\n- metadata: {name: p}\n  spec:\n    rules:\n"
            "    - from: [{source: {ipBlocks: [10.0.0.0/33]}}]\n",
            5,
            "source.ipBlocks[0]: '10.0.0.0/33' is not an IP address or CIDR",
        ),
        ("meshConfig: {trustDomain: 5}\n", 1, "meshConfig.trustDomain: expected a string, got int"),
        (
            RANGES + "workloads:\n- {name: a, node: n1, ip: 10.10.9.11}\n",
            5,
            "workloads[0].ip: 10.10.9.11 is outside the pod range of node n1 (10.10.1.0/24)",
        ),
        (
            RANGES + "workloads:\n- name: a\n  node: n1\n  ips: [10.10.1.11, 10.10.2.11]\n",
            7,
            "workloads[0].ips[1]: 10.10.2.11 is outside the pod range of node n1 "
            "(10.10.1.0/24); it is in n2's range",
        ),
        (
            RANGES.replace("10.10.2.0/24", "10.10.0.0/16"),
            3,
            "nodes[1].podCIDRs[0]: 10.10.0.0/16 overlaps n1's 10.10.1.0/24",
        ),
        (
            "nodes:\n- {name: n1, token: t, podCIDRs: []}\n",
            2,
            "nodes[0].podCIDRs: must not be empty",
        ),
        (
            "nodes:\n- {name: n1, token: t, podCIDRs: [10.10.1.0/33]}\n",
            2,
            "nodes[0].podCIDRs[0]: '10.10.1.0/33' is not an IP address or CIDR",
        ),
        (
            "nodes:\n- {name: n1, token: t, allowEmpty: 'yes please'}\n",
            2,
            "nodes[0].allowEmpty: expected true or false",
        ),
        (
            "nodes:\n- {name: n1, token: t,\n   allowEmpty: true}\n"
            "workloads: [{name: a, node: n1, ip: 10.0.0.1}]\n",
            3,
            "nodes[0].allowEmpty: node n1 has 1 workload(s); remove allowEmpty",
        ),
    ],
)
def test_bad_input_is_refused_naming_file_line_and_field(
    text: str, line: int, expected: str
) -> None:
    with pytest.raises(MeshError) as err:
        parse_mesh(text, "mesh.yaml")
    message = str(err.value)
    assert message.startswith(f"mesh.yaml:{line}:"), message
    assert expected in message


def test_load_mesh_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MeshError, match=r"missing\.yaml: cannot read"):
        load_mesh(tmp_path / "missing.yaml")


# -- check_reload: what a running server refuses on top of the file's own rules ---------

TWO_NODES = textwrap.dedent(
    """\
    nodes:
    - {name: node1, token: t1}
    - {name: node2, token: t2}
    workloads:
    - {name: a, namespace: shop, node: node1, ip: 10.1.0.1}
    - {name: b, namespace: shop, node: node1, ip: 10.1.0.2}
    - {name: c, namespace: shop, node: node2, ip: 10.2.0.1}
    """
)
NODE1_EMPTIED = TWO_NODES.replace(
    "- {name: a, namespace: shop, node: node1, ip: 10.1.0.1}\n"
    "- {name: b, namespace: shop, node: node1, ip: 10.1.0.2}\n",
    "",
)


def test_reload_may_not_empty_a_node_whose_agent_is_connected() -> None:
    old, new = parse_mesh(TWO_NODES, "m.yaml"), parse_mesh(NODE1_EMPTIED, "m.yaml")
    with pytest.raises(MeshError) as err:
        check_reload(old, new, {"node1", "node2"})
    assert str(err.value) == (
        "m.yaml:2:3: nodes[0]: this edit removes every workload of node node1 "
        "(2 workload(s) before: shop/a, shop/b) while its agent is connected; "
        "add `allowEmpty: true` to the node if that is intended"
    )
    # No agent on node1: nothing is taken from a running node.
    assert check_reload(old, new, {"node2"}) == ()
    # A node that had no workloads before is not being emptied by this edit.
    assert check_reload(new, new, {"node1"}) == ()


def test_reload_empties_a_connected_node_when_the_file_says_so() -> None:
    old = parse_mesh(TWO_NODES, "m.yaml")
    flagged = parse_mesh(
        NODE1_EMPTIED.replace("token: t1}", "token: t1, allowEmpty: true}"), "m.yaml"
    )
    assert check_reload(old, flagged, {"node1"}) == (
        "m.yaml:2:3: nodes[0].allowEmpty: node node1 (agent connected) is left without "
        "workloads on purpose (2 workload(s) before: shop/a, shop/b)",
    )
    cleared = parse_mesh(TWO_NODES.split("workloads:")[0] + "workloads: []\n", "m.yaml")
    notes = check_reload(old, cleared, {"node1", "node2"})
    assert [n.split(": node ")[1].split(" ")[0] for n in notes] == ["node1", "node2"]
    assert all(n.startswith("m.yaml:4:1: workloads: [] given") for n in notes)


def test_reload_may_not_drop_a_connected_node_with_its_workloads() -> None:
    old = parse_mesh(TWO_NODES, "m.yaml")
    without_node2 = parse_mesh(
        TWO_NODES.replace("- {name: node2, token: t2}\n", "").replace(
            "- {name: c, namespace: shop, node: node2, ip: 10.2.0.1}\n", ""
        ),
        "m.yaml",
    )
    with pytest.raises(MeshError, match=r"^m\.yaml:1:1: nodes: this edit removes node node2 "):
        check_reload(old, without_node2, {"node2"})
    assert check_reload(old, without_node2, {"node1"}) == ()
