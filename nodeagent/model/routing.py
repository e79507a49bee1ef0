"""Istio's VirtualService and DestinationRule as plain frozen values, read from Istio's JSON shape.

One reader serves every source: the control plane's YAML (mesh file, `sandbox apply`)
and the agent's xDS resources (`json_format.MessageToDict` of the
`istio.networking.v1alpha3` message) are both Istio's camelCase JSON shape, so
`parse_virtual_service` / `parse_destination_rule` take that shape and raise
`RoutingSpecError` naming the field path (`spec.tcp[0].route[1].weight`); the
YAML front end turns the path into FILE:LINE:COL.

What the node agent applies is connection-level: `tcp:` routes, subsets,
`trafficPolicy.loadBalancer`, `connectionPool.tcp`, `outlierDetection`.
Fields that need HTTP parsing (or TLS inspection) are kept by name in
`needs_waypoint` and reported once; they do nothing in the agent.

`http:` routes are read in full into `VirtualService.http` (the waypoint applies
them; `spec.http` stays in `needs_waypoint`, the list of what the agent cannot
do). Field names, defaults and the route/redirect/directResponse exclusivity
follow istio/api networking/v1alpha3/virtual_service.proto and istiod's
validation. Regexes are RE2 full matches in Istio; here `re.fullmatch`,
compiled once at parse time.

Extensions (documented in docs/traffic.md): a `tcp:` route may carry `fault`,
`mirror`, `mirrorPercentage` and `maxConnectAttempts`. Istio's validating
webhook refuses unknown fields, so each may also come as an annotation on the
VirtualService whose value is a JSON object keyed by the route's index
(`{"0": {"abort": {"percentage": {"value": 50}}}}`); `to_wire` always sends
them as annotations, since the protobuf message has no field for them.
"""

from __future__ import annotations

import base64
import binascii
import enum
import ipaddress
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

GROUP = "networking.istio.io"
API_VERSIONS = ("v1", "v1beta1", "v1alpha3")
DOMAIN_SUFFIX = "svc.cluster.local"

# One annotation per extension; the value maps a tcp route's index to its block.
FAULT_ANNOTATION = "traffic.nodeagent.io/tcp-fault"
MIRROR_ANNOTATION = "traffic.nodeagent.io/tcp-mirror"
CONNECT_ATTEMPTS_ANNOTATION = "traffic.nodeagent.io/tcp-max-connect-attempts"
EXTENSION_ANNOTATIONS = (FAULT_ANNOTATION, MIRROR_ANNOTATION, CONNECT_ATTEMPTS_ANNOTATION)

# Istio's canonical service labels, most specific first (CanonicalService in istio/istio
# pkg/kube/labels/labels.go). The workload API carries only the values they give.
CANONICAL_NAME_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
CANONICAL_REVISION_LABELS = (
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/version",
    "version",
)

DEFAULT_CONNECT_ATTEMPTS = 3  # tries in all for one connection (first + 2 on other endpoints)
MAX_CONNECT_ATTEMPTS = 10


