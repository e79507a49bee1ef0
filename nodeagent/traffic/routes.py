"""The route table: VirtualServices and DestinationRules compiled per change, asked per connection.

`RouteTable.compile` resolves every resource's hosts to the services they name
(Istio's rules: a short host is relative to the resource's namespace), checks
references (a subset no DestinationRule defines, a host that is no service) and
indexes the result by service key. `RouteTable.decide` answers, for one new
connection to a service port, with no I/O and the random draws injected:

* the route: the first `tcp:` route of the service's VirtualService whose
  match holds (port, the caller's labels and namespace, destination subnet);
  none (or no VirtualService): the whole service, today's behaviour;
* the targets in the order a connection tries them: the weighted pick first,
  then the route's other destinations by weight (the fallback when a subset
  has no healthy endpoint left);
* each target's traffic policy (DestinationRule precedence: subset port level >
  subset > rule port level > rule), the connect attempts allowed, and the
  faults and mirror the draws selected.

`RouteTable.decide_http` does the same for one HTTP request to a service behind
a waypoint (`http:` routes; see traffic/http.py): the first route whose match
holds, then a forward (the same targets as above, per request), a redirect or
a direct response; a service whose VirtualService has http routes of which none
holds gets None (Envoy's 404 NR).

Labels: the workload API carries no label map, so a workload's labels are the
ones Istio derives its canonical name and revision from (`app`, `version`, and
their `service.istio.io/` and `app.kubernetes.io/` forms). A subset or
`sourceLabels` selecting on another key matches nothing, and compile says so.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from nodeagent.model.routing import (
    CANONICAL_NAME_LABELS,
    CANONICAL_REVISION_LABELS,
    DEFAULT_CONNECT_ATTEMPTS,
    Destination,
    DestinationRule,
    HttpMatch,
    HttpRoute,
    L4Match,
    TcpRoute,
    TrafficPolicy,
    VirtualService,
    resolve_host,
)
from nodeagent.model.workload import IPAddress, Service, Workload
from nodeagent.traffic.http import (
    HttpDecision,
    HttpRequest,
    direct_reply,
    matching,
    merged,
    redirect_reply,
    rewritten,
)
from nodeagent.traffic.resilience import (
    ISTIO_DEFAULT_RETRY,
    RetryPolicy,
    draw_fault,
    mirrored,
)

KNOWN_LABELS = CANONICAL_NAME_LABELS + CANONICAL_REVISION_LABELS
_NO_POLICY = TrafficPolicy()
_OTHER_PORT = -1  # the route index's key for ports no match names


def workload_labels(workload: Workload) -> Mapping[str, str]:
    """The labels the workload API lets us know: canonical name and revision under each key."""
    out: dict[str, str] = {}
    if workload.canonical_name:
        out.update(dict.fromkeys(CANONICAL_NAME_LABELS, workload.canonical_name))
    if workload.canonical_revision:
        out.update(dict.fromkeys(CANONICAL_REVISION_LABELS, workload.canonical_revision))
    return out


def workload_has_labels(workload: Workload, selector: Mapping[str, str]) -> bool:
    """`labels_match(selector, workload_labels(workload))` without building the mapping
    (it runs for every endpoint of a subset on every new connection)."""
    for key, value in selector.items():
        if key in CANONICAL_NAME_LABELS:
            if workload.canonical_name != value or not value:
                return False
        elif key in CANONICAL_REVISION_LABELS:
            if workload.canonical_revision != value or not value:
                return False
        else:
            return False
    return True


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@dataclass(frozen=True, slots=True)
class Target:
    """Where a connection may go: a service's endpoints, narrowed to a subset, on a port."""

    service: str  # service key (namespace/hostname)
    port: int  # the service port to connect to
    subset: str = ""
    selector: Mapping[str, str] | None = field(default=None, hash=False)  # None: every endpoint
    policy: TrafficPolicy = _NO_POLICY
    weight: int = 100

    @property
    def cluster(self) -> tuple[str, str, int]:
        """Envoy's cluster: what limits, balancing state and ejections are kept per."""
        return (self.service, self.subset, self.port)

    @property
    def label(self) -> str:
        return f"{self.service}:{self.port}" + (f" subset {self.subset}" if self.subset else "")

    def admits(self, workload: Workload) -> bool:
        return self.selector is None or workload_has_labels(workload, self.selector)


