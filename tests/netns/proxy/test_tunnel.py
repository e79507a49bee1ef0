"""Pod A -> pod B through the real capture and HBONE: outbound 15001 in pod A, the 15008 server
in pod B, both served by this test process with sockets made inside the pod namespaces."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
from collections.abc import AsyncIterator

from nodeagent.datapath.iptables import IptablesBackend
from nodeagent.datapath.netns import NetnsHandle, NetnsSocketFactory, NetnsWorker
from nodeagent.datapath.plan import build_plan
from nodeagent.model.identity import Identity
from nodeagent.model.workload import Workload
from nodeagent.policy.checker import PolicyChecker
from nodeagent.proxy.connections import ConnectionRegistry, store_policy_lookup
from nodeagent.proxy.inbound import InboundHboneHandler, InboundPlaintextHandler
from nodeagent.proxy.listeners import LocalPod, PodListeners
from nodeagent.proxy.outbound import OutboundHandler
from nodeagent.proxy.pool import HbonePool
from nodeagent.proxy.tunnel_end import WorkloadTls
from nodeagent.state.store import StateBatch, StateStore
from tests.builders import FakeCertificates
from tests.builders import workload as build_workload

SECRET = "payload-that-must-not-appear-on-the-wire"


def workload(uid: str, ns: str, sa: str, ip: str) -> Workload:
    return build_workload(uid, ip, namespace=ns, hbone=True, service_account=sa)


@contextlib.asynccontextmanager
async def http_app(worker: NetnsWorker, ns: NetnsHandle, port: int) -> AsyncIterator[list[str]]:
    """A tiny HTTP server inside `ns` (an app socket: no mark) answering with the caller's IP."""

    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen()
        s.setblocking(False)
        return s

    callers: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        caller = writer.get_extra_info("peername")[0]
        callers.append(caller)
        await reader.readuntil(b"\r\n\r\n")
        body = f"{SECRET} you are {caller}\n".encode()
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, sock=worker.call(ns, make))
    try:
        yield callers
    finally:
        server.close()
        await server.wait_closed()


@contextlib.contextmanager
def capture(node: str, path: str):  # type: ignore[no-untyped-def]
    """tcpdump (packets as text, payload included) on the node's interfaces while the body runs."""
    out = open(path, "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        ["ip", "netns", "exec", node, "tcpdump", "-l", "-n", "-A", "-i", "any", "tcp"],
        stdout=out,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        seen = ""
        while "listening" not in seen:  # "listening on any ..." once the capture runs
            line = proc.stderr.readline()
            assert line, f"tcpdump did not start: {seen}"
            seen += line
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out.close()


async def test_http_from_pod_a_to_pod_b_travels_as_hbone(pods, worker, ca, caplog, tmp_path):
    id_a = Identity("cluster.local", "ns-a", "client")
    id_b = Identity("cluster.local", "ns-b", "server")
    wl_a = workload("pod-a", "ns-a", "client", pods.ip_a)
    wl_b = workload("pod-b", "ns-b", "server", pods.ip_b)
    store = StateStore()
    store.apply(StateBatch(workloads=(wl_a, wl_b)))

    with IptablesBackend(worker) as backend:
        plan = build_plan()
        backend.apply(pods.pod_a, plan)
        backend.apply(pods.pod_b, plan)

    tls = WorkloadTls(FakeCertificates(ca))
    checker = PolicyChecker(store_policy_lookup(store))
    registry = ConnectionRegistry(checker)
    pool = HbonePool(tls)
    hbone = InboundHboneHandler(tls, checker, registry)
    outbound = OutboundHandler(store, pool, registry)
    handlers = {
        15001: outbound,
        15006: InboundPlaintextHandler(checker, registry),
        15008: hbone,
    }
    pod_a = LocalPod.from_workload(wl_a, pods.pod_a, NetnsSocketFactory(pods.pod_a, worker))
    pod_b = LocalPod.from_workload(wl_b, pods.pod_b, NetnsSocketFactory(pods.pod_b, worker))
    listeners = [PodListeners(pod_a, handlers), PodListeners(pod_b, handlers)]
    caplog.set_level("DEBUG", logger="nodeagent.hbone.server")
    wire_log = str(tmp_path / "node.txt")
    try:
        for pl in listeners:
            await pl.open()
        async with http_app(worker, pods.pod_b, 8080) as callers:
            with capture(pods.name_node, wire_log):
                curl = await asyncio.create_subprocess_exec(
                    *("ip", "netns", "exec", pods.name_a, "curl", "-sS", "--max-time", "10"),
                    f"http://{pods.ip_b}:8080/",
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                out, err = await asyncio.wait_for(curl.communicate(), 20)
                peers = [c.peer_identity for c in pool.connections()]
                await asyncio.sleep(0.2)  # let tcpdump write the last packets
    finally:
        for pl in listeners:
            await pl.close()
        await pool.close()

    assert curl.returncode == 0, err.decode()
    # The app in pod B saw pod A's own address: the 15008 server connected transparently.
    assert out.decode() == f"{SECRET} you are {pods.ip_a}\n"
    assert callers == [pods.ip_a]
    # It arrived through the tunnel: captured on 15001 in A, served by 15008 in B.
    assert outbound.counts.get("hbone") == 1
    assert hbone.stats.relayed == 1 and hbone.stats.transparent == 1
    assert pool.connections_opened == 1
    assert f"as {id_a}" in caplog.text  # the server saw pod A's SPIFFE identity
    assert peers == [id_b]  # and the client checked pod B's

    # On the wire between the pods: only port 15008, and never the payload in clear.
    wire = (tmp_path / "node.txt").read_bytes().decode("latin-1")
    assert f"{pods.ip_b}.15008" in wire
    assert f"{pods.ip_b}.8080" not in wire
    assert SECRET not in wire


async def test_unknown_destination_is_passed_through_from_the_pod(pods, worker, ca):
    """Route (c): a destination the mesh does not know goes out as plain TCP from pod A's
    namespace (marked, so pod A's capture does not take it again)."""
    wl_a = workload("pod-a", "ns-a", "client", pods.ip_a)
    store = StateStore()
    store.apply(StateBatch(workloads=(wl_a,)))
    with IptablesBackend(worker) as backend:
        backend.apply(pods.pod_a, build_plan())
    tls = WorkloadTls(FakeCertificates(ca))
    checker = PolicyChecker(store_policy_lookup(store))
    registry = ConnectionRegistry(checker)
    pool = HbonePool(tls)
    outbound = OutboundHandler(store, pool, registry)
    handlers = {
        15001: outbound,
        15006: InboundPlaintextHandler(checker, registry),
        15008: InboundHboneHandler(tls, checker, registry),
    }
    pod_a = LocalPod.from_workload(wl_a, pods.pod_a, NetnsSocketFactory(pods.pod_a, worker))
    listeners = PodListeners(pod_a, handlers)
    # Pod B is not in the mesh here: a plain server there is "anything else".
    try:
        await listeners.open()
        async with http_app(worker, pods.pod_b, 8081) as callers:
            curl = await asyncio.create_subprocess_exec(
                *("ip", "netns", "exec", pods.name_a, "curl", "-sS", "--max-time", "10"),
                f"http://{pods.ip_b}:8081/",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(curl.communicate(), 20)
    finally:
        await listeners.close()
        await pool.close()
    assert curl.returncode == 0, err.decode()
    assert out.decode() == f"{SECRET} you are {pods.ip_a}\n"
    assert callers == [pods.ip_a]
    assert outbound.counts == {"passthrough": 1}  # through 15001, not a direct connection
    assert pool.connections_opened == 0