class RoutingSpecError(ValueError):
    """A field of a VirtualService or DestinationRule is unusable: `path: problem`."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class LoadBalancer(enum.Enum):
    """`LoadBalancerSettings.SimpleLB` values the agent applies (LEAST_CONN is Istio's old name)."""

    UNSPECIFIED = "UNSPECIFIED"
    ROUND_ROBIN = "ROUND_ROBIN"
    LEAST_REQUEST = "LEAST_REQUEST"
    RANDOM = "RANDOM"
    PASSTHROUGH = "PASSTHROUGH"


_LB_ALIASES = {"LEAST_CONN": LoadBalancer.LEAST_REQUEST}


@dataclass(frozen=True, slots=True)
class Percent:
    """`Percent.value`: 0..100, a double."""

    value: float

    @property
    def fraction(self) -> float:
        return self.value / 100.0


@dataclass(frozen=True, slots=True)
class Destination:
    """`Destination`: a host as written, a subset name, a port (0 = the connection's)."""

    host: str
    subset: str = ""
    port: int = 0


@dataclass(frozen=True, slots=True)
class RouteDestination:
    destination: Destination
    weight: int  # percent; the single destination of a route gets 100
    headers: Headers | None = None  # http routes only: header changes for this destination


@dataclass(frozen=True, slots=True)
class L4Match:
    """`L4MatchAttributes` fields the agent can see on a new connection."""

    port: int = 0
    source_labels: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    source_namespace: str = ""
    destination_subnets: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TcpFault:
    """Extension: `fault` on a tcp route, shaped like Istio's HTTP fault."""

    delay: float = 0.0  # seconds the connection is held before it is opened
    delay_percent: Percent | None = None
    abort_percent: Percent | None = None


@dataclass(frozen=True, slots=True)
class TcpMirror:
    """Extension: copy client bytes of a share of connections to `destination`."""

    destination: Destination
    percent: Percent = Percent(100.0)


@dataclass(frozen=True, slots=True)
class HeaderOps:
    """Istio's `Headers.HeaderOperations`: set (replace), add (append), remove."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def apply(self, headers: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        if not (self.set or self.add or self.remove):
            return headers
        drop = {n.lower() for n in self.remove} | {n.lower() for n, _ in self.set}
        out = [(k, v) for k, v in headers if k not in drop]
        out.extend((n.lower(), v) for n, v in self.set)
        out.extend((n.lower(), v) for n, v in self.add)
        return tuple(out)


@dataclass(frozen=True, slots=True)
class Headers:
    """Istio's `Headers`: operations on the request (before forwarding) and the response."""

    request: HeaderOps = HeaderOps()
    response: HeaderOps = HeaderOps()


class MatchKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    REGEX = "regex"
    PRESENT = "present"  # `{}` under headers/queryParams: any value, even empty


@dataclass(frozen=True, slots=True)
class StringMatch:
    """Istio's `StringMatch`; a regex must match the whole value (RE2 full match in Envoy)."""

    kind: MatchKind
    value: str = ""
    ignore_case: bool = False
    pattern: re.Pattern[str] | None = field(default=None, compare=False, hash=False, repr=False)

    def holds(self, text: str | None) -> bool:
        if text is None:
            return False
        if self.kind is MatchKind.PRESENT:
            return True
        if self.pattern is not None:
            return self.pattern.fullmatch(text) is not None
        want = self.value
        if self.ignore_case:
            text, want = text.lower(), want.lower()
        if self.kind is MatchKind.EXACT:
            return text == want
        return text.startswith(want)


@dataclass(frozen=True, slots=True)
class HttpMatch:
    """`HTTPMatchRequest`: every condition given must hold; HttpMatch() holds for all."""

    name: str = ""
    uri: StringMatch | None = None
    authority: StringMatch | None = None
    method: StringMatch | None = None
    headers: tuple[tuple[str, StringMatch], ...] = ()  # lowercase names
    without_headers: tuple[tuple[str, StringMatch], ...] = ()  # any holding: no match
    query_params: tuple[tuple[str, StringMatch], ...] = ()
    port: int = 0  # 0: any; -1: never (a match limited to gateways other than mesh)
    source_labels: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    source_namespace: str = ""
    ignore_uri_case: bool = False


class DerivePort(enum.Enum):
    """`HTTPRedirect.RedirectPortSelection`."""

    FROM_PROTOCOL_DEFAULT = "FROM_PROTOCOL_DEFAULT"
    FROM_REQUEST_PORT = "FROM_REQUEST_PORT"


@dataclass(frozen=True, slots=True)
class HttpRedirect:
    """`HTTPRedirect`: empty strings and port 0 keep the request's value."""

    uri: str = ""
    authority: str = ""
    port: int = 0
    derive_port: DerivePort = DerivePort.FROM_PROTOCOL_DEFAULT
    scheme: str = ""
    code: int = 301  # Istio's default redirectCode


@dataclass(frozen=True, slots=True)
class HttpDirectResponse:
    """`HTTPDirectResponse`: the status and the body (`body.string`, or `body.bytes` base64)."""

    status: int
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class HttpRewrite:
    """`HTTPRewrite`: `uri` replaces the matched prefix (Envoy's prefix_rewrite); `regex` with
    `regex_substitution` is `uriRegexRewrite` (every match in the path replaced)."""

    uri: str = ""
    authority: str = ""
    regex: re.Pattern[str] | None = field(default=None, compare=False, hash=False)
    regex_substitution: str = ""


GRPC_STATUS_CODES = {
    "OK": 0,
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "OUT_OF_RANGE": 11,
    "UNIMPLEMENTED": 12,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}

# Envoy's retry_on names (router filter x-envoy-retry-on and x-envoy-retry-grpc-on).
HTTP_RETRY_ON = (
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "envoy-ratelimited",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "http3-post-connect-failure",
)
GRPC_RETRY_ON = ("cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable")


@dataclass(frozen=True, slots=True)
class HttpFault:
    """`HTTPFaultInjection`: a delay and/or an abort, each for a share of requests."""

    delay: float = 0.0  # seconds (fixedDelay)
    delay_percent: Percent | None = None  # None: no delay
    abort_status: int = 0  # httpStatus; 0 with abort_grpc set
    abort_grpc: int | None = None  # grpcStatus as its code
    abort_percent: Percent | None = None  # None: no abort


@dataclass(frozen=True, slots=True)
class HttpRetry:
    """`HTTPRetry` as written: `attempts` retries after the first try (0: none)."""

    attempts: int
    per_try_timeout: float | None = None  # seconds; None: the route's timeout bounds each try
    retry_on: tuple[str, ...] = ()  # Envoy names as written; () : Istio's default list
    status_codes: tuple[int, ...] = ()  # numbers in retryOn (retriable-status-codes)
    remote_localities: bool = False


@dataclass(frozen=True, slots=True)
class HttpMirror:
    """One mirror (`mirror` + `mirrorPercentage`, or an entry of `mirrors`)."""

    destination: Destination
    percent: Percent = Percent(100.0)


@dataclass(frozen=True, slots=True)
class HttpRoute:
    """One `http:` route. Exactly one of `route`, `redirect`, `direct_response` is set
    (`delegate` routes are kept with none: they apply to gateways only, never match here)."""

    name: str
    match: tuple[HttpMatch, ...]  # empty: every request
    route: tuple[RouteDestination, ...] = ()
    redirect: HttpRedirect | None = None
    direct_response: HttpDirectResponse | None = None
    rewrite: HttpRewrite | None = None
    headers: Headers = Headers()
    timeout: float | None = None  # seconds; None or 0: none (Istio's default)
    retries: HttpRetry | None = None  # None: not written (Istio's default policy applies)
    fault: HttpFault | None = None
    mirrors: tuple[HttpMirror, ...] = ()
    # corsPolicy, delegate as written: read and kept, not applied; `notes` names each.
    unapplied: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TcpRoute:
    match: tuple[L4Match, ...]
    route: tuple[RouteDestination, ...]
    fault: TcpFault | None = None
    mirror: TcpMirror | None = None
    max_connect_attempts: int = DEFAULT_CONNECT_ATTEMPTS


@dataclass(frozen=True, slots=True)
class VirtualService:
    namespace: str
    name: str
    hosts: tuple[str, ...]
    tcp: tuple[TcpRoute, ...] = ()
    gateways: tuple[str, ...] = ()
    http: tuple[HttpRoute, ...] = ()  # applied by a waypoint, not the agent
    needs_waypoint: tuple[str, ...] = ()  # field paths the agent does not apply
    annotations: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    spec: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def applies_to_mesh(self) -> bool:
        """Istio: with `gateways` set, the resource applies to the mesh only if they list `mesh`."""
        return not self.gateways or "mesh" in self.gateways


@dataclass(frozen=True, slots=True)
class ConsistentHash:
    use_source_ip: bool = False


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    """`OutlierDetection`, defaults as Istio documents them (destination_rule.proto)."""

    consecutive_5xx_errors: int = 5  # 0 disables
    consecutive_gateway_errors: int = 0  # 0 disables
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_percent: int = 10
    min_health_percent: int = 0
    split_external_local_origin_errors: bool = False
    consecutive_local_origin_failures: int = 5  # counted only when split

    @property
    def threshold(self) -> int:
        """Consecutive connect failures that eject (0: never). Unsplit, a connect failure is
        a 503 to both the 5xx and the gateway counter; split, only the local-origin one."""
        if self.split_external_local_origin_errors:
            return self.consecutive_local_origin_failures
        limits = [n for n in (self.consecutive_5xx_errors, self.consecutive_gateway_errors) if n]
        return min(limits) if limits else 0


@dataclass(frozen=True, slots=True)
class TcpPool:
    """`ConnectionPoolSettings.TCPSettings`; None means Envoy's default (unlimited / 10 s / 1 h)."""

    max_connections: int | None = None
    connect_timeout: float | None = None
    idle_timeout: float | None = None


@dataclass(frozen=True, slots=True)
class HttpPool:
    """`ConnectionPoolSettings.HTTPSettings`; None means Envoy's default (unlimited, as Istio
    leaves them: 2^32-1)."""

    max_pending_requests: int | None = None  # http1MaxPendingRequests
    max_requests: int | None = None  # http2MaxRequests: active requests in the cluster
    max_requests_per_connection: int | None = None  # 0 and None: unlimited
    max_retries: int | None = None  # concurrent retries in the cluster
    idle_timeout: float | None = None  # upstream connection idle time (Envoy's default 1 h)


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    """The parts of `TrafficPolicy` the agent applies; None = not set at this level."""

    load_balancer: LoadBalancer | None = None
    consistent_hash: ConsistentHash | None = None
    tcp: TcpPool | None = None
    outlier: OutlierDetection | None = None
    http: HttpPool | None = None
    port_level: Mapping[int, TrafficPolicy] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )

    def merged_over(self, base: TrafficPolicy | None) -> TrafficPolicy:
        """This policy, with fields it leaves unset taken from `base` (Istio merges field by field
        at the top level: a subset's connectionPool replaces the DestinationRule's whole)."""
        if base is None:
            return self
        lb_set = self.load_balancer is not None or self.consistent_hash is not None
        return TrafficPolicy(
            load_balancer=self.load_balancer if lb_set else base.load_balancer,
            consistent_hash=self.consistent_hash if lb_set else base.consistent_hash,
            tcp=self.tcp if self.tcp is not None else base.tcp,
            outlier=self.outlier if self.outlier is not None else base.outlier,
            http=self.http if self.tcp is not None else base.http,  # one connectionPool
            port_level=self.port_level or base.port_level,
        )

    def for_port(self, port: int) -> TrafficPolicy:
        """The policy for one port: its portLevelSettings entry over this policy."""
        over = self.port_level.get(port)
        if over is None:
            return self
        merged = over.merged_over(self)
        return TrafficPolicy(
            merged.load_balancer, merged.consistent_hash, merged.tcp, merged.outlier, merged.http
        )


@dataclass(frozen=True, slots=True)
class Subset:
    name: str
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    traffic_policy: TrafficPolicy | None = None


