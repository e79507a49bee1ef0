"""The real CNI chain run as a container runtime runs it: loopback, then the node's conflist
(ptp with host-local IPAM, then nodeagent-cni, installed there by nodeagent.cni.install),
with a CniEventServer on a real Unix socket standing in for the agent, or no agent at all.
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nodeagent.cni.install import install, plugin_entry
from nodeagent.datapath.iptables import IptablesBackend
from nodeagent.datapath.netns import NetnsHandle, NetnsWorker, resolve
from nodeagent.datapath.plan import CapturePlan, build_plan, owned_view, parse_iptables_save
from nodeagent.node.cni_server import CniAdd, CniDel, CniEventServer, CniReply
from tests.netns.cni.conftest import Namespaces
from tests.netns.cni.runtime import SYSTEM_PLUGINS, CniRuntime
from tests.netns.topology import in_ns

PLUGIN = Path(sys.executable).parent / "nodeagent-cni"
CONTAINER = "c0ffee42"
EBPF_PORT = 25001  # stands in for the agent's 15001, so a real agent on this host is untouched


@dataclass(frozen=True)
class Node:
    runtime: CniRuntime
    socket: Path
    log: Path
    ns: Namespaces


@pytest.fixture
def node(tmp_path: Path, namespaces: Namespaces) -> Iterator[Node]:
    conf_dir, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    conf_dir.mkdir()
    (conf_dir / "10-ptp.conflist").write_text(
        json.dumps(
            {
                "cniVersion": "1.0.0",
                "name": "podnet",
                "plugins": [
                    {
                        "type": "ptp",
                        "ipMasq": False,
                        "ipam": {
                            "type": "host-local",
                            "ranges": [
                                [{"subnet": "10.243.7.0/24"}],
                                [{"subnet": "fd00:243:7::/64"}],
                            ],
                            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
                            "dataDir": str(tmp_path / "ipam"),
                        },
                    }
                ],
            },
            indent=2,
        )
    )
    sock, log = tmp_path / "agent" / "cni.sock", tmp_path / "cni.log"
    entry = plugin_entry(str(sock), add_timeout_seconds=3, log_file=str(log))
    conflist = install(conf_dir, bin_dir, entry, plugin=PLUGIN)
    runtime = CniRuntime(conflist, [bin_dir, Path(SYSTEM_PLUGINS)], namespaces.node)
    # Like containerd: loopback is its own network, brought up before the pod's network.
    runtime.exec_plugin({"type": "loopback"}, "ADD", CONTAINER, namespaces.pod_path, None).result()
    yield Node(runtime, sock, log, namespaces)
    runtime.delete(CONTAINER, namespaces.pod_path, None)  # releases the IPAM lease


class Agent:
    def __init__(self) -> None:
        self.adds: list[CniAdd] = []
        self.dels: list[CniDel] = []

    async def on_add(self, event: CniAdd) -> CniReply:
        self.adds.append(event)
        return CniReply(200, "captured", "test agent")

    async def on_del(self, event: CniDel) -> CniReply:
        self.dels.append(event)
        return CniReply(200, "removed")


def report_add_time(runtime: CniRuntime, pod: str, result: dict[str, Any], label: str) -> None:
    """Time nodeagent-cni's ADD alone (a runtime retrying ADD with the same prevResult)."""
    ours = runtime.network()["plugins"][-1]
    times = []
    for _ in range(5):
        call = runtime.exec_plugin(ours, "ADD", CONTAINER, pod, result)
        assert call.code == 0, call.stdout
        times.append(call.seconds * 1000)
    times.sort()
    print(f"\nnodeagent-cni ADD {label}: median {times[2]:.1f} ms, min {times[0]:.1f} ms (wall)")


def owned_nat(netns: str, family: int = 4) -> dict[str, object]:
    save = "iptables-legacy-save" if family == 4 else "ip6tables-legacy-save"
    view = owned_view(parse_iptables_save(in_ns(netns, save)))
    return {name: table for name, table in view.items()}


def connect_errno(worker: NetnsWorker, netns: str, host: str, port: int) -> int:
    """0 if a TCP connect from inside `netns` succeeds, else its errno."""

    def attempt() -> int:
        with socket.socket() as s:
            s.settimeout(3)
            return s.connect_ex((host, port))

    return worker.call(resolve(netns), attempt)


def listener(worker: NetnsWorker, netns: str, host: str, port: int = 0) -> socket.socket:
    """A TCP listener inside `netns` (a socket keeps the namespace it was made in)."""

    def make() -> socket.socket:
        s = socket.socket()
        s.bind((host, port))
        s.listen(8)
        s.setblocking(False)
        return s

    return worker.call(resolve(netns), make)


