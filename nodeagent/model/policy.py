"""L4 authorization policies, mirroring the `istio.security.Authorization` xDS resource.

These are plain frozen values: the state layer converts protobuf into them, and
`nodeagent.policy` evaluates them against a `ConnectionAttributes`. Field names
follow the protobuf (`Rule.clauses`, `Clause.matches`, `Match.not_principals`, ...)
so that reading one next to the other is easy.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from nodeagent.model.identity import Identity

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class PolicyError(ValueError):
    """A policy value is malformed (bad port, bad string match, ...)."""


class Scope(enum.Enum):
    """Which workloads a policy applies to (same numbers as the protobuf enum)."""

    GLOBAL = 0  # every workload in the mesh (policies in the root namespace)
    NAMESPACE = 1  # every workload in `Authorization.namespace`
    WORKLOAD_SELECTOR = 2  # workloads that list the policy's key


class Action(enum.Enum):
    """What a matching policy does (ztunnel enforces only these two)."""

    ALLOW = 0
    DENY = 1


class StringMatchKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    PRESENCE = "presence"  # the value is non-empty


@dataclass(frozen=True, slots=True)
class StringMatch:
    """One `istio.security.StringMatch`; build with `exact()`, `prefix()`, ... ."""

    kind: StringMatchKind
    value: str = ""

    def __post_init__(self) -> None:
        if self.kind is StringMatchKind.PRESENCE and self.value:
            raise PolicyError(f"a presence match takes no value, got {self.value!r}")

    @classmethod
    def exact(cls, value: str) -> StringMatch:
        return cls(StringMatchKind.EXACT, value)

    @classmethod
    def prefix(cls, value: str) -> StringMatch:
        return cls(StringMatchKind.PREFIX, value)

    @classmethod
    def suffix(cls, value: str) -> StringMatch:
        return cls(StringMatchKind.SUFFIX, value)

    @classmethod
    def presence(cls) -> StringMatch:
        return cls(StringMatchKind.PRESENCE)

    def __str__(self) -> str:
        if self.kind is StringMatchKind.PRESENCE:
            return "*"
        if self.kind is StringMatchKind.PREFIX:
            return f"{self.value}*"
        if self.kind is StringMatchKind.SUFFIX:
            return f"*{self.value}"
        return self.value


@dataclass(frozen=True, slots=True)
class ServiceAccountMatch:
    """A (namespace, service account) pair compared with the peer identity's."""

    namespace: str
    service_account: str


def _check_ports(field: str, ports: tuple[int, ...]) -> None:
    for port in ports:
        if not 0 <= port <= 0xFFFF:
            raise PolicyError(f"{field}: port {port} is outside 0..65535")


@dataclass(frozen=True, slots=True)
class Match:
    """One `istio.security.Match`.

    Within a Match every non-empty field must hold (AND); the values inside one
    field are alternatives (OR); a `not_*` field holds when none of its values match.
    """

    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    source_ips: tuple[IPNetwork, ...] = ()
    not_source_ips: tuple[IPNetwork, ...] = ()
    destination_ips: tuple[IPNetwork, ...] = ()
    not_destination_ips: tuple[IPNetwork, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()

    def __post_init__(self) -> None:
        _check_ports("destination_ports", self.destination_ports)
        _check_ports("not_destination_ports", self.not_destination_ports)

    @property
    def is_empty(self) -> bool:
        """True when no field is set (such a Match is skipped by the engine)."""
        return not (
            self.namespaces
            or self.not_namespaces
            or self.principals
            or self.not_principals
            or self.source_ips
            or self.not_source_ips
            or self.destination_ips
            or self.not_destination_ips
            or self.destination_ports
            or self.not_destination_ports
            or self.service_accounts
            or self.not_service_accounts
        )


@dataclass(frozen=True, slots=True)
class Clause:
    """`istio.security.Clause`: the matches are alternatives (OR)."""

    matches: tuple[Match, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    """`istio.security.Rule`: every clause must hold (AND)."""

    clauses: tuple[Clause, ...] = ()


@dataclass(frozen=True, slots=True)
class Authorization:
    """`istio.security.Authorization`: rules are alternatives (OR)."""

    name: str
    namespace: str
    scope: Scope = Scope.WORKLOAD_SELECTOR
    action: Action = Action.ALLOW
    rules: tuple[Rule, ...] = ()
    dry_run: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise PolicyError("an authorization policy needs a name")

    @property
    def key(self) -> str:
        """`namespace/name`, the key workloads use in `authorization_policies`."""
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ConnectionAttributes:
    """What authorization knows about one inbound connection.

    `source_identity` is the peer's verified SPIFFE identity (HBONE/mTLS), or None
    for plaintext. `destination_port` is the real target port (for HBONE the
    CONNECT authority's port, never 15008).
    """

    source_ip: IPAddress
    source_identity: Identity | None
    destination_ip: IPAddress
    destination_port: int
    destination_namespace: str = ""
    destination_name: str = ""
    # The destination workload's uid, when known: host-network workloads share an IP,
    # so policy lookups for re-checks should prefer it over the address.
    destination_uid: str = ""

    def __post_init__(self) -> None:
        _check_ports("destination_port", (self.destination_port,))

    @classmethod
    def build(
        cls,
        source_ip: str,
        destination: str,
        *,
        identity: Identity | str | None = None,
        destination_namespace: str = "",
        destination_name: str = "",
    ) -> ConnectionAttributes:
        """Convenience constructor from text: `destination` is `ip:port` (`[v6]:port`)."""
        host, sep, port = destination.rpartition(":")
        if not sep or not port.isdigit():
            raise PolicyError(f"destination must be ip:port, got {destination!r}")
        peer = Identity.parse(identity) if isinstance(identity, str) else identity
        return cls(
            source_ip=ipaddress.ip_address(source_ip),
            source_identity=peer,
            destination_ip=ipaddress.ip_address(host.strip("[]")),
            destination_port=int(port),
            destination_namespace=destination_namespace,
            destination_name=destination_name,
        )
