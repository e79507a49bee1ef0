"""Prometheus metrics: Istio's traffic metrics by their exact names, plus the agent's own.

Traffic metrics keep Istio's names and label set so Istio's Grafana
dashboards and Kiali read them unchanged. They are held by a small custom
collector rather than prometheus_client Counters: it exposes exactly
`istio_tcp_*_total` with no extra `_created` series (ztunnel has none), and
recording is one dict update per call on the hot path.

Beside Istio's traffic metrics, the series ztunnel exports for its own dashboard
(Istio's "Ztunnel" Grafana dashboard selects `istio_build{component="ztunnel"}`):
`istio_xds_*` (src/xds/metrics.rs), `workload_manager_*` (src/inpod/metrics.rs, under
the `workload_manager` prefix app.rs gives it), `istio_tcp_sockets_open`, and
`process_open_fds` / `process_max_fds` (src/metrics/process.rs; prometheus_client's
process collector gives those and a few more `process_*`).

Everything lives in the agent's own CollectorRegistry, never the global one,
so several agents (or tests) in one process do not collide.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

import nodeagent
from nodeagent.model import workload as wm
from nodeagent.traffic.balancer import EVENTS, ClusterStats

log = logging.getLogger(__name__)

UNKNOWN = "unknown"

# Label order as Istio's CommonTrafficLabels.
TRAFFIC_LABELS: tuple[str, ...] = (
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)
# ztunnel's LocalityLabels, flattened after the common ones on its istio_tcp_* series
# (src/proxy/metrics.rs); "unknown" when a side's workload has no locality. Not on the
# waypoint's istio_request* series, which follow Envoy's (no locality labels).
LOCALITY_LABELS: tuple[str, ...] = (
    "source_region",
    "source_zone",
    "destination_region",
    "destination_zone",
)
TCP_TRAFFIC_LABELS: tuple[str, ...] = (*TRAFFIC_LABELS, *LOCALITY_LABELS)


@dataclass(frozen=True, kw_only=True)  # no slots: tcp_values is cached on the instance
class ConnectionLabels:
    """Istio's traffic labels for one connection; empty values render as "unknown"."""

    reporter: str  # "source" (outbound side) or "destination" (inbound side)
    source_workload: str = ""
    source_canonical_service: str = ""
    source_canonical_revision: str = ""
    source_workload_namespace: str = ""
    source_principal: str = ""
    source_app: str = ""
    source_version: str = ""
    source_cluster: str = ""
    destination_service: str = ""
    destination_service_namespace: str = ""
    destination_service_name: str = ""
    destination_workload: str = ""
    destination_canonical_service: str = ""
    destination_canonical_revision: str = ""
    destination_workload_namespace: str = ""
    destination_principal: str = ""
    destination_app: str = ""
    destination_version: str = ""
    destination_cluster: str = ""
    request_protocol: str = "tcp"
    response_flags: str = "-"
    connection_security_policy: str = UNKNOWN  # "mutual_tls" when HBONE carried it
    source_region: str = ""
    source_zone: str = ""
    destination_region: str = ""
    destination_zone: str = ""

    def values(self) -> tuple[str, ...]:
        """The values of TRAFFIC_LABELS, in order."""
        return tuple(getattr(self, name) or UNKNOWN for name in TRAFFIC_LABELS)

    def tcp_values(self) -> tuple[str, ...]:
        """The values of TCP_TRAFFIC_LABELS (the common ones, then locality), in order."""
        return self._tcp_values

    @functools.cached_property
    def _tcp_values(self) -> tuple[str, ...]:
        # Counted at open, on bytes and at close: labels are shared between connections
        # (ConnectionTelemetry caches them), so the tuple is built once per set of labels.
        return tuple(getattr(self, name) or UNKNOWN for name in TCP_TRAFFIC_LABELS)


assert tuple(f.name for f in dataclasses.fields(ConnectionLabels)) == TCP_TRAFFIC_LABELS


