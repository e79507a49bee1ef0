"""What the admin surface shows of traffic management: `/routes` and explain's route part.

Both read the outbound side's route state (`nodeagent.proxy.routing.ServiceRouting`,
through the `RoutingState` protocol: admin sits beside proxy, not above it) and the
state store, and never change anything: no round-robin turn taken, no random draw,
no connection slot held. Output is JSON in camelCase, as the other admin answers.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from typing import Any, Protocol

from nodeagent.model.routing import (
    HttpFault,
    HttpMatch,
    HttpMirror,
    HttpPool,
    HttpRetry,
    L4Match,
    MatchKind,
    OutlierDetection,
    StringMatch,
    TcpPool,
    resolve_host,
)
from nodeagent.model.workload import IPAddress, NamespacedHostname, Service, Workload
from nodeagent.state.store import StateStore
from nodeagent.traffic.balancer import ClusterBalancer, ClusterCounters
from nodeagent.traffic.endpoints import Skipped
from nodeagent.traffic.routes import (
    Caller,
    DestinationSummary,
    HttpRouteEntry,
    RouteSummary,
    RouteTable,
    ServiceTraffic,
    Target,
)
from nodeagent.traffic.selection import Candidate, SourceLocation


class RoutingState(Protocol):
    """nodeagent.proxy.routing.ServiceRouting, read by attribute."""

    @property
    def table(self) -> RouteTable: ...
    @property
    def balancer(self) -> ClusterBalancer: ...
    def endpoints_of(
        self, target: Target, dialled: IPAddress | None = None
    ) -> tuple[tuple[Candidate, ...], tuple[Skipped, ...]]: ...


class RoutePreview(Protocol):
    """Explain's route part for a connection from a workload to `service:port` (JSON-able)."""

    def preview(
        self, source: Workload | None, service: str, port: int, dialled: IPAddress
    ) -> Mapping[str, Any]: ...


