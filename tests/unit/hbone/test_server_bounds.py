"""No peer holds the 15008 server without bound: real sockets on loopback, real mutual TLS.

* 50 peers finish TLS and never send the HTTP/2 preface: each is closed once the
  preface timeout has passed, and the server's descriptors return to their count before
  (the peers run in a child process, so every descriptor counted here is the server's);
* a peer that never starts TLS is closed after the handshake timeout;
* a connection left without streams is closed (GOAWAY) after the idle timeout, one
  carrying a tunnel is not;
* connections over the per-identity and the total limit are refused before any HTTP/2
  is sent, and the refusals show in the agent's metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from nodeagent.admin.metrics import AgentMetrics
from nodeagent.config import Config
from nodeagent.controlplane.ca import CertificateAuthority
from nodeagent.hbone.aio import HboneConnection, TunnelError
from nodeagent.hbone.limits import Refusal
from nodeagent.hbone.server import AcceptedStream, HboneServer, ServerSettings
from nodeagent.model.identity import Identity
from nodeagent.proxy.tunnel_end import WorkloadTls
from tests.builders import FakeCertificates, loopback_acceptor
from tests.builders import wait_until as _wait

LOOPBACK = "127.0.0.1"
SERVER_ID = Identity("cluster.local", "ns-b", "server")
ALICE = Identity("cluster.local", "ns-a", "alice")
BOB = Identity("cluster.local", "ns-a", "bob")
CAROL = Identity("cluster.local", "ns-a", "carol")
STALLED = 50


@dataclass(frozen=True)
class Local:
    """The server's local end (in the agent: the pod whose listener accepted)."""

    identity: Identity
    label: str


WORKLOAD = Local(SERVER_ID, "ns-b/b")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("cluster.local")


def hold_tunnel(_local: Local, accepted: AcceptedStream) -> Awaitable[None]:
    """The app side of a tunnel: answer 200 and keep it until the client ends it."""
    return hold(accepted)


async def hold(accepted: AcceptedStream) -> None:
    accepted.stream.respond(200)
    while await accepted.stream.read():
        pass
    accepted.stream.write_eof()


@dataclass
class Served:
    server: HboneServer[Local]
    address: tuple[str, int]
    certificates: FakeCertificates


@contextlib.asynccontextmanager
async def hbone_server(ca: CertificateAuthority, settings: ServerSettings) -> AsyncIterator[Served]:
    """The 15008 server on a loopback listener, as PodListeners runs it."""
    certificates = FakeCertificates(ca)
    server = HboneServer(WorkloadTls(certificates), hold_tunnel, settings=settings)
    async with loopback_acceptor(lambda conn: server.serve(WORKLOAD, conn)) as address:
        yield Served(server, address, certificates)


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    await _wait(predicate, what, seconds=20)  # server counters: slower under load


def open_fds() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


# The stalled peers: finish mutual TLS, then never write a byte. Each line on stdout says
# when (seconds after its own handshake) the server closed one of them.
STALLED_PEERS = textwrap.dedent(
    """\
    import select, socket, ssl, sys, time
    host, port, count, certs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["h2"])
    ctx.load_verify_locations(certs + "/roots.pem")
    ctx.load_cert_chain(certs + "/chain.pem", certs + "/key.pem")
    sys.stdin.readline()  # go
    peers = {}
    for _ in range(count):
        s = ctx.wrap_socket(socket.create_connection((host, port)))
        peers[s.fileno()] = (s, time.monotonic())
    print("ready", flush=True)
    while peers:
        readable, _, _ = select.select(list(peers), [], [], 60)
        if not readable:
            print("stuck", len(peers), flush=True)
            break
        for fd in readable:
            s, since = peers[fd]
            try:
                data = s.recv(65536)  # the server's SETTINGS, then the close
            except (OSError, ssl.SSLError):
                data = b""
            if not data:
                del peers[fd]
                print("closed", time.monotonic() - since, flush=True)
    sys.stdin.readline()  # hold our sockets until told
    """
)


