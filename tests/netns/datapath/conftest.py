"""A two-pod topology for datapath tests, removed at teardown.

    pod A (a0 10.237.K.2) <-> (na .1) node (nb 10.238.K.1) <-> (b0 10.238.K.2) pod B

plus IPv6 fd00:237:K::/64 and fd00:238:K::/64 the same way.

Names carry this process's pid so concurrent runs never collide.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from nodeagent.datapath.netns import NetnsHandle, NetnsWorker, resolve


@dataclass(frozen=True)
class Topology:
    pod_a: NetnsHandle
    pod_b: NetnsHandle
    name_a: str
    name_b: str
    ip_a: str
    ip_b: str
    ip6_a: str
    ip6_b: str


def sh(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(args)}: {done.stderr}"
    return done.stdout


def in_ns(name: str, *args: str) -> str:
    return sh("ip", "netns", "exec", name, *args)


@pytest.fixture
def topology() -> Iterator[Topology]:
    if os.geteuid() != 0:
        pytest.skip("netns tests need root")
    tag = f"dp{os.getpid() % 100000}"
    k = os.getpid() % 250
    a, n, b = f"{tag}a", f"{tag}n", f"{tag}b"
    ip_a, ip_b = f"10.237.{k}.2", f"10.238.{k}.2"
    made: list[str] = []
    try:
        for name in (a, n, b):
            sh("ip", "netns", "add", name)
            made.append(name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "-n", a, "link", "add", "a0", "type", "veth", "peer", "name", "na", "netns", n)
        sh("ip", "-n", b, "link", "add", "b0", "type", "veth", "peer", "name", "nb", "netns", n)
        for ns, dev, addr in (
            (a, "a0", ip_a),
            (n, "na", f"10.237.{k}.1"),
            (n, "nb", f"10.238.{k}.1"),
            (b, "b0", ip_b),
        ):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        for ns, dev, addr in (
            (a, "a0", f"fd00:237:{k}::2"),
            (n, "na", f"fd00:237:{k}::1"),
            (n, "nb", f"fd00:238:{k}::1"),
            (b, "b0", f"fd00:238:{k}::2"),
        ):
            sh("ip", "-n", ns, "-6", "addr", "add", f"{addr}/64", "dev", dev, "nodad")
        sh("ip", "-n", a, "-6", "route", "add", "default", "via", f"fd00:237:{k}::1")
        sh("ip", "-n", b, "-6", "route", "add", "default", "via", f"fd00:238:{k}::1")
        in_ns(n, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        sh("ip", "-n", a, "route", "add", "default", "via", f"10.237.{k}.1")
        sh("ip", "-n", b, "route", "add", "default", "via", f"10.238.{k}.1")
        in_ns(n, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        yield Topology(
            resolve(a), resolve(b), a, b, ip_a, ip_b, f"fd00:237:{k}::2", f"fd00:238:{k}::2"
        )
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


@pytest.fixture
def worker() -> Iterator[NetnsWorker]:
    with NetnsWorker("test") as w:
        yield w
