"""HBONE client pool and 15008 server end to end over loopback: real TLS 1.3 with CA-issued
SPIFFE certificates, our HTTP/2, the real inbound handler and relay, an echo app."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from nodeagent.controlplane.ca import CertificateAuthority
from nodeagent.datapath.netns import NetnsHandle
from nodeagent.hbone.aio import HboneConnection, TunnelError, TunnelStream
from nodeagent.model.identity import Identity
from nodeagent.model.policy import (
    Action,
    Authorization,
    Clause,
    ConnectionAttributes,
    Match,
    Rule,
    Scope,
    StringMatch,
)
from nodeagent.policy.checker import PolicyChecker
from nodeagent.proxy.connections import ConnectionRegistry
from nodeagent.proxy.inbound import InboundHboneHandler
from nodeagent.proxy.listeners import LocalPod
from nodeagent.proxy.pool import (
    HboneConnectError,
    HbonePool,
    PoolKey,
    PoolSettings,
    baggage_header,
    forwarded_header,
    traceparent_header,
)
from nodeagent.proxy.tunnel_end import WorkloadTls
from tests.builders import FakeCertificates, loopback_acceptor

ID_A = Identity("cluster.local", "ns-a", "client")
ID_B = Identity("cluster.local", "ns-b", "server")
ID_OTHER = Identity("cluster.local", "ns-x", "someone-else")
LOOPBACK = "127.0.0.1"


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("cluster.local")


class LoopbackSockets:
    """InPodSocketFactory stand-in: plain sockets in the test's own namespace."""

    netns = NetnsHandle(path="/proc/self/ns/net")

    def listener(self, port: int, *, backlog: int = 1024) -> socket.socket:
        raise NotImplementedError

    def upstream(self, family: socket.AddressFamily) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        return sock

    def close(self) -> None:
        pass


def pod_b() -> LocalPod:
    return LocalPod(
        uid="uid-b",
        namespace="ns-b",
        name="b",
        identity=ID_B,
        addresses=(ipaddress.ip_address(LOOPBACK),),
        netns=LoopbackSockets.netns,
        sockets=LoopbackSockets(),
    )


@dataclass
class App:
    """An app on loopback: echoes, answers EOF with EOF; b"RST" makes it reset."""

    port: int = 0
    peers: list[tuple[str, int]] = field(default_factory=list)


class _Echo(asyncio.Protocol):
    def __init__(self, app: App) -> None:
        self.app = app

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.app.peers.append(transport.get_extra_info("peername"))

    def data_received(self, data: bytes) -> None:
        if data.startswith(b"RST"):
            sock = self.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            self.transport.abort()
            return
        self.transport.write(data)

    def eof_received(self) -> bool:
        self.transport.write_eof()
        return True


@contextlib.asynccontextmanager
async def echo_app() -> AsyncIterator[App]:
    app = App()
    server = await asyncio.get_running_loop().create_server(lambda: _Echo(app), LOOPBACK, 0)
    app.port = server.sockets[0].getsockname()[1]
    try:
        yield app
    finally:
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def hbone_listener(
    handler: InboundHboneHandler, pod: LocalPod
) -> AsyncIterator[tuple[str, int]]:
    """A loopback 15008 stand-in: accepts and hands each socket to the handler (as PodListeners)."""
    async with loopback_acceptor(lambda conn: handler(pod, conn, 15008)) as address:
        yield address


async def dial(address: tuple[str, int]) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, address)
    return sock


@dataclass
class Mesh:
    pool: HbonePool
    server_addr: tuple[str, int]
    app: App
    handler: InboundHboneHandler
    policies: list[Authorization]

    def key(self, expected: frozenset[Identity] = frozenset({ID_B})) -> PoolKey:
        return PoolKey("uid-a", ID_A, expected, self.server_addr)

    async def tunnel(self, port: int | None = None, **kw: object) -> TunnelStream:
        authority = f"{LOOPBACK}:{self.app.port if port is None else port}"
        return await asyncio.wait_for(
            self.pool.open_tunnel(kw.get("key") or self.key(), authority, (), dial),  # type: ignore[arg-type]
            10,
        )


