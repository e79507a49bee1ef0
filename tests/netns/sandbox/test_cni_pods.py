"""Pods get their network from the real CNI plugins (ptp + host-local + loopback), run
per pod in the node's namespace as a container runtime does; `down` DELs them.

Needs root and Debian's containernetworking-plugins in /usr/lib/cni.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from nodeagent.sandbox import cni, probe
from nodeagent.sandbox.manager import SandboxError, SandboxManager
from nodeagent.sandbox.netns import NetnsAdapter, list_netns
from nodeagent.sandbox.plan import SandboxPlan
from nodeagent.sandbox.state import DEFAULT_STATE_ROOT

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="netns tests need root and the real kernel"),
    pytest.mark.skipif(
        bool(cni.missing_plugins()), reason="containernetworking-plugins not installed"
    ),
]


def _ip_json(netns: str, *args: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["ip", "-n", netns, "-j", *args], capture_output=True, text=True, check=True
    ).stdout
    return list(json.loads(out or "[]"))


def _veths(netns: str) -> list[str]:
    return sorted(
        link["ifname"]
        for link in _ip_json(netns, "-d", "link", "show")
        if link.get("linkinfo", {}).get("info_kind") == "veth" and link["ifname"] != "eth0"
    )


def _reserved(ipam_dir: Path) -> dict[str, list[str]]:
    """host-local's reservations: address -> [container id, interface]."""
    network = ipam_dir / cni.NETWORK_NAME
    found = {}
    for entry in sorted(network.iterdir()) if network.is_dir() else []:
        try:
            ipaddress.ip_address(entry.name)
        except ValueError:
            continue  # lock, last_reserved_ip.0
        found[entry.name] = entry.read_text().split()
    return found


@dataclass
class RecordingExec:
    """The real exec, plus a record of each run, and what each node looked like
    after the last DEL of ptp there (the namespaces are gone once `down` returns)."""

    real: cni.NsenterExec = field(default_factory=cni.NsenterExec)
    calls: list[tuple[str, str, str, str, int | None]] = field(default_factory=list)
    after_del: dict[str, tuple[list[str], dict[str, list[str]]]] = field(default_factory=dict)
    ipam_dirs: dict[str, Path] = field(default_factory=dict)  # host netns path -> ipam dir
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(
        self, binary: Path, host_netns: str, env: Mapping[str, str], stdin: bytes, timeout: float
    ) -> cni.PluginOutput:
        out = self.real.run(binary, host_netns, env, stdin, timeout)
        with self.lock:
            command = env["CNI_COMMAND"]
            self.calls.append(
                (command, binary.name, env["CNI_CONTAINERID"], host_netns, out.returncode)
            )
            if command == "DEL" and binary.name == "ptp" and host_netns in self.ipam_dirs:
                node = Path(host_netns).name
                self.after_del[node] = (_veths(node), _reserved(self.ipam_dirs[host_netns]))
        return out


@dataclass
class CniSandbox:
    manager: SandboxManager
    plan: SandboxPlan
    recorder: RecordingExec

    def files(self, node: str) -> cni.NodeFiles:
        return cni.NodeFiles(DEFAULT_STATE_ROOT / self.plan.name / "cni" / node)


def _up(name: str, nodes: int, pods: int) -> CniSandbox:
    recorder = RecordingExec()
    manager = SandboxManager(plugin_exec=recorder)
    plan = manager.up(name, nodes, pods, controlplane=False)
    sandbox = CniSandbox(manager=manager, plan=plan, recorder=recorder)
    for node in plan.nodes:
        recorder.ipam_dirs[f"/var/run/netns/{node.netns}"] = sandbox.files(node.name).ipam_dir
    return sandbox


@pytest.fixture(scope="module")
def sandbox() -> Iterator[CniSandbox]:
    name = f"t{uuid.uuid4().hex[:7]}"  # short, unique across concurrent runs
    with SandboxManager() as cleaner:
        try:
            made = _up(name, 2, 2)
            yield made
            made.manager.close()
        finally:
            cleaner.down(name)


@pytest.fixture(scope="module")
def adapter() -> Iterator[NetnsAdapter]:
    with NetnsAdapter() as a:
        yield a


