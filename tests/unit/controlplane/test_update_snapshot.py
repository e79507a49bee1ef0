"""An edit's snapshot, built incrementally: equal to a full build, and naming only what changed."""

from __future__ import annotations

import pytest

from nodeagent.controlplane.mesh import parse_mesh
from nodeagent.controlplane.resources import build_snapshot, update_snapshot
from nodeagent.model.constants import TYPE_URL_ADDRESS as ADDR
from nodeagent.model.constants import TYPE_URL_AUTHORIZATION as AUTHZ
from nodeagent.model.constants import TYPE_URL_DESTINATION_RULE as DR

MESH = """\
meshConfig: {trustDomain: cluster.local}
nodes: [{name: node1, token: tok-1}]
workloads:
- {name: a, namespace: shop, node: node1, ip: 10.0.0.1, labels: {app: web}}
- {name: b, namespace: shop, node: node1, ip: 10.0.0.2, labels: {app: web}}
- {name: c, namespace: shop, node: node1, ip: 10.0.0.3, labels: {app: db}}
- {name: d, namespace: shop, node: node1, ip: 10.0.0.4, uid: uid-d}
- {name: e, namespace: shop, node: node1, ip: 10.0.0.5, uid: uid-e}
services:
- {name: web, namespace: shop, vip: 10.96.0.1, ports: [{port: 80}], selector: {app: web}}
- {name: db, namespace: shop, vip: 10.96.0.2, ports: [{port: 5432}], selector: {app: db}}
authorizationPolicies:
- metadata: {name: only-web, namespace: shop}
  spec: {selector: {matchLabels: {app: db}}, rules: [{from: [{source: {namespaces: [shop]}}]}]}
destinationRules:
- metadata: {name: db, namespace: shop}
  spec: {host: db, subsets: [{name: v1, labels: {version: v1}}]}
"""
A, B, C = "Kubernetes//Pod/shop/a", "Kubernetes//Pod/shop/b", "Kubernetes//Pod/shop/c"
WEB, DB = "shop/web.shop.svc.cluster.local", "shop/db.shop.svc.cluster.local"


@pytest.mark.parametrize(
    ("old", "new", "changed"),
    [
        pytest.param("ip: 10.0.0.1", "ip: 10.0.0.9", {ADDR: {A}}, id="one-workload"),
        pytest.param(
            "- {name: b, namespace: shop, node: node1, ip: 10.0.0.2, labels: {app: web}}\n",
            "",
            {ADDR: {B}},
            id="workload-removed",
        ),
        pytest.param("ip: 10.0.0.3, labels: {app: db}", "ip: 10.0.0.3", {ADDR: {C}}, id="label"),
        pytest.param("ports: [{port: 80}]", "ports: [{port: 81}]", {ADDR: {A, B, WEB}}, id="svc"),
        pytest.param(
            "selector: {app: web}}", "selector: {app: db}}", {ADDR: {A, B, C, WEB}}, id="selector"
        ),
        pytest.param("vip: 10.96.0.2, ", "", {ADDR: {DB, C}}, id="vip-only"),
        pytest.param(
            "namespaces: [shop]", "namespaces: [web]", {ADDR: {C}, AUTHZ: {"shop/only-web"}}, id="p"
        ),
        pytest.param(
            "matchLabels: {app: db}",
            "matchLabels: {app: web}",
            {ADDR: {A, B, C}, AUTHZ: {"shop/only-web"}},
            id="policy-selector",
        ),
        pytest.param("uid: uid-d}", "uid: uid-e}", {ADDR: {"uid-d", "uid-e"}}, id="uid-swap"),
        pytest.param("{name: v1,", "{name: v2,", {DR: {"shop/db"}}, id="destination-rule"),
        pytest.param("trustDomain: cluster.local", "trustDomain: example.org", None, id="trust"),
    ],
)
def test_an_edit_rebuilds_only_what_it_touches_and_equals_a_full_build(
    old: str, new: str, changed: dict[str, set[str]] | None
) -> None:
    text = MESH.replace(old, new, 1)
    if "uid-e}" in new:  # and e takes d's: the two resources swap names
        text = text.replace("ip: 10.0.0.5, uid: uid-e}", "ip: 10.0.0.5, uid: uid-d}")
    before, after = parse_mesh(MESH), parse_mesh(text)
    base = build_snapshot(before)
    snapshot, changes = update_snapshot(before, base, after)
    assert snapshot == build_snapshot(after)
    if changed is not None:
        assert {t: set(names) for t, names in changes.items()} == changed
    # Every name whose resource differs is in the changes (none is missed); the changes
    # may name more (rebuilt, the same bytes): a stream compares versions before sending.
    for type_url in snapshot.keys() | base.keys():
        differ = {
            n
            for n in snapshot.get(type_url, {}).keys() | base.get(type_url, {}).keys()
            if snapshot.get(type_url, {}).get(n) != base.get(type_url, {}).get(n)
        }
        assert differ <= set(changes.get(type_url, ())), type_url


def test_an_unchanged_mesh_changes_nothing() -> None:
    mesh = parse_mesh(MESH)
    base = build_snapshot(mesh)
    snapshot, changes = update_snapshot(mesh, base, parse_mesh(MESH))
    assert snapshot == base and changes == {}
