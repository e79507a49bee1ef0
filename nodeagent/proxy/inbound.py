"""Inbound connection handlers: HBONE on 15008 and captured plaintext on 15006.

Both end at the app inside the pod's namespace, connecting from the client's
own address where the kernel allows (IP_TRANSPARENT + bind to the client ip,
port 0; the pod's connmark rules route the app's replies back to us), so the
app sees the real caller. Both register the connection with the
`ConnectionRegistry`, whose policy re-check can close it later.

* 15008 (`InboundHboneHandler`): `nodeagent.hbone.server.HboneServer` does TLS
  and HTTP/2 and hands over each CONNECT with the peer's verified identity; this
  module gives it its meaning, in ztunnel's order (istio-ambient.md §2 "Response
  codes"):

  - an authority that does not parse, or whose IP is not one of the pod's
    addresses: **400** (a method other than CONNECT got 400 from the adapter);
  - a target port that is one of the agent's own ports (it would loop): **503**;
  - authorization (L4 policy, with the peer identity) denies: **401**, and the
    reason is logged ("connection closed due to policy rejection: ...");
  - otherwise connect to the app, answer **200** only once that connection is
    up (**503** if it fails), and relay the stream.
* 15006 (`InboundPlaintextHandler`): the original destination is the pod's own
  ip:port; authorization runs with no identity, so a workload whose policies
  require mTLS (STRICT: a DENY with `not_principals: [presence]`) refuses it:
  the connection is closed without connecting upstream.
* A workload that has a waypoint gets no special treatment inbound, as in current
  ztunnel (src/proxy/inbound.rs; early ztunnel answered 401 "bypassed waypoint"):
  a caller that did not come through the waypoint is authorized like any other,
  by the workload's L4 policies against its own identity. Making the waypoint
  mandatory is an ALLOW policy naming the waypoint's identity (docs/traffic.md).
* 15008 without workload certificates (an agent built without a CA, tests):
  `HboneUnavailable` refuses every connection (fail closed).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from nodeagent.datapath.netns import original_destination
from nodeagent.hbone.aio import TunnelStream
from nodeagent.hbone.headers import forwarded_host, parse_authority
from nodeagent.hbone.server import AcceptedStream, HboneServer, ServerSettings
from nodeagent.model.address import parse_ip, unmap
from nodeagent.model.constants import ILLEGAL_PORTS
from nodeagent.model.identity import Identity
from nodeagent.model.policy import ConnectionAttributes
from nodeagent.policy.checker import PolicyChecker
from nodeagent.proxy.connections import HBONE, INBOUND, TCP, ConnectionRegistry
from nodeagent.proxy.listeners import LocalPod
from nodeagent.proxy.relay import connect_tcp_end
from nodeagent.proxy.sockets import (
    CONNECT_TIMEOUT,
    connect_in_pod,
    hold,
    hostport,
    relay_sockets,
    reset_socket,
)
from nodeagent.proxy.tunnel_end import TunnelRelayEnd, WorkloadTls, join

log = logging.getLogger(__name__)


@dataclass
class InboundStats:
    relayed: int = 0
    denied: int = 0  # by policy (HBONE: 401)
    refused: int = 0  # loops, unusable sockets
    bad_request: int = 0  # HBONE: 400
    unavailable: int = 0  # HBONE: 503 before the app connect
    upstream_failed: int = 0
    transparent: int = 0  # app connections made from the client's own address
    by_port: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TunnelRequest:
    """A CONNECT that passed validation and authorization, waiting for the app connection."""

    stream: TunnelStream
    peer: tuple[str, int]  # the client's address as seen on the TLS connection
    peer_identity: Identity
    target: tuple[str, int]  # the pod's ip and the app port (from the authority)
    attributes: ConnectionAttributes  # what was authorized (re-checked on policy change)
    # The service hostname the client's proxy named in `forwarded: host=` ("" if none):
    # telemetry's first guess at the service reached (ztunnel's guess_inbound_service).
    forwarded_host: str = ""


def _forwarded_host_of(stream: TunnelStream) -> str:
    """The service hostname in the CONNECT's `forwarded` header; "" without one (a caller
    that is not ztunnel, or a stream that carries no headers)."""
    headers = getattr(stream, "headers", ())
    return forwarded_host(next((v for n, v in headers if n == "forwarded"), ""))


class InboundHboneHandler:
    """15008: the ConnectionHandler that serves HBONE for the pod whose listener accepted."""

    def __init__(
        self,
        tls: WorkloadTls,
        checker: PolicyChecker,
        registry: ConnectionRegistry,
        *,
        transparent: bool = True,
        connect_timeout: float = CONNECT_TIMEOUT,
        settings: ServerSettings | None = None,
    ) -> None:
        self.registry = registry
        self.stats = InboundStats()
        self._transparent = transparent
        self._connect_timeout = connect_timeout
        self._checker = checker
        # One server for every pod's 15008 listener: its connection limits are the agent's.
        self.server: HboneServer[LocalPod] = HboneServer(tls, self._accept, settings=settings)

    async def __call__(self, pod: LocalPod, sock: socket.socket, listener_port: int) -> None:
        await self.server.serve(pod, sock)

    def _accept(self, pod: LocalPod, accepted: AcceptedStream) -> Awaitable[None] | None:
        """Validate and authorize one CONNECT; answers the refusals itself (synchronously,
        inside the connection's read), else returns the tunnel for the server to run."""
        stream, peer, identity = accepted.stream, accepted.peer, accepted.peer_identity
        try:
            host, port = parse_authority(stream.authority)
            ip = parse_ip(host)
        except ValueError as exc:
            self._refuse(stream, 400, pod, peer, f"bad authority: {exc}")
            return None
        local = {unmap(a) for a in pod.addresses}
        if unmap(ip) not in local:
            self._refuse(
                stream,
                400,
                pod,
                peer,
                f"authority {stream.authority} is not an address of this pod "
                f"({', '.join(str(a) for a in pod.addresses)})",
            )
            return None
        if port in ILLEGAL_PORTS:
            self._refuse(stream, 503, pod, peer, f"target port {port} is the agent's own")
            return None
        attributes = ConnectionAttributes(
            source_ip=unmap(parse_ip(peer[0])),
            source_identity=identity,
            destination_ip=unmap(ip),
            destination_port=port,
            destination_namespace=pod.namespace,
            destination_name=pod.name,
            destination_uid=pod.uid,
        )
        decision = self._checker.check(attributes)
        if not decision.allowed:
            self.stats.denied += 1
            log.info(
                "HBONE %s: %s from %s (%s:%d) to %s: connection closed due to policy rejection: "
                "%s (%s)",
                pod.label,
                "CONNECT",
                identity,
                *peer,
                stream.authority,
                decision.error_message,
                decision.explain(),
            )
            stream.respond(401)
            return None
        request = TunnelRequest(
            stream=stream,
            peer=peer,
            peer_identity=identity,
            target=(str(unmap(ip)), port),
            attributes=attributes,
            forwarded_host=_forwarded_host_of(stream),
        )
        return self._tunnel(pod, request)

    def _refuse(
        self,
        stream: TunnelStream,
        status: int,
        pod: LocalPod,
        peer: tuple[str, int],
        why: str,
    ) -> None:
        if status == 400:
            self.stats.bad_request += 1
        else:
            self.stats.unavailable += 1
        log.info("HBONE %s from %s:%d: %d: %s", pod.label, *peer, status, why)
        stream.respond(status)

    async def _tunnel(self, pod: LocalPod, request: TunnelRequest) -> None:
        stream = request.stream
        source = request.peer[0] if self._transparent else None
        live = self.registry.register(
            workload=pod.label,
            workload_uid=pod.uid,
            direction=INBOUND,
            protocol=HBONE,
            local=stream.authority,
            remote=hostport(*request.peer),
            target=hostport(*request.target),
            source_identity=request.peer_identity,
            destination_identity=pod.identity,
            attributes=request.attributes,
            task=asyncio.current_task(),
            forwarded_host=request.forwarded_host,
        )
        try:
            # The tunnel end takes over the stream now, so bytes sent early are kept.
            tunnel_end = TunnelRelayEnd("tunnel", stream)
            try:
                app, spoofed = await connect_in_pod(
                    pod, request.target, source=source, connect_timeout=self._connect_timeout
                )
            except (OSError, TimeoutError) as exc:
                self.stats.upstream_failed += 1
                log.info(
                    "HBONE %s: %s from %s: app connect to %s failed: %s",
                    pod.label,
                    stream.authority,
                    request.peer_identity,
                    hostport(*request.target),
                    exc or type(exc).__name__,
                )
                tunnel_end.detach()
                stream.respond(503)
                return
            except BaseException:
                tunnel_end.detach()
                stream.reset()  # cancelled (policy change, shutdown) before the answer
                raise
            self.stats.transparent += spoofed
            try:
                app_end = await connect_tcp_end("app", app)
            except BaseException:
                app.close()
                tunnel_end.detach()
                stream.reset()
                raise
            try:
                # 200 only now: the app connection is up (and authorization passed earlier).
                stream.respond(200)
            except Exception as exc:  # the client gave up (reset, connection gone) meanwhile
                log.info("HBONE %s: %s: client went away: %s", pod.label, stream.authority, exc)
                tunnel_end.detach()
                if app_end.transport is not None:
                    app_end.transport.abort()
                return
            self.stats.relayed += 1
            log.debug(
                "HBONE %s: %s from %s (%s), service %s: relaying",
                pod.label,
                stream.authority,
                request.peer_identity,
                hostport(*request.peer),
                request.forwarded_host or "-",
            )
            live.relay = join(tunnel_end, app_end)
            await hold(live.relay)
        finally:
            self.registry.remove(live)


class InboundPlaintextHandler:
    """15006: captured plaintext, authorized without an identity."""

    def __init__(
        self,
        checker: PolicyChecker,
        registry: ConnectionRegistry,
        *,
        transparent: bool = True,
        connect_timeout: float = CONNECT_TIMEOUT,
        destination_of: Callable[[socket.socket], tuple[str, int]] = original_destination,
    ) -> None:
        self._destination_of = destination_of  # injected: tests have no REDIRECT
        self._checker = checker
        self.registry = registry
        self.stats = InboundStats()
        self._transparent = transparent
        self._connect_timeout = connect_timeout

    async def __call__(self, pod: LocalPod, sock: socket.socket, listener_port: int) -> None:
        try:
            dst = self._destination_of(sock)
            peer_host, peer_port = sock.getpeername()[:2]
        except OSError as exc:
            log.info("pod %s: inbound connection lost before use: %s", pod.label, exc)
            reset_socket(sock)
            return
        dst = (unmap(dst[0]), dst[1])
        peer = (unmap(peer_host), peer_port)
        if dst[1] in ILLEGAL_PORTS:
            self.stats.refused += 1
            log.warning(
                "pod %s: plaintext to %s refused: it would loop into the agent",
                pod.label,
                hostport(*dst),
            )
            reset_socket(sock)
            return
        attributes = ConnectionAttributes(
            source_ip=parse_ip(peer[0]),
            source_identity=None,
            destination_ip=parse_ip(dst[0]),
            destination_port=dst[1],
            destination_namespace=pod.namespace,
            destination_name=pod.name,
            destination_uid=pod.uid,
        )
        decision = self._checker.check(attributes)
        if not decision.allowed:
            self.stats.denied += 1
            log.info(
                "pod %s: plaintext %s -> %s: connection closed due to policy rejection: %s (%s)",
                pod.label,
                hostport(*peer),
                hostport(*dst),
                decision.error_message,
                decision.explain(),
            )
            sock.close()
            return
        source = peer[0] if self._transparent else None
        live = self.registry.register(
            workload=pod.label,
            workload_uid=pod.uid,
            direction=INBOUND,
            protocol=TCP,
            local=hostport(*dst),
            remote=hostport(*peer),
            target=hostport(*dst),
            destination_identity=pod.identity,
            attributes=attributes,
            task=asyncio.current_task(),
        )
        try:
            try:
                app, spoofed = await connect_in_pod(
                    pod, dst, source=source, connect_timeout=self._connect_timeout
                )
            except (OSError, TimeoutError) as exc:
                self.stats.upstream_failed += 1
                log.info(
                    "pod %s: plaintext %s -> %s: app connect failed: %s",
                    pod.label,
                    hostport(*peer),
                    hostport(*dst),
                    exc or type(exc).__name__,
                )
                reset_socket(sock)
                return
            self.stats.transparent += spoofed
            live.relay = await relay_sockets(sock, app)
            self.stats.relayed += 1  # counted as relaying starts, as on 15008
            await hold(live.relay)
        except BaseException:
            sock.close()
            raise
        finally:
            self.registry.remove(live)


class HboneUnavailable:
    """15008 while there is no tunnel (no workload certificates): refuse, fail closed."""

    def __init__(self) -> None:
        self.refused = 0

    async def __call__(self, pod: LocalPod, sock: socket.socket, listener_port: int) -> None:
        log.info("pod %s: HBONE connection on %d closed: no tunnel yet", pod.label, listener_port)
        self.refused += 1
        reset_socket(sock)
