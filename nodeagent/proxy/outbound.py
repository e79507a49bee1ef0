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
* a workload that left the mesh within the last few seconds (the store's
  `departed_by_address`): still HBONE, so a removal seen here before the
  server's agent holds the pod is refused or mTLS, never plaintext;
* a known workload without HBONE, or anything else: passthrough TCP to the
  original destination.

Waypoints (ztunnel's `build_request`, `fetch_service_waypoint`,
`fetch_workload_waypoint`): a service VIP whose Service names a waypoint, or a
workload (dialled by its own address) whose Workload names one, goes over HBONE
to the waypoint instead: the TCP destination is a waypoint endpoint on the
GatewayAddress's `hbone_mtls_port` (an address names a waypoint workload or the
VIP of its service; a host name names its service), the CONNECT authority is the
original destination the app dialled (`VIP:port` or `podIP:port`, untranslated),
and the server must prove the waypoint workload's identity or one of its
service's subject_alt_names. The agent's own VirtualService routing does not
apply (the waypoint does L7). A connection from the workload's waypoint itself
(its identity and address) goes direct, so it does not loop. A waypoint that is
named but unknown (`NC`) or has no ready endpoint (`UH`) refuses the connection:
never a silent bypass.

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
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field, replace

from nodeagent.datapath.netns import original_destination
from nodeagent.hbone.aio import TunnelStream
from nodeagent.hbone.headers import format_authority, parse_authority
from nodeagent.model.address import parse_ip, unmap
from nodeagent.model.constants import (
    FAULT_ABORT,
    FAULT_DELAY,
    ILLEGAL_PORTS,
    INBOUND_HBONE_PORT,
    NO_CLUSTER_FOUND,
    NO_HEALTHY_UPSTREAM,
    NO_ROUTE,
    OVERFLOW,
    TUNNEL_OPEN_FAILED,
    UPSTREAM_CONNECT_FAILURE,
    UPSTREAM_RETRY_LIMIT,
)
from nodeagent.model.identity import Identity, IdentityError
from nodeagent.model.response_flags import join_flags
from nodeagent.model.workload import (
    GatewayAddress,
    LoadBalancingMode,
    NamespacedHostname,
    Service,
    TunnelProtocol,
    Workload,
    WorkloadStatus,
)
from nodeagent.proxy.connections import HBONE, OUTBOUND, TCP, ConnectionRegistry, LiveConnection
from nodeagent.proxy.listeners import LocalPod
from nodeagent.proxy.mirror import Mirror, MirroredTcpEnd
from nodeagent.proxy.pool import (
    Address,
    HboneConnectError,
    HbonePool,
    PoolKey,
    baggage_header,
    forwarded_header,
    traceparent_header,
)
from nodeagent.proxy.relay import Relay, TcpRelayEnd, connect_tcp_end, relay_pair
from nodeagent.proxy.routing import Pick, ServicePlan, ServiceRouting
from nodeagent.proxy.sockets import (
    CONNECT_TIMEOUT,
    connect_in_pod,
    hold,
    hostport,
    reset_socket,
)
from nodeagent.proxy.tunnel_end import TunnelRelayEnd, join
from nodeagent.state.store import StateStore
from nodeagent.traffic.outlier import OutlierDetector
from nodeagent.traffic.routes import Target

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
    flags: str = ""  # REFUSE without a plan: the response flag (a waypoint's NC or UH)
    waypoint: str = ""  # the waypoint the connection goes through (or was refused for)
    plan: ServicePlan | None = field(default=None, compare=False)  # a service's traffic plan
    pick: Pick | None = field(default=None, compare=False)  # the endpoint this route tries

    def describe(self) -> str:
        if self.kind is RouteKind.HBONE:
            via = f" (waypoint {self.waypoint})" if self.waypoint else ""
            return f"HBONE {self.authority} via {format_authority(*self.destination)}{via}"
        if self.kind is RouteKind.REFUSE:
            return f"refused: {self.reason}"
        return f"{self.kind.value} {format_authority(*self.destination)}"