def test_each_node_has_its_conflist_ptp_host_local_loopback(sandbox: CniSandbox) -> None:
    for node in sandbox.plan.nodes:
        conflist = json.loads(sandbox.files(node.name).conflist.read_text())
        assert [p["type"] for p in conflist["plugins"]] == ["ptp", "loopback"]
        ipam = conflist["plugins"][0]["ipam"]
        assert ipam["type"] == "host-local"
        assert ipam["ranges"] == [[{"subnet": node.pod_cidr, "gateway": node.gateway}]]
        assert ipam["dataDir"] == str(sandbox.files(node.name).ipam_dir)


def test_add_ran_each_plugin_in_order_inside_the_pods_node(sandbox: CniSandbox) -> None:
    adds = [c for c in sandbox.recorder.calls if c[0] == "ADD"]
    for pod in sandbox.plan.pods:
        node = sandbox.plan.node(pod.node)
        assert node is not None
        mine = [(plugin, host, rc) for _, plugin, cid, host, rc in adds if cid.endswith(pod.name)]
        host = f"/var/run/netns/{node.netns}"
        assert mine == [("ptp", host, 0), ("loopback", host, 0)]


def test_host_local_reserved_each_pods_own_address_for_its_container(sandbox: CniSandbox) -> None:
    for node in sandbox.plan.nodes:
        expected = {
            p.ip: [f"{sandbox.plan.name}-{p.name}", "eth0"]
            for p in sandbox.plan.pods
            if p.node == node.name
        }
        assert _reserved(sandbox.files(node.name).ipam_dir) == expected
    # The plan's addresses, as before CNI: node1-pod1 = 10.10.1.11, node2-pod2 = 10.10.2.12.
    assert {p.name: p.ip for p in sandbox.plan.pods}["node2-pod2"] == "10.10.2.12"


def test_pod_eth0_and_routes_are_ptps(sandbox: CniSandbox) -> None:
    for pod in sandbox.plan.pods:
        node = sandbox.plan.node(pod.node)
        assert node is not None
        (eth0,) = _ip_json(pod.netns, "addr", "show", "dev", "eth0")
        v4 = [a for a in eth0["addr_info"] if a["family"] == "inet"]
        # host-local hands out the range's prefix; ptp replaces the connected route.
        assert [(a["local"], a["prefixlen"]) for a in v4] == [(pod.ip, 24)]
        routes = {(r["dst"], r.get("gateway")) for r in _ip_json(pod.netns, "route", "show")}
        assert routes == {
            ("default", node.gateway),
            (node.pod_cidr, node.gateway),
            (node.gateway, None),
        }
        (lo,) = _ip_json(pod.netns, "link", "show", "dev", "lo")
        assert "UP" in lo["flags"]


