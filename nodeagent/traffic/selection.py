"""Choosing one endpoint of a service for a new connection.

Steps, in order:

1. Health: only healthy endpoints, unless the service's health policy is ALLOW_ALL.
2. STRICT mode: only endpoints that match the source on every routing_preference
   scope; none left means "no healthy endpoint" (STRICT never leaves the scope).
3. Outlier ejection: ejected endpoints are left out, unless that leaves nothing
   (then all are used: better a failing endpoint than certain failure).
4. FAILOVER mode: endpoints are ranked by how many of the routing_preference
   scopes, taken in order, they match before the first mismatch; only the best
   rank present is used, so traffic falls back scope by scope.
   Without a mode (UNSPECIFIED) the preferences are ignored.
5. A weighted random pick by capacity (`Candidate.weight`), with the random
   source injected so tests are deterministic.

PASSTHROUGH mode returns a PASSTHROUGH outcome: the caller keeps the original
destination.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from nodeagent.model.workload import (
    HealthPolicy,
    IPAddress,
    LoadBalancing,
    LoadBalancingMode,
    LoadBalancingScope,
    Locality,
    Workload,
    WorkloadStatus,
)
from nodeagent.traffic.outlier import OutlierDetector

_NO_LOAD_BALANCING = LoadBalancing()


@dataclass(frozen=True, slots=True)
class Candidate:
    """One endpoint a connection to a service may go to."""

    workload_uid: str
    address: IPAddress
    port: int
    healthy: bool = True
    locality: Locality = field(default_factory=Locality)
    node: str = ""
    network: str = ""
    cluster: str = ""
    weight: int = 1  # the workload's capacity; 0 is never picked while others have weight

    def __post_init__(self) -> None:
        if not 0 < self.port <= 0xFFFF:
            raise ValueError(f"endpoint {self.workload_uid}: port {self.port} outside 1..65535")
        if self.weight < 0:
            raise ValueError(f"endpoint {self.workload_uid}: negative weight {self.weight}")

    @property
    def key(self) -> tuple[str, IPAddress, int]:
        """Identifies the endpoint for outlier tracking."""
        return (self.workload_uid, self.address, self.port)

    @classmethod
    def from_workload(cls, workload: Workload, address: IPAddress, port: int) -> Candidate:
        return cls(
            workload_uid=workload.uid,
            address=address,
            port=port,
            healthy=workload.status is WorkloadStatus.HEALTHY,
            locality=workload.locality or Locality(),
            node=workload.node,
            network=workload.network,
            cluster=workload.cluster_id,
            weight=1 if workload.capacity is None else workload.capacity,
        )


@dataclass(frozen=True, slots=True)
class SourceLocation:
    """Where the connecting workload runs, for locality-aware routing."""

    locality: Locality = field(default_factory=Locality)
    node: str = ""
    network: str = ""
    cluster: str = ""

    @classmethod
    def of(cls, workload: Workload) -> SourceLocation:
        return cls(
            workload.locality or Locality(),
            workload.node,
            workload.network,
            workload.cluster_id,
        )


def scope_matches(scope: LoadBalancingScope, source: SourceLocation, ep: Candidate) -> bool:
    """Whether `ep` is in the same `scope` as the source (UNSPECIFIED always is)."""
    if scope is LoadBalancingScope.REGION:
        return ep.locality.region == source.locality.region
    if scope is LoadBalancingScope.ZONE:
        return ep.locality.zone == source.locality.zone
    if scope is LoadBalancingScope.SUBZONE:
        return ep.locality.subzone == source.locality.subzone
    if scope is LoadBalancingScope.NODE:
        return ep.node == source.node
    if scope is LoadBalancingScope.CLUSTER:
        return ep.cluster == source.cluster
    if scope is LoadBalancingScope.NETWORK:
        return ep.network == source.network
    return True


def rank(preferences: Sequence[LoadBalancingScope], source: SourceLocation, ep: Candidate) -> int:
    """How many of `preferences`, in order, `ep` matches before the first mismatch."""
    matched = 0
    for scope in preferences:
        if not scope_matches(scope, source, ep):
            break
        matched += 1
    return matched


class SelectionOutcome(enum.Enum):
    SELECTED = "selected"
    PASSTHROUGH = "passthrough"  # LB mode PASSTHROUGH: use the original destination
    NO_HEALTHY_ENDPOINT = "no_healthy_endpoint"


@dataclass(frozen=True, slots=True)
class Selection:
    outcome: SelectionOutcome
    endpoint: Candidate | None = None
    reason: str = ""  # why nothing was selected, or notes (e.g. outlier panic)

    @property
    def ok(self) -> bool:
        return self.outcome is SelectionOutcome.SELECTED


def _no_endpoint(reason: str) -> Selection:
    return Selection(SelectionOutcome.NO_HEALTHY_ENDPOINT, reason=reason)


class EndpointSelector:
    """Picks endpoints; holds the random source and (optionally) outlier state."""

    def __init__(
        self,
        rng: random.Random | None = None,
        outliers: OutlierDetector | None = None,
    ) -> None:
        self._rng = rng or random.Random()
        self._outliers = outliers

    def eligible(
        self,
        candidates: Iterable[Candidate],
        source: SourceLocation,
        load_balancing: LoadBalancing | None = None,
    ) -> tuple[tuple[Candidate, ...], str]:
        """The endpoints a pick may return (steps 1-4) and a note; empty with the reason."""
        lb = load_balancing or _NO_LOAD_BALANCING
        pool = list(candidates)
        if not pool:
            return (), "service has no endpoints"
        if lb.health_policy is not HealthPolicy.ALLOW_ALL:
            healthy = [c for c in pool if c.healthy]
            if not healthy:
                return (), f"all {len(pool)} endpoints are unhealthy"
            pool = healthy
        preferences = [
            s for s in lb.routing_preference if s is not LoadBalancingScope.UNSPECIFIED_SCOPE
        ]
        if lb.mode is LoadBalancingMode.STRICT and preferences:
            pool = [c for c in pool if rank(preferences, source, c) == len(preferences)]
            if not pool:
                names = ", ".join(s.name for s in preferences)
                return (), f"no healthy endpoint shares the source's {names} (STRICT)"
        note = ""
        if self._outliers is not None:
            outliers = self._outliers
            kept = [c for c in pool if not outliers.is_ejected(c.key)]
            if kept:
                pool = kept
            else:
                note = f"all {len(pool)} endpoints ejected as outliers; using them anyway"
        if lb.mode is LoadBalancingMode.FAILOVER and preferences:
            ranks = [rank(preferences, source, c) for c in pool]
            best = max(ranks)
            pool = [c for c, r in zip(pool, ranks, strict=True) if r == best]
        return tuple(pool), note

    def select(
        self,
        candidates: Iterable[Candidate],
        source: SourceLocation,
        load_balancing: LoadBalancing | None = None,
    ) -> Selection:
        """One endpoint for a new connection, or why there is none."""
        if load_balancing is not None and load_balancing.mode is LoadBalancingMode.PASSTHROUGH:
            return Selection(SelectionOutcome.PASSTHROUGH, reason="load balancing mode PASSTHROUGH")
        pool, note = self.eligible(candidates, source, load_balancing)
        if not pool:
            return _no_endpoint(note)
        return Selection(SelectionOutcome.SELECTED, self.pick(pool), note)

    def pick(self, pool: Sequence[Candidate]) -> Candidate:
        """A capacity-weighted random pick among `pool` (non-empty)."""
        if len(pool) == 1:
            return pool[0]
        total = sum(c.weight for c in pool)
        if total == 0:
            return pool[self._rng.randrange(len(pool))]  # all zero: treat as equal
        point = self._rng.randrange(total)
        for candidate in pool:
            if point < candidate.weight:
                return candidate
            point -= candidate.weight
        raise AssertionError("unreachable: point < total weight")
