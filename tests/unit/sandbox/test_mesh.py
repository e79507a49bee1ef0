"""The sandbox's mesh file: built from the topology, merged by `apply`, validated first.

The control plane's own parser is the judge of validity here, as it is in the
CLI (the sandbox package may not import it; the CLI injects it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from nodeagent.cli.sandbox import controlplane_line
from nodeagent.controlplane.mesh import MeshError, check_reload, parse_mesh
from nodeagent.sandbox.manager import CONTROLPLANE_KIND, SandboxError, SandboxManager
from nodeagent.sandbox.mesh import (
    ApplyError,
    UserFile,
    build_mesh,
    counts,
    dump_mesh,
    load_mesh_dict,
    merge_resources,
    new_tokens,
    parse_user_file,
    standalone_text,
)
from nodeagent.sandbox.plan import build_plan
from nodeagent.sandbox.state import ProcessRecord, SandboxState, StateStore

PLAN = build_plan("s", 2, 2)
TOKENS = {"node1": "t1" * 12, "node2": "t2" * 12}

POLICY = """\
authorizationPolicies:
- metadata: {name: deny-frontend, namespace: demo}
  spec:
    action: DENY
    rules:
    - from: [{source: {principals: ["cluster.local/ns/demo/sa/frontend"]}}]
