"""Two pods behind a node namespace, a demo app in pod B, and helpers to run agents.

    pod A (a0 10.241.K.2) <-> (na .1) node (nb 10.242.K.1) <-> (b0 10.242.K.2) pod B

plus IPv6 fd00:241:K::/64 and fd00:242:K::/64. Names carry this process's pid
so concurrent runs never collide. The agent's scanner sees only this test's
two pods: `netns_dir` holds symlinks to them, `proc_root` is empty.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nodeagent.datapath.iptables import IptablesBackend
from nodeagent.datapath.netns import NetnsHandle, NetnsWorker, resolve
from nodeagent.model.workload import Workload

NODE = "node1"
APP_PORT = 8080


def sh(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(args)}: {done.stderr}"
    return done.stdout


def in_ns(name: str, *args: str) -> str:
    return sh("ip", "netns", "exec", name, *args)


@dataclass(frozen=True)
class Pod:
    name: str  # /var/run/netns name
    uid: str
    ip: str
    ip6: str
    handle: NetnsHandle

    def workload(self, node: str = NODE) -> Workload:
        return Workload(
            uid=self.uid,
            name=self.name,
            namespace="default",
            addresses=(ipaddress.ip_address(self.ip), ipaddress.ip_address(self.ip6)),
            node=node,
            service_account=f"sa-{self.uid}",
        )


@dataclass(frozen=True)
class Topology:
    a: Pod
    b: Pod
    netns_dir: Path  # symlinks to the two pods only
    proc_root: Path  # empty: no process scan


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[Topology]:
    if os.geteuid() != 0:
        pytest.skip("netns tests need root")
    tag = f"nm{os.getpid() % 100000}"
    k = os.getpid() % 250
    a, n, b = f"{tag}a", f"{tag}n", f"{tag}b"
    made: list[str] = []
    try:
        for name in (a, n, b):
            sh("ip", "netns", "add", name)
            made.append(name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "-n", a, "link", "add", "a0", "type", "veth", "peer", "name", "na", "netns", n)
        sh("ip", "-n", b, "link", "add", "b0", "type", "veth", "peer", "name", "nb", "netns", n)
        for ns, dev, v4, v6 in (
            (a, "a0", f"10.241.{k}.2", f"fd00:241:{k}::2"),
            (n, "na", f"10.241.{k}.1", f"fd00:241:{k}::1"),
            (n, "nb", f"10.242.{k}.1", f"fd00:242:{k}::1"),
            (b, "b0", f"10.242.{k}.2", f"fd00:242:{k}::2"),
        ):
            sh("ip", "-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
            sh("ip", "-n", ns, "-6", "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            sh("ip", "-n", ns, "link", "set", dev, "up")
        for ns, side in ((a, 241), (b, 242)):
            sh("ip", "-n", ns, "route", "add", "default", "via", f"10.{side}.{k}.1")
            sh("ip", "-n", ns, "-6", "route", "add", "default", "via", f"fd00:{side}:{k}::1")
        in_ns(n, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        in_ns(n, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        netns_dir = tmp_path / "netns"
        netns_dir.mkdir()
        proc_root = tmp_path / "proc"
        proc_root.mkdir()
        for name in (a, b):
            (netns_dir / name).symlink_to(f"/var/run/netns/{name}")
        pod_a = Pod(a, "uid-a", f"10.241.{k}.2", f"fd00:241:{k}::2", resolve(str(netns_dir / a)))
        pod_b = Pod(b, "uid-b", f"10.242.{k}.2", f"fd00:242:{k}::2", resolve(str(netns_dir / b)))
        yield Topology(pod_a, pod_b, netns_dir, proc_root)
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


@pytest.fixture
def worker() -> Iterator[NetnsWorker]:
    with NetnsWorker("test") as w:
        yield w


@pytest.fixture
def capture() -> Iterator[IptablesBackend]:
    """One backend for every agent in the process (python-iptables state is process-wide)."""
    with IptablesBackend() as backend:
        yield backend


@dataclass
class DemoApp:
    """A server in a pod: answers each connection with the client's IP, records peers."""

    peers: list[str] = field(default_factory=list)
    server: asyncio.AbstractServer | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[0]
        if peer.startswith("::ffff:"):
            peer = peer[7:]
        self.peers.append(peer)
        try:
            await reader.readline()
            writer.write(peer.encode() + b"\n")
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def start(self, worker: NetnsWorker, pod: Pod, port: int = APP_PORT) -> None:
        def make() -> socket.socket:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("::", port))
            sock.listen(512)
            sock.setblocking(False)
            return sock

        self.server = await asyncio.start_server(self._serve, sock=worker.call(pod.handle, make))

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def call(worker: NetnsWorker, pod: Pod, ip: str, port: int = APP_PORT) -> str:
    """Connect from inside `pod` like its app would (unmarked socket); the reply line."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = worker.call(pod.handle, socket.socket, family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        reader, writer = await asyncio.open_connection(sock=await _connected(sock, ip, port))
    except BaseException:
        sock.close()
        raise
    try:
        writer.write(b"hello\n")
        await writer.drain()
        line = await reader.readline()
    finally:
        writer.close()
    if not line.endswith(b"\n"):
        raise ConnectionError("connection ended without an answer")
    return line.decode().strip()


async def _connected(sock: socket.socket, ip: str, port: int) -> socket.socket:
    await asyncio.get_running_loop().sock_connect(sock, (ip, port))
    return sock


def listening_ports(ns: str) -> set[int]:
    out = in_ns(ns, "ss", "-Hltn")
    ports = set()
    for line in out.splitlines():
        local = line.split()[3]
        ports.add(int(local.rsplit(":", 1)[1]))
    return ports
