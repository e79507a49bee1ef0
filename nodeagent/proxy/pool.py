"""The HBONE client pool: mutual-TLS HTTP/2 connections that carry CONNECT tunnels.

One pool serves a node. Connections are keyed by `PoolKey`: who dials (the source
pod, whose namespace the socket lives in, and its identity), whom we accept at the
far end (the set of SPIFFE identities the server may prove) and where (`ip:15008`).
A key holds 1..N connections; a new one is opened only when every existing one has
reached its stream limit, `min(max_streams_per_connection, peer's
SETTINGS_MAX_CONCURRENT_STREAMS)`. A per-key lock makes concurrent callers wait
for one new connection instead of each opening their own (a connection storm).

Each connection has a small keep-alive task: a PING every `ping_interval`, the
connection dropped if the ACK does not arrive within `ping_timeout`, and closed
once it carried no stream for `idle_timeout` (ztunnel's defaults: 10 s, 20 s,
5 min; istio-ambient.md §2). The schedule is `nodeagent.hbone.keepalive`'s, run by
`nodeagent.hbone.aio.keep_alive`: the 15008 server closes idle connections with the
same code. The pool composes hbone's public connection API (`HboneConnection`: open a
tunnel, stream counts and limits, ping, close); the HTTP/2 core is not its business.

The pool does not know namespaces or certificates: the caller passes a `Dialer`
(in the agent: a marked socket made inside the source pod's namespace, so the
capture rules skip it) and a `ClientTls` (the source identity's client context and
the check of the server's identity, from nodeagent.identity). Tests use loopback.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from nodeagent.hbone.aio import HboneConnection, TunnelError, TunnelStream, keep_alive
from nodeagent.hbone.connection import ConnectionConfig, InvalidActionError, format_authority
from nodeagent.hbone.keepalive import KeepaliveSchedule
from nodeagent.model.identity import Identity

log = logging.getLogger(__name__)

Address = tuple[str, int]
# Connects a fresh TCP socket to `address` and returns it (connected, non-blocking).
Dialer = Callable[[Address], Awaitable[socket.socket]]


class HboneConnectError(ConnectionError):
    """No tunnel could be opened: the peer is unreachable, proved the wrong identity, or
    refused the CONNECT. The message names the destination and the cause."""


class ClientTls(Protocol):
    """TLS material for the client side, injected (it lives in nodeagent.identity)."""

    async def client_context(self, identity: Identity) -> ssl.SSLContext:
        """A TLS 1.3 client context presenting `identity`'s certificate."""
        ...

    def verify_server(self, ssl_object: ssl.SSLObject, expected: Iterable[Identity]) -> Identity:
        """The server's identity if it is one of `expected`; raises otherwise."""
        ...