@dataclass(frozen=True, slots=True)
class DestinationRule:
    namespace: str
    name: str
    host: str
    traffic_policy: TrafficPolicy | None = None
    subsets: tuple[Subset, ...] = ()
    needs_waypoint: tuple[str, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    spec: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def subset(self, name: str) -> Subset | None:
        return next((s for s in self.subsets if s.name == name), None)

    def policy_for(self, subset: str, port: int) -> TrafficPolicy:
        """Istio's precedence: subset's port level > subset > rule's port level > rule."""
        base = (self.traffic_policy or TrafficPolicy()).for_port(port)
        chosen = self.subset(subset) if subset else None
        if chosen is None or chosen.traffic_policy is None:
            return base
        return chosen.traffic_policy.for_port(port).merged_over(base)


def resolve_host(host: str, namespace: str) -> str:
    """A host as Istio resolves it (`ResolveShortnameToFQDN` in istio/istio pkg/config/model.go):
    a name without a dot is a service of the resource's namespace (`backend` in `demo` is
    `backend.demo.svc.cluster.local`); anything with a dot, `*` and IP addresses are taken
    as written."""
    if host == "*" or "." in host or ":" in host:
        return host
    return f"{host}.{namespace}.{DOMAIN_SUFFIX}"


# -- durations -------------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any, path: str, *, minimum: float = 0.0) -> float:
    """Seconds from a duration as Istio writes it (`1.5s`, `100ms`, `1m30s`)."""
    if not isinstance(value, str) or not value:
        raise RoutingSpecError(path, f"expected a duration such as 1s or 100ms, got {value!r}")
    text = value.strip()
    if text.startswith("-"):
        raise RoutingSpecError(path, f"a duration must not be negative, got {value!r}")
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if pos != len(text) or pos == 0:
        raise RoutingSpecError(path, f"unparsable duration {value!r} (use e.g. 1s, 100ms, 1m30s)")
    if total < minimum:
        raise RoutingSpecError(
            path, f"{value!r} is below the minimum of {format_duration(minimum)}"
        )
    return total


def format_duration(seconds: float) -> str:
    """The protobuf JSON form (`0.100s`)."""
    text = f"{seconds:.9f}".rstrip("0").rstrip(".")
    return f"{text}s"


# -- reading Istio's JSON shape --------------------------------------------------------------


def _sub(path: str, key: str | int) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}"


class _Spec:
    """Typed reads of one resource's plain data, errors naming the path."""

    def mapping(self, value: Any, path: str, allowed: Sequence[str]) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise RoutingSpecError(path, f"expected a mapping, got {_kind(value)}")
        for key in value:
            if key not in allowed:
                raise RoutingSpecError(
                    _sub(path, str(key)), f"unknown field (allowed: {', '.join(allowed)})"
                )
        return {k: v for k, v in value.items() if v is not None}

    def sequence(self, value: Any, path: str) -> Sequence[Any]:
        if value is None:
            return ()
        if not isinstance(value, list | tuple):
            raise RoutingSpecError(path, f"expected a list, got {_kind(value)}")
        return value

    def string(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not value:
            raise RoutingSpecError(path, f"expected a non-empty string, got {_kind(value)}")
        return value

    def integer(self, value: Any, path: str, lo: int, hi: int) -> int:
        if isinstance(value, str) and value.isdigit():
            value = int(value)  # protobuf JSON writes 64-bit integers as strings
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
            raise RoutingSpecError(path, f"expected an integer, got {_kind(value)}")
        number = int(value)
        if not lo <= number <= hi:
            raise RoutingSpecError(path, f"{number} is out of range {lo}..{hi}")
        return number

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise RoutingSpecError(path, f"expected true or false, got {_kind(value)}")
        return value

    def labels(self, value: Any, path: str) -> Mapping[str, str]:
        if value is not None and not isinstance(value, Mapping):
            raise RoutingSpecError(path, f"expected a mapping, got {_kind(value)}")
        data = self.mapping(value, path, allowed=tuple(value or ()))
        out: dict[str, str] = {}
        for k, v in data.items():
            if not isinstance(v, str | int | float) or isinstance(v, bool):
                raise RoutingSpecError(_sub(path, str(k)), f"expected a string, got {_kind(v)}")
            out[str(k)] = str(v)
        return MappingProxyType(out)

    def percent(self, value: Any, path: str) -> Percent:
        data = self.mapping(value, path, ("value",))
        raw = data.get("value", 0.0)
        if isinstance(raw, bool) or not isinstance(raw, int | float) or math.isnan(raw):
            raise RoutingSpecError(_sub(path, "value"), f"expected a number, got {_kind(raw)}")
        if not 0.0 <= raw <= 100.0:
            raise RoutingSpecError(_sub(path, "value"), f"{raw} is out of range 0..100")
        return Percent(float(raw))

    def port_number(self, value: Any, path: str) -> int:
        data = self.mapping(value, path, ("number", "name"))
        if "name" in data and "number" not in data:
            raise RoutingSpecError(_sub(path, "name"), "port names are not supported; give number")
        return self.integer(data.get("number", 0), _sub(path, "number"), 0, 65535)


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})" if value else "an empty string"
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


_READ = _Spec()

_VS_FIELDS = ("hosts", "gateways", "http", "tls", "tcp", "exportTo")
_TCP_ROUTE_FIELDS = ("match", "route", "fault", "mirror", "mirrorPercentage", "maxConnectAttempts")
_L4_MATCH_FIELDS = (
    "destinationSubnets",
    "port",
    "sourceLabels",
    "gateways",
    "sourceNamespace",
    "sourceSubnet",
)
_DR_FIELDS = ("host", "trafficPolicy", "subsets", "exportTo", "workloadSelector")
_POLICY_FIELDS = ("loadBalancer", "connectionPool", "outlierDetection", "tls", "portLevelSettings")
_POLICY_WAYPOINT = ("tunnel", "proxyProtocol", "retryBudget")


def parse_virtual_service(
    namespace: str,
    name: str,
    spec: Mapping[str, Any],
    annotations: Mapping[str, str] | None = None,
) -> VirtualService:
    """A VirtualService from Istio's JSON shape; RoutingSpecError naming the first bad field."""
    annotations = dict(annotations or {})
    data = _READ.mapping(spec, "spec", _VS_FIELDS)
    hosts = tuple(
        _READ.string(h, _sub("spec.hosts", i))
        for i, h in enumerate(_READ.sequence(data.get("hosts"), "spec.hosts"))
    )
    if not hosts:
        raise RoutingSpecError("spec.hosts", "at least one host is required")
    gateways = tuple(
        _READ.string(g, _sub("spec.gateways", i))
        for i, g in enumerate(_READ.sequence(data.get("gateways"), "spec.gateways"))
    )
    needs_waypoint: list[str] = []
    for section in ("http", "tls"):
        if _READ.sequence(data.get(section), f"spec.{section}"):
            needs_waypoint.append(f"spec.{section}")
    http = tuple(
        _http_route(item, _sub("spec.http", i))
        for i, item in enumerate(_READ.sequence(data.get("http"), "spec.http"))
    )
    extensions = _extension_annotations(annotations)
    routes = tuple(
        _tcp_route(item, _sub("spec.tcp", i), extensions.get(i, {}))
        for i, item in enumerate(_READ.sequence(data.get("tcp"), "spec.tcp"))
    )
    count = len(routes)
    for index, entry in extensions.items():
        if index >= count:
            annotation = next(iter(entry.values()))[0]
            raise RoutingSpecError(
                f"metadata.annotations[{annotation}]",
                f"names tcp route {index}, but the VirtualService has {count} tcp route(s)",
            )
    return VirtualService(
        namespace=namespace,
        name=name,
        hosts=hosts,
        tcp=routes,
        gateways=gateways,
        http=http,
        needs_waypoint=tuple(needs_waypoint),
        annotations=MappingProxyType(annotations),
        spec=MappingProxyType(dict(spec)),
    )