def connection_labels(
    *,
    reporter: str,
    source: wm.Workload | None = None,
    destination: wm.Workload | None = None,
    service: wm.Service | None = None,
    source_principal: str = "",
    destination_principal: str = "",
    mtls: bool = False,
    response_flags: str = "-",
) -> ConnectionLabels:
    """Istio's labels from what the proxy resolved: workloads, service, peer identities.

    As ztunnel (src/proxy/metrics.rs): `source_principal` comes only from mTLS, never
    from the source workload's record. Not given, it is the source workload's own
    identity when `mtls` (the source reporter presents it on the HBONE tunnel), else
    unknown: plaintext proves nothing. `destination_principal` not given is the
    destination workload's identity, as ztunnel always reports it.
    """
    src, dst = source, destination
    src_locality = (src.locality if src else None) or wm.Locality()
    dst_locality = (dst.locality if dst else None) or wm.Locality()
    return ConnectionLabels(
        reporter=reporter,
        source_workload=(src.workload_name or src.name) if src else "",
        source_canonical_service=src.canonical_name if src else "",
        source_canonical_revision=src.canonical_revision if src else "",
        source_workload_namespace=src.namespace if src else "",
        source_principal=source_principal or (str(src.identity()) if src and mtls else ""),
        source_app=src.canonical_name if src else "",
        source_version=src.canonical_revision if src else "",
        source_cluster=src.cluster_id if src else "",
        destination_service=service.hostname if service else "",
        destination_service_namespace=service.namespace if service else "",
        destination_service_name=service.name if service else "",
        destination_workload=(dst.workload_name or dst.name) if dst else "",
        destination_canonical_service=dst.canonical_name if dst else "",
        destination_canonical_revision=dst.canonical_revision if dst else "",
        destination_workload_namespace=dst.namespace if dst else "",
        destination_principal=destination_principal or (str(dst.identity()) if dst else ""),
        destination_app=dst.canonical_name if dst else "",
        destination_version=dst.canonical_revision if dst else "",
        destination_cluster=dst.cluster_id if dst else "",
        response_flags=response_flags,
        connection_security_policy="mutual_tls" if mtls else UNKNOWN,
        source_region=src_locality.region,
        source_zone=src_locality.zone,
        destination_region=dst_locality.region,
        destination_zone=dst_locality.zone,
    )


_TRAFFIC_COUNTERS: dict[str, str] = {
    # exposed name (without _total) -> help
    "istio_tcp_connections_opened": "Total TCP connections opened",
    "istio_tcp_connections_closed": "Total TCP connections closed",
    "istio_tcp_sent_bytes": "Total bytes sent during response of a TCP connection",
    "istio_tcp_received_bytes": "Total bytes received during request of a TCP connection",
    "istio_tcp_connections_failed": "Total TCP connections failed",
}


class TrafficMetrics(Collector):
    """Istio's `istio_tcp_*` counters, keyed by the full label tuple."""

    def __init__(self) -> None:
        self._values: dict[str, dict[tuple[str, ...], float]] = {n: {} for n in _TRAFFIC_COUNTERS}

    def _add(self, name: str, key: tuple[str, ...], amount: float) -> None:
        series = self._values[name]
        series[key] = series.get(key, 0) + amount

    def record_open(self, labels: ConnectionLabels) -> None:
        self._add("istio_tcp_connections_opened", labels.tcp_values(), 1)

    def record_bytes(self, labels: ConnectionLabels, *, sent: int, received: int) -> None:
        """Count bytes as they flow (long connections show up before they close)."""
        key = labels.tcp_values()
        if sent:
            self._add("istio_tcp_sent_bytes", key, sent)
        if received:
            self._add("istio_tcp_received_bytes", key, received)

    def record_close(self, labels: ConnectionLabels, *, sent: int = 0, received: int = 0) -> None:
        """Close a connection, counting any bytes not yet passed to record_bytes."""
        key = labels.tcp_values()
        self.record_bytes(labels, sent=sent, received=received)
        self._add("istio_tcp_connections_closed", key, 1)

    def record_failed(self, labels: ConnectionLabels) -> None:
        self._add("istio_tcp_connections_failed", labels.tcp_values(), 1)

    def value(self, name: str, labels: ConnectionLabels) -> float:
        """Current value of `name` (without `_total`) for these labels; 0 if never set."""
        return self._values[name].get(labels.tcp_values(), 0)

    def collect(self) -> Iterator[Metric]:
        for name, help_text in _TRAFFIC_COUNTERS.items():
            family = CounterMetricFamily(name, help_text, labels=TCP_TRAFFIC_LABELS)
            for key, amount in self._values[name].items():
                family.add_metric(key, amount)
            yield family


