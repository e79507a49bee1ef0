"""The real agent wiring (app.build: NodeManager, iptables, PodListeners, the handlers
without a tunnel) capturing two real pod namespaces, driven by a StateStore filled directly."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shlex
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from nodeagent import app
from nodeagent.config import Config
from nodeagent.datapath.capture import plan_from_addresses
from nodeagent.datapath.iptables import IptablesBackend
from nodeagent.datapath.netns import NetnsWorker
from nodeagent.model.constants import (
    INBOUND_HBONE_PORT,
    INBOUND_PLAINTEXT_PORT,
    OUTBOUND_PORT,
    REDIRECTION_ANNOTATION,
)
from nodeagent.model.enrollment import DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL
from nodeagent.model.workload import TunnelProtocol
from nodeagent.node.lifecycle import Backoff, PodState
from nodeagent.proxy.inbound import HboneUnavailable, InboundPlaintextHandler
from nodeagent.proxy.outbound import OutboundHandler
from nodeagent.state.store import StateBatch, StateStore

from .conftest import NODE, DemoApp, Topology, call, in_ns, listening_ports, sh

WAIT = 15.0

AMBIENT = {DATAPLANE_MODE_LABEL: DATAPLANE_MODE_AMBIENT}  # the namespace is enrolled


def relayed(handles: app.AgentHandles) -> dict[int, int]:
    """Connections relayed in plaintext, per listener port (no certificates: no tunnel)."""
    outbound, inbound = handles.listeners.handlers[OUTBOUND_PORT], plaintext(handles)
    assert isinstance(outbound, OutboundHandler)
    counts = {OUTBOUND_PORT: outbound.counts.get("passthrough", 0)}
    counts[INBOUND_PLAINTEXT_PORT] = inbound.stats.relayed
    return {port: n for port, n in counts.items() if n}


def plaintext(handles: app.AgentHandles) -> InboundPlaintextHandler:
    handler = handles.listeners.handlers[INBOUND_PLAINTEXT_PORT]
    assert isinstance(handler, InboundPlaintextHandler)
    return handler


def hbone_refused(handles: app.AgentHandles) -> int:
    handler = handles.listeners.handlers[INBOUND_HBONE_PORT]
    assert isinstance(handler, HboneUnavailable)
    return handler.refused


async def build_agent(
    topology: Topology, store: StateStore, capture: IptablesBackend, config: Config | None = None
) -> app.AgentHandles:
    """The real wiring for the topology's node; `config` (e.g. with an API server) or
    a plain one."""
    node = {
        "node_name": NODE,
        "netns_dir": str(topology.netns_dir),
        "proc_root": str(topology.proc_root),
        "drain_seconds": 0.5,
    }
    return await app.build(
        dataclasses.replace(config, **node) if config is not None else Config(**node),
        store=store,
        capture=capture,
        xds=False,
        ca=False,
        admin=False,  # no admin ports on the test host
        scan_interval=0.2,
        backoff=Backoff(initial=0.2, cap=0.5),
    )


@asynccontextmanager
async def agent(
    topology: Topology, store: StateStore, capture: IptablesBackend
) -> AsyncIterator[app.AgentHandles]:
    handles = await build_agent(topology, store, capture)
    handles.start()
    try:
        yield handles
    finally:
        await handles.shutdown()


async def wait_state(handles: app.AgentHandles, uid: str, state: PodState | None) -> None:
    async with asyncio.timeout(WAIT):
        await handles.node_manager.wait_for_state(uid, state)


async def test_outbound_connection_goes_through_the_agent_with_original_destination(
    topology: Topology, worker: NetnsWorker, capture: IptablesBackend
) -> None:
    a, b = topology.a, topology.b
    demo = DemoApp()
    await demo.start(worker, b)
    store = StateStore()
    try:
        async with agent(topology, store, capture) as handles:
            store.apply(StateBatch(workloads=(a.workload(), b.workload())))
            await wait_state(handles, a.uid, PodState.READY)
            await wait_state(handles, b.uid, PodState.READY)
            answer = await call(worker, a, b.ip)
            # The app saw pod A's address: the inbound side spoofed it transparently.
            assert answer == a.ip
            pods = handles.listeners.open_pods
            assert pods[a.uid].stats.accepted == {OUTBOUND_PORT: 1}
            assert pods[b.uid].stats.accepted == {INBOUND_PLAINTEXT_PORT: 1}
            assert relayed(handles) == {OUTBOUND_PORT: 1, INBOUND_PLAINTEXT_PORT: 1}
            assert plaintext(handles).stats.transparent == 1
            # IPv6 is captured too.
            assert await call(worker, a, b.ip6) == a.ip6
            assert pods[a.uid].stats.accepted == {OUTBOUND_PORT: 2}
            status = {p.uid: p for p in handles.node_manager.pods()}
            assert status[a.uid].listeners == (
                OUTBOUND_PORT,
                INBOUND_PLAINTEXT_PORT,
                INBOUND_HBONE_PORT,
            )
    finally:
        await demo.stop()


async def test_without_certificates_a_tunnel_destination_is_reached_in_plaintext(
    topology: Topology, worker: NetnsWorker, capture: IptablesBackend
) -> None:
    a, b = topology.a, topology.b
    demo = DemoApp()
    await demo.start(worker, b)
    store = StateStore()
    hbone_b = dataclasses.replace(b.workload(), tunnel_protocol=TunnelProtocol.HBONE)
    try:
        async with agent(topology, store, capture) as handles:
            store.apply(StateBatch(workloads=(a.workload(), hbone_b)))
            await wait_state(handles, a.uid, PodState.READY)
            await wait_state(handles, b.uid, PodState.READY)
            # B speaks HBONE, but an agent without certificates has no tunnel: the original
            # destination in plaintext, captured again on B's side.
            assert await call(worker, a, b.ip) == a.ip
            assert relayed(handles) == {OUTBOUND_PORT: 1, INBOUND_PLAINTEXT_PORT: 1}
            assert handles.pool is None
    finally:
        await demo.stop()


async def test_connection_to_the_agents_own_port_is_refused_not_looped(
    topology: Topology, worker: NetnsWorker, capture: IptablesBackend
) -> None:
    a, b = topology.a, topology.b
    store = StateStore()
    async with agent(topology, store, capture) as handles:
        store.apply(StateBatch(workloads=(a.workload(), b.workload())))
        await wait_state(handles, b.uid, PodState.READY)
        await wait_state(handles, a.uid, PodState.READY)
        # podB:15008 is not redirected; with no tunnel yet the agent closes it (fail closed).
        try:
            await call(worker, a, b.ip, INBOUND_HBONE_PORT)
            raise AssertionError("a connection to 15008 was answered")
        except (ConnectionError, OSError):
            pass
        assert hbone_refused(handles) == 1


async def test_removed_workload_is_held_refused_and_release_removes_every_rule_and_listener(
    topology: Topology, worker: NetnsWorker, capture: IptablesBackend
) -> None:
    """Losing the record closes the listeners but keeps the rules: a's connections are
    refused by the kernel (nothing listens behind the redirect), never sent out in clear.
    Only the explicit release removes every rule, route and listener."""
    a, b = topology.a, topology.b
    rules_before = in_ns(a.name, "ip", "rule")
    rules6_before = in_ns(a.name, "ip", "-6", "rule")
    store = StateStore()
    async with agent(topology, store, capture) as handles:
        store.apply(StateBatch(workloads=(a.workload(),)))
        await wait_state(handles, a.uid, PodState.READY)
        assert "ISTIO_OUTPUT" in in_ns(a.name, "iptables-legacy-save")
        assert "ISTIO_OUTPUT" in in_ns(a.name, "ip6tables-legacy-save")
        assert "lookup 100" in in_ns(a.name, "ip", "rule")
        assert {OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_HBONE_PORT} <= listening_ports(
            a.name
        )

        store.apply(StateBatch(removed_addresses=(a.uid,)))
        await wait_state(handles, a.uid, PodState.HELD)
        assert "ISTIO_OUTPUT" in in_ns(a.name, "iptables-legacy-save")
        assert "lookup 100" in in_ns(a.name, "ip", "rule")
        assert listening_ports(a.name) == set()
        with pytest.raises(ConnectionRefusedError):
            await call(worker, a, b.ip)
        handles.node_manager.release(a.uid)
        await wait_state(handles, a.uid, None)
        for save in ("iptables-legacy-save", "ip6tables-legacy-save"):
            text = in_ns(a.name, save)
            assert not [line for line in text.splitlines() if line.startswith("-A")], text
            assert "ISTIO" not in text
        assert in_ns(a.name, "ip", "rule") == rules_before
        assert in_ns(a.name, "ip", "-6", "rule") == rules6_before
        assert in_ns(a.name, "ip", "route", "show", "table", "100") == ""
        assert listening_ports(a.name) == set()
        assert capture.read_installed(a.handle).empty


async def test_restart_never_lets_a_connection_bypass_the_agent(
    topology: Topology, worker: NetnsWorker, capture: IptablesBackend
) -> None:
    a, b = topology.a, topology.b
    demo = DemoApp()
    await demo.start(worker, b)
    store = StateStore()
    store.apply(StateBatch(workloads=(a.workload(), b.workload())))
    successes = failures = 0
    stop = asyncio.Event()
    progress = asyncio.Event()

    async def client() -> None:
        nonlocal successes, failures
        while not stop.is_set():
            try:
                async with asyncio.timeout(2):
                    answer = await call(worker, a, b.ip)
                assert answer == a.ip
                successes += 1
                progress.set()
            except (OSError, ConnectionError, TimeoutError):
                failures += 1
                await asyncio.sleep(0.01)

    async def wait_successes(n: int) -> None:
        target = successes + n
        async with asyncio.timeout(WAIT):
            while successes < target:
                progress.clear()
                await progress.wait()

    agents: list[app.AgentHandles] = []
    loop_task: asyncio.Task[None] | None = None
    try:
        async with contextlib.AsyncExitStack() as stack:
            old = await stack.enter_async_context(agent(topology, store, capture))
            agents.append(old)
            await wait_state(old, a.uid, PodState.READY)
            await wait_state(old, b.uid, PodState.READY)
            loop_task = asyncio.create_task(client(), name="client-loop")
            await wait_successes(20)

            # Rolling update: the new agent starts while the old one still serves
            # (SO_REUSEPORT), adopts the rules, then the old one stops (rules stay).
            async with agent(topology, store, capture) as new:
                agents.append(new)
                await wait_state(new, a.uid, PodState.READY)
                await wait_state(new, b.uid, PodState.READY)
                assert new.node_manager.stats.adopted == 2
                await old.shutdown()
                await wait_successes(20)
            # Now no agent at all for a moment: connections are refused, not leaked.
            await asyncio.sleep(0.3)
            async with agent(topology, store, capture) as third:
                agents.append(third)
                await wait_state(third, a.uid, PodState.READY)
                await wait_state(third, b.uid, PodState.READY)
                assert third.node_manager.stats.adopted == 2
                await wait_successes(20)
                stop.set()
                await loop_task
    finally:
        stop.set()
        if loop_task is not None and not loop_task.done():
            loop_task.cancel()
            await asyncio.gather(loop_task, return_exceptions=True)
        await demo.stop()
    through_agents = sum(h.listeners.totals.accepted.get(OUTBOUND_PORT, 0) for h in agents)
    # Every answered connection was accepted by some agent's 15001 in pod A.
    assert successes >= 60
    assert successes <= through_agents, (successes, failures, through_agents)
    print(f"restart: {successes} answered, {failures} refused, {through_agents} via 15001")
    assert set(demo.peers) == {a.ip}


async def test_port_already_taken_fails_naming_it_then_recovers(
    topology: Topology, worker: NetnsWorker, capture: IptablesBackend
) -> None:
    a = topology.a

    def blocker() -> socket.socket:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", OUTBOUND_PORT))  # no SO_REUSEPORT: the agent cannot share it
        sock.listen(1)
        return sock

    taken = worker.call(a.handle, blocker)
    store = StateStore()
    try:
        async with agent(topology, store, capture) as handles:
            store.apply(StateBatch(workloads=(a.workload(),)))
            await wait_state(handles, a.uid, PodState.FAILED)
            [status] = handles.node_manager.pods()
            assert str(OUTBOUND_PORT) in status.last_error
            assert "in use" in status.last_error
            # Nothing half-applied: no rules towards a port the agent does not serve.
            assert capture.read_installed(a.handle).empty
            assert INBOUND_PLAINTEXT_PORT not in listening_ports(a.name)
            taken.close()
            await wait_state(handles, a.uid, PodState.READY)
            assert not capture.read_installed(a.handle).empty
            assert handles.node_manager.pods()[0].attempts >= 2
    finally:
        taken.close()


def test_relay_works_under_uvloop_as_nodeagent_run_uses_it(
    topology: Topology, worker: NetnsWorker, capture: IptablesBackend
) -> None:
    uvloop = pytest.importorskip("uvloop")
    a, b = topology.a, topology.b

    async def scenario() -> str:
        demo = DemoApp()
        await demo.start(worker, b)
        store = StateStore()
        try:
            async with agent(topology, store, capture) as handles:
                store.apply(StateBatch(workloads=(a.workload(), b.workload())))
                await wait_state(handles, a.uid, PodState.READY)
                await wait_state(handles, b.uid, PodState.READY)
                async with asyncio.timeout(WAIT):
                    answer = await call(worker, a, b.ip)
                assert relayed(handles) == {OUTBOUND_PORT: 1, INBOUND_PLAINTEXT_PORT: 1}
                return answer
        finally:
            await demo.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(scenario()) == a.ip


async def test_deleted_pod_namespace_is_let_go_and_the_pod_waits_for_a_new_one(
    topology: Topology, worker: NetnsWorker, capture: IptablesBackend
) -> None:
    a = topology.a
    store = StateStore()
    async with agent(topology, store, capture) as handles:
        store.apply(StateBatch(workloads=(a.workload(),)))
        await wait_state(handles, a.uid, PodState.READY)
        # The pod is deleted before its workload record: the namespace goes away
        # (our listeners were the last thing holding it).
        await asyncio.to_thread(sh, "ip", "netns", "del", a.name)
        await wait_state(handles, a.uid, PodState.PENDING)
        assert a.uid not in handles.listeners.open_pods
        assert handles.node_manager.stats.teardown_failures == 0
        [status] = handles.node_manager.pods()
        assert (status.state, status.listeners) == ("pending", ())


async def test_capture_left_in_a_pod_without_a_record_is_held_until_released(
    topology: Topology, capture: IptablesBackend
) -> None:
    """A previous agent captured both pods; while no agent ran, pod a's record went. The new
    agent keeps a's rules (refused, never in clear) and lists it held; the release removes
    them and keeps b's."""
    a, b = topology.a, topology.b
    for pod in (a, b):
        capture.apply(pod.handle, plan_from_addresses(pod.workload(), pod.handle))
        assert "ISTIO_OUTPUT" in in_ns(pod.name, "iptables-legacy-save")
    store = StateStore()
    store.apply(StateBatch(workloads=(b.workload(),)))  # a is no longer in the mesh
    async with agent(topology, store, capture) as handles:
        await wait_state(handles, b.uid, PodState.READY)
        assert await handles.node_manager.hold_stale_capture() == 1
        assert "ISTIO_OUTPUT" in in_ns(a.name, "iptables-legacy-save")
        [key] = [p.uid for p in handles.node_manager.pods() if p.state == "held"]
        handles.node_manager.release(key)
        await wait_state(handles, key, None)
        for save in ("iptables-legacy-save", "ip6tables-legacy-save"):
            assert "ISTIO" not in in_ns(a.name, save)
            assert "ISTIO_OUTPUT" in in_ns(b.name, save)
        assert "lookup 100" not in in_ns(a.name, "ip", "rule")
        assert "lookup 100" in in_ns(b.name, "ip", "rule")
        assert capture.read_installed(a.handle).empty
        assert handles.node_manager.state_of(b.uid) is PodState.READY
        # Nothing left to hold: a second sweep changes nothing.
        assert await handles.node_manager.hold_stale_capture() == 0
        assert handles.node_manager.stats.stale_held == 1


