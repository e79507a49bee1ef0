"""What the admin surface reads from the rest of the agent, as small interfaces.

The admin servers never reach into the agent's components directly: the
composition root (`app.py`) hands them objects that satisfy these protocols,
and tests hand them fakes. Data crosses as plain JSON-able dicts (config dump
sections, already in ztunnel's camelCase shape) or the frozen dataclasses
below, so the admin package stays independent of how each component stores
its state.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

Json = Any  # a value json.dumps accepts


class ConfigDumpSource(Protocol):
    """The sections of `/config_dump`, each already JSON-able."""

    def workloads(self) -> list[Json]: ...
    def services(self) -> list[Json]: ...
    def policies(self) -> list[Json]: ...
    def certificates(self) -> list[Json]: ...
    def config(self) -> Mapping[str, Json]: ...


@dataclass(frozen=True, kw_only=True)
class ConfigDumpSections:
    """A ConfigDumpSource assembled from one callable per section.

    The sections live in different components (state store, certificate
    manager, config); the composition root passes a bound method for each.
    """

    workloads_fn: Callable[[], list[Json]] = list
    services_fn: Callable[[], list[Json]] = list
    policies_fn: Callable[[], list[Json]] = list
    certificates_fn: Callable[[], list[Json]] = list
    config_fn: Callable[[], Mapping[str, Json]] = dict

    def workloads(self) -> list[Json]:
        return self.workloads_fn()

    def services(self) -> list[Json]:
        return self.services_fn()

    def policies(self) -> list[Json]:
        return self.policies_fn()

    def certificates(self) -> list[Json]:
        return self.certificates_fn()

    def config(self) -> Mapping[str, Json]:
        return self.config_fn()


@dataclass(frozen=True, kw_only=True)
class PodStatus:
    """One local pod as the node manager sees it (lifecycle state + listeners)."""

    uid: str
    name: str
    namespace: str
    service_account: str = "default"
    capture_state: str  # pending | capturing | ready | failed | removing | held | not-captured
    listeners: tuple[str, ...] = ()  # e.g. "10.1.0.5:15001 (outbound)"
    last_error: str = ""
    attempts: int = 0
    netns: str = ""
    backend: str = ""  # iptables | ebpf
    enrolled: bool = True
    enrollment: str = ""  # why (not) in the mesh: "namespace labelled", "sidecar", ...


class PodsSource(Protocol):
    def pods(self) -> list[PodStatus]: ...


@dataclass(frozen=True, kw_only=True)
class ConnectionInfo:
    """One live proxied connection, seen from the local pod `workload`."""

    workload: str  # "namespace/name" of the local pod
    uid: str = ""  # the local pod's workload uid (groups it in workloadState)
    direction: str  # inbound | outbound
    local: str  # local pod's address:port
    remote: str  # peer address:port actually connected (HBONE endpoint for outbound)
    remote_target: str = ""  # the original destination the app asked for
    protocol: str = "HBONE"  # HBONE | TCP
    src_identity: str = ""
    dst_identity: str = ""
    bytes_sent: int = 0
    bytes_recv: int = 0
    opened_at: float = 0.0  # unix seconds


class ConnectionsSource(Protocol):
    def connections(self) -> list[ConnectionInfo]: ...


class LogLevelControl(Protocol):
    """Read and change log levels; `set_level` raises ValueError on a bad spec."""

    def current(self) -> str: ...
    def set_level(self, spec: str) -> str: ...
    def reset(self) -> str: ...


@dataclass(frozen=True, kw_only=True)
class PodRules:
    """A pod's capture rules: what the agent intends and what the kernel holds.

    Both are `iptables-save` text restricted to the agent's own chains (or the
    eBPF backend's equivalent listing); `error` says why `installed` could not
    be read, if it could not.
    """

    uid: str
    name: str
    namespace: str
    backend: str = "iptables"
    intended: str
    installed: str
    error: str = ""


class PodRulesSource(Protocol):
    """Rules for a pod named `namespace/name`, `name` or uid; None if unknown."""

    async def pod_rules(self, pod: str) -> PodRules | None: ...


class ExplainSource(Protocol):
    """What the agent would do with a connection from `from_pod` to host:port.

    Returns a JSON-able dict; by convention it holds `verdict` (allow|deny),
    `steps` (list of one-line reasons, in order) and whatever else resolved
    (destination, endpoint, identities, policy, rule). Raises LookupError for
    an unknown pod and ValueError for an unusable destination.
    """

    def explain(self, from_pod: str, to_host: str, to_port: int) -> Mapping[str, Json]: ...


class RoutesSource(Protocol):
    """Traffic management per service (`/routes`): a JSON-able dict with `services` (one
    entry per service with a VirtualService, a DestinationRule or traffic through this
    agent) and `notes` (the route table's compile problems)."""

    def routes(self) -> Mapping[str, Json]: ...


class PodReleaser(Protocol):
    """Release a held pod (uid or namespace/name): remove its capture. Returns the uid(s);
    raises LookupError for an unknown pod, ValueError for one that is not held."""

    def release(self, pod: str) -> str: ...


DrainHook = Callable[[], Awaitable[None]]


@dataclass(frozen=True, kw_only=True)
class AdminProviders:
    """Everything the admin API reads or triggers; None means not available."""

    config_dump: ConfigDumpSource = field(default_factory=ConfigDumpSections)
    pods: PodsSource | None = None
    connections: ConnectionsSource | None = None
    log_level: LogLevelControl | None = None
    rules: PodRulesSource | None = None
    explain: ExplainSource | None = None
    routes: RoutesSource | None = None
    release: PodReleaser | None = None
    drain_then_exit: DrainHook | None = None