class ClusterTrafficMetrics(Collector):
    """Traffic management per destination service and subset, set from the route state at
    scrape time (the data path only adds to plain ints: no per-connection labelling):

    * `nodeagent_traffic_events_total{service,subset,event}`: overflows (UO), injected
      aborts (FI) and delays (DI), connect retries, mirror drops, ejections;
    * `nodeagent_traffic_ejected_endpoints{service,subset}`: endpoints ejected now;
    * `nodeagent_traffic_open_connections{service,subset}`: connections holding a slot
      (what `connectionPool.tcp.maxConnections` limits).

    `service` is the hostname (as Istio's `destination_service`), `subset` empty for
    the whole service (a route without subsets, or no VirtualService)."""

    def __init__(self) -> None:
        self._stats: tuple[ClusterStats, ...] = ()

    def set_stats(self, stats: Iterable[ClusterStats]) -> None:
        self._stats = tuple(stats)

    def collect(self) -> Iterator[Metric]:
        labels = ("service", "subset")
        events = CounterMetricFamily(
            "nodeagent_traffic_events",
            "Traffic management events per destination service and subset: `event` overflow"
            " (maxConnections, UO), fault_abort (FI), fault_delay (DI), retry, mirror_dropped,"
            " ejection",
            labels=(*labels, "event"),
        )
        ejected = GaugeMetricFamily(
            "nodeagent_traffic_ejected_endpoints",
            "Endpoints of a service's subset ejected as outliers now",
            labels=labels,
        )
        open_ = GaugeMetricFamily(
            "nodeagent_traffic_open_connections",
            "Outbound connections to a service's subset holding a maxConnections slot",
            labels=labels,
        )
        for stat in self._stats:
            key = (stat.service.split("/", 1)[-1], stat.subset)
            for event in EVENTS:
                events.add_metric((*key, event), stat.events.get(event, 0))
            ejected.add_metric(key, stat.ejected)
            open_.add_metric(key, stat.open)
        yield events
        yield ejected
        yield open_


# The component Istio's tools know the ambient node proxy by: the ztunnel dashboard
# selects `istio_build{component="ztunnel"}` (src/metrics/meta.rs sets the same).
BUILD_COMPONENT = "ztunnel"


class _BuildInfo(Collector):
    """`istio_build{component="ztunnel", tag=<our version>}`: ztunnel's `tag` is the Istio
    release it ships with; ours is the agent's own version, there being no Istio release
    behind it."""

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "istio_build", "Istio component build info", labels=("component", "tag")
        )
        family.add_metric((BUILD_COMPONENT, nodeagent.__version__), 1)
        yield family


class WorkloadManagerMetrics(Collector):
    """ztunnel's in-pod workload manager series (src/inpod/metrics.rs, prefixed
    `workload_manager_` by app.rs), from the node manager's pod states and counts:

    * `workload_manager_active_proxy_count`: pods whose proxy runs (ready: captured,
      listeners open);
    * `workload_manager_pending_proxy_count`: pods waiting for one (pending, capturing,
      or failed and retried); ztunnel's dashboard expects it to converge to zero;
    * `workload_manager_proxies_started_total` / `_stopped_total`: proxies set up and
      torn down (a held pod's listeners closing is a stop, as its proxy is gone)."""

    def __init__(self) -> None:
        self.active = 0
        self.pending = 0
        self.started = 0
        self.stopped = 0

    def collect(self) -> Iterator[Metric]:
        # Help texts as ztunnel's (src/inpod/metrics.rs).
        active = "The total number current workloads with active proxies (unstable)"
        pending = "The total number current workloads with pending proxies (unstable)"
        started = "The total number of proxies that were started (unstable)"
        stopped = "The total number of proxies that were stopped (unstable)"
        families = (
            (GaugeMetricFamily, "active_proxy_count", active, self.active),
            (GaugeMetricFamily, "pending_proxy_count", pending, self.pending),
            (CounterMetricFamily, "proxies_started", started, self.started),
            (CounterMetricFamily, "proxies_stopped", stopped, self.stopped),
        )
        for family_type, name, help_text, value in families:
            family = family_type(f"workload_manager_{name}", help_text)
            family.add_metric((), value)
            yield family


