"""Adapters from the agent's components to the admin providers (see providers.py).

The composition root builds these over the state store, the certificate
manager, the node manager, the connection registry, the capture backend and
the outbound router. The node manager's, registry's and router's values are
read by attribute through small protocols: the admin package sits beside
node/ and proxy/, not above them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import ipaddress
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, Protocol

from nodeagent.admin.dump import policy_json, service_json, workload_json
from nodeagent.admin.providers import ConfigDumpSections, ConnectionInfo, PodRules, PodStatus
from nodeagent.admin.telemetry import LiveConnectionView, split_hostport
from nodeagent.admin.traffic import RoutePreview, preview_steps
from nodeagent.datapath.iptables import InstalledCapture
from nodeagent.datapath.netns import NetnsHandle, resolve
from nodeagent.datapath.plan import (
    CapturePlan,
    FamilyPlan,
    owned_view,
    render_iptables_save,
    render_netlink,
)
from nodeagent.model.constants import INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT
from nodeagent.model.policy import ConnectionAttributes
from nodeagent.model.workload import Workload
from nodeagent.policy.engine import evaluate
from nodeagent.policy.trace import trace, unselected
from nodeagent.state.store import StateStore

LISTENER_ROLES = {
    OUTBOUND_PORT: "outbound",
    INBOUND_PLAINTEXT_PORT: "inbound plaintext",
    INBOUND_HBONE_PORT: "inbound HBONE",
}


# -- config dump -----------------------------------------------------------------


class CertificateStatusView(Protocol):
    def to_json(self) -> dict[str, object]: ...


class CertificateSource(Protocol):
    def status(self) -> Iterable[CertificateStatusView]: ...


def _json_value(value: Any) -> Any:
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_json_value(v) for v in value]
    return str(value)


def config_json(config: Any) -> dict[str, Any]:
    """A settings dataclass as JSON (values that are not JSON become strings)."""
    return {f.name: _json_value(getattr(config, f.name)) for f in dataclasses.fields(config)}


def config_dump_sections(
    store: StateStore, certificates: CertificateSource | None, config: Any
) -> ConfigDumpSections:
    """The config dump's sections: state store, certificate manager, config."""

    def services() -> list[Any]:
        return [service_json(s, store.endpoints(s.key)) for s in store.services()]

    def certs() -> list[Any]:
        return [s.to_json() for s in certificates.status()] if certificates is not None else []

    return ConfigDumpSections(
        workloads_fn=lambda: [workload_json(w) for w in store.workloads()],
        services_fn=services,
        policies_fn=lambda: [policy_json(p) for p in store.policies()],
        certificates_fn=certs,
        config_fn=lambda: config_json(config),
    )


# -- pods ---------------------------------------------------------------------------


