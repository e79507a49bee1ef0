"""HBONE server: terminate mutual TLS and HTTP/2 on 15008, hand each CONNECT to a handler.

A generic TLS server: it knows who the peer is, not what the tunnel may reach.
`HboneServer.serve` runs one accepted connection to the end. Per connection: TLS
with the local end's certificate and a client certificate required, whose SPIFFE
identity must be in the local end's trust domain. Per CONNECT stream, the handler
given at construction is called synchronously with the local end and an
`AcceptedStream` (the stream, its request headers, the peer's address and verified
identity): it answers refusals there and then (the validation, authorization and
status codes are nodeagent.proxy.inbound's), or returns the coroutine that serves
the tunnel, which the server runs as a task of the connection (cancelled when the
connection ends; a failure resets the stream). A request that is not a CONNECT is
answered 400 by the HTTP/2 adapter before any handler sees it.

No peer holds the server without bound (`ServerSettings`): the TLS handshake must end
within `handshake_timeout` of accept, and the HTTP/2 client preface and SETTINGS arrive
within `preface_timeout` after it; a connection that carries no stream for
`idle_timeout` is closed with GOAWAY (the client pool's keep-alive schedule, run on
this side without PINGs). Connections are counted from accept, in total and per peer
identity (`nodeagent.hbone.limits`); one over either limit is closed before any HTTP/2
is sent.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from nodeagent.config import Config
from nodeagent.hbone.aio import HboneConnection, TunnelError, TunnelStream, keep_alive
from nodeagent.hbone.connection import ConnectionConfig
from nodeagent.hbone.keepalive import KeepaliveSchedule
from nodeagent.hbone.limits import ConnectionLimits, ConnectionSlot, Refusal
from nodeagent.model.address import unmap
from nodeagent.model.identity import Identity

log = logging.getLogger(__name__)

# Once the server itself has closed a connection (GOAWAY), how long the peer gets to
CLOSE_GRACE = 5.0


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Bounds on what one peer may hold; defaults and reasons in nodeagent.config."""

    handshake_timeout: float = 10.0
    preface_timeout: float = 10.0
    idle_timeout: float = 600.0
    max_connections: int = 4096
    max_connections_per_identity: int = 1024

    def __post_init__(self) -> None:
        for name in ("handshake_timeout", "preface_timeout", "idle_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_config(cls, config: Config) -> ServerSettings:
        return cls(
            handshake_timeout=config.hbone_handshake_timeout,
            preface_timeout=config.hbone_preface_timeout,
            idle_timeout=config.hbone_idle_timeout,
            max_connections=config.hbone_max_connections,
            max_connections_per_identity=config.hbone_max_connections_per_identity,
        )


class ServerTls(Protocol):
    """TLS material for the server side, injected (it lives in nodeagent.identity)."""

    async def server_context(self, identity: Identity) -> ssl.SSLContext:
        """A TLS 1.3 server context presenting `identity`'s certificate, client cert required."""
        ...

    def client_identity(self, ssl_object: ssl.SSLObject, trust_domain: str) -> Identity:
        """The client's SPIFFE identity if it is in `trust_domain`; raises otherwise."""
        ...


class LocalEnd(Protocol):
    """Whom a connection is for (in the agent: the pod whose 15008 listener accepted)."""

    @property
    def identity(self) -> Identity:
        """The certificate presented; clients must prove an identity of its trust domain."""
        ...

    @property
    def label(self) -> str:
        """How log lines name it."""
        ...


L = TypeVar("L", bound=LocalEnd)


@dataclass(frozen=True, slots=True)
class AcceptedStream:
    """A CONNECT stream on an authenticated connection, not answered yet."""

    stream: TunnelStream
    peer: tuple[str, int]  # the client's address as seen on the TLS connection
    peer_identity: Identity  # verified by TLS

    @property
    def authority(self) -> str:
        return self.stream.authority

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        """The request's headers other than the pseudo-headers."""
        return self.stream.headers


# Called synchronously for each CONNECT: answers a refusal itself and returns None, or
# returns the coroutine that serves the tunnel (answers 200 or an error, relays).
StreamHandler = Callable[[L, AcceptedStream], Awaitable[None] | None]


@dataclass
class ServerStats:
    connections: int = 0
    handshake_failed: int = 0
    tunnels: int = 0  # CONNECT streams handed to the handler
    timeouts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("handshake_timeout", "preface_timeout", "idle_timeout"), 0
        )
    )
    """Connections the server closed after waiting, by what it waited for."""


