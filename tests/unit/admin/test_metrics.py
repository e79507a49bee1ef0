"""Metric names and labels as Istio's dashboards expect them, plus the agent's own."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nodeagent.admin.metrics import (
    TCP_TRAFFIC_LABELS,
    TRAFFIC_LABELS,
    AgentMetrics,
    ConnectionLabels,
)
from nodeagent.model.constants import TYPE_URL_ADDRESS, TYPE_URL_AUTHORIZATION


def _samples(metrics: AgentMetrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(metrics.exposition().decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_traffic_metrics_have_istio_names_and_full_label_set() -> None:
    metrics = AgentMetrics()
    labels = ConnectionLabels(reporter="destination", source_principal="spiffe://td/ns/a/sa/b")
    metrics.traffic.record_open(labels)
    metrics.traffic.record_failed(labels)
    metrics.traffic.record_close(labels, sent=10, received=20)
    samples = _samples(metrics)
    for name in (
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
        "istio_tcp_connections_failed_total",
    ):
        [(got, value)] = samples[name]
        assert value >= 1
        assert set(got) == set(TCP_TRAFFIC_LABELS)
        assert got["source_principal"] == "spiffe://td/ns/a/sa/b"
        assert got["destination_workload"] == "unknown"
        assert got["request_protocol"] == "tcp"
        assert got["response_flags"] == "-"
    # ztunnel exposes no _created series for its traffic counters; neither do we.
    assert not [n for n in samples if n.startswith("istio_tcp") and n.endswith("_created")]
    assert samples["istio_build"][0][0]["component"] == "ztunnel"


def test_label_sets_are_kept_apart() -> None:
    metrics = AgentMetrics()
    a = ConnectionLabels(reporter="source", destination_workload="a")
    b = ConnectionLabels(reporter="source", destination_workload="b")
    metrics.traffic.record_close(a, sent=5)
    metrics.traffic.record_close(b, sent=7)
    metrics.traffic.record_bytes(a, sent=1, received=0)
    assert metrics.traffic.value("istio_tcp_sent_bytes", a) == 6
    assert metrics.traffic.value("istio_tcp_sent_bytes", b) == 7
    assert metrics.traffic.value("istio_tcp_received_bytes", b) == 0


def test_xds_counters_follow_the_clients_totals_by_type_url() -> None:
    metrics = AgentMetrics()
    address, auth = TYPE_URL_ADDRESS, TYPE_URL_AUTHORIZATION
    metrics.sync_xds(connected=True, pushes_by_type={address: 3}, nacks_by_type={address: 1})
    metrics.sync_xds(
        connected=True, pushes_by_type={address: 5, auth: 2}, nacks_by_type={address: 1, auth: 1}
    )
    s = _samples(metrics)
    pushes = {lab["type_url"]: v for lab, v in s["nodeagent_xds_pushes_total"]}
    nacks = {lab["type_url"]: v for lab, v in s["nodeagent_xds_nacks_total"]}
    assert pushes == {address: 5, auth: 2}
    assert nacks == {address: 1, auth: 1}


def test_xds_terminations_have_ztunnels_name_and_reasons_from_zero() -> None:
    metrics = AgentMetrics()
    totals = {
        lab["reason"]: v for lab, v in _samples(metrics)["istio_xds_connection_terminations_total"]
    }
    assert totals == {"ConnectionError": 0, "Error": 0, "Reconnect": 0, "Complete": 0}
    metrics.sync_xds(
        connected=False,
        pushes_by_type={},
        nacks_by_type={},
        terminations_by_reason={"Error": 2, "ConnectionError": 1},
    )
    metrics.sync_xds(connected=True, pushes_by_type={}, nacks_by_type={})  # no news: kept
    s = _samples(metrics)
    totals = {lab["reason"]: v for lab, v in s["istio_xds_connection_terminations_total"]}
    assert totals == {"ConnectionError": 1, "Error": 2, "Reconnect": 0, "Complete": 0}
    assert "istio_xds_connection_terminations_created" not in s


def test_hbone_inbound_refusals_and_timeouts_by_reason() -> None:
    metrics = AgentMetrics()
    metrics.sync_hbone_inbound(
        open_connections=7,
        refused_by_reason={"connection_limit": 3, "identity_limit": 1},
        timeouts_by_reason={"handshake_timeout": 0, "preface_timeout": 50, "idle_timeout": 2},
    )
    s = _samples(metrics)
    assert s["nodeagent_hbone_inbound_connections"] == [({}, 7.0)]
    refused = {lab["reason"]: v for lab, v in s["nodeagent_hbone_inbound_refused_total"]}
    assert refused == {"connection_limit": 3, "identity_limit": 1}
    timeouts = {lab["reason"]: v for lab, v in s["nodeagent_hbone_inbound_timeouts_total"]}
    assert timeouts == {"handshake_timeout": 0, "preface_timeout": 50, "idle_timeout": 2}


def test_agent_metrics_report_xds_certs_pods_capture_and_policy() -> None:
    metrics = AgentMetrics()
    metrics.set_xds_state("connected")
    metrics.xds_push("type.googleapis.com/istio.workload.Address")
    metrics.xds_push("type.googleapis.com/istio.workload.Address", nacked=True)
    metrics.set_certificate_expiry("spiffe://cluster.local/ns/a/sa/b", 1_900_000_000)
    metrics.set_certificate_expiry("spiffe://cluster.local/ns/a/sa/gone", 1)
    metrics.set_certificate_expiry("spiffe://cluster.local/ns/a/sa/gone", None)
    metrics.set_pod_counts({"ready": 3, "failed": 1})
    metrics.observe_capture_setup(0.02)
    metrics.policy_decision(action="deny", allowed=False)
    metrics.policy_decision(action="", allowed=True)
    s = _samples(metrics)
    state = {lab["state"]: v for lab, v in s["nodeagent_xds_connection_state"]}
    assert state == {"connected": 1, "connecting": 0, "disconnected": 0}
    assert s["nodeagent_xds_pushes_total"][0][1] == 2
    assert s["nodeagent_xds_nacks_total"][0][1] == 1
    expiry = s["nodeagent_certificate_expiration_timestamp_seconds"]
    assert expiry == [({"identity": "spiffe://cluster.local/ns/a/sa/b"}, 1_900_000_000)]
    pods = {lab["state"]: v for lab, v in s["nodeagent_pods"]}
    assert pods["ready"] == 3 and pods["failed"] == 1 and pods["pending"] == 0
    assert s["nodeagent_capture_setup_seconds_count"][0][1] == 1
    decisions = {
        (lab["action"], lab["result"]): v for lab, v in s["nodeagent_policy_decisions_total"]
    }
    assert decisions == {("deny", "deny"): 1, ("none", "allow"): 1}


def test_unknown_xds_state_is_refused() -> None:
    with pytest.raises(ValueError, match="'up' is not one of"):
        AgentMetrics().set_xds_state("up")


def test_registries_are_per_agent() -> None:
    a, b = AgentMetrics(), AgentMetrics()
    a.traffic.record_open(ConnectionLabels(reporter="source"))
    assert "istio_tcp_connections_opened_total{" in a.exposition().decode()
    assert "istio_tcp_connections_opened_total{" not in b.exposition().decode()


def test_labels_from_workloads_and_service() -> None:
    from ipaddress import ip_address

    from nodeagent.admin.metrics import connection_labels
    from nodeagent.model import workload as wm

    src = wm.Workload(
        uid="u1",
        name="client-7d9f",
        namespace="apps",
        workload_name="client",
        canonical_name="client",
        canonical_revision="v1",
        service_account="client",
        addresses=(ip_address("10.1.0.5"),),
    )
    svc = wm.Service(name="server", namespace="apps", hostname="server.apps.svc.cluster.local")
    labels = connection_labels(reporter="source", source=src, service=svc, mtls=True)
    assert labels.source_workload == "client"
    assert labels.source_principal == "spiffe://cluster.local/ns/apps/sa/client"
    assert labels.source_version == "v1"
    assert labels.destination_service == "server.apps.svc.cluster.local"
    assert labels.destination_service_name == "server"
    assert labels.connection_security_policy == "mutual_tls"
    values = dict(zip(TRAFFIC_LABELS, labels.values(), strict=True))
    assert values["destination_workload"] == "unknown"
    assert values["source_cluster"] == "unknown"


def test_certificate_expiry_follows_the_identities_held_at_each_scrape() -> None:
    metrics = AgentMetrics()
    alice, bob = "spiffe://cluster.local/ns/a/sa/alice", "spiffe://cluster.local/ns/a/sa/bob"

    def expiries() -> dict[str, float]:
        samples = _samples(metrics).get("nodeagent_certificate_expiration_timestamp_seconds", [])
        return {lab["identity"]: v for lab, v in samples}

    metrics.sync_certificates({alice: 100, bob: 200})
    assert expiries() == {alice: 100, bob: 200}
    metrics.sync_certificates({alice: 150})  # rotated; bob's pods left the node
    assert expiries() == {alice: 150}
    metrics.sync_certificates({})
    assert expiries() == {}


def test_traffic_cluster_series_per_service_and_subset() -> None:
    from nodeagent.traffic.balancer import EVENTS, ClusterStats

    metrics = AgentMetrics()
    events = dict.fromkeys(EVENTS, 0) | {"overflow": 20, "ejection": 1}
    metrics.add_refresh(
        lambda: metrics.sync_traffic_clusters(
            [ClusterStats("demo/backend.demo.svc.cluster.local", "v2", 10, 1, events)]
        )
    )
    samples = _samples(metrics)
    where = {"service": "backend.demo.svc.cluster.local", "subset": "v2"}
    got = {s["event"]: v for s, v in samples["nodeagent_traffic_events_total"]}
    assert got == {e: float(events[e]) for e in EVENTS}
    assert samples["nodeagent_traffic_ejected_endpoints"] == [(where, 1.0)]
    assert samples["nodeagent_traffic_open_connections"] == [(where, 10.0)]
    assert "nodeagent_traffic_events_created" not in samples
