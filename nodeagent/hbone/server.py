"""HBONE server: terminate mutual TLS and HTTP/2 on 15008, check and authorize each CONNECT.

`HboneServer.serve` runs one accepted connection to the end. Per connection: TLS
with the local pod's certificate and a client certificate required, whose SPIFFE
identity must be in our trust domain (that identity is what authorization sees).
Per CONNECT stream, in ztunnel's order (istio-ambient.md §2 "Response codes"):

* a method other than CONNECT, an authority that does not parse, or an
  authority IP that is not one of the local pod's addresses: **400**;
* a target port that is one of the agent's own ports (it would loop): **503**;
* authorization (L4 policy, with the peer identity) denies: **401**, and the
  reason is logged ("connection closed due to policy rejection: ...");
* otherwise the stream goes to the `TunnelHandler`, which connects to the app
  and answers **200** only once that connection is up (**503** if it fails),
  then relays. That part needs the pod's namespace and the relay, which live
  in nodeagent.proxy (the layer above), so it is injected.

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
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from nodeagent.config import Config
from nodeagent.hbone.aio import HboneConnection, TunnelError, TunnelStream, keep_alive
from nodeagent.hbone.connection import ConnectionConfig, parse_authority
from nodeagent.hbone.keepalive import KeepaliveSchedule
from nodeagent.hbone.limits import ConnectionLimits, ConnectionSlot, Refusal
from nodeagent.model.address import unmap
from nodeagent.model.constants import ILLEGAL_PORTS
from nodeagent.model.identity import Identity
from nodeagent.model.policy import ConnectionAttributes
from nodeagent.model.workload import IPAddress

log = logging.getLogger(__name__)

# Once the server itself has closed a connection (GOAWAY), how long the peer gets to
# finish the TLS close before the socket is dropped.
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


@dataclass(frozen=True, slots=True)
class LocalWorkload:
    """The pod this server answers for."""

    uid: str
    namespace: str
    name: str
    identity: Identity
    addresses: tuple[IPAddress, ...]

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.name}" if self.name else self.uid


@dataclass(frozen=True, slots=True)
class TunnelRequest:
    """A CONNECT that passed validation and authorization, waiting for the app connection."""

    stream: TunnelStream
    peer: tuple[str, int]  # the client's address as seen on the TLS connection
    peer_identity: Identity
    target: tuple[str, int]  # the pod's ip and the app port (from the authority)
    attributes: ConnectionAttributes  # what was authorized (re-checked on policy change)
    workload: LocalWorkload


# Connects to the app, answers 200 or 503 on `request.stream`, relays until the end.
TunnelHandler = Callable[[TunnelRequest], Awaitable[None]]


class Verdict(Protocol):
    """What an authorizer answers (nodeagent.policy's Decision): hbone names no policy type."""

    @property
    def allowed(self) -> bool: ...

    @property
    def error_message(self) -> str: ...

    def explain(self) -> str: ...


Authorizer = Callable[[ConnectionAttributes], Verdict]


@dataclass
class ServerStats:
    connections: int = 0
    handshake_failed: int = 0
    tunnels: int = 0
    bad_request: int = 0  # 400
    denied: int = 0  # 401
    unavailable: int = 0  # 503 before the app connect
    timeouts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("handshake_timeout", "preface_timeout", "idle_timeout"), 0
        )
    )
    """Connections the server closed after waiting, by what it waited for."""


