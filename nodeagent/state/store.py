"""The agent's view of the mesh: workloads, services, policies and routing config, with indexes.

`StateStore.apply` takes one batch of already-converted values and removal
names and applies it in one synchronous step, so readers never see half a
batch; then it tells subscribers what changed (`StateChange`).

Indexes: workloads by uid, by (network, ip) and by node; services by `namespace/hostname`
and by (network, VIP); each service's endpoints (workloads whose `services` map
names it); policies by `namespace/name`, by namespace (NAMESPACE scope) and the
GLOBAL ones; VirtualServices, DestinationRules and the waypoints' AuthorizationPolicies
(`HttpAuthorization`, with HTTP rules) by `namespace/name`. The
traffic layer recompiles its route table when a change reports either of those
kinds (`StateChange.routing`).

A workload removed from the mesh is remembered by address for `departed_grace`
seconds (`departed_by_address`): the removal reaches every agent at slightly
different times, and a caller that forgot the server before the server's own agent
holds it would pass its connection through in plaintext. The outbound side keeps
such an address on HBONE during the grace, so it is refused, never sent in clear.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from nodeagent.model.policy import Authorization, HttpAuthorization, Scope
from nodeagent.model.routing import DestinationRule, VirtualService
from nodeagent.model.workload import Endpoint, IPAddress, Port, Service, Workload

log = logging.getLogger(__name__)

AddressKey = tuple[str, IPAddress]  # (network, ip)
Subscriber = Callable[["StateChange"], None]
DEPARTED_GRACE = 15.0
"""Seconds a removed workload's addresses stay known as the mesh's (see the module doc)."""
DEPARTED_LIMIT = 10_000
"""At most this many departed addresses are remembered (the oldest go first)."""
_K = TypeVar("_K")
_V = TypeVar("_V")


@dataclass(frozen=True, slots=True)
class KindChange:
    """Names (uid, `namespace/hostname` or `namespace/name`) changed for one kind."""

    added: frozenset[str] = frozenset()
    updated: frozenset[str] = frozenset()
    removed: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.added or self.updated or self.removed)


@dataclass(frozen=True, slots=True)
class StateChange:
    """What one applied batch changed, by kind."""

    workloads: KindChange = KindChange()
    services: KindChange = KindChange()
    policies: KindChange = KindChange()
    virtual_services: KindChange = KindChange()
    destination_rules: KindChange = KindChange()
    http_policies: KindChange = KindChange()

    def __bool__(self) -> bool:
        return bool(
            self.workloads or self.services or self.policies or self.routing or self.http_policies
        )

    @property
    def routing(self) -> bool:
        """A VirtualService or DestinationRule changed: route tables must be rebuilt."""
        return bool(self.virtual_services or self.destination_rules)


@dataclass(frozen=True, slots=True)
class StateBatch:
    """Converted upserts and removal names to apply together.

    `removed_addresses` are Address resource names: a workload uid or a service's
    `namespace/hostname`; the other removals name `namespace/name`. Removals are
    applied before upserts.
    """

    workloads: tuple[Workload, ...] = ()
    services: tuple[Service, ...] = ()
    policies: tuple[Authorization, ...] = ()
    virtual_services: tuple[VirtualService, ...] = ()
    destination_rules: tuple[DestinationRule, ...] = ()
    http_policies: tuple[HttpAuthorization, ...] = ()
    removed_addresses: tuple[str, ...] = ()
    removed_policies: tuple[str, ...] = ()
    removed_virtual_services: tuple[str, ...] = ()
    removed_destination_rules: tuple[str, ...] = ()
    removed_http_policies: tuple[str, ...] = ()


@dataclass
class _Tracker:
    """Accumulates one kind's changes during a batch (add then remove = nothing)."""

    before: set[str] = field(default_factory=set)  # names present before the batch
    touched: set[str] = field(default_factory=set)

    def change(self, present: Callable[[str], bool]) -> KindChange:
        added, updated, removed = set(), set(), set()
        for name in self.touched:
            was, now = name in self.before, present(name)
            if was and now:
                updated.add(name)
            elif now:
                added.add(name)
            elif was:
                removed.add(name)
        return KindChange(frozenset(added), frozenset(updated), frozenset(removed))

    def touch(self, name: str, present_before: bool) -> None:
        if name not in self.touched:
            self.touched.add(name)
            if present_before:
                self.before.add(name)


