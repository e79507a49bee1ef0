"""The namespace worker: enters, always returns home, works from asyncio."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nodeagent.datapath.netns import EXIT_STUCK_IN_POD, NetnsWorker, current_inode

from .conftest import Topology


async def test_worker_runs_inside_the_pod_and_returns_home_even_on_error(
    topology: Topology, worker: NetnsWorker
) -> None:
    home = worker.call(None, current_inode)
    assert await worker.run(topology.pod_a, current_inode) == topology.pod_a.inode
    assert worker.call(None, current_inode) == home

    def boom() -> None:
        raise ValueError("inside the pod")

    with pytest.raises(ValueError, match="inside the pod"):
        worker.call(topology.pod_b, boom)
    assert worker.call(None, current_inode) == home
    assert current_inode() == home  # the caller's thread never moved


_STUCK = """
import os, socket
from nodeagent.datapath.netns import socket_inside
pod = os.open("/proc/self/ns/net", os.O_RDONLY)
not_a_namespace = os.open("/dev/null", os.O_RDONLY)
socket_inside(pod, not_a_namespace, socket.AF_INET)
print("still running")
"""


def test_a_thread_that_cannot_return_home_ends_the_process() -> None:
    # The caller may be the event loop, which makes every pod's sockets: rather than make one
    # more in the wrong namespace, the process ends (and its supervisor starts a new one).
    run = subprocess.run([sys.executable, "-c", _STUCK], capture_output=True, text=True, timeout=60)
    assert run.returncode == EXIT_STUCK_IN_POD, (run.returncode, run.stderr)
    assert "still running" not in run.stdout
    assert "stuck in a pod's network namespace" in run.stderr