class LabelledTotals(Collector):
    """One counter family by an Istio name, as plain totals per label value: exposes
    exactly `<name>_total` (no `_created` series, like ztunnel), and the totals are set
    from a component's own cumulative counts at scrape time."""

    def __init__(self, name: str, help_text: str, label: str, values: tuple[str, ...]) -> None:
        self._name, self._help, self._label = name, help_text, label
        self._totals: dict[str, float] = dict.fromkeys(values, 0)

    def set_totals(self, totals: Mapping[str, int]) -> None:
        """Raise each total to the source's count (a counter never goes down)."""
        for value, total in totals.items():
            self._totals[value] = max(self._totals.get(value, 0), total)

    def value(self, label_value: str) -> float:
        return self._totals.get(label_value, 0)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._help, labels=(self._label,))
        for value, total in self._totals.items():
            family.add_metric((value,), total)
        yield family


# ztunnel's reasons (src/xds/metrics.rs ConnectionTerminationReason).
XDS_TERMINATION_REASONS = ("ConnectionError", "Error", "Reconnect", "Complete")
# Why the HBONE server refused or closed an inbound connection on its own.
HBONE_REFUSALS = ("connection_limit", "identity_limit")
HBONE_CLOSES = ("handshake_timeout", "preface_timeout", "idle_timeout")

XDS_STATES = ("connected", "connecting", "disconnected")
# Pod states (nodeagent.node.lifecycle) waiting for a proxy: ztunnel's "pending".
PENDING_POD_STATES = ("pending", "capturing", "failed")
ACTIVE_POD_STATE = "ready"
# istio_tcp_sockets_open's reporters: outbound sockets are the source side's.
SOCKET_REPORTERS = ("source", "destination")
# Buckets for capture setup: iptables-restore in a namespace takes milliseconds;
# seconds mean trouble.
CAPTURE_SETUP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _add_deltas(counter: Counter, totals: Mapping[str, int], seen: dict[str, int]) -> None:
    """Advance a counter labelled by type URL to a source's cumulative totals."""
    for type_url, total in totals.items():
        delta = total - seen.get(type_url, 0)
        if delta > 0:
            counter.labels(type_url=type_url).inc(delta)
        seen[type_url] = total