def _extension_annotations(annotations: Mapping[str, str]) -> dict[int, dict[str, Any]]:
    """Route index -> {field: (annotation, value)} from the extension annotations."""
    fields = {
        FAULT_ANNOTATION: ("fault",),
        MIRROR_ANNOTATION: ("mirror", "mirrorPercentage"),
        CONNECT_ATTEMPTS_ANNOTATION: ("maxConnectAttempts",),
    }
    out: dict[int, dict[str, Any]] = {}
    for annotation, names in fields.items():
        text = annotations.get(annotation)
        if text is None:
            continue
        path = f"metadata.annotations[{annotation}]"
        try:
            value = json.loads(text)
        except ValueError as e:
            raise RoutingSpecError(path, f"not JSON: {e}") from None
        if not isinstance(value, dict):
            raise RoutingSpecError(path, "expected a JSON object keyed by tcp route index")
        for key, block in value.items():
            if not str(key).isdigit():
                raise RoutingSpecError(path, f"key {key!r} is not a tcp route index")
            entry = out.setdefault(int(key), {})
            if len(names) == 1:
                entry[names[0]] = (annotation, block)
                continue
            if not isinstance(block, dict) or "mirror" not in block:
                raise RoutingSpecError(
                    f"{path}.{key}", "expected {mirror: ..., mirrorPercentage: ...}"
                )
            unknown = sorted(str(k) for k in block if k not in names)
            if unknown:
                raise RoutingSpecError(
                    f"{path}.{key}.{unknown[0]}", f"unknown field (allowed: {', '.join(names)})"
                )
            for name in names:
                if name in block:
                    entry[name] = (annotation, block[name])
    return out


def _tcp_route(value: Any, path: str, extra: Mapping[str, tuple[str, Any]]) -> TcpRoute:
    data = dict(_READ.mapping(value, path, _TCP_ROUTE_FIELDS))
    where = {k: _sub(path, k) for k in data}
    for name, (annotation, block) in extra.items():
        if name in data:
            raise RoutingSpecError(
                _sub(path, name), f"set both here and in annotation {annotation}"
            )
        data[name] = block
        where[name] = f"metadata.annotations[{annotation}]"
    matches = tuple(
        _l4_match(m, _sub(_sub(path, "match"), i))
        for i, m in enumerate(_READ.sequence(data.get("match"), _sub(path, "match")))
    )
    route = _route_destinations(data.get("route"), _sub(path, "route"))
    fault = _tcp_fault(data["fault"], where["fault"]) if "fault" in data else None
    mirror = None
    if "mirror" in data:
        percent = Percent(100.0)
        if "mirrorPercentage" in data:
            percent = _READ.percent(data["mirrorPercentage"], where["mirrorPercentage"])
        mirror = TcpMirror(_destination(data["mirror"], where["mirror"]), percent)
    elif "mirrorPercentage" in data:
        raise RoutingSpecError(where["mirrorPercentage"], "mirrorPercentage without mirror")
    attempts = DEFAULT_CONNECT_ATTEMPTS
    if "maxConnectAttempts" in data:
        attempts = _READ.integer(
            data["maxConnectAttempts"], where["maxConnectAttempts"], 1, MAX_CONNECT_ATTEMPTS
        )
    return TcpRoute(matches, route, fault, mirror, attempts)


# -- http routes ---------------------------------------------------------------------------

# Read and kept as written, not applied (CORS is for browsers at a gateway; delegate too).
_HTTP_UNAPPLIED = ("corsPolicy", "delegate")
_HTTP_ROUTE_FIELDS = (
    "name",
    "match",
    "route",
    "redirect",
    "directResponse",
    "rewrite",
    "headers",
    "timeout",
    "retries",
    "fault",
    "mirror",
    "mirrors",
    "mirrorPercentage",
    "mirrorPercent",
    *_HTTP_UNAPPLIED,
)
_HTTP_MATCH_FIELDS = (
    "name",
    "uri",
    "scheme",
    "method",
    "authority",
    "headers",
    "port",
    "sourceLabels",
    "gateways",
    "queryParams",
    "ignoreUriCase",
    "withoutHeaders",
    "sourceNamespace",
    "statPrefix",
)
_REDIRECT_CODES = (301, 302, 303, 307, 308)  # istiod's validation allows these


def _http_route(value: Any, path: str) -> HttpRoute:
    data = _READ.mapping(value, path, _HTTP_ROUTE_FIELDS)
    actions = [k for k in ("route", "redirect", "directResponse", "delegate") if k in data]
    if not actions:
        # istiod: "HTTP route, redirect or direct_response is required".
        raise RoutingSpecError(path, "one of route, redirect or directResponse is required")
    if len(actions) > 1:
        raise RoutingSpecError(
            _sub(path, actions[1]),
            f"set only one of route, redirect, directResponse (also has {actions[0]})",
        )
    for other in ("rewrite", "fault"):
        if other in data and actions[0] in ("redirect", "directResponse"):
            raise RoutingSpecError(_sub(path, other), f"cannot be combined with {actions[0]}")
    if "mirror" in data and "mirrors" in data:
        raise RoutingSpecError(_sub(path, "mirrors"), "set mirror or mirrors, not both")
    name = str(data["name"]) if "name" in data else ""
    matches = tuple(
        _http_match(m, _sub(_sub(path, "match"), i))
        for i, m in enumerate(_READ.sequence(data.get("match"), _sub(path, "match")))
    )
    route: tuple[RouteDestination, ...] = ()
    if "route" in data:
        route = _route_destinations(data["route"], _sub(path, "route"), http=True)
    redirect = _redirect(data["redirect"], _sub(path, "redirect")) if "redirect" in data else None
    direct = None
    if "directResponse" in data:
        direct = _direct_response(data["directResponse"], _sub(path, "directResponse"))
    rewrite = _rewrite(data["rewrite"], _sub(path, "rewrite")) if "rewrite" in data else None
    headers = _headers(data["headers"], _sub(path, "headers")) if "headers" in data else Headers()
    timeout = None
    if "timeout" in data:
        timeout = parse_duration(data["timeout"], _sub(path, "timeout")) or None
    retries = _retries(data["retries"], _sub(path, "retries")) if "retries" in data else None
    fault = _http_fault(data["fault"], _sub(path, "fault")) if "fault" in data else None
    mirrors = _mirrors(data, path)
    if mirrors and actions[0] != "route":
        raise RoutingSpecError(_sub(path, "mirror"), f"cannot be combined with {actions[0]}")
    unapplied = {k: data[k] for k in _HTTP_UNAPPLIED if k in data}
    return HttpRoute(
        name=name,
        match=matches,
        route=route,
        redirect=redirect,
        direct_response=direct,
        rewrite=rewrite,
        headers=headers,
        timeout=timeout,
        retries=retries,
        fault=fault,
        mirrors=mirrors,
        unapplied=MappingProxyType(unapplied),
        notes=tuple(_sub(path, k) for k in unapplied),
    )


def _retries(value: Any, path: str) -> HttpRetry:
    data = _READ.mapping(
        value,
        path,
        (
            "attempts",
            "perTryTimeout",
            "retryOn",
            "retryRemoteLocalities",
            "retryIgnorePreviousHosts",
        ),
    )
    attempts = _READ.integer(data.get("attempts", 0), _sub(path, "attempts"), 0, 2**31 - 1)
    per_try = None
    if "perTryTimeout" in data:
        per_try = parse_duration(data["perTryTimeout"], _sub(path, "perTryTimeout"), minimum=0.001)
    names: list[str] = []
    codes: list[int] = []
    if "retryOn" in data:
        where = _sub(path, "retryOn")
        text = data["retryOn"]
        if not isinstance(text, str):
            raise RoutingSpecError(where, f"expected a string, got {_kind(text)}")
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue  # istiod skips empty entries ("5xx,,reset")
            if item.isdigit():
                code = int(item)
                if not 100 <= code <= 599:
                    raise RoutingSpecError(where, f"status code {code} is out of range 100..599")
                codes.append(code)
            elif item in HTTP_RETRY_ON or item in GRPC_RETRY_ON:
                names.append(item)
            else:
                known = ", ".join((*HTTP_RETRY_ON, *GRPC_RETRY_ON))
                raise RoutingSpecError(
                    where, f"unknown retry condition {item!r} (known: {known}, or a status code)"
                )
    remote = False
    if "retryRemoteLocalities" in data:
        remote = _READ.boolean(data["retryRemoteLocalities"], _sub(path, "retryRemoteLocalities"))
    return HttpRetry(attempts, per_try, tuple(names), tuple(codes), remote)