def test_host_side_veth_carries_the_gateway_and_the_pods_route(sandbox: CniSandbox) -> None:
    for pod in sandbox.plan.pods:
        node = sandbox.plan.node(pod.node)
        assert node is not None
        result = sandbox.files(node.name).load_result(
            cni.Attachment(
                container_id=f"{sandbox.plan.name}-{pod.name}",
                netns=f"/var/run/netns/{pod.netns}",
                pod_namespace=pod.namespace,
                pod_name=pod.name,
            )
        )
        assert result is not None
        host_veth = result["interfaces"][0]["name"]
        assert host_veth.startswith("veth") and "sandbox" not in result["interfaces"][0]
        assert host_veth in _veths(node.netns)
        (link,) = _ip_json(node.netns, "addr", "show", "dev", host_veth)
        assert [
            (a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet"
        ] == [(node.gateway, 32)]
        routes = _ip_json(node.netns, "route", "show", f"{pod.ip}/32")
        assert [r["dev"] for r in routes] == [host_veth]


@pytest.mark.parametrize(
    ("src", "dst"),
    [("node1-pod1", "node2-pod2"), ("node2-pod1", "node1-pod2"), ("node1-pod1", "node1-pod2")],
    ids=["across-nodes", "across-nodes-reverse", "same-node"],
)
def test_pods_reach_each_other_over_tcp(
    sandbox: CniSandbox, adapter: NetnsAdapter, src: str, dst: str
) -> None:
    pods = {p.name: p for p in sandbox.plan.pods}
    answer = probe.http_get(adapter, pods[src].netns, pods[dst].ip, 8080, "/who")
    assert answer["pod"] == dst
    assert answer["client_ip"] == pods[src].ip


def test_underlay_and_nodes_reach_pods(sandbox: CniSandbox) -> None:
    for where in (sandbox.plan.underlay_netns, sandbox.plan.nodes[0].netns):
        for pod in sandbox.plan.pods:
            ping = ["ip", "netns", "exec", where, "ping", "-c1", "-W2", pod.ip]
            assert subprocess.run(ping, capture_output=True).returncode == 0, (where, pod.name)


def test_down_dels_every_pod_in_reverse_and_leaves_no_trace(sandbox_name: str) -> None:
    made = _up(sandbox_name, 2, 1)
    state_dir = DEFAULT_STATE_ROOT / sandbox_name
    assert _reserved(made.files("node1").ipam_dir) == {
        "10.10.1.11": [f"{sandbox_name}-node1-pod1", "eth0"]
    }
    made.recorder.calls.clear()
    made.manager.down(sandbox_name)
    made.manager.close()
    for pod in made.plan.pods:
        dels = [
            (plugin, rc)
            for cmd, plugin, cid, _, rc in made.recorder.calls
            if cid.endswith(pod.name)
        ]
        assert dels == [("loopback", 0), ("ptp", 0)]
        assert all(cmd == "DEL" for cmd, *_ in made.recorder.calls)
    # What each node looked like right after its last DEL, before its namespace went:
    # no pod veth left, no address reserved.
    assert made.recorder.after_del == {n.netns: ([], {}) for n in made.plan.nodes}
    assert not [n for n in list_netns() if n.startswith(f"{sandbox_name}-")]
    assert not state_dir.exists()  # conflists, IPAM data and cached results with it


def test_plugin_failure_stops_up_with_the_plugins_error_and_cleans_up(
    sandbox_name: str, tmp_path: Path
) -> None:
    # The real ptp and host-local, and a loopback that refuses ADD the CNI way.
    for name in ("ptp", "host-local"):
        (tmp_path / name).symlink_to(cni.PLUGIN_DIR / name)
    refuse = tmp_path / "loopback"
    refuse.write_text(
        "#!/bin/sh\n"
        '[ "$CNI_COMMAND" = ADD ] || exit 0\n'
        'echo \'{"cniVersion":"1.0.0","code":11,"msg":"lo is busy","details":"on purpose"}\'\n'
        "exit 1\n"
    )
    refuse.chmod(0o755)
    with SandboxManager(cni_bin_dir=tmp_path) as manager, pytest.raises(SandboxError) as caught:
        manager.up(sandbox_name, 1, 2, controlplane=False)
    message = str(caught.value)
    assert message.startswith(f"sandbox {sandbox_name}: pod demo/node1-pod")
    assert message.endswith("CNI ADD failed in plugin loopback: code 11: lo is busy (on purpose)")
    assert not [n for n in list_netns() if n.startswith(f"{sandbox_name}-")]
    assert not (DEFAULT_STATE_ROOT / sandbox_name).exists()


def test_without_plugins_pods_get_hand_made_veths_and_a_warning(
    sandbox_name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], adapter: NetnsAdapter
) -> None:
    with SandboxManager(cni_bin_dir=tmp_path) as manager:
        plan = manager.up(sandbox_name, 2, 1, controlplane=False)
        assert plan.pod_network == "veth"
        warning = capsys.readouterr().err
        assert warning.strip() == (
            f"sandbox: CNI plugins not found in {tmp_path} (apt install "
            "containernetworking-plugins); using hand-made veths"
        )
        assert _veths(f"{sandbox_name}-node1") == ["vpod1"]
        answer = probe.http_get(adapter, f"{sandbox_name}-node1-pod1", "10.10.2.11", 8080, "/who")
        assert answer["pod"] == "node2-pod1"
        assert not (DEFAULT_STATE_ROOT / sandbox_name / "cni").exists()
        manager.down(sandbox_name)
    assert not (DEFAULT_STATE_ROOT / sandbox_name).exists()