class HboneServer(Generic[L]):
    """Serves HBONE connections accepted on 15008 listeners (every pod's, in the agent:
    the connection limits are the agent's), handing their streams to `handler`."""

    def __init__(
        self,
        tls: ServerTls,
        handler: StreamHandler[L],
        *,
        config: ConnectionConfig | None = None,
        settings: ServerSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tls = tls
        self._handler = handler
        self._config = config or ConnectionConfig(client_side=False)
        self.settings = settings or ServerSettings()
        self._clock = clock
        self.limits = ConnectionLimits(
            self.settings.max_connections, self.settings.max_connections_per_identity
        )
        self.stats = ServerStats()

    async def serve(self, local: L, sock: socket.socket) -> None:
        """Run one connection accepted for `local` until it closes; owns and closes `sock`."""
        slot = self.limits.admit()
        if slot is None:
            # Nothing spent on it yet: no TLS, no HTTP/2 (Envoy's connection limit too).
            sock.close()
            self._log_refusal(Refusal.CONNECTION_LIMIT, local, None)
            return
        try:
            await self._serve(local, sock, slot)
        finally:
            slot.release()

    async def _serve(self, local: L, sock: socket.socket, slot: ConnectionSlot) -> None:
        loop = asyncio.get_running_loop()
        settings = self.settings
        # Each tunnel's task (the handler's own coroutine: no wrapper frame per tunnel) and its
        # stream, which a failure resets.
        tasks: dict[asyncio.Task[None], TunnelStream] = {}
        # The context this connection's tunnel tasks and their done callbacks run in: one for
        # them all (nothing here sets or reads context variables), not a copy per tunnel; per
        # connection, so never entered from two loops' threads at once.
        context = contextvars.Context()

        def tunnel_done(task: asyncio.Task[None]) -> None:
            stream = tasks.pop(task)
            if not task.cancelled():
                self._tunnel_failed(task.exception(), stream)

        # Accept to TLS done: one deadline for the certificate and the handshake.
        deadline = loop.time() + settings.handshake_timeout
        try:
            peer_addr = sock.getpeername()
            # asyncio.timeout, not wait_for: 3.11's wait_for can drop a shutdown's cancel.
            async with asyncio.timeout(settings.handshake_timeout):
                ctx = await self._tls.server_context(local.identity)
        except (OSError, TimeoutError) as exc:
            sock.close()
            self.stats.handshake_failed += 1
            log.info(
                "HBONE %s: connection closed: no certificate for %s yet (%r)",
                local.label,
                local.identity,
                exc,
            )
            return
        except BaseException:
            sock.close()
            raise
        peer = (unmap(peer_addr[0]), peer_addr[1])
        state: dict[str, Identity] = {}
        refusal: list[str] = []

        def admit(transport: asyncio.BaseTransport) -> bool:
            # TLS is done and nothing of HTTP/2 is sent yet: refuse here, silently.
            try:
                identity = self._tls.client_identity(
                    transport.get_extra_info("ssl_object"), local.identity.trust_domain
                )
            except Exception as exc:
                refusal.append(str(exc))
                return False
            if not slot.claim(identity):
                refusal.append(Refusal.IDENTITY_LIMIT.value)
                state["peer"] = identity
                return False
            state["peer"] = identity
            return True

        def on_request(stream: TunnelStream) -> None:
            identity = state.get("peer")
            if identity is None:  # cannot happen: TLS is done before HTTP/2 starts
                stream.respond(503)
                return
            self.stats.tunnels += 1
            work = self._handler(local, AcceptedStream(stream, peer, identity))
            if work is None:  # answered already (refused)
                return
            task = loop.create_task(_as_coroutine(work), name="hbone-tunnel", context=context)
            tasks[task] = stream
            # An explicit context: add_done_callback would copy the current one per tunnel.
            task.add_done_callback(tunnel_done, context=context)

        self.stats.connections += 1
        # Keep our own reference: with TLS, uvloop's connect_accepted_socket returns its
        # SSLProtocol wrapper rather than the protocol the factory made.
        conn = HboneConnection(
            client_side=False, config=self._config, on_request=on_request, admit=admit
        )
        try:
            # Our own deadline, so a timeout is told apart from a failed handshake; the
            # loop's is a backstop only.
            async with asyncio.timeout_at(deadline):
                transport, _ = await loop.connect_accepted_socket(
                    lambda: conn,
                    sock,
                    ssl=ctx,
                    ssl_handshake_timeout=settings.handshake_timeout + 1.0,
                )
        except TimeoutError:
            sock.close()
            self.stats.timeouts["handshake_timeout"] += 1
            log.info(
                "HBONE %s from %s:%d: no TLS handshake within %.0fs: closed",
                local.label,
                *peer,
                settings.handshake_timeout,
            )
            return
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            self.stats.handshake_failed += 1
            log.info("HBONE %s from %s:%d: TLS handshake failed: %r", local.label, *peer, exc)
            return
        try:
            if conn.refused:
                if refusal == [Refusal.IDENTITY_LIMIT.value]:
                    self._log_refusal(Refusal.IDENTITY_LIMIT, local, state.get("peer"))
                else:
                    self.stats.handshake_failed += 1
                    log.info("HBONE %s from %s:%d refused: %s", local.label, *peer, *refusal)
                return
            identity = state["peer"]
            log.debug("HBONE %s: connection from %s:%d as %s", local.label, *peer, identity)
            try:
                async with asyncio.timeout(settings.preface_timeout):
                    await asyncio.shield(conn.ready)
            except TimeoutError:
                self.stats.timeouts["preface_timeout"] += 1
                log.info(
                    "HBONE %s from %s:%d (%s): no HTTP/2 preface and SETTINGS within %.0fs: closed",
                    local.label,
                    *peer,
                    identity,
                    settings.preface_timeout,
                )
                transport.abort()
                return
            except TunnelError:  # closed, or not HTTP/2: the connection has ended already
                return
            schedule = KeepaliveSchedule(settings.idle_timeout, None, self._clock())
            if await keep_alive(conn, schedule, clock=self._clock) == "idle":
                self.stats.timeouts["idle_timeout"] += 1
                log.debug(
                    "HBONE %s from %s:%d (%s): no stream for %.0fs: closed",
                    local.label,
                    *peer,
                    identity,
                    settings.idle_timeout,
                )
                await asyncio.wait({conn.closed}, timeout=CLOSE_GRACE)
                if not conn.closed.done():
                    transport.abort()
        finally:
            if not conn.closed.done():
                conn.close()
            if not transport.is_closing():
                transport.abort()
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _log_refusal(self, reason: Refusal, local: L, identity: Identity | None) -> None:
        # Under a flood this would be a line per connection: log the 1st, 2nd, 4th, ...
        count = self.limits.refused[reason]
        if count & (count - 1):
            return
        s = self.settings
        if reason is Refusal.CONNECTION_LIMIT:
            what = f"the agent holds {s.max_connections} inbound connections (the limit)"
        else:
            what = f"{identity} holds {s.max_connections_per_identity} connections (the limit)"
        log.warning("HBONE %s: connection refused: %s; %d refused so far", local.label, what, count)

    @staticmethod
    def _tunnel_failed(exc: BaseException | None, stream: TunnelStream) -> None:
        if not isinstance(exc, Exception):
            return  # done, or a BaseException the loop has already raised
        log.error("HBONE tunnel %s failed", stream.authority, exc_info=exc)
        try:
            stream.reset()
        except Exception:  # the connection is already gone
            pass


def _as_coroutine(work: Awaitable[None]) -> Coroutine[Any, Any, None]:
    """`work` itself when it is a coroutine (the handler's, as in the agent), else wrapped."""
    if inspect.iscoroutine(work):
        return work
    return _await(work)


async def _await(work: Awaitable[None]) -> None:
    await work