def _http_fault(value: Any, path: str) -> HttpFault:
    data = _READ.mapping(value, path, ("delay", "abort"))
    if not data:
        raise RoutingSpecError(path, "a fault needs delay or abort")  # istiod's check too
    delay, delay_percent = 0.0, None
    if "delay" in data:
        where = _sub(path, "delay")
        block = _READ.mapping(
            data["delay"], where, ("fixedDelay", "exponentialDelay", "percentage", "percent")
        )
        if "exponentialDelay" in block:
            raise RoutingSpecError(
                _sub(where, "exponentialDelay"), "not supported (Istio does not implement it)"
            )
        if "fixedDelay" not in block:
            raise RoutingSpecError(_sub(where, "fixedDelay"), "required field is missing")
        delay = parse_duration(block["fixedDelay"], _sub(where, "fixedDelay"), minimum=0.001)
        delay_percent = _fault_percent(block, where)
    status, grpc, abort_percent = 0, None, None
    if "abort" in data:
        where = _sub(path, "abort")
        block = _READ.mapping(
            data["abort"], where, ("httpStatus", "grpcStatus", "http2Error", "percentage")
        )
        given = [k for k in ("httpStatus", "grpcStatus", "http2Error") if k in block]
        if len(given) != 1:
            raise RoutingSpecError(
                where,
                "set exactly one of httpStatus, grpcStatus"
                + (f" (got {', '.join(given)})" if given else ""),
            )
        if "http2Error" in block:
            raise RoutingSpecError(_sub(where, "http2Error"), "not supported (nor by Istio)")
        if "httpStatus" in block:
            # istiod: "httpStatus must be in range 200 - 599".
            status = _READ.integer(block["httpStatus"], _sub(where, "httpStatus"), 200, 599)
        else:
            grpc = _grpc_status(block["grpcStatus"], _sub(where, "grpcStatus"))
        abort_percent = _fault_percent(block, where)
    return HttpFault(delay, delay_percent, status, grpc, abort_percent)


def _grpc_status(value: Any, path: str) -> int:
    if isinstance(value, str) and value.upper() in GRPC_STATUS_CODES:
        return GRPC_STATUS_CODES[value.upper()]
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 16:
        return value
    raise RoutingSpecError(
        path, f"unknown gRPC status {value!r} (a name such as UNAVAILABLE, or 0..16)"
    )


def _mirrors(data: Mapping[str, Any], path: str) -> tuple[HttpMirror, ...]:
    """`mirror` with `mirrorPercentage` (or the deprecated `mirrorPercent`), or `mirrors`."""
    if "mirrors" in data:
        for key in ("mirrorPercentage", "mirrorPercent"):
            if key in data:
                raise RoutingSpecError(_sub(path, key), "applies to mirror, not mirrors")
        out = []
        where = _sub(path, "mirrors")
        for i, item in enumerate(_READ.sequence(data["mirrors"], where)):
            entry = _sub(where, i)
            block = _READ.mapping(item, entry, ("destination", "percentage"))
            if "destination" not in block:
                raise RoutingSpecError(_sub(entry, "destination"), "required field is missing")
            percent = Percent(100.0)
            if "percentage" in block:
                percent = _READ.percent(block["percentage"], _sub(entry, "percentage"))
            out.append(
                HttpMirror(_destination(block["destination"], _sub(entry, "destination")), percent)
            )
        return tuple(out)
    if "mirror" not in data:
        for key in ("mirrorPercentage", "mirrorPercent"):
            if key in data:
                raise RoutingSpecError(_sub(path, key), f"{key} without mirror")
        return ()
    if "mirrorPercentage" in data and "mirrorPercent" in data:
        raise RoutingSpecError(_sub(path, "mirrorPercent"), "set mirrorPercentage or mirrorPercent")
    percent = Percent(100.0)  # Istio: all requests when no percentage is given
    if "mirrorPercentage" in data:
        percent = _READ.percent(data["mirrorPercentage"], _sub(path, "mirrorPercentage"))
    elif "mirrorPercent" in data:
        percent = Percent(
            float(
                _READ.integer(_unwrap(data["mirrorPercent"]), _sub(path, "mirrorPercent"), 0, 100)
            )
        )
    return (HttpMirror(_destination(data["mirror"], _sub(path, "mirror")), percent),)


def _unwrap(value: Any) -> Any:
    """A wrapped scalar (`{value: N}`) as its value."""
    return value.get("value", 0) if isinstance(value, Mapping) else value


def _http_match(value: Any, path: str) -> HttpMatch:
    data = _READ.mapping(value, path, _HTTP_MATCH_FIELDS)
    if "gateways" in data and "mesh" not in _READ.sequence(
        data["gateways"], _sub(path, "gateways")
    ):
        return HttpMatch(port=-1)  # limited to gateways: never holds for mesh traffic
    ignore_case = False
    if "ignoreUriCase" in data:
        ignore_case = _READ.boolean(data["ignoreUriCase"], _sub(path, "ignoreUriCase"))

    def one(key: str, *, case: bool = False) -> StringMatch | None:
        if key not in data:
            return None
        return _string_match(data[key], _sub(path, key), ignore_case=case)

    return HttpMatch(
        name=str(data.get("name", "")),
        uri=one("uri", case=ignore_case),
        authority=one("authority"),
        method=one("method"),
        headers=_string_matches(data.get("headers"), _sub(path, "headers")),
        without_headers=_string_matches(data.get("withoutHeaders"), _sub(path, "withoutHeaders")),
        query_params=_string_matches(
            data.get("queryParams"), _sub(path, "queryParams"), prefix=False, lower=False
        ),
        port=_READ.integer(data.get("port", 0), _sub(path, "port"), 0, 65535),
        source_labels=_READ.labels(data.get("sourceLabels"), _sub(path, "sourceLabels")),
        source_namespace=str(data.get("sourceNamespace", "")),
        ignore_uri_case=ignore_case,
    )


def _string_matches(
    value: Any, path: str, *, prefix: bool = True, lower: bool = True
) -> tuple[tuple[str, StringMatch], ...]:
    """A map of name -> StringMatch where `{}` means "present" (header names lowercased)."""
    data = _READ.mapping(value, path, tuple(value) if isinstance(value, Mapping) else ())
    out: list[tuple[str, StringMatch]] = []
    for key, block in data.items():
        where = _sub(path, str(key))
        if not str(key):
            raise RoutingSpecError(where, "a name must not be empty")
        match = _string_match(block, where, present=True)
        if match.kind is MatchKind.PREFIX and not prefix:
            raise RoutingSpecError(_sub(where, "prefix"), "only exact and regex are supported here")
        out.append((str(key).lower() if lower else str(key), match))
    return tuple(out)


def _string_match(
    value: Any, path: str, *, ignore_case: bool = False, present: bool = False
) -> StringMatch:
    data = _READ.mapping(value, path, ("exact", "prefix", "regex"))
    if not data:
        if present:
            return StringMatch(MatchKind.PRESENT)
        raise RoutingSpecError(path, "set one of exact, prefix, regex")
    if len(data) > 1:
        raise RoutingSpecError(path, f"set one of exact, prefix, regex (got {', '.join(data)})")
    ((key, raw),) = data.items()
    if not isinstance(raw, str):
        raise RoutingSpecError(_sub(path, key), f"expected a string, got {_kind(raw)}")
    kind = MatchKind(key)
    pattern = None
    if kind is MatchKind.REGEX:
        pattern = _regex(raw, _sub(path, key), ignore_case=ignore_case)
    return StringMatch(kind, raw, ignore_case, pattern)


