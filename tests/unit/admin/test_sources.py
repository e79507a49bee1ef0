"""Admin sources over real components: rule texts and drift, explain, pods, connections, dump."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pytest

from nodeagent.admin.rules import has_drift, rule_drift
from nodeagent.admin.sources import (
    CaptureRulesSource,
    MeshExplainer,
    NodePodsSource,
    RegistryConnections,
    config_dump_sections,
    installed_rules_text,
    intended_rules_text,
)
from nodeagent.config import Config
from nodeagent.datapath.iptables import FamilyState, InstalledCapture
from nodeagent.datapath.netns import NetnsHandle
from nodeagent.datapath.plan import build_plan, parse_iptables_save, render_family
from nodeagent.model.identity import Identity
from nodeagent.model.policy import Action, Authorization, Clause, Match, Rule, Scope
from nodeagent.model.workload import GatewayAddress, NamespacedHostname, Port, Workload
from nodeagent.proxy.connections import INBOUND, OUTBOUND, ConnectionRegistry
from nodeagent.proxy.outbound import OutboundRouter
from nodeagent.state.store import StateBatch, StateStore
from tests.builders import service
from tests.builders import workload as build_workload

ip = ipaddress.ip_address
DENY_ADMIN_PORT = Authorization(
    name="deny-9090",
    namespace="demo",
    scope=Scope.NAMESPACE,
    action=Action.DENY,
    rules=(Rule((Clause((Match(destination_ports=(9090,)),)),)),),
)


def workload(name: str, addr: str, sa: str, *, hbone: bool = True) -> Workload:
    services = (
        {"demo/backend.demo.svc.cluster.local": (Port(80, 8080),)} if name == "server" else {}
    )
    return build_workload(
        name,
        addr,
        uid=f"uid-{name}",
        namespace="demo",
        hbone=hbone,
        service_account=sa,
        node="node1",
        services=services,
    )


@pytest.fixture
def store() -> StateStore:
    s = StateStore()
    s.apply(
        StateBatch(
            workloads=(
                workload("client", "10.1.0.5", "frontend"),
                workload("server", "10.2.0.5", "backend"),
                workload("legacy", "10.3.0.5", "old", hbone=False),
            ),
            services=(service("backend", "10.96.0.10", namespace="demo", ports=(Port(80, 8080),)),),
            policies=(DENY_ADMIN_PORT,),
        )
    )
    return s


# -- rules --------------------------------------------------------------------------------


def installed_as_planned(drop: str = "") -> InstalledCapture:
    plan = build_plan(ipv6=False)
    assert plan.ipv4 is not None
    text = "\n".join(line for line in render_family(plan.ipv4).splitlines() if line != drop)
    state = FamilyState(
        family=4, tables=parse_iptables_save(text + "\n"), policy_rule=True, local_route=True
    )
    return InstalledCapture(netns=NetnsHandle(path="/x"), families={4: state})


def test_installed_rules_as_planned_show_no_drift() -> None:
    plan = build_plan(ipv6=False)
    lines = rule_drift(
        intended_rules_text(plan), installed_rules_text(installed_as_planned(), plan)
    )
    assert lines and not has_drift(lines)
    assert ("netlink", "ip -4 route add local 0.0.0.0/0 dev lo table 100") in {
        (line.table, line.rule) for line in lines
    }


def test_a_deleted_rule_is_missing() -> None:
    plan = build_plan(ipv6=False)
    assert plan.ipv4 is not None
    victim = next(
        line
        for line in render_family(plan.ipv4).splitlines()
        if "REDIRECT --to-ports 15001" in line
    )
    lines = rule_drift(
        intended_rules_text(plan), installed_rules_text(installed_as_planned(victim), plan)
    )
    assert [(line.table, line.rule) for line in lines if line.status != "ok"] == [("nat", victim)]


@dataclass(frozen=True)
class NodePod:
    uid: str
    name: str
    namespace: str = "demo"
    state: str = "ready"
    netns: str = "/var/run/netns/none"
    listeners: tuple[int, ...] = (15001, 15006, 15008)
    attempts: int = 1
    last_error: str = ""
    enrolled: bool = True
    enrollment: str = "namespace labelled"


class Node:
    def pods(self) -> list[NodePod]:
        return [NodePod("uid-server", "server")]


def test_pods_show_listeners_with_roles(store: StateStore) -> None:
    (pod,) = NodePodsSource(Node(), store).pods()
    assert pod.service_account == "backend" and pod.capture_state == "ready"
    assert pod.listeners == (
        "10.2.0.5:15001 (outbound)",
        "10.2.0.5:15006 (inbound plaintext)",
        "10.2.0.5:15008 (inbound HBONE)",
    )


async def test_rules_of_an_unknown_pod_are_none_and_a_bad_netns_is_an_error(
    store: StateStore,
) -> None:
    class NoCapture:
        def read_installed(self, netns: NetnsHandle) -> InstalledCapture:
            raise AssertionError("not reached: the namespace does not resolve")

    rules = CaptureRulesSource(
        NodePodsSource(Node(), store), store, lambda w, n: build_plan(), NoCapture()
    )
    assert await rules.pod_rules("nope") is None
    found = await rules.pod_rules("demo/server")
    assert found is not None and found.uid == "uid-server" and found.error


# -- explain --------------------------------------------------------------------------------


def explainer(store: StateStore) -> MeshExplainer:
    return MeshExplainer(store, OutboundRouter(store).route)


def test_explain_a_vip_resolves_the_endpoint_and_allows(store: StateStore) -> None:
    result = explainer(store).explain("client", "10.96.0.10", 80)
    assert result["verdict"] == "allow"
    assert result["destination"]["service"] == "demo/backend.demo.svc.cluster.local"
    assert result["destination"]["endpoint"] == "10.2.0.5:8080"
    assert result["destination"]["identity"] == str(Identity("cluster.local", "demo", "backend"))
    assert result["route"]["kind"] == "hbone"


def test_explain_a_denied_port_names_the_policy(store: StateStore) -> None:
    result = explainer(store).explain("demo/client", "10.2.0.5", 9090)
    assert result["verdict"] == "deny"
    assert result["policy"]["policy"] == "demo/deny-9090"
    assert "DENY demo/deny-9090: rule 0 matches" in result["steps"]
    assert any(step.startswith("1 policy applies to ") for step in result["steps"])


def test_explain_says_when_a_policy_of_the_namespace_selects_no_workload(
    store: StateStore,
) -> None:
    # What `sandbox apply` of a policy whose matchLabels fit no pod leaves the agent with:
    # the policy exists, and no workload names it.
    typo = Authorization(
        name="deny-typo",
        namespace="demo",
        scope=Scope.WORKLOAD_SELECTOR,
        action=Action.DENY,
        rules=(Rule((Clause((Match(destination_ports=(8080,)),)),)),),
    )
    store.apply(StateBatch(policies=(typo,)))
    result = explainer(store).explain("client", "10.2.0.5", 8080)
    assert result["verdict"] == "allow"
    assert (
        "policy demo/deny-typo is in the destination's namespace but its selector matches "
        "no workload: check its matchLabels against the pods' labels"
    ) in result["steps"]
    assert result["policy"]["selects_nothing"] == ["demo/deny-typo"]


def test_explain_passthrough_and_refusals(store: StateStore) -> None:
    ex = explainer(store)
    assert ex.explain("client", "192.0.2.1", 80)["verdict"] == "allow"  # outside the mesh
    assert ex.explain("client", "127.0.0.1", 80)["verdict"] == "deny"  # loop
    # Without HBONE the destination sees no identity: policies are checked as plaintext.
    legacy = ex.explain("client", "10.3.0.5", 9090)
    assert legacy["verdict"] == "deny" and legacy["route"]["kind"] == "passthrough"
    with pytest.raises(LookupError, match="unknown pod 'ghost'"):
        ex.explain("ghost", "10.2.0.5", 80)
    with pytest.raises(ValueError, match="not an IP"):
        ex.explain("client", "backend", 80)


def test_explain_says_a_service_goes_through_its_waypoint_or_is_refused(
    store: StateStore,
) -> None:
    waypoint = GatewayAddress(NamespacedHostname("demo", "waypoint.demo.svc.cluster.local"), 15008)
    store.apply(
        StateBatch(
            services=(
                service(
                    "backend",
                    "10.96.0.10",
                    namespace="demo",
                    ports=(Port(80, 8080),),
                    waypoint=waypoint,
                ),
            )
        )
    )
    refused = explainer(store).explain("client", "10.96.0.10", 80)
    assert refused["verdict"] == "deny"
    assert refused["route"]["kind"] == "refuse"
    assert any(
        "has waypoint demo/waypoint.demo.svc.cluster.local: no such service" in step
        for step in refused["steps"]
    )
    wp_key = "demo/waypoint.demo.svc.cluster.local"
    store.apply(
        StateBatch(
            workloads=(
                build_workload(
                    "wp",
                    "10.2.0.9",
                    namespace="demo",
                    hbone=True,
                    service_account="waypoint",
                    services={wp_key: (Port(15008, 15008),)},
                ),
            ),
            services=(service("waypoint", "10.96.0.9", namespace="demo", ports=(Port(15008),)),),
        )
    )
    through = explainer(store).explain("client", "10.96.0.10", 80)
    assert through["verdict"] == "allow"
    assert through["waypoint"] == {
        "name": wp_key,
        "workload": "demo/wp",
        "endpoint": "10.2.0.9:15008",
        "authority": "10.96.0.10:80",
    }
    assert any(step.startswith("through waypoint ") for step in through["steps"])


# -- connections and dump ------------------------------------------------------------------


def test_connections_name_outbound_peers_as_the_admin_view_does() -> None:
    registry = ConnectionRegistry()
    registry.register(
        workload="demo/client",
        workload_uid="uid-client",
        direction=OUTBOUND,
        protocol="HBONE",
        local="10.1.0.5:40000",
        remote="10.96.0.10:80",
        target="10.2.0.5:8080",
    )
    registry.register(
        workload="demo/server",
        workload_uid="uid-server",
        direction=INBOUND,
        protocol="HBONE",
        local="10.2.0.5:8080",
        remote="10.1.0.5:40000",
        target="10.2.0.5:8080",
    )
    out, inbound = RegistryConnections(lambda: registry).connections()
    assert (out.remote, out.remote_target) == ("10.2.0.5:8080", "10.96.0.10:80")
    assert (inbound.local, inbound.remote) == ("10.2.0.5:8080", "10.1.0.5:40000")


def test_config_dump_sections_come_from_the_store_and_config(store: StateStore) -> None:
    dump = config_dump_sections(store, None, Config(node_name="node1"))
    assert {w["name"] for w in dump.workloads()} == {"client", "server", "legacy"}
    (svc,) = dump.services()
    assert list(svc["endpoints"]) == ["uid-server"]
    assert [p["name"] for p in dump.policies()] == ["deny-9090"]
    assert dump.certificates() == []
    assert dump.config()["node_name"] == "node1"