class HboneServer:
    """Serves HBONE connections accepted on a pod's 15008 listener (every pod's: the
    connection limits are the agent's)."""

    def __init__(
        self,
        tls: ServerTls,
        authorize: Authorizer,
        handler: TunnelHandler | None = None,
        *,
        config: ConnectionConfig | None = None,
        settings: ServerSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tls = tls
        self._authorize = authorize
        self._handler = handler
        self._config = config or ConnectionConfig(client_side=False)
        self.settings = settings or ServerSettings()
        self._clock = clock
        self.limits = ConnectionLimits(
            self.settings.max_connections, self.settings.max_connections_per_identity
        )
        self.stats = ServerStats()

    async def serve(
        self,
        workload: LocalWorkload,
        sock: socket.socket,
        *,
        handler: TunnelHandler | None = None,
    ) -> None:
        """Run one accepted connection until it closes; owns and closes `sock`. `handler`
        (default: the one given at construction) serves this connection's tunnels."""
        tunnel_handler = handler or self._handler
        if tunnel_handler is None:
            sock.close()
            raise ValueError("HboneServer.serve needs a tunnel handler")
        slot = self.limits.admit()
        if slot is None:
            # Nothing spent on it yet: no TLS, no HTTP/2 (Envoy's connection limit too).
            sock.close()
            self._log_refusal(Refusal.CONNECTION_LIMIT, workload, None)
            return
        try:
            await self._serve(workload, sock, tunnel_handler, slot)
        finally:
            slot.release()

    async def _serve(
        self,
        workload: LocalWorkload,
        sock: socket.socket,
        tunnel_handler: TunnelHandler,
        slot: ConnectionSlot,
    ) -> None:
        loop = asyncio.get_running_loop()
        settings = self.settings
        tasks: set[asyncio.Task[None]] = set()
        # Accept to TLS done: one deadline for the certificate and the handshake.
        deadline = loop.time() + settings.handshake_timeout
        try:
            peer_addr = sock.getpeername()
            ctx = await asyncio.wait_for(
                self._tls.server_context(workload.identity), settings.handshake_timeout
            )
        except (OSError, TimeoutError) as exc:
            sock.close()
            self.stats.handshake_failed += 1
            log.info(
                "HBONE %s: connection closed: no certificate for %s yet (%r)",
                workload.label,
                workload.identity,
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
                    transport.get_extra_info("ssl_object"), workload.identity.trust_domain
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
            request = self._check(workload, stream, peer, identity)
            if request is None:
                return
            task = loop.create_task(
                self._run(tunnel_handler, request), name=f"hbone-tunnel {stream.authority}"
            )
            tasks.add(task)
            task.add_done_callback(tasks.discard)

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
                workload.label,
                *peer,
                settings.handshake_timeout,
            )
            return
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            self.stats.handshake_failed += 1
            log.info("HBONE %s from %s:%d: TLS handshake failed: %r", workload.label, *peer, exc)
            return
        try:
            if conn.refused:
                if refusal == [Refusal.IDENTITY_LIMIT.value]:
                    self._log_refusal(Refusal.IDENTITY_LIMIT, workload, state.get("peer"))
                else:
                    self.stats.handshake_failed += 1
                    log.info("HBONE %s from %s:%d refused: %s", workload.label, *peer, *refusal)
                return
            identity = state["peer"]
            log.debug("HBONE %s: connection from %s:%d as %s", workload.label, *peer, identity)
            try:
                async with asyncio.timeout(settings.preface_timeout):
                    await asyncio.shield(conn.ready)
            except TimeoutError:
                self.stats.timeouts["preface_timeout"] += 1
                log.info(
                    "HBONE %s from %s:%d (%s): no HTTP/2 preface and SETTINGS within %.0fs: closed",
                    workload.label,
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
                    workload.label,
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

    def _log_refusal(
        self, reason: Refusal, workload: LocalWorkload, identity: Identity | None
    ) -> None:
        # Under a flood this would be a line per connection: log the 1st, 2nd, 4th, ...
        count = self.limits.refused[reason]
        if count & (count - 1):
            return
        s = self.settings
        if reason is Refusal.CONNECTION_LIMIT:
            what = f"the agent holds {s.max_connections} inbound connections (the limit)"
        else:
            what = f"{identity} holds {s.max_connections_per_identity} connections (the limit)"
        log.warning(
            "HBONE %s: connection refused: %s; %d refused so far", workload.label, what, count
        )

    def _check(
        self,
        workload: LocalWorkload,
        stream: TunnelStream,
        peer: tuple[str, int],
        identity: Identity,
    ) -> TunnelRequest | None:
        """Validate and authorize one CONNECT; answers the refusals itself."""
        self.stats.tunnels += 1
        try:
            host, port = parse_authority(stream.authority)
            ip = ipaddress.ip_address(host)
        except ValueError as exc:
            self._refuse(stream, 400, workload, peer, f"bad authority: {exc}")
            return None
        local = {unmap(a) for a in workload.addresses}
        if unmap(ip) not in local:
            self._refuse(
                stream,
                400,
                workload,
                peer,
                f"authority {stream.authority} is not an address of this pod "
                f"({', '.join(str(a) for a in workload.addresses)})",
            )
            return None
        if port in ILLEGAL_PORTS:
            self._refuse(stream, 503, workload, peer, f"target port {port} is the agent's own")
            return None
        attributes = ConnectionAttributes(
            source_ip=unmap(ipaddress.ip_address(peer[0])),
            source_identity=identity,
            destination_ip=unmap(ip),
            destination_port=port,
            destination_namespace=workload.namespace,
            destination_name=workload.name,
            destination_uid=workload.uid,
        )
        decision = self._authorize(attributes)
        if not decision.allowed:
            self.stats.denied += 1
            log.info(
                "HBONE %s: %s from %s (%s:%d) to %s: connection closed due to policy rejection: "
                "%s (%s)",
                workload.label,
                "CONNECT",
                identity,
                *peer,
                stream.authority,
                decision.error_message,
                decision.explain(),
            )
            stream.respond(401)
            return None
        return TunnelRequest(
            stream=stream,
            peer=peer,
            peer_identity=identity,
            target=(str(unmap(ip)), port),
            attributes=attributes,
            workload=workload,
        )

    def _refuse(
        self,
        stream: TunnelStream,
        status: int,
        workload: LocalWorkload,
        peer: tuple[str, int],
        why: str,
    ) -> None:
        if status == 400:
            self.stats.bad_request += 1
        else:
            self.stats.unavailable += 1
        log.info("HBONE %s from %s:%d: %d: %s", workload.label, *peer, status, why)
        stream.respond(status)

    async def _run(self, handler: TunnelHandler, request: TunnelRequest) -> None:
        try:
            await handler(request)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("HBONE tunnel %s failed", request.stream.authority)
            try:
                request.stream.reset()
            except Exception:  # the connection is already gone
                pass