def accepted_any(lst: socket.socket) -> bool:
    try:
        conn, _ = lst.accept()
    except (BlockingIOError, TimeoutError):
        return False
    conn.close()
    return True


async def test_chain_with_agent_passes_prev_result_and_tells_the_agent(node: Node) -> None:
    agent = Agent()
    runtime, pod = node.runtime, node.ns.pod_path
    async with CniEventServer(node.socket, agent.on_add, agent.on_del):
        result = await asyncio.to_thread(runtime.add, CONTAINER, pod)
        ours, ptp = runtime.last("nodeagent-cni", "ADD"), runtime.last("ptp", "ADD")
        print(f"\nnodeagent-cni ADD with agent: {ours.seconds * 1000:.1f} ms (wall, via nsenter)")
        assert json.loads(ours.stdout) == json.loads(ptp.stdout) == result
        ips = tuple(entry["address"].split("/")[0] for entry in result["ips"])
        assert [(a.netns, a.container_id, a.ips, a.pod_name) for a in agent.adds] == [
            (pod, CONTAINER, ips, f"pod-{CONTAINER}")
        ]
        assert owned_nat(node.ns.pod) == {}  # the agent captured it: the plugin did nothing
        await asyncio.to_thread(report_add_time, runtime, pod, result, "with agent")
        del agent.adds[1:]

        with NetnsWorker("cni-test") as worker:  # the pod's network works (nothing held)
            gateway = result["ips"][0]["gateway"]
            lst = listener(worker, node.ns.node, gateway)
            with lst:
                assert connect_errno(worker, node.ns.pod, gateway, lst.getsockname()[1]) == 0

        checks = await asyncio.to_thread(runtime.check, CONTAINER, pod, result)
        assert [(c.plugin, c.code) for c in checks] == [("ptp", 0), ("nodeagent-cni", 0)]
        for _ in range(2):
            dels = await asyncio.to_thread(runtime.delete, CONTAINER, pod, result)
            assert [(c.plugin, c.code, c.stdout) for c in dels] == [
                ("nodeagent-cni", 0, ""),
                ("ptp", 0, ""),
            ]
        assert [(d.container_id, d.netns) for d in agent.dels] == [(CONTAINER, pod)] * 2

    version = runtime.exec_plugin({"type": "nodeagent-cni"}, "VERSION", "", "", None).result()
    assert "1.0.0" in version["supportedVersions"]
    log = node.log.read_text().splitlines()
    assert [line.split()[1] for line in log] == ["ADD"] * 6 + ["CHECK", "DEL", "DEL"]
    assert "agent: captured" in log[0]


async def test_chain_without_agent_fails_closed(node: Node) -> None:
    runtime, pod = node.runtime, node.ns.pod_path
    assert not node.socket.exists()
    result = await asyncio.to_thread(runtime.add, CONTAINER, pod)
    ours, ptp = runtime.last("nodeagent-cni", "ADD"), runtime.last("ptp", "ADD")
    print(f"\nnodeagent-cni ADD without agent (fail closed): {ours.seconds * 1000:.1f} ms (wall)")
    assert json.loads(ours.stdout) == json.loads(ptp.stdout) == result

    save = in_ns(node.ns.pod, "iptables-legacy-save")
    assert ":ISTIO_OUTPUT" in save and ":ISTIO_PRERT" in save
    assert "-A OUTPUT -j ISTIO_OUTPUT" in save
    assert "--to-ports 15001" in save
    assert "ISTIO_OUTPUT" in in_ns(node.ns.pod, "ip6tables-legacy-save")  # the pod has IPv6

    with NetnsWorker("cni-test") as worker:
        gateway = result["ips"][0]["gateway"]
        lst = listener(worker, node.ns.node, gateway)
        with lst:
            # Redirected to the agent's outbound port, where nobody listens: refused.
            assert connect_errno(worker, node.ns.pod, gateway, lst.getsockname()[1]) == (
                errno.ECONNREFUSED
            )
            assert not accepted_any(lst)

    report_add_time(runtime, pod, result, "without agent, pod already held")
    # CHECK with no agent: the hold is in place, so the pod is fine.
    checks = await asyncio.to_thread(runtime.check, CONTAINER, pod, result)
    assert [(c.plugin, c.code) for c in checks] == [("ptp", 0), ("nodeagent-cni", 0)]
    # A retried ADD leaves one jump per chain.
    runtime.exec_plugin(runtime.network()["plugins"][-1], "ADD", CONTAINER, pod, result).result()
    assert in_ns(node.ns.pod, "iptables-legacy-save").count("-j ISTIO_OUTPUT") == 2  # mangle, nat
    for _ in range(2):
        dels = await asyncio.to_thread(runtime.delete, CONTAINER, pod, result)
        assert [c.code for c in dels] == [0, 0]
    assert "fail closed: IPv4 held, IPv6 held" in node.log.read_text()


