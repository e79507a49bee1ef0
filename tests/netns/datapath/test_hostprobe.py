"""The node's probe SNAT rule in real namespaces: kubelet-like (node-local) connections
reach a captured pod's app from 169.254.7.127; forwarded ones stay captured.

    pod (a0) <-> node (the rule, the "kubelet") <-> client (b0): the client's
    connections to the pod are routed through the node, so they are forwarded there.
"""

from __future__ import annotations

import select
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nodeagent.datapath.capture import CaptureBackend
from nodeagent.datapath.ebpf import ConnectRedirect, EbpfCapture
from nodeagent.datapath.hostprobe import HostProbeError, HostProbeRules
from nodeagent.datapath.iptables import IptablesBackend
from nodeagent.datapath.netns import NetnsHandle, NetnsWorker, original_destination, resolve
from nodeagent.datapath.plan import CapturePlan, build_plan, parse_iptables_save
from nodeagent.model.constants import PROBE_SNAT_IPV4, PROBE_SNAT_IPV6
from tests.netns.topology import PodPair, in_ns, two_pods

ROOT = Path(__file__).resolve().parents[3]
HEADERS = ROOT / ".cache" / "kheaders"
EBPF_OUTBOUND = 25001  # the eBPF backend's outbound port; unused here, and not the real 15001
APP, INBOUND = 8080, 15006


@dataclass(frozen=True)
class Net:
    names: PodPair
    pod: NetnsHandle
    node: NetnsHandle
    client: NetnsHandle


@pytest.fixture
def net() -> Iterator[Net]:
    with two_pods("hp", (243, 244), ipv6=True) as p:
        yield Net(p, resolve(p.a), resolve(p.node), resolve(p.b))


@pytest.fixture
def rules(net: Net, worker: NetnsWorker) -> Iterator[HostProbeRules]:
    r = HostProbeRules(net.node, worker=worker)
    try:
        yield r
    finally:
        r.uninstall()


@pytest.fixture(params=["iptables", "ebpf"])
def captured(
    request: pytest.FixtureRequest, net: Net, worker: NetnsWorker
) -> Iterator[CaptureBackend]:
    """The pod's capture, installed by the real backend."""
    iptables = IptablesBackend(worker)
    backend: CaptureBackend
    plan: CapturePlan
    redirect = None
    if request.param == "ebpf":
        redirect = ConnectRedirect(
            kernel_headers=HEADERS, outbound_port=EBPF_OUTBOUND, worker=worker
        )
        backend = EbpfCapture(iptables, redirect, worker)
        plan = build_plan(ebpf_outbound_ipv4=True)
    else:
        backend, plan = iptables, build_plan()
    try:
        backend.apply(net.pod, plan)
        yield backend
    finally:
        try:
            backend.remove(net.pod)
        finally:
            if redirect is not None:
                redirect.close()


def listen(worker: NetnsWorker, netns: NetnsHandle, host: str, port: int) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        if ":" in host:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(16)
        return s

    return worker.call(netns, make)


def pod_listeners(worker: NetnsWorker, pod: NetnsHandle, host: str) -> dict[int, socket.socket]:
    """The pod's app on 8080, and a stand-in for the agent's inbound listener on 15006."""
    return {port: listen(worker, pod, host, port) for port in (APP, INBOUND)}


@dataclass(frozen=True)
class Landed:
    port: int  # the listener that accepted it: APP or INBOUND (captured)
    peer: str  # the source address that listener saw
    original: tuple[str, int]  # where it was going (SO_ORIGINAL_DST when redirected)


def connect(
    worker: NetnsWorker,
    netns: NetnsHandle,
    dst: tuple[str, int],
    listeners: dict[int, socket.socket],
) -> Landed:
    """Connect from a process in `netns`; report which pod listener accepted it."""

    def dial() -> socket.socket:
        s = socket.socket(socket.AF_INET6 if ":" in dst[0] else socket.AF_INET)
        s.settimeout(5)
        s.connect(dst)
        return s

    client = worker.call(netns, dial)
    try:
        ready, _, _ = select.select(list(listeners.values()), [], [], 5)
        assert ready, f"no pod listener accepted the connection to {dst}"
        port = next(p for p, s in listeners.items() if s is ready[0])
        conn, peer = ready[0].accept()
        try:
            return Landed(port, peer[0], original_destination(conn))
        finally:
            conn.close()
    finally:
        client.close()


def node_nat(net: Net, family: int = 4) -> str:
    command = "iptables-legacy-save" if family == 4 else "ip6tables-legacy-save"
    return "\n".join(parse_iptables_save(in_ns(net.names.node, command, "-t", "nat"))["nat"].rules)


def node_sets(net: Net) -> str:
    return in_ns(net.names.node, "ipset", "list", "-n")


# -- the rule and its sets -------------------------------------------------------------------


def test_install_twice_changes_nothing_and_a_new_agent_adopts_it(
    net: Net, rules: HostProbeRules
) -> None:
    assert rules.install() is True
    rules.add([net.names.ip_a, net.names.ip6_a])
    before = (node_nat(net, 4), node_nat(net, 6), in_ns(net.names.node, "ipset", "save"))
    assert rules.install() is False
    assert (node_nat(net, 4), node_nat(net, 6), in_ns(net.names.node, "ipset", "save")) == before
    assert node_nat(net, 4).splitlines()[0] == "-A POSTROUTING -j ISTIO_POSTRT"
    assert "--socket-exists" in node_nat(net, 4) and "istio-inpod-probes-v6" in node_nat(net, 6)
    with HostProbeRules(net.node) as restarted:  # its own worker, as after a restart
        assert restarted.install() is False
        found = restarted.installed()
        assert found.matches(restarted.plan), found.drift(restarted.plan)
        assert found.members == {net.names.ip_a, net.names.ip6_a}