"""


def test_mesh_has_a_node_per_node_and_a_workload_per_pod_and_passes_the_control_plane() -> None:
    mesh = build_mesh(PLAN, TOKENS)
    parsed = parse_mesh(dump_mesh(mesh), "mesh.yaml")
    assert parsed.trust_domain == "cluster.local"
    assert [(n.name, n.token) for n in parsed.nodes] == list(TOKENS.items())
    assert [n.pod_cidrs for n in parsed.nodes] == [("10.10.1.0/24",), ("10.10.2.0/24",)]
    assert not any(n.allow_empty for n in parsed.nodes)
    by_name = {w.name: w for w in parsed.workloads}
    for pod in PLAN.pods:
        w = by_name[pod.name]
        assert (w.namespace, w.node, w.ips, w.service_account) == (
            "demo", pod.node, (pod.ip,), pod.service_account
        )  # fmt: skip
        assert dict(w.labels) == {
            "app": pod.app, "version": pod.version, "role": pod.service_account, "sandbox": "s"
        }  # fmt: skip
    services = {s.name: s for s in parsed.services}
    assert services["backend"].vips == ("10.96.0.10",)
    backends = {w.name for w in parsed.workloads if services["backend"].selects(w)}
    assert backends == {"node1-pod2", "node2-pod2"}
    assert dict(services["backend"].selector) == {"app": "backend"}
    assert all(services["echo"].selects(w) for w in parsed.workloads)
    assert len(parsed.workloads) == len(PLAN.pods)
    assert counts(mesh) == {
        "nodes": 2, "workloads": 4, "services": 2, "authorizationPolicies": 0
    }  # fmt: skip


def test_every_node_needs_a_token_and_tokens_are_random() -> None:
    with pytest.raises(ValueError, match="node2"):
        build_mesh(PLAN, {"node1": "x"})
    a, b = new_tokens(PLAN), new_tokens(PLAN)
    assert set(a) == {"node1", "node2"}
    assert len(set(a.values()) | set(b.values())) == 4
    assert all(len(t) >= 24 for t in a.values())


def test_merge_adds_replaces_and_deletes_by_kind_namespace_and_name() -> None:
    mesh = build_mesh(PLAN, TOKENS)
    user = parse_user_file(POLICY, "p.yaml")
    added, summary = merge_resources(mesh, user)
    assert summary.added == ("policy demo/deny-frontend",)
    assert mesh["authorizationPolicies"] == []  # the input is not changed
    assert parse_mesh(dump_mesh(added)).policies[0].action == "DENY"

    allow = parse_user_file(POLICY.replace("DENY", "ALLOW"), "p.yaml")
    replaced, summary = merge_resources(added, allow)
    assert summary.replaced == ("policy demo/deny-frontend",)
    assert [p["spec"]["action"] for p in replaced["authorizationPolicies"]] == ["ALLOW"]

    # Same name, other namespace: another resource. Namespace defaults to `default`.
    other = parse_user_file(POLICY.replace("namespace: demo", "namespace: shop"), "p.yaml")
    bare = UserFile({"services": [{"name": "backend", "ports": [{"port": 80}]}]})
    both, summary = merge_resources(replaced, UserFile({**other.sections, **bare.sections}))
    assert summary.added == ("service default/backend", "policy shop/deny-frontend")
    assert len(both["authorizationPolicies"]) == 2

    gone, summary = merge_resources(both, UserFile({**user.sections, **bare.sections}), delete=True)
    assert summary.deleted == ("service default/backend", "policy demo/deny-frontend")
    assert [p["metadata"]["namespace"] for p in gone["authorizationPolicies"]] == ["shop"]
    _, summary = merge_resources(gone, user, delete=True)
    assert summary.missing == ("policy demo/deny-frontend",)
    assert summary.describe() == "not found 1 (policy demo/deny-frontend)"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nodes: []\n", r"^u\.yaml:1:1: nodes: the sandbox owns its nodes"),
        ("services: []\nmeshConfig: {}\n", r"^u\.yaml:2:1: meshConfig: the sandbox owns"),
        ("policies: []\n", r"^u\.yaml:1:1: policies: unknown section"),
        ("services: []\nservices: []\n", r"^u\.yaml:2:1: services: duplicate section"),
        ("services: {name: x}\n", r"^u\.yaml:1:11: services: expected a list"),
        ("services:\n- ports: []\n", r"^u\.yaml:2:3: services\[0\]\.name: required"),
        (
            "authorizationPolicies:\n- spec: {}\n",
            r"^u\.yaml:2:3: authorizationPolicies\[0\]\.metadata\.name: required",
        ),
        ("services: [\n", r"^u\.yaml:2:1: YAML syntax error"),
        ("services:\n- {name: x\n  ports: []\n", r"^u\.yaml:3:\d+: YAML syntax error: .*\(while"),
        ("- a\n", r"^u\.yaml:1:1: expected a mapping"),
        ("", r"^u\.yaml: the file is empty"),
    ],
)
def test_a_bad_apply_file_is_named_with_its_line_and_field(text: str, message: str) -> None:
    with pytest.raises(ApplyError, match=message):
        parse_user_file(text, "u.yaml")


def test_standalone_text_keeps_the_users_line_numbers_and_declares_the_nodes() -> None:
    workload = "workloads:\n- name: extra\n  namespace: demo\n  node: node1\n  ip: 10.10.1.99\n"
    parse_mesh(standalone_text(workload, PLAN), "u.yaml")  # valid
    with pytest.raises(MeshError, match=r"^u\.yaml:5:\d+: workloads\[0\]\.ip: '10\.10\.1\.999'"):
        parse_mesh(standalone_text(workload.replace(".99", ".999"), PLAN), "u.yaml")
    # The nodes carry their pod ranges: an address node1 cannot have is the user's line.
    with pytest.raises(
        MeshError,
        match=r"^u\.yaml:5:7: workloads\[0\]\.ip: 10\.10\.2\.99 is outside the pod range of "
        r"node node1 \(10\.10\.1\.0/24\); it is in node2's range$",
    ):
        parse_mesh(standalone_text(workload.replace("10.10.1.99", "10.10.2.99"), PLAN), "u.yaml")
    # A flow mapping takes the nodes inside its braces, the user's columns unchanged.
    flow = "{workloads: [{name: x, namespace: demo, node: node2, ip: 10.10.2.99}]}  # one\n"
    text = standalone_text(flow, PLAN)
    assert text.startswith(flow[: flow.index("]}") + 1] + ", nodes: [")
    assert [w.node for w in parse_mesh(text).workloads] == ["node2"]
    moved = flow.replace("10.10.2.99", "10.10.1.99")
    column = moved.index("10.10.1.99") + 1
    with pytest.raises(MeshError, match=rf"^u\.yaml:1:{column}: workloads\[0\]\.ip: 10\.10\.1\.99"):
        parse_mesh(standalone_text(moved, PLAN), "u.yaml")
    assert parse_mesh(standalone_text("{}", PLAN)).workloads == ()


# -- SandboxManager.apply, on a state dir in tmp_path (no namespaces needed) --------


def _validate(text: str, source: str) -> None:
    parse_mesh(text, source)


def _sandbox(tmp_path: Path) -> tuple[SandboxManager, Path]:
    store = StateStore(tmp_path)
    mesh_file = store.mesh_path("s")
    info: dict[str, Any] = {"address": "172.30.0.1:15010", "mesh_file": str(mesh_file)}
    state = SandboxState(name="s", nodes=2, pods_per_node=2)
    record = ProcessRecord(kind=CONTROLPLANE_KIND, name="controlplane", netns="s-underlay",
                           argv=("nodeagent", "controlplane"), log="cp.log")  # fmt: skip
    state = state.with_process(record)
    assert store.claim(dataclasses.replace(state, extra={CONTROLPLANE_KIND: info}))
    store.write_private(mesh_file, dump_mesh(build_mesh(PLAN, TOKENS)))
    return SandboxManager(store=store), mesh_file


def test_apply_rewrites_the_mesh_file_privately_and_refuses_bad_files(tmp_path: Path) -> None:
    manager, mesh_file = _sandbox(tmp_path)
    summary = manager.apply("s", POLICY, "p.yaml", _validate)
    assert summary.added == ("policy demo/deny-frontend",)
    assert counts(load_mesh_dict(mesh_file.read_text(), "m"))["authorizationPolicies"] == 1
    assert mesh_file.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.joinpath("s").iterdir() if p.name.endswith(".tmp")] == []

    before = mesh_file.read_bytes()
    bad_action = POLICY.replace("DENY", "AUDIT")
    with pytest.raises(SandboxError, match=r"^bad\.yaml:4:\d+: authorizationPolicies\[0\]"):
        manager.apply("s", bad_action, "bad.yaml", _validate)
    clash = "services:\n- {name: web, namespace: demo, vip: 10.96.0.10, ports: [{port: 80}]}\n"
    with pytest.raises(SandboxError, match=r"^clash\.yaml does not fit .*10\.96\.0\.10"):
        manager.apply("s", clash, "clash.yaml", _validate)
    assert mesh_file.read_bytes() == before

    summary = manager.apply("s", POLICY, "p.yaml", _validate, delete=True)
    assert summary.deleted == ("policy demo/deny-frontend",)


def test_apply_needs_a_sandbox_with_a_control_plane(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    assert store.claim(SandboxState(name="s", nodes=1, pods_per_node=1))
    with pytest.raises(SandboxError, match="no control plane"):
        SandboxManager(store=store).apply("s", POLICY, "p.yaml", _validate)
    with pytest.raises(SandboxError, match="unknown sandbox"):
        SandboxManager(store=store).apply("nope", POLICY, "p.yaml", _validate)


def _workload(name: str, node: str, ip: str, *, app: str = "x") -> str:
    return (
        f"workloads:\n- name: {name}\n  namespace: demo\n  node: {node}\n  ip: {ip}\n"
        f"  serviceAccount: backend\n  labels: {{app: {app}}}\n"
    )


def test_apply_refuses_a_pods_name_at_another_address_or_node_unless_replace(
    tmp_path: Path,
) -> None:
    manager, mesh_file = _sandbox(tmp_path)
    before = mesh_file.read_bytes()
    moved = _workload("node1-pod1", "node1", "10.10.1.99")
    with pytest.raises(SandboxError) as err:
        manager.apply("s", moved, "moved.yaml", _validate)
    assert str(err.value) == (
        "moved.yaml:2:3: workloads[0].ip: workload demo/node1-pod1 is 10.10.1.11 on node1 "
        "in the sandbox, this file puts it at 10.10.1.99 on node1: that is another pod; "
        "give it another name, or pass --replace to replace it"
    )
    other_node = _workload("node1-pod1", "node2", "10.10.2.99")
    both_named = r"is 10\.10\.1\.11 on node1 in the sandbox, .* at 10\.10\.2\.99 on node2: "
    with pytest.raises(SandboxError, match=r"^n\.yaml:2:3: workloads\[0\]\.ip: .*" + both_named):
        manager.apply("s", other_node, "n.yaml", _validate)
    assert mesh_file.read_bytes() == before

    # The same pod (same address and node) may change its labels without --replace.
    relabel = _workload("node1-pod1", "node1", "10.10.1.11", app="y")
    assert manager.apply("s", relabel, "r", _validate).replaced == ("workload demo/node1-pod1",)
    summary = manager.apply("s", moved, "moved.yaml", _validate, replace=True)
    assert summary.replaced == ("workload demo/node1-pod1",)
    served = parse_mesh(mesh_file.read_text())
    assert [w.ips for w in served.workloads if w.name == "node1-pod1"] == [("10.10.1.99",)]


def test_merge_names_the_node_when_only_the_node_changes() -> None:
    mesh = {"nodes": [], "workloads": [{"name": "a", "node": "n1", "ips": ["fd00::1"]}]}
    user = UserFile({"workloads": [{"name": "a", "node": "n2", "ips": ["fd00:0::1"]}]},
                    {("workloads", 0): "u.yaml:2:3"})  # fmt: skip
    with pytest.raises(ApplyError, match=r"^u\.yaml:2:3: workloads\[0\]\.node: workload "
                       r"default/a is fd00::1 on n1 .* fd00::1 on n2"):  # fmt: skip
        merge_resources(mesh, user)
    merged, _ = merge_resources(mesh, user, replace=True)
    assert merged["workloads"][0]["node"] == "n2"


def test_apply_refuses_an_address_outside_the_nodes_pod_range_on_the_users_line(
    tmp_path: Path,
) -> None:
    manager, mesh_file = _sandbox(tmp_path)
    before = mesh_file.read_bytes()
    with pytest.raises(SandboxError) as err:
        manager.apply("s", _workload("stray", "node2", "10.10.9.5"), "stray.yaml", _validate)
    assert str(err.value) == (
        "stray.yaml:5:7: workloads[0].ip: 10.10.9.5 is outside the pod range of node node2 "
        "(10.10.2.0/24)"
    )
    assert mesh_file.read_bytes() == before


def test_deleting_a_nodes_last_pods_marks_it_allow_empty_so_the_reload_is_accepted(
    tmp_path: Path,
) -> None:
    manager, mesh_file = _sandbox(tmp_path)
    old = parse_mesh(mesh_file.read_text(), "m")
    node2_pods = "".join(
        f"- {{name: {p.name}, namespace: demo, node: node2, ip: {p.ip}}}\n"
        for p in PLAN.pods
        if p.node == "node2"
    )
    summary = manager.apply("s", "workloads:\n" + node2_pods, "d.yaml", _validate, delete=True)
    assert summary.emptied == ("node2",)
    assert summary.describe().endswith("; no workloads left on node2 (allowEmpty set)")
    new = parse_mesh(mesh_file.read_text(), "m")
    assert [(n.name, n.allow_empty) for n in new.nodes] == [("node1", False), ("node2", True)]
    # What the running control plane decides with both agents connected: accepted, noted.
    notes = check_reload(old, new, {"node1", "node2"})
    assert len(notes) == 1 and "node node2 (agent connected) is left without workloads" in notes[0]

    # A pod back on node2: the mark goes (the control plane refuses a stale one).
    manager.apply("s", _workload("back", "node2", "10.10.2.50"), "b.yaml", _validate)
    assert not any(n.allow_empty for n in parse_mesh(mesh_file.read_text(), "m").nodes)


def test_a_broken_mesh_file_is_one_line_for_apply_and_status(tmp_path: Path) -> None:
    manager, mesh_file = _sandbox(tmp_path)
    good = mesh_file.read_text()
    mesh_file.write_text(good.replace("workloads:\n", "workloads: [\n", 1))
    with pytest.raises(SandboxError) as err:
        manager.apply("s", POLICY, "p.yaml", _validate)
    message = str(err.value)
    assert message.startswith(f"{mesh_file}:") and "YAML syntax error" in message
    assert message.endswith("(sandbox s's mesh file; nothing applied: fix or restore it)")
    assert "\n" not in message

    cp = manager.status("s")["controlplane"]
    assert "serves" not in cp
    assert cp["mesh_error"] == message.split(" (sandbox s's")[0]
    shown = controlplane_line(cp).splitlines()
    assert shown[0].startswith("control plane 172.30.0.1:15010 (pid NOT RUNNING")
    assert shown[1] == (
        "mesh file refused (the control plane keeps serving its last good one): " + cp["mesh_error"]
    )

    mesh_file.write_text("")  # truncated
    assert manager.status("s")["controlplane"]["mesh_error"] == (
        f"{mesh_file}:1:1: nodes: the file is empty (truncated?)"
    )
    mesh_file.write_text("services: []\n")
    assert manager.status("s")["controlplane"]["mesh_error"] == (
        f"{mesh_file}:1:1: nodes: missing; this is not a sandbox's mesh file"
    )
    mesh_file.write_text(good)
    assert manager.status("s")["controlplane"]["serves"]["workloads"] == 4


def test_status_shows_each_pods_labels_as_the_mesh_file_gives_them(tmp_path: Path) -> None:
    manager, mesh_file = _sandbox(tmp_path)
    pods = {p["name"]: p["labels"] for p in manager.status("s")["pods"]}
    assert pods["node2-pod2"] == {
        "app": "backend",
        "version": "v2",
        "role": "backend",
        "sandbox": "s",
    }
    served = {
        w["name"]: w["labels"] for w in load_mesh_dict(mesh_file.read_text(), "m")["workloads"]
    }
    assert pods == served


def test_apply_labels_a_namespace_and_puts_its_services_behind_a_waypoint() -> None:
    # The waypoint: a workload of its own (its service account, gateway-name) and a
    # service with 15008; the namespace label sends demo's services through it.
    mesh = build_mesh(PLAN, TOKENS)
    node = mesh["workloads"][0]["node"]
    ip = mesh["workloads"][0]["ip"].rsplit(".", 1)[0] + ".200"
    text = (
        "namespaces:\n- {name: demo, labels: {istio.io/use-waypoint: waypoint}}\n"
        f"workloads:\n- {{name: waypoint-0, namespace: demo, node: {node}, ip: {ip},"
        " serviceAccount: waypoint,"
        " labels: {gateway.networking.k8s.io/gateway-name: waypoint}}\n"
        "services:\n- {name: waypoint, namespace: demo, vip: 10.96.0.20, ports: [{port: 15008}],"
        " selector: {gateway.networking.k8s.io/gateway-name: waypoint}}\n"
    )
    merged, summary = merge_resources(mesh, parse_user_file(text, "w.yaml"))
    assert summary.added[0] == "namespace demo"
    parsed = parse_mesh(dump_mesh(merged))
    waypoints = {s.name: s.waypoint for s in parsed.services}
    assert waypoints == {
        "backend": "demo/waypoint.demo.svc.cluster.local",
        "echo": "demo/waypoint.demo.svc.cluster.local",
        "waypoint": "",
    }


def test_a_waypoint_sandbox_declares_it_as_istio_does_and_labels_demo_only_when_asked() -> None:
    plan = build_plan("wp", 2, 2, waypoint=True)
    tokens = {n.name: "t" for n in plan.nodes}
    mesh = build_mesh(plan, tokens)
    (workload,) = [w for w in mesh["workloads"] if w["name"] == "waypoint"]
    assert workload["labels"] == {"gateway.networking.k8s.io/gateway-name": "waypoint"}
    assert (workload["node"], workload["ip"]) == ("node1", "10.10.1.250")
    (service,) = [s for s in mesh["services"] if s["name"] == "waypoint"]
    assert service["ports"] == [{"port": 15008, "targetPort": 15008}]
    assert mesh["namespaces"] == [{"name": "demo", "labels": {"istio.io/use-waypoint": "waypoint"}}]
    assert "namespaces" not in build_mesh(plan, tokens, use_waypoint=False)
