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
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from nodeagent.hbone.aio import HboneConnection, TunnelStream
from nodeagent.hbone.connection import ConnectionConfig, parse_authority
from nodeagent.model.constants import ILLEGAL_PORTS
from nodeagent.model.identity import Identity
from nodeagent.model.policy import ConnectionAttributes
from nodeagent.model.workload import IPAddress
from nodeagent.policy.engine import Decision

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0


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
Authorizer = Callable[[ConnectionAttributes], Decision]


def _unmap(ip: str) -> str:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


@dataclass
class ServerStats:
    connections: int = 0
    handshake_failed: int = 0
    tunnels: int = 0
    bad_request: int = 0  # 400
    denied: int = 0  # 401
    unavailable: int = 0  # 503 before the app connect


class HboneServer:
    """Serves HBONE connections accepted on a pod's 15008 listener."""

    def __init__(
        self,
        tls: ServerTls,
        authorize: Authorizer,
        handler: TunnelHandler | None = None,
        *,
        config: ConnectionConfig | None = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self._tls = tls
        self._authorize = authorize
        self._handler = handler
        self._config = config or ConnectionConfig(client_side=False)
        self._handshake_timeout = handshake_timeout
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
        loop = asyncio.get_running_loop()
        tunnel_handler = handler or self._handler
        if tunnel_handler is None:
            sock.close()
            raise ValueError("HboneServer.serve needs a tunnel handler")
        tasks: set[asyncio.Task[None]] = set()
        try:
            peer_addr = sock.getpeername()
            ctx = await asyncio.wait_for(
                self._tls.server_context(workload.identity), self._handshake_timeout
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
        peer = (_unmap(peer_addr[0]), peer_addr[1])
        state: dict[str, Identity] = {}

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
        conn = HboneConnection(client_side=False, config=self._config, on_request=on_request)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: conn,
                sock,
                ssl=ctx,
                ssl_handshake_timeout=self._handshake_timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            sock.close()
            self.stats.handshake_failed += 1
            log.info("HBONE %s from %s:%d: TLS handshake failed: %r", workload.label, *peer, exc)
            return
        try:
            try:
                identity = self._tls.client_identity(
                    transport.get_extra_info("ssl_object"), workload.identity.trust_domain
                )
            except Exception as exc:
                self.stats.handshake_failed += 1
                log.info("HBONE %s from %s:%d refused: %s", workload.label, *peer, exc)
                transport.abort()
                return
            state["peer"] = identity
            log.debug("HBONE %s: connection from %s:%d as %s", workload.label, *peer, identity)
            await asyncio.shield(conn.closed)
        finally:
            if not conn.closed.done():
                conn.close()
            if not transport.is_closing():
                transport.abort()
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

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
        local = {_canonical(a) for a in workload.addresses}
        if _canonical(ip) not in local:
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
            source_ip=_canonical(ipaddress.ip_address(peer[0])),
            source_identity=identity,
            destination_ip=_canonical(ip),
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
            target=(str(_canonical(ip)), port),
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


def _canonical(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