@dataclass(frozen=True, slots=True)
class Caller:
    """What a route match can see of the connecting workload."""

    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    namespace: str = ""

    @classmethod
    def of(cls, workload: Workload | None) -> Caller:
        if workload is None:
            return cls()
        return cls(MappingProxyType(dict(workload_labels(workload))), workload.namespace)


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """The answer for one new connection."""

    targets: tuple[Target, ...]  # first: the weighted pick; then the fallbacks in order
    max_attempts: int = DEFAULT_CONNECT_ATTEMPTS
    route: str = ""  # `namespace/name tcp[i]`, empty for the service's default route
    abort: bool = False  # an injected abort (flag FI)
    delay: float = 0.0  # an injected delay in seconds (flag DI)
    mirror: Target | None = None

    @property
    def target(self) -> Target:
        return self.targets[0]


@dataclass(frozen=True, slots=True)
class _Destination:
    """A route's destination, resolved; `service` empty when it names something unusable."""

    weight: int
    service: str = ""
    subset: str = ""
    port: int = 0  # 0: the connection's port
    selector: Mapping[str, str] | None = field(default=None, hash=False)
    rule: DestinationRule | None = None

    def target(self, port: int) -> Target:
        port = self.port or port
        policy = self.rule.policy_for(self.subset, port) if self.rule is not None else _NO_POLICY
        return Target(self.service, port, self.subset, self.selector, policy, self.weight)


@dataclass(frozen=True, slots=True)
class _Route:
    name: str
    spec: TcpRoute
    destinations: tuple[_Destination, ...]
    mirror: _Destination | None
    subnets: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...], ...]

    def ports(self) -> frozenset[int] | None:
        """The ports a match of this route can hold on; None for any port."""
        if not self.spec.match or any(m.port == 0 for m in self.spec.match):
            return None
        return frozenset(m.port for m in self.spec.match if m.port > 0)

    def matches(self, port: int, caller: Caller, dialled: IPAddress | None) -> bool:
        if not self.spec.match:
            return True
        return any(
            _holds(m, nets, port, caller, dialled)
            for m, nets in zip(self.spec.match, self.subnets, strict=True)
        )


def _holds(
    match: L4Match,
    nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...],
    port: int,
    caller: Caller,
    dialled: IPAddress | None,
) -> bool:
    if match.port and match.port != port:
        return False
    if match.source_namespace and match.source_namespace != caller.namespace:
        return False
    if not labels_match(match.source_labels, caller.labels):
        return False
    if not match.destination_subnets:
        return True
    # Subnets were given: only an address in one of them matches (none usable: no match).
    return dialled is not None and any(dialled in n for n in nets)


@dataclass(frozen=True, slots=True)
class HttpRouteEntry:
    """A compiled `http:` route: the spec and its destinations resolved like a tcp route's."""

    name: str  # `namespace/name http[i]`
    spec: HttpRoute
    destinations: tuple[_Destination, ...]
    mirrors: tuple[_Destination, ...] = ()  # as spec.mirrors, resolved


@dataclass(frozen=True, slots=True)
class DestinationSummary:
    """A route's destination as written and as resolved (`service` empty: unusable)."""

    host: str
    service: str
    subset: str
    port: int  # 0: the connection's port
    weight: int


@dataclass(frozen=True, slots=True)
class RouteSummary:
    """A compiled `tcp:` route, for `nodeagent routes` and explain (`spec` has the match,
    fault, mirror percentage and connect attempts as written)."""

    name: str  # `namespace/name tcp[i]`
    spec: TcpRoute
    destinations: tuple[DestinationSummary, ...]
    mirror: DestinationSummary | None


def _summary(route: _Route) -> RouteSummary:
    def one(written: Destination, d: _Destination) -> DestinationSummary:
        # As written: an unresolved destination keeps its subset and port for the reader.
        return DestinationSummary(written.host, d.service, written.subset, written.port, d.weight)

    spec = route.spec
    destinations = tuple(
        one(w.destination, d) for w, d in zip(spec.route, route.destinations, strict=True)
    )
    mirror = None
    if route.mirror is not None and spec.mirror is not None:
        mirror = one(spec.mirror.destination, route.mirror)
    return RouteSummary(route.name, spec, destinations, mirror)


