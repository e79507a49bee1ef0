"""The sandbox topology plan: deterministic names, addresses and routes from N and M."""

from __future__ import annotations

import pytest

from nodeagent.sandbox.plan import (
    PlanError,
    Route,
    alternate_versions,
    build_plan,
    netns_pattern,
    validate_name,
)


def test_two_by_two_plan_has_documented_names_and_addresses() -> None:
    plan = build_plan("demo", 2, 2)
    assert [(n.name, n.ip, n.netns, n.pod_cidr, n.gateway) for n in plan.nodes] == [
        ("node1", "172.30.0.11", "demo-node1", "10.10.1.0/24", "10.10.1.1"),
        ("node2", "172.30.0.12", "demo-node2", "10.10.2.0/24", "10.10.2.1"),
    ]
    assert [(p.name, p.ip, p.netns, p.node) for p in plan.pods] == [
        ("node1-pod1", "10.10.1.11", "demo-node1-pod1", "node1"),
        ("node1-pod2", "10.10.1.12", "demo-node1-pod2", "node1"),
        ("node2-pod1", "10.10.2.11", "demo-node2-pod1", "node2"),
        ("node2-pod2", "10.10.2.12", "demo-node2-pod2", "node2"),
    ]
    assert plan.underlay_netns == "demo-underlay"
    assert [ns.name for ns in plan.namespaces][:3] == ["demo-underlay", "demo-node1", "demo-node2"]


def test_every_node_has_both_service_accounts_in_a_two_by_two() -> None:
    plan = build_plan("demo", 2, 2)
    for node in plan.nodes:
        accounts = {p.service_account for p in plan.pods if p.node == node.name}
        assert accounts == {"frontend", "backend"}
    assert {p.namespace for p in plan.pods} == {"demo"}


def test_pods_are_labelled_with_the_service_they_serve_and_alternating_versions() -> None:
    plan = build_plan("demo", 2, 2)
    assert [(p.name, p.labels("demo")) for p in plan.pods] == [
        ("node1-pod1", {"app": "frontend", "version": "v1", "role": "frontend", "sandbox": "demo"}),
        ("node1-pod2", {"app": "backend", "version": "v1", "role": "backend", "sandbox": "demo"}),
        ("node2-pod1", {"app": "frontend", "version": "v2", "role": "frontend", "sandbox": "demo"}),
        ("node2-pod2", {"app": "backend", "version": "v2", "role": "backend", "sandbox": "demo"}),
    ]


@pytest.mark.parametrize(
    ("apps", "versions"),
    [
        ([], []),
        (["a"], ["v1"]),
        (["a", "a", "a"], ["v1", "v2", "v1"]),
        (["a", "b", "b", "a", "a"], ["v1", "v1", "v2", "v2", "v1"]),
    ],
)
def test_each_apps_pods_alternate_versions_in_pod_order(
    apps: list[str], versions: list[str]
) -> None:
    assert alternate_versions(apps) == versions


def test_one_node_with_four_pods_has_both_versions_of_each_app() -> None:
    plan = build_plan("demo", 1, 4)
    assert [(p.app, p.version) for p in plan.pods] == [
        ("frontend", "v1"), ("backend", "v1"), ("frontend", "v2"), ("backend", "v2")
    ]  # fmt: skip


def test_plan_is_deterministic() -> None:
    assert build_plan("a", 3, 4) == build_plan("a", 3, 4)


def test_node_routes_own_pods_directly_and_other_ranges_via_their_nodes() -> None:
    plan = build_plan("s", 3, 2)
    node2 = next(ns for ns in plan.namespaces if ns.name == "s-node2")
    assert Route(dst="10.10.2.11/32", dev="vpod1") in node2.routes
    assert Route(dst="10.10.2.12/32", dev="vpod2") in node2.routes
    assert Route(dst="10.10.1.0/24", gateway="172.30.0.11") in node2.routes
    assert Route(dst="10.10.3.0/24", gateway="172.30.0.13") in node2.routes
    assert all(r.dst != "10.10.2.0/24" for r in node2.routes)
    assert ("ipv4/ip_forward", "1") in node2.sysctls
    assert ("ipv4/conf/all/rp_filter", "0") in node2.sysctls


