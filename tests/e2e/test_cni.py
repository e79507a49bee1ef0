"""New pods through the real CNI chain with `nodeagent-cni` last (issue 20).

Each test makes a pod the way a container runtime does on node1: a new network
namespace (linked where the node's agent discovers pods, as containerd's netns dir
is), then the node's conflist run through the real plugins (ptp, host-local,
loopback from Debian's containernetworking-plugins, then `nodeagent-cni`), and only
then the pod's "container": a curl started the moment ADD returns. The pod has a
workload record (added to the control plane's file first, as istiod would have one).

* The first connection of a just-started pod is captured: it crosses as HBONE,
  never as plaintext, 50 pods in a row.
* With node1's agent frozen (SIGSTOP, by pid), ADD still succeeds: the plugin
  fails closed (the agent's capture rules, no listener behind them), so the pod's
  calls are refused and nothing crosses in clear; once the agent runs again it
  adopts the pod and its calls go out over HBONE.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodeagent.sandbox.cni import Attachment, CniRuntime, NodeFiles, NsenterExec
from nodeagent.sandbox.state import DEFAULT_STATE_ROOT

from .e2e_harness import Capture, Mesh, Segment, _cli, sandbox, wait_until

pytestmark = pytest.mark.timeout(600)

NODE = "node1"
POD, POD_IP = "node1-new", "10.10.1.20"
SERVER = "http://10.10.2.12:8080/"
STARTS = 50


@pytest.fixture(scope="module", params=["iptables", "ebpf"])
def mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mesh]:
    with sandbox(tmp_path_factory.mktemp("cni"), request.param) as running:
        add_workload_record(running)
        yield running


def add_workload_record(mesh: Mesh) -> None:
    """A record for the pod about to be made (a copy of node1-pod1's, renamed)."""
    path = Path(mesh.status["controlplane"]["mesh_file"])
    data = yaml.safe_load(path.read_text())
    [template] = [w for w in data["workloads"] if w["name"] == "node1-pod1"]
    data["workloads"].append({**template, "name": POD, "ip": POD_IP})
    tmp = path.with_name(path.name + ".edit")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(path)

    def known() -> bool:
        result = _cli("workloads", "--sandbox", mesh.name, "--node", NODE, "-o", "json")
        return result.returncode == 0 and POD in result.stdout

    wait_until(f"node1's agent knows {POD}", known)


class Runtime:
    """The sandbox's CNI settings for node1, used the way containerd would."""

    def __init__(self, mesh: Mesh) -> None:
        state = DEFAULT_STATE_ROOT / mesh.name
        self.mesh = mesh
        self.files = NodeFiles(state / "cni" / NODE)
        conflist = self.files.read_conflist()
        assert conflist is not None, "the sandbox wrote no conflist (CNI plugins missing?)"
        assert conflist["plugins"][-1]["type"] == "nodeagent-cni", conflist
        self.conflist = conflist
        self.discovery = state / NODE / "netns"  # the agent's NETNS_DIR
        cni_path = os.pathsep.join(["/usr/lib/cni", str(Path(sys.executable).parent)])
        self.runtime = CniRuntime(NsenterExec(), cni_path.split(os.pathsep))
        self.host = f"/var/run/netns/{mesh.netns(NODE)}"

    def start(self, tag: str) -> tuple[str, Attachment, dict[str, Any], float]:
        """Namespace, then ADD; returns once ADD does (its wall time in seconds)."""
        netns = f"{self.mesh.name}-new-{tag}"
        subprocess.run(["ip", "netns", "add", netns], check=True)
        link = self.discovery / netns
        link.symlink_to(f"/var/run/netns/{netns}")
        attachment = Attachment(
            container_id=f"{netns}-c",
            netns=f"/var/run/netns/{netns}",
            pod_namespace="demo",
            pod_name=POD,
            ips=(POD_IP,),
        )
        started = time.monotonic()
        result = self.runtime.add(self.conflist, attachment, self.host)
        return netns, attachment, result, time.monotonic() - started

    def stop(self, netns: str, attachment: Attachment, result: dict[str, Any]) -> None:
        errors = self.runtime.delete(self.conflist, attachment, self.host, result)
        assert errors == [], errors
        (self.discovery / netns).unlink(missing_ok=True)
        subprocess.run(["ip", "netns", "delete", netns], check=True)


def curl_in(netns: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "nsenter",
            f"--net=/var/run/netns/{netns}",
            "--",
            "curl",
            "-sS",
            "-m",
            "3",
            *extra,
            SERVER,
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def from_new_pod(segments: list[Segment]) -> tuple[list[Segment], list[Segment]]:
    """(HBONE SYNs from the new pod, app-port segments with payload from it)."""
    hbone = [
        s
        for s in segments
        if s.src[0] == POD_IP and s.dst == ("10.10.2.12", 15008) and s.flags & 0x02
    ]
    clear = [s for s in segments if s.src[0] == POD_IP and s.dst[1] == 8080 and s.payload]
    return hbone, clear


def test_the_first_connection_of_a_just_started_pod_is_captured(mesh: Mesh) -> None:
    runtime = Runtime(mesh)
    adds: list[float] = []
    for i in range(STARTS):
        capture = Capture(mesh.netns(NODE), mesh.tmp / f"start-{i}.pcap", f"tcp and host {POD_IP}")
        netns, attachment, result, took = runtime.start(str(i))
        try:
            call = curl_in(netns)  # the container's first act
            time.sleep(1.2)  # captured packets reach tcpdump in blocks, within 1 s
        finally:
            segments = capture.stop()
            runtime.stop(netns, attachment, result)
        adds.append(took)
        hbone, clear = from_new_pod(segments)
        assert call.returncode == 0, f"start {i}: {call.stderr}"
        assert clear == [], f"start {i}: plaintext from the new pod: {clear[:2]}"
        assert hbone, f"start {i}: the first connection did not cross as HBONE ({capture.stats})"
    adds.sort()
    metrics = _cli(
        "sandbox", "exec", mesh.name, NODE, "--", "curl", "-sS", "http://127.0.0.1:15020/metrics"
    ).stdout
    agent = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("nodeagent_cni_add_duration_seconds_")
        and not line.startswith("nodeagent_cni_add_duration_seconds_created")
        and "le=" not in line
    }
    assert agent.get("nodeagent_cni_add_duration_seconds_count", 0) >= STARTS, agent
    count = agent["nodeagent_cni_add_duration_seconds_count"]
    mean = agent["nodeagent_cni_add_duration_seconds_sum"] / count
    print(f"\nagent: ADD to captured, mean {mean * 1000:.0f} ms over {count:.0f} ADDs")
    print(
        f"\nCNI ADD over {STARTS} pod starts ({mesh.backend}):"
        f" median {adds[STARTS // 2] * 1000:.0f} ms, max {adds[-1] * 1000:.0f} ms"
    )


def test_a_pod_started_while_the_agent_is_frozen_is_held_closed_then_adopted(
    mesh: Mesh,
) -> None:
    runtime = Runtime(mesh)
    agent = next(a for a in mesh.status["agents"] if a["name"] == f"agent-{NODE}")
    capture = Capture(mesh.netns(NODE), mesh.tmp / "frozen.pcap", f"tcp and host {POD_IP}")
    netns = ""
    os.kill(agent["pid"], signal.SIGSTOP)
    try:
        netns, attachment, result, took = runtime.start("frozen")
        refused = curl_in(netns)
    finally:
        os.kill(agent["pid"], signal.SIGCONT)
    try:
        assert refused.returncode in (7, 52, 56), refused  # refused or reset, not answered
        wait_until(
            "the agent adopts the held pod",
            lambda: curl_in(netns).returncode == 0,
            timeout=30,
        )
        time.sleep(1.2)
    finally:
        segments = capture.stop()
        runtime.stop(netns, attachment, result)
    hbone, clear = from_new_pod(segments)
    assert clear == [], f"plaintext from the held pod: {clear[:2]}"
    assert hbone, "once adopted, the pod's call did not cross as HBONE"
    print(f"\nADD with the agent frozen: {took:.1f} s (the plugin's timeout, then held)")