class StateStore:
    """Workloads, services, policies and routing config with lookup indexes and a change feed."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        departed_grace: float = DEPARTED_GRACE,
    ) -> None:
        self._clock = clock
        self._departed_grace = departed_grace
        # (network, ip) -> (workload, removed at), oldest first.
        self._departed: OrderedDict[AddressKey, tuple[Workload, float]] = OrderedDict()
        self._workloads: dict[str, Workload] = {}
        # Host-network workloads share an IP, so an address maps to several uids;
        # dict keeps insertion order (the most recently added uid is last).
        self._workloads_by_addr: dict[AddressKey, dict[str, None]] = {}
        self._workloads_by_node: dict[str, dict[str, None]] = {}
        self._services: dict[str, Service] = {}
        self._services_by_vip: dict[AddressKey, dict[str, None]] = {}
        # service key -> workload uid -> ports that workload serves for it.
        self._endpoints: dict[str, dict[str, tuple[Port, ...]]] = {}
        self._policies: dict[str, Authorization] = {}
        self._global_policies: set[str] = set()
        self._namespace_policies: dict[str, set[str]] = {}
        self._virtual_services: dict[str, VirtualService] = {}
        self._destination_rules: dict[str, DestinationRule] = {}
        self._http_policies: dict[str, HttpAuthorization] = {}
        self._subscribers: list[Subscriber] = []

    # --- change feed ---------------------------------------------------------

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call `subscriber` after every batch that changed something; returns unsubscribe."""
        self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

        return unsubscribe

    # --- writes ----------------------------------------------------------------

    def apply(self, batch: StateBatch) -> StateChange:
        """Apply removals then upserts in one step; notify subscribers if anything changed."""
        workloads, services, policies = _Tracker(), _Tracker(), _Tracker()
        for name in batch.removed_addresses:
            if name in self._workloads:
                workloads.touch(name, True)
                self._depart(self._workloads[name])
                self._remove_workload(name)
            elif name in self._services:
                services.touch(name, True)
                self._remove_service(name)
            else:
                log.debug("removal of unknown address %s ignored", name)
        for name in batch.removed_policies:
            if name in self._policies:
                policies.touch(name, True)
                self._remove_policy(name)
        virtual_services = _replace_keyed(
            self._virtual_services, batch.removed_virtual_services, batch.virtual_services
        )
        destination_rules = _replace_keyed(
            self._destination_rules, batch.removed_destination_rules, batch.destination_rules
        )
        http_policies = _replace_keyed(
            self._http_policies, batch.removed_http_policies, batch.http_policies
        )
        for workload in batch.workloads:
            old = self._workloads.get(workload.uid)
            if old == workload:
                continue  # unchanged resend (e.g. after reconnect): no event
            workloads.touch(workload.uid, old is not None)
            if old is not None:
                self._remove_workload(workload.uid)
            self._add_workload(workload)
        for service in batch.services:
            old_service = self._services.get(service.key)
            if old_service == service:
                continue
            services.touch(service.key, old_service is not None)
            if old_service is not None:
                self._remove_service(service.key)
            self._add_service(service)
        for policy in batch.policies:
            old_policy = self._policies.get(policy.key)
            if old_policy == policy:
                continue
            policies.touch(policy.key, old_policy is not None)
            if old_policy is not None:
                self._remove_policy(policy.key)
            self._add_policy(policy)
        change = StateChange(
            workloads.change(self._workloads.__contains__),
            services.change(self._services.__contains__),
            policies.change(self._policies.__contains__),
            virtual_services.change(self._virtual_services.__contains__),
            destination_rules.change(self._destination_rules.__contains__),
            http_policies.change(self._http_policies.__contains__),
        )
        if change:
            for subscriber in list(self._subscribers):
                try:
                    subscriber(change)
                except Exception:  # the batch is applied; one broken reader must not stop the rest
                    log.exception("state subscriber %r failed", subscriber)
        return change

    def _add_workload(self, workload: Workload) -> None:
        self._workloads[workload.uid] = workload
        for ip in workload.addresses:
            self._workloads_by_addr.setdefault((workload.network, ip), {})[workload.uid] = None
        if workload.node:
            self._workloads_by_node.setdefault(workload.node, {})[workload.uid] = None
        for key, ports in workload.services.items():
            self._endpoints.setdefault(key, {})[workload.uid] = ports

    def _remove_workload(self, uid: str) -> None:
        workload = self._workloads.pop(uid)
        for ip in workload.addresses:
            _discard(self._workloads_by_addr, (workload.network, ip), uid)
        _discard(self._workloads_by_node, workload.node, uid)
        for key in workload.services:
            _discard(self._endpoints, key, uid)

    def _depart(self, workload: Workload) -> None:
        now = self._clock()
        for ip in workload.addresses:
            key = (workload.network, ip)
            self._departed.pop(key, None)
            self._departed[key] = (workload, now)
        while self._departed:
            _, (_, removed_at) = next(iter(self._departed.items()))
            if len(self._departed) <= DEPARTED_LIMIT and now - removed_at < self._departed_grace:
                break
            self._departed.popitem(last=False)

    def _add_service(self, service: Service) -> None:
        self._services[service.key] = service
        for vip in service.addresses:
            self._services_by_vip.setdefault((vip.network, vip.address), {})[service.key] = None

    def _remove_service(self, key: str) -> None:
        service = self._services.pop(key)
        for vip in service.addresses:
            _discard(self._services_by_vip, (vip.network, vip.address), key)

    def _add_policy(self, policy: Authorization) -> None:
        self._policies[policy.key] = policy
        if policy.scope is Scope.GLOBAL:
            self._global_policies.add(policy.key)
        elif policy.scope is Scope.NAMESPACE:
            self._namespace_policies.setdefault(policy.namespace, set()).add(policy.key)

    def _remove_policy(self, key: str) -> None:
        policy = self._policies.pop(key)
        self._global_policies.discard(key)
        in_namespace = self._namespace_policies.get(policy.namespace)
        if in_namespace is not None:
            in_namespace.discard(key)
            if not in_namespace:
                del self._namespace_policies[policy.namespace]

    # --- reads -----------------------------------------------------------------

    def workload(self, uid: str) -> Workload | None:
        return self._workloads.get(uid)

    def workloads(self) -> Iterable[Workload]:
        return self._workloads.values()

    def workloads_by_address(self, network: str, ip: IPAddress) -> tuple[Workload, ...]:
        """Every workload with `ip` on `network` (several for host-network workloads)."""
        uids = self._workloads_by_addr.get((network, ip), {})
        return tuple(self._workloads[uid] for uid in uids)

    def workload_by_address(self, network: str, ip: IPAddress) -> Workload | None:
        """The workload with `ip` on `network`; the most recently added one if shared."""
        uids = self._workloads_by_addr.get((network, ip))
        return self._workloads[next(reversed(uids))] if uids else None

    def departed_by_address(self, network: str, ip: IPAddress) -> Workload | None:
        """The workload removed from `ip` within the last `departed_grace` seconds, if no
        workload has the address now."""
        entry = self._departed.get((network, ip))
        if entry is None or (network, ip) in self._workloads_by_addr:
            return None
        workload, removed_at = entry
        return workload if self._clock() - removed_at < self._departed_grace else None

    def workloads_on_node(self, node: str) -> tuple[Workload, ...]:
        """Workloads whose `node` field is `node` (the agent's own pods), by uid."""
        uids = self._workloads_by_node.get(node, {})
        return tuple(self._workloads[uid] for uid in sorted(uids))

    def service(self, key: str) -> Service | None:
        """The service named `namespace/hostname`."""
        return self._services.get(key)

    def services(self) -> Iterable[Service]:
        return self._services.values()

    def service_by_vip(self, network: str, ip: IPAddress) -> Service | None:
        """The service with VIP `ip` on `network`; the most recently added one if shared."""
        keys = self._services_by_vip.get((network, ip))
        return self._services[next(reversed(keys))] if keys else None

    def endpoints(self, service_key: str) -> tuple[Endpoint, ...]:
        """Workloads whose `services` map names `service_key`, in order of uid."""
        members: Mapping[str, tuple[Port, ...]] = self._endpoints.get(service_key, {})
        return tuple(Endpoint(self._workloads[uid], members[uid]) for uid in sorted(members))

    def policy(self, key: str) -> Authorization | None:
        """The policy named `namespace/name`."""
        return self._policies.get(key)

    def policies(self) -> Iterable[Authorization]:
        return self._policies.values()

    def policies_for(self, workload: Workload) -> tuple[Authorization, ...]:
        """GLOBAL policies, the NAMESPACE policies of its namespace, and those it names.

        Sorted by key; names of policies not (yet) known are skipped.
        """
        keys = set(self._global_policies)
        keys |= self._namespace_policies.get(workload.namespace, set())
        keys.update(k for k in workload.authorization_policies if k in self._policies)
        return tuple(self._policies[k] for k in sorted(keys))

    def virtual_service(self, key: str) -> VirtualService | None:
        """The VirtualService named `namespace/name`."""
        return self._virtual_services.get(key)

    def virtual_services(self) -> tuple[VirtualService, ...]:
        """Every VirtualService, by key (a stable order for route-table builds)."""
        return tuple(self._virtual_services[k] for k in sorted(self._virtual_services))

    def destination_rule(self, key: str) -> DestinationRule | None:
        """The DestinationRule named `namespace/name`."""
        return self._destination_rules.get(key)

    def destination_rules(self) -> tuple[DestinationRule, ...]:
        """Every DestinationRule, by key."""
        return tuple(self._destination_rules[k] for k in sorted(self._destination_rules))

    def http_policy(self, key: str) -> HttpAuthorization | None:
        """The waypoint AuthorizationPolicy named `namespace/name`."""
        return self._http_policies.get(key)

    def http_policies(self) -> tuple[HttpAuthorization, ...]:
        """Every AuthorizationPolicy served for waypoints, by key."""
        return tuple(self._http_policies[k] for k in sorted(self._http_policies))

    def counts(self) -> dict[str, int]:
        """Sizes, for metrics and the admin page."""
        return {
            "workloads": len(self._workloads),
            "services": len(self._services),
            "policies": len(self._policies),
            "virtual_services": len(self._virtual_services),
            "destination_rules": len(self._destination_rules),
        }


class _Keyed(Protocol):
    @property
    def key(self) -> str: ...


_R = TypeVar("_R", bound=_Keyed)


def _replace_keyed(
    table: dict[str, _R], removals: Iterable[str], upserts: Iterable[_R]
) -> _Tracker:
    """Apply removals then upserts to a kind with no index but its key; track the change."""
    tracker = _Tracker()
    for name in removals:
        if table.pop(name, None) is not None:
            tracker.touch(name, True)
    for value in upserts:
        old = table.get(value.key)
        if old == value:
            continue  # unchanged resend: no event
        tracker.touch(value.key, old is not None)
        table[value.key] = value
    return tracker


def _discard(index: dict[_K, dict[str, _V]], key: _K, name: str) -> None:
    members = index.get(key)
    if members is not None:
        members.pop(name, None)
        if not members:
            del index[key]
