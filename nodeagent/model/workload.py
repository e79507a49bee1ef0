"""Workloads and services, mirroring the `istio.workload` xDS resources.

Plain frozen values: `nodeagent.state` converts protobuf into them (and rejects
malformed resources there); everything above reads them. Field names follow the
protobuf so the two read side by side; enums keep the protobuf numbers. Empty
strings mean "not set", as in proto3; optional sub-messages are `None` when absent.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from nodeagent.model.identity import Identity

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class TunnelProtocol(enum.Enum):
    NONE = 0
    HBONE = 1
    LEGACY_ISTIO_MTLS = 2  # accepted on the wire; the agent never sends it


class WorkloadType(enum.Enum):
    DEPLOYMENT = 0
    CRONJOB = 1
    POD = 2
    JOB = 3


class WorkloadStatus(enum.Enum):
    HEALTHY = 0
    UNHEALTHY = 1


class NetworkMode(enum.Enum):
    STANDARD = 0
    HOST_NETWORK = 1  # shares the node's IP: several workloads may have the same address


class IPFamilies(enum.Enum):
    AUTOMATIC = 0
    IPV4_ONLY = 1
    IPV6_ONLY = 2
    DUAL = 3


class AppProtocol(enum.Enum):
    UNKNOWN = 0
    HTTP11 = 1
    HTTP2 = 2
    GRPC = 3
    TCP = 4
    TLS = 5


class ApplicationTunnelProtocol(enum.Enum):
    """`ApplicationTunnel.Protocol`: how tunneled traffic is handed to the app."""

    NONE = 0
    PROXY = 1  # PROXY protocol v2 in front of the stream


class ServiceVisibility(enum.Enum):
    """`Service.Visibility`."""

    PUBLIC = 0
    NAMESPACE = 1


class LoadBalancingScope(enum.Enum):
    """`LoadBalancing.Scope`: a locality level endpoints are matched on."""

    UNSPECIFIED_SCOPE = 0
    REGION = 1
    ZONE = 2
    SUBZONE = 3
    NODE = 4
    CLUSTER = 5
    NETWORK = 6


class LoadBalancingMode(enum.Enum):
    """`LoadBalancing.Mode`."""

    UNSPECIFIED_MODE = 0
    STRICT = 1  # only endpoints matching every routing_preference scope
    FAILOVER = 2  # prefer matching endpoints, fall back to the rest
    PASSTHROUGH = 3  # keep the original destination


class HealthPolicy(enum.Enum):
    """`LoadBalancing.HealthPolicy`."""

    ONLY_HEALTHY = 0
    ALLOW_ALL = 1


@dataclass(frozen=True, slots=True)
class NetworkAddress:
    """An IP on a network (empty network = the default one); `length` for a prefix."""

    network: str
    address: IPAddress
    length: int | None = None


@dataclass(frozen=True, slots=True)
class NamespacedHostname:
    namespace: str
    hostname: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.hostname}"


@dataclass(frozen=True, slots=True)
class GatewayAddress:
    """Where a waypoint or network gateway is reached: a service host name or an IP."""

    destination: NamespacedHostname | NetworkAddress
    hbone_mtls_port: int = 0


@dataclass(frozen=True, slots=True)
class WeightedWaypoint:
    destination: GatewayAddress
    weight: int = 0


@dataclass(frozen=True, slots=True)
class Locality:
    region: str = ""
    zone: str = ""
    subzone: str = ""


@dataclass(frozen=True, slots=True)
class Port:
    """A service port and the workload port it maps to (0 = same as service_port)."""

    service_port: int
    target_port: int = 0
    app_protocol: AppProtocol = AppProtocol.UNKNOWN


@dataclass(frozen=True, slots=True)
class ApplicationTunnel:
    protocol: ApplicationTunnelProtocol = ApplicationTunnelProtocol.NONE
    port: int = 0


@dataclass(frozen=True, slots=True)
class Extension:
    """An extension we do not interpret: kept as its Any (type URL and bytes)."""

    name: str
    type_url: str = ""
    value: bytes = b""


@dataclass(frozen=True, slots=True)
class LoadBalancing:
    routing_preference: tuple[LoadBalancingScope, ...] = ()
    mode: LoadBalancingMode = LoadBalancingMode.UNSPECIFIED_MODE
    health_policy: HealthPolicy = HealthPolicy.ONLY_HEALTHY


_EMPTY_SERVICES: Mapping[str, tuple[Port, ...]] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Workload:
    """One `istio.workload.Workload`; `uid` names it (and the xDS resource)."""

    uid: str
    name: str
    namespace: str
    addresses: tuple[IPAddress, ...] = ()
    hostname: str = ""
    network: str = ""
    tunnel_protocol: TunnelProtocol = TunnelProtocol.NONE
    trust_domain: str = ""  # as sent; identity() applies the default
    service_account: str = ""  # as sent; identity() applies the default
    waypoint: GatewayAddress | None = None
    network_gateway: GatewayAddress | None = None
    node: str = ""
    canonical_name: str = ""
    canonical_revision: str = ""
    workload_type: WorkloadType = WorkloadType.DEPLOYMENT
    workload_name: str = ""
    native_tunnel: bool = False
    application_tunnel: ApplicationTunnel | None = None
    # `namespace/hostname` -> ports; read-only. Left out of the hash (a mapping has none).
    services: Mapping[str, tuple[Port, ...]] = field(
        default_factory=lambda: _EMPTY_SERVICES, hash=False
    )
    authorization_policies: tuple[str, ...] = ()  # `namespace/name` of selector policies
    status: WorkloadStatus = WorkloadStatus.HEALTHY
    cluster_id: str = ""
    locality: Locality | None = None
    network_mode: NetworkMode = NetworkMode.STANDARD
    extensions: tuple[Extension, ...] = ()
    capacity: int | None = None  # None when the control plane did not send one

    def __post_init__(self) -> None:
        if not isinstance(self.services, MappingProxyType):
            # Keep the value immutable even when built from a plain dict.
            object.__setattr__(self, "services", MappingProxyType(dict(self.services)))

    def identity(self) -> Identity:
        """The SPIFFE identity; empty trust domain / service account take Istio's defaults."""
        return Identity.for_workload(self.trust_domain, self.namespace, self.service_account)

    @property
    def label(self) -> str:
        """`namespace/name` for messages (the uid when there is no name)."""
        return f"{self.namespace}/{self.name}" if self.name else self.uid


@dataclass(frozen=True, slots=True)
class Service:
    """One `istio.workload.Service`; `key` (`namespace/hostname`) names it."""

    name: str
    namespace: str
    hostname: str
    addresses: tuple[NetworkAddress, ...] = ()  # VIPs; empty for a headless service
    ports: tuple[Port, ...] = ()
    subject_alt_names: tuple[str, ...] = ()
    waypoint: GatewayAddress | None = None
    load_balancing: LoadBalancing | None = None
    ip_families: IPFamilies = IPFamilies.AUTOMATIC
    extensions: tuple[Extension, ...] = ()
    canonical: bool = False
    ingress_use_waypoint: bool = False
    weighted_waypoints: tuple[WeightedWaypoint, ...] = ()
    visibility: ServiceVisibility = ServiceVisibility.PUBLIC

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.hostname}"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A workload behind a service, with the ports it serves for that service."""

    workload: Workload
    ports: tuple[Port, ...]