async def stalled_peers_are_closed(ca: CertificateAuthority, certs: Path) -> None:
    settings = ServerSettings(preface_timeout=1.0, handshake_timeout=5.0)
    async with hbone_server(ca, settings) as served:
        cert = served.certificates.issue(ALICE)
        (certs / "roots.pem").write_bytes(cert.roots_pem())
        (certs / "chain.pem").write_bytes(cert.chain_pem())
        (certs / "key.pem").write_bytes(cert.key_pem)
        host, port = served.address
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            STALLED_PEERS,
            host,
            str(port),
            str(STALLED),
            str(certs),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert child.stdin is not None and child.stdout is not None
        try:
            baseline = open_fds()  # the listener and the child's pipes, nothing else
            child.stdin.write(b"go\n")
            assert await asyncio.wait_for(child.stdout.readline(), 60) == b"ready\n"
            assert served.server.limits.open == STALLED  # all held at once
            assert open_fds() >= baseline + STALLED  # and counted here: one socket each
            closed_after: list[float] = []
            for _ in range(STALLED):
                line = await asyncio.wait_for(child.stdout.readline(), 30)
                word, seconds = line.decode().split()
                assert word == "closed", line
                closed_after.append(float(seconds))
            # Not one was let go before its timeout: the preface timeout closed them all.
            assert min(closed_after) >= settings.preface_timeout * 0.9
            assert served.server.stats.timeouts["preface_timeout"] == STALLED
            await wait_until(lambda: served.server.limits.open == 0, "every slot released")
            # The peers still hold their sockets: whatever is left open is the server's.
            await wait_until(lambda: open_fds() == baseline, "descriptors back to the baseline")
            child.stdin.write(b"done\n")
            assert await asyncio.wait_for(child.wait(), 30) == 0
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_50_peers_that_never_send_the_preface_are_closed_and_descriptors_return(
    ca: CertificateAuthority, tmp_path: Path, loop_factory: Callable[[], asyncio.AbstractEventLoop]
) -> None:
    # The agent runs on uvloop, the test suite on asyncio's loop: both must hold.
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(stalled_peers_are_closed(ca, tmp_path))


async def silent_peers_are_closed(ca: CertificateAuthority) -> None:
    settings = ServerSettings(handshake_timeout=0.5)
    async with hbone_server(ca, settings) as served:
        loop = asyncio.get_running_loop()
        timeouts = served.server.stats.timeouts

        async def silent_peers(count: int) -> None:
            socks = []
            for _ in range(count):
                sock = socket.socket()
                sock.setblocking(False)
                await loop.sock_connect(sock, served.address)
                socks.append(sock)
            try:
                for sock in socks:  # EOF from the server, no TLS ever spoken
                    assert await asyncio.wait_for(loop.sock_recv(sock, 100), 10) == b""
            finally:
                for sock in socks:
                    sock.close()

        # uvloop opens a descriptor of its own (/dev/null) at its first aborted TLS
        # handshake and keeps it: count from after one such round.
        await silent_peers(1)
        await wait_until(lambda: timeouts["handshake_timeout"] == 1, "the first timeout")
        await wait_until(lambda: served.server.limits.open == 0, "its slot released")
        baseline = open_fds()
        await silent_peers(3)
        await wait_until(lambda: timeouts["handshake_timeout"] == 4, "three more timeouts")
        assert served.server.limits.open == 0
        await wait_until(lambda: open_fds() == baseline, "descriptors back to the baseline")


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_a_peer_that_never_starts_tls_is_closed_after_the_handshake_timeout(
    ca: CertificateAuthority, loop_factory: Callable[[], asyncio.AbstractEventLoop]
) -> None:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(silent_peers_are_closed(ca))


async def dial(served: Served, identity: Identity) -> HboneConnection:
    """An HTTP/2 client connection as `identity`; returns once the TLS handshake is done."""
    tls = WorkloadTls(served.certificates)
    ctx = await tls.client_context(identity)
    _transport, conn = await asyncio.get_running_loop().create_connection(
        lambda: HboneConnection(client_side=True), *served.address, ssl=ctx, server_hostname=""
    )
    return conn


async def test_each_connect_reaches_the_handler_with_its_headers_and_the_peer_identity(ca):
    seen: list[tuple[Local, AcceptedStream]] = []

    def handler(local: Local, accepted: AcceptedStream) -> Awaitable[None] | None:
        seen.append((local, accepted))
        if accepted.authority.endswith(":1"):
            accepted.stream.respond(401)  # answered here: no task for it
            return None
        return hold(accepted)

    certificates = FakeCertificates(ca)
    server = HboneServer(WorkloadTls(certificates), handler)
    async with loopback_acceptor(lambda conn: server.serve(WORKLOAD, conn)) as address:
        conn = await dial(Served(server, address, certificates), ALICE)
        headers = [("forwarded", 'for="10.0.0.1:4000"'), ("baggage", "k8s.namespace.name=a")]
        stream = await asyncio.wait_for(conn.open_tunnel(f"{LOOPBACK}:8080", headers), 10)
        with pytest.raises(TunnelError, match="401"):
            await asyncio.wait_for(conn.open_tunnel(f"{LOOPBACK}:1"), 10)
        (local, accepted), (_, refused) = seen
        assert local is WORKLOAD
        assert accepted.authority == f"{LOOPBACK}:8080" and accepted.headers == tuple(headers)
        assert accepted.peer_identity == ALICE and accepted.peer[0] == LOOPBACK
        assert refused.peer_identity == ALICE
        assert server.stats.tunnels == 2
        stream.write(b"x")
        stream.write_eof()
        assert await asyncio.wait_for(stream.read(), 10) == b""
        conn.close()


