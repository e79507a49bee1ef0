"""What the admin surface shows of traffic management: `/routes` and explain's route part.

Both read the outbound side's route state (`nodeagent.proxy.routing.ServiceRouting`,
through the `RoutingState` protocol: admin sits beside proxy, not above it) and the
state store, and never change anything: no round-robin turn taken, no random draw,
no connection slot held. Output is JSON in camelCase, as the other admin answers.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from typing import Any, Protocol

from nodeagent.model.routing import L4Match
from nodeagent.model.workload import IPAddress, Service, Workload
from nodeagent.state.store import StateStore
from nodeagent.traffic.balancer import ClusterBalancer, ClusterCounters
from nodeagent.traffic.endpoints import Skipped
from nodeagent.traffic.routes import (
    DestinationSummary,
    RouteSummary,
    RouteTable,
    ServiceTraffic,
    Target,
)
from nodeagent.traffic.selection import Candidate


class RoutingState(Protocol):
    """nodeagent.proxy.routing.ServiceRouting, read by attribute."""

    @property
    def table(self) -> RouteTable: ...
    @property
    def balancer(self) -> ClusterBalancer: ...
    def endpoints_of(
        self, target: Target, dialled: IPAddress | None = None
    ) -> tuple[tuple[Candidate, ...], tuple[Skipped, ...]]: ...


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


class RoutesReport:
    """The `/routes` answer: per service its VirtualService and DestinationRule, routes,
    subsets with their endpoints (ejections with time left, active connections), open
    connections against maxConnections, event counts, notes and needs-a-waypoint fields."""

    def __init__(self, store: StateStore, routing: RoutingState) -> None:
        self._store = store
        self._routing = routing

    def routes(self) -> dict[str, Any]:
        table = self._routing.table
        clusters = self._routing.balancer.clusters()
        keys = set(table.by_service) | {c[0] for c in clusters}
        services = [self._service(key, table, clusters) for key in sorted(keys)]
        return {"services": services, "notes": list(table.notes)}

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
            "subsets": [
                self._subset(key, name, service, table, clusters)
                for name in _subsets(traffic, clusters, key)
            ],
            "notes": own,
            "needsWaypoint": list(traffic.needs_waypoint) if traffic is not None else [],
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
            pool = target.policy.tcp
            lb = target.policy.load_balancer
            out["ports"].append(
                {
                    "port": port,
                    "open": counters.open,
                    "maxConnections": pool.max_connections if pool is not None else None,
                    "loadBalancer": lb.value if lb is not None else "",
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