@dataclass(frozen=True, slots=True)
class _NoWaypoint:
    flag: str  # NC: unknown; UH: no ready endpoint
    why: str


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

    def __init__(self, store: StateStore, routing: ServiceRouting | None = None) -> None:
        self._store = store
        self.routing = routing or ServiceRouting(store, OutlierDetector(time.monotonic))

    def route(
        self,
        source: Workload | None,
        dst: Address,
        owns: Callable[[str], bool] = lambda _ip: False,
        source_ip: str = "",
    ) -> Route:
        """The route for a connection from `source` to the original destination `dst`;
        `owns(ip)` says whether ip is the source pod's own address."""
        host, port = dst
        try:
            ip = parse_ip(unmap(host))
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
            if service.waypoint is not None:
                return self._via_waypoint(
                    source, service.waypoint, ip, port, f"service {service.key}", service=service
                )
            return self._via_service(source, service, ip, port, source_ip)
        workload = self._store.workload_by_address(network, ip)
        if (
            workload is not None
            and workload.waypoint is not None
            and not self._from_waypoint(source, source_ip, workload.waypoint)
        ):
            return self._via_waypoint(
                source, workload.waypoint, ip, port, f"workload {workload.label}"
            )
        if workload is not None and workload.tunnel_protocol is TunnelProtocol.HBONE:
            return _hbone(workload, str(ip), port)
        departed = self._store.departed_by_address(network, ip) if workload is None else None
        if departed is not None and departed.tunnel_protocol is TunnelProtocol.HBONE:
            # Its own agent may not have held it yet: HBONE (refused or mTLS), never clear.
            return replace(
                _hbone(departed, str(ip), port),
                reason=f"workload {departed.label} left the mesh moments ago",
            )
        note = "workload without HBONE" if workload is not None else "unknown destination"
        return Route(
            RouteKind.PASSTHROUGH,
            (str(ip), port),
            workload_uid=workload.uid if workload is not None else "",
            reason=note,
        )

    def _via_waypoint(
        self,
        source: Workload | None,
        gateway: GatewayAddress,
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
        port: int,
        whose: str,
        service: Service | None = None,
    ) -> Route:
        """HBONE to a waypoint endpoint, authority the original destination; REFUSE (NC or
        UH) when the waypoint is unknown or has no ready endpoint."""
        dialled = (str(ip), port)
        name = _gateway_name(gateway)
        key = service.key if service is not None else ""
        found = self._waypoint_endpoint(source, gateway, ip)
        if isinstance(found, _NoWaypoint):
            return Route(
                RouteKind.REFUSE,
                dialled,
                service=key,
                reason=f"{whose} has waypoint {name}: {found.why}",
                flags=found.flag,
                waypoint=name,
            )
        waypoint, address, sans = found
        return Route(
            RouteKind.HBONE,
            address,
            authority=format_authority(str(ip), port),
            identities=_identities(waypoint, sans),
            workload_uid=waypoint.uid,
            service=key,
            service_hostname=service.hostname if service is not None else "",
            waypoint=name,
        )

    def _waypoint_endpoint(
        self,
        source: Workload | None,
        gateway: GatewayAddress,
        dialled: ipaddress.IPv4Address | ipaddress.IPv6Address,
    ) -> tuple[Workload, Address, tuple[str, ...]] | _NoWaypoint:
        """(waypoint workload, where to connect, its service's SANs), or why there is none."""
        hbone_port = gateway.hbone_mtls_port or INBOUND_HBONE_PORT
        target = gateway.destination
        if isinstance(target, NamespacedHostname):
            # ztunnel looks a waypoint host name up among services only.
            wp_service = self._store.service(str(target))
            if wp_service is None:
                return _NoWaypoint(NO_CLUSTER_FOUND, "no such service")
        else:
            wp_service = self._store.service_by_vip(target.network, target.address)
            if wp_service is None:
                workload = self._store.workload_by_address(target.network, target.address)
                if workload is None:
                    return _NoWaypoint(NO_CLUSTER_FOUND, "no workload or service has that address")
                if workload.status is not WorkloadStatus.HEALTHY:
                    return _NoWaypoint(
                        NO_HEALTHY_UPSTREAM, f"waypoint workload {workload.label} is not ready"
                    )
                # Referenced by IP: that IP is the destination (ztunnel does the same).
                return workload, (str(target.address), hbone_port), ()
        picked = self.routing.pick_waypoint(source, wp_service, hbone_port, dialled)
        if isinstance(picked, str):
            return _NoWaypoint(NO_HEALTHY_UPSTREAM, f"service {wp_service.key}: {picked}")
        candidate, workload = picked
        return (
            workload,
            (str(candidate.address), candidate.port),
            wp_service.subject_alt_names,
        )

    def _from_waypoint(
        self, source: Workload | None, source_ip: str, gateway: GatewayAddress
    ) -> bool:
        """Whether the connection comes from `gateway` itself (identity and address, as
        ztunnel's check_from_waypoint): its traffic to the workload must not loop back."""
        if source is None:
            return False
        target = gateway.destination
        members: tuple[Workload, ...]
        if isinstance(target, NamespacedHostname):
            wp_service = self._store.service(str(target))
        else:
            wp_service = self._store.service_by_vip(target.network, target.address)
        if wp_service is not None:
            members = tuple(e.workload for e in self._store.endpoints(wp_service.key))
        elif not isinstance(target, NamespacedHostname):
            members = self._store.workloads_by_address(target.network, target.address)
        else:
            members = ()
        ips = {str(a) for a in source.addresses}
        if source_ip:
            ips = {source_ip}
        identity = source.identity()
        return any(
            w.identity() == identity and any(str(a) in ips for a in w.addresses) for w in members
        )

    def _via_service(
        self,
        source: Workload | None,
        service: Service,
        vip: ipaddress.IPv4Address | ipaddress.IPv6Address,
        port: int,
        source_ip: str,
    ) -> Route:
        lb = service.load_balancing
        if lb is not None and lb.mode is LoadBalancingMode.PASSTHROUGH:
            return Route(RouteKind.PASSTHROUGH, (str(vip), port), service=service.key)
        plan = self.routing.plan(source, service, port, vip, source_ip)
        return self.next_route(plan)

    def next_route(self, plan: ServicePlan) -> Route:
        """The route to the plan's next endpoint (a REFUSE route when none is left)."""
        service, port = plan.service, plan.port
        pick = self.routing.next_pick(plan)
        if pick is None:
            return Route(
                RouteKind.REFUSE,
                (str(plan.dialled), port),
                service=service.key,
                reason=f"service {service.key} port {port}: {plan.note or 'no endpoint'}",
                plan=plan,
            )
        ep, workload = pick.candidate, pick.workload
        if workload.tunnel_protocol is TunnelProtocol.HBONE:
            base = _hbone(workload, str(ep.address), ep.port, service.subject_alt_names)
            kind, dest, authority, identities = (
                base.kind,
                base.destination,
                base.authority,
                base.identities,
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
            service=service.key,
            service_hostname=service.hostname,
            endpoint_key=ep.key,
            plan=plan,
            pick=pick,
        )


