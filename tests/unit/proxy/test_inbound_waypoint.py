"""Inbound HBONE to a workload that has a waypoint, from something other than the waypoint:
handled as current ztunnel does (src/proxy/inbound.rs): no "bypassed waypoint" refusal;
the workload's own L4 policies decide, against the real caller's identity. An ALLOW policy
naming only the waypoint's identity is how a user makes the waypoint mandatory."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

import pytest

from nodeagent.datapath.netns import NetnsHandle
from nodeagent.hbone.server import AcceptedStream
from nodeagent.model.identity import Identity
from nodeagent.model.policy import Action, Authorization, Clause, Match, Rule, Scope, StringMatch
from nodeagent.model.workload import GatewayAddress, NamespacedHostname
from nodeagent.policy.checker import PolicyChecker
from nodeagent.proxy.connections import ConnectionRegistry, store_policy_lookup
from nodeagent.proxy.inbound import InboundHboneHandler
from nodeagent.proxy.listeners import LocalPod
from nodeagent.state.store import StateBatch, StateStore
from tests.builders import workload

POD_IP = "10.0.0.5"
WAYPOINT = Identity("cluster.local", "demo", "waypoint")
CLIENT = Identity("cluster.local", "demo", "client")
ONLY_WAYPOINT = Authorization(
    name="only-waypoint",
    namespace="demo",
    scope=Scope.WORKLOAD_SELECTOR,
    action=Action.ALLOW,
    rules=(Rule((Clause((Match(principals=(StringMatch.exact(WAYPOINT.principal),)),)),)),),
)


@dataclass
class FakeStream:
    authority: str
    answered: list[int] = field(default_factory=list)

    def respond(self, status: int) -> None:
        self.answered.append(status)


def handler(*policies: Authorization) -> tuple[InboundHboneHandler, LocalPod]:
    store = StateStore()
    store.apply(
        StateBatch(
            workloads=(
                workload(
                    "echo",
                    POD_IP,
                    namespace="demo",
                    hbone=True,
                    service_account="echo",
                    waypoint=GatewayAddress(
                        NamespacedHostname("demo", "waypoint.demo.svc.cluster.local"), 15008
                    ),
                    authorization_policies=tuple(p.key for p in policies),
                ),
            ),
            policies=policies,
        )
    )
    checker = PolicyChecker(store_policy_lookup(store))
    inbound = InboundHboneHandler(None, checker, ConnectionRegistry())  # type: ignore[arg-type]
    pod = LocalPod(
        uid="echo",
        namespace="demo",
        name="echo",
        identity=Identity("cluster.local", "demo", "echo"),
        addresses=(ipaddress.ip_address(POD_IP),),
        netns=NetnsHandle(path="/proc/self/ns/net"),
        sockets=None,  # type: ignore[arg-type]  # no app connection is made here
    )
    return inbound, pod


def connect(
    inbound: InboundHboneHandler, pod: LocalPod, identity: Identity, peer: str
) -> tuple[FakeStream, object]:
    stream = FakeStream(f"{POD_IP}:8080")
    accepted = AcceptedStream(stream, (peer, 40000), identity)  # type: ignore[arg-type]
    tunnel = inbound._accept(pod, accepted)
    if tunnel is not None:
        tunnel.close()  # type: ignore[attr-defined]  # a coroutine not run: no app connect
    return stream, tunnel


@pytest.mark.parametrize("caller", [CLIENT, WAYPOINT])
def test_without_policy_a_direct_caller_is_let_through_as_ztunnel_does(caller):
    inbound, pod = handler()
    stream, tunnel = connect(inbound, pod, caller, "10.0.0.2")
    assert tunnel is not None and stream.answered == []  # goes on to the app connect


def test_a_policy_allowing_only_the_waypoint_refuses_a_direct_caller():
    inbound, pod = handler(ONLY_WAYPOINT)
    stream, tunnel = connect(inbound, pod, CLIENT, "10.0.0.2")
    assert tunnel is None and stream.answered == [401]
    through, tunnel = connect(inbound, pod, WAYPOINT, "10.0.0.9")
    assert tunnel is not None and through.answered == []