class NodePodView(Protocol):
    """One pod as nodeagent.node.manager.PodStatus has it."""

    @property
    def uid(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def namespace(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def netns(self) -> str: ...
    @property
    def listeners(self) -> tuple[int, ...]: ...
    @property
    def enrolled(self) -> bool: ...
    @property
    def enrollment(self) -> str: ...
    @property
    def attempts(self) -> int: ...
    @property
    def last_error(self) -> str: ...


class NodePods(Protocol):
    def pods(self) -> Iterable[NodePodView]: ...


class NodePodsSource:
    """PodsSource over the node manager, with addresses and service accounts from the store."""

    def __init__(self, node: NodePods, store: StateStore, backend: str = "iptables") -> None:
        self._node = node
        self._store = store
        self._backend = backend

    def pods(self) -> list[PodStatus]:
        out = []
        for pod in self._node.pods():
            w = self._store.workload(pod.uid)
            ip = str(w.addresses[0]) if w is not None and w.addresses else ""
            listeners = tuple(
                f"{ip}:{port} ({LISTENER_ROLES.get(port, 'listener')})" if ip else str(port)
                for port in pod.listeners
            )
            out.append(
                PodStatus(
                    uid=pod.uid,
                    name=pod.name or (w.name if w else ""),
                    namespace=pod.namespace or (w.namespace if w else ""),
                    service_account=(w.service_account if w else "") or "default",
                    capture_state=pod.state,
                    listeners=listeners,
                    last_error=pod.last_error,
                    attempts=pod.attempts,
                    netns=pod.netns,
                    backend=self._backend if pod.enrolled else "",
                    enrolled=pod.enrolled,
                    enrollment=pod.enrollment,
                )
            )
        return out

    def find(self, ref: str) -> NodePodView | None:
        """A local pod by `namespace/name`, `name` or uid."""
        for pod in self._node.pods():
            if ref in (pod.uid, f"{pod.namespace}/{pod.name}", pod.name):
                return pod
        return None


# -- connections -------------------------------------------------------------------------


class RegistryConnections:
    """ConnectionsSource over the proxy's connection registry (any iterable of connections)."""

    def __init__(self, live: Callable[[], Iterable[LiveConnectionView]]) -> None:
        self._live = live

    def connections(self) -> list[ConnectionInfo]:
        out = []
        for c in self._live():
            outbound = c.direction == "outbound"
            out.append(
                ConnectionInfo(
                    workload=c.workload,
                    uid=c.workload_uid,
                    direction=c.direction,
                    local=c.local,
                    # Outbound: the registry's `remote` is what the app dialled and
                    # `target` where the bytes went; the admin view names them the other way.
                    remote=c.target if outbound else c.remote,
                    remote_target=c.remote if outbound else c.target,
                    protocol=c.protocol,
                    src_identity=str(c.source_identity or ""),
                    dst_identity=str(c.destination_identity or ""),
                    # As the local pod sees it: outbound it is the client.
                    bytes_sent=c.bytes_in if outbound else c.bytes_out,
                    bytes_recv=c.bytes_out if outbound else c.bytes_in,
                    opened_at=c.started,
                )
            )
        return out


# -- rules ---------------------------------------------------------------------------------


def _family_header(table: str, family: int) -> str:
    return f"*{table}" if family == 4 else f"*ip6:{table}"


def intended_rules_text(plan: CapturePlan) -> str:
    """The plan as iptables-save text per family (IPv6 tables as `ip6:<table>`), plus
    the netlink rule and route under `*netlink`."""
    parts: list[str] = []
    netlink: list[str] = []
    for fplan in plan.families:
        text = render_iptables_save(fplan)
        if fplan.family == 6:
            text = "\n".join(
                _family_header(line[1:], 6) if line.startswith("*") else line
                for line in text.splitlines()
            )
        parts.append(text.rstrip("\n"))
        netlink += render_netlink(fplan)
    parts.append("\n".join(["*netlink", *netlink, "COMMIT"]))
    return "\n".join(parts) + "\n"


def installed_rules_text(installed: InstalledCapture, plan: CapturePlan) -> str:
    """The agent-owned part of what the kernel holds, in the same shape as the plan's text."""
    parts: list[str] = []
    netlink: list[str] = []
    wanted: dict[int, FamilyPlan] = {f.family: f for f in plan.families}
    for family, state in sorted(installed.families.items()):
        for table, owned in sorted(owned_view(state.tables).items()):
            lines = [_family_header(table, family)]
            lines += [f":{chain} - [0:0]" for chain in owned.chains]
            lines += list(owned.jumps) + list(owned.rules)
            lines.append("COMMIT")
            parts.append("\n".join(lines))
        fplan = wanted.get(family)
        if fplan is not None:
            rule, route = render_netlink(fplan)
            netlink += [rule] if state.policy_rule else []
            netlink += [route] if state.local_route else []
    parts.append("\n".join(["*netlink", *netlink, "COMMIT"]))
    return "\n".join(parts) + "\n"


class CaptureReader(Protocol):
    def read_installed(self, netns: NetnsHandle) -> InstalledCapture: ...


class CaptureRulesSource:
    """PodRulesSource: a local pod's plan vs what its namespace holds (read from the kernel)."""

    def __init__(
        self,
        pods: NodePodsSource,
        store: StateStore,
        plan_for: Callable[[Workload, NetnsHandle], CapturePlan],
        capture: CaptureReader,
        backend: str = "iptables",
    ) -> None:
        self._pods = pods
        self._store = store
        self._plan_for = plan_for
        self._capture = capture
        self._backend = backend

    async def pod_rules(self, pod: str) -> PodRules | None:
        found = self._pods.find(pod)
        if found is None:
            return None
        workload = self._store.workload(found.uid)
        base = {"uid": found.uid, "name": found.name, "namespace": found.namespace}
        if workload is None or not found.netns:
            why = "the pod has no known network namespace" if workload else "unknown workload"
            return PodRules(**base, backend=self._backend, intended="", installed="", error=why)
        try:
            intended, installed = await asyncio.to_thread(self._read, workload, found.netns)
        except Exception as exc:  # a vanished namespace, iptables failing: say so
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return PodRules(**base, backend=self._backend, intended="", installed="", error=text)
        return PodRules(**base, backend=self._backend, intended=intended, installed=installed)

    def _read(self, workload: Workload, netns: str) -> tuple[str, str]:
        handle = resolve(netns)
        plan = self._plan_for(workload, handle)
        installed = self._capture.read_installed(handle)
        return intended_rules_text(plan), installed_rules_text(installed, plan)


# -- explain ----------------------------------------------------------------------------------


class RouteView(Protocol):
    """nodeagent.proxy.outbound.Route, read by attribute."""

    @property
    def kind(self) -> enum.Enum: ...
    @property
    def destination(self) -> tuple[str, int]: ...
    @property
    def authority(self) -> str: ...
    @property
    def workload_uid(self) -> str: ...
    @property
    def service(self) -> str: ...
    @property
    def endpoint_key(self) -> Hashable | None: ...
    @property
    def reason(self) -> str: ...
    @property
    def waypoint(self) -> str: ...
    def describe(self) -> str: ...


RouteFn = Callable[[Workload | None, tuple[str, int], Callable[[str], bool]], RouteView]


class MeshExplainer:
    """ExplainSource: route a would-be connection as the source's agent would, then
    authorize it as the destination's agent would, saying why at each step. To a service,
    `traffic` adds the route, subsets, candidate endpoints, fault and mirror it could get.
    Neither `route` nor `traffic` may change the agent's state (app.py routes over a
    preview copy of the route state)."""

    def __init__(
        self, store: StateStore, route: RouteFn, traffic: RoutePreview | None = None
    ) -> None:
        self._store = store
        self._route = route
        self._traffic = traffic

    def _find_pod(self, ref: str) -> Workload:
        matches = [
            w for w in self._store.workloads() if ref in (w.uid, f"{w.namespace}/{w.name}", w.name)
        ]
        if not matches:
            raise LookupError(f"unknown pod {ref!r}: no workload by that name or uid")
        if len(matches) > 1:
            names = ", ".join(sorted(f"{w.namespace}/{w.name}" for w in matches))
            raise LookupError(f"pod {ref!r} is ambiguous ({names}); use namespace/name")
        return matches[0]

    def explain(self, from_pod: str, to_host: str, to_port: int) -> Mapping[str, Any]:
        try:
            ipaddress.ip_address(to_host)
        except ValueError:
            raise ValueError(f"destination {to_host!r} is not an IP address") from None
        source = self._find_pod(from_pod)
        src_ip = str(source.addresses[0]) if source.addresses else ""
        src_identity = source.identity()
        owned = {str(a) for a in source.addresses}
        steps = [
            f"source pod {source.namespace}/{source.name} ({src_ip or 'no address'}) "
            f"on node {source.node or '?'}, identity {src_identity}"
        ]
        result: dict[str, Any] = {
            "source": {
                "pod": f"{source.namespace}/{source.name}",
                "address": src_ip,
                "node": source.node,
                "identity": str(src_identity),
            },
            "destination": {"address": f"{to_host}:{to_port}"},
        }
        route = self._route(source, (to_host, to_port), lambda ip: ip in owned)
        kind = str(route.kind.value)
        result["route"] = {"kind": kind, "detail": route.describe()}
        if route.service:
            steps.append(f"{to_host}:{to_port} is the VIP of service {route.service}")
            result["destination"]["service"] = route.service
            if route.waypoint:
                # The waypoint does the service's L7 routing: the agent applies none of it.
                steps.append(
                    f"service {route.service} is behind waypoint {route.waypoint}: "
                    "its traffic management is the waypoint's"
                )
            elif self._traffic is not None and kind != "passthrough":
                preview = self._traffic.preview(
                    source, route.service, to_port, ipaddress.ip_address(to_host)
                )
                result["traffic"] = dict(preview)
                steps += preview_steps(preview, route.service, to_port)
        if kind == "refuse":
            steps.append(f"the source's agent refuses the connection: {route.reason}")
            return {**result, "verdict": "deny", "steps": steps}
        if route.waypoint:
            waypoint = self._store.workload(route.workload_uid)
            who = f"{waypoint.namespace}/{waypoint.name}" if waypoint else route.workload_uid
            host, port = route.destination
            result["waypoint"] = {
                "name": route.waypoint,
                "workload": who,
                "endpoint": f"{host}:{port}",
                "authority": route.authority,
            }
            steps.append(
                f"through waypoint {route.waypoint} ({who} at {host}:{port}): HBONE as "
                f"{src_identity}, CONNECT {route.authority}; the waypoint applies L7 routing "
                "and policy and opens the connection to the destination as itself"
            )
            return {**result, "verdict": "allow", "steps": steps}
        dest = self._store.workload(route.workload_uid) if route.workload_uid else None
        dst_host, dst_port = split_hostport(route.authority) if route.authority else ("", 0)
        if not dst_host:
            dst_host, dst_port = route.destination
        if dest is None:
            steps.append(
                f"{dst_host}:{dst_port} is not a mesh workload: passed through as plain TCP, "
                "no mesh policy applies"
            )
            return {**result, "verdict": "allow", "steps": steps}
        hbone = kind == "hbone"
        result["destination"].update(
            {
                "workload": f"{dest.namespace}/{dest.name}",
                "endpoint": f"{dst_host}:{dst_port}",
                "node": dest.node,
                "identity": str(dest.identity()),
            }
        )
        if hbone:
            steps.append(
                f"endpoint {dest.namespace}/{dest.name} at {dst_host}:{dst_port} "
                f"(node {dest.node or '?'}): HBONE (mutual TLS) to "
                f"{route.destination[0]}:{route.destination[1]} as {src_identity}, "
                f"expecting {dest.identity()}"
            )
        else:
            steps.append(
                f"endpoint {dest.namespace}/{dest.name} at {dst_host}:{dst_port}: "
                f"plain TCP ({route.describe()}); the destination sees no identity"
            )
        attributes = ConnectionAttributes(
            source_ip=ipaddress.ip_address(src_ip or "0.0.0.0"),
            source_identity=src_identity if hbone else None,
            destination_ip=ipaddress.ip_address(dst_host),
            destination_port=dst_port,
            destination_namespace=dest.namespace,
            destination_name=dest.name,
            destination_uid=dest.uid,
        )
        policies = self._store.policies_for(dest)
        decision = evaluate(policies, attributes)
        traces = [t.render() for t in trace(policies, attributes)]
        dest_name = f"{dest.namespace}/{dest.name}"
        if policies:
            steps.append(
                f"{len(policies)} polic{'y applies' if len(policies) == 1 else 'ies apply'} to "
                f"{dest_name}: " + ", ".join(p.key for p in policies)
            )
        missed = unselected(dest, self._store.policies(), self._store.workloads())
        steps += [m.render(dest_name) for m in missed]
        steps += traces
        verdict = "allow" if decision.allowed else "deny"
        steps.append(f"decision: {decision.explain()}")
        result["policy"] = {
            "reason": decision.reason.value,
            "policy": decision.policy or "",
            "rule": decision.rule,
            # Policies of the destination's namespace whose selector picks no workload at all.
            "selects_nothing": [m.policy for m in missed if not m.selects],
        }
        return {**result, "verdict": verdict, "steps": steps}
