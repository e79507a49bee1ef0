"""Connection telemetry: Istio's labels and byte directions, DENY counts, access-log lines,
and the registry / policy-checker hooks that feed it."""

from __future__ import annotations

import ipaddress
import json
import logging
from dataclasses import dataclass, field

import pytest

from nodeagent.admin.accesslog import AccessLogger
from nodeagent.admin.metrics import AgentMetrics, connection_labels
from nodeagent.admin.telemetry import ConnectionTelemetry
from nodeagent.model.constants import TUNNEL_OPEN_FAILED
from nodeagent.model.identity import Identity
from nodeagent.model.policy import (
    Action,
    Authorization,
    Clause,
    ConnectionAttributes,
    Match,
    Rule,
    Scope,
)
from nodeagent.model.workload import Port, Workload
from nodeagent.proxy.connections import (
    INBOUND,
    OUTBOUND,
    ConnectionRegistry,
    ObservedPolicyChecker,
    store_policy_lookup,
)
from nodeagent.state.store import StateBatch, StateStore
from tests.builders import service
from tests.builders import workload as build_workload

ip = ipaddress.ip_address
CLIENT = Identity("cluster.local", "demo", "frontend")
SERVER = Identity("cluster.local", "demo", "backend")
DENY_9090 = Authorization(
    name="deny-9090",
    namespace="demo",
    scope=Scope.NAMESPACE,
    action=Action.DENY,
    rules=(Rule((Clause((Match(destination_ports=(9090,)),)),)),),
)


def workload(name: str, addr: str, sa: str) -> Workload:
    node = "node1" if name == "client" else "node2"
    return build_workload(
        name, addr, uid=f"uid-{name}", namespace="demo", hbone=True, service_account=sa, node=node
    )


@pytest.fixture
def store() -> StateStore:
    s = StateStore()
    s.apply(
        StateBatch(
            workloads=(
                workload("client", "10.1.0.5", "frontend"),
                workload("server", "10.2.0.5", "backend"),
            ),
            services=(service("backend", "10.96.0.10", namespace="demo", ports=(Port(80, 8080),)),),
            policies=(DENY_9090,),
        )
    )
    return s


@dataclass
class FakeConnection:
    """The attributes telemetry reads from a LiveConnection."""

    workload_uid: str
    direction: str
    protocol: str
    local: str
    remote: str
    target: str
    source_identity: Identity | None = None
    destination_identity: Identity | None = None
    started: float = 0.0
    closed_reason: str = ""
    response_flags: str = ""
    bytes_in: int = 0
    bytes_out: int = 0
    id: int = 1
    attributes: object = field(default=None)


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(record.getMessage()))


@pytest.fixture
def access() -> tuple[AccessLogger, Lines]:
    logger = logging.getLogger(f"access-test-{id(object())}")
    logger.setLevel(logging.INFO)
    lines = Lines()
    logger.addHandler(lines)
    logger.propagate = False
    return AccessLogger(logger), lines


def inbound_hbone(bytes_in: int, bytes_out: int) -> FakeConnection:
    return FakeConnection(
        workload_uid="uid-server",
        direction=INBOUND,
        protocol="HBONE",
        local="10.2.0.5:8080",
        remote="10.1.0.5:40000",
        target="10.2.0.5:8080",
        source_identity=CLIENT,
        destination_identity=SERVER,
        bytes_in=bytes_in,
        bytes_out=bytes_out,
    )


