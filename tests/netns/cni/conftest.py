"""Namespaces for the CNI chain tests: a "node" the plugins run in and a pod. Names carry
this process's pid; both are deleted at teardown whatever the test did."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.netns.topology import sh


@dataclass(frozen=True)
class Namespaces:
    node: str
    pod: str

    @property
    def pod_path(self) -> str:
        return f"/var/run/netns/{self.pod}"


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    if os.geteuid() != 0:
        pytest.skip("netns tests need root")
    tag = f"cni{os.getpid() % 100000}"
    made: list[str] = []
    try:
        for name in (f"{tag}n", f"{tag}p"):
            sh("ip", "netns", "add", name)
            made.append(name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        yield Namespaces(node=made[0], pod=made[1])
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
