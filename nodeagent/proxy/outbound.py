"""Outbound (15001): route a captured app connection, then tunnel it or pass it through.

`OutboundRouter.route` decides from the original destination and the mesh state
(istio-ambient.md §1 "Listener behaviour", without waypoints and gateways):

* a loopback or unspecified address, or one of the agent's own ports on the
  pod itself: refused (it would loop back into the agent);
* a mesh workload that speaks HBONE: HBONE to `ip:15008`, authority `ip:port`,
  the server must prove the workload's identity;
* a service VIP: pick an endpoint with nodeagent.traffic (health, locality,
  weights, outliers), translate the service port to the target port, then HBONE
  to `endpoint:15008` with authority `endpoint:target` (accepting the workload's
  identity and the service's subject_alt_names), or plain TCP to an endpoint
  outside the mesh; LB mode PASSTHROUGH keeps the original destination; no
  healthy endpoint refuses the connection;
* a known workload without HBONE, or anything else: passthrough TCP to the
  original destination.

`OutboundHandler` is the ConnectionHandler: every socket it makes lives in the
source pod's namespace and carries the agent's mark (the capture rules skip
it). The source identity is the pod's, whose listener accepted the connection.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
import socket
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from nodeagent.datapath.netns import original_destination
from nodeagent.hbone.headers import format_authority
from nodeagent.model.address import unmap
from nodeagent.model.constants import ILLEGAL_PORTS, INBOUND_HBONE_PORT, TUNNEL_OPEN_FAILED
from nodeagent.model.identity import Identity, IdentityError
from nodeagent.model.workload import TunnelProtocol, Workload
from nodeagent.proxy.connections import HBONE, OUTBOUND, TCP, ConnectionRegistry
from nodeagent.proxy.listeners import LocalPod
from nodeagent.proxy.pool import (
    Address,
    HboneConnectError,
    HbonePool,
    PoolKey,
    baggage_header,
    forwarded_header,
    traceparent_header,
)
from nodeagent.proxy.relay import connect_tcp_end
from nodeagent.proxy.sockets import (
    CONNECT_TIMEOUT,
    connect_in_pod,
    hold,
    hostport,
    relay_sockets,
    reset_socket,
)
from nodeagent.proxy.tunnel_end import TunnelRelayEnd, join
from nodeagent.state.store import StateStore
from nodeagent.traffic.endpoints import candidates_for
from nodeagent.traffic.outlier import OutlierDetector
from nodeagent.traffic.selection import EndpointSelector, SelectionOutcome, SourceLocation

log = logging.getLogger(__name__)


class RouteKind(enum.Enum):
    HBONE = "hbone"  # tunnel to destination (ip:15008)
    TCP = "tcp"  # plain TCP to a chosen endpoint outside the mesh
    PASSTHROUGH = "passthrough"  # plain TCP to the original destination
    REFUSE = "refuse"


@dataclass(frozen=True, slots=True)
class Route:
    kind: RouteKind
    destination: Address  # where the socket connects
    authority: str = ""  # HBONE: the CONNECT target
    identities: frozenset[Identity] = frozenset()  # HBONE: what the server may prove
    workload_uid: str = ""  # the destination workload, when known
    service: str = ""  # namespace/hostname, when the app dialled a VIP
    service_hostname: str = ""
    endpoint_key: Hashable | None = None  # for the outlier detector
    reason: str = ""  # REFUSE: why; otherwise a note

    def describe(self) -> str:
        if self.kind is RouteKind.HBONE:
            return f"HBONE {self.authority} via {format_authority(*self.destination)}"
        if self.kind is RouteKind.REFUSE:
            return f"refused: {self.reason}"
        return f"{self.kind.value} {format_authority(*self.destination)}"


def _identities(workload: Workload, sans: tuple[str, ...] = ()) -> frozenset[Identity]:
    found = {workload.identity()}
    for san in sans:
        try:
            found.add(Identity.parse(san))
        except IdentityError:
            log.debug("service SAN %r is not a SPIFFE identity; ignored", san)
    return frozenset(found)


def _hbone(workload: Workload, ip: str, port: int, sans: tuple[str, ...] = ()) -> Route:
    return Route(
        RouteKind.HBONE,
        (ip, INBOUND_HBONE_PORT),
        authority=format_authority(ip, port),
        identities=_identities(workload, sans),
        workload_uid=workload.uid,
    )


class OutboundRouter:
    """Decides where an outbound connection goes, from the mesh state."""

    def __init__(self, store: StateStore, selector: EndpointSelector | None = None) -> None:
        self._store = store
        self._selector = selector or EndpointSelector()

    def route(
        self,
        source: Workload | None,
        dst: Address,
        owns: Callable[[str], bool] = lambda _ip: False,
    ) -> Route:
        """The route for a connection from `source` to the original destination `dst`;
        `owns(ip)` says whether ip is the source pod's own address."""
        host, port = dst
        try:
            ip = ipaddress.ip_address(unmap(host))
        except ValueError:
            return Route(
                RouteKind.REFUSE, dst, reason=f"original destination {host!r} is not an IP"
            )
        if ip.is_loopback or ip.is_unspecified:
            return Route(
                RouteKind.REFUSE, dst, reason=f"loopback destination {hostport(host, port)}"
            )
        if port in ILLEGAL_PORTS and owns(str(ip)):
            return Route(
                RouteKind.REFUSE, dst, reason=f"{hostport(host, port)} is the agent's own port"
            )
        network = source.network if source is not None else ""
        service = self._store.service_by_vip(network, ip)
        if service is not None:
            return self._via_service(source, service.key, ip, port)
        workload = self._store.workload_by_address(network, ip)
        if workload is not None and workload.tunnel_protocol is TunnelProtocol.HBONE:
            return _hbone(workload, str(ip), port)
        note = "workload without HBONE" if workload is not None else "unknown destination"
        return Route(
            RouteKind.PASSTHROUGH,
            (str(ip), port),
            workload_uid=workload.uid if workload is not None else "",
            reason=note,
        )

    def _via_service(
        self,
        source: Workload | None,
        service_key: str,
        vip: ipaddress.IPv4Address | ipaddress.IPv6Address,
        port: int,
    ) -> Route:
        service = self._store.service(service_key)
        assert service is not None
        candidates, skipped = candidates_for(
            service, self._store.endpoints(service_key), port, dialled=vip
        )
        location = SourceLocation.of(source) if source is not None else SourceLocation()
        selection = self._selector.select(candidates, location, service.load_balancing)
        if selection.outcome is SelectionOutcome.PASSTHROUGH:
            return Route(RouteKind.PASSTHROUGH, (str(vip), port), service=service_key)
        if selection.endpoint is None:
            why = selection.reason or "no endpoint"
            if skipped:
                why += f" ({len(skipped)} skipped: {skipped[0].reason})"
            return Route(
                RouteKind.REFUSE,
                (str(vip), port),
                service=service_key,
                reason=f"service {service_key} port {port}: {why}",
            )
        ep = selection.endpoint
        workload = self._store.workload(ep.workload_uid)
        assert workload is not None
        if workload.tunnel_protocol is TunnelProtocol.HBONE:
            route = _hbone(workload, str(ep.address), ep.port, service.subject_alt_names)
            kind, dest, authority, identities = (
                route.kind,
                route.destination,
                route.authority,
                route.identities,
            )
        else:
            kind, dest, authority, identities = (
                RouteKind.TCP,
                (str(ep.address), ep.port),
                "",
                frozenset(),
            )
        return Route(
            kind,
            dest,
            authority=authority,
            identities=identities,
            workload_uid=workload.uid,
            service=service_key,
            service_hostname=service.hostname,
            endpoint_key=ep.key,
        )


