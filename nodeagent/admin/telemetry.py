"""Connection telemetry: Istio's traffic metrics and one access-log line per connection.

`ConnectionTelemetry` is the proxy's connection observer (see
nodeagent.proxy.connections.ConnectionObserver): the registry tells it when a
connection opens and closes, and the policy checker tells it of every
authorization decision, so connections refused by policy are counted too
(`response_flags="DENY"`). It resolves both ends to workloads and services
from the state store to fill Istio's labels.

Byte direction follows Istio for both reporters: `received` is what the
client sent (the request side), `sent` is what went back to it.

Both reporters name the same service for one connection. The source side knows it
from the VIP the app dialled; the destination side works it out as ztunnel does
(`guess_inbound_service`, src/proxy.rs): the service the client's proxy named in the
CONNECT's `forwarded: host=` if the destination workload is behind it, else the
first of the workload's services with a port that targets the connection's port.

`source_principal` comes only from mTLS, as in ztunnel: the verified peer inbound,
the local workload's own identity outbound over HBONE, unknown for plaintext.

The proxy's types are read by attribute (the `LiveConnectionView` protocol),
because the admin package sits beside the proxy, not above it.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from typing import Any, Protocol

from nodeagent.admin.accesslog import AccessLogger, AccessRecord
from nodeagent.admin.metrics import AgentMetrics, ConnectionLabels, connection_labels
from nodeagent.model import workload as wm
from nodeagent.model.address import parse_ip
from nodeagent.model.constants import TUNNEL_OPEN_FAILED
from nodeagent.model.identity import Identity
from nodeagent.model.policy import ConnectionAttributes
from nodeagent.policy.engine import Decision, DecisionReason
from nodeagent.state.store import StateStore

log = logging.getLogger(__name__)

INBOUND = "inbound"
HBONE = "HBONE"
DENY_FLAG = "DENY"
CONNECT_FLAG = "CONNECT"  # the tunnel to the destination never opened
POLICY_CLOSE = "connection closed due to policy"  # the proxy's revocation message
_ACTIONS = {
    DecisionReason.EXPLICITLY_ALLOWED: "allow",
    DecisionReason.EXPLICITLY_DENIED: "deny",
}


def _response_flags(closed_reason: str) -> str:
    """ztunnel's response_flags for a connection, from how it ended."""
    if closed_reason.startswith(POLICY_CLOSE):
        return DENY_FLAG
    if closed_reason.startswith(TUNNEL_OPEN_FAILED):
        return CONNECT_FLAG
    return "-"


class LiveConnectionView(Protocol):
    """What the admin reads from a live connection (nodeagent.proxy.connections), for
    telemetry and for the /connections view."""

    @property
    def workload(self) -> str: ...
    @property
    def workload_uid(self) -> str: ...
    @property
    def direction(self) -> str: ...
    @property
    def protocol(self) -> str: ...
    @property
    def local(self) -> str: ...
    @property
    def remote(self) -> str: ...
    @property
    def target(self) -> str: ...
    @property
    def source_identity(self) -> Identity | None: ...
    @property
    def destination_identity(self) -> Identity | None: ...
    @property
    def started(self) -> float: ...
    @property
    def closed_reason(self) -> str: ...
    @property
    def response_flags(self) -> str: ...
    @property
    def bytes_in(self) -> int: ...
    @property
    def bytes_out(self) -> int: ...


def split_hostport(text: str) -> tuple[str, int]:
    """ "10.0.0.1:80" or "[fd00::1]:80" -> (host, port); ("", 0) when unparsable."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return "", 0
    return host.strip("[]"), int(port)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return parse_ip(host)
    except ValueError:
        return None


def _targets(ports: tuple[wm.Port, ...], port: int) -> bool:
    # A target port of 0 is the service port itself (nodeagent.model.workload.Port).
    return any((p.target_port or p.service_port) == port for p in ports)


def guess_inbound_service(
    store: StateStore, destination: wm.Workload | None, port: int, forwarded_host: str = ""
) -> wm.Service | None:
    """The service an inbound connection to `destination`'s `port` reached, as ztunnel
    guesses it for its metrics (src/proxy.rs `guess_inbound_service`).

    Only the destination's own services are candidates, so a bogus `forwarded` host
    from a client cannot name an unrelated service. First the one the client's proxy
    named (`forwarded_host`, a service hostname); else the first, in the order the
    control plane lists them, with a port targeting `port`, on the service itself or
    in the workload's ports for it (a named target port resolved per endpoint)."""
    if destination is None:
        return None
    services = [
        (svc, ports)
        for key, ports in destination.services.items()
        if (svc := store.service(key)) is not None
    ]
    if forwarded_host:
        for svc, _ in services:
            if svc.hostname == forwarded_host:
                return svc
    for svc, endpoint_ports in services:
        if _targets(svc.ports, port) or _targets(endpoint_ports, port):
            return svc
    return None


