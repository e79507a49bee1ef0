"""Traffic management for outbound connections to a service: the agent's side of nodeagent.traffic.

`ServiceRouting` keeps the route table current (recompiled on the first use
after a VirtualService, DestinationRule or service change, never per
connection) and the per-cluster state (`ClusterBalancer`). For each new
connection to a service it makes a `ServicePlan`: the route decision, then one
endpoint after another as connect attempts fail:

1. the endpoints of the current target (a subset of the service, on a port)
   that are healthy, in the source's locality preference and not ejected,
   minus those this connection already tried, picked by the target's balancer;
2. when a target has none left, the next target of the route (the other
   subsets, by weight): the automatic fallback from a failing v2 to v1;
3. only when no target has a non-ejected endpoint, ejected ones are used
   (better a failing endpoint than a certain failure), as Envoy's panic mode;
   a target whose share of un-ejected endpoints is below its
   `outlierDetection.minHealthPercent` ignores its ejections from the start.

Outcomes come back through `record` (the agent's connect attempts) and
`record_outcome` (the waypoint's HTTP responses) for outlier detection.

The plan never tries more than the route's `max_attempts`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Hashable
from dataclasses import dataclass, field

from nodeagent.model.workload import IPAddress, Service, Workload
from nodeagent.state.store import StateChange, StateStore
from nodeagent.traffic.balancer import EVENTS, ClusterBalancer, ClusterCounters, ClusterStats
from nodeagent.traffic.endpoints import Skipped, candidates_for
from nodeagent.traffic.outlier import Outcome, OutlierDetector
from nodeagent.traffic.routes import Caller, RouteDecision, RouteTable, Target
from nodeagent.traffic.selection import Candidate, SourceLocation

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ServicePlan:
    """One connection's progress through its route decision."""

    decision: RouteDecision
    service: Service
    source: SourceLocation
    source_ip: str
    dialled: IPAddress
    port: int  # the port the app dialled
    target_index: int = 0
    attempts: int = 0
    tried: set[Hashable] = field(default_factory=set)
    panic: bool = False  # every non-ejected endpoint is used up: ejected ones are allowed
    admitted: Target | None = None  # the cluster whose connection slot this holds
    note: str = ""

    @property
    def target(self) -> Target | None:
        targets = self.decision.targets
        return targets[self.target_index] if self.target_index < len(targets) else None

    @property
    def attempts_left(self) -> bool:
        return self.attempts < self.decision.max_attempts


@dataclass(frozen=True, slots=True)
class Pick:
    target: Target
    candidate: Candidate
    workload: Workload
    cluster_keys: tuple[Hashable, ...]  # every endpoint of the target (for maxEjectionPercent)


