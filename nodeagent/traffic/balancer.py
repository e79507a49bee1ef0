"""Per-cluster state a new connection needs: load balancing, circuit breaking, ejections.

A cluster is Envoy's: a service narrowed to a subset, on a port (`Target.cluster`).
The route table is immutable; what changes per connection lives here, fed
events by the data path (`admit`/`release` around a connection, `started`/`ended`
around an endpoint's use, `record` after each connect attempt). No I/O; the
random source and the clock are injected.

* `admit`: `connectionPool.tcp.maxConnections` as a circuit breaker, per
  cluster in this agent: over the limit a connection is refused at once.
* `pick`: among the eligible endpoints (health, locality, ejections: see
  `EndpointSelector.eligible`), minus those this connection already tried:
  ROUND_ROBIN in turn; LEAST_REQUEST the fewer active of two random choices
  (Envoy's default choice count); RANDOM uniform; `consistentHash.useSourceIp`
  a rendezvous hash of the source address (the same caller keeps its endpoint
  while the set allows); unset, today's capacity-weighted random pick.
* `record_outcome`: what a use of an endpoint ended in (a connect failure, a
  connect, an HTTP status: `Outcome`) counts towards ejection with the
  cluster's `outlierDetection`, by Envoy's rules (see `traffic.outlier`);
  without one, nothing is ejected (Envoy's default: outlier detection only
  where a cluster configures it). `record` is the L4 path's form: a connect
  failure, or a connect that is all it learns.
* `in_panic`: `minHealthPercent`, Envoy's panic threshold: when fewer of a
  cluster's endpoints than that are left un-ejected, ejections are ignored.
* `count`: what happened to the cluster's connections, for metrics and
  `nodeagent routes` (`EVENTS`); overflows and ejections are counted here
  by `admit` and `record`, the others by the data path.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType

from nodeagent.model.routing import LoadBalancer, OutlierDetection
from nodeagent.model.workload import LoadBalancing
from nodeagent.traffic.outlier import (
    MAX_EJECTION_TIME,
    Outcome,
    OutlierDetector,
    OutlierRules,
    OutlierSettings,
)
from nodeagent.traffic.routes import Target
from nodeagent.traffic.selection import Candidate, EndpointSelector, SourceLocation

Cluster = tuple[str, str, int]

# What can happen to a cluster's connections, by the names metrics and `routes` use.
OVERFLOW = "overflow"  # refused by maxConnections (flag UO)
FAULT_ABORT = "fault_abort"  # an injected abort (FI)
FAULT_DELAY = "fault_delay"  # an injected delay (DI)
RETRY = "retry"  # a connect attempt after a failed one (URX when all fail)
MIRROR_DROPPED = "mirror_dropped"  # a mirror copy not opened, or dropped as it lagged or failed
EJECTION = "ejection"  # an endpoint ejected as an outlier
EVENTS = (OVERFLOW, FAULT_ABORT, FAULT_DELAY, RETRY, MIRROR_DROPPED, EJECTION)


@dataclass(slots=True)
class ClusterCounters:
    """What `nodeagent routes` and the metrics show for a cluster: its open connections and a
    count per event of `EVENTS` (cumulative; plain ints, so counting costs one addition)."""

    open: int = 0  # connections admitted and not yet released
    overflows: int = 0
    fault_aborts: int = 0
    fault_delays: int = 0
    retries: int = 0
    mirror_drops: int = 0
    ejections: int = 0

    def count(self, event: str) -> None:
        attr = _EVENT_FIELDS.get(event)
        if attr is None:
            raise ValueError(f"unknown cluster event {event!r} (known: {', '.join(EVENTS)})")
        setattr(self, attr, getattr(self, attr) + 1)

    def events(self) -> dict[str, int]:
        """Every event's count, by its name in `EVENTS`."""
        return {event: getattr(self, attr) for event, attr in _EVENT_FIELDS.items()}


_EVENT_FIELDS = {
    OVERFLOW: "overflows",
    FAULT_ABORT: "fault_aborts",
    FAULT_DELAY: "fault_delays",
    RETRY: "retries",
    MIRROR_DROPPED: "mirror_drops",
    EJECTION: "ejections",
}
assert tuple(_EVENT_FIELDS) == EVENTS


@dataclass(frozen=True, slots=True)
class ClusterStats:
    """A service's subset as the metrics show it: its clusters (one per port) summed."""

    service: str  # service key (namespace/hostname)
    subset: str  # empty: the whole service
    open: int
    ejected: int  # endpoints of the subset ejected now
    events: Mapping[str, int]  # cumulative count per event of EVENTS


def outlier_settings(outlier: OutlierDetection) -> OutlierSettings | None:
    """The detector's settings for a DestinationRule's outlierDetection; None when disabled."""
    threshold = outlier.threshold
    if threshold == 0:
        return None
    return OutlierSettings(
        consecutive_failures=threshold,
        base_ejection=outlier.base_ejection_time,
        max_ejection=max(MAX_EJECTION_TIME, outlier.base_ejection_time),
        max_ejection_percent=outlier.max_ejection_percent,
    )


@functools.lru_cache(maxsize=256)
def _rules(outlier: OutlierDetection) -> OutlierRules:
    # Per request on the waypoint: convert each DestinationRule's settings once.
    return OutlierRules.of(outlier)