@pytest.mark.parametrize("daemonset", ["present", "gone"])
async def test_sigterm_upgrade_keeps_every_rule_and_uninstall_leaves_none_in_any_pod(
    topology: Topology, capture: IptablesBackend, kube_api_server: Any, daemonset: str
) -> None:
    """The real agent, real rules in two pod namespaces, the DaemonSet read at stop: with
    the DaemonSet there (an upgrade) everything stays for the next agent; with it gone
    (an uninstall) no chain, policy rule, route or annotation is left in any pod."""
    pods = (topology.a, topology.b)
    async with kube_api_server() as api:
        api.add_namespace("default", AMBIENT)
        for pod in pods:
            api.add_pod("default", pod.name, node=NODE)
        if daemonset == "present":
            api.add_daemonset("istio-system", "nodeagent")
        store = StateStore()
        handles = await build_agent(topology, store, capture, api.config())
        runner = asyncio.create_task(handles.run())
        store.apply(StateBatch(workloads=tuple(pod.workload() for pod in pods)))
        for pod in pods:
            await wait_state(handles, pod.uid, PodState.READY)
        async with asyncio.timeout(WAIT):
            await api.wait_until(
                lambda: all(
                    api.annotations_of("default", p.name).get(REDIRECTION_ANNOTATION) == "enabled"
                    for p in pods
                )
            )
        handles.stop()
        async with asyncio.timeout(WAIT):
            await runner
        for pod in pods:
            v4, v6 = (
                in_ns(pod.name, "iptables-legacy-save"),
                in_ns(pod.name, "ip6tables-legacy-save"),
            )
            rules = in_ns(pod.name, "ip", "rule")
            table = in_ns(pod.name, "ip", "route", "show", "table", "100")
            annotation = api.annotations_of("default", pod.name).get(REDIRECTION_ANNOTATION)
            if daemonset == "present":
                assert "ISTIO_OUTPUT" in v4 and "ISTIO_OUTPUT" in v6
                assert "lookup 100" in rules and table
                assert annotation == "enabled"
            else:
                assert "ISTIO" not in v4 and "ISTIO" not in v6, (pod.name, v4, v6)
                assert "lookup 100" not in rules and table == ""
                assert capture.read_installed(pod.handle).empty
                assert annotation is None
            assert listening_ports(pod.name) == set()
        if daemonset == "present":
            for pod in pods:  # leave the namespaces as the fixture made them
                capture.remove(pod.handle)


