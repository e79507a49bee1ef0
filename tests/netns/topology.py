"""The one way netns tests build their sandboxes: two pods behind a node namespace.

    pod A (<dev_a> 10.<A>.K.2) <-> (na .1) node (nb 10.<B>.K.1) <-> (<dev_b> 10.<B>.K.2) pod B

plus, with `ipv6=True`, fd00:<A>:K::/64 and fd00:<B>:K::/64 the same way. Each
test directory picks its own subnets (<A>, <B>) and name tag; names carry this
process's pid so concurrent runs never collide. Everything is removed on exit.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest


def sh(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(args)}: {done.stderr}"
    return done.stdout


def in_ns(name: str, *args: str) -> str:
    return sh("ip", "netns", "exec", name, *args)


@dataclass(frozen=True)
class PodPair:
    a: str  # /var/run/netns names
    node: str
    b: str
    ip_a: str
    ip_b: str
    ip6_a: str  # "" without IPv6
    ip6_b: str


@contextmanager
def two_pods(
    tag: str, subnets: tuple[int, int], *, devs: tuple[str, str] = ("a0", "b0"), ipv6: bool
) -> Iterator[PodPair]:
    if os.geteuid() != 0:
        pytest.skip("netns tests need root")
    tag = f"{tag}{os.getpid() % 100000}"
    k = os.getpid() % 250
    a, n, b = f"{tag}a", f"{tag}n", f"{tag}b"
    made: list[str] = []
    try:
        for name in (a, n, b):
            sh("ip", "netns", "add", name)
            made.append(name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        for pod, dev, peer, side in (
            (a, devs[0], "na", subnets[0]),
            (b, devs[1], "nb", subnets[1]),
        ):
            sh(
                "ip",
                "-n",
                pod,
                "link",
                "add",
                dev,
                "type",
                "veth",
                "peer",
                "name",
                peer,
                "netns",
                n,
            )
            for ns, ifname, host in ((pod, dev, 2), (n, peer, 1)):
                sh("ip", "-n", ns, "addr", "add", f"10.{side}.{k}.{host}/24", "dev", ifname)
                if ipv6:
                    sh(
                        "ip",
                        "-n",
                        ns,
                        "-6",
                        "addr",
                        "add",
                        f"fd00:{side}:{k}::{host}/64",
                        "dev",
                        ifname,
                        "nodad",
                    )
                sh("ip", "-n", ns, "link", "set", ifname, "up")
            sh("ip", "-n", pod, "route", "add", "default", "via", f"10.{side}.{k}.1")
            if ipv6:
                sh("ip", "-n", pod, "-6", "route", "add", "default", "via", f"fd00:{side}:{k}::1")
        in_ns(n, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        if ipv6:
            in_ns(n, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        # Canonical text (k = 0 is written "fd00:N::2"), as the sockets report addresses.
        v6 = (
            (_v6(f"fd00:{subnets[0]}:{k}::2"), _v6(f"fd00:{subnets[1]}:{k}::2"))
            if ipv6
            else ("", "")
        )
        yield PodPair(a, n, b, f"10.{subnets[0]}.{k}.2", f"10.{subnets[1]}.{k}.2", *v6)
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def _v6(text: str) -> str:
    return str(ipaddress.IPv6Address(text))
