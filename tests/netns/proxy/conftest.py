"""Two pods behind a router namespace (a "node"), removed at teardown.

    pod A (pa0 10.239.K.2) <-> (n 10.239.K.1) node (n 10.240.K.1) <-> (pb0 10.240.K.2) pod B

Names carry this process's pid so concurrent runs never collide.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from nodeagent.controlplane.ca import CertificateAuthority
from nodeagent.datapath.netns import NetnsHandle, NetnsWorker, resolve
from tests.netns.topology import two_pods


@dataclass(frozen=True)
class Pods:
    pod_a: NetnsHandle
    pod_b: NetnsHandle
    name_a: str
    name_b: str
    name_node: str
    ip_a: str
    ip_b: str


@pytest.fixture
def pods() -> Iterator[Pods]:
    with two_pods("px", (239, 240), devs=("pa0", "pb0"), ipv6=False) as p:
        yield Pods(resolve(p.a), resolve(p.b), p.a, p.b, p.node, p.ip_a, p.ip_b)


@pytest.fixture
def worker() -> Iterator[NetnsWorker]:
    with NetnsWorker("proxy-test") as w:
        yield w


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("cluster.local")