async def test_rule_deleted_by_hand_is_put_back_and_reported(
    topology: Topology, worker: NetnsWorker, capture: IptablesBackend
) -> None:
    """Someone deletes one of the agent's rules inside a ready pod: the periodic check
    re-applies the plan, says so in the pod's last error and counts the repair."""
    a = topology.a
    store = StateStore()
    config = Config(node_name=NODE, capture_check_interval=0.3)
    handles = await build_agent(topology, store, capture, config)
    handles.start()
    try:
        store.apply(StateBatch(workloads=(a.workload(),)))
        await wait_state(handles, a.uid, PodState.READY)
        table, rule = "", ""
        for line in in_ns(a.name, "iptables-legacy-save").splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith("-A ISTIO_OUTPUT"):
                rule = line
                break
        assert rule, "no ISTIO_OUTPUT rule installed"
        delete = ["iptables-legacy", "-t", table, "-D", *shlex.split(rule)[1:]]
        in_ns(a.name, *delete)
        assert rule not in in_ns(a.name, "iptables-legacy-save")
        async with asyncio.timeout(WAIT):
            await handles.node_manager.wait_until(lambda: handles.node_manager.stats.repairs >= 1)
        assert rule in in_ns(a.name, "iptables-legacy-save")
        [status] = handles.node_manager.pods()
        assert status.state == "ready" and "drifted" in status.last_error
    finally:
        await handles.shutdown()