async def test_idle_connection_is_closed_by_the_server_and_one_with_a_tunnel_is_kept(ca):
    settings = ServerSettings(idle_timeout=0.5)
    async with hbone_server(ca, settings) as served:
        idle = await dial(served, ALICE)
        busy = await dial(served, BOB)
        stream = await asyncio.wait_for(busy.open_tunnel(f"{LOOPBACK}:8080"), 10)
        # The idle one gets GOAWAY and is closed; the one carrying a tunnel stays up.
        await asyncio.wait_for(asyncio.shield(idle.closed), 10)
        assert not busy.closed.done()
        assert served.server.stats.timeouts["idle_timeout"] == 1
        stream.write(b"still here")
        stream.write_eof()
        assert await asyncio.wait_for(stream.read(), 10) == b""
        # Once its tunnel is over, the second one goes idle too.
        await asyncio.wait_for(asyncio.shield(busy.closed), 10)
        assert served.server.stats.timeouts["idle_timeout"] == 2
        await wait_until(lambda: served.server.limits.open == 0, "slots released")


async def limits_refuse_and_count(ca: CertificateAuthority) -> None:
    settings = ServerSettings(max_connections=4, max_connections_per_identity=2)
    async with hbone_server(ca, settings) as served:
        server = served.server
        alice = [await dial(served, ALICE) for _ in range(2)]
        for conn in alice:
            await asyncio.wait_for(asyncio.shield(conn.ready), 10)  # the server's SETTINGS

        # A third connection as alice: TLS completes, then it is closed with no HTTP/2.
        third = await dial(served, ALICE)
        with pytest.raises(TunnelError):
            await asyncio.wait_for(asyncio.shield(third.ready), 10)
        assert server.limits.refused[Refusal.IDENTITY_LIMIT] == 1
        assert server.limits.held_by(ALICE) == 2

        # Another identity still gets in, up to the total.
        bob = [await dial(served, BOB) for _ in range(2)]
        for conn in bob:
            await asyncio.wait_for(asyncio.shield(conn.ready), 10)
        assert server.limits.open == 4

        # The fifth connection of any identity is closed at accept, before TLS.
        with pytest.raises((ConnectionError, OSError)):
            await dial(served, CAROL)
        assert server.limits.refused[Refusal.CONNECTION_LIMIT] == 1

        # The refusals are what a scrape shows.
        metrics = AgentMetrics()
        metrics.sync_hbone_inbound(
            open_connections=server.limits.open,
            refused_by_reason=server.limits.refused_by_reason(),
            timeouts_by_reason=server.stats.timeouts,
        )
        samples = {
            (s.name, s.labels.get("reason", "")): s.value
            for family in text_string_to_metric_families(metrics.exposition().decode())
            for s in family.samples
        }
        assert samples[("nodeagent_hbone_inbound_refused_total", "identity_limit")] == 1
        assert samples[("nodeagent_hbone_inbound_refused_total", "connection_limit")] == 1
        assert samples[("nodeagent_hbone_inbound_connections", "")] == 4

        # A closed connection frees its places: alice may connect again.
        alice[0].close()
        await wait_until(lambda: server.limits.held_by(ALICE) == 1, "alice's place freed")
        again = await dial(served, ALICE)
        await asyncio.wait_for(asyncio.shield(again.ready), 10)
        for conn in [*alice[1:], *bob, again]:
            conn.close()
        await wait_until(lambda: server.limits.open == 0, "every slot released")


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_connections_over_the_identity_and_total_limits_are_refused_and_counted(
    ca: CertificateAuthority, loop_factory: Callable[[], asyncio.AbstractEventLoop]
) -> None:
    # The identity refusal aborts inside the TLS transport's connection_made: both loops.
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(limits_refuse_and_count(ca))


def test_server_settings_default_to_the_agents_config() -> None:
    assert ServerSettings.from_config(Config()) == ServerSettings()
    with pytest.raises(ValueError, match="preface_timeout"):
        ServerSettings(preface_timeout=0)
