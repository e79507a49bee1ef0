"""`nodeagent sandbox apply|status` against a sandbox's state dir (no namespaces needed).

A broken mesh file is one line naming file, line and column, never a traceback:
`apply` fails and changes nothing, `status` still shows what it can.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from nodeagent.cli import sandbox as sandbox_cli
from nodeagent.cli.main import main
from nodeagent.sandbox.manager import CONTROLPLANE_KIND, SandboxManager
from nodeagent.sandbox.mesh import build_mesh, dump_mesh
from nodeagent.sandbox.plan import build_plan
from nodeagent.sandbox.state import ProcessRecord, SandboxState, StateStore

POLICY = "authorizationPolicies:\n- metadata: {name: p, namespace: demo}\n"


@pytest.fixture
def mesh_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Sandbox `s` (2x2) with a control plane record and its mesh file; the CLI uses it."""
    store = StateStore(tmp_path / "state")
    path = store.mesh_path("s")
    record = ProcessRecord(
        kind=CONTROLPLANE_KIND, name="controlplane", netns="s-underlay", argv=(), log="cp.log"
    )
    state = SandboxState(name="s", nodes=2, pods_per_node=2).with_process(record)
    info = {"address": "172.30.0.1:15010", "mesh_file": str(path)}
    assert store.claim(dataclasses.replace(state, extra={CONTROLPLANE_KIND: info}))
    tokens = {"node1": "t" * 24, "node2": "u" * 24}
    store.write_private(path, dump_mesh(build_mesh(build_plan("s", 2, 2), tokens)))
    monkeypatch.setattr(sandbox_cli, "_manager", lambda: SandboxManager(store=store))
    return path


def test_apply_on_a_broken_mesh_file_fails_in_one_line_and_changes_nothing(
    mesh_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = mesh_file.read_text().replace("services:\n", "services: {\n", 1)
    mesh_file.write_text(broken)
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY)
    assert main(["sandbox", "apply", "s", str(policy)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    line = f"{mesh_file}:{broken.splitlines().index('services: {') + 2}:"
    assert err.startswith(f"nodeagent: {line}"), err
    assert "YAML syntax error" in err and len(err.splitlines()) == 1
    assert mesh_file.read_text() == broken


def test_apply_of_a_broken_user_file_names_its_line_and_column(
    mesh_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = mesh_file.read_bytes()
    bad = tmp_path / "bad.yaml"
    bad.write_text("authorizationPolicies:\n- metadata: {name: p\n  spec: {}\n")
    assert main(["sandbox", "apply", "s", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"nodeagent: {bad}:3:") and len(err.splitlines()) == 1, err
    assert mesh_file.read_bytes() == before


def test_apply_replace_flag_lets_a_pod_name_move(
    mesh_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    moved = tmp_path / "moved.yaml"
    moved.write_text(
        "workloads:\n- {name: node2-pod1, namespace: demo, node: node2, ip: 10.10.2.77}\n"
    )
    assert main(["sandbox", "apply", "s", str(moved)]) == 1
    err = capsys.readouterr().err
    assert "10.10.2.11 on node2" in err and "10.10.2.77 on node2" in err and "--replace" in err
    assert main(["sandbox", "apply", "s", str(moved), "--replace"]) == 0
    assert "replaced 1 (workload demo/node2-pod1)" in capsys.readouterr().out
    assert "ip: 10.10.2.77" in mesh_file.read_text()


@pytest.mark.parametrize("output", ["table", "json"])
def test_status_shows_what_it_can_and_the_mesh_files_error(
    mesh_file: Path, capsys: pytest.CaptureFixture[str], output: str
) -> None:
    mesh_file.write_text("nodes: [\n")
    assert main(["sandbox", "status", "s", "-o", output]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "Traceback" not in out
    error = f"{mesh_file}:2:1: YAML syntax error: "
    if output == "json":
        status = json.loads(out)
        assert [p["name"] for p in status["pods"]][:1] == ["node1-pod1"]
        assert status["controlplane"]["mesh_error"].startswith(error)
    else:
        assert "node1-pod1" in out
        refused = [ln for ln in out.splitlines() if ln.startswith("mesh file refused")]
        assert len(refused) == 1 and error in refused[0], out


def test_status_shows_each_pods_app_and_version(
    mesh_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sandbox", "status", "s", "-o", "json"]) == 0
    pods = {p["name"]: p["labels"] for p in json.loads(capsys.readouterr().out)["pods"]}
    assert pods["node1-pod2"] == {
        "app": "backend",
        "version": "v1",
        "role": "backend",
        "sandbox": "s",
    }
    assert main(["sandbox", "status", "s"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(ln for ln in lines if ln.startswith("POD "))
    assert header.split()[:6] == ["POD", "NAMESPACE", "SERVICE", "ACCOUNT", "APP", "VERSION"]
    rows = {ln.split()[0]: ln.split()[3:5] for ln in lines if ln.startswith("node2-pod")}
    assert rows == {"node2-pod1": ["frontend", "v2"], "node2-pod2": ["backend", "v2"]}


class _UpRecorder:
    """Stands in for the manager: records the name `up` was given."""

    names: list[str] = []

    def __enter__(self) -> _UpRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def up(self, name: str, *args: object, **kwargs: object) -> object:
        self.names.append(name)
        raise sandbox_cli.SandboxError("recorded")


@pytest.mark.parametrize(
    "argv", [["up", "s1"], ["up", "--name", "s1"], ["up", "s1", "--name", "s1"]]
)
def test_up_takes_the_name_positionally_like_every_action(
    argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _UpRecorder.names = []
    monkeypatch.setattr(sandbox_cli, "_manager", _UpRecorder)
    main(["sandbox", *argv])
    assert _UpRecorder.names == ["s1"]


@pytest.mark.parametrize(
    "argv", [["sandbox", "up"], ["sandbox", "up", "a", "--name", "b"], ["sandbox", "down"]]
)
def test_bad_sandbox_arguments_are_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = int(exc.code or 0)
    err = capsys.readouterr().err
    assert rc != 0
    assert len(err.strip().splitlines()) == 1, err
    assert "usage:" not in err


def test_deleting_an_absent_policy_fails(
    mesh_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY)
    assert main(["sandbox", "apply", "s", str(policy), "--delete"]) != 0
    assert "not found" in capsys.readouterr().out
