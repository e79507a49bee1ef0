"""Two pods behind a router namespace (a "node"), removed at teardown.

    pod A (pa0 10.239.K.2) <-> (n 10.239.K.1) node (n 10.240.K.1) <-> (pb0 10.240.K.2) pod B

Names carry this process's pid so concurrent runs never collide.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from nodeagent.controlplane.ca import CertificateAuthority
from nodeagent.datapath.netns import NetnsHandle, NetnsWorker, resolve


@dataclass(frozen=True)
class Pods:
    pod_a: NetnsHandle
    pod_b: NetnsHandle
    name_a: str
    name_b: str
    name_node: str
    ip_a: str
    ip_b: str


def sh(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(args)}: {done.stderr}"
    return done.stdout


@pytest.fixture
def pods() -> Iterator[Pods]:
    if os.geteuid() != 0:
        pytest.skip("netns tests need root")
    tag = f"px{os.getpid() % 100000}"
    k = os.getpid() % 250
    a, n, b = f"{tag}a", f"{tag}n", f"{tag}b"
    ip_a, ip_b = f"10.239.{k}.2", f"10.240.{k}.2"
    made: list[str] = []
    try:
        for name in (a, n, b):
            sh("ip", "netns", "add", name)
            made.append(name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "-n", a, "link", "add", "pa0", "type", "veth", "peer", "name", "na", "netns", n)
        sh("ip", "-n", b, "link", "add", "pb0", "type", "veth", "peer", "name", "nb", "netns", n)
        for ns, dev, addr in (
            (a, "pa0", ip_a),
            (n, "na", f"10.239.{k}.1"),
            (n, "nb", f"10.240.{k}.1"),
            (b, "pb0", ip_b),
        ):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", a, "route", "add", "default", "via", f"10.239.{k}.1")
        sh("ip", "-n", b, "route", "add", "default", "via", f"10.240.{k}.1")
        sh("ip", "netns", "exec", n, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        yield Pods(resolve(a), resolve(b), a, b, n, ip_a, ip_b)
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


@pytest.fixture
def worker() -> Iterator[NetnsWorker]:
    with NetnsWorker("proxy-test") as w:
        yield w


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("cluster.local")
