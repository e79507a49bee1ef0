"""Two pods behind a node namespace, a demo app in pod B, and helpers to run agents.

    pod A (a0 10.241.K.2) <-> (na .1) node (nb 10.242.K.1) <-> (b0 10.242.K.2) pod B

plus IPv6 fd00:241:K::/64 and fd00:242:K::/64. Names carry this process's pid
so concurrent runs never collide. The agent's scanner sees only this test's
two pods: `netns_dir` holds symlinks to them, `proc_root` is empty.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nodeagent.datapath.iptables import IptablesBackend
from nodeagent.datapath.netns import NetnsHandle, NetnsWorker, resolve
from nodeagent.model.workload import Workload
from tests.netns.topology import in_ns, sh, two_pods

__all__ = ["in_ns", "sh"]  # tests import them from here

NODE = "node1"
APP_PORT = 8080


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
    with two_pods("nm", (241, 242), ipv6=True) as p:
        netns_dir = tmp_path / "netns"
        netns_dir.mkdir()
        proc_root = tmp_path / "proc"
        proc_root.mkdir()
        for name in (p.a, p.b):
            (netns_dir / name).symlink_to(f"/var/run/netns/{name}")
        pod_a = Pod(p.a, "uid-a", p.ip_a, p.ip6_a, resolve(str(netns_dir / p.a)))
        pod_b = Pod(p.b, "uid-b", p.ip_b, p.ip6_b, resolve(str(netns_dir / p.b)))
        yield Topology(pod_a, pod_b, netns_dir, proc_root)


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