def _regex(text: str, path: str, *, ignore_case: bool = False) -> re.Pattern[str]:
    try:
        return re.compile(text, re.IGNORECASE if ignore_case else 0)
    except re.error as e:
        raise RoutingSpecError(path, f"invalid regular expression {text!r}: {e}") from None


def _redirect(value: Any, path: str) -> HttpRedirect:
    data = _READ.mapping(
        value, path, ("uri", "authority", "port", "derivePort", "scheme", "redirectCode")
    )
    if "port" in data and "derivePort" in data:
        raise RoutingSpecError(_sub(path, "derivePort"), "set port or derivePort, not both")
    derive = DerivePort.FROM_PROTOCOL_DEFAULT
    if "derivePort" in data:
        text = data["derivePort"]
        known = [d.value for d in DerivePort]
        if text not in known:
            raise RoutingSpecError(
                _sub(path, "derivePort"), f"unknown value {text!r} (known: {', '.join(known)})"
            )
        derive = DerivePort(text)
    scheme = ""
    if "scheme" in data:
        scheme = _READ.string(data["scheme"], _sub(path, "scheme")).lower()
        if scheme not in ("http", "https"):
            raise RoutingSpecError(_sub(path, "scheme"), f"must be http or https, got {scheme!r}")
    code = 301
    if "redirectCode" in data:
        code = _READ.integer(data["redirectCode"], _sub(path, "redirectCode"), 0, 999)
        if code not in _REDIRECT_CODES:
            allowed = ", ".join(map(str, _REDIRECT_CODES))
            raise RoutingSpecError(_sub(path, "redirectCode"), f"{code} is not one of {allowed}")
    uri = str(data.get("uri", ""))
    if uri and not uri.startswith("/"):
        raise RoutingSpecError(_sub(path, "uri"), f"must start with /, got {uri!r}")
    return HttpRedirect(
        uri=uri,
        authority=str(data.get("authority", "")),
        port=_READ.integer(data.get("port", 0), _sub(path, "port"), 0, 65535),
        derive_port=derive,
        scheme=scheme,
        code=code,
    )


def _direct_response(value: Any, path: str) -> HttpDirectResponse:
    data = _READ.mapping(value, path, ("status", "body"))
    if "status" not in data:
        raise RoutingSpecError(_sub(path, "status"), "required field is missing")
    status = _READ.integer(data["status"], _sub(path, "status"), 200, 599)
    where = _sub(path, "body")
    body = _READ.mapping(data.get("body"), where, ("string", "bytes"))
    if len(body) > 1:
        raise RoutingSpecError(where, "set string or bytes, not both")
    content = b""
    if "string" in body:
        if not isinstance(body["string"], str):
            raise RoutingSpecError(
                _sub(where, "string"), f"expected a string, got {_kind(body['string'])}"
            )
        content = body["string"].encode()
    elif "bytes" in body:
        try:
            content = base64.b64decode(str(body["bytes"]), validate=True)
        except (binascii.Error, ValueError):
            raise RoutingSpecError(_sub(where, "bytes"), "not base64") from None
    return HttpDirectResponse(status, content)


def _rewrite(value: Any, path: str) -> HttpRewrite:
    data = _READ.mapping(value, path, ("uri", "authority", "uriRegexRewrite"))
    if "uri" in data and "uriRegexRewrite" in data:
        raise RoutingSpecError(
            _sub(path, "uriRegexRewrite"), "set uri or uriRegexRewrite, not both"
        )
    regex, substitution = None, ""
    if "uriRegexRewrite" in data:
        where = _sub(path, "uriRegexRewrite")
        block = _READ.mapping(data["uriRegexRewrite"], where, ("match", "rewrite"))
        for key in ("match", "rewrite"):
            if key not in block:
                raise RoutingSpecError(_sub(where, key), "required field is missing")
        regex = _regex(_READ.string(block["match"], _sub(where, "match")), _sub(where, "match"))
        substitution = str(block["rewrite"])
        names = {i: n for n, i in regex.groupindex.items()}
        groups = "".join(
            f"(?P<{names[i]}>)" if i in names else "()" for i in range(1, regex.groups + 1)
        )
        try:  # RE2's \1 references are Python's too; a bad one is refused here, not per request
            re.compile(groups).sub(substitution, "", count=1)
        except (re.error, IndexError) as e:
            raise RoutingSpecError(_sub(where, "rewrite"), f"invalid substitution: {e}") from None
    return HttpRewrite(
        uri=str(data.get("uri", "")),
        authority=str(data.get("authority", "")),
        regex=regex,
        regex_substitution=substitution,
    )


def _headers(value: Any, path: str) -> Headers:
    data = _READ.mapping(value, path, ("request", "response"))
    return Headers(
        request=_header_ops(data.get("request"), _sub(path, "request")),
        response=_header_ops(data.get("response"), _sub(path, "response")),
    )


def _header_ops(value: Any, path: str) -> HeaderOps:
    data = _READ.mapping(value, path, ("set", "add", "remove"))
    removed = tuple(
        _READ.string(n, _sub(_sub(path, "remove"), i)).lower()
        for i, n in enumerate(_READ.sequence(data.get("remove"), _sub(path, "remove")))
    )
    return HeaderOps(
        set=_header_pairs(data.get("set"), _sub(path, "set")),
        add=_header_pairs(data.get("add"), _sub(path, "add")),
        remove=removed,
    )


def _header_pairs(value: Any, path: str) -> tuple[tuple[str, str], ...]:
    labels = _READ.labels(value, path)
    for name in labels:
        if name.startswith(":") or name.lower() == "host":
            # istiod refuses these too: the authority is changed by rewrite.authority.
            raise RoutingSpecError(_sub(path, name), "pseudo-headers and host cannot be changed")
    return tuple((k.lower(), v) for k, v in labels.items())


def _l4_match(value: Any, path: str) -> L4Match:
    data = _READ.mapping(value, path, _L4_MATCH_FIELDS)
    if "gateways" in data and "mesh" not in _READ.sequence(
        data["gateways"], _sub(path, "gateways")
    ):
        # A match limited to gateways never holds for mesh traffic: keep it, matching nothing.
        return L4Match(port=-1)
    if "sourceSubnet" in data:
        raise RoutingSpecError(_sub(path, "sourceSubnet"), "applies only to gateways")
    subnets = tuple(
        _cidr(s, _sub(_sub(path, "destinationSubnets"), i))
        for i, s in enumerate(
            _READ.sequence(data.get("destinationSubnets"), _sub(path, "destinationSubnets"))
        )
    )
    return L4Match(
        port=_READ.integer(data.get("port", 0), _sub(path, "port"), 0, 65535),
        source_labels=_READ.labels(data.get("sourceLabels"), _sub(path, "sourceLabels")),
        source_namespace=str(data.get("sourceNamespace", "")),
        destination_subnets=subnets,
    )


def _cidr(value: Any, path: str) -> str:
    text = _READ.string(value, path)
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise RoutingSpecError(path, f"{text!r} is not an IP address or CIDR") from None


def _destination(value: Any, path: str) -> Destination:
    data = _READ.mapping(value, path, ("host", "subset", "port"))
    if "host" not in data:
        raise RoutingSpecError(_sub(path, "host"), "required field is missing")
    return Destination(
        host=_READ.string(data["host"], _sub(path, "host")),
        subset=str(data.get("subset", "")),
        port=_READ.port_number(data["port"], _sub(path, "port")) if "port" in data else 0,
    )