class ClusterBalancer:
    """Load balancing, limits and outlier state for every cluster this agent connects to."""

    def __init__(self, rng: random.Random, outliers: OutlierDetector) -> None:
        self._rng = rng
        self.outliers = outliers
        self._selector = EndpointSelector(rng, outliers)
        self._panic_selector = EndpointSelector(rng)  # the same steps, ejections ignored
        self._counters: dict[Cluster, ClusterCounters] = {}
        self._active: dict[Hashable, int] = {}
        self._turn: dict[Cluster, int] = {}

    def snapshot(self, rng: random.Random) -> ClusterBalancer:
        """A copy for what-if questions (explain): the same outlier detector (read, not fed:
        nothing is recorded through a copy), copies of the turns, active counts and
        counters, and its own random source, so using the copy changes nothing here."""
        copy = ClusterBalancer(rng, self.outliers)
        copy._turn = dict(self._turn)
        copy._active = dict(self._active)
        copy._counters = {k: replace(v) for k, v in self._counters.items()}
        return copy

    # -- circuit breaking -----------------------------------------------------------------------

    def counters(self, cluster: Cluster) -> ClusterCounters:
        return self._counters.setdefault(cluster, ClusterCounters())

    def clusters(self) -> Mapping[Cluster, ClusterCounters]:
        """Every cluster this agent has connected to (or refused), with its counters."""
        return MappingProxyType(self._counters)

    def count(self, cluster: Cluster, event: str) -> None:
        """One event of `EVENTS` in a cluster (ValueError for an unknown name)."""
        self.counters(cluster).count(event)

    def admit(self, target: Target) -> bool:
        """Take a connection slot in the target's cluster; False over maxConnections."""
        counters = self.counters(target.cluster)
        pool = target.policy.tcp
        limit = pool.max_connections if pool is not None else None
        if limit is not None and counters.open >= limit:
            counters.overflows += 1
            return False
        counters.open += 1
        return True

    def release(self, target: Target) -> None:
        counters = self._counters.get(target.cluster)
        if counters is not None and counters.open > 0:
            counters.open -= 1

    # -- endpoints -----------------------------------------------------------------------------

    def eligible(
        self,
        candidates: Iterable[Candidate],
        source: SourceLocation,
        load_balancing: LoadBalancing | None,
        *,
        ignore_ejections: bool = False,
    ) -> tuple[tuple[Candidate, ...], str]:
        selector = self._panic_selector if ignore_ejections else self._selector
        return selector.eligible(candidates, source, load_balancing)

    def in_panic(self, target: Target, cluster_keys: Sequence[Hashable]) -> bool:
        """True when fewer than the cluster's minHealthPercent of its endpoints are un-ejected:
        then ejections are ignored and every endpoint is used (Envoy's panic threshold, which
        Istio sets from minHealthPercent; 0 disables)."""
        outlier = target.policy.outlier
        if outlier is None or not outlier.min_health_percent or not cluster_keys:
            return False
        up = sum(1 for key in cluster_keys if not self.outliers.is_ejected(key))
        return up * 100 < outlier.min_health_percent * len(cluster_keys)

    def pick(
        self,
        target: Target,
        pool: Sequence[Candidate],
        tried: Iterable[Hashable] = (),
        source_ip: str = "",
    ) -> Candidate | None:
        """One endpoint of `pool` (already eligible) not in `tried`, by the target's balancer."""
        skip = set(tried)
        left = [c for c in pool if c.key not in skip]
        if not left:
            return None
        policy = target.policy
        if policy.consistent_hash is not None and policy.consistent_hash.use_source_ip:
            return max(left, key=lambda c: _rendezvous(source_ip, c))
        lb = policy.load_balancer
        if lb is LoadBalancer.ROUND_ROBIN:
            ordered = sorted(left, key=lambda c: c.key)
            turn = self._turn.get(target.cluster, 0)
            self._turn[target.cluster] = turn + 1
            return ordered[turn % len(ordered)]
        if lb is LoadBalancer.LEAST_REQUEST:
            if len(left) == 1:
                return left[0]
            a, b = self._rng.sample(left, 2)
            return a if self._active.get(a.key, 0) <= self._active.get(b.key, 0) else b
        if lb is LoadBalancer.RANDOM:
            return left[self._rng.randrange(len(left))]
        return self._selector.pick(left)

    def started(self, candidate: Candidate) -> None:
        self._active[candidate.key] = self._active.get(candidate.key, 0) + 1

    def ended(self, candidate: Candidate) -> None:
        count = self._active.get(candidate.key, 0) - 1
        if count > 0:
            self._active[candidate.key] = count
        else:
            self._active.pop(candidate.key, None)

    def active(self, key: Hashable) -> int:
        return self._active.get(key, 0)

    def record(
        self, target: Target, candidate: Candidate, ok: bool, cluster_keys: Sequence[Hashable]
    ) -> bool:
        """One L4 connect attempt's outcome (a connect is all the L4 path learns of an
        endpoint); True when this failure ejected the endpoint."""
        outcome = Outcome.connected(final=True) if ok else Outcome.connect_failure()
        return self.record_outcome(target, candidate, outcome, cluster_keys)

    def record_outcome(
        self,
        target: Target,
        candidate: Candidate,
        outcome: Outcome,
        cluster_keys: Sequence[Hashable],
    ) -> bool:
        """One use of an endpoint; True when it ejected the endpoint (counted as an event)."""
        if target.policy.outlier is None:
            if not outcome.failed:
                self.outliers.record(candidate.key, outcome)  # resets only: no rules needed
            return False  # as Envoy: no outlierDetection, no ejection
        rules = _rules(target.policy.outlier)
        ejected = self.outliers.record(candidate.key, outcome, rules, cluster_keys)
        if ejected:
            self.counters(target.cluster).ejections += 1
        return ejected


def _rendezvous(source: str, candidate: Candidate) -> bytes:
    digest = hashlib.blake2b(f"{source}|{candidate.key}".encode(), digest_size=8)
    return digest.digest()