class AgentMetrics:
    """The agent's metric registry: Istio traffic metrics, build info, and its own gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.traffic = TrafficMetrics()
        self.registry.register(self.traffic)
        self.registry.register(_BuildInfo())
        r = self.registry
        # process_open_fds / process_max_fds as ztunnel (src/metrics/process.rs), plus
        # memory, CPU and start time; a process_* series reads /proc at scrape time only.
        ProcessCollector(registry=r)
        self.xds_connection_state = Gauge(
            "nodeagent_xds_connection_state",
            "xDS stream state: 1 for the current state, 0 for the others",
            ["state"],
            registry=r,
        )
        # ztunnel's xDS series (src/xds/metrics.rs): responses and resource bytes by `url`.
        self.xds_messages = LabelledTotals(
            "istio_xds_message", "Total number of messages received (unstable)", "url", ()
        )
        r.register(self.xds_messages)
        self.xds_message_bytes = LabelledTotals(
            "istio_xds_message_bytes", "Total number of bytes received (unstable)", "url", ()
        )
        r.register(self.xds_message_bytes)
        # The same count as istio_xds_message_total, kept under our name because
        # nodeagent_xds_nacks_total is its pair: one label name (`type_url`) makes the
        # NACK ratio per type a plain division, and existing alerts read it.
        self.xds_pushes = Counter(
            "nodeagent_xds_pushes", "xDS responses received, by type URL", ["type_url"], registry=r
        )
        self.xds_nacks = Counter(
            "nodeagent_xds_nacks",
            "xDS responses rejected (NACKed), by type URL",
            ["type_url"],
            registry=r,
        )
        self.certificate_expiry = Gauge(
            "nodeagent_certificate_expiration_timestamp_seconds",
            "notAfter of the certificate held for an identity, unix seconds",
            ["identity"],
            registry=r,
        )
        # Finer than workload_manager_*: every lifecycle state, held and failed apart.
        self.pods = Gauge("nodeagent_pods", "Local pods by capture state", ["state"], registry=r)
        self.workload_manager = WorkloadManagerMetrics()
        r.register(self.workload_manager)
        self.sockets_open = Gauge(
            "istio_tcp_sockets_open",
            "Proxied TCP connections open now, by `reporter`: source (outbound, from a "
            "local app) or destination (inbound, to a local app)",
            ["reporter"],
            registry=r,
        )
        for reporter in SOCKET_REPORTERS:
            self.sockets_open.labels(reporter=reporter).set(0)
        self.capture_setup_seconds = Histogram(
            "nodeagent_capture_setup_seconds",
            "Time to install capture and open listeners for one pod",
            ["backend"],
            buckets=CAPTURE_SETUP_BUCKETS,
            registry=r,
        )
        self.cni_adds = Counter(
            "nodeagent_cni_adds",
            "CNI ADDs from the nodeagent-cni plugin, by `result` (captured, not_enrolled,"
            " no_record, failed, timeout, error)",
            ["result"],
            registry=r,
        )
        self.cni_add_seconds = Histogram(
            "nodeagent_cni_add_duration_seconds",
            "Time the agent took to answer a CNI ADD (until the pod was captured)",
            buckets=CAPTURE_SETUP_BUCKETS,
            registry=r,
        )
        self.policy_decisions = Counter(
            "nodeagent_policy_decisions",
            "L4 authorization decisions: `action` of the deciding policy (or none), `result`",
            ["action", "result"],
            registry=r,
        )
        self.xds_terminations = LabelledTotals(
            "istio_xds_connection_terminations",
            "The total number of completed connections to xds server (unstable)",
            "reason",
            XDS_TERMINATION_REASONS,
        )
        r.register(self.xds_terminations)
        self.hbone_inbound_connections = Gauge(
            "nodeagent_hbone_inbound_connections",
            "Inbound HBONE (15008) connections open, TLS handshakes included",
            registry=r,
        )
        self.hbone_inbound_refused = LabelledTotals(
            "nodeagent_hbone_inbound_refused",
            "Inbound HBONE connections refused over a limit: `reason` connection_limit "
            "(all peers) or identity_limit (one peer identity)",
            "reason",
            HBONE_REFUSALS,
        )
        r.register(self.hbone_inbound_refused)
        self.capture_repairs = LabelledTotals(
            "nodeagent_capture_repairs",
            "Periodic checks of a ready pod's capture that found it drifted from the plan:"
            " `result` repaired (put back) or failed",
            "result",
            ("repaired", "failed"),
        )
        r.register(self.capture_repairs)
        self.hbone_inbound_timeouts = LabelledTotals(
            "nodeagent_hbone_inbound_timeouts",
            "Inbound HBONE connections the server closed after waiting: for the TLS "
            "handshake, the HTTP/2 preface, or while idle",
            "reason",
            HBONE_CLOSES,
        )
        r.register(self.hbone_inbound_timeouts)
        self.traffic_clusters = ClusterTrafficMetrics()
        r.register(self.traffic_clusters)
        self.set_xds_state("disconnected")
        self._refreshers: list[Callable[[], None]] = []
        self._xds_seen: dict[str, int] = {}
        self._xds_nacks_seen: dict[str, int] = {}
        self._certificates_held: set[str] = set()

    def add_refresh(self, refresh: Callable[[], None]) -> None:
        """Call `refresh` before every scrape (gauges read from their source then)."""
        self._refreshers.append(refresh)

    def sync_xds(
        self,
        *,
        connected: bool,
        pushes_by_type: Mapping[str, int],
        nacks_by_type: Mapping[str, int],
        terminations_by_reason: Mapping[str, int] | None = None,
        bytes_by_type: Mapping[str, int] | None = None,
    ) -> None:
        """Bring the xDS series up to date with the client's cumulative counters."""
        self.set_xds_state("connected" if connected else "disconnected")
        self.xds_messages.set_totals(pushes_by_type)
        if bytes_by_type is not None:
            self.xds_message_bytes.set_totals(bytes_by_type)
        _add_deltas(self.xds_pushes, pushes_by_type, self._xds_seen)
        _add_deltas(self.xds_nacks, nacks_by_type, self._xds_nacks_seen)
        if terminations_by_reason is not None:
            self.xds_terminations.set_totals(terminations_by_reason)

    def sync_hbone_inbound(
        self,
        *,
        open_connections: int,
        refused_by_reason: Mapping[str, int],
        timeouts_by_reason: Mapping[str, int],
    ) -> None:
        """Bring the inbound HBONE series up to date with the server's counters."""
        self.hbone_inbound_connections.set(open_connections)
        self.hbone_inbound_refused.set_totals(refused_by_reason)
        self.hbone_inbound_timeouts.set_totals(timeouts_by_reason)

    def sync_capture_repairs(self, repaired: int, failed: int) -> None:
        """Bring the repair counts up to date with the node manager's."""
        self.capture_repairs.set_totals({"repaired": repaired, "failed": failed})

    def sync_traffic_clusters(self, stats: Iterable[ClusterStats]) -> None:
        """Replace the per service and subset traffic series with the route state's."""
        self.traffic_clusters.set_stats(stats)

    def set_xds_state(self, state: str) -> None:
        if state not in XDS_STATES:
            raise ValueError(f"xDS state {state!r} is not one of {', '.join(XDS_STATES)}")
        for s in XDS_STATES:
            self.xds_connection_state.labels(state=s).set(1 if s == state else 0)

    def xds_push(self, type_url: str, *, nacked: bool = False) -> None:
        self.xds_pushes.labels(type_url=type_url).inc()
        if nacked:
            self.xds_nacks.labels(type_url=type_url).inc()

    def set_certificate_expiry(self, identity: str, not_after: float | None) -> None:
        """Record (or with None, forget) the expiry of the certificate for `identity`."""
        if not_after is None:
            try:
                self.certificate_expiry.remove(identity)
            except KeyError:
                pass
            return
        self.certificate_expiry.labels(identity=identity).set(not_after)

    def sync_certificates(self, expiries: Mapping[str, float]) -> None:
        """Bring the expiry gauge up to date with the certificates held now (identity ->
        notAfter): a series per identity held, none for an identity no longer on the node."""
        for identity, not_after in expiries.items():
            self.set_certificate_expiry(identity, not_after)
        for gone in self._certificates_held - expiries.keys():
            self.set_certificate_expiry(gone, None)
        self._certificates_held = set(expiries)

    def set_pod_counts(self, counts: Mapping[str, int]) -> None:
        """Replace the per-state pod counts (states absent from `counts` drop to 0)."""
        for state in ("pending", "capturing", "ready", "failed", "removing", "held", *counts):
            self.pods.labels(state=state).set(counts.get(state, 0))
        self.workload_manager.active = counts.get(ACTIVE_POD_STATE, 0)
        self.workload_manager.pending = sum(counts.get(s, 0) for s in PENDING_POD_STATES)

    def sync_proxy_lifecycle(self, *, started: int, stopped: int) -> None:
        """Bring workload_manager_proxies_started/stopped_total up to the node manager's
        setups and teardowns (a counter never goes down)."""
        wm_ = self.workload_manager
        wm_.started, wm_.stopped = max(wm_.started, started), max(wm_.stopped, stopped)

    def set_sockets_open(self, by_reporter: Mapping[str, int]) -> None:
        """Replace istio_tcp_sockets_open (reporters absent from `by_reporter` drop to 0)."""
        for reporter in SOCKET_REPORTERS:
            self.sockets_open.labels(reporter=reporter).set(by_reporter.get(reporter, 0))

    def observe_capture_setup(self, seconds: float, backend: str = "iptables") -> None:
        self.capture_setup_seconds.labels(backend=backend).observe(seconds)

    def observe_cni_add(self, result: str, seconds: float) -> None:
        self.cni_adds.labels(result=result).inc()
        self.cni_add_seconds.observe(seconds)

    def policy_decision(self, *, action: str, allowed: bool) -> None:
        self.policy_decisions.labels(
            action=action or "none", result="allow" if allowed else "deny"
        ).inc()

    def exposition(self) -> bytes:
        for refresh in self._refreshers:
            try:
                refresh()
            except Exception:  # one broken source must not take the whole scrape down
                log.exception("metrics refresh failed")
        return generate_latest(self.registry)
