"""A pod namespace that appears after its workload record is captured at once, not at the
next periodic scan: the agent watches its netns dir (inotify). The periodic scan is set
to 30 s here, so only the watch can find the pods within the (generous) wait."""

from __future__ import annotations

import asyncio
import ipaddress
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from nodeagent import app
from nodeagent.config import Config
from nodeagent.datapath.iptables import IptablesBackend
from nodeagent.model.workload import Workload
from nodeagent.node.lifecycle import PodState
from nodeagent.state.store import StateBatch, StateStore

from .conftest import NODE, Topology, in_ns, listening_ports, sh

WAIT = 10.0  # well below the 30 s periodic scan; no timing is asserted
SCAN_INTERVAL = 30.0


@asynccontextmanager
async def agent(
    topology: Topology, store: StateStore, capture: IptablesBackend
) -> AsyncIterator[app.AgentHandles]:
    config = Config(
        node_name=NODE,
        netns_dir=str(topology.netns_dir),
        proc_root=str(topology.proc_root),
        drain_seconds=0.5,
    )
    handles = await app.build(
        config,
        store=store,
        capture=capture,
        xds=False,
        ca=False,
        admin=False,
        scan_interval=SCAN_INTERVAL,
    )
    handles.start()
    try:
        async with asyncio.timeout(WAIT):
            await handles.node_manager.wait_until(lambda: handles.node_manager.synced)
        yield handles
    finally:
        await handles.shutdown()


async def wait_state(handles: app.AgentHandles, uid: str, state: PodState) -> None:
    async with asyncio.timeout(WAIT):
        await handles.node_manager.wait_for_state(uid, state)


async def scanned(handles: app.AgentHandles) -> None:
    """Until one more namespace scan has run."""
    stats = handles.node_manager.stats
    before = stats.scans
    async with asyncio.timeout(WAIT):
        while stats.scans == before:  # noqa: ASYNC110 (a scan signals nothing to wait on)
            await asyncio.sleep(0.01)


async def test_namespace_made_after_its_workload_record_is_captured_without_the_periodic_scan(
    topology: Topology, capture: IptablesBackend
) -> None:
    a = topology.a
    link = topology.netns_dir / a.name
    link.unlink()  # pod A's namespace is not on the node yet
    store = StateStore()
    async with agent(topology, store, capture) as handles:
        store.apply(StateBatch(workloads=(a.workload(),)))
        await asyncio.sleep(0.2)  # the record's own scan finds nothing
        assert handles.node_manager.state_of(a.uid) is PodState.PENDING
        link.symlink_to(f"/var/run/netns/{a.name}")  # the runtime pins the new namespace
        await wait_state(handles, a.uid, PodState.READY)
        assert {15001, 15006, 15008} <= listening_ports(a.name)


async def test_namespace_given_its_address_after_it_appears_is_captured_by_a_follow_up(
    topology: Topology, capture: IptablesBackend
) -> None:
    """The runtime makes the namespace, then the CNI plugins give it an interface and its
    address: the event's own scan finds no address; the follow-up scans do."""
    name = f"nmlate{os.getpid() % 100000}"
    ip = topology.a.ip.rsplit(".", 1)[0] + ".9"
    late = Workload(
        uid="uid-late",
        name=name,
        namespace="default",
        addresses=(ipaddress.ip_address(ip),),
        node=NODE,
        service_account="sa-late",
    )
    store = StateStore()
    sh("ip", "netns", "add", name)
    try:
        async with agent(topology, store, capture) as handles:
            store.apply(StateBatch(workloads=(late,)))
            await scanned(handles)  # the record's scan
            (topology.netns_dir / name).symlink_to(f"/var/run/netns/{name}")
            await scanned(handles)  # the watch's: the namespace has no address yet
            assert handles.node_manager.state_of(late.uid) is PodState.PENDING
            sh("ip", "-n", name, "link", "add", "d0", "type", "veth", "peer", "name", "d1")
            sh("ip", "-n", name, "addr", "add", f"{ip}/32", "dev", "d0")
            sh("ip", "-n", name, "link", "set", "d0", "up")
            await wait_state(handles, late.uid, PodState.READY)
            assert "15001" in in_ns(name, "ss", "-Hltn")
    finally:
        sh("ip", "netns", "del", name)