class ServiceRouting:
    """The route table and cluster state of one agent, fed by its state store."""

    def __init__(
        self,
        store: StateStore,
        outliers: OutlierDetector,
        rng: random.Random | None = None,
        *,
        follow: bool = True,
    ) -> None:
        self._store = store
        self._rng = rng or random.Random()
        self.balancer = ClusterBalancer(self._rng, outliers)
        self._table: RouteTable | None = None
        self._notes: tuple[str, ...] = ()
        self._waypoint_fields: set[str] = set()
        if follow:  # a preview copy does not: it lives for one question
            store.subscribe(self._changed)

    def preview(self) -> ServiceRouting:
        """A what-if copy for explain: the same route table, endpoints and ejections, with its
        own round-robin turns, active counts, connection slots and random source, so asking
        what a connection would get takes nothing from the real ones. Use once and drop."""
        rng = random.Random()
        copy = ServiceRouting(self._store, self.balancer.outliers, rng, follow=False)
        copy.balancer = self.balancer.snapshot(rng)
        copy._table, copy._notes = self.table, self._notes
        return copy

    def _changed(self, change: StateChange) -> None:
        if change.routing or change.services:
            self._table = None

    @property
    def table(self) -> RouteTable:
        table = self._table
        if table is None:
            table = RouteTable.compile(
                self._store.virtual_services(),
                self._store.destination_rules(),
                self._store.services(),
            )
            self._table = table
            fresh = set(table.notes) - set(self._notes)
            for note in sorted(fresh):
                log.warning("routing: %s", note)
            self._notes = table.notes
            for traffic in table.by_service.values():
                for field_path in traffic.needs_waypoint:
                    if field_path not in self._waypoint_fields:  # once, not per rebuild
                        self._waypoint_fields.add(field_path)
                        log.info(
                            "routing: %s needs a waypoint; the agent does not apply it", field_path
                        )
        return table

    def plan(
        self,
        source: Workload | None,
        service: Service,
        port: int,
        dialled: IPAddress,
        source_ip: str,
    ) -> ServicePlan:
        decision = self.table.decide(service.key, port, Caller.of(source), self._rng, dialled)
        location = SourceLocation.of(source) if source is not None else SourceLocation()
        return ServicePlan(decision, service, location, source_ip, dialled, port)

    def endpoints_of(
        self, target: Target, dialled: IPAddress | None = None
    ) -> tuple[tuple[Candidate, ...], tuple[Skipped, ...]]:
        """Every endpoint of a target (healthy or not, ejected or not), and those left out."""
        service = self._store.service(target.service)
        if service is None:
            return (), ()
        endpoints = [e for e in self._store.endpoints(service.key) if target.admits(e.workload)]
        return candidates_for(service, endpoints, target.port, dialled)

    def cluster_stats(self) -> list[ClusterStats]:
        """Per service and subset this agent connected to: open connections, endpoints ejected
        now, event counts (read at scrape time; the clusters' ports are summed)."""
        table, outliers = self.table, self.balancer.outliers
        grouped: dict[tuple[str, str], list[tuple[int, ClusterCounters]]] = {}
        for (service, subset, port), counters in self.balancer.clusters().items():
            grouped.setdefault((service, subset), []).append((port, counters))
        out = []
        for (service, subset), clusters in sorted(grouped.items()):
            keys: set[Hashable] = set()
            events = dict.fromkeys(EVENTS, 0)
            for port, counters in clusters:
                target = table.target(service, port, subset)
                if target is not None:
                    keys.update(c.key for c in self.endpoints_of(target)[0])
                for event, n in counters.events().items():
                    events[event] += n
            ejected = sum(1 for key in keys if outliers.is_ejected(key))
            opened = sum(c.open for _, c in clusters)
            out.append(ClusterStats(service, subset, opened, ejected, events))
        return out

    def candidates(
        self, plan: ServicePlan, target: Target
    ) -> tuple[tuple[Candidate, ...], tuple[Hashable, ...], str]:
        """(eligible endpoints, every endpoint's key, note) of a target for this plan."""
        service = plan.service if target.service == plan.service.key else None
        if service is None:
            service = self._store.service(target.service)
            if service is None:
                return (), (), f"service {target.service} is gone"
        endpoints = [e for e in self._store.endpoints(service.key) if target.admits(e.workload)]
        found, skipped = candidates_for(service, endpoints, target.port, plan.dialled)
        keys = tuple(c.key for c in found)
        if not found:
            why = "no endpoint" + (f" in subset {target.subset}" if target.subset else "")
            if skipped:
                why += f" ({len(skipped)} skipped: {skipped[0].reason})"
            return (), keys, why
        panic = self.balancer.in_panic(target, keys)
        pool, note = self.balancer.eligible(
            found, plan.source, service.load_balancing, ignore_ejections=panic
        )
        if panic:
            note = note or "below minHealthPercent: ejections ignored"
        elif not plan.panic and pool:
            outliers = self.balancer.outliers
            pool = tuple(c for c in pool if not outliers.is_ejected(c.key))
            if not pool:
                note = "every endpoint is ejected"
        return pool, keys, note

    def next_pick(self, plan: ServicePlan) -> Pick | None:
        """The next endpoint to try, moving to the next target when one is used up; None when
        nothing is left to try (the reason in `plan.note`)."""
        if not plan.attempts_left:
            plan.note = f"{plan.attempts} connect attempt(s) failed"
            return None
        while True:
            target = plan.target
            if target is None:
                if plan.panic or not plan.decision.targets:
                    if not plan.decision.targets:
                        plan.note = f"route {plan.decision.route} has no usable destination"
                    return None
                plan.panic, plan.target_index = True, 0  # retry the targets with ejected ones
                continue
            pool, keys, note = self.candidates(plan, target)
            candidate = self.balancer.pick(target, pool, plan.tried, plan.source_ip)
            if candidate is None:
                plan.note = note or f"every endpoint of {target.label} was tried"
                plan.target_index += 1
                continue
            workload = self._store.workload(candidate.workload_uid)
            plan.tried.add(candidate.key)
            if workload is None:
                continue
            plan.attempts += 1
            return Pick(target, candidate, workload, keys)

    def pick_waypoint(
        self, source: Workload | None, service: Service, port: int, dialled: IPAddress | None
    ) -> tuple[Candidate, Workload] | str:
        """One ready endpoint of a waypoint's service on its HBONE port (`port`), or why there
        is none. As ztunnel resolves a waypoint (ServiceResolutionMode::Waypoint): no
        route table, no subsets; health and the service's locality rules still apply."""
        endpoints = self._store.endpoints(service.key)
        found, skipped = candidates_for(service, endpoints, port, dialled)
        if not found:
            if skipped:
                return f"no endpoint on port {port} ({len(skipped)} skipped: {skipped[0].reason})"
            return "no endpoint"
        location = SourceLocation.of(source) if source is not None else SourceLocation()
        pool, note = self.balancer.eligible(found, location, service.load_balancing)
        if not pool:
            return note or "no ready endpoint"
        weights = [c.weight for c in pool]
        candidate = self._rng.choices(pool, weights=weights)[0] if any(weights) else pool[0]
        workload = self._store.workload(candidate.workload_uid)
        if workload is None:
            return f"endpoint {candidate.workload_uid} is gone"
        return candidate, workload

    def mirror_plan(self, plan: ServicePlan, target: Target) -> ServicePlan | None:
        """A one-attempt plan to the mirror target of `plan` (None if its service is gone)."""
        service = self._store.service(target.service)
        if service is None:
            return None
        decision = RouteDecision((target,), max_attempts=1)
        return ServicePlan(
            decision, service, plan.source, plan.source_ip, plan.dialled, target.port
        )

    def admit(self, plan: ServicePlan, target: Target) -> bool:
        """Hold a connection slot in the target's cluster (moving it if the plan held another)."""
        if plan.admitted is not None and plan.admitted.cluster == target.cluster:
            return True
        self.release(plan)
        if not self.balancer.admit(target):
            return False
        plan.admitted = target
        return True

    def release(self, plan: ServicePlan) -> None:
        if plan.admitted is not None:
            self.balancer.release(plan.admitted)
            plan.admitted = None

    def record(self, pick: Pick, *, ok: bool) -> bool:
        """A connect attempt's outcome; True when it ejected the endpoint (counted). `ok` is
        all the caller learnt: a connect failure, or a connect that counts as a success."""
        return self.balancer.record(pick.target, pick.candidate, ok, pick.cluster_keys)

    def record_outcome(self, pick: Pick, outcome: Outcome) -> bool:
        """How a use of the picked endpoint ended (an HTTP status, a local-origin failure, a
        connect) for the target's outlierDetection; True when it ejected the endpoint
        (counted in the cluster's events). No outlierDetection: nothing is ejected."""
        return self.balancer.record_outcome(pick.target, pick.candidate, outcome, pick.cluster_keys)

    def count(self, event: str, target: Target) -> None:
        """An event of the data path (a fault, a retry, a mirror drop) in the target's cluster,
        for the metrics and `nodeagent routes` (overflows and ejections count themselves)."""
        self.balancer.count(target.cluster, event)