def address_text(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def match_text(match: L4Match) -> str:
    """One `match` entry as a line (`port 80, sourceLabels app=web`)."""
    if match.port == -1:
        return "gateways only (never mesh traffic)"
    parts = []
    if match.port:
        parts.append(f"port {match.port}")
    if match.source_labels:
        labels = ",".join(f"{k}={v}" for k, v in sorted(match.source_labels.items()))
        parts.append(f"sourceLabels {labels}")
    if match.source_namespace:
        parts.append(f"sourceNamespace {match.source_namespace}")
    if match.destination_subnets:
        parts.append(f"destinationSubnets {','.join(match.destination_subnets)}")
    return ", ".join(parts) or "any"


def destination_json(d: DestinationSummary) -> dict[str, Any]:
    return {
        "host": d.host,
        "service": d.service,  # empty: the host or subset resolved to nothing (see notes)
        "subset": d.subset,
        "port": d.port or None,
        "weight": d.weight,
    }


def route_json(route: RouteSummary) -> dict[str, Any]:
    spec = route.spec
    out: dict[str, Any] = {
        "name": route.name,
        "match": [match_text(m) for m in spec.match] or ["any"],
        "destinations": [destination_json(d) for d in route.destinations],
        "maxConnectAttempts": spec.max_connect_attempts,
    }
    fault = spec.fault
    if fault is not None:
        out["fault"] = {
            "abortPercent": fault.abort_percent.value if fault.abort_percent else None,
            "delaySeconds": fault.delay if fault.delay_percent else None,
            "delayPercent": fault.delay_percent.value if fault.delay_percent else None,
        }
    if route.mirror is not None and spec.mirror is not None:
        out["mirror"] = {**destination_json(route.mirror), "percent": spec.mirror.percent.value}
    return out


def _string_match(name: str, m: StringMatch) -> str:
    if m.kind is MatchKind.PRESENT:
        return f"{name} present"
    return f"{name} {m.kind.value} {m.value or (m.pattern.pattern if m.pattern else '')}"


def http_match_text(match: HttpMatch) -> str:
    """One `HTTPMatchRequest` in one line (every condition must hold)."""
    parts = []
    for name, m in (("uri", match.uri), ("authority", match.authority), ("method", match.method)):
        if m is not None:
            parts.append(_string_match(name, m))
    parts += [_string_match(f"header {h}", m) for h, m in match.headers]
    parts += [f"no {_string_match(f'header {h}', m)}" for h, m in match.without_headers]
    parts += [_string_match(f"query {q}", m) for q, m in match.query_params]
    if match.port:
        parts.append(f"port {match.port}" if match.port > 0 else "gateways only")
    if match.source_labels:
        parts.append("from " + ",".join(f"{k}={v}" for k, v in match.source_labels.items()))
    if match.source_namespace:
        parts.append(f"from namespace {match.source_namespace}")
    return " and ".join(parts) or "any request"


# Istio's retry policy for an http route that writes no `retries` (DefaultPolicy in istio/istio
# pilot/pkg/networking/core/route/retry/retry.go): 2 retries on these, 503 the retriable status.
ISTIO_DEFAULT_RETRY_ATTEMPTS = 2
ISTIO_DEFAULT_RETRY_ON = (
    "connect-failure",
    "refused-stream",
    "unavailable",
    "cancelled",
    "retriable-status-codes",
)
ISTIO_DEFAULT_RETRY_STATUS_CODES: tuple[
    int, ...
] = ()  # Istio >= 1.24: no 503 (EXCLUDE_UNSAFE_503_FROM_DEFAULT_RETRY)


def retries_json(retry: HttpRetry | None) -> dict[str, Any]:
    """The retry policy in effect, as istiod turns `HTTPRetry` into Envoy's: none written is
    Istio's default (`default: true`); `retryOn` unwritten keeps the default conditions and
    503 (`retryOnDefault: true`); status codes in `retryOn` add `retriable-status-codes`;
    `attempts: 0` disables retries."""
    if retry is None:
        return {
            "default": True,
            "attempts": ISTIO_DEFAULT_RETRY_ATTEMPTS,
            "perTryTimeoutSeconds": None,
            "retryOn": list(ISTIO_DEFAULT_RETRY_ON),
            "retryOnDefault": True,
            "statusCodes": list(ISTIO_DEFAULT_RETRY_STATUS_CODES),
            "remoteLocalities": False,
        }
    written = bool(retry.retry_on or retry.status_codes)
    retry_on = list(retry.retry_on) if written else list(ISTIO_DEFAULT_RETRY_ON)
    if retry.status_codes and "retriable-status-codes" not in retry_on:
        retry_on.append("retriable-status-codes")
    codes = retry.status_codes if written else ISTIO_DEFAULT_RETRY_STATUS_CODES
    return {
        "default": False,
        "attempts": retry.attempts,
        "perTryTimeoutSeconds": retry.per_try_timeout,
        "retryOn": retry_on,
        "retryOnDefault": not written,
        "statusCodes": list(codes),
        "remoteLocalities": retry.remote_localities,
    }


def http_fault_json(fault: HttpFault) -> dict[str, Any]:
    """A delay and/or an abort with their shares of requests (null: not injected)."""
    delayed = fault.delay_percent is not None
    aborted = fault.abort_percent is not None
    return {
        "delaySeconds": fault.delay if delayed else None,
        "delayPercent": fault.delay_percent.value if fault.delay_percent else None,
        "abortHttpStatus": (fault.abort_status or None) if aborted else None,
        "abortGrpcStatus": fault.abort_grpc if aborted else None,
        "abortPercent": fault.abort_percent.value if fault.abort_percent else None,
    }


def http_mirror_json(
    mirror: HttpMirror, namespace: str, by_host: Mapping[str, str]
) -> dict[str, Any]:
    """A mirror as written, its service resolved as the route's destinations are ("" if none)."""
    d = mirror.destination
    return {
        "host": d.host,
        "service": by_host.get(resolve_host(d.host, namespace), ""),
        "subset": d.subset,
        "port": d.port or None,
        "percent": mirror.percent.value,
    }


def http_route_json(
    entry: HttpRouteEntry, by_host: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """A compiled http route for `nodeagent routes`: what the waypoint applies.

    `by_host` maps service hostnames to keys, to resolve the mirrors' hosts."""
    spec = entry.spec
    out: dict[str, Any] = {
        "route": entry.name + (f" ({spec.name})" if spec.name else ""),
        "match": [http_match_text(m) for m in spec.match] or ["any request"],
    }
    if spec.redirect is not None:
        r = spec.redirect
        out["redirect"] = {"uri": r.uri, "authority": r.authority, "code": r.code}
    elif spec.direct_response is not None:
        out["directResponse"] = {"status": spec.direct_response.status}
    else:
        out["destinations"] = [
            {
                "host": d.destination.host,
                "service": resolved.service,
                "subset": d.destination.subset,
                "weight": d.weight,
            }
            for d, resolved in zip(spec.route, entry.destinations, strict=False)
        ]
    if spec.rewrite is not None:
        out["rewrite"] = {"uri": spec.rewrite.uri, "authority": spec.rewrite.authority}
    out["timeoutSeconds"] = spec.timeout or None  # none: no timeout (Istio's default)
    out["retries"] = retries_json(spec.retries)
    out["fault"] = http_fault_json(spec.fault) if spec.fault is not None else None
    namespace = entry.name.split("/", 1)[0]
    out["mirrors"] = [http_mirror_json(m, namespace, by_host or {}) for m in spec.mirrors]
    if spec.notes:
        out["notApplied"] = list(spec.notes)
    return out


def tcp_pool_json(pool: TcpPool | None) -> dict[str, Any] | None:
    """`connectionPool.tcp` (null: not set; a null field: Envoy's default)."""
    if pool is None:
        return None
    return {
        "maxConnections": pool.max_connections,
        "connectTimeoutSeconds": pool.connect_timeout,
        "idleTimeoutSeconds": pool.idle_timeout,
    }


def http_pool_json(pool: HttpPool | None) -> dict[str, Any] | None:
    """`connectionPool.http` (null: not set; a null field: unlimited / Envoy's default)."""
    if pool is None:
        return None
    return {
        "http1MaxPendingRequests": pool.max_pending_requests,
        "http2MaxRequests": pool.max_requests,
        "maxRequestsPerConnection": pool.max_requests_per_connection,
        "maxRetries": pool.max_retries,
        "idleTimeoutSeconds": pool.idle_timeout,
    }


def outlier_json(outlier: OutlierDetection | None) -> dict[str, Any] | None:
    """`outlierDetection` with Istio's defaults filled in (null: not set, nobody ejected)."""
    if outlier is None:
        return None
    return {
        "consecutive5xxErrors": outlier.consecutive_5xx_errors,
        "consecutiveGatewayErrors": outlier.consecutive_gateway_errors,
        "splitExternalLocalOriginErrors": outlier.split_external_local_origin_errors,
        "consecutiveLocalOriginFailures": outlier.consecutive_local_origin_failures,
        "intervalSeconds": outlier.interval,
        "baseEjectionSeconds": outlier.base_ejection_time,
        "maxEjectionPercent": outlier.max_ejection_percent,
        "minHealthPercent": outlier.min_health_percent,
        "threshold": outlier.threshold,  # consecutive failures that eject, as applied
    }


def _subsets(
    traffic: ServiceTraffic | None, clusters: Iterable[tuple[str, str, int]], key: str
) -> list[str]:
    """The subsets to show: the rule's, and the whole service ("") when something uses it."""
    rule = traffic.destination_rule if traffic is not None else None
    names = [s.name for s in rule.subsets] if rule is not None else []
    whole = (
        not names
        or traffic is None
        or not traffic.routes
        or any(
            d.service == key and not d.subset
            for r in traffic.route_summaries()
            for d in r.destinations
        )
        or any(c[0] == key and not c[1] for c in clusters)
    )
    return ([""] if whole else []) + names


def _waypoint_name(service: Service | None) -> str:
    if service is None or service.waypoint is None:
        return ""
    target = service.waypoint.destination
    return str(target) if isinstance(target, NamespacedHostname) else str(target.address)


class RoutesReport:
    """The `/routes` answer: per service its VirtualService and DestinationRule, routes,
    subsets with their endpoints (ejections with time left, active connections), open
    connections against maxConnections, event counts, notes and needs-a-waypoint fields."""

    def __init__(self, store: StateStore, routing: RoutingState, proxy: str = "agent") -> None:
        self._store = store
        self._routing = routing
        self._proxy = proxy  # who answers: "agent", or "waypoint" (it applies the http routes)

    def routes(self) -> dict[str, Any]:
        table = self._routing.table
        clusters = self._routing.balancer.clusters()
        keys = set(table.by_service) | {c[0] for c in clusters}
        services = [self._service(key, table, clusters) for key in sorted(keys)]
        return {"proxy": self._proxy, "services": services, "notes": list(table.notes)}

    def _service(
        self,
        key: str,
        table: RouteTable,
        clusters: Mapping[tuple[str, str, int], ClusterCounters],
    ) -> dict[str, Any]:
        service = self._store.service(key)
        traffic = table.service(key)
        rule = traffic.destination_rule if traffic is not None else None
        hostname = service.hostname if service is not None else key.split("/", 1)[-1]
        by_host: dict[str, str] = {}  # to resolve http mirrors, as routes resolve hosts
        if traffic is not None and any(e.spec.mirrors for e in traffic.http):
            for known in sorted(self._store.services(), key=lambda svc: svc.key):
                by_host.setdefault(known.hostname, known.key)
        own = [
            n
            for n in table.notes
            if hostname in n
            or (traffic is not None and traffic.virtual_service and traffic.virtual_service in n)
            or (rule is not None and f"DestinationRule {rule.key}:" in n)
        ]
        return {
            "service": key,
            "hostname": hostname,
            "virtualService": traffic.virtual_service if traffic is not None else "",
            "destinationRule": rule.key if rule is not None else "",
            "routes": [route_json(r) for r in traffic.route_summaries()] if traffic else [],
            # Applied by the service's waypoint, per request (the agent applies none).
            "httpRoutes": [http_route_json(e, by_host) for e in traffic.http] if traffic else [],
            "subsets": [
                self._subset(key, name, service, table, clusters)
                for name in _subsets(traffic, clusters, key)
            ],
            "notes": own,
            "needsWaypoint": list(traffic.needs_waypoint) if traffic is not None else [],
            # Behind a waypoint the agent applies none of the above: it sends to the waypoint.
            "waypoint": _waypoint_name(service),
        }

    def _subset(
        self,
        key: str,
        name: str,
        service: Service | None,
        table: RouteTable,
        clusters: Mapping[tuple[str, str, int], ClusterCounters],
    ) -> dict[str, Any]:
        ports = {p.service_port for p in service.ports} if service is not None else set()
        ports |= {c[2] for c in clusters if c[0] == key and c[1] == name}
        traffic = table.service(key)
        rule = traffic.destination_rule if traffic is not None else None
        found = rule.subset(name) if rule is not None else None
        out: dict[str, Any] = {
            "name": name,
            "labels": dict(found.labels) if found is not None else {},
            "ports": [],
            "endpoints": [],
        }
        balancer = self._routing.balancer
        seen: set[Hashable] = set()
        for port in sorted(ports):
            target = table.target(key, port, name)
            if target is None:
                continue
            counters = clusters.get(target.cluster) or ClusterCounters()
            policy = target.policy
            pool = policy.tcp
            lb = policy.load_balancer
            out["ports"].append(
                {
                    "port": port,
                    "open": counters.open,
                    "maxConnections": pool.max_connections if pool is not None else None,
                    "loadBalancer": lb.value if lb is not None else "",
                    "tcpPool": tcp_pool_json(pool),
                    "httpPool": http_pool_json(policy.http),
                    "outlierDetection": outlier_json(policy.outlier),
                    "events": counters.events(),
                }
            )
            for candidate in self._routing.endpoints_of(target)[0]:
                if candidate.key in seen:
                    continue
                seen.add(candidate.key)
                workload = self._store.workload(candidate.workload_uid)
                out["endpoints"].append(endpoint_json(candidate, workload, port, balancer))
        return out


def endpoint_json(
    candidate: Candidate, workload: Workload | None, port: int, balancer: ClusterBalancer
) -> dict[str, Any]:
    """One endpoint with its state: ejected (seconds left) or not, connections open."""
    left = balancer.outliers.time_left(candidate.key)
    return {
        "workload": f"{workload.namespace}/{workload.name}" if workload else candidate.workload_uid,
        "address": address_text(candidate.address, candidate.port),
        "servicePort": port,
        "version": workload.canonical_revision if workload is not None else "",
        "healthy": candidate.healthy,
        "ejectedSeconds": round(left, 1) if left is not None else None,
        "ejections": balancer.outliers.ejections(candidate.key),
        "active": balancer.active(candidate.key),
    }


class RoutePreviewer:
    """Explain's route part: for a new connection from `source` to `service:port`, the route
    it takes, each destination subset with its weight, limit and candidate endpoints, and
    the fault and mirror it could draw. Computed from the table and the endpoints without
    a draw: every subset a draw could pick is listed with its weight."""

    def __init__(self, store: StateStore, routing: RoutingState) -> None:
        self._store = store
        self._routing = routing

    def preview(
        self, source: Workload | None, service: str, port: int, dialled: IPAddress
    ) -> dict[str, Any]:
        table = self._routing.table
        route = table.match(service, port, Caller.of(source), dialled)
        targets: list[tuple[int, Target | None, DestinationSummary | None]]
        if route is None:
            targets = [(100, table.target(service, port), None)]
        else:
            targets = [
                (
                    d.weight,
                    table.target(d.service, d.port or port, d.subset) if d.service else None,
                    d,
                )
                for d in route.destinations
            ]
        out: dict[str, Any] = {
            "route": route.name if route is not None else "",
            "match": ([match_text(m) for m in route.spec.match] or ["any"]) if route else [],
            "destinations": [
                self._destination(weight, target, written, source, dialled)
                for weight, target, written in targets
            ],
            "maxConnectAttempts": route.spec.max_connect_attempts if route else None,
        }
        if route is not None:
            extras = route_json(route)
            out["fault"] = extras.get("fault")
            out["mirror"] = extras.get("mirror")
        return out

    def _destination(
        self,
        weight: int,
        target: Target | None,
        written: DestinationSummary | None,
        source: Workload | None,
        dialled: IPAddress,
    ) -> dict[str, Any]:
        if target is None:
            assert written is not None
            return {
                "service": written.service,
                "subset": written.subset,
                "weight": weight,
                "note": f"{written.host} {written.subset}".strip() + " resolves to nothing",
                "candidates": [],
            }
        balancer = self._routing.balancer
        counters = balancer.clusters().get(target.cluster) or ClusterCounters()
        pool = target.policy.tcp
        lb = target.policy.load_balancer
        out: dict[str, Any] = {
            "service": target.service,
            "subset": target.subset,
            "port": target.port,
            "weight": weight,
            "open": counters.open,
            "maxConnections": pool.max_connections if pool is not None else None,
            "loadBalancer": lb.value if lb is not None else "",
        }
        found, skipped = self._routing.endpoints_of(target, dialled)
        service = self._store.service(target.service)
        location = SourceLocation.of(source) if source is not None else SourceLocation()
        eligible, note = balancer.eligible(
            found, location, service.load_balancing if service is not None else None
        )
        usable = {c.key for c in eligible}
        out["candidates"] = [
            {
                **endpoint_json(c, self._store.workload(c.workload_uid), target.port, balancer),
                "eligible": c.key in usable,
            }
            for c in found
        ]
        if note or skipped:
            out["note"] = "; ".join(
                [note] * bool(note) + [f"{s.workload_uid}: {s.reason}" for s in skipped]
            )
        return out


def preview_steps(preview: Mapping[str, Any], service: str, port: int) -> list[str]:
    """Explain's one-line steps for a route preview."""
    steps = []
    name = preview.get("route")
    destinations = preview.get("destinations") or []
    if not name:
        steps.append(f"no route of a VirtualService for {service}:{port}: the whole service")
    else:
        split = ", ".join(f"{d.get('subset') or '(all)'} {d.get('weight')}%" for d in destinations)
        match = "; ".join(preview.get("match") or [])
        steps.append(f"route {name} (match {match}): {split}")
    for d in destinations:
        label = f"subset {d['subset']}" if d.get("subset") else "the whole service"
        if "open" not in d:
            steps.append(f"{label}: {d.get('note', 'unusable')}")
            continue
        cands = d.get("candidates") or []
        ready = [c for c in cands if c.get("eligible") and c.get("ejectedSeconds") is None]
        ejected = [c for c in cands if c.get("ejectedSeconds") is not None]
        limit = d.get("maxConnections")
        text = f"{label} ({d.get('weight')}%): "
        text += ", ".join(c["address"] for c in ready) if ready else "no candidate endpoint"
        if ejected:
            text += "; ejected: " + ", ".join(
                f"{c['address']} ({c['ejectedSeconds']:g}s left)" for c in ejected
            )
        if limit is not None:
            text += f"; {d.get('open', 0)}/{limit} connections"
        if d.get("note"):
            text += f" ({d['note']})"
        steps.append(text)
    fault = preview.get("fault") or {}
    if fault.get("abortPercent"):
        steps.append(f"fault: {fault['abortPercent']:g}% of connections are refused (FI)")
    if fault.get("delaySeconds"):
        steps.append(
            f"fault: {fault.get('delayPercent', 100):g}% of connections are held "
            f"{fault['delaySeconds']:g}s before they open (DI)"
        )
    mirror = preview.get("mirror")
    if mirror:
        target = f"{mirror.get('host')} {mirror.get('subset', '')}".strip()
        steps.append(
            f"mirror: {mirror.get('percent', 100):g}% of connections copy their client bytes "
            f"to {target}" + ("" if mirror.get("service") else " (resolves to nothing)")
        )
    return steps
