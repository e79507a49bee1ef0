"""Enrollment as Istio ambient defines it, against the sandbox's Kubernetes API (issue 20).

The sandbox's API server starts with namespace `demo` labelled
`istio.io/dataplane-mode=ambient`; `sandbox label` / `sandbox annotate` change it
live, as kubectl would, and each node's agent follows through its watch:

* a pod labelled `istio.io/dataplane-mode=none`, or carrying a sidecar's status
  annotation, is released (capture and listeners removed) and `pods` says why;
* removing the namespace's label releases every pod in it, and their traffic then
  flows uncaptured (plaintext app bytes on the underlay, seen with tcpdump);
* putting the label back captures them again (HBONE on the wire).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from .e2e_harness import Capture, Mesh, _cli, sandbox, wait_until

pytestmark = pytest.mark.timeout(300)

MODE = "istio.io/dataplane-mode"
URL = "http://10.10.2.12:8080/"  # node2-pod2
APP_PORT = "tcp and net 10.10.0.0/16 and port 8080"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with sandbox(tmp_path_factory.mktemp("enroll"), "iptables") as running:
        yield running


def edit(mesh: Mesh, verb: str, target: str, *changes: str) -> None:
    result = _cli("sandbox", verb, mesh.name, target, *changes)
    assert result.returncode == 0, result.stderr


def pods(mesh: Mesh, node: str) -> dict[str, dict[str, Any]]:
    result = _cli("pods", "--sandbox", mesh.name, "--node", node, "-o", "json")
    assert result.returncode == 0, result.stderr
    return {p["name"]: p for p in json.loads(result.stdout)}


def wait_pod(mesh: Mesh, node: str, pod: str, state: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def reached() -> bool:
        seen.clear()
        seen.update(pods(mesh, node).get(pod, {}))
        return seen.get("capture_state") == state

    wait_until(f"{pod} {state} (last seen {seen})", reached, timeout=20)
    return dict(seen)


def rules_installed(mesh: Mesh, pod: str) -> bool:
    dump = mesh.run_in(pod, ["iptables-legacy-save", "-t", "nat"])
    return "ISTIO_OUTPUT" in dump.stdout


def crossed(mesh: Mesh, tag: str, src: str, url: str) -> tuple[str, list[Any]]:
    """One call from `src`, and the app-port segments with payload seen on node2."""
    capture = Capture(mesh.netns("node2"), mesh.tmp / f"{tag}.pcap", APP_PORT)
    try:
        answer = mesh.curl(src, url)
        time.sleep(1.5)  # the kernel hands captured packets over in blocks, within 1 s
    finally:
        segments = capture.stop()
    assert answer.returncode == 0, answer.stderr
    return answer.stdout, [s for s in segments if s.payload]


def test_every_demo_pod_is_enrolled_by_its_namespace_label(mesh: Mesh) -> None:
    for node in ("node1", "node2"):
        for name, view in pods(mesh, node).items():
            assert view["capture_state"] == "ready", (name, view)
            assert (view["enrolled"], view["enrollment"]) == (True, "namespace labelled")


def test_a_pod_that_opts_out_is_released_live_and_says_why(mesh: Mesh) -> None:
    edit(mesh, "label", "pod/node2-pod1", f"{MODE}=none")
    try:
        view = wait_pod(mesh, "node2", "node2-pod1", "not-captured")
        assert (view["enrolled"], view["enrollment"]) == (False, "opted out")
        assert "not in the mesh: opted out" in view["last_error"]
        assert not rules_installed(mesh, "node2-pod1")
        # Its own calls now leave uncaptured: the app's bytes cross in the clear
        # (and the meshed server, PERMISSIVE, takes them on 15006).
        body, clear = crossed(mesh, "optout", "node2-pod1", "http://10.10.1.12:8080/")
        assert json.loads(body)["client_ip"] == "10.10.2.11"
        assert any(s.src[0] == "10.10.2.11" and b"GET / HTTP/1.1" in s.payload for s in clear), [
            (s.src, s.dst, s.payload[:20]) for s in clear
        ]
    finally:
        edit(mesh, "label", "pod/node2-pod1", f"{MODE}-")
    wait_pod(mesh, "node2", "node2-pod1", "ready")
    assert rules_installed(mesh, "node2-pod1")


def test_a_pod_with_a_sidecar_is_not_captured(mesh: Mesh) -> None:
    edit(mesh, "annotate", "pod/node1-pod1", "sidecar.istio.io/status={}")
    try:
        view = wait_pod(mesh, "node1", "node1-pod1", "not-captured")
        assert view["enrollment"] == "sidecar"
        assert not rules_installed(mesh, "node1-pod1")
    finally:
        edit(mesh, "annotate", "pod/node1-pod1", "sidecar.istio.io/status-")
    wait_pod(mesh, "node1", "node1-pod1", "ready")


def test_unlabelling_the_namespace_releases_its_pods_and_traffic_flows_uncaptured(
    mesh: Mesh,
) -> None:
    edit(mesh, "label", "namespace/demo", f"{MODE}-")
    try:
        for node in ("node1", "node2"):
            for pod in (f"{node}-pod1", f"{node}-pod2"):
                view = wait_pod(mesh, node, pod, "not-captured")
                assert view["enrollment"] == "namespace not labelled"
        body, clear = crossed(mesh, "unlabelled", "node1-pod1", URL)
        assert json.loads(body)["pod"] == "node2-pod2"
        assert any(s.dst == ("10.10.2.12", 8080) and b"GET / HTTP/1.1" in s.payload for s in clear)
        assert not any(rules_installed(mesh, p) for p in ("node1-pod1", "node2-pod2"))
    finally:
        edit(mesh, "label", "namespace/demo", f"{MODE}=ambient")
    for node in ("node1", "node2"):
        for pod in (f"{node}-pod1", f"{node}-pod2"):
            wait_pod(mesh, node, pod, "ready")
    capture = Capture(mesh.netns("node2"), mesh.tmp / "relabelled.pcap", "tcp port 15008")
    try:
        wait_until("a call succeeds again", lambda: mesh.curl("node1-pod1", URL).returncode == 0)
        time.sleep(1.5)
    finally:
        segments = capture.stop()
    assert any(s.src[0] == "10.10.1.11" and s.dst == ("10.10.2.12", 15008) for s in segments)
