"""`down` leaves nothing behind: after a full `up`, after a crashed `up`, twice in a row."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from nodeagent.cli.sandbox import validate_mesh
from nodeagent.sandbox import probe
from nodeagent.sandbox.demo import run_demo
from nodeagent.sandbox.manager import CRASH_ENV, SandboxError, SandboxManager
from nodeagent.sandbox.netns import NetnsAdapter
from nodeagent.sandbox.state import DEFAULT_STATE_ROOT


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def _sandbox_cmdlines(name: str, needle: str = "") -> list[int]:
    wanted = (needle or f"--sandbox={name}").encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if wanted in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _netns_of(name: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"{name}-")]


def _state_dir_cmdlines(name: str) -> list[int]:
    # The control plane has no --sandbox flag; its --mesh path names the sandbox.
    return _sandbox_cmdlines(name, needle=str(DEFAULT_STATE_ROOT / name) + "/")


def assert_nothing_left(name: str, root_links_before: set[str]) -> None:
    assert _netns_of(name) == []
    assert _root_links() <= root_links_before
    assert _sandbox_cmdlines(name) == []
    assert _state_dir_cmdlines(name) == []
    assert not (DEFAULT_STATE_ROOT / name).exists()


def test_down_removes_every_namespace_process_link_and_file(
    sandbox_name: str, nodeagent_cli: Any
) -> None:
    links = _root_links()
    up = nodeagent_cli(
        "sandbox", "up", "--name", sandbox_name, "--nodes", "2", "--pods-per-node", "3"
    )
    assert up.returncode == 0, up.stderr
    assert len(_netns_of(sandbox_name)) == 1 + 2 + 6
    assert len(_sandbox_cmdlines(sandbox_name)) == 6
    assert len(_state_dir_cmdlines(sandbox_name)) == 2  # the control plane, the kube API
    assert (DEFAULT_STATE_ROOT / sandbox_name / "state.json").exists()
    assert _root_links() == links  # nothing is ever created in the root namespace

    down = nodeagent_cli("sandbox", "down", sandbox_name)
    assert down.returncode == 0, down.stderr
    assert_nothing_left(sandbox_name, links)

    again = nodeagent_cli("sandbox", "down", sandbox_name)
    assert again.returncode == 0, again.stderr
    assert "nothing to remove" in again.stdout


@pytest.mark.parametrize("crash_at", ["namespaces", "links", "apps"])
def test_down_finishes_a_sandbox_whose_up_crashed(
    sandbox_name: str, nodeagent_cli: Any, crash_at: str
) -> None:
    links = _root_links()
    up = nodeagent_cli(
        "sandbox", "up", "--name", sandbox_name, "--nodes", "2", "--pods-per-node", "2",
        env={CRASH_ENV: crash_at},
    )  # fmt: skip
    assert up.returncode == 99, up.stderr
    assert _netns_of(sandbox_name)  # the crash left a half-built sandbox
    if crash_at == "apps":
        assert len(_sandbox_cmdlines(sandbox_name)) == 4
    if crash_at != "namespaces":
        assert len(_state_dir_cmdlines(sandbox_name)) == 2  # the control plane, the kube API

    status = nodeagent_cli("sandbox", "status", sandbox_name, "-o", "json")
    assert json.loads(status.stdout)["phase"] == "creating"

    down = nodeagent_cli("sandbox", "down", sandbox_name)
    assert down.returncode == 0, down.stderr
    assert_nothing_left(sandbox_name, links)


def test_down_sweeps_namespaces_even_without_a_state_file(
    sandbox_name: str, nodeagent_cli: Any
) -> None:
    links = _root_links()
    up = nodeagent_cli(
        "sandbox", "up", "--name", sandbox_name, "--nodes", "1", "--pods-per-node", "1"
    )
    assert up.returncode == 0, up.stderr
    (DEFAULT_STATE_ROOT / sandbox_name / "state.json").unlink()
    down = nodeagent_cli("sandbox", "down", sandbox_name)
    assert down.returncode == 0, down.stderr
    # The app lived in a sandbox namespace, so it is found and stopped without a record.
    assert_nothing_left(sandbox_name, links)


def test_two_sandboxes_coexist_with_the_same_addresses(
    sandbox_names: Any, nodeagent_cli: Any
) -> None:
    first, second = sandbox_names(), sandbox_names()
    for name in (first, second):
        up = nodeagent_cli("sandbox", "up", "--name", name, "--nodes", "2", "--pods-per-node", "1")
        assert up.returncode == 0, up.stderr
    with NetnsAdapter() as adapter:
        for name in (first, second):
            answer = probe.http_get(adapter, f"{name}-node1-pod1", "10.10.2.11", 8080)
            assert answer["sandbox"] == name
            assert answer["client_ip"] == "10.10.1.11"
        assert nodeagent_cli("sandbox", "down", first).returncode == 0
        assert _netns_of(first) == []
        answer = probe.http_get(adapter, f"{second}-node2-pod1", "10.10.1.11", 8080)
        assert answer["sandbox"] == second


def test_demo_shows_the_mesh_and_removes_its_sandbox(sandbox_name: str) -> None:
    lines: list[str] = []
    statuses: list[dict[str, Any]] = []
    with SandboxManager() as manager:
        ok = run_demo(
            manager, lines.append, statuses.append, name=sandbox_name, validate=validate_mesh
        )
    text = "\n".join(lines)
    assert ok, text
    assert statuses[0]["name"] == sandbox_name
    assert "control plane at 172.30.0.1:15010" in text
    # The demo pods, and the waypoint's pod and service.
    assert "serves 5 workloads and 3 services" in text
    # Identities, calls across nodes with the caller's address, the wire, the policy.
    assert "node1-pod1  10.10.1.11  node1  spiffe://cluster.local/ns/demo/sa/frontend" in text
    assert '"pod": "node2-pod2", "node": "node2", "service_account": "backend", ' in text
    assert '"client_ip": "10.10.1.11"' in text
    assert "all to or from port 15008" in text
    assert "appears in none of them" in text
    assert "refused, as the policy says" in text
    assert "still allowed" in text
    assert re.search(
        r"CONNECT from spiffe://cluster\.local/ns/demo/sa/frontend .* policy rejection", text
    )
    # The operator's slip: the pod is held, its call refused, then served again.
    assert "HTTP  node1-pod2 (10.10.1.12) -> node2-pod1\n  refused:" in text
    assert "listeners closed, capture kept" in text
    assert re.search(r"over HBONE again: .*\"client_ip\": \"10\.10\.1\.12\"", text)
    assert "left the mesh (opted out): removing its capture" in text
    assert re.search(
        r"captured again \(namespace labelled\): .*\"client_ip\": \"10\.10\.2\.11\"", text
    )
    # Header routing through the waypoint, decided per request.
    assert "20 requests with x-user: ios      -> {'node2-pod2': 20}" in text
    assert "20 requests with x-user: android  -> {'node1-pod2': 20}" in text
    assert "the backend saw the waypoint call it (10.10.1.250)" in text
    # Automatic fallback at the waypoint: v2 fails everything, retries and ejection hide it.
    assert (
        "50 requests node2-pod1 -> backend: v1 (node1-pod2) 50, v2 (node2-pod2) 0, 0 failed" in text
    )
    assert "v2 was ejected after 2 in a row" in text
    assert "every step showed what it should" in text
    assert _netns_of(sandbox_name) == []
    assert not Path(DEFAULT_STATE_ROOT / sandbox_name).exists()


def test_up_that_fails_says_why_and_leaves_nothing(sandbox_name: str) -> None:
    links = _root_links()
    # /bin/sh refuses the interpreter's `-S` flag, so no app ever becomes ready.
    with (
        SandboxManager(python="/bin/sh") as manager,
        pytest.raises(SandboxError, match=r"did not become ready.*Illegal option -S"),
    ):
        manager.up(sandbox_name, 1, 2)
    assert_nothing_left(sandbox_name, links)