def _route_destinations(
    value: Any, path: str, *, http: bool = False
) -> tuple[RouteDestination, ...]:
    """A route's destinations; `http`: `HTTPRouteDestination`, whose `headers` are read
    (a tcp route's are accepted and ignored, as before)."""
    items = _READ.sequence(value, path)
    if not items:
        raise RoutingSpecError(path, "at least one route destination is required")
    out: list[tuple[Destination, int | None, Headers | None]] = []
    for i, item in enumerate(items):
        where = _sub(path, i)
        data = _READ.mapping(item, where, ("destination", "weight", "headers"))
        if "destination" not in data:
            raise RoutingSpecError(_sub(where, "destination"), "required field is missing")
        weight = None
        if "weight" in data:
            weight = _READ.integer(data["weight"], _sub(where, "weight"), 0, 100)
        headers = None
        if http and "headers" in data:
            headers = _headers(data["headers"], _sub(where, "headers"))
        out.append((_destination(data["destination"], _sub(where, "destination")), weight, headers))
    if len(out) == 1:
        only, weight, headers = out[0]
        if weight not in (None, 0, 100):
            raise RoutingSpecError(
                _sub(_sub(path, 0), "weight"),
                f"the only destination of a route takes all traffic; weight {weight} is not 100",
            )
        return (RouteDestination(only, 100, headers),)
    total = sum(w or 0 for _, w, _ in out)
    # istiod sends http weights as written, and its Gateway API conversion sends relative ones
    # (Envoy's total_weight is their sum): an http route takes them as relative weights.
    if total != 100 and not http:
        listed = " + ".join(str(w or 0) for _, w, _ in out)
        raise RoutingSpecError(path, f"weights must sum to 100, got {listed} = {total}")
    return tuple(RouteDestination(d, w or 0, h) for d, w, h in out)


def _tcp_fault(value: Any, path: str) -> TcpFault:
    data = _READ.mapping(value, path, ("delay", "abort"))
    if not data:
        raise RoutingSpecError(path, "a fault needs delay or abort")
    delay, delay_percent, abort_percent = 0.0, None, None
    if "delay" in data:
        where = _sub(path, "delay")
        block = _READ.mapping(data["delay"], where, ("fixedDelay", "percentage", "percent"))
        if "fixedDelay" not in block:
            raise RoutingSpecError(_sub(where, "fixedDelay"), "required field is missing")
        delay = parse_duration(block["fixedDelay"], _sub(where, "fixedDelay"), minimum=0.001)
        delay_percent = _fault_percent(block, where)
    if "abort" in data:
        where = _sub(path, "abort")
        block = _READ.mapping(
            data["abort"], where, ("percentage", "httpStatus", "grpcStatus", "http2Error")
        )
        abort_percent = _fault_percent(block, where)
    return TcpFault(delay, delay_percent, abort_percent)


def _fault_percent(block: Mapping[str, Any], path: str) -> Percent:
    if "percentage" in block:
        return _READ.percent(block["percentage"], _sub(path, "percentage"))
    if "percent" in block:  # Istio's deprecated integer form
        return Percent(float(_READ.integer(block["percent"], _sub(path, "percent"), 0, 100)))
    return Percent(100.0)


def parse_destination_rule(
    namespace: str,
    name: str,
    spec: Mapping[str, Any],
    annotations: Mapping[str, str] | None = None,
) -> DestinationRule:
    """A DestinationRule from Istio's JSON shape; RoutingSpecError naming the first bad field."""
    data = _READ.mapping(spec, "spec", _DR_FIELDS)
    if "host" not in data:
        raise RoutingSpecError("spec.host", "required field is missing")
    host = _READ.string(data["host"], "spec.host")
    needs: list[str] = []
    policy = None
    if "trafficPolicy" in data:
        policy = _traffic_policy(data["trafficPolicy"], "spec.trafficPolicy", needs)
    subsets: list[Subset] = []
    seen: set[str] = set()
    for i, item in enumerate(_READ.sequence(data.get("subsets"), "spec.subsets")):
        where = _sub("spec.subsets", i)
        block = _READ.mapping(item, where, ("name", "labels", "trafficPolicy"))
        if "name" not in block:
            raise RoutingSpecError(_sub(where, "name"), "required field is missing")
        subset_name = _READ.string(block["name"], _sub(where, "name"))
        if subset_name in seen:
            raise RoutingSpecError(_sub(where, "name"), f"duplicate subset {subset_name!r}")
        seen.add(subset_name)
        sub_policy = None
        if "trafficPolicy" in block:
            sub_policy = _traffic_policy(
                block["trafficPolicy"], _sub(where, "trafficPolicy"), needs
            )
        subsets.append(
            Subset(
                subset_name, _READ.labels(block.get("labels"), _sub(where, "labels")), sub_policy
            )
        )
    return DestinationRule(
        namespace=namespace,
        name=name,
        host=host,
        traffic_policy=policy,
        subsets=tuple(subsets),
        needs_waypoint=tuple(needs),
        annotations=MappingProxyType(dict(annotations or {})),
        spec=MappingProxyType(dict(spec)),
    )


def _traffic_policy(
    value: Any, path: str, needs: list[str], *, port_level: bool = False
) -> TrafficPolicy:
    allowed = (*_POLICY_FIELDS[:-1], "port") if port_level else _POLICY_FIELDS + _POLICY_WAYPOINT
    data = _READ.mapping(value, path, allowed)
    for name in _POLICY_WAYPOINT:
        if name in data:
            needs.append(_sub(path, name))
    lb, chash = None, None
    if "loadBalancer" in data:
        lb, chash = _load_balancer(data["loadBalancer"], _sub(path, "loadBalancer"), needs)
    tcp, http = None, None
    if "connectionPool" in data:
        tcp, http = _connection_pool(data["connectionPool"], _sub(path, "connectionPool"), needs)
    outlier = None
    if "outlierDetection" in data:
        outlier = _outlier(data["outlierDetection"], _sub(path, "outlierDetection"))
    if "tls" in data:
        needs.append(_sub(path, "tls"))  # the mesh's own mTLS (HBONE) is not configurable here
    levels: dict[int, TrafficPolicy] = {}
    for i, item in enumerate(
        _READ.sequence(data.get("portLevelSettings"), _sub(path, "portLevelSettings"))
    ):
        where = _sub(_sub(path, "portLevelSettings"), i)
        if not isinstance(item, Mapping) or "port" not in item:
            raise RoutingSpecError(_sub(where, "port"), "required field is missing")
        port = _READ.port_number(item["port"], _sub(where, "port"))
        if port in levels:
            raise RoutingSpecError(_sub(where, "port"), f"port {port} is listed twice")
        levels[port] = _traffic_policy(item, where, needs, port_level=True)
    return TrafficPolicy(lb, chash, tcp, outlier, http, MappingProxyType(levels))


def _load_balancer(
    value: Any, path: str, needs: list[str]
) -> tuple[LoadBalancer | None, ConsistentHash | None]:
    data = _READ.mapping(
        value,
        path,
        ("simple", "consistentHash", "localityLbSetting", "warmupDurationSecs", "warmup"),
    )
    if "simple" in data and "consistentHash" in data:
        raise RoutingSpecError(path, "set simple or consistentHash, not both")
    for name in ("localityLbSetting", "warmupDurationSecs", "warmup"):
        if name in data:
            needs.append(_sub(path, name))
    if "simple" in data:
        text = data["simple"]
        known = [m.value for m in LoadBalancer] + list(_LB_ALIASES)
        if not isinstance(text, str) or (text not in known):
            raise RoutingSpecError(
                _sub(path, "simple"),
                f"unknown load balancer {text!r} (known: {', '.join(known)})",
            )
        return _LB_ALIASES.get(text) or LoadBalancer(text), None
    if "consistentHash" in data:
        where = _sub(path, "consistentHash")
        block = _READ.mapping(
            data["consistentHash"],
            where,
            (
                "useSourceIp",
                "httpHeaderName",
                "httpCookie",
                "httpQueryParameterName",
                "ringHash",
                "maglev",
                "minimumRingSize",
            ),
        )
        for name in ("httpHeaderName", "httpCookie", "httpQueryParameterName"):
            if name in block:
                needs.append(_sub(where, name))
        use_ip = _READ.boolean(block.get("useSourceIp", False), _sub(where, "useSourceIp"))
        return None, ConsistentHash(use_source_ip=use_ip)
    return None, None


