"""The connect-time redirect in the real kernel: programs loaded with bcc in a child process,
attached at the cgroup2 root, acting in the test's own pod namespaces only."""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeagent.datapath import bpfsys, ebpf
from nodeagent.datapath.bpfsys import BpfSys
from nodeagent.datapath.ebpf import ConnectRedirect
from nodeagent.datapath.iptables import CaptureError
from nodeagent.datapath.netns import NetnsHandle, NetnsWorker
from nodeagent.datapath.plan import build_plan
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


def link_ids(pins: Path) -> dict[str, tuple[int, int]]:
    """The pinned links: name -> (link id, id of the program it runs)."""
    sys_ = BpfSys()
    found = {}
    for name in ("connect4", "connect6", "sockops"):
        fd = sys_.obj_get(pins / f"{name}_link")
        try:
            info = sys_.link_info(fd)
        finally:
            os.close(fd)
        found[name] = (info.id, info.prog_id)
    return found


def test_a_restart_takes_over_the_pinned_links_and_reuses_the_compiled_programs(
    topology: Topology, worker: NetnsWorker, bpffs: Path, monkeypatch: pytest.MonkeyPatch
):
    pins = bpffs / "agent"
    outbound = listen(worker, topology.pod_a, LISTENER)
    kw = {"kernel_headers": HEADERS, "outbound_port": LISTENER, "worker": worker, "pin_dir": pins}
    try:
        first = ConnectRedirect(**kw)  # type: ignore[arg-type]
        assert first.compiled
        cookie = first.add_pod(topology.pod_a, [topology.ip_a])
        before = link_ids(pins)
        first.close(keep=True)

        # The same program text: no child, the pinned programs and links as they were.
        second = ConnectRedirect(**kw)  # type: ignore[arg-type]
        assert not second.compiled
        assert link_ids(pins) == before
        assert second.pods() == {cookie: (topology.ip_a,)}
        second.close(keep=True)

        # A new program text (an upgrade): compiled, swapped into the very same links, and
        # the old programs unpinned.
        text = ebpf.read_source() + "\n// v2\n"
        monkeypatch.setattr(ebpf, "read_source", lambda: text)
        third = ConnectRedirect(**kw)  # type: ignore[arg-type]
        assert third.compiled
        after = link_ids(pins)
        assert {n: ids[0] for n, ids in after.items()} == {n: ids[0] for n, ids in before.items()}
        assert all(after[n][1] != before[n][1] for n in after)
        assert len([p for p in pins.iterdir() if "_prog_" in p.name]) == 3
        assert third.pods() == {cookie: (topology.ip_a,)}
        s, port, peer = dial(worker, topology.pod_a, (topology.ip_b, 8080))
        assert peer == ("127.0.0.1", LISTENER)
        accept_from(outbound)
        assert third.original_destination(cookie, port) == (topology.ip_b, 8080)
        s.close()
        third.close(keep=False)
        assert not pins.exists()
    finally:
        outbound.close()


def test_a_compile_error_is_a_capture_error_with_the_compilers_message(
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setattr(ebpf, "read_source", lambda: "int connect4(void *ctx) { return nope; }")
    with pytest.raises(CaptureError, match="nope"):
        ConnectRedirect(kernel_headers=HEADERS, outbound_port=LISTENER)


AGENT = f"""
import os, sys
from pathlib import Path
from nodeagent.datapath.ebpf import ConnectRedirect
r = ConnectRedirect(kernel_headers=Path({str(HEADERS)!r}), outbound_port={LISTENER})
rss = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS"))
print("bcc" in sys.modules, rss.split()[1])
r.close()
"""


def test_the_agent_process_never_imports_bcc():
    out = subprocess.run(
        [sys.executable, "-c", AGENT], capture_output=True, text=True, check=True, cwd=ROOT
    )
    imported, rss_kib = out.stdout.split()
    assert imported == "False"
    assert int(rss_kib) < 60 * 1024  # bcc alone would be ~75 MiB


def test_map_operations_through_raw_syscalls_round_trip(bpffs: Path):
    sys_ = BpfSys()
    key_size, value_size = ctypes.sizeof(ebpf.ConnKey), ctypes.sizeof(ebpf.OrigDst)
    fd = sys_.map_create(bpfsys.MAP_TYPE_HASH, key_size, value_size, 8)
    try:
        key = ebpf.ConnKey(netns=1 << 40, port=40000)
        sys_.map_update(fd, key, ebpf.OrigDst(ip=0x0100000A, port=0x901F))
        got = ebpf.OrigDst()
        assert sys_.map_lookup(fd, key, got)
        assert (got.ip, got.port) == (0x0100000A, 0x901F)
        assert [(k.netns, k.port) for k in sys_.map_keys(fd, ebpf.ConnKey)] == [(1 << 40, 40000)]

        sys_.obj_pin(fd, bpffs / "m")  # and the same map again through its pin
        again = sys_.obj_get(bpffs / "m")
        try:
            info = sys_.map_info(again)
            assert (info.type, info.key_size, info.value_size, info.max_entries) == (
                bpfsys.MAP_TYPE_HASH,
                key_size,
                value_size,
                8,
            )
            assert sys_.map_delete(again, key)
            assert not sys_.map_lookup(fd, key, got)
            assert not sys_.map_delete(fd, key)
        finally:
            os.close(again)
    finally:
        os.close(fd)


class RulesThatFail:
    """The iptables step of EbpfCapture, failing (a pod whose rules cannot be written)."""

    def __init__(self) -> None:
        self.removed: list[NetnsHandle] = []

    def apply(self, netns: NetnsHandle, plan: object) -> bool:
        raise CaptureError(f"apply capture in netns {netns}: iptables refused (test)")

    def remove(self, netns: NetnsHandle) -> None:
        self.removed.append(netns)


def test_a_pod_whose_rules_fail_leaves_no_map_entry_once_removed(
    topology: Topology, worker: NetnsWorker, redirect: ConnectRedirect
):
    # The program goes in first (fail closed against the plugin's hold), then the rules; if
    # those fail and the pod is released before a retry, its map entry must go with it.
    rules = RulesThatFail()
    capture = ebpf.EbpfCapture(rules, redirect, worker)  # type: ignore[arg-type]
    with pytest.raises(CaptureError, match="iptables refused"):
        capture.apply(topology.pod_a, build_plan())
    assert list(redirect.pods().values()) == [(topology.ip_a,)]  # captured meanwhile
    capture.remove(topology.pod_a)
    assert redirect.pods() == {}
    assert rules.removed == [topology.pod_a]