@contextlib.asynccontextmanager
async def mesh(
    ca: CertificateAuthority, settings: PoolSettings | None = None
) -> AsyncIterator[Mesh]:
    tls = WorkloadTls(FakeCertificates(ca))
    policies: list[Authorization] = []
    checker = PolicyChecker(lambda _conn: policies)
    handler = InboundHboneHandler(tls, checker, ConnectionRegistry(checker))
    pool = HbonePool(tls, settings)
    async with echo_app() as app, hbone_listener(handler, pod_b()) as addr:
        try:
            yield Mesh(pool, addr, app, handler, policies)
        finally:
            await pool.close()


async def read_all(stream: TunnelStream) -> bytes:
    out = bytearray()
    while chunk := await stream.read():
        out += chunk
    return bytes(out)


async def test_tunnel_carries_mebibytes_both_ways_and_half_close(ca):
    async with mesh(ca) as m:
        stream = await m.tunnel()
        payload = os.urandom(6 * 1024 * 1024 + 7)

        async def send() -> None:
            for i in range(0, len(payload), 256 * 1024):
                stream.write(payload[i : i + 256 * 1024])
                await stream.drain()
            stream.write_eof()  # half-close: we stop sending, the echo keeps coming

        _, echoed = await asyncio.wait_for(asyncio.gather(send(), read_all(stream)), 60)
        assert echoed == payload
        assert m.app.peers and m.app.peers[0][0] == LOOPBACK
        assert m.handler.stats.relayed == 1


async def test_app_reset_reaches_the_client_as_stream_reset(ca):
    async with mesh(ca) as m:
        stream = await m.tunnel()
        stream.write(b"RST please")
        with pytest.raises(TunnelError, match="reset"):
            await asyncio.wait_for(read_all(stream), 10)


