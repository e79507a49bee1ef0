"""A sandbox mesh file edited by hand into the wrong shape or encoding: a one-line refusal
for `sandbox status` and `sandbox apply`, never a TypeError or UnicodeDecodeError.

Found by the apply_file fuzz target (`workloads: 1` made `counts` and `merge_resources`
raise TypeError; its input is kept in fuzz/crashes/apply_file/), and, reading the same code
for its file half, a byte that is not UTF-8.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from nodeagent.controlplane.mesh import parse_mesh
from nodeagent.sandbox.manager import CONTROLPLANE_KIND, SandboxError, SandboxManager
from nodeagent.sandbox.mesh import ApplyError, build_mesh, counts, dump_mesh, load_mesh_dict
from nodeagent.sandbox.plan import build_plan
from nodeagent.sandbox.state import ProcessRecord, SandboxState, StateStore

NODES = "nodes: [{name: node1, token: t}]\n"


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (NODES + "workloads: 1\n", "mesh.yaml:2:12: workloads"),
        (NODES + "services: true\n", "mesh.yaml:2:11: services"),
        (NODES + "authorizationPolicies: {a: b}\n", "mesh.yaml:2:24: authorizationPolicies"),
        (NODES + "workloads: []\nworkloads: x\n", "mesh.yaml:3:12: workloads"),
    ],
)
def test_a_section_that_is_not_a_list_is_refused_where_it_is(text: str, where: str) -> None:
    with pytest.raises(ApplyError) as err:
        load_mesh_dict(text, "mesh.yaml")
    assert str(err.value) == f"{where}: expected a list; this is not a sandbox's mesh file"


def test_empty_and_missing_sections_still_count_as_none() -> None:
    mesh = load_mesh_dict(NODES + "workloads:\nservices: []\n", "mesh.yaml")
    assert counts(mesh) == {"nodes": 1, "workloads": 0, "services": 0, "authorizationPolicies": 0}


def test_mesh_bytes_that_are_not_utf8_are_refused_where_they_are() -> None:
    with pytest.raises(ApplyError) as err:
        load_mesh_dict(NODES.encode() + b"workloads: [\xff]\n", "mesh.yaml")
    assert str(err.value) == "mesh.yaml:2:13: not UTF-8: byte 0xff (invalid start byte)"
    assert load_mesh_dict((NODES + "# nœud\n").encode(), "mesh.yaml")["nodes"][0]["name"] == "node1"


def _sandbox(tmp_path: Path) -> tuple[SandboxManager, Path]:
    store = StateStore(tmp_path)
    mesh_file = store.mesh_path("s")
    record = ProcessRecord(kind=CONTROLPLANE_KIND, name="controlplane", netns="s-underlay",
                           argv=("nodeagent", "controlplane"), log="cp.log")  # fmt: skip
    state = SandboxState(name="s", nodes=2, pods_per_node=2).with_process(record)
    info = {"address": "172.30.0.1:15010", "mesh_file": str(mesh_file)}
    assert store.claim(dataclasses.replace(state, extra={CONTROLPLANE_KIND: info}))
    plan = build_plan("s", 2, 2)
    store.write_private(mesh_file, dump_mesh(build_mesh(plan, {"node1": "t1", "node2": "t2"})))
    return SandboxManager(store=store), mesh_file


def test_status_and_apply_name_a_mesh_file_edited_out_of_shape(tmp_path: Path) -> None:
    manager, mesh_file = _sandbox(tmp_path)
    good = mesh_file.read_bytes()
    policy = "authorizationPolicies:\n- metadata: {name: p, namespace: demo}\n"

    def validate(text: str, source: str) -> None:
        parse_mesh(text, source)

    for broken, where in (
        (good.replace(b"namespace: demo", b"namespace: d\x90mo", 1), "not UTF-8: byte 0x90"),
        (good.replace(b"services:\n", b"services: 1\nx:\n", 1), "services: expected a list"),
    ):
        mesh_file.write_bytes(broken)
        error = manager.status("s")["controlplane"]["mesh_error"]
        assert error.startswith(f"{mesh_file}:") and where in error
        with pytest.raises(SandboxError, match="nothing applied: fix or restore it"):
            manager.apply("s", policy, "p.yaml", validate)
        assert mesh_file.read_bytes() == broken
    mesh_file.write_bytes(good)
    assert manager.status("s")["controlplane"]["serves"]["workloads"] == 4