@dataclass(frozen=True, slots=True)
class PoolSettings:
    max_streams_per_connection: int = 100  # POOL_MAX_STREAMS_PER_CONNECTION
    idle_timeout: float = 300.0  # seconds without a stream before a connection is closed
    # The same for a key's other connections, opened while its first was full: a burst's
    # overflow, closed soon after the burst so that it neither holds sockets nor keeps the
    # memory the burst's objects were allocated in (issue 21).
    overflow_idle_timeout: float = 2.0
    ping_interval: float = 10.0  # seconds between keep-alive PINGs
    ping_timeout: float = 20.0  # seconds to wait for a PING ACK before dropping the connection
    connect_timeout: float = 10.0  # TCP connect + TLS handshake + peer SETTINGS
    certificate_timeout: float = 5.0  # wait for the source identity's first certificate

    def __post_init__(self) -> None:
        if self.max_streams_per_connection < 1:
            raise ValueError(
                f"max_streams_per_connection must be >= 1, got {self.max_streams_per_connection}"
            )
        names = ("idle_timeout", "overflow_idle_timeout", "ping_interval", "ping_timeout")
        for name in (*names, "connect_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class PoolKey:
    """Which connections may carry a tunnel: same source, same accepted identities, same peer."""

    source: str  # the dialling pod (its namespace makes the socket): uid
    source_identity: Identity
    destination_identities: frozenset[Identity]
    destination: Address  # ip, 15008

    def __str__(self) -> str:
        ids = ",".join(sorted(str(i) for i in self.destination_identities))
        return f"{self.source_identity} -> {format_authority(*self.destination)} [{ids}]"


@dataclass(eq=False)
class PooledConnection:
    """One pooled HTTP/2 connection and its bookkeeping."""

    key: PoolKey
    conn: HboneConnection
    peer_identity: Identity
    created: float
    schedule: KeepaliveSchedule = field(repr=False)
    tunnels_opened: int = 0
    keepalive: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def last_used(self) -> float:
        return self.schedule.last_used

    @property
    def pings_acked(self) -> int:
        return self.conn.pings_acked

    @property
    def open_streams(self) -> int:
        return self.conn.open_outbound_streams

    def stream_limit(self, configured: int) -> int:
        return min(configured, self.conn.max_outbound_streams)

    def usable(self) -> bool:
        return not self.conn.closed.done() and self.conn.can_open_stream

    def has_room(self, configured: int) -> bool:
        return self.usable() and self.open_streams < self.stream_limit(configured)


class HbonePool:
    """Opens CONNECT tunnels over pooled mutual-TLS HTTP/2 connections."""

    def __init__(
        self,
        tls: ClientTls,
        settings: PoolSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        config: ConnectionConfig | None = None,
    ) -> None:
        self._tls = tls
        self.settings = settings or PoolSettings()
        self._clock = clock
        self._config = config
        self._connections: dict[PoolKey, list[PooledConnection]] = {}
        self._locks: dict[PoolKey, asyncio.Lock] = {}
        self.connections_opened = 0
        self._closed = False

    async def open_tunnel(
        self,
        key: PoolKey,
        authority: str,
        headers: Iterable[tuple[str, str]],
        dial: Dialer,
    ) -> TunnelStream:
        """CONNECT `authority` through a connection for `key`; returns the stream after 200.

        Raises HboneConnectError (peer unreachable, wrong identity, non-200 answer).
        """
        headers = tuple(headers)
        while True:
            pooled = self._with_room(key)
            if pooled is None:
                lock = self._locks.setdefault(key, asyncio.Lock())
                async with lock:
                    # Another caller may have connected while we waited for the lock.
                    pooled = self._with_room(key) or await self._connect(key, dial)
            try:
                return await self._open_on(pooled, authority, headers)
            except InvalidActionError:
                continue  # filled up (or went away) between the check and the open: pick again

    def _with_room(self, key: PoolKey) -> PooledConnection | None:
        limit = self.settings.max_streams_per_connection
        for pooled in self._connections.get(key, ()):
            if pooled.has_room(limit):
                return pooled
        return None

    async def _open_on(
        self, pooled: PooledConnection, authority: str, headers: tuple[tuple[str, str], ...]
    ) -> TunnelStream:
        pooled.schedule.touch(self._clock())
        pooled.tunnels_opened += 1
        # `ready` is done, so open_tunnel sends HEADERS before its first suspension: the stream
        # counts against the limit at once (InvalidActionError if the connection filled up).
        try:
            return await pooled.conn.open_tunnel(authority, headers)
        except TunnelError as exc:
            raise HboneConnectError(
                f"HBONE CONNECT {authority} via {format_authority(*pooled.key.destination)}: {exc}"
            ) from exc
        finally:
            pooled.schedule.touch(self._clock())

    async def _connect(self, key: PoolKey, dial: Dialer) -> PooledConnection:
        if self._closed:
            raise HboneConnectError("HBONE pool is closed")
        dst = format_authority(*key.destination)
        loop = asyncio.get_running_loop()
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns its result when the
        # caller's cancel lands in the turn the inner call finishes, and the cancel is lost (a
        # waypoint cancels a request whose client left while it connects upstream).
        try:
            async with asyncio.timeout(self.settings.certificate_timeout):
                ctx = await self._tls.client_context(key.source_identity)
        except TimeoutError:
            raise HboneConnectError(
                f"HBONE to {dst}: no certificate for {key.source_identity} yet"
            ) from None
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                sock = await dial(key.destination)
        except TimeoutError:
            raise HboneConnectError(
                f"HBONE to {dst}: connection timed out, "
                "maybe a NetworkPolicy is blocking HBONE port 15008"
            ) from None
        except OSError as exc:
            raise HboneConnectError(f"HBONE to {dst}: {exc.strerror or exc}") from exc
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                transport, conn = await loop.create_connection(
                    lambda: HboneConnection(client_side=True, config=self._config),
                    sock=sock,
                    ssl=ctx,
                    # No SNI (ztunnel sends none); the server is checked by its SPIFFE SAN below.
                    server_hostname="",
                )
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            sock.close()
            raise HboneConnectError(f"HBONE to {dst}: TLS handshake failed: {exc!r}") from exc
        except BaseException:
            sock.close()  # cancelled mid-handshake
            raise
        ssl_object = transport.get_extra_info("ssl_object")
        try:
            peer = self._tls.verify_server(ssl_object, key.destination_identities)
        except Exception as exc:
            transport.abort()
            raise HboneConnectError(f"HBONE to {dst}: {exc}") from exc
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                await asyncio.shield(conn.ready)
        except (TunnelError, TimeoutError) as exc:
            transport.abort()
            raise HboneConnectError(f"HBONE to {dst}: no HTTP/2 SETTINGS: {exc!r}") from exc
        except BaseException:
            transport.abort()  # cancelled before the peer's SETTINGS
            raise
        now = self._clock()
        s = self.settings
        conns = self._connections.setdefault(key, [])
        # The key's first connection stays for the full idle timeout (the next tunnel finds
        # it ready); the others only carry what the first has no room for.
        idle = s.overflow_idle_timeout if conns else s.idle_timeout
        schedule = KeepaliveSchedule(min(idle, s.idle_timeout), s.ping_interval, now)
        pooled = PooledConnection(key, conn, peer, now, schedule)
        pooled.keepalive = asyncio.create_task(
            self._keepalive(pooled), name=f"hbone-keepalive {dst}"
        )
        conns.append(pooled)
        self.connections_opened += 1
        log.debug("HBONE connection %s opened (peer %s)", key, peer)
        return pooled

    async def _keepalive(self, pooled: PooledConnection) -> None:
        s = self.settings
        try:
            how = await keep_alive(
                pooled.conn, pooled.schedule, clock=self._clock, ping_timeout=s.ping_timeout
            )
            if how == "idle":
                idle = pooled.schedule.idle_timeout
                log.debug("HBONE connection %s idle for %.0fs: closed", pooled.key, idle)
            elif how == "ping_timeout":
                log.info(
                    "HBONE connection %s: no PING ACK in %.0fs, dropped", pooled.key, s.ping_timeout
                )
        finally:
            self._forget(pooled)

    def _forget(self, pooled: PooledConnection) -> None:
        conns = self._connections.get(pooled.key)
        if conns is not None and pooled in conns:
            conns.remove(pooled)
            if not conns:
                del self._connections[pooled.key]
                self._locks.pop(pooled.key, None)

    def peer_identity(self, key: PoolKey, stream: TunnelStream) -> Identity | None:
        """The identity the server of `stream` (opened for `key`) proved; None once its
        connection left the pool."""
        return next(
            (c.peer_identity for c in self._connections.get(key, ()) if c.conn is stream.owner),
            None,
        )

    def connections(self, key: PoolKey | None = None) -> list[PooledConnection]:
        """Live connections (of one key, or all)."""
        if key is not None:
            return list(self._connections.get(key, ()))
        return [c for conns in self._connections.values() for c in conns]

    def snapshot(self) -> list[dict[str, object]]:
        """For the admin page: one row per pooled connection."""
        now = self._clock()
        return [
            {
                "source_identity": str(c.key.source_identity),
                "destination": format_authority(*c.key.destination),
                "peer_identity": str(c.peer_identity),
                "open_streams": c.open_streams,
                "tunnels_opened": c.tunnels_opened,
                "pings_acked": c.pings_acked,
                "age_seconds": round(now - c.created, 3),
                "idle_seconds": 0.0 if c.open_streams else round(now - c.last_used, 3),
            }
            for c in self.connections()
        ]

    def release_idle(self) -> int:
        """Close (GOAWAY) each key's connections that carry no stream, all but its oldest
        usable one; returns how many. Called once a burst of connections has ended: the
        burst's extra connections would otherwise wait for their keep-alive's idle close,
        and while they live, the memory their objects were allocated in (among the burst's)
        cannot be given back. The oldest is kept: it predates the burst and serves the
        next tunnel at once."""
        released = 0
        for conns in list(self._connections.values()):
            kept = False
            for pooled in list(conns):
                if not pooled.usable():
                    continue
                if not kept:
                    kept = True
                elif not pooled.open_streams:
                    self._forget(pooled)  # no new tunnel may pick it while it closes
                    pooled.conn.close()  # its keep-alive task sees the close and ends
                    released += 1
        if released:
            log.debug("HBONE: released %d idle connection(s) after a burst", released)
        return released

    def close_source(self, source: str) -> int:
        """Close the connections a pod dialled (GOAWAY), once it is gone from this node.

        Their sockets live in the pod's namespace: kept until the idle timeout they would
        hold that namespace alive and keep pinging peers for nobody. Returns how many.
        """
        gone = [c for c in self.connections() if c.key.source == source]
        for pooled in gone:
            self._forget(pooled)  # no new tunnel may pick it while it closes
            pooled.conn.close()  # the keep-alive task sees the close and ends
        if gone:
            log.debug("HBONE: closed %d connection(s) of departed pod %s", len(gone), source)
        return len(gone)

    async def close(self) -> None:
        """Close every connection (GOAWAY) and stop their keep-alive tasks."""
        self._closed = True
        tasks = []
        for pooled in self.connections():
            pooled.conn.close()
            if pooled.keepalive is not None:
                pooled.keepalive.cancel()
                tasks.append(pooled.keepalive)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._connections.clear()
        self._locks.clear()


# --- CONNECT headers (what ztunnel sends; istio-ambient.md §2) --------------------------------


def forwarded_header(client: Address, host: str = "") -> tuple[str, str]:
    """`forwarded: for="ip:port"` (`;host=<service hostname>` when going to a service)."""
    value = f'for="{format_authority(*client)}"'
    if host:
        value += f";host={host}"
    return ("forwarded", value)


def baggage_header(
    *,
    cluster: str = "",
    namespace: str = "",
    workload_type: str = "deployment",
    workload_name: str = "",
    service_name: str = "",
    service_version: str = "",
    region: str = "",
    zone: str = "",
) -> tuple[str, str] | None:
    """`baggage` describing the source workload; empty items are left out (None if all are)."""
    items = [
        ("k8s.cluster.name", cluster),
        ("k8s.namespace.name", namespace),
        (f"k8s.{workload_type}.name", workload_name),
        ("service.name", service_name),
        ("service.version", service_version),
        ("cloud.region", region),
        ("cloud.availability_zone", zone),
    ]
    value = ",".join(f"{k}={v}" for k, v in items if v)
    return ("baggage", value) if value else None


# Trace ids need to be unique, not secret: a seeded generator, not a getrandom(2) per id.
_trace_ids = random.Random(os.urandom(16))


def traceparent_header() -> tuple[str, str]:
    """A random W3C traceparent, one per tunnelled connection (connection tracing); the
    trace and parent ids are never all zeros (W3C: invalid)."""
    trace = _trace_ids.getrandbits(128) or 1
    parent = _trace_ids.getrandbits(64) or 1
    return ("traceparent", f"00-{trace:032x}-{parent:016x}-00")