def test_check_fails_when_nothing_holds_the_pod(node: Node) -> None:
    runtime, pod = node.runtime, node.ns.pod_path
    result = runtime.add(CONTAINER, pod)  # held (no agent)
    subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            node.ns.pod,
            "iptables-legacy",
            "-t",
            "nat",
            "-D",
            "OUTPUT",
            "-j",
            "ISTIO_OUTPUT",
        ],
        check=True,
    )
    ours = runtime.check(CONTAINER, pod, result)[-1]
    assert ours.code != 0
    assert json.loads(ours.stdout)["code"] == 999


@pytest.mark.parametrize("ebpf", [False, True], ids=["iptables", "ebpf"])
def test_the_agent_adopts_the_hold(node: Node, ebpf: bool) -> None:
    """The iptables backend finds the hold identical to its plan (only the netlink half is
    missing); the eBPF backend's plan has no IPv4 outbound REDIRECT, and its apply (the same
    IptablesBackend.apply, see EbpfCapture.apply) rewrites the hold's chains to its plan."""
    runtime, pod = node.runtime, node.ns.pod_path
    runtime.add(CONTAINER, pod)
    before = owned_nat(node.ns.pod)
    plan = build_plan(ipv6=True, ebpf_outbound_ipv4=ebpf)
    with NetnsWorker("cni-test") as worker:
        backend = IptablesBackend(worker)
        installed = backend.read_installed(pod)
        drift = installed.drift(plan)
        if not ebpf:
            assert {family: set(tables) for family, tables in drift.items()} == {
                4: {"netlink"},
                6: {"netlink"},
            }
        backend.apply(pod, plan)
        assert backend.read_installed(pod).matches(plan)
    after = owned_nat(node.ns.pod)
    if ebpf:
        assert after != before
        assert "--to-ports 15001" not in in_ns(node.ns.pod, "iptables-legacy-save")
    else:
        assert after == before  # adopted unchanged
    runtime.delete(CONTAINER, pod, None)


def test_the_ebpf_backend_takes_over_a_held_pod(node: Node) -> None:
    """The real eBPF backend on a pod the plugin held: its apply rewrites the hold's chains
    to its own plan (no IPv4 outbound REDIRECT left behind to a 15001 it does not need),
    and the pod's connects then go where the connect-time redirect sends them."""
    from nodeagent.datapath.ebpf import ConnectRedirect, EbpfCapture

    runtime, pod = node.runtime, node.ns.pod_path
    result = runtime.add(CONTAINER, pod)
    gateway = result["ips"][0]["gateway"]
    headers = Path(__file__).resolve().parents[3] / ".cache" / "kheaders"
    with NetnsWorker("cni-test") as worker:
        redirect = ConnectRedirect(kernel_headers=headers, outbound_port=EBPF_PORT, worker=worker)
        proxy = listener(worker, node.ns.pod, "127.0.0.1", EBPF_PORT)
        app = listener(worker, node.ns.node, gateway)
        proxy.settimeout(3)
        taken_over: list[bool] = []

        class ProgramFirst(IptablesBackend):
            def apply(self, netns: NetnsHandle | str, plan: CapturePlan) -> bool:
                # The hold's rules are still all in place when the rules are rewritten:
                # by then the pod's program must already take its connects, or a connect
                # in between would leave uncaptured (CI saw plaintext cross there).
                errno = connect_errno(worker, node.ns.pod, gateway, app.getsockname()[1])
                taken_over.append(errno == 0 and accepted_any(proxy))
                return super().apply(netns, plan)

        try:
            capture = EbpfCapture(ProgramFirst(worker), redirect, worker)
            assert capture.apply(resolve(pod), build_plan(ipv6=True, ebpf_outbound_ipv4=True))
            assert taken_over == [True]
            v4 = in_ns(node.ns.pod, "iptables-legacy-save")
            assert "--to-ports 15001" not in v4
            assert "--to-ports 15006" in v4  # inbound stays with iptables
            assert "--to-ports 15001" in in_ns(node.ns.pod, "ip6tables-legacy-save")
            with proxy, app:
                assert connect_errno(worker, node.ns.pod, gateway, app.getsockname()[1]) == 0
                assert accepted_any(proxy)  # the connect-time redirect took it
                assert not accepted_any(app)
            capture.remove(resolve(pod))
        finally:
            redirect.close()
    runtime.delete(CONTAINER, pod, result)
