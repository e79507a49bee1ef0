"""The connect-time redirect in the real kernel: programs loaded with bcc, attached at the
cgroup2 root, acting in the test's own pod namespaces only."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeagent.datapath.ebpf import ConnectRedirect
from nodeagent.datapath.netns import NetnsHandle, NetnsWorker
from nodeagent.model.constants import PROXY_MARK

from .conftest import Topology

ROOT = Path(__file__).resolve().parents[3]
HEADERS = ROOT / ".cache" / "kheaders"
LISTENER = 25001  # stands in for the agent's 15001, so a real agent on this host is untouched


def listen(worker: NetnsWorker, netns: NetnsHandle, port: int, host: str = "0.0.0.0"):
    def make() -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(16)
        s.settimeout(5)
        return s

    return worker.call(netns, make)


def dial(worker: NetnsWorker, netns: NetnsHandle, dst: tuple[str, int], *, mark: int = 0):
    """Connect from inside `netns`; returns (local port, the peer the socket reports)."""

    def go() -> tuple[socket.socket, int, tuple[str, int]]:
        s = socket.socket()
        if mark:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        s.settimeout(5)
        s.connect(dst)
        return s, s.getsockname()[1], s.getpeername()

    return worker.call(netns, go)


@pytest.fixture
def redirect(worker: NetnsWorker) -> Iterator[ConnectRedirect]:
    r = ConnectRedirect(kernel_headers=HEADERS, outbound_port=LISTENER, worker=worker)
    try:
        yield r
    finally:
        r.close()


def accept_from(listener: socket.socket) -> tuple[str, int]:
    conn, peer = listener.accept()
    conn.close()
    return peer


def assert_direct(
    worker: NetnsWorker, netns: NetnsHandle, dst: tuple[str, int], app: socket.socket, **kw: int
) -> tuple[str, int]:
    """A connect from `netns` that reaches `app` at `dst` itself; returns the peer it saw."""
    s, _, peer = dial(worker, netns, dst, **kw)
    try:
        assert peer == dst
        return accept_from(app)
    finally:
        s.close()


def test_pod_connects_go_to_the_listener_and_the_original_destination_is_recorded(
    topology: Topology, worker: NetnsWorker, redirect: ConnectRedirect
):
    outbound = listen(worker, topology.pod_a, LISTENER)
    app = listen(worker, topology.pod_b, 8080)
    try:
        cookie = redirect.add_pod(topology.pod_a, [topology.ip_a])
        assert redirect.pods() == {cookie: (topology.ip_a,)}
        client, port, peer = dial(worker, topology.pod_a, (topology.ip_b, 8080))
        assert peer == ("127.0.0.1", LISTENER)
        assert accept_from(outbound) == ("127.0.0.1", port)
        assert redirect.original_destination(cookie, port) == (topology.ip_b, 8080)
        assert redirect.original_destination(cookie, port) is None  # taken, once
        assert redirect.stats() == {"redirected": 1, "origins_filed": 1}
        client.close()

        # The agent's own sockets (the proxy mark) go where they were going.
        seen = assert_direct(worker, topology.pod_a, (topology.ip_b, 8080), app, mark=PROXY_MARK)
        assert seen[0] == topology.ip_a

        # So do connects in a namespace that is not captured.
        assert_direct(worker, topology.pod_b, (topology.ip_b, 8080), app)

        # Uncaptured again once removed.
        redirect.remove_pod(cookie)
        assert redirect.pods() == {}
        assert_direct(worker, topology.pod_a, (topology.ip_b, 8080), app)
    finally:
        outbound.close()
        app.close()


def test_an_ipv6_socket_dialling_an_ipv4_mapped_address_is_captured_too(
    topology: Topology, worker: NetnsWorker, redirect: ConnectRedirect
):
    # Dual-stack clients (gRPC's core, Java) dial IPv4 through an AF_INET6 socket: the
    # connection is IPv4, connect4 never runs, and it would leave the pod uncaptured.
    outbound = listen(worker, topology.pod_a, LISTENER)
    try:
        cookie = redirect.add_pod(topology.pod_a, [topology.ip_a])

        def go() -> tuple[socket.socket, int, tuple[str, int]]:
            s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect((f"::ffff:{topology.ip_b}", 8080))
            return s, s.getsockname()[1], s.getpeername()[:2]

        client, port, peer = worker.call(topology.pod_a, go)
        assert peer == ("::ffff:127.0.0.1", LISTENER)
        assert accept_from(outbound) == ("127.0.0.1", port)
        assert redirect.original_destination(cookie, port) == (topology.ip_b, 8080)
        client.close()
    finally:
        outbound.close()


def test_loopback_and_the_pods_own_address_are_not_captured(
    topology: Topology, worker: NetnsWorker, redirect: ConnectRedirect
):
    outbound = listen(worker, topology.pod_a, LISTENER)
    local = listen(worker, topology.pod_a, 8081)
    try:
        redirect.add_pod(topology.pod_a, [topology.ip_a])
        for host in ("127.0.0.1", topology.ip_a):
            assert_direct(worker, topology.pod_a, (host, 8081), local)
        assert redirect.stats()["redirected"] == 0
    finally:
        outbound.close()
        local.close()


def test_closing_detaches_the_programs(topology: Topology, worker: NetnsWorker):
    app = listen(worker, topology.pod_b, 8080)
    try:
        r = ConnectRedirect(kernel_headers=HEADERS, outbound_port=LISTENER, worker=worker)
        r.add_pod(topology.pod_a, [topology.ip_a])
        r.close()
        assert_direct(worker, topology.pod_a, (topology.ip_b, 8080), app)
    finally:
        app.close()


@pytest.fixture
def bpffs(tmp_path: Path) -> Iterator[Path]:
    """A bpffs of the test's own (pins go there, and it is unmounted afterwards)."""
    mount = tmp_path / "bpffs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_pinned_capture_outlives_the_agent_and_the_next_agent_takes_it_over(
    topology: Topology, worker: NetnsWorker, bpffs: Path
):
    pins = bpffs / "agent"
    outbound = listen(worker, topology.pod_a, LISTENER)
    app = listen(worker, topology.pod_b, 8080)
    try:
        first = ConnectRedirect(
            kernel_headers=HEADERS, outbound_port=LISTENER, worker=worker, pin_dir=pins
        )
        cookie = first.add_pod(topology.pod_a, [topology.ip_a])
        first.close(keep=True)  # an agent restart (or crash): capture stays
        s, port, peer = dial(worker, topology.pod_a, (topology.ip_b, 8080))
        assert peer == ("127.0.0.1", LISTENER)  # fail closed: never plaintext to the app
        accept_from(outbound)
        s.close()

        second = ConnectRedirect(
            kernel_headers=HEADERS, outbound_port=LISTENER, worker=worker, pin_dir=pins
        )
        assert second.pods() == {cookie: (topology.ip_a,)}  # the same maps
        assert second.original_destination(cookie, port) == (topology.ip_b, 8080)
        s, port, _ = dial(worker, topology.pod_a, (topology.ip_b, 8080))
        accept_from(outbound)
        assert second.original_destination(cookie, port) == (topology.ip_b, 8080)
        s.close()
        second.close(keep=False)
        assert not pins.exists()
        assert_direct(worker, topology.pod_a, (topology.ip_b, 8080), app)
    finally:
        outbound.close()
        app.close()