def _connection_pool(value: Any, path: str, needs: list[str]) -> tuple[TcpPool, HttpPool | None]:
    data = _READ.mapping(value, path, ("tcp", "http"))
    http = None
    if "http" in data:
        needs.append(_sub(path, "http"))  # the waypoint applies it
        http = _http_pool(data["http"], _sub(path, "http"))
    where = _sub(path, "tcp")
    block = _READ.mapping(
        data.get("tcp"),
        where,
        (
            "maxConnections",
            "connectTimeout",
            "tcpKeepalive",
            "maxConnectionDuration",
            "idleTimeout",
        ),
    )
    maximum = None
    if "maxConnections" in block:
        maximum = _READ.integer(
            block["maxConnections"], _sub(where, "maxConnections"), 1, 2**31 - 1
        )
    connect = None
    if "connectTimeout" in block:
        connect = parse_duration(
            block["connectTimeout"], _sub(where, "connectTimeout"), minimum=0.001
        )
    idle = None
    if "idleTimeout" in block:
        idle = parse_duration(block["idleTimeout"], _sub(where, "idleTimeout"))
    return TcpPool(maximum, connect, idle), http


_HTTP_POOL_LIMITS = (
    ("http1MaxPendingRequests", "max_pending_requests"),
    ("http2MaxRequests", "max_requests"),
    ("maxRequestsPerConnection", "max_requests_per_connection"),
    ("maxRetries", "max_retries"),
)


def _http_pool(value: Any, path: str) -> HttpPool:
    data = _READ.mapping(
        value,
        path,
        (
            *(name for name, _ in _HTTP_POOL_LIMITS),
            "idleTimeout",
            "h2UpgradePolicy",
            "useClientProtocol",
            "maxConcurrentStreams",
        ),
    )
    limits: dict[str, int | None] = {}
    for name, attr in _HTTP_POOL_LIMITS:
        if name in data:
            # Istio: 0 leaves Envoy's default (unlimited), as an unset field does.
            number = _READ.integer(data[name], _sub(path, name), 0, 2**32 - 1)
            limits[attr] = number or None
    idle = None
    if "idleTimeout" in data:
        idle = parse_duration(data["idleTimeout"], _sub(path, "idleTimeout"))
    if "h2UpgradePolicy" in data:
        known = ("DEFAULT", "DO_NOT_UPGRADE", "UPGRADE")
        if data["h2UpgradePolicy"] not in known:
            raise RoutingSpecError(
                _sub(path, "h2UpgradePolicy"),
                f"unknown value {data['h2UpgradePolicy']!r} (known: {', '.join(known)})",
            )
    if "useClientProtocol" in data:
        _READ.boolean(data["useClientProtocol"], _sub(path, "useClientProtocol"))
    return HttpPool(idle_timeout=idle, **limits)


def _outlier(value: Any, path: str) -> OutlierDetection:
    data = _READ.mapping(
        value,
        path,
        (
            "consecutive5xxErrors",
            "consecutiveGatewayErrors",
            "consecutiveErrors",
            "interval",
            "baseEjectionTime",
            "maxEjectionPercent",
            "minHealthPercent",
            "splitExternalLocalOriginErrors",
            "consecutiveLocalOriginFailures",
        ),
    )
    base = OutlierDetection()
    errors = base.consecutive_5xx_errors
    if "consecutive5xxErrors" in data:
        errors = _wrapped_int(data["consecutive5xxErrors"], _sub(path, "consecutive5xxErrors"))
    elif "consecutiveErrors" in data:  # deprecated name of the same counter
        errors = _READ.integer(data["consecutiveErrors"], _sub(path, "consecutiveErrors"), 0, 2**31)
    gateway = base.consecutive_gateway_errors
    if "consecutiveGatewayErrors" in data:
        gateway = _wrapped_int(
            data["consecutiveGatewayErrors"], _sub(path, "consecutiveGatewayErrors")
        )
    local = base.consecutive_local_origin_failures
    if "consecutiveLocalOriginFailures" in data:
        local = _wrapped_int(
            data["consecutiveLocalOriginFailures"], _sub(path, "consecutiveLocalOriginFailures")
        )
    split = False
    if "splitExternalLocalOriginErrors" in data:
        split = _READ.boolean(
            data["splitExternalLocalOriginErrors"], _sub(path, "splitExternalLocalOriginErrors")
        )
    interval = base.interval
    if "interval" in data:
        interval = parse_duration(data["interval"], _sub(path, "interval"), minimum=0.001)
    ejection = base.base_ejection_time
    if "baseEjectionTime" in data:
        ejection = parse_duration(
            data["baseEjectionTime"], _sub(path, "baseEjectionTime"), minimum=0.001
        )
    return OutlierDetection(
        consecutive_5xx_errors=errors,
        consecutive_gateway_errors=gateway,
        interval=interval,
        base_ejection_time=ejection,
        max_ejection_percent=_READ.integer(
            data.get("maxEjectionPercent", base.max_ejection_percent),
            _sub(path, "maxEjectionPercent"),
            0,
            100,
        ),
        min_health_percent=_READ.integer(
            data.get("minHealthPercent", base.min_health_percent),
            _sub(path, "minHealthPercent"),
            0,
            100,
        ),
        split_external_local_origin_errors=split,
        consecutive_local_origin_failures=local,
    )


def _wrapped_int(value: Any, path: str) -> int:
    """A `UInt32Value`: YAML writes the number; some tools write `{value: N}`."""
    if isinstance(value, Mapping):
        value = _READ.mapping(value, path, ("value",)).get("value", 0)
    return _READ.integer(value, path, 0, 2**31 - 1)


# -- back to the wire --------------------------------------------------------------------------


def to_wire(resource: VirtualService | DestinationRule) -> tuple[dict[str, Any], dict[str, str]]:
    """(spec for the protobuf message, annotations): tcp-route extensions move to annotations."""
    spec = json.loads(json.dumps(dict(resource.spec), default=str))
    annotations = {k: v for k, v in resource.annotations.items() if k not in EXTENSION_ANNOTATIONS}
    if isinstance(resource, DestinationRule):
        return spec, dict(resource.annotations)
    moved: dict[str, dict[str, Any]] = {}
    for i, route in enumerate(spec.get("tcp") or ()):
        if not isinstance(route, dict):
            continue
        if "fault" in route:
            moved.setdefault(FAULT_ANNOTATION, {})[str(i)] = route.pop("fault")
        mirror = {k: route.pop(k) for k in ("mirror", "mirrorPercentage") if k in route}
        if mirror:
            moved.setdefault(MIRROR_ANNOTATION, {})[str(i)] = mirror
        if "maxConnectAttempts" in route:
            moved.setdefault(CONNECT_ATTEMPTS_ANNOTATION, {})[str(i)] = route.pop(
                "maxConnectAttempts"
            )
    for annotation in EXTENSION_ANNOTATIONS:
        merged = dict(json.loads(resource.annotations.get(annotation, "{}")))
        merged.update(moved.get(annotation, {}))
        if merged:
            annotations[annotation] = json.dumps(merged, sort_keys=True, separators=(",", ":"))
    return spec, annotations