def test_inbound_hbone_counts_request_bytes_as_received(
    store: StateStore, access: tuple[AccessLogger, Lines]
) -> None:
    metrics = AgentMetrics()
    telemetry = ConnectionTelemetry(store, metrics, access[0])
    conn = inbound_hbone(bytes_in=300, bytes_out=7)
    telemetry.opened(conn)
    telemetry.closed(conn)

    labels = connection_labels(
        reporter="destination",
        source=store.workload("uid-client"),
        destination=store.workload("uid-server"),
        source_principal=str(CLIENT),
        destination_principal=str(SERVER),
        mtls=True,
    )
    traffic = metrics.traffic
    assert traffic.value("istio_tcp_connections_opened", labels) == 1
    assert traffic.value("istio_tcp_connections_closed", labels) == 1
    assert traffic.value("istio_tcp_received_bytes", labels) == 300
    assert traffic.value("istio_tcp_sent_bytes", labels) == 7
    assert labels.source_workload == "client" and labels.connection_security_policy == "mutual_tls"

    (line,) = access[1].lines
    assert line["src.workload"] == "client" and line["dst.workload"] == "server"
    assert line["src.identity"] == str(CLIENT) and line["dst.identity"] == str(SERVER)
    assert (line["bytes_sent"], line["bytes_recv"]) == (300, 7)
    assert line["response_flags"] == "-" and line["policy"] == "allow"


def test_bytes_of_a_live_connection_count_at_each_flush_and_once_in_all(
    store: StateStore,
) -> None:
    metrics = AgentMetrics()
    telemetry = ConnectionTelemetry(store, metrics)
    conn = inbound_hbone(bytes_in=100, bytes_out=1)
    telemetry.opened(conn)
    telemetry.flush()
    labels = telemetry.labels_for(conn)
    assert metrics.traffic.value("istio_tcp_received_bytes", labels) == 100
    assert metrics.traffic.value("istio_tcp_connections_closed", labels) == 0
    conn.bytes_in, conn.bytes_out = 250, 3
    telemetry.flush()
    telemetry.closed(conn)
    telemetry.flush()
    assert metrics.traffic.value("istio_tcp_received_bytes", labels) == 250
    assert metrics.traffic.value("istio_tcp_sent_bytes", labels) == 3
    assert metrics.traffic.value("istio_tcp_connections_closed", labels) == 1


def outbound(
    protocol: str, *, remote: str, bytes_in: int = 0, bytes_out: int = 0
) -> FakeConnection:
    """The client pod's connection to `remote`, carried to the server pod's 8080."""
    return FakeConnection(
        workload_uid="uid-client",
        direction=OUTBOUND,
        protocol=protocol,
        local="10.1.0.5:40000",
        remote=remote,
        target="10.2.0.5:8080",
        source_identity=CLIENT,
        bytes_in=bytes_in,
        bytes_out=bytes_out,
    )


def test_outbound_to_a_vip_reports_source_side_with_the_service(store: StateStore) -> None:
    metrics = AgentMetrics()
    telemetry = ConnectionTelemetry(store, metrics)
    conn = outbound("TCP", remote="10.96.0.10:80", bytes_in=10, bytes_out=20)
    telemetry.opened(conn)
    telemetry.closed(conn)
    labels = telemetry.labels_for(conn)
    assert labels.reporter == "source"
    assert labels.destination_workload == "server"
    assert labels.destination_service == "backend.demo.svc.cluster.local"
    assert labels.connection_security_policy == "unknown"  # plaintext
    assert metrics.traffic.value("istio_tcp_received_bytes", labels) == 10
    assert metrics.traffic.value("istio_tcp_sent_bytes", labels) == 20


def test_outbound_tunnel_that_never_opened_is_flagged_connect(
    store: StateStore, access: tuple[AccessLogger, Lines]
) -> None:
    metrics = AgentMetrics()
    telemetry = ConnectionTelemetry(store, metrics, access[0])
    conn = outbound("HBONE", remote="10.2.0.5:8080")
    telemetry.opened(conn)
    conn.closed_reason = f"{TUNNEL_OPEN_FAILED}: HBONE to 10.2.0.5:15008: Connection refused"
    telemetry.closed(conn)
    flagged = telemetry.labels_for(conn, "CONNECT")
    assert metrics.traffic.value("istio_tcp_connections_closed", flagged) == 1
    assert metrics.traffic.value("istio_tcp_connections_closed", telemetry.labels_for(conn)) == 0
    (line,) = access[1].lines
    assert line["response_flags"] == "CONNECT" and line["policy"] == "allow"
    assert "Connection refused" in str(line["error"])


