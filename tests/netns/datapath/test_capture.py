"""In-pod capture with iptables in real namespaces: what is redirected and what is not."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeagent.datapath.iptables import CaptureError, IptablesBackend
from nodeagent.datapath.netns import (
    InPodSocketFactory,
    NetnsHandle,
    NetnsSocketFactory,
    NetnsVanishedError,
    NetnsWorker,
    SocketSetupError,
    current_inode,
    original_destination,
    resolve,
)
from nodeagent.datapath.plan import Match, Rule, build_plan, parse_iptables_save

from .conftest import Topology, in_ns

PLAN = build_plan()


@pytest.fixture
def backend() -> Iterator[IptablesBackend]:
    with IptablesBackend() as b:
        yield b


def plain_socket(
    worker: NetnsWorker, ns: NetnsHandle, family: socket.AddressFamily = socket.AF_INET
) -> socket.socket:
    """An app's socket in a pod: no mark."""

    def make() -> socket.socket:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setblocking(False)
        return s

    return worker.call(ns, make)


def plain_listener(worker: NetnsWorker, ns: NetnsHandle, host: str, port: int) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen()
        s.setblocking(False)
        return s

    return worker.call(ns, make)


async def connect_and_accept(
    client: socket.socket, dst: tuple[str, int], *listeners: socket.socket
) -> tuple[int, socket.socket]:
    """Connect, then return (index of the listener that got it, accepted socket)."""
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.sock_connect(client, dst), 5)
    for _ in range(200):
        for i, listener in enumerate(listeners):
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                continue
            return i, conn
        await asyncio.sleep(0.01)
    raise AssertionError(f"no listener accepted the connection to {dst}")


def save(name: str, family: int = 4) -> dict:  # type: ignore[type-arg]
    command = "iptables-legacy-save" if family == 4 else "ip6tables-legacy-save"
    return parse_iptables_save(in_ns(name, command))


def has_no_capture(name: str) -> bool:
    tables = {**{f"4{k}": v for k, v in save(name, 4).items()}}
    tables.update({f"6{k}": v for k, v in save(name, 6).items()})
    return all(t.is_empty for t in tables.values())


async def test_outbound_connection_reaches_15001_with_original_destination(
    topology: Topology, worker: NetnsWorker, backend: IptablesBackend
) -> None:
    backend.apply(topology.pod_a, PLAN)
    factory: InPodSocketFactory = NetnsSocketFactory(topology.pod_a, worker)
    outbound = factory.listener(15001)
    server_b = plain_listener(worker, topology.pod_b, "0.0.0.0", 8080)
    client = plain_socket(worker, topology.pod_a)
    accepted: socket.socket | None = None
    try:
        which, accepted = await connect_and_accept(
            client, (topology.ip_b, 8080), outbound, server_b
        )
        assert which == 0, "pod B's server got the connection: it was not captured"
        assert original_destination(accepted) == (topology.ip_b, 8080)
        assert outbound.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0x539
        assert (
            isinstance(factory, NetnsSocketFactory) and factory.transparent is True
        )  # root in the pod: IP_TRANSPARENT is allowed
    finally:
        for s in (outbound, server_b, client, accepted):
            if s is not None:
                s.close()


async def test_ipv6_outbound_connection_reaches_15001_with_original_destination(
    topology: Topology, worker: NetnsWorker, backend: IptablesBackend
) -> None:
    backend.apply(topology.pod_a, PLAN)
    outbound = NetnsSocketFactory(topology.pod_a, worker).listener(15001)
    assert outbound.family == socket.AF_INET6  # dual-stack: the pod has IPv6
    server_b = plain_listener(worker, topology.pod_b, "::", 8080)
    client = plain_socket(worker, topology.pod_a, socket.AF_INET6)
    accepted: socket.socket | None = None
    try:
        which, accepted = await connect_and_accept(
            client, (topology.ip6_b, 8080), outbound, server_b
        )
        assert which == 0, "IPv6 traffic to pod B was not captured"
        assert original_destination(accepted) == (topology.ip6_b, 8080)
    finally:
        for s in (outbound, server_b, client, accepted):
            if s is not None:
                s.close()