@dataclass(frozen=True, slots=True)
class ServiceTraffic:
    """What the table knows about one service: its routes, its rule, and notes for `routes`."""

    service: str
    virtual_service: str = ""  # key of the VirtualService in force
    destination_rule: DestinationRule | None = None
    routes: tuple[_Route, ...] = ()
    http: tuple[HttpRouteEntry, ...] = ()  # the VirtualService's http routes, in match order
    needs_waypoint: tuple[str, ...] = ()  # `namespace/name: field` the agent does not apply
    # Port -> the routes that can match it, in order (key -1: any port no match names), so
    # a decision walks only those, not every route of the service.
    by_port: Mapping[int, tuple[_Route, ...]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        lists: dict[int, list[_Route]] = {_OTHER_PORT: []}
        for route in self.routes:  # one pass: a route joins the lists of the ports it names
            ports = route.ports()
            if ports is None:  # any port
                for found in lists.values():
                    found.append(route)
                continue
            for port in ports:
                if port not in lists:
                    # A newly named port starts with the any-port routes seen so far.
                    lists[port] = list(lists[_OTHER_PORT])
                lists[port].append(route)
        index = {p: tuple(found) for p, found in lists.items()}
        object.__setattr__(self, "by_port", MappingProxyType(index))

    def routes_for(self, port: int) -> tuple[_Route, ...]:
        """The routes that may match a connection to `port`, in match order."""
        found = self.by_port.get(port)
        return found if found is not None else self.by_port[_OTHER_PORT]

    def route_summaries(self) -> tuple[RouteSummary, ...]:
        """The service's `tcp:` routes in match order."""
        return tuple(_summary(r) for r in self.routes)

    def default_target(self, port: int) -> Target:
        rule = self.destination_rule
        policy = rule.policy_for("", port) if rule is not None else _NO_POLICY
        return Target(self.service, port, policy=policy)


@dataclass(frozen=True, slots=True)
class RouteTable:
    by_service: Mapping[str, ServiceTraffic] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # problems found at compile time, one line each

    @classmethod
    def compile(
        cls,
        virtual_services: Iterable[VirtualService],
        destination_rules: Iterable[DestinationRule],
        services: Iterable[Service],
    ) -> RouteTable:
        by_host: dict[str, str] = {}
        for svc in services:
            by_host.setdefault(svc.hostname, svc.key)
        notes: list[str] = []
        rules: dict[str, DestinationRule] = {}
        for rule in sorted(destination_rules, key=lambda r: _rule_rank(r, by_host)):
            host = resolve_host(rule.host, rule.namespace)
            key = by_host.get(host)
            if key is None:
                notes.append(f"DestinationRule {rule.key}: host {rule.host} is not a service")
            elif key in rules:
                notes.append(
                    f"DestinationRule {rule.key}: {host} already has {rules[key].key}; ignored"
                )
            else:
                rules[key] = rule
        traffic: dict[str, ServiceTraffic] = {
            key: ServiceTraffic(key, destination_rule=rule, needs_waypoint=_needs(rule))
            for key, rule in rules.items()
        }
        for vs in sorted(virtual_services, key=lambda v: v.key):
            if not vs.applies_to_mesh:
                continue
            for host in vs.hosts:
                full = resolve_host(host, vs.namespace)
                key = by_host.get(full)
                if key is None:
                    notes.append(f"VirtualService {vs.key}: host {host} is not a service")
                    continue
                current = traffic.get(key) or ServiceTraffic(key)
                if current.virtual_service:
                    notes.append(
                        f"VirtualService {vs.key}: {full} already routed by "
                        f"{current.virtual_service}; ignored"
                    )
                    continue
                resolve = _resolver(vs, by_host, rules, notes)
                routes = tuple(
                    _compile_route(f"{vs.key} tcp[{i}]", r, resolve, notes)
                    for i, r in enumerate(vs.tcp)
                )
                http = tuple(
                    _compile_http_route(f"{vs.key} http[{i}]", r, resolve, notes)
                    for i, r in enumerate(vs.http)
                )
                traffic[key] = ServiceTraffic(
                    key,
                    virtual_service=vs.key,
                    destination_rule=current.destination_rule,
                    routes=routes,
                    http=http,
                    needs_waypoint=current.needs_waypoint + _needs(vs),
                )
        return cls(MappingProxyType(traffic), tuple(notes))

    def service(self, key: str) -> ServiceTraffic | None:
        return self.by_service.get(key)

    def match(
        self, service: str, port: int, caller: Caller, dialled: IPAddress | None = None
    ) -> RouteSummary | None:
        """The route a new connection to `service:port` takes (no draw, no state); None for
        the service's default route (no VirtualService, or no route matches)."""
        traffic = self.by_service.get(service)
        if traffic is None:
            return None
        found = next(
            (r for r in traffic.routes_for(port) if r.matches(port, caller, dialled)), None
        )
        return _summary(found) if found is not None else None

    def target(self, service: str, port: int, subset: str = "") -> Target | None:
        """The target `service:port` narrowed to `subset` with its policy, as a route would
        build it; None for a subset no DestinationRule of the service defines."""
        traffic = self.by_service.get(service)
        rule = traffic.destination_rule if traffic is not None else None
        if not subset:
            return traffic.default_target(port) if traffic is not None else Target(service, port)
        found = rule.subset(subset) if rule is not None else None
        if rule is None or found is None:
            return None
        return Target(service, port, subset, found.labels, rule.policy_for(subset, port))

    def decide(
        self,
        service: str,
        port: int,
        caller: Caller,
        rng: random.Random,
        dialled: IPAddress | None = None,
    ) -> RouteDecision:
        """The decision for one new connection to `service:port` (never raises, never empty)."""
        traffic = self.by_service.get(service)
        if traffic is None:
            return RouteDecision((Target(service, port),))
        route = next(
            (r for r in traffic.routes_for(port) if r.matches(port, caller, dialled)), None
        )
        if route is None:
            return RouteDecision((traffic.default_target(port),))
        usable = [d for d in route.destinations if d.service]
        if not usable:
            # Every destination names something unusable: refuse rather than guess (Envoy: NR).
            return RouteDecision((), route=route.name)
        targets = tuple(d.target(port) for d in _weighted_order(usable, rng))
        spec = route.spec
        abort = delay = False
        if spec.fault is not None:
            if spec.fault.abort_percent is not None:
                abort = rng.random() < spec.fault.abort_percent.fraction
            if spec.fault.delay_percent is not None and not abort:
                delay = rng.random() < spec.fault.delay_percent.fraction
        mirror = None
        shadow = route.mirror
        if shadow is not None and shadow.service and spec.mirror is not None:
            mirror = shadow.target(port) if rng.random() < spec.mirror.percent.fraction else None
        return RouteDecision(
            targets,
            max_attempts=spec.max_connect_attempts,
            route=route.name,
            abort=abort,
            delay=spec.fault.delay if delay and spec.fault is not None else 0.0,
            mirror=mirror,
        )

    def decide_http(
        self,
        service_key: str,
        port: int,
        request: HttpRequest,
        caller: Caller,
        rng: random.Random,
    ) -> HttpDecision | None:
        """The decision for one HTTP request to `service_key:port` (pure; draws from `rng`).

        No VirtualService (or one without http routes): the service's default route, as
        `decide` gives a connection. Http routes of which none holds: None (Envoy: 404 NR).
        """
        traffic = self.by_service.get(service_key)
        if traffic is None or not traffic.http:
            target = traffic.default_target(port) if traffic else Target(service_key, port)
            return HttpDecision(
                "",
                RouteDecision((target,)),
                path=request.path,
                authority=request.authority,
                retry=ISTIO_DEFAULT_RETRY,  # istiod puts it on every route it writes
            )
        for entry in traffic.http:
            match = matching(entry.spec, port, request, caller)
            if match is not None:
                return _http_decision(entry, match, port, request, rng)
        return None


def _http_decision(
    entry: HttpRouteEntry, match: HttpMatch, port: int, request: HttpRequest, rng: random.Random
) -> HttpDecision:
    spec = entry.spec
    ops = spec.headers
    if spec.redirect is not None:
        return HttpDecision(entry.name, reply=redirect_reply(spec.redirect, request))
    if spec.direct_response is not None:
        return HttpDecision(entry.name, reply=direct_reply(spec.direct_response))
    path, authority = rewritten(spec.rewrite, match, request)
    usable = [(d, w) for d, w in zip(entry.destinations, spec.route, strict=True) if d.service]
    if not usable:
        # A delegate, or every destination names something unusable: refuse (Envoy: NR).
        return HttpDecision(
            entry.name, RouteDecision((), route=entry.name), path=path, authority=authority
        )
    order = _weighted_order([d for d, _ in usable], rng)
    written = {id(d): w for d, w in usable}
    picked = written[id(order[0])].headers
    fault = draw_fault(spec.fault, rng.random)
    shadows = tuple(
        d.target(port)
        for d, m in zip(entry.mirrors, spec.mirrors, strict=True)
        if d.service and mirrored((m,), rng.random)
    )
    return HttpDecision(
        entry.name,
        RouteDecision(tuple(d.target(port) for d in order), route=entry.name),
        path=path,
        authority=authority,
        request_headers=merged(ops.request, picked.request if picked else None),
        response_headers=merged(ops.response, picked.response if picked else None),
        delay=fault.delay,
        abort=fault.abort,
        timeout=spec.timeout,
        retry=RetryPolicy.of(spec.retries),
        mirrors=shadows,
    )


def _rule_rank(rule: DestinationRule, by_host: Mapping[str, str]) -> tuple[int, str]:
    """Istio prefers the rule in the service's own namespace; then by name, for stability."""
    key = by_host.get(resolve_host(rule.host, rule.namespace), "")
    return (0 if key.split("/", 1)[0] == rule.namespace else 1, rule.key)


def _needs(resource: VirtualService | DestinationRule | None) -> tuple[str, ...]:
    if resource is None:
        return ()
    return tuple(f"{resource.key}: {path}" for path in resource.needs_waypoint)


def _weighted_order(destinations: list[_Destination], rng: random.Random) -> list[_Destination]:
    """The weighted pick first, then the rest by weight (highest first, then as written)."""
    total = sum(d.weight for d in destinations)
    if total <= 0 or len(destinations) == 1:
        return destinations
    point = rng.random() * total
    chosen = len(destinations) - 1
    for i, d in enumerate(destinations):
        if point < d.weight:
            chosen = i
            break
        point -= d.weight
    rest = sorted((d for i, d in enumerate(destinations) if i != chosen), key=lambda d: -d.weight)
    return [destinations[chosen], *rest]


_Resolve = Callable[[str, Destination, int, str], "_Destination"]


def _compile_http_route(
    name: str, route: HttpRoute, resolve: _Resolve, notes: list[str]
) -> HttpRouteEntry:
    destinations = tuple(resolve(name, d.destination, d.weight, "route") for d in route.route)
    mirrors = tuple(resolve(name, m.destination, 100, "mirror") for m in route.mirrors)
    _note_source_labels(name, [m.source_labels for m in route.match], notes)
    return HttpRouteEntry(name, route, destinations, mirrors)


def _note_source_labels(name: str, selectors: list[Mapping[str, str]], notes: list[str]) -> None:
    for labels in selectors:
        unknown = sorted(k for k in labels if k not in KNOWN_LABELS)
        if unknown:
            notes.append(
                f"{name}: sourceLabels selects on {', '.join(unknown)}, which the workload "
                "API does not carry: that match holds for no caller"
            )


def _resolver(
    vs: VirtualService,
    by_host: Mapping[str, str],
    rules: Mapping[str, DestinationRule],
    notes: list[str],
) -> _Resolve:
    """Resolves a destination of route `name` of `vs` (host, subset, port) against the
    services and rules, noting what cannot be used (tcp and http routes alike)."""

    def resolve(name: str, written: Destination, weight: int, what: str) -> _Destination:
        host, subset, port = written.host, written.subset, written.port
        key = by_host.get(resolve_host(host, vs.namespace))
        if key is None:
            notes.append(f"{name}: {what} host {host} is not a service")
            return _Destination(weight)
        rule = rules.get(key)
        selector: Mapping[str, str] | None = None
        if subset:
            found = rule.subset(subset) if rule is not None else None
            if found is None:
                notes.append(
                    f"{name}: {what} subset {subset} of {key} is defined by no DestinationRule"
                )
                return _Destination(weight)
            selector = found.labels
            unknown = sorted(k for k in found.labels if k not in KNOWN_LABELS)
            if unknown:
                notes.append(
                    f"{name}: subset {subset} selects on {', '.join(unknown)}, which the "
                    "workload API does not carry: it matches no endpoint"
                )
        return _Destination(weight, key, subset, port, selector, rule)

    return resolve


def _compile_route(name: str, route: TcpRoute, resolve: _Resolve, notes: list[str]) -> _Route:
    destinations = tuple(resolve(name, d.destination, d.weight, "route") for d in route.route)
    mirror = None
    if route.mirror is not None:
        mirror = resolve(name, route.mirror.destination, 100, "mirror")
    # The reader checked every entry is an address or CIDR.
    subnets = tuple(
        tuple(ipaddress.ip_network(t, strict=False) for t in m.destination_subnets)
        if m.destination_subnets
        else ()
        for m in route.match
    )
    _note_source_labels(name, [m.source_labels for m in route.match], notes)
    return _Route(name, route, destinations, mirror, subnets)
