"""Both reporters name the same service for one connection (ztunnel's guess_inbound_service),
ztunnel's locality labels, and source_principal only from mTLS."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nodeagent.admin.metrics import TCP_TRAFFIC_LABELS, AgentMetrics, ConnectionLabels
from nodeagent.admin.telemetry import ConnectionTelemetry, guess_inbound_service
from nodeagent.hbone.headers import forwarded_host
from nodeagent.model.policy import (
    Action,
    Authorization,
    Clause,
    ConnectionAttributes,
    Match,
    Rule,
    Scope,
)
from nodeagent.model.workload import Locality, Port, Workload
from nodeagent.proxy.connections import (
    INBOUND,
    OUTBOUND,
    ObservedPolicyChecker,
    store_policy_lookup,
)
from nodeagent.proxy.pool import forwarded_header
from nodeagent.state.store import StateBatch, StateStore
from tests.builders import service
from tests.builders import workload as build_workload
from tests.unit.admin.test_telemetry import CLIENT, SERVER, FakeConnection

ip = ipaddress.ip_address
BACKEND = "backend.demo.svc.cluster.local"
ALT = "backend-alt.demo.svc.cluster.local"  # a second service on the same target port


def _workload(name: str, addr: str, sa: str, **fields: object) -> Workload:
    return build_workload(
        name, addr, uid=f"uid-{name}", namespace="demo", hbone=True, service_account=sa, **fields
    )


@pytest.fixture
def store() -> StateStore:
    s = StateStore()
    s.apply(
        StateBatch(
            workloads=(
                _workload(
                    "client", "10.1.0.5", "frontend", locality=Locality("eu-west", "eu-west-1a")
                ),
                _workload(
                    "server",
                    "10.2.0.5",
                    "backend",
                    locality=Locality("eu-west", "eu-west-1b"),
                    services={
                        f"demo/{BACKEND}": (Port(80, 8080),),
                        f"demo/{ALT}": (Port(81, 8080),),
                    },
                ),
            ),
            services=(
                service("backend", "10.96.0.10", namespace="demo", ports=(Port(80, 8080),)),
                service("backend-alt", "10.96.0.11", namespace="demo", ports=(Port(81, 8080),)),
            ),
            policies=(
                Authorization(
                    name="deny-9090",
                    namespace="demo",
                    scope=Scope.NAMESPACE,
                    action=Action.DENY,
                    rules=(Rule((Clause((Match(destination_ports=(9090,)),)),)),),
                ),
            ),
        )
    )
    return s


@dataclass
class Conn(FakeConnection):
    """A connection as telemetry reads it, with the `forwarded` host inbound."""

    forwarded_host: str = ""


def outbound(protocol: str, dialled: str) -> Conn:
    return Conn(
        workload_uid="uid-client",
        direction=OUTBOUND,
        protocol=protocol,
        local="10.1.0.5:40000",
        remote=dialled,
        target="10.2.0.5:8080",
        source_identity=CLIENT,  # the proxy sets the local pod's identity even for TCP
        destination_identity=SERVER if protocol == "HBONE" else None,
        bytes_in=11,
        bytes_out=22,
    )


def inbound(protocol: str, forwarded: str = "") -> Conn:
    return Conn(
        workload_uid="uid-server",
        direction=INBOUND,
        protocol=protocol,
        local="10.2.0.5:8080",
        remote="10.1.0.5:40000",
        target="10.2.0.5:8080",
        source_identity=CLIENT if protocol == "HBONE" else None,
        destination_identity=SERVER,
        forwarded_host=forwarded,
        bytes_in=11,
        bytes_out=22,
    )


def _series(metrics: AgentMetrics, name: str) -> list[dict[str, str]]:
    text = metrics.exposition().decode()
    return [
        s.labels for fam in text_string_to_metric_families(text) for s in fam.samples
        if s.name == name
    ]  # fmt: skip


def _service_labels(labels: ConnectionLabels) -> tuple[str, str, str]:
    return (
        labels.destination_service,
        labels.destination_service_name,
        labels.destination_service_namespace,
    )


def test_ztunnels_forwarded_header_names_the_service_hostname() -> None:
    name, value = forwarded_header(("10.1.0.5", 40000), ALT)
    assert (name, forwarded_host(value)) == ("forwarded", ALT)
    assert forwarded_host(forwarded_header(("fd00::5", 1))[1]) == ""
    assert forwarded_host('for="10.0.0.1:1";host="a.b", for=x;host=c') == "a.b"


def test_inbound_via_a_service_vip_agrees_with_the_source_reporter(store: StateStore) -> None:
    metrics = AgentMetrics()
    telemetry = ConnectionTelemetry(store, metrics)
    # The app dialled backend-alt's VIP; its proxy sent `forwarded: ...;host=<ALT>`.
    client_side, server_side = outbound("HBONE", "10.96.0.11:81"), inbound("HBONE", ALT)
    for conn in (client_side, server_side):
        telemetry.opened(conn)
        telemetry.closed(conn)
    source, destination = telemetry.labels_for(client_side), telemetry.labels_for(server_side)
    assert (source.reporter, destination.reporter) == ("source", "destination")
    assert _service_labels(source) == _service_labels(destination) == (ALT, "backend-alt", "demo")
    assert source.destination_workload == destination.destination_workload == "server"
    assert source.connection_security_policy == destination.connection_security_policy
    assert destination.connection_security_policy == "mutual_tls"

    closed = _series(metrics, "istio_tcp_connections_closed_total")
    assert len(closed) == 2
    for labels in closed:
        assert set(labels) == set(TCP_TRAFFIC_LABELS)
        assert labels["destination_service"] == ALT
        assert labels["destination_service_name"] == "backend-alt"
        assert labels["destination_service_namespace"] == "demo"
        assert labels["source_principal"] == str(CLIENT)
        assert labels["destination_principal"] == str(SERVER)
    assert {labels["reporter"] for labels in closed} == {"source", "destination"}
    received = {
        labels["reporter"]: labels for labels in _series(metrics, "istio_tcp_received_bytes_total")
    }
    assert received.keys() == {"source", "destination"}


def test_without_a_forwarded_host_the_first_service_targeting_the_port_is_reported(
    store: StateStore,
) -> None:
    telemetry = ConnectionTelemetry(store, AgentMetrics())
    labels = telemetry.labels_for(inbound("TCP"))
    assert _service_labels(labels) == (BACKEND, "backend", "demo")


def test_a_forwarded_host_outside_the_workloads_services_is_not_trusted(
    store: StateStore,
) -> None:
    server = store.workload("uid-server")
    guessed = guess_inbound_service(store, server, 8080, "elsewhere.other.svc.cluster.local")
    assert guessed is not None and guessed.hostname == BACKEND
    assert guess_inbound_service(store, server, 9999, "elsewhere.other.svc.cluster.local") is None
    assert guess_inbound_service(store, None, 8080, BACKEND) is None


def test_a_direct_pod_connection_is_named_by_target_port_on_the_inbound_side(
    store: StateStore,
) -> None:
    telemetry = ConnectionTelemetry(store, AgentMetrics())
    source = telemetry.labels_for(outbound("HBONE", "10.2.0.5:8080"))
    destination = telemetry.labels_for(inbound("HBONE"))
    # No VIP dialled: the source side names no service (ztunnel's outbound neither);
    # the destination side guesses the workload's service by the target port.
    assert source.destination_service == ""
    assert _service_labels(destination) == (BACKEND, "backend", "demo")
    assert destination.destination_workload == "server"


def test_a_connection_denied_by_policy_still_names_the_service(store: StateStore) -> None:
    metrics = AgentMetrics()
    telemetry = ConnectionTelemetry(store, metrics)
    checker = ObservedPolicyChecker(store_policy_lookup(store), telemetry)
    # A service whose port targets 9090 on the server, so the denial has one to name.
    store.apply(
        StateBatch(
            workloads=(
                _workload(
                    "server",
                    "10.2.0.5",
                    "backend",
                    services={f"demo/{BACKEND}": (Port(90, 9090),)},
                ),
            ),
            services=(service("backend", "10.96.0.10", namespace="demo", ports=(Port(90, 9090),)),),
        )
    )
    attrs = ConnectionAttributes(
        source_ip=ip("10.1.0.5"),
        source_identity=CLIENT,
        destination_ip=ip("10.2.0.5"),
        destination_port=9090,
        destination_uid="uid-server",
    )
    assert not checker.check(attrs).allowed
    [denied] = _series(metrics, "istio_tcp_connections_closed_total")
    assert denied["response_flags"] == "DENY"
    assert denied["destination_service"] == BACKEND


def test_locality_labels_come_from_each_sides_workload(store: StateStore) -> None:
    metrics = AgentMetrics()
    telemetry = ConnectionTelemetry(store, metrics)
    conn = inbound("HBONE", BACKEND)
    telemetry.opened(conn)
    [opened] = _series(metrics, "istio_tcp_connections_opened_total")
    assert opened["source_region"] == "eu-west" and opened["source_zone"] == "eu-west-1a"
    assert opened["destination_region"] == "eu-west"
    assert opened["destination_zone"] == "eu-west-1b"


def test_locality_labels_are_unknown_when_not_known(store: StateStore) -> None:
    metrics = AgentMetrics()
    telemetry = ConnectionTelemetry(store, metrics)
    conn = inbound("TCP")
    conn.remote = "192.0.2.9:5000"  # a caller outside the mesh
    telemetry.opened(conn)
    [opened] = _series(metrics, "istio_tcp_connections_opened_total")
    assert opened["source_region"] == opened["source_zone"] == "unknown"
    assert opened["destination_zone"] == "eu-west-1b"


def test_source_principal_comes_only_from_mtls(store: StateStore) -> None:
    telemetry = ConnectionTelemetry(store, AgentMetrics())
    assert telemetry.labels_for(outbound("TCP", "10.96.0.10:80")).source_principal == ""
    assert telemetry.labels_for(outbound("HBONE", "10.96.0.10:80")).source_principal == str(CLIENT)
    assert telemetry.labels_for(inbound("TCP")).source_principal == ""
    assert telemetry.labels_for(inbound("HBONE")).source_principal == str(CLIENT)
    plain = telemetry.labels_for(outbound("TCP", "10.96.0.10:80"))
    values = dict(zip(TCP_TRAFFIC_LABELS, plain.tcp_values(), strict=True))
    assert values["source_principal"] == "unknown"
    assert values["connection_security_policy"] == "unknown"


def test_sockets_open_counts_live_connections_by_reporter(store: StateStore) -> None:
    metrics = AgentMetrics()
    telemetry = ConnectionTelemetry(store, metrics)
    out, in_a, in_b = outbound("HBONE", "10.96.0.10:80"), inbound("HBONE"), inbound("TCP")
    for conn in (out, in_a, in_b):
        telemetry.opened(conn)
    telemetry.closed(in_b)
    telemetry.flush()
    gauge = metrics.sockets_open
    assert gauge.labels(reporter="source")._value.get() == 1
    assert gauge.labels(reporter="destination")._value.get() == 1
    telemetry.closed(out)
    telemetry.closed(in_a)
    telemetry.flush()
    assert gauge.labels(reporter="source")._value.get() == 0
    assert gauge.labels(reporter="destination")._value.get() == 0
