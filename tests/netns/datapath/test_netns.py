"""The namespace worker: enters, always returns home, works from asyncio."""

from __future__ import annotations

import pytest

from nodeagent.datapath.netns import NetnsWorker, current_inode

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