def source_baggage(workload: Workload | None, pod: LocalPod) -> tuple[str, str] | None:
    if workload is None:
        return baggage_header(namespace=pod.namespace, workload_name=pod.name)
    locality = workload.locality
    return baggage_header(
        cluster=workload.cluster_id,
        namespace=workload.namespace,
        workload_type=workload.workload_type.name.lower(),
        workload_name=workload.workload_name or workload.name,
        service_name=workload.canonical_name,
        service_version=workload.canonical_revision,
        region=locality.region if locality else "",
        zone=locality.zone if locality else "",
    )


class OutboundHandler:
    """15001: the ConnectionHandler for captured app egress of the pod whose listener accepted."""

    def __init__(
        self,
        store: StateStore,
        pool: HbonePool,
        registry: ConnectionRegistry,
        *,
        selector: EndpointSelector | None = None,
        outliers: OutlierDetector | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        destination_of: Callable[[socket.socket], Address] = original_destination,
    ) -> None:
        self._destination_of = destination_of  # injected: tests have no REDIRECT
        self._store = store
        self.pool = pool
        self.registry = registry
        self._outliers = outliers
        self.router = OutboundRouter(store, selector or EndpointSelector(outliers=outliers))
        self._connect_timeout = connect_timeout
        self.counts: dict[str, int] = {}

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    async def __call__(self, pod: LocalPod, sock: socket.socket, listener_port: int) -> None:
        try:
            dst = self._destination_of(sock)
            app_host, app_port = sock.getpeername()[:2]
        except OSError as exc:
            log.info("pod %s: outbound connection lost before use: %s", pod.label, exc)
            reset_socket(sock)
            return
        dst = (unmap(dst[0]), dst[1])
        client = (unmap(app_host), app_port)
        if client[0] == "127.0.0.1":
            # Redirected at connect time (the eBPF backend): the app's socket is bound to
            # loopback, but the app is the pod, and logs and `forwarded` should say so.
            ipv4 = next((str(a) for a in pod.addresses if a.version == 4), None)
            if ipv4 is not None:
                client = (ipv4, app_port)
        source = self._store.workload(pod.uid)
        route = self.router.route(source, dst, pod.owns)
        log.debug(
            "pod %s: %s -> %s: %s", pod.label, hostport(*client), hostport(*dst), route.describe()
        )
        if route.kind is RouteKind.REFUSE:
            self._count("refused")
            log.info("pod %s: outbound %s refused: %s", pod.label, hostport(*dst), route.reason)
            reset_socket(sock)
            return
        if route.kind is RouteKind.HBONE:
            await self._tunnel(pod, source, sock, client, dst, route)
        else:
            await self._plain(pod, sock, client, dst, route)

    async def _plain(
        self, pod: LocalPod, sock: socket.socket, client: Address, dst: Address, route: Route
    ) -> None:
        live = self.registry.register(
            workload=pod.label,
            workload_uid=pod.uid,
            direction=OUTBOUND,
            protocol=TCP,
            local=hostport(*client),
            remote=hostport(*dst),
            target=hostport(*route.destination),
            source_identity=pod.identity,
            task=asyncio.current_task(),
        )
        try:
            try:
                upstream, _ = await connect_in_pod(
                    pod, route.destination, connect_timeout=self._connect_timeout
                )
            except (OSError, TimeoutError) as exc:
                self._count("upstream_failed")
                self._record(route, ok=False)
                log.info(
                    "pod %s: outbound %s (%s) failed: %s",
                    pod.label,
                    hostport(*dst),
                    route.describe(),
                    exc or type(exc).__name__,
                )
                reset_socket(sock)
                return
            self._record(route, ok=True)
            self._count(route.kind.value)
            live.relay = await relay_sockets(sock, upstream)
            await hold(live.relay)
        except BaseException:
            sock.close()
            raise
        finally:
            self.registry.remove(live)

    async def _tunnel(
        self,
        pod: LocalPod,
        source: Workload | None,
        sock: socket.socket,
        client: Address,
        dst: Address,
        route: Route,
    ) -> None:
        key = PoolKey(pod.uid, pod.identity, route.identities, route.destination)
        headers = [forwarded_header(client, route.service_hostname), traceparent_header()]
        baggage = source_baggage(source, pod)
        if baggage is not None:
            headers.append(baggage)

        async def dial(address: Address) -> socket.socket:
            upstream, _ = await connect_in_pod(pod, address, connect_timeout=self._connect_timeout)
            return upstream

        live = self.registry.register(
            workload=pod.label,
            workload_uid=pod.uid,
            direction=OUTBOUND,
            protocol=HBONE,
            local=hostport(*client),
            remote=hostport(*dst),
            target=route.authority,
            source_identity=pod.identity,
            task=asyncio.current_task(),
        )
        try:
            try:
                stream = await self.pool.open_tunnel(key, route.authority, headers, dial)
            except HboneConnectError as exc:
                self._count("tunnel_failed")
                self._record(route, ok=False)
                live.closed_reason = f"{TUNNEL_OPEN_FAILED}: {exc}"
                log.info("pod %s: outbound %s: %s", pod.label, hostport(*dst), exc)
                sock.close()  # as ztunnel: the app sees a normal close
                return
            self._record(route, ok=True)
            self._count("hbone")
            tunnel_end = TunnelRelayEnd("tunnel", stream)
            live.destination_identity = self.pool.peer_identity(key, stream)
            try:
                app_end = await connect_tcp_end("app", sock)
            except BaseException:
                tunnel_end.detach()
                stream.reset()
                raise
            live.relay = join(app_end, tunnel_end)
            await hold(live.relay)
        except BaseException:
            sock.close()
            raise
        finally:
            self.registry.remove(live)

    def _record(self, route: Route, *, ok: bool) -> None:
        if self._outliers is None or route.endpoint_key is None:
            return
        if ok:
            self._outliers.record_success(route.endpoint_key)
        elif self._outliers.record_failure(route.endpoint_key):
            log.info("endpoint %s of %s ejected as an outlier", route.endpoint_key, route.service)