async def test_client_reset_reaches_the_app(ca):
    closed = asyncio.get_running_loop().create_future()

    class Watch(asyncio.Protocol):
        def connection_made(self, transport):  # type: ignore[no-untyped-def]
            self.t = transport

        def data_received(self, data):  # type: ignore[no-untyped-def]
            self.t.write(data)

        def connection_lost(self, exc):  # type: ignore[no-untyped-def]
            if not closed.done():
                closed.set_result(exc)

    server = await asyncio.get_running_loop().create_server(Watch, LOOPBACK, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with mesh(ca) as m:
            stream = await m.tunnel(port)
            stream.write(b"hello")
            assert await asyncio.wait_for(stream.read(), 10) == b"hello"
            stream.reset()
            exc = await asyncio.wait_for(closed, 10)
            assert isinstance(exc, ConnectionResetError)  # a RST, not a clean FIN
    finally:
        server.close()
        await server.wait_closed()


async def test_pool_reuses_one_connection_then_opens_a_second_past_the_limit(ca):
    async with mesh(ca, PoolSettings(max_streams_per_connection=3)) as m:
        streams = [await m.tunnel() for _ in range(3)]
        assert m.pool.connections_opened == 1
        assert len(m.pool.connections(m.key())) == 1
        fourth = await m.tunnel()
        assert m.pool.connections_opened == 2
        for s in [*streams, fourth]:
            s.write(b"x")
            assert await asyncio.wait_for(s.read(), 10) == b"x"
            s.write_eof()
            assert await asyncio.wait_for(s.read(), 10) == b""
        # Closed streams free the first connection again: no third connection.
        again = await m.tunnel()
        again.reset()
        assert m.pool.connections_opened == 2


async def test_concurrent_opens_share_one_new_connection(ca):
    async with mesh(ca) as m:
        streams = await asyncio.gather(*(m.tunnel() for _ in range(10)))
        assert m.pool.connections_opened == 1
        for s in streams:
            s.reset()


async def test_a_cancel_that_lands_as_the_dial_finishes_is_not_lost(ca):
    """The caller's cancel arriving in the turn its dial completes still cancels it (Python
    3.11's wait_for returned the dial's result and dropped the cancel; a waypoint cancels a
    request this way when its client leaves)."""
    async with mesh(ca) as m:
        caller: list[asyncio.Task[object]] = []
        dialled: list[socket.socket] = []

        async def dial_then_cancel(address: tuple[str, int]) -> socket.socket:
            sock = await dial(address)
            dialled.append(sock)
            caller[0].cancel()  # lands as this dial returns
            return sock

        async def open_one() -> TunnelStream:
            return await m.pool.open_tunnel(
                m.key(), f"{LOOPBACK}:{m.app.port}", (), dial_then_cancel
            )

        task = asyncio.ensure_future(open_one())
        caller.append(task)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        assert m.pool.connections_opened == 0
        assert dialled and dialled[0].fileno() == -1  # the dialled socket was closed


async def test_wrong_server_identity_is_refused_with_a_clear_error(ca):
    async with mesh(ca) as m:
        with pytest.raises(HboneConnectError, match="not one of the expected"):
            await m.tunnel(key=m.key(frozenset({ID_OTHER})))
        assert m.app.peers == []


async def test_service_sans_widen_the_accepted_identities(ca):
    async with mesh(ca) as m:
        stream = await m.tunnel(key=m.key(frozenset({ID_OTHER, ID_B})))
        stream.write_eof()
        assert await asyncio.wait_for(read_all(stream), 10) == b""


async def test_the_pool_says_which_identity_the_server_of_a_tunnel_proved(ca):
    async with mesh(ca) as m:
        key = m.key(frozenset({ID_OTHER, ID_B}))
        stream = await m.tunnel(key=key)
        assert m.pool.peer_identity(key, stream) == ID_B
        (pooled,) = m.pool.connections(key)
        assert pooled.open_streams == 1 and pooled.has_room(100)
        stream.reset()


async def raw_connect(m: Mesh, ca: CertificateAuthority, authority: str) -> int:
    """CONNECT `authority` with a bare HboneConnection (no client-side checks); the status."""
    tls = WorkloadTls(FakeCertificates(ca))
    ctx = await tls.client_context(ID_A)
    _transport, conn = await asyncio.get_running_loop().create_connection(
        lambda: HboneConnection(client_side=True), *m.server_addr, ssl=ctx, server_hostname=""
    )
    try:
        await conn.open_tunnel(authority)
        return 200
    except TunnelError as exc:
        return int(str(exc).rsplit(" ", 1)[1])
    finally:
        conn.close()
        await asyncio.wait_for(conn.closed, 10)


async def test_bad_authority_and_foreign_address_get_400(ca):
    async with mesh(ca) as m:
        assert await raw_connect(m, ca, "app.example:80") == 400
        assert await raw_connect(m, ca, f"10.9.9.9:{m.app.port}") == 400
        assert await raw_connect(m, ca, f"{LOOPBACK}:15001") == 503  # the agent's own port
        assert m.app.peers == []
        assert m.handler.stats.bad_request == 2


async def test_denied_by_policy_gets_401_and_the_app_never_sees_it(ca, caplog):
    deny_a = Authorization(
        name="deny-a",
        namespace="ns-b",
        scope=Scope.NAMESPACE,
        action=Action.DENY,
        rules=(Rule((Clause((Match(principals=(StringMatch.exact(ID_A.principal),)),)),)),),
    )
    async with mesh(ca) as m:
        m.policies.append(deny_a)
        caplog.set_level("INFO", logger="nodeagent.proxy.inbound")
        with pytest.raises(HboneConnectError, match="401"):
            await m.tunnel()
        assert m.app.peers == []
        assert "policy rejection: explicitly denied by: ns-b/deny-a" in caplog.text
        assert str(ID_A) in caplog.text


async def test_closed_app_port_gets_503(ca):
    probe = socket.socket()
    probe.bind((LOOPBACK, 0))
    closed_port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    async with mesh(ca) as m:
        with pytest.raises(HboneConnectError, match="503"):
            await m.tunnel(closed_port)
        assert m.handler.stats.upstream_failed == 1


async def test_policy_update_closes_the_live_tunnel(ca, caplog):
    async with mesh(ca) as m:
        stream = await m.tunnel()
        stream.write(b"ping")
        assert await asyncio.wait_for(stream.read(), 10) == b"ping"
        registry = m.handler.registry
        (live,) = list(registry)
        assert live.source_identity == ID_A and live.protocol == "HBONE"
        assert live.attributes == ConnectionAttributes(
            source_ip=ipaddress.ip_address(LOOPBACK),
            source_identity=ID_A,
            destination_ip=ipaddress.ip_address(LOOPBACK),
            destination_port=m.app.port,
            destination_namespace="ns-b",
            destination_name="b",
            destination_uid="uid-b",
        )
        assert registry.recheck() == []  # still allowed
        m.policies.append(Authorization(name="allow-none", namespace="ns-b", scope=Scope.NAMESPACE))
        caplog.set_level("INFO", logger="nodeagent.proxy.connections")
        (revoked,) = registry.recheck()
        assert "connection closed due to policy change" in caplog.text
        assert revoked.handle is live
        with pytest.raises(TunnelError):
            await asyncio.wait_for(read_all(stream), 10)
        assert len(registry) == 0


async def test_idle_connection_is_closed_and_keepalive_pings_answered(ca):
    settings = PoolSettings(idle_timeout=0.5, ping_interval=0.05, ping_timeout=2)
    async with mesh(ca, settings) as m:
        stream = await m.tunnel()
        (pooled,) = m.pool.connections()
        stream.write_eof()
        assert await asyncio.wait_for(read_all(stream), 10) == b""
        await asyncio.wait_for(asyncio.shield(pooled.conn.closed), 10)
        assert m.pool.connections() == []
        assert pooled.pings_acked >= 1  # the server answered our keep-alive PINGs


async def test_connections_of_a_departed_pod_are_closed_and_others_kept(ca):
    async with mesh(ca) as m:
        key_b = PoolKey("uid-other", ID_A, frozenset({ID_B}), m.server_addr)
        ours, theirs = await m.tunnel(), await m.tunnel(key=key_b)
        (gone,) = m.pool.connections(m.key())
        (kept,) = m.pool.connections(key_b)
        assert m.pool.close_source("uid-a") == 1
        assert m.pool.connections(m.key()) == []
        await asyncio.wait_for(asyncio.shield(gone.conn.closed), 10)
        with pytest.raises(TunnelError):
            await asyncio.wait_for(ours.read(), 10)
        # The other pod's tunnel still carries bytes, and a new tunnel for the departed
        # source gets a fresh connection rather than the closed one.
        theirs.write(b"still here")
        assert await asyncio.wait_for(theirs.read(), 10) == b"still here"
        assert not kept.conn.closed.done()
        again = await m.tunnel()
        assert m.pool.connections_opened == 3
        assert m.pool.close_source("uid-nobody") == 0
        for s in (theirs, again):
            s.reset()


def test_pool_settings_reject_nonsense():
    with pytest.raises(ValueError, match="max_streams_per_connection"):
        PoolSettings(max_streams_per_connection=0)
    with pytest.raises(ValueError, match="idle_timeout"):
        PoolSettings(idle_timeout=0)


def test_connect_headers_have_ztunnel_shapes():
    assert forwarded_header(("10.0.0.2", 41000)) == ("forwarded", 'for="10.0.0.2:41000"')
    assert forwarded_header(("fd00::2", 41000), "echo.ns.svc.cluster.local") == (
        "forwarded",
        'for="[fd00::2]:41000";host=echo.ns.svc.cluster.local',
    )
    assert baggage_header(namespace="ns-a", workload_name="sleep", cluster="c1") == (
        "baggage",
        "k8s.cluster.name=c1,k8s.namespace.name=ns-a,k8s.deployment.name=sleep",
    )
    assert baggage_header() is None
    name, value = traceparent_header()
    version, trace, parent, flags = value.split("-")
    assert name == "traceparent" and (version, flags) == ("00", "00")
    assert len(trace) == 32 and len(parent) == 16 and int(trace, 16) and int(parent, 16)
    assert traceparent_header() != traceparent_header()  # random per connection


async def test_a_bursts_extra_connections_close_soon_and_are_released_at_its_end(ca):
    settings = PoolSettings(max_streams_per_connection=2, overflow_idle_timeout=60)
    async with mesh(ca, settings) as m:
        streams = [await m.tunnel() for _ in range(5)]
        first, *extra = m.pool.connections(m.key())
        assert len(extra) == 2
        # Only the key's first connection keeps the full idle timeout.
        assert first.schedule.idle_timeout == settings.idle_timeout
        assert [p.schedule.idle_timeout for p in extra] == [60, 60]
        assert m.pool.release_idle() == 0  # all still carry streams
        for s in streams[:4]:
            s.reset()
        await asyncio.sleep(0.1)
        # The first (oldest) stays though idle; the idle extra goes; the busy one stays.
        assert m.pool.release_idle() == 1
        assert m.pool.connections(m.key()) == [first, extra[1]]
        await asyncio.wait_for(asyncio.shield(extra[0].conn.closed), 10)
        streams[4].write(b"x")
        assert await asyncio.wait_for(streams[4].read(), 10) == b"x"
        streams[4].reset()
        await asyncio.sleep(0.1)
        assert m.pool.release_idle() == 1
        assert m.pool.connections(m.key()) == [first]
