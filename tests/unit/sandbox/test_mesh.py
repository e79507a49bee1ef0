"""The sandbox's mesh file: built from the topology, merged by `apply`, validated first.

The control plane's own parser is the judge of validity here, as it is in the
CLI (the sandbox package may not import it; the CLI injects it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from nodeagent.controlplane.mesh import MeshError, parse_mesh
from nodeagent.sandbox.manager import CONTROLPLANE_KIND, SandboxError, SandboxManager
from nodeagent.sandbox.mesh import (
    ApplyError,
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
from nodeagent.sandbox.state import SandboxState, StateStore

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
    by_name = {w.name: w for w in parsed.workloads}
    for pod in PLAN.pods:
        w = by_name[pod.name]
        assert (w.namespace, w.node, w.ips, w.service_account) == (
            "demo", pod.node, (pod.ip,), pod.service_account
        )  # fmt: skip
        assert dict(w.labels) == {"app": pod.name, "role": pod.service_account, "sandbox": "s"}
    services = {s.name: s for s in parsed.services}
    assert services["backend"].vips == ("10.96.0.10",)
    backends = {w.name for w in parsed.workloads if services["backend"].selects(w)}
    assert backends == {"node1-pod2", "node2-pod2"}
    assert all(services["echo"].selects(w) for w in parsed.workloads)
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
    bare = {"services": [{"name": "backend", "ports": [{"port": 80}]}]}
    both, summary = merge_resources(replaced, {**other, **bare})
    assert summary.added == ("service default/backend", "policy shop/deny-frontend")
    assert len(both["authorizationPolicies"]) == 2

    gone, summary = merge_resources(both, {**user, **bare}, delete=True)
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
        ("services: {name: x}\n", r"^u\.yaml:1:11: services: expected a list"),
        ("services:\n- ports: []\n", r"^u\.yaml:2:3: services\[0\]\.name: required"),
        (
            "authorizationPolicies:\n- spec: {}\n",
            r"^u\.yaml:2:3: authorizationPolicies\[0\]\.metadata\.name: required",
        ),
        ("services: [\n", r"^u\.yaml:2:1: YAML syntax error"),
        ("- a\n", r"^u\.yaml:1:1: expected a mapping"),
        ("", r"^u\.yaml: the file is empty"),
    ],
)
def test_a_bad_apply_file_is_named_with_its_line_and_field(text: str, message: str) -> None:
    with pytest.raises(ApplyError, match=message):
        parse_user_file(text, "u.yaml")


def test_standalone_text_keeps_the_users_line_numbers_and_declares_the_nodes() -> None:
    workload = "workloads:\n- name: extra\n  namespace: demo\n  node: node1\n  ip: 10.10.1.99\n"
    parse_mesh(standalone_text(workload, ["node1", "node2"]), "u.yaml")  # valid
    with pytest.raises(MeshError, match=r"^u\.yaml:5:\d+: workloads\[0\]\.ip"):
        parse_mesh(standalone_text(workload.replace(".99", ".999"), ["node1"]), "u.yaml")
    flow = "{services: [{name: x, ports: [{port: 80}]}]}"
    assert standalone_text(flow, ["node1"]) == flow


# -- SandboxManager.apply, on a state dir in tmp_path (no namespaces needed) --------


def _validate(text: str, source: str) -> None:
    parse_mesh(text, source)


def _sandbox(tmp_path: Path) -> tuple[SandboxManager, Path]:
    store = StateStore(tmp_path)
    mesh_file = store.mesh_path("s")
    info: dict[str, Any] = {"address": "172.30.0.1:15010", "mesh_file": str(mesh_file)}
    state = SandboxState(name="s", nodes=2, pods_per_node=2)
    assert store.claim(dataclasses.replace(state, extra={CONTROLPLANE_KIND: info}))
    store.write_private(mesh_file, dump_mesh(build_mesh(PLAN, TOKENS)))
    return SandboxManager(store=store), mesh_file


def test_apply_rewrites_the_mesh_file_privately_and_refuses_bad_files(tmp_path: Path) -> None:
    manager, mesh_file = _sandbox(tmp_path)
    summary = manager.apply("s", POLICY, "p.yaml", _validate)
    assert summary.added == ("policy demo/deny-frontend",)
    assert counts(load_mesh_dict(mesh_file.read_text()))["authorizationPolicies"] == 1
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
