"""`up --shadow`: one more backend pod, node2-shadow (v3), planned, meshed and listed like
the demo pods, and nothing of it without the flag."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from nodeagent.controlplane.mesh import parse_mesh
from nodeagent.sandbox.manager import DEMOAPP_KIND, SandboxManager
from nodeagent.sandbox.mesh import build_mesh, dump_mesh, new_tokens
from nodeagent.sandbox.plan import PlanError, build_plan, netns_pattern
from nodeagent.sandbox.state import ProcessRecord, SandboxState, StateStore


def test_shadow_pod_is_a_v3_backend_on_node2_at_a_fixed_address() -> None:
    plan = build_plan("s", 2, 2, shadow=True)
    shadow = plan.shadow
    assert shadow is not None
    assert (shadow.name, shadow.ip, shadow.netns, shadow.node, shadow.index) == (
        "node2-shadow", "10.10.2.251", "s-node2-shadow", "node2", 241
    )  # fmt: skip
    assert (shadow.namespace, shadow.service_account) == ("demo", "backend")
    assert shadow.labels("s") == {
        "app": "backend",
        "version": "v3",
        "role": "backend",
        "sandbox": "s",
    }
    # A demo pod like the others: listed last among them, found by name and by netns.
    assert plan.pods[-1] is shadow
    assert plan.pod("node2-shadow") is shadow and plan.pod("s-node2-shadow") is shadow
    assert netns_pattern("s").match(shadow.netns)


def test_shadow_pod_is_wired_to_node2_like_any_pod() -> None:
    plan = build_plan("s", 2, 2, shadow=True)
    spaces = {ns.name: ns for ns in plan.namespaces}
    node2 = spaces["s-node2"]
    assert any(v.ifname == "vpod241" and v.peer_netns == "s-node2-shadow" for v in node2.veths)
    assert any(r.dst == "10.10.2.251/32" and r.dev == "vpod241" for r in node2.routes)
    pod = spaces["s-node2-shadow"]
    assert pod.role == "pod"
    assert [i.addresses for i in pod.interfaces] == [("10.10.2.251/32",)]
    assert [(r.dst, r.gateway) for r in pod.routes] == [
        ("10.10.2.1/32", None),
        ("default", "10.10.2.1"),
    ]
    # Node1 reaches it through node2's pod range, as it reaches node2's other pods.
    assert any(r.dst == "10.10.2.0/24" for r in spaces["s-node1"].routes)


def test_without_shadow_the_plan_is_unchanged() -> None:
    plain, shadowed = build_plan("s", 2, 2), build_plan("s", 2, 2, shadow=True)
    assert plain.shadow is None
    assert shadowed.pods[:-1] == plain.pods
    assert [n.name for n in shadowed.namespaces] == [n.name for n in plain.namespaces] + [
        "s-node2-shadow"
    ]
    # With the waypoint too: each at its own index, on its own node.
    both = build_plan("s", 2, 2, waypoint=True, shadow=True)
    assert both.waypoint is not None and both.shadow is not None
    assert (both.waypoint.node, both.shadow.node) == ("node1", "node2")
    assert len({ns.name for ns in both.namespaces}) == len(both.namespaces)


def test_shadow_needs_a_second_node() -> None:
    with pytest.raises(PlanError, match=r"--shadow .*node2.*--nodes"):
        build_plan("s", 1, 2, shadow=True)
    assert build_plan("s", 3, 1, shadow=True).pods[-1].name == "node2-shadow"


def test_shadow_pod_is_a_backend_endpoint_alone_in_a_v3_subset() -> None:
    plan = build_plan("s", 2, 2, shadow=True)
    parsed = parse_mesh(dump_mesh(build_mesh(plan, new_tokens(plan))), "mesh.yaml")
    (workload,) = [w for w in parsed.workloads if w.name == "node2-shadow"]
    assert (workload.node, workload.ips, workload.service_account) == (
        "node2", ("10.10.2.251",), "backend"
    )  # fmt: skip
    services = {s.name: s for s in parsed.services}
    backends = {w.name for w in parsed.workloads if services["backend"].selects(w)}
    assert backends == {"node1-pod2", "node2-pod2", "node2-shadow"}
    v3 = {w.name for w in parsed.workloads if dict(w.labels).get("version") == "v3"}
    assert v3 == {"node2-shadow"}


def test_status_lists_the_shadow_pod_with_its_app_log(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    state = SandboxState(name="s", nodes=2, pods_per_node=2, extra={"shadow": True})
    record = ProcessRecord(
        kind=DEMOAPP_KIND,
        name=f"{DEMOAPP_KIND}-node2-shadow",
        netns="s-node2-shadow",
        argv=("python",),
        log="/x/shadow.log",
    )
    assert store.claim(state.with_process(record))
    status = SandboxManager(store=store).status("s")
    pods = {p["name"]: p for p in status["pods"]}
    assert list(pods) == ["node1-pod1", "node1-pod2", "node2-pod1", "node2-pod2", "node2-shadow"]
    shadow = pods["node2-shadow"]
    assert (shadow["ip"], shadow["node"], shadow["labels"]["version"]) == (
        "10.10.2.251",
        "node2",
        "v3",
    )
    assert shadow["log"] == "/x/shadow.log"
    assert pods["node1-pod1"]["log"] is None  # no app recorded for it here
    # A sandbox made without the flag never grows one.
    store.save(dataclasses.replace(store.load("s"), extra={}))  # type: ignore[arg-type]
    assert "node2-shadow" not in {
        p["name"] for p in SandboxManager(store=store).status("s")["pods"]
    }


def test_the_sandbox_starts_every_demo_app_logging_its_requests(tmp_path: Path) -> None:
    plan = build_plan("s", 2, 2, shadow=True)
    specs = SandboxManager(store=StateStore(tmp_path))._demoapp_specs(plan, {})
    assert [s.name for s in specs][-1] == f"{DEMOAPP_KIND}-node2-shadow"
    assert all("--log-requests" in s.argv for s in specs)
    shadow = specs[-1]
    assert "--ip=10.10.2.251" in shadow.argv and "--service-account=backend" in shadow.argv
