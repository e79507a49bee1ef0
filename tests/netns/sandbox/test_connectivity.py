"""Pods in a 2x2 sandbox reach each other's HTTP and echo apps, across and within nodes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeagent.sandbox import probe
from nodeagent.sandbox.netns import NetnsAdapter


@pytest.fixture(scope="module")
def adapter() -> Iterator[NetnsAdapter]:
    with NetnsAdapter() as a:
        yield a


def _pods(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in status["pods"]}


@pytest.mark.parametrize(
    ("src", "dst"),
    [("node1-pod1", "node2-pod2"), ("node2-pod2", "node1-pod1"), ("node1-pod1", "node1-pod2")],
    ids=["across-nodes", "across-nodes-reverse", "same-node"],
)
def test_pod_http_answer_shows_the_callers_real_pod_ip(
    sandbox_2x2: dict[str, Any], adapter: NetnsAdapter, src: str, dst: str
) -> None:
    pods = _pods(sandbox_2x2)
    answer = probe.http_get(adapter, pods[src]["netns"], pods[dst]["ip"], 8080, "/who")
    assert answer["pod"] == dst
    assert answer["node"] == pods[dst]["node"]
    assert answer["service_account"] == pods[dst]["service_account"]
    assert answer["client_ip"] == pods[src]["ip"]
    assert answer["path"] == "/who"
    assert isinstance(answer["client_port"], int) and answer["client_port"] > 0


@pytest.mark.parametrize(
    ("src", "dst"),
    [("node1-pod2", "node2-pod1"), ("node2-pod1", "node2-pod2")],
    ids=["across-nodes", "same-node"],
)
def test_pod_echo_returns_what_was_sent(
    sandbox_2x2: dict[str, Any], adapter: NetnsAdapter, src: str, dst: str
) -> None:
    pods = _pods(sandbox_2x2)
    payload = b"x" * 100_000 + src.encode()
    assert probe.echo(adapter, pods[src]["netns"], pods[dst]["ip"], 9000, payload) == payload


def test_pods_reach_the_underlay_and_other_nodes(
    sandbox_2x2: dict[str, Any], adapter: NetnsAdapter
) -> None:
    pods = _pods(sandbox_2x2)
    underlay = sandbox_2x2["underlay"]["netns"]
    answer = probe.http_get(adapter, underlay, pods["node2-pod1"]["ip"], 8080)
    assert answer["client_ip"] == sandbox_2x2["underlay"]["ip"]
    node1 = sandbox_2x2["nodes"][0]
    answer = probe.http_get(adapter, node1["netns"], pods["node2-pod2"]["ip"], 8080)
    assert answer["client_ip"] == node1["ip"]


def test_status_lists_nodes_pods_agents_and_the_control_plane(sandbox_2x2: dict[str, Any]) -> None:
    assert [n["name"] for n in sandbox_2x2["nodes"]] == ["node1", "node2"]
    assert len(sandbox_2x2["pods"]) == 4
    assert {p["service_account"] for p in sandbox_2x2["pods"]} == {"frontend", "backend"}
    for pod in sandbox_2x2["pods"]:
        assert pod["app_pid"] is not None
        with open(f"/proc/{pod['app_pid']}/cmdline", "rb") as f:
            assert f"--pod={pod['name']}".encode() in f.read()
    # One agent per node, running in the node's namespace like a host-network DaemonSet pod.
    agents = {a["name"]: a for a in sandbox_2x2["agents"]}
    assert set(agents) == {"agent-node1", "agent-node2"}
    for node in sandbox_2x2["nodes"]:
        agent = agents[f"agent-{node['name']}"]
        assert agent["netns"] == node["netns"]
        agent_ns = Path(f"/proc/{agent['pid']}/ns/net").stat().st_ino
        assert agent_ns == Path(f"/var/run/netns/{node['netns']}").stat().st_ino
    assert sandbox_2x2["controlplane"]["address"] == "172.30.0.1:15010"
    assert sandbox_2x2["controlplane"]["pid"] is not None
    assert sandbox_2x2["phase"] == "ready"


def test_exec_runs_in_the_pods_namespace_and_returns_its_exit_code(
    sandbox_2x2: dict[str, Any], nodeagent_cli: Any
) -> None:
    name = sandbox_2x2["name"]
    pod = _pods(sandbox_2x2)["node2-pod1"]
    shown = nodeagent_cli("sandbox", "exec", name, "node2-pod1", "--", "ip", "-4", "-o", "addr")
    assert shown.returncode == 0, shown.stderr
    assert pod["ip"] in shown.stdout
    assert "172.30." not in shown.stdout  # not the node's namespace
    node = nodeagent_cli("sandbox", "exec", name, "node2", "--", "ip", "-4", "-o", "addr")
    assert "172.30.0.12" in node.stdout
    failed = nodeagent_cli("sandbox", "exec", name, "node1-pod1", "--", "sh", "-c", "exit 7")
    assert failed.returncode == 7


def test_status_table_is_for_people(sandbox_2x2: dict[str, Any], nodeagent_cli: Any) -> None:
    shown = nodeagent_cli("sandbox", "status", sandbox_2x2["name"])
    assert shown.returncode == 0, shown.stderr
    assert "SERVICE ACCOUNT" in shown.stdout
    assert "10.10.2.12" in shown.stdout
    assert "control plane 172.30.0.1:15010" in shown.stdout
