"""The waypoint's router: from an accepted tunnel and a request head to an endpoint stream.

`WaypointRouter.accept` reads a CONNECT as the client's agent sends it
(authority = the service `VIP:port` the app dialled, `forwarded: for=` = the
app's own address) and gives the tunnel a `TunnelDispatcher`, the
`exchange.Dispatcher` the HTTP codecs ask per request:

* `route`: the service's HTTP route table (`RouteTable.decide_http`, the same
  compiled table the node agent uses for tcp routes) picks a route; a redirect
  or direct response is answered here, no matching route is Envoy's 404 `NR`;
* `pick`: the next endpoint of the route's targets through `ServiceRouting`
  (subsets, balancing, ejection, circuit breaking), as the agent picks one per
  connection; the waypoint does it per request;
* `open`: an HBONE tunnel to the endpoint as the waypoint itself (the
  destination's agent authorizes the waypoint's identity), with the original
  caller in `forwarded` and `baggage`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Protocol

from nodeagent.hbone.aio import TunnelStream
from nodeagent.hbone.headers import format_authority, parse_authority
from nodeagent.hbone.server import AcceptedStream
from nodeagent.model.constants import INBOUND_HBONE_PORT
from nodeagent.model.identity import Identity, IdentityError
from nodeagent.model.routing import TcpPool, TrafficPolicy
from nodeagent.model.workload import Service, TunnelProtocol, Workload
from nodeagent.proxy.pool import HboneConnectError, HbonePool, PoolKey
from nodeagent.proxy.relay import connect_socket
from nodeagent.proxy.routing import Pick, ServicePlan, ServiceRouting
from nodeagent.state.store import StateStore
from nodeagent.traffic.balancer import FAULT_ABORT, FAULT_DELAY, MIRROR_DROPPED, RETRY
from nodeagent.traffic.balancer import OVERFLOW as OVERFLOW_EVENT
from nodeagent.traffic.http import HttpRequest
from nodeagent.traffic.outlier import Outcome
from nodeagent.traffic.resilience import shadow_authority
from nodeagent.traffic.routes import Caller, Target
from nodeagent.traffic.selection import SourceLocation
from nodeagent.waypoint.exchange import (
    ByteStream,
    Endpoint,
    Forward,
    LocalReply,
    RequestHead,
    RequestRecord,
    UpstreamError,
)
from nodeagent.waypoint.streams import READ_SIZE, SocketByteStream, TunnelByteStream

log = logging.getLogger(__name__)

# Envoy's local reply bodies for these flags (source/common/router/router.cc and
# source/common/http/conn_manager_impl.cc name the same texts).
NO_ROUTE = LocalReply(404, flags="NR")
NO_HEALTHY_UPSTREAM = LocalReply(503, body=b"no healthy upstream", flags="UH")
OVERFLOW = LocalReply(
    503,
    body=b"upstream connect error or disconnect/reset before headers. reset reason: overflow",
    flags="UO",
)
CONNECT_FAILURE = LocalReply(
    503,
    body=(
        b"upstream connect error or disconnect/reset before headers. "
        b"reset reason: connection failure"
    ),
    flags="UF",
)


@dataclass(frozen=True, slots=True)
class TunnelCaller:
    """Who sent a tunnel: the identity its TLS proved and, when known, its workload."""

    identity: Identity
    address: tuple[str, int]  # the app's own address (from `forwarded`, else the peer's)
    workload: Workload | None
    forwarded: str  # the `forwarded` header to pass on
    baggage: str


class RequestObserver:
    """What the dispatcher reports each finished request to (telemetry, access log)."""

    def mirror_done(self, status: int) -> None:
        """A mirror copy ended (status 0: it got no response)."""

    def request_done(
        self,
        record: RequestRecord,
        caller: TunnelCaller,
        service: Service | None,
        workload: Workload | None,
    ) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class HttpAuthorizer(Protocol):
    """The L7 authorization of the waypoint (AuthorizationPolicies attached to it)."""

    def check(
        self, caller: TunnelCaller, service: Service | None, port: int, request: HttpRequest
    ) -> str | None:
        """None when the request is allowed; else why not (for the log), answered 403."""
        ...


# Envoy's RBAC filter answers a denied request so (source/extensions/filters/http/rbac).
# No response flag: the denial shows as response code details only.
ACCESS_DENIED = LocalReply(403, (("content-type", "text/plain"),), b"RBAC: access denied")


class RequestGate:
    """Envoy's HTTP circuit breaker per cluster: at most min(maxConnections, http2MaxRequests)
    requests in flight; past it a request waits in the cluster's queue, and past
    http1MaxPendingRequests waiting ones it gets 503 UO at once. Unset limits are Istio's
    (2^32-1: no limit)."""

    def __init__(self, routing: ServiceRouting) -> None:
        self._routing = routing
        self._queues: dict[tuple[str, str, int], deque[asyncio.Future[None]]] = {}
        self._retries: dict[tuple[str, str, int], int] = {}  # retries in flight per cluster

    def waiting(self, target: Target) -> int:
        return len(self._queues.get(target.cluster, ()))

    def enter(self, plan: ServicePlan, target: Target) -> bool | None:
        """True: admitted; False: overflow (counted); None: the request must wait."""
        routing = self._routing
        if plan.admitted is not None and plan.admitted.cluster == target.cluster:
            return True
        limit = _active_limit(target.policy)
        if limit is None:
            return routing.admit(plan, target)
        counters = routing.balancer.counters(target.cluster)
        if counters.open < limit and not self._queues.get(target.cluster):
            return routing.admit(plan, _limited(target, limit))
        http = target.policy.http
        pending = http.max_pending_requests if http is not None else None
        if pending is not None and self.waiting(target) >= pending:
            routing.count(OVERFLOW_EVENT, target)
            return False
        return None

    async def wait(self, queued: _Queued, dispatcher: TunnelDispatcher) -> Endpoint | LocalReply:
        """Wait for a slot, first come first served (the route's timeout bounds the wait)."""
        target, plan = queued.pick.target, queued.plan
        limit = _active_limit(target.policy)
        assert limit is not None
        queue = self._queues.setdefault(target.cluster, deque())
        first = False
        while True:
            future = asyncio.get_running_loop().create_future()
            if first:
                queue.appendleft(future)  # woken but beaten to the slot: keep our turn
            else:
                queue.append(future)
            try:
                await future
            finally:
                if future in queue:
                    queue.remove(future)
                if not queue:
                    self._queues.pop(target.cluster, None)
            if self._routing.admit(plan, _limited(target, limit)):
                return dispatcher._endpoint(plan, queued.pick)
            first = True
            queue = self._queues.setdefault(target.cluster, deque())

    def may_retry(self, plan: ServicePlan) -> bool:
        """Whether the cluster of the plan's current target has room for one more retry
        (maxRetries: retries in flight at once; Istio's default 2^32-1)."""
        target = plan.target
        http = target.policy.http if target is not None else None
        if target is None or http is None or http.max_retries is None:
            return True
        if self._retries.get(target.cluster, 0) < http.max_retries:
            return True
        self._routing.count(OVERFLOW_EVENT, target)
        return False

    def retry_started(self, target: Target) -> None:
        self._retries[target.cluster] = self._retries.get(target.cluster, 0) + 1

    def retry_ended(self, target: Target) -> None:
        left = self._retries.get(target.cluster, 0) - 1
        if left > 0:
            self._retries[target.cluster] = left
        else:
            self._retries.pop(target.cluster, None)

    def released(self, target: Target) -> None:
        """A slot of `target`'s cluster was freed: the first waiting request takes it."""
        queue = self._queues.get(target.cluster)
        while queue:
            future = queue.popleft()
            if not future.done():
                future.set_result(None)
                return


def _active_limit(policy: TrafficPolicy) -> int | None:
    limits = []
    if policy.tcp is not None and policy.tcp.max_connections is not None:
        limits.append(policy.tcp.max_connections)
    if policy.http is not None and policy.http.max_requests is not None:
        limits.append(policy.http.max_requests)
    return min(limits) if limits else None


def _limited(target: Target, limit: int) -> Target:
    """The target with `limit` as its slot count (the same cluster, so the same counters)."""
    tcp = target.policy.tcp or TcpPool()
    return replace(target, policy=replace(target.policy, tcp=replace(tcp, max_connections=limit)))


class WaypointRouter:
    """Shared by every tunnel the waypoint serves."""

    def __init__(
        self,
        store: StateStore,
        routing: ServiceRouting,
        pool: HbonePool,
        identity: Identity,
        uid: str,
        observer: RequestObserver,
        *,
        rng: random.Random | None = None,
        connect: Callable[[tuple[str, int]], asyncio.Future[socket.socket]] | None = None,
        authorizer: HttpAuthorizer | None = None,
    ) -> None:
        self.store = store
        self.routing = routing
        self.pool = pool
        self.identity = identity
        self.uid = uid
        self.observer = observer
        self._rng = rng or random.Random()
        self._connect = connect
        self.authorizer = authorizer
        self.gate = RequestGate(routing)

    def accept(self, accepted: AcceptedStream) -> TunnelDispatcher | str:
        """The tunnel's dispatcher, or why the CONNECT is refused (answered 400)."""
        try:
            host, port = parse_authority(accepted.authority)
            ip = ipaddress.ip_address(host)
        except ValueError as exc:
            return f"authority {accepted.authority!r}: {exc}"
        headers = dict(accepted.headers)
        forwarded = headers.get("forwarded", "")
        address = _forwarded_for(forwarded) or accepted.peer
        source = self.store.workload_by_address("", ipaddress.ip_address(address[0]))
        caller = TunnelCaller(
            accepted.peer_identity, address, source, forwarded, headers.get("baggage", "")
        )
        service = self.store.service_by_vip("", ip)
        return TunnelDispatcher(self, caller, service, ip, port)

    async def dial(self, address: tuple[str, int]) -> socket.socket:
        if self._connect is not None:
            return await self._connect(address)
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await connect_socket(sock, address)
        except BaseException:
            sock.close()
            raise
        return sock


class TunnelDispatcher:
    """`exchange.Dispatcher` for one tunnel: its caller and destination service are fixed."""

    def __init__(
        self,
        router: WaypointRouter,
        caller: TunnelCaller,
        service: Service | None,
        dialled: ipaddress.IPv4Address | ipaddress.IPv6Address,
        port: int,
    ) -> None:
        self._router = router
        self.caller = caller
        self.service = service
        self._dialled = dialled
        self._port = port
        self._match_caller = Caller.of(caller.workload)
        self._location = (
            SourceLocation.of(caller.workload) if caller.workload is not None else SourceLocation()
        )

    @property
    def label(self) -> str:
        return (
            self.service.key
            if self.service is not None
            else format_authority(str(self._dialled), self._port)
        )

    def route(self, head: RequestHead) -> Forward | LocalReply:
        service = self.service
        if service is None:
            return NO_ROUTE  # no service of this waypoint has that address
        request = HttpRequest(
            method=head.method,
            path=head.path,
            authority=head.authority,
            headers=MappingProxyType(_joined(head.headers)),
        )
        router = self._router
        if router.authorizer is not None:
            denied = router.authorizer.check(self.caller, service, self._port, request)
            if denied is not None:
                log.info(
                    "waypoint: %s %s to %s denied: %s", head.method, head.path, self.label, denied
                )
                return ACCESS_DENIED
        decision = router.routing.table.decide_http(
            service.key, self._port, request, self._match_caller, router._rng
        )
        if decision is None:
            return NO_ROUTE
        if decision.reply is not None:
            reply = decision.reply
            return LocalReply(reply.status, tuple(reply.headers), reply.body)
        if decision.decision is None:
            return NO_ROUTE
        sent = replace(
            head,
            path=decision.path,
            authority=decision.authority,
            headers=decision.request_headers.apply(head.headers),
        )
        retry = decision.retry
        tries = 1 + (retry.retries if retry is not None else 0)
        plan = ServicePlan(
            replace(decision.decision, max_attempts=tries),
            service,
            self._location,
            self.caller.address[0],
            self._dialled,
            self._port,
        )
        target = plan.target
        abort = None
        if decision.abort is not None:
            local = decision.abort
            abort = LocalReply(local.status, local.headers, local.body, local.flags or "FI")
            if target is not None:
                router.routing.count(FAULT_ABORT, target)
        if decision.delay and target is not None:
            router.routing.count(FAULT_DELAY, target)
        return Forward(
            sent,
            decision.response_headers,
            decision.route,
            _RequestPlan(plan, decision.mirrors),
            delay=decision.delay,
            abort=abort,
            timeout=decision.timeout,
            retry=retry,
            mirror=bool(decision.mirrors),
            may_retry=(lambda: router.gate.may_retry(plan)) if retry is not None else None,
        )

    async def pick(self, forward: Forward) -> Endpoint | LocalReply:
        plan: ServicePlan = forward.plan.service
        retrying = plan.attempts > 0
        if retrying and plan.target is not None:
            self._router.routing.count(RETRY, plan.target)
        picked = self._next(plan, retrying=retrying)
        if isinstance(picked, _Queued):
            picked = await self._router.gate.wait(picked, self)
        if retrying and isinstance(picked, Endpoint) and isinstance(picked.token, _Held):
            picked.token.retry = True
            self._router.gate.retry_started(picked.token.pick.target)
        return picked

    def mirrors(self, forward: Forward) -> list[tuple[Endpoint, RequestHead]]:
        request: _RequestPlan = forward.plan
        routing = self._router.routing
        out = []
        for target in request.mirrors:
            plan = routing.mirror_plan(request.service, target)
            pick = routing.next_pick(plan) if plan is not None else None
            if plan is None or pick is None:
                routing.count(MIRROR_DROPPED, target)
                continue
            head = replace(forward.head, authority=shadow_authority(forward.head.authority))
            out.append((self._endpoint(plan, pick, held=False), head))
        return out

    def mirror_done(self, endpoint: Endpoint, status: int) -> None:
        if status == 0 or status >= 500:
            target = endpoint.token
            if isinstance(target, _Mirror):
                self._router.routing.count(MIRROR_DROPPED, target.pick.target)
        self._router.observer.mirror_done(status)

    def attempt_done(self, endpoint: Endpoint, status: int, *, local_origin: bool) -> None:
        held = endpoint.token
        if isinstance(held, _Held):
            outcome = Outcome(local_origin=True) if local_origin else Outcome(status=status)
            held.finish(self._router, outcome)

    def pick_l4(self) -> Endpoint | LocalReply:
        """An endpoint for a tunnel that carries no HTTP: the service's tcp routes decide."""
        service = self.service
        if service is None:
            return NO_ROUTE
        routing = self._router.routing
        plan = routing.plan(
            self.caller.workload, service, self._port, self._dialled, self.caller.address[0]
        )
        picked = self._next(plan)
        if isinstance(picked, _Queued):
            # Envoy's TCP proxy has no pending queue: a full cluster refuses the connection.
            self._router.routing.count(OVERFLOW_EVENT, picked.pick.target)
            return OVERFLOW
        return picked

    def finish_l4(self, endpoint: Endpoint, *, ok: bool = True) -> None:
        held = endpoint.token
        if isinstance(held, _Held):
            held.finish(self._router, Outcome.connected() if ok else Outcome(local_origin=True))

    def _next(
        self, plan: ServicePlan, *, retrying: bool = False
    ) -> Endpoint | LocalReply | _Queued:
        routing = self._router.routing
        pick = routing.next_pick(plan)
        if pick is None and retrying and plan.attempts_left:
            # Envoy's retry host predicate prefers other endpoints but, when every one was
            # tried, takes one again rather than fail the retry.
            plan.tried.clear()
            plan.target_index, plan.panic = 0, False
            pick = routing.next_pick(plan)
        if pick is None:
            return NO_HEALTHY_UPSTREAM
        admitted = self._router.gate.enter(plan, pick.target)
        if admitted is None:
            return _Queued(plan, pick)
        if not admitted:
            return OVERFLOW
        return self._endpoint(plan, pick)

    def _endpoint(self, plan: ServicePlan, pick: Pick, *, held: bool = True) -> Endpoint:
        candidate, workload = pick.candidate, pick.workload
        key = (workload.uid, str(candidate.address), candidate.port)
        labels = {
            "workload": workload.workload_name or workload.name,
            "namespace": workload.namespace,
            "principal": str(workload.identity()),
            "version": workload.canonical_revision,
            "app": workload.canonical_name,
            "uid": workload.uid,
        }
        http = pick.target.policy.http
        return Endpoint(
            key,
            format_authority(str(candidate.address), candidate.port),
            MappingProxyType(labels),
            _Held(plan, pick) if held else _Mirror(pick),
            max_requests=http.max_requests_per_connection if http is not None else None,
            idle_timeout=http.idle_timeout if http is not None else None,
        )

    async def open(self, endpoint: Endpoint, protocol: str) -> ByteStream:
        router = self._router
        uid, ip, port = _endpoint_key(endpoint)
        workload = router.store.workload(uid)
        try:
            if workload is None:
                raise ConnectionError(f"endpoint {uid} is gone")
            if workload.tunnel_protocol is TunnelProtocol.HBONE:
                stream = await self._tunnel(workload, ip, port)
                return TunnelByteStream(stream)
            sock = await router.dial((ip, port))
            reader, writer = await asyncio.open_connection(sock=sock, limit=2 * READ_SIZE)
            return SocketByteStream(reader, writer)
        except (OSError, HboneConnectError) as exc:
            log.info("waypoint: %s -> %s: %s", self.label, endpoint.address, exc)
            raise UpstreamError(CONNECT_FAILURE, str(exc)) from None

    async def _tunnel(self, workload: Workload, ip: str, port: int) -> TunnelStream:
        router = self._router
        identities = {workload.identity()}
        if self.service is not None:
            for san in self.service.subject_alt_names:
                try:
                    identities.add(Identity.parse(san))
                except IdentityError:
                    pass
        key = PoolKey(router.uid, router.identity, frozenset(identities), (ip, INBOUND_HBONE_PORT))
        headers: list[tuple[str, str]] = []
        caller = self.caller
        headers.append(
            ("forwarded", caller.forwarded or f'for="{format_authority(*caller.address)}"')
        )
        if caller.baggage:
            headers.append(("baggage", caller.baggage))
        return await router.pool.open_tunnel(key, format_authority(ip, port), headers, router.dial)

    def record(self, record: RequestRecord) -> None:
        router = self._router
        workload = None
        endpoint = record.endpoint
        if endpoint is not None:
            held = endpoint.token
            if isinstance(held, _Held):
                held.finish(router, _outcome(record))
            workload = router.store.workload(endpoint.labels.get("uid", ""))
        router.observer.request_done(record, self.caller, self.service, workload)


@dataclass(slots=True)
class _RequestPlan:
    """The dispatcher's state for one forwarded request: its tries' plan, its mirrors."""

    service: ServicePlan
    mirrors: tuple[Target, ...]


@dataclass(frozen=True, slots=True)
class _Mirror:
    """The token of a mirror copy's endpoint: no slot, no outlier counting."""

    pick: Pick


@dataclass(slots=True)
class _Queued:
    """A request waiting for a slot in its cluster (http1MaxPendingRequests)."""

    plan: ServicePlan
    pick: Pick


@dataclass(slots=True)
class _Held:
    """One picked endpoint of one try: its circuit-breaker slot, until finished."""

    plan: ServicePlan
    pick: Pick
    done: bool = False
    retry: bool = False  # a retry's try: it holds one of the cluster's maxRetries

    def finish(self, router: WaypointRouter, outcome: Outcome | None) -> None:
        """Release the slot; `outcome` feeds outlier detection (None: the try says nothing
        about the endpoint)."""
        if self.done:
            return
        self.done = True
        routing = router.routing
        if outcome is not None:
            routing.record_outcome(self.pick, outcome)
        if self.retry:
            router.gate.retry_ended(self.pick.target)
        target = self.plan.admitted
        routing.release(self.plan)
        if target is not None:
            router.gate.released(target)


# The client's doing (it went away, reset its stream, sent a malformed request): such a
# request tells nothing about the endpoint, so outlier detection does not count it.
DOWNSTREAM_FLAGS = frozenset({"DC", "DR", "DPE"})
# Our side gave up on the endpoint (no connection, a reset before the head, a timeout).
LOCAL_ORIGIN_FLAGS = frozenset({"UF", "UC", "UR", "UT", "UPE"})


def _outcome(record: RequestRecord) -> Outcome | None:
    """What the last try says about its endpoint: the response status, a local-origin
    failure, or None when the client ended the request before the endpoint answered."""
    flags = set(record.flags.split(",")) if record.flags else set()
    if flags & DOWNSTREAM_FLAGS:
        return None if record.status == 0 or "DPE" in flags else Outcome(status=record.status)
    if record.status and not flags & LOCAL_ORIGIN_FLAGS:
        return Outcome(status=record.status)
    if flags & LOCAL_ORIGIN_FLAGS:
        return Outcome(local_origin=True)
    return None


def _endpoint_key(endpoint: Endpoint) -> tuple[str, str, int]:
    key: tuple[str, str, int] = endpoint.key  # type: ignore[assignment]  # made by _next
    return key


def _joined(headers: tuple[tuple[str, str], ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in headers:
        out[name] = f"{out[name]},{value}" if name in out else value
    return out


def _forwarded_for(value: str) -> tuple[str, int] | None:
    """The first `for=` of a `forwarded` header as ztunnel writes it (`for="ip:port"`)."""
    for part in value.split(";"):
        name, _, raw = part.strip().partition("=")
        if name.strip().lower() != "for":
            continue
        try:
            host, port = parse_authority(raw.strip().strip('"'))
            ipaddress.ip_address(host)
        except ValueError:
            return None
        return host, port
    return None