async def test_loopback_and_agent_marked_traffic_are_not_captured(
    topology: Topology, worker: NetnsWorker, backend: IptablesBackend
) -> None:
    backend.apply(topology.pod_a, PLAN)
    factory = NetnsSocketFactory(topology.pod_a, worker)
    outbound = factory.listener(15001)
    local = plain_listener(worker, topology.pod_a, "127.0.0.1", 9090)
    server_b = plain_listener(worker, topology.pod_b, "0.0.0.0", 8080)
    app = plain_socket(worker, topology.pod_a)
    agent = factory.upstream(socket.AF_INET)
    got: list[socket.socket] = []
    try:
        which, conn = await connect_and_accept(app, ("127.0.0.1", 9090), outbound, local)
        got.append(conn)
        assert which == 1, "loopback traffic inside the pod was captured"
        which, conn = await connect_and_accept(agent, (topology.ip_b, 8080), outbound, server_b)
        got.append(conn)
        assert which == 1, "the agent's own marked socket was captured"
        assert agent.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0x539
    finally:
        for s in (outbound, local, server_b, app, agent, *got):
            s.close()


async def test_inbound_15008_lands_directly_and_other_ports_go_to_15006(
    topology: Topology, worker: NetnsWorker, backend: IptablesBackend
) -> None:
    backend.apply(topology.pod_a, PLAN)
    factory = NetnsSocketFactory(topology.pod_a, worker)
    listeners = factory.listeners()
    app = plain_listener(worker, topology.pod_a, "0.0.0.0", 8080)
    clients = [plain_socket(worker, topology.pod_b) for _ in range(2)]
    got: list[socket.socket] = []
    order = [listeners[15006], listeners[15008], app]
    try:
        which, conn = await connect_and_accept(clients[0], (topology.ip_a, 15008), *order)
        got.append(conn)
        assert which == 1, "a connection to podIP:15008 was redirected"
        which, conn = await connect_and_accept(clients[1], (topology.ip_a, 8080), *order)
        got.append(conn)
        assert which == 0, "inbound plaintext to 8080 was not redirected to 15006"
        assert original_destination(conn) == (topology.ip_a, 8080)
    finally:
        for s in (*listeners.values(), app, *clients, *got):
            s.close()


def test_apply_twice_changes_nothing_and_read_installed_adopts(
    topology: Topology, backend: IptablesBackend
) -> None:
    assert backend.apply(topology.pod_a, PLAN) is True
    before = (save(topology.name_a, 4), save(topology.name_a, 6))
    rules_before = in_ns(topology.name_a, "ip", "rule")
    assert backend.apply(topology.pod_a, PLAN) is False
    assert (save(topology.name_a, 4), save(topology.name_a, 6)) == before
    assert in_ns(topology.name_a, "ip", "rule") == rules_before
    installed = backend.read_installed(topology.pod_a)
    assert installed.matches(PLAN)
    # A restarted agent (a new backend, new worker) adopts without touching anything.
    with IptablesBackend() as restarted:
        assert restarted.apply(topology.pod_a, PLAN) is False


def test_drifted_rules_are_repaired_with_exactly_one_jump(
    topology: Topology, backend: IptablesBackend
) -> None:
    backend.apply(topology.pod_a, PLAN)
    in_ns(topology.name_a, "iptables-legacy", "-t", "nat", "-A", "OUTPUT", "-j", "ISTIO_OUTPUT")
    in_ns(topology.name_a, "iptables-legacy", "-t", "nat", "-D", "ISTIO_PRERT", "1")
    assert not backend.read_installed(topology.pod_a).matches(PLAN)
    assert backend.apply(topology.pod_a, PLAN) is True
    assert backend.read_installed(topology.pod_a).matches(PLAN)
    nat = save(topology.name_a)["nat"]
    assert nat.rules.count("-A OUTPUT -j ISTIO_OUTPUT") == 1


