"""A two-pod topology for datapath tests, removed at teardown.

    pod A (a0 10.237.K.2) <-> (na .1) node (nb 10.238.K.1) <-> (b0 10.238.K.2) pod B

plus IPv6 fd00:237:K::/64 and fd00:238:K::/64 the same way.

Names carry this process's pid so concurrent runs never collide.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from nodeagent.datapath.netns import NetnsHandle, NetnsWorker, resolve
from tests.netns.topology import in_ns, two_pods

__all__ = ["in_ns"]  # tests import it from here


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


@pytest.fixture
def topology() -> Iterator[Topology]:
    with two_pods("dp", (237, 238), ipv6=True) as p:
        yield Topology(resolve(p.a), resolve(p.b), p.a, p.b, p.ip_a, p.ip_b, p.ip6_a, p.ip6_b)


@pytest.fixture
def worker() -> Iterator[NetnsWorker]:
    with NetnsWorker("test") as w:
        yield w
