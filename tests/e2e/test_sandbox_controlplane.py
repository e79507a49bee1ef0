"""The sandbox's control plane: started by `up`, reached from a node, fed by `apply`.

A real delta-xDS subscriber (xds_probe.py, the raw generated stub) runs inside
a node's namespace with that node's token, as an agent will, and sees what the
control plane in the underlay namespace serves.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeagent.sandbox.processes import NSENTER
from nodeagent.sandbox.state import DEFAULT_STATE_ROOT

from .e2e_harness import DENY_FRONTEND

PROBE = str(Path(__file__).with_name("xds_probe.py"))
WAIT = 15.0

BAD_PORT = """\
services:
- name: web
  namespace: demo
  vip: 10.96.0.20
  ports:
  - port: 80
    targetPort: 99999
  selector: {role: frontend}
"""


MOVED_POD = """\
workloads:
- {name: node1-pod1, namespace: demo, node: node1, ip: 10.10.1.99, serviceAccount: frontend}
"""


class XdsProbe:
    """xds_probe.py in a node's namespace; its decoded responses, one dict each."""

    def __init__(self, netns: str, address: str, token_file: Path) -> None:
        self.proc = subprocess.Popen(
            [NSENTER, f"--net=/var/run/netns/{netns}", "--",
             sys.executable, PROBE, address, str(token_file)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        self.responses: queue.Queue[dict[str, Any]] = queue.Queue()
        self.history: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.responses.put(json.loads(line))

    def mark(self) -> int:
        """A point in the response history; `find` looks only at what came after it."""
        self._drain()
        return len(self.history)

    def find(self, want: Callable[[dict[str, Any]], bool], since: int = 0) -> dict[str, Any]:
        """The first response after `since` that `want` accepts, waiting for it."""
        checked = since
        while True:
            for resp in self.history[checked:]:
                assert "error" not in resp, resp
                if want(resp):
                    return resp
            checked = len(self.history)
            try:
                self.history.append(self.responses.get(timeout=WAIT))
            except queue.Empty:
                self.close()
                assert self.proc.stderr is not None
                pytest.fail(f"no matching xDS response; probe stderr: {self.proc.stderr.read()}")

    def _drain(self) -> None:
        while True:
            try:
                self.history.append(self.responses.get_nowait())
            except queue.Empty:
                return

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(timeout=5)


@pytest.fixture
def probe_factory() -> Iterator[Callable[[str, str, Path], XdsProbe]]:
    made: list[XdsProbe] = []

    def make(netns: str, address: str, token_file: Path) -> XdsProbe:
        made.append(XdsProbe(netns, address, token_file))
        return made[-1]

    try:
        yield make
    finally:
        for p in made:
            p.close()


def _of_type(suffix: str) -> Callable[[dict[str, Any]], bool]:
    return lambda r: r["type_url"].endswith(suffix)


def _node_probe(
    sandbox: dict[str, Any], make: Callable[[str, str, Path], XdsProbe], node: str = "node2"
) -> XdsProbe:
    netns = next(n["netns"] for n in sandbox["nodes"] if n["name"] == node)
    token = DEFAULT_STATE_ROOT / sandbox["name"] / node / "token"
    return make(netns, sandbox["controlplane"]["address"], token)


def test_up_starts_a_control_plane_in_the_underlay(sandbox_2x2: dict[str, Any]) -> None:
    cp = sandbox_2x2["controlplane"]
    assert cp["address"] == f"{sandbox_2x2['underlay']['ip']}:15010"
    assert cp["netns"] == sandbox_2x2["underlay"]["netns"]
    # The process lives in the underlay namespace (same namespace inode).
    underlay = Path(f"/var/run/netns/{cp['netns']}").stat().st_ino
    assert Path(f"/proc/{cp['pid']}/ns/net").stat().st_ino == underlay
    assert cp["serves"] == {"nodes": 2, "workloads": 4, "services": 2, "authorizationPolicies": 0}
    for node in ("node1", "node2"):
        token = DEFAULT_STATE_ROOT / sandbox_2x2["name"] / node / "token"
        assert token.stat().st_mode & 0o777 == 0o600
        assert len(token.read_text().strip()) >= 20
    assert Path(cp["mesh_file"]).stat().st_mode & 0o777 == 0o600


def test_a_node_receives_every_pod_and_service_over_delta_xds(
    sandbox_2x2: dict[str, Any], probe_factory: Any
) -> None:
    probe = _node_probe(sandbox_2x2, probe_factory)
    first = probe.find(_of_type("Address"))
    workloads = {r["name"]: r for r in first["resources"] if r["kind"] == "workload"}
    services = {r["name"]: r for r in first["resources"] if r["kind"] == "service"}
    pods = {p["name"]: p for p in sandbox_2x2["pods"]}
    assert set(workloads) == set(pods)
    for name, pod in pods.items():
        w = workloads[name]
        assert (w["namespace"], w["node"], w["ips"], w["service_account"]) == (
            "demo", pod["node"], [pod["ip"]], pod["service_account"]
        )  # fmt: skip
        assert w["trust_domain"] == "cluster.local"
        backend = "demo/backend.demo.svc.cluster.local"
        assert (backend in w["services"]) == (pod["service_account"] == "backend")
    assert services["backend"]["vips"] == ["10.96.0.10"]
    assert services["backend"]["ports"] == [[8080, 8080]]
    assert services["echo"]["vips"] == ["10.96.0.11"]
    assert services["echo"]["ports"] == [[9000, 9000]]


def test_apply_pushes_a_deny_policy_and_delete_removes_it(
    sandbox_2x2: dict[str, Any], probe_factory: Any, nodeagent_cli: Any, tmp_path: Path
) -> None:
    name = sandbox_2x2["name"]
    probe = _node_probe(sandbox_2x2, probe_factory)
    first = probe.find(_of_type("Authorization"))
    assert first["resources"] == []
    probe.find(_of_type("Address"))  # the initial snapshot is complete
    before_apply = probe.mark()

    policy = tmp_path / "deny.yaml"
    policy.write_text(DENY_FRONTEND)
    applied = nodeagent_cli("sandbox", "apply", name, str(policy))
    assert applied.returncode == 0, applied.stderr
    assert "added 1 (policy demo/deny-frontend)" in applied.stdout

    # Pushed on the open stream: the control plane noticed the file change.
    pushed = probe.find(_of_type("Authorization"), before_apply)
    assert [(r["name"], r["namespace"], r["action"], r["rules"]) for r in pushed["resources"]] == [
        ("deny-frontend", "demo", "DENY", 1)
    ]
    # Backend workloads now name the policy that selects them.
    updated = probe.find(_of_type("Address"), before_apply)
    assert {r["name"] for r in updated["resources"]} == {"node1-pod2", "node2-pod2"}
    status = json.loads(nodeagent_cli("sandbox", "status", name, "-o", "json").stdout)
    assert status["controlplane"]["serves"]["authorizationPolicies"] == 1

    again = nodeagent_cli("sandbox", "apply", name, str(policy))
    assert "replaced 1 (policy demo/deny-frontend)" in again.stdout

    before_delete = probe.mark()
    deleted = nodeagent_cli("sandbox", "apply", name, str(policy), "--delete")
    assert deleted.returncode == 0, deleted.stderr
    gone = probe.find(_of_type("Authorization"), before_delete)
    assert gone["removed"] == ["demo/deny-frontend"]


def test_a_bad_apply_file_is_refused_in_one_line_and_changes_nothing(
    sandbox_2x2: dict[str, Any], nodeagent_cli: Any, tmp_path: Path
) -> None:
    name = sandbox_2x2["name"]
    mesh_file = Path(sandbox_2x2["controlplane"]["mesh_file"])
    before = mesh_file.read_bytes()
    bad = tmp_path / "bad.yaml"
    cases = [
        (BAD_PORT, ["bad.yaml:7:", "services[0].ports[0].targetPort"]),
        ("nodes: []\n", ["bad.yaml:1:", "nodes", "sandbox owns"]),
        # Valid on its own, but its VIP is the backend service's.
        (BAD_PORT.replace("10.96.0.20", "10.96.0.10").replace("99999", "8080"),
         ["bad.yaml", "10.96.0.10", "already used"]),
        # A pod's name at another address: another pod, refused naming both addresses.
        (MOVED_POD, ["bad.yaml:2:3: workloads[0].ip:", "is 10.10.1.11 on node1",
                     "at 10.10.1.99 on node1", "--replace"]),
        # An address node2 cannot have.
        (MOVED_POD.replace("node1-pod1", "stray").replace("10.10.1.99", "10.10.7.5"),
         ["bad.yaml:2:", "workloads[0].ip: 10.10.7.5 is outside the pod range of node node1"]),
    ]  # fmt: skip
    for text, words in cases:
        bad.write_text(text)
        result = nodeagent_cli("sandbox", "apply", name, str(bad))
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "Traceback" not in result.stderr
        for word in words:
            assert word in lines[0], lines[0]
        assert mesh_file.read_bytes() == before


def test_a_broken_or_truncated_mesh_file_is_refused_and_the_last_good_one_served(
    sandbox_2x2: dict[str, Any], probe_factory: Any, nodeagent_cli: Any, tmp_path: Path
) -> None:
    name = sandbox_2x2["name"]
    mesh_file = Path(sandbox_2x2["controlplane"]["mesh_file"])
    good = mesh_file.read_text()
    log = Path(sandbox_2x2["controlplane"]["log"])
    policy = tmp_path / "deny.yaml"
    policy.write_text(DENY_FRONTEND)
    probe = _node_probe(sandbox_2x2, probe_factory)
    probe.find(_of_type("Address"))
    start = probe.mark()
    refused_before = log.read_text().count("mesh file refused")
    try:
        for broken, where in [
            ("nodes: [\n", f"{mesh_file}:2:1: YAML syntax error"),
            ("", f"{mesh_file}:1:1: nodes: the file is empty (truncated?)"),
        ]:
            mesh_file.write_text(broken)
            status = nodeagent_cli("sandbox", "status", name)
            assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr
            assert "node2-pod2" in status.stdout
            assert (
                f"mesh file refused (the control plane keeps serving its last good one): {where}"
                in status.stdout
            )
            applied = nodeagent_cli("sandbox", "apply", name, str(policy))
            assert applied.returncode != 0
            assert len(applied.stderr.strip().splitlines()) == 1, applied.stderr
            assert applied.stderr.startswith(f"nodeagent: {where}"), applied.stderr
            assert mesh_file.read_text() == broken
        # The running control plane refused both and logged each in one line.
        deadline = time.monotonic() + WAIT
        while (
            log.read_text().count("mesh file refused") < refused_before + 2
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        lines = log.read_text().splitlines()
        refused = [ln for ln in lines if "mesh file refused" in ln][refused_before:]
        assert len(refused) == 2, refused
        assert "YAML syntax error" in refused[0] and "the file is empty" in refused[1]
    finally:
        mesh_file.write_text(good)
    # Restored: picked up again, and `apply` works again (its push arrives).
    applied = nodeagent_cli("sandbox", "apply", name, str(policy))
    assert applied.returncode == 0, applied.stderr
    pushed = probe.find(lambda r: _of_type("Authorization")(r) and bool(r["resources"]), start)
    assert [r["name"] for r in pushed["resources"]] == ["deny-frontend"]
    # Nothing was withdrawn meanwhile: no Address removal reached the node.
    assert all(not r["removed"] for r in probe.history[start:] if r["type_url"].endswith("Address"))
    nodeagent_cli("sandbox", "apply", name, str(policy), "--delete")


def test_down_stops_the_control_plane_and_removes_its_files(
    sandbox_name: str, nodeagent_cli: Any
) -> None:
    up = nodeagent_cli(
        "sandbox", "up", "--name", sandbox_name, "--nodes", "1", "--pods-per-node", "1"
    )
    assert up.returncode == 0, up.stderr
    assert "control plane at 172.30.0.1:15010" in up.stdout
    status = json.loads(nodeagent_cli("sandbox", "status", sandbox_name, "-o", "json").stdout)
    pid = status["controlplane"]["pid"]
    assert pid is not None
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert b"controlplane" in f.read()

    down = nodeagent_cli("sandbox", "down", sandbox_name)
    assert down.returncode == 0, down.stderr
    assert not Path(f"/proc/{pid}").exists() or _is_other_process(pid, sandbox_name)
    assert not (DEFAULT_STATE_ROOT / sandbox_name).exists()


def _is_other_process(pid: int, sandbox: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f"nodeagent-sandbox/{sandbox}/".encode() not in f.read()
    except OSError:
        return True
