"""The series ztunnel exports for Istio's ztunnel dashboard, by their exact names and labels."""

from __future__ import annotations

import nodeagent
from nodeagent.admin.metrics import AgentMetrics
from nodeagent.model.constants import TYPE_URL_ADDRESS, TYPE_URL_AUTHORIZATION
from tests.unit.admin.test_metrics import _samples


def test_istio_build_identifies_the_agent_as_ztunnel_with_our_version() -> None:
    [(labels, value)] = _samples(AgentMetrics())["istio_build"]
    assert labels == {"component": "ztunnel", "tag": nodeagent.__version__}
    assert value == 1


def test_xds_messages_and_bytes_by_url_follow_the_clients_totals() -> None:
    metrics = AgentMetrics()
    metrics.sync_xds(
        connected=True,
        pushes_by_type={TYPE_URL_ADDRESS: 3, TYPE_URL_AUTHORIZATION: 1},
        nacks_by_type={},
        terminations_by_reason={"Reconnect": 2},
        bytes_by_type={TYPE_URL_ADDRESS: 900, TYPE_URL_AUTHORIZATION: 40},
    )
    s = _samples(metrics)
    assert {lab["url"]: v for lab, v in s["istio_xds_message_total"]} == {
        TYPE_URL_ADDRESS: 3,
        TYPE_URL_AUTHORIZATION: 1,
    }
    assert {lab["url"]: v for lab, v in s["istio_xds_message_bytes_total"]} == {
        TYPE_URL_ADDRESS: 900,
        TYPE_URL_AUTHORIZATION: 40,
    }
    terminations = {lab["reason"]: v for lab, v in s["istio_xds_connection_terminations_total"]}
    assert terminations["Reconnect"] == 2 and terminations["ConnectionError"] == 0
    # A client's totals that went back (a restarted client) never lower a counter.
    metrics.sync_xds(connected=True, pushes_by_type={TYPE_URL_ADDRESS: 1}, nacks_by_type={})
    s = _samples(metrics)
    assert dict((lab["url"], v) for lab, v in s["istio_xds_message_total"])[TYPE_URL_ADDRESS] == 3
    assert not [n for n in s if n.startswith("istio_xds") and n.endswith("_created")]


def test_workload_manager_series_follow_the_pod_states_and_proxy_counts() -> None:
    metrics = AgentMetrics()
    metrics.set_pod_counts({"ready": 3, "pending": 1, "capturing": 1, "failed": 1, "held": 2})
    metrics.sync_proxy_lifecycle(started=7, stopped=4)
    s = _samples(metrics)
    assert s["workload_manager_active_proxy_count"] == [({}, 3)]
    assert s["workload_manager_pending_proxy_count"] == [({}, 3)]
    assert s["workload_manager_proxies_started_total"] == [({}, 7)]
    assert s["workload_manager_proxies_stopped_total"] == [({}, 4)]
    metrics.set_pod_counts({"ready": 1})
    metrics.sync_proxy_lifecycle(started=2, stopped=1)  # counters never go down
    s = _samples(metrics)
    assert s["workload_manager_active_proxy_count"] == [({}, 1)]
    assert s["workload_manager_pending_proxy_count"] == [({}, 0)]
    assert s["workload_manager_proxies_started_total"] == [({}, 7)]
    assert not [n for n in s if n.startswith("workload_manager") and n.endswith("_created")]


def test_process_and_socket_series_are_exposed() -> None:
    metrics = AgentMetrics()
    metrics.set_sockets_open({"source": 2})
    s = _samples(metrics)
    [(_, fds)] = s["process_open_fds"]
    assert fds > 0
    assert "process_max_fds" in s
    assert {lab["reporter"]: v for lab, v in s["istio_tcp_sockets_open"]} == {
        "source": 2,
        "destination": 0,
    }