def test_uninstall_leaves_no_chain_jump_or_set(net: Net, rules: HostProbeRules) -> None:
    rules.install()
    rules.add([net.names.ip_a, net.names.ip6_a])
    in_ns(net.names.node, "iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-j", "ISTIO_POSTRT")
    rules.uninstall()
    for family in (4, 6):
        assert "ISTIO_POSTRT" not in in_ns(
            net.names.node, f"ip{'6' if family == 6 else ''}tables-legacy-save", "-t", "nat"
        )
    assert node_sets(net).strip() == ""
    assert rules.installed().empty
    rules.uninstall()  # again: nothing to do, no error


def test_drift_is_repaired_with_the_jump_first(net: Net, rules: HostProbeRules) -> None:
    rules.install()
    node = net.names.node
    in_ns(node, "iptables-legacy", "-t", "nat", "-D", "POSTROUTING", "-j", "ISTIO_POSTRT")
    in_ns(node, "iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-j", "MASQUERADE")
    in_ns(node, "iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-j", "ISTIO_POSTRT")
    in_ns(node, "iptables-legacy", "-t", "nat", "-F", "ISTIO_POSTRT")
    assert set(rules.installed().drift(rules.plan)) == {4}
    assert rules.install() is True
    assert rules.installed().matches(rules.plan)
    assert node_nat(net).splitlines()[:2] == [
        "-A POSTROUTING -j ISTIO_POSTRT",
        "-A POSTROUTING -j MASQUERADE",
    ]
    in_ns(node, "iptables-legacy", "-t", "nat", "-D", "POSTROUTING", "-j", "MASQUERADE")


def test_add_remove_and_sync_set_membership_by_family(net: Net, rules: HostProbeRules) -> None:
    rules.install()
    assert rules.add(["10.1.0.1", "10.1.0.2", "fd00:1::1", "::ffff:10.1.0.3"]) is True
    assert rules.add(["10.1.0.1"]) is False  # already there
    assert rules.installed().families[4].members == {"10.1.0.1", "10.1.0.2", "10.1.0.3"}
    assert rules.installed().families[6].members == {"fd00:1::1"}
    assert rules.remove(["10.1.0.2", "10.9.9.9"]) is True
    assert rules.remove(["10.9.9.9"]) is False
    assert rules.sync(["10.1.0.3", "10.1.0.4", "fd00:1::2"]) is True
    assert rules.installed().members == {"10.1.0.3", "10.1.0.4", "fd00:1::2"}
    assert rules.sync(["fd00:1::2", "10.1.0.4", "10.1.0.3"]) is False
    assert "10.1.0.4" in in_ns(net.names.node, "ipset", "list", "istio-inpod-probes-v4")
    assert rules.sync([]) is True
    assert rules.installed().members == frozenset()


def test_errors_name_what_failed(net: Net, worker: NetnsWorker) -> None:
    rules = HostProbeRules(net.node, worker=worker)
    with pytest.raises(HostProbeError, match="istio-inpod-probes-v4 does not exist"):
        rules.add([net.names.ip_a])
    with pytest.raises(HostProbeError, match="not an IP address: 'pod-a'"):
        rules.add(["pod-a"])
    subprocess.run(["ip", "netns", "del", net.names.node], check=True)
    with pytest.raises(HostProbeError, match=f"{net.node.path}.* is gone"):
        rules.install()
    with pytest.raises(HostProbeError, match="is gone"):
        HostProbeRules(net.names.node)
    subprocess.run(["ip", "netns", "add", net.names.node], check=True)  # for the teardown


# -- what it does to traffic -------------------------------------------------------------


def test_node_local_connection_skips_capture_and_forwarded_one_is_captured(
    net: Net, worker: NetnsWorker, rules: HostProbeRules, captured: CaptureBackend
) -> None:
    pod_ip = net.names.ip_a
    listeners = pod_listeners(worker, net.pod, "0.0.0.0")
    try:
        rules.install()
        # Not in the set yet: the "kubelet" connection is captured like any other.
        landed = connect(worker, net.node, (pod_ip, APP), listeners)
        assert landed.port == INBOUND and landed.original == (pod_ip, APP)

        rules.add([pod_ip])
        probe = connect(worker, net.node, (pod_ip, APP), listeners)
        assert (probe.port, probe.peer) == (APP, PROBE_SNAT_IPV4)

        # Routed through the node to a pod in the set: no socket on the node, no SNAT.
        forwarded = connect(worker, net.client, (pod_ip, APP), listeners)
        assert forwarded.port == INBOUND, "forwarded traffic bypassed capture"
        assert forwarded.peer == net.names.ip_b
        assert forwarded.original == (pod_ip, APP)

        rules.remove([pod_ip])
        assert connect(worker, net.node, (pod_ip, APP), listeners).port == INBOUND
    finally:
        for s in listeners.values():
            s.close()


def test_ipv6_node_local_connection_is_snated_and_forwarded_one_is_not(
    net: Net, worker: NetnsWorker, rules: HostProbeRules
) -> None:
    with IptablesBackend(worker) as backend:
        backend.apply(net.pod, build_plan())
        pod_ip = net.names.ip6_a
        listeners = pod_listeners(worker, net.pod, "::")
        try:
            rules.install()
            rules.sync([net.names.ip_a, pod_ip])
            probe = connect(worker, net.node, (pod_ip, APP), listeners)
            assert (probe.port, probe.peer) == (APP, PROBE_SNAT_IPV6)
            forwarded = connect(worker, net.client, (pod_ip, APP), listeners)
            assert (forwarded.port, forwarded.peer) == (INBOUND, net.names.ip6_b)
        finally:
            for s in listeners.values():
                s.close()
            backend.remove(net.pod)