def _gateway_name(gateway: GatewayAddress) -> str:
    target = gateway.destination
    if isinstance(target, NamespacedHostname):
        return str(target)
    return str(target.address)


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
        pool: HbonePool | None,
        registry: ConnectionRegistry,
        *,
        routing: ServiceRouting | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        destination_of: Callable[[socket.socket], Address] = original_destination,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._destination_of = destination_of  # injected: tests have no REDIRECT
        self._store = store
        self.pool = pool
        self.registry = registry
        self.router = OutboundRouter(store, routing)
        self.routing = self.router.routing
        self._connect_timeout = connect_timeout
        self._sleep = sleep
        self.counts: dict[str, int] = {}
        self.mirrors: set[Mirror] = set()

    def _count(self, what: str, target: Target | None = None) -> None:
        """Count an event for the handler's stats and, given the target it hit, for the
        target's cluster (metrics, `nodeagent routes`)."""
        self.counts[what] = self.counts.get(what, 0) + 1
        if target is not None:
            self.routing.count(what, target)

    async def __call__(self, pod: LocalPod, sock: socket.socket, listener_port: int) -> None:
        # The whole connection runs in this one coroutine, no frames under it while the relay
        # runs: a frame is kept alive for as long as its connection.
        accepted = self._accept(pod, sock)
        if accepted is None:
            return
        source, client, dst, route, flags = accepted
        plan = route.plan
        if plan is not None:
            decision = plan.decision
            if decision.delay:
                self._count("fault_delay", decision.target)
                flags = FAULT_DELAY
                await self._sleep(decision.delay)
            if route.pick is not None and not self.routing.admit(plan, route.pick.target):
                self._count("overflow")
                log.info(
                    "pod %s: outbound %s refused: %s is at maxConnections",
                    pod.label,
                    hostport(*dst),
                    route.pick.target.label,
                )
                self._refused(pod, client, dst, route, OVERFLOW)
                reset_socket(sock)
                return
        live = None
        try:
            live = self._register(pod, client, dst, route, flags, task=asyncio.current_task())
            failures = 0
            while True:
                try:
                    upstream = await self._open(pod, source, client, route)
                    break
                except ConnectFailed as exc:
                    failures += 1
                    self._failed(pod, dst, route, str(exc))
                    following = self.router.next_route(plan) if plan is not None else None
                    if following is None or following.kind is RouteKind.REFUSE:
                        self._give_up(live, sock, route, failures, str(exc))
                        return
                    assert following.pick is not None and plan is not None
                    if not self.routing.admit(plan, following.pick.target):
                        self._count("overflow")
                        live.response_flags = join_flags(flags, OVERFLOW)
                        live.closed_reason = f"{following.pick.target.label} is at maxConnections"
                        reset_socket(sock)
                        return
                    self._count("retry", following.pick.target)
                    route = self._plain_if_no_tunnel(following)
                    live.protocol = HBONE if route.kind is RouteKind.HBONE else TCP
                    live.target = route.authority or hostport(*route.destination)
            if route.pick is not None:
                self.routing.record(route.pick, ok=True)
                self.routing.balancer.started(route.pick.candidate)
            try:
                relay, idle, mirror = await self._relay(
                    pod, source, sock, client, route, live, upstream
                )
                try:
                    await hold(relay)
                finally:
                    if idle is not None:
                        idle.cancel()
                    if mirror is not None:
                        mirror.close()
            finally:
                if route.pick is not None:
                    self.routing.balancer.ended(route.pick.candidate)
        except BaseException:
            sock.close()
            raise
        finally:
            if live is not None:
                self.registry.remove(live)
            if plan is not None:
                self.routing.release(plan)

    def _accept(
        self, pod: LocalPod, sock: socket.socket
    ) -> tuple[Workload | None, Address, Address, Route, str] | None:
        """Where a new connection goes: (source, client, destination, route, flags), or None
        once it was refused (and its socket reset or closed)."""
        try:
            dst = self._destination_of(sock)
            app_host, app_port = sock.getpeername()[:2]
        except OSError as exc:
            log.info("pod %s: outbound connection lost before use: %s", pod.label, exc)
            reset_socket(sock)
            return None
        dst = (unmap(dst[0]), dst[1])
        client = (unmap(app_host), app_port)
        if client[0] == "127.0.0.1":
            # Redirected at connect time (the eBPF backend): the app's socket is bound to
            # loopback, but the app is the pod, and logs and `forwarded` should say so.
            ipv4 = next((str(a) for a in pod.addresses if a.version == 4), None)
            if ipv4 is not None:
                client = (ipv4, app_port)
        source = self._store.workload(pod.uid)
        route = self._plain_if_no_tunnel(self.router.route(source, dst, pod.owns, client[0]))
        log.debug(
            "pod %s: %s -> %s: %s", pod.label, hostport(*client), hostport(*dst), route.describe()
        )
        if route.kind is RouteKind.REFUSE:
            self._count("refused")
            log.info("pod %s: outbound %s refused: %s", pod.label, hostport(*dst), route.reason)
            if route.plan is not None:
                # A route whose every destination is unusable is Envoy's NR; endpoints that
                # exist but none could be picked, UH.
                no_route = not route.plan.decision.targets
                self._refused(
                    pod, client, dst, route, NO_ROUTE if no_route else NO_HEALTHY_UPSTREAM
                )
            elif route.flags:
                self._refused(pod, client, dst, route, route.flags)
            reset_socket(sock)
            return None
        if route.plan is not None and route.plan.decision.abort:
            self._count("fault_abort", route.plan.decision.target)
            self._refused(pod, client, dst, route, FAULT_ABORT)
            reset_socket(sock)
            return None
        return source, client, dst, route, ""

    def _plain_if_no_tunnel(self, route: Route) -> Route:
        """Without a pool (an agent built without workload certificates, in tests) a tunnel
        route becomes plain TCP to what the tunnel would reach (the CONNECT authority)."""
        if self.pool is not None or route.kind is not RouteKind.HBONE:
            return route
        if route.waypoint:
            # Plain TCP to the original destination would bypass the waypoint: fail closed.
            return replace(
                route,
                kind=RouteKind.REFUSE,
                destination=parse_authority(route.authority),
                reason=f"waypoint {route.waypoint} needs a tunnel (no workload certificates)",
                flags=UPSTREAM_CONNECT_FAILURE,
            )
        return replace(
            route,
            kind=RouteKind.PASSTHROUGH,
            destination=parse_authority(route.authority),
            authority="",
            identities=frozenset(),
            reason="no tunnel (no workload certificates)",
        )

    def _refused(
        self, pod: LocalPod, client: Address, dst: Address, route: Route, flags: str
    ) -> None:
        """Count a connection refused before any upstream was tried, with its response flag."""
        live = self._register(pod, client, dst, route, flags, task=None)
        live.closed_reason = route.reason or flags
        self.registry.remove(live)

    def _register(
        self,
        pod: LocalPod,
        client: Address,
        dst: Address,
        route: Route,
        flags: str,
        task: asyncio.Task[object] | None,
    ) -> LiveConnection:
        live = self.registry.register(
            workload=pod.label,
            workload_uid=pod.uid,
            direction=OUTBOUND,
            protocol=HBONE if route.kind is RouteKind.HBONE else TCP,
            local=hostport(*client),
            remote=hostport(*dst),
            target=route.authority or hostport(*route.destination),
            source_identity=pod.identity,
            task=task,
        )
        live.response_flags = flags
        return live

    async def _open(
        self, pod: LocalPod, source: Workload | None, client: Address, route: Route
    ) -> TunnelStream | socket.socket:
        """Connect to the route's destination: a CONNECT stream, or a plain TCP socket.
        Raises ConnectFailed naming the cause."""
        timeout = self._connect_timeout
        policy = route.pick.target.policy if route.pick is not None else None
        if policy is not None and policy.tcp is not None and policy.tcp.connect_timeout:
            timeout = policy.tcp.connect_timeout
        if route.kind is not RouteKind.HBONE:
            try:
                upstream, _ = await connect_in_pod(pod, route.destination, connect_timeout=timeout)
            except (OSError, TimeoutError) as exc:
                raise ConnectFailed(f"{route.describe()}: {exc or type(exc).__name__}") from None
            return upstream
        assert self.pool is not None  # routes without a pool are plain (_plain_if_no_tunnel)
        key = PoolKey(pod.uid, pod.identity, route.identities, route.destination)
        headers = [forwarded_header(client, route.service_hostname), traceparent_header()]
        baggage = source_baggage(source, pod)
        if baggage is not None:
            headers.append(baggage)

        async def dial(address: Address) -> socket.socket:
            upstream, _ = await connect_in_pod(pod, address, connect_timeout=timeout)
            return upstream

        try:
            if policy is not None and policy.tcp is not None and policy.tcp.connect_timeout:
                # asyncio.timeout, not wait_for: no extra task per connection.
                async with asyncio.timeout(timeout):
                    return await self.pool.open_tunnel(key, route.authority, headers, dial)
            return await self.pool.open_tunnel(key, route.authority, headers, dial)
        except HboneConnectError as exc:
            raise ConnectFailed(str(exc)) from None
        except TimeoutError:
            raise ConnectFailed(f"{route.describe()}: connect timeout after {timeout:g}s") from None

    def _failed(self, pod: LocalPod, dst: Address, route: Route, why: str) -> None:
        self._count("tunnel_failed" if route.kind is RouteKind.HBONE else "upstream_failed")
        log.info("pod %s: outbound %s: %s", pod.label, hostport(*dst), why)
        if route.pick is not None and self.routing.record(route.pick, ok=False):
            self._count("ejection")
            log.warning(
                "endpoint %s of %s ejected as an outlier", route.pick.candidate.key, route.service
            )

    def _give_up(
        self, live: LiveConnection, sock: socket.socket, route: Route, failures: int, why: str
    ) -> None:
        """No attempt opened an upstream: URX after retries (Envoy), else UF for plain TCP and
        ztunnel's CONNECT (from the close reason) for a tunnel."""
        if failures > 1:
            live.response_flags = join_flags(live.response_flags, UPSTREAM_RETRY_LIMIT)
        elif route.kind is not RouteKind.HBONE:
            live.response_flags = join_flags(live.response_flags, UPSTREAM_CONNECT_FAILURE)
        if route.kind is RouteKind.HBONE:
            live.closed_reason = f"{TUNNEL_OPEN_FAILED}: {why}"
            sock.close()  # as ztunnel: the app sees a normal close
        else:
            live.closed_reason = why
            reset_socket(sock)

    async def _relay(
        self,
        pod: LocalPod,
        source: Workload | None,
        sock: socket.socket,
        client: Address,
        route: Route,
        live: LiveConnection,
        upstream: TunnelStream | socket.socket,
    ) -> tuple[Relay, asyncio.Task[None] | None, Mirror | None]:
        """Join the app's socket and the upstream as `live.relay`; returns it with what the
        caller ends with it: the idle-timeout watch and the mirror, if any."""
        plan = route.plan
        mirror = None
        if plan is not None and plan.decision.mirror is not None:
            mirror = self._mirror(pod, source, client, plan)
        try:
            if isinstance(upstream, socket.socket):
                self._count(route.kind.value)
                try:
                    app = await self._app_end("downstream", sock, mirror)
                    up_end = await connect_tcp_end("upstream", upstream)
                except BaseException:
                    upstream.close()
                    raise
                relay = relay_pair(app, up_end)
            else:
                self._count("hbone")
                assert self.pool is not None  # a stream came from it
                tunnel_end = TunnelRelayEnd("tunnel", upstream)
                live.destination_identity = self.pool.peer_identity(
                    PoolKey(pod.uid, pod.identity, route.identities, route.destination), upstream
                )
                try:
                    app = await self._app_end("app", sock, mirror)
                except BaseException:
                    tunnel_end.detach()
                    upstream.reset()
                    raise
                relay = join(app, tunnel_end)
        except BaseException:
            if mirror is not None:
                mirror.close()  # no relay to copy from
            raise
        live.relay = relay
        idle = None
        policy = route.pick.target.policy if route.pick is not None else None
        if policy is not None and policy.tcp is not None and policy.tcp.idle_timeout:
            idle = asyncio.get_running_loop().create_task(
                close_when_idle(relay, policy.tcp.idle_timeout, self._sleep)
            )
        return relay, idle, mirror

    @staticmethod
    async def _app_end(name: str, sock: socket.socket, mirror: Mirror | None) -> TcpRelayEnd:
        if mirror is None:
            return await connect_tcp_end(name, sock)
        end = await connect_tcp_end(name, sock, end=MirroredTcpEnd)
        assert isinstance(end, MirroredTcpEnd)
        end.tap = mirror.feed  # before the relay is joined: the early bytes are copied too
        return end

    def _mirror(
        self, pod: LocalPod, source: Workload | None, client: Address, plan: ServicePlan
    ) -> Mirror | None:
        """Start copying this connection's client bytes to the plan's mirror target."""
        target = plan.decision.mirror
        assert target is not None
        shadow = self.routing.mirror_plan(plan, target)
        route = self.router.next_route(shadow) if shadow is not None else None
        if route is None or route.kind is RouteKind.REFUSE:
            self._count("mirror_dropped", target)
            return None

        async def open_mirror() -> TunnelStream | socket.socket:
            return await self._open(pod, source, client, route)

        mirror = Mirror(open_mirror, on_drop=lambda why: self._mirror_dropped(pod, target, why))
        self.mirrors.add(mirror)
        mirror.closed.add_done_callback(lambda _f: self.mirrors.discard(mirror))
        return mirror

    def _mirror_dropped(self, pod: LocalPod, target: Target, why: str) -> None:
        self._count("mirror_dropped", target)
        log.info("pod %s: mirror dropped: %s", pod.label, why)


class ConnectFailed(Exception):
    """One connect attempt failed; the message names the destination and the cause."""


async def close_when_idle(
    relay: Relay, idle: float, sleep: Callable[[float], Awaitable[None]]
) -> None:
    """`connectionPool.tcp.idleTimeout`: close both sides once no byte moved for `idle` s."""
    moved, quiet = -1, 0.0
    step = idle / 4
    while not relay.done.done():
        now = relay.a.received + relay.b.received
        quiet = quiet + step if now == moved else 0.0
        if quiet >= idle:
            relay.finish("idle timeout")
            return
        moved = now
        await sleep(step)