def test_policy_denial_is_counted_with_deny_flag_and_logged(
    store: StateStore, access: tuple[AccessLogger, Lines]
) -> None:
    metrics = AgentMetrics()
    telemetry = ConnectionTelemetry(store, metrics, access[0])
    checker = ObservedPolicyChecker(store_policy_lookup(store), telemetry)
    attrs = ConnectionAttributes(
        source_ip=ip("10.1.0.5"),
        source_identity=CLIENT,
        destination_ip=ip("10.2.0.5"),
        destination_port=9090,
        destination_uid="uid-server",
    )
    assert not checker.check(attrs).allowed
    assert checker.check(
        ConnectionAttributes(
            source_ip=ip("10.1.0.5"),
            source_identity=CLIENT,
            destination_ip=ip("10.2.0.5"),
            destination_port=8080,
        )
    ).allowed
    denied = connection_labels(
        reporter="destination",
        source=store.workload("uid-client"),
        destination=store.workload("uid-server"),
        source_principal=str(CLIENT),
        mtls=True,
        response_flags="DENY",
    )
    assert metrics.traffic.value("istio_tcp_connections_closed", denied) == 1
    assert metrics.policy_decisions.labels(action="deny", result="deny")._value.get() == 1
    assert metrics.policy_decisions.labels(action="none", result="allow")._value.get() == 1
    (line,) = access[1].lines  # the allowed one is logged when it closes, not here
    assert line["response_flags"] == "DENY"
    assert line["error"] == "explicitly denied by: demo/deny-9090"


def test_registry_tells_the_observer_once_per_open_and_close(store: StateStore) -> None:
    seen: list[tuple[str, int]] = []

    class Observer:
        def opened(self, conn: object) -> None:
            seen.append(("opened", conn.id))  # type: ignore[attr-defined]

        def closed(self, conn: object) -> None:
            seen.append(("closed", conn.id))  # type: ignore[attr-defined]

        def decided(self, attributes: object, decision: object) -> None:
            seen.append(("decided", 0))

    observer = Observer()
    checker = ObservedPolicyChecker(store_policy_lookup(store), observer)
    registry = ConnectionRegistry(checker, observer=observer)
    attrs = ConnectionAttributes(
        source_ip=ip("10.1.0.5"),
        source_identity=CLIENT,
        destination_ip=ip("10.2.0.5"),
        destination_port=9090,
        destination_uid="uid-server",
    )
    conn = registry.register(
        workload="demo/server",
        workload_uid="uid-server",
        direction=INBOUND,
        protocol="HBONE",
        local="10.2.0.5:9090",
        remote="10.1.0.5:1",
        target="10.2.0.5:9090",
        attributes=attrs,
    )
    # The re-check closes it (DENY on 9090) without reporting a new decision;
    # the handler's own remove afterwards is not a second close.
    assert len(registry.recheck()) == 1
    registry.remove(conn)
    assert seen == [("opened", conn.id), ("closed", conn.id)]
    assert conn.closed_by_policy


def test_a_failing_observer_does_not_break_the_registry(store: StateStore) -> None:
    class Broken:
        def opened(self, conn: object) -> None:
            raise RuntimeError("boom")

        closed = opened

        def decided(self, attributes: object, decision: object) -> None:
            raise RuntimeError("boom")

    registry = ConnectionRegistry(observer=Broken())
    conn = registry.register(
        workload="w",
        workload_uid="u",
        direction=OUTBOUND,
        protocol="TCP",
        local="a:1",
        remote="b:2",
        target="b:2",
    )
    assert len(registry) == 1
    registry.remove(conn)
    assert len(registry) == 0