def test_remove_leaves_iptables_and_ip_rules_empty(
    topology: Topology, backend: IptablesBackend
) -> None:
    rules4 = in_ns(topology.name_a, "ip", "-4", "rule")
    rules6 = in_ns(topology.name_a, "ip", "-6", "rule")
    backend.apply(topology.pod_a, PLAN)
    assert "lookup 100" in in_ns(topology.name_a, "ip", "-4", "rule")
    backend.remove(topology.pod_a)
    assert has_no_capture(topology.name_a)
    assert in_ns(topology.name_a, "ip", "-4", "rule") == rules4
    assert in_ns(topology.name_a, "ip", "-6", "rule") == rules6
    for family in ("-4", "-6"):
        table = subprocess.run(
            ["ip", "-n", topology.name_a, family, "route", "show", "table", "100"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert table.stdout.strip() == ""
    assert backend.read_installed(topology.pod_a).empty
    backend.remove(topology.pod_a)  # removing again is fine


def test_iptables_error_names_the_rule_and_leaves_nothing(
    topology: Topology, backend: IptablesBackend
) -> None:
    bad = Rule(
        chain="ISTIO_OUTPUT",
        protocol="tcp",
        matches=(Match("tcp", (("dport", "not-a-port"),)),),
        target="ACCEPT",
    )
    nat = PLAN.ipv4.tables[1]
    broken_nat = type(nat)(nat.name, nat.chains, nat.jumps, (*nat.rules, bad))
    broken = type(PLAN)(
        ipv4=type(PLAN.ipv4)(
            family=4,
            tables=(PLAN.ipv4.tables[0], broken_nat),
            policy_rule=PLAN.ipv4.policy_rule,
            local_route=PLAN.ipv4.local_route,
        ),
        ipv6=PLAN.ipv6,
    )
    with pytest.raises(CaptureError) as info:
        backend.apply(topology.pod_a, broken)
    message = str(info.value)
    assert topology.pod_a.path in message and "not-a-port" in message
    assert has_no_capture(topology.name_a)
    assert "lookup 100" not in in_ns(topology.name_a, "ip", "rule")


def test_vanished_namespace_is_a_clear_error(
    topology: Topology, worker: NetnsWorker, backend: IptablesBackend
) -> None:
    handle = topology.pod_a
    subprocess.run(["ip", "netns", "del", topology.name_a], check=True)
    with pytest.raises(CaptureError, match=f"{handle.path}.* is gone"):
        backend.apply(handle, PLAN)
    with pytest.raises(NetnsVanishedError, match="is gone"):
        NetnsSocketFactory(handle, worker, ipv6=False).listener(15001)
    # Recreated under the same name: a new inode, so the old handle refuses it.
    subprocess.run(["ip", "netns", "add", topology.name_a], check=True)
    with pytest.raises(NetnsVanishedError, match="was replaced"):
        NetnsSocketFactory(handle, worker, ipv6=False).listener(15001)


def test_port_already_taken_names_port_and_namespace(
    topology: Topology, worker: NetnsWorker
) -> None:
    squatter = plain_listener(worker, topology.pod_a, "0.0.0.0", 15008)
    factory = NetnsSocketFactory(topology.pod_a, worker)
    try:
        with pytest.raises(SocketSetupError) as info:
            factory.listeners()
        assert "15008" in str(info.value) and topology.pod_a.path in str(info.value)
        assert "in use" in str(info.value)
    finally:
        squatter.close()


def test_dns_capture_variant_installs_as_planned_and_is_removed_when_turned_off(
    topology: Topology, backend: IptablesBackend
) -> None:
    with_dns = build_plan(dns_capture=True)
    backend.apply(topology.pod_a, with_dns)
    installed = backend.read_installed(topology.pod_a)
    assert installed.matches(with_dns), installed.drift(with_dns)
    assert "raw" in save(topology.name_a)
    backend.apply(topology.pod_a, PLAN)
    assert backend.read_installed(topology.pod_a).matches(PLAN)
    assert all(t.is_empty for t in [save(topology.name_a)["raw"], save(topology.name_a, 6)["raw"]])


def fds_on(inode: int) -> int:
    """How many of our descriptors hold the namespace `inode` open."""
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        try:
            count += fd.stat().st_ino == inode
        except OSError:  # the listing's own descriptor, closed by now
            continue
    return count


def test_upstream_sockets_are_made_in_the_pod_by_the_calling_thread_which_returns_home(
    topology: Topology, worker: NetnsWorker
) -> None:
    # Made by the caller itself (the event loop's thread in the agent), not on the worker:
    # every one must be the pod's (its address binds only there), marked and non-blocking,
    # and the caller must be back in its own namespace after each.
    factory = NetnsSocketFactory(topology.pod_a, worker)
    home = current_inode()
    taken: list[socket.socket] = []
    try:
        for _ in range(5):
            taken.append(factory.upstream(socket.AF_INET))
            assert current_inode() == home
        pod = topology.pod_a.inode
        assert fds_on(pod) == 1  # opened once, kept between sockets
        factory.close()  # lets go of the namespace
        assert fds_on(pod) == 0
        # A connection still in flight after close() gets its socket, and nothing stays open.
        taken.append(factory.upstream(socket.AF_INET))
        assert current_inode() == home
        assert fds_on(pod) == 0
        for sock in taken:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0x539
            assert not sock.getblocking()
            sock.bind((topology.ip_a, 0))  # EADDRNOTAVAIL outside pod A's namespace
    finally:
        factory.close()
        for sock in taken:
            sock.close()


def test_an_upstream_socket_for_a_namespace_that_is_gone_is_refused_by_name(
    worker: NetnsWorker,
) -> None:
    name = f"na-gone-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        handle = resolve(name)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)
    factory = NetnsSocketFactory(handle, worker)
    home = current_inode()
    with pytest.raises(SocketSetupError, match=f"network namespace .*{name}.* is gone"):
        factory.upstream(socket.AF_INET)
    assert current_inode() == home