def test_pod_routes_everything_via_its_node_gateway() -> None:
    plan = build_plan("s", 1, 1)
    pod = next(ns for ns in plan.namespaces if ns.role == "pod")
    assert pod.routes == (
        Route(dst="10.10.1.1/32", dev="eth0"),
        Route(dst="default", gateway="10.10.1.1"),
    )
    assert pod.interfaces[0].addresses == ("10.10.1.11/32",)


def test_veths_connect_underlay_to_nodes_and_nodes_to_pods() -> None:
    plan = build_plan("s", 2, 3)
    pairs = {
        (v.netns, v.ifname, v.peer_netns, v.peer_ifname) for ns in plan.namespaces for v in ns.veths
    }
    assert ("s-underlay", "vnode2", "s-node2", "eth0") in pairs
    assert ("s-node2", "vpod3", "s-node2-pod3", "eth0") in pairs
    assert len(pairs) == 2 + 6
    # Every interface sits in a sandbox namespace, so names only need to be unique
    # per namespace, and they fit the kernel's 15 characters.
    for ns in plan.namespaces:
        names = [i.ifname for i in ns.interfaces]
        assert len(names) == len(set(names))
        assert all(len(n) <= 15 for n in names)


def test_largest_plan_keeps_addresses_valid() -> None:
    plan = build_plan("big", 64, 128)
    assert plan.pods[-1].ip == "10.10.64.138"
    assert plan.nodes[-1].ip == "172.30.0.74"
    assert len({p.ip for p in plan.pods}) == 64 * 128


@pytest.mark.parametrize("name", ["a", "demo", "t1234567", "my-box", "x" * 20])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "Demo", "1abc", "-a", "a-", "a_b", "a.b", "x" * 21, "a/b"])
def test_invalid_names_are_refused(name: str) -> None:
    with pytest.raises(PlanError, match="invalid sandbox name"):
        validate_name(name)


@pytest.mark.parametrize(
    ("nodes", "pods", "what"), [(0, 1, "--nodes"), (65, 1, "--nodes"), (1, 0, "--pods-per-node")]
)
def test_out_of_range_counts_are_refused(nodes: int, pods: int, what: str) -> None:
    with pytest.raises(PlanError, match=what):
        build_plan("s", nodes, pods)


def test_sweep_pattern_matches_only_this_sandboxes_namespaces() -> None:
    pattern = netns_pattern("a")
    for mine in ("a-underlay", "a-node1", "a-node12-pod3"):
        assert pattern.match(mine)
    # Namespaces of sandbox "a-node1" or "ab" are not "a"'s.
    for other in ("a-node1-underlay", "a-node1-node1", "a-node1-node1-pod1", "ab-node1", "a-x"):
        assert not pattern.match(other)


def test_a_waypoint_pod_is_wired_like_a_pod_of_node1_and_swept_with_the_sandbox() -> None:
    plan = build_plan("wp", 2, 2, waypoint=True)
    wp = plan.waypoint
    assert wp is not None
    assert (wp.name, wp.namespace, wp.node, wp.ip, wp.netns) == (
        "waypoint", "demo", "node1", "10.10.1.250", "wp-node1-waypoint",
    )  # fmt: skip
    assert wp not in plan.pods  # not a demo app, not captured
    node1 = next(ns for ns in plan.namespaces if ns.name == "wp-node1")
    assert any(v.peer_netns == wp.netns for v in node1.veths)
    assert any(r.dst == "10.10.1.250/32" for r in node1.routes)
    own = next(ns for ns in plan.namespaces if ns.name == wp.netns)
    assert own.role == "pod"
    assert netns_pattern("wp").match(wp.netns)
    assert build_plan("wp", 2, 2).waypoint is None