Ends = tuple["wm.Workload | None", "wm.Workload | None", "wm.Service | None"]
LABEL_CACHE_SIZE = 4096  # distinct (source, destination, service, flags) label sets kept


class ConnectionTelemetry:
    """Records metrics and access logs for the proxy's connections."""

    def __init__(
        self,
        store: StateStore,
        metrics: AgentMetrics,
        access: AccessLogger | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._access = access or AccessLogger()
        # Live connections with the bytes already counted (id -> [conn, in, out]), so
        # `flush` can count long connections' bytes before they close.
        self._live: dict[int, list[Any]] = {}
        self._label_cache: dict[tuple[object, ...], tuple[object, ConnectionLabels]] = {}

    # -- resolution ------------------------------------------------------------

    def _workload_at(self, hostport: str) -> wm.Workload | None:
        ip = _ip(split_hostport(hostport)[0])
        return self._store.workload_by_address("", ip) if ip is not None else None

    def _service_at(self, hostport: str) -> wm.Service | None:
        ip = _ip(split_hostport(hostport)[0])
        return self._store.service_by_vip("", ip) if ip is not None else None

    def _ends(
        self, conn: LiveConnectionView
    ) -> tuple[wm.Workload | None, wm.Workload | None, wm.Service | None]:
        local = self._store.workload(conn.workload_uid)
        if conn.direction == INBOUND:
            # `forwarded_host`: the service hostname the client's proxy sent in the
            # CONNECT's `forwarded` header (HBONE only; absent on plaintext).
            forwarded = getattr(conn, "forwarded_host", "") or ""
            port = split_hostport(conn.target)[1]
            service = guess_inbound_service(self._store, local, port, forwarded)
            return self._workload_at(conn.remote), local, service
        # Outbound: `remote` is what the app dialled, `target` where bytes went.
        service = self._service_at(conn.remote)
        return local, self._workload_at(conn.target) or self._workload_at(conn.remote), service

    def labels_for(self, conn: LiveConnectionView, response_flags: str = "-") -> ConnectionLabels:
        return self._labels(conn, self._ends(conn), response_flags)

    def _labels(
        self,
        conn: LiveConnectionView,
        ends: tuple[wm.Workload | None, wm.Workload | None, wm.Service | None],
        response_flags: str,
    ) -> ConnectionLabels:
        source, destination, service = ends
        mtls = conn.protocol == HBONE
        # Outbound, `source_identity` is the local pod's even for plaintext: only a
        # tunnel presents it (ztunnel reports no principal without mTLS).
        peer = conn.source_identity if mtls else None
        source_principal = str(peer) if peer else ""
        destination_principal = str(conn.destination_identity) if conn.destination_identity else ""
        reporter = "destination" if conn.direction == INBOUND else "source"
        # Connections between the same workloads share their labels: built once, keyed by
        # the records' identities (the entry holds the records, so an id is not reused
        # while its entry lives; a changed record is a new object, hence a new entry).
        key = (
            reporter,
            id(source),
            id(destination),
            id(service),
            source_principal,
            destination_principal,
            mtls,
            response_flags,
        )
        cached = self._label_cache.get(key)
        if cached is not None:
            return cached[1]
        labels = connection_labels(
            reporter=reporter,
            source=source,
            destination=destination,
            service=service,
            source_principal=source_principal,
            destination_principal=destination_principal,
            mtls=mtls,
            response_flags=response_flags,
        )
        if len(self._label_cache) >= LABEL_CACHE_SIZE:
            self._label_cache.clear()
        self._label_cache[key] = (ends, labels)
        return labels

    # -- observer ----------------------------------------------------------------

    def opened(self, conn: LiveConnectionView) -> None:
        ends = self._ends(conn)
        self._metrics.traffic.record_open(self._labels(conn, ends, "-"))
        # The ends are resolved once, as ztunnel labels a connection once, at its start;
        # again at close only if the connection went elsewhere (a retry's new target).
        self._live[id(conn)] = [conn, 0, 0, ends, conn.target]

    def _ends_of(self, conn: LiveConnectionView, entry: list[Any] | None) -> Ends:
        if entry is not None and entry[4] == conn.target:
            ends: Ends = entry[3]
            return ends
        return self._ends(conn)

    def flush(self) -> None:
        """Count the bytes live connections carried since the last flush, and the
        connections open by reporter (before a scrape)."""
        inbound = sum(1 for entry in self._live.values() if entry[0].direction == INBOUND)
        self._metrics.set_sockets_open(
            {"destination": inbound, "source": len(self._live) - inbound}
        )
        for entry in list(self._live.values()):
            conn, counted_in, counted_out = entry[:3]
            new_in, new_out = conn.bytes_in - counted_in, conn.bytes_out - counted_out
            if new_in > 0 or new_out > 0:
                labels = self._labels(conn, self._ends_of(conn, entry), "-")
                self._metrics.traffic.record_bytes(
                    labels, sent=max(0, new_out), received=max(0, new_in)
                )
                entry[1], entry[2] = conn.bytes_in, conn.bytes_out

    def closed(self, conn: LiveConnectionView) -> None:
        flags = conn.response_flags or _response_flags(conn.closed_reason)
        # Labels as at close: the outbound peer identity is known once the tunnel is up.
        entry = self._live.pop(id(conn), None)
        ends = self._ends_of(conn, entry)
        labels = self._labels(conn, ends, flags)
        counted_in, counted_out = (entry[1], entry[2]) if entry is not None else (0, 0)
        self._metrics.traffic.record_close(
            labels,
            sent=max(0, conn.bytes_out - counted_out),
            received=max(0, conn.bytes_in - counted_in),
        )
        service = ends[2]
        now = time.time()
        outbound = conn.direction != INBOUND
        self._access.log(
            AccessRecord(
                end_time=now,
                direction=conn.direction,
                src_addr=conn.local if outbound else conn.remote,
                dst_addr=conn.remote if outbound else conn.local,
                dst_hbone_addr=conn.target if outbound and conn.protocol == HBONE else "",
                src_workload=labels.source_workload,
                src_namespace=labels.source_workload_namespace,
                src_identity=labels.source_principal,
                dst_service=service.hostname if service else "",
                dst_workload=labels.destination_workload,
                dst_namespace=labels.destination_workload_namespace,
                dst_identity=labels.destination_principal,
                bytes_sent=conn.bytes_in,
                bytes_recv=conn.bytes_out,
                duration_ms=max(0.0, now - conn.started) * 1000,
                policy="deny" if flags == DENY_FLAG else "allow",
                response_flags=flags,
                error=conn.closed_reason,
            )
        )

    def decided(self, attributes: ConnectionAttributes, decision: Decision) -> None:
        self._metrics.policy_decision(
            action=_ACTIONS.get(decision.reason, ""), allowed=decision.allowed
        )
        if decision.allowed:
            return  # the registry reports it when the proxy registers the connection
        destination = (
            self._store.workload(attributes.destination_uid) if attributes.destination_uid else None
        ) or self._store.workload_by_address("", attributes.destination_ip)
        source = self._store.workload_by_address("", attributes.source_ip)
        peer = attributes.source_identity
        # Decided before any header is read: the service by target port only.
        service = guess_inbound_service(self._store, destination, attributes.destination_port)
        labels = connection_labels(
            reporter="destination",
            source=source,
            destination=destination,
            service=service,
            source_principal=str(peer) if peer else "",
            mtls=peer is not None,
            response_flags=DENY_FLAG,
        )
        self._metrics.traffic.record_open(labels)
        self._metrics.traffic.record_close(labels)
        self._access.log(
            AccessRecord(
                end_time=time.time(),
                direction=INBOUND,
                src_addr=str(attributes.source_ip),
                dst_addr=f"{attributes.destination_ip}:{attributes.destination_port}",
                src_workload=labels.source_workload,
                dst_service=service.hostname if service else "",
                src_namespace=labels.source_workload_namespace,
                src_identity=labels.source_principal,
                dst_workload=labels.destination_workload,
                dst_namespace=labels.destination_workload_namespace,
                dst_identity=labels.destination_principal,
                policy=f"deny ({decision.explain()})",
                response_flags=DENY_FLAG,
                error=decision.error_message,
            )
        )
