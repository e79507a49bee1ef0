"""15006 plaintext inbound over loopback: authorized without identity, STRICT refuses it, and a
policy change applied to the StateStore closes a live connection."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from nodeagent.datapath.netns import NetnsHandle
from nodeagent.model.identity import Identity
from nodeagent.model.policy import (
    Action,
    Authorization,
    Clause,
    Match,
    Rule,
    Scope,
    StringMatch,
)
from nodeagent.model.workload import TunnelProtocol, Workload
from nodeagent.policy.checker import PolicyChecker
from nodeagent.proxy.connections import ConnectionRegistry, store_policy_lookup
from nodeagent.proxy.inbound import InboundPlaintextHandler
from nodeagent.proxy.listeners import LocalPod
from nodeagent.state.store import StateBatch, StateStore
from tests.builders import loopback_acceptor

LOOPBACK = "127.0.0.1"
ID_B = Identity("cluster.local", "ns-b", "server")
# What istiod sends for PeerAuthentication STRICT: deny anything without an mTLS identity.
STRICT = Authorization(
    name="istio_converted_static_strict",
    namespace="istio-system",
    scope=Scope.WORKLOAD_SELECTOR,
    action=Action.DENY,
    rules=(Rule((Clause((Match(not_principals=(StringMatch.presence(),)),)),)),),
)


class LoopbackSockets:
    netns = NetnsHandle(path="/proc/self/ns/net")

    def listener(self, port: int, *, backlog: int = 1024) -> socket.socket:
        raise NotImplementedError

    def upstream(self, family: socket.AddressFamily) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        return sock

    def close(self) -> None:
        pass


POD = LocalPod(
    uid="uid-b",
    namespace="ns-b",
    name="b",
    identity=ID_B,
    addresses=(ipaddress.ip_address(LOOPBACK),),
    netns=LoopbackSockets.netns,
    sockets=LoopbackSockets(),
)


def pod_workload(*policies: str) -> Workload:
    return Workload(
        uid="uid-b",
        name="b",
        namespace="ns-b",
        addresses=(ipaddress.ip_address(LOOPBACK),),
        tunnel_protocol=TunnelProtocol.HBONE,
        service_account="server",
        authorization_policies=policies,
    )


@dataclass
class Setup:
    store: StateStore
    registry: ConnectionRegistry
    handler: InboundPlaintextHandler
    listen: tuple[str, int]
    app_peers: list[tuple[str, int]] = field(default_factory=list)


@contextlib.asynccontextmanager
async def plaintext_inbound() -> AsyncIterator[Setup]:
    store = StateStore()
    store.apply(StateBatch(workloads=(pod_workload(STRICT.key),)))
    checker = PolicyChecker(store_policy_lookup(store))
    registry = ConnectionRegistry(checker)
    unsubscribe = registry.watch(store)
    peers: list[tuple[str, int]] = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer.get_extra_info("peername"))
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    app_server = await asyncio.start_server(app, LOOPBACK, 0)
    app_addr = app_server.sockets[0].getsockname()
    handler = InboundPlaintextHandler(checker, registry, destination_of=lambda _s: app_addr)
    try:
        async with loopback_acceptor(lambda conn: handler(POD, conn, 15006)) as address:
            try:
                yield Setup(store, registry, handler, address, peers)
            finally:
                unsubscribe()
    finally:
        app_server.close()
        await app_server.wait_closed()


async def exchange(addr: tuple[str, int], data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*addr)
    try:
        writer.write(data)
        await writer.drain()
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), 10)
    except OSError:  # reset, or already shut by the peer
        return b""
    finally:
        writer.close()


async def test_plaintext_allowed_without_policies():
    async with plaintext_inbound() as s:  # the workload names STRICT, but it is not known yet
        assert await exchange(s.listen, b"hello plaintext") == b"hello plaintext"
        assert len(s.app_peers) == 1
        assert s.app_peers[0][0] == LOOPBACK  # transparent source: the client's address
        assert s.handler.stats.relayed == 1


async def test_plaintext_refused_under_strict_mtls(caplog):
    async with plaintext_inbound() as s:
        s.store.apply(StateBatch(policies=(STRICT,)))
        caplog.set_level("INFO", logger="nodeagent.proxy.inbound")
        assert await exchange(s.listen, b"let me in") == b""
        assert s.app_peers == []  # closed without connecting upstream
        assert s.handler.stats.denied == 1
        assert "explicitly denied by: istio-system/istio_converted_static_strict" in caplog.text


async def test_policy_update_in_the_store_closes_the_live_connection(caplog):
    async with plaintext_inbound() as s:
        reader, writer = await asyncio.open_connection(*s.listen)
        try:
            writer.write(b"one")
            assert await asyncio.wait_for(reader.readexactly(3), 10) == b"one"
            (live,) = list(s.registry)
            assert live.direction == "inbound" and live.protocol == "TCP"
            assert live.attributes is not None and live.attributes.source_identity is None
            snapshot = s.registry.snapshot()
            assert snapshot[0]["workload"] == "ns-b/b" and snapshot[0]["bytes_received"] == 3
            caplog.set_level("INFO", logger="nodeagent.proxy.connections")
            s.store.apply(StateBatch(policies=(STRICT,)))  # the change feed triggers the re-check
            assert "connection closed due to policy change" in caplog.text
            assert s.registry.revoked == 1
            try:
                rest = await asyncio.wait_for(reader.read(), 10)
            except ConnectionResetError:
                rest = b""
            assert rest == b""
            assert len(s.registry) == 0
        finally:
            writer.close()
