"""Model values rendered as ztunnel-shaped config dump JSON, read back by the CLI views."""

from __future__ import annotations

import json
from ipaddress import ip_address

from nodeagent.admin import dump, views
from nodeagent.model import policy as pm
from nodeagent.model import workload as wm

SERVER = wm.Workload(
    uid="Kubernetes//Pod/default/server-1",
    name="server-1",
    namespace="default",
    addresses=(ip_address("10.2.0.5"),),
    tunnel_protocol=wm.TunnelProtocol.HBONE,
    node="node2",
    service_account="server",
    waypoint=wm.GatewayAddress(
        wm.NamespacedHostname("default", "waypoint.default.svc.cluster.local"), 15008
    ),
)
CLIENT = wm.Workload(
    uid="Kubernetes//Pod/default/client-1",
    name="client-1",
    namespace="default",
    addresses=(ip_address("10.1.0.5"),),
    node="node1",
    status=wm.WorkloadStatus.UNHEALTHY,
)
SERVICE = wm.Service(
    name="server",
    namespace="default",
    hostname="server.default.svc.cluster.local",
    addresses=(wm.NetworkAddress("", ip_address("10.96.0.10")),),
    ports=(wm.Port(80, 8080),),
)
POLICY = pm.Authorization(
    name="deny-client",
    namespace="default",
    scope=pm.Scope.NAMESPACE,
    action=pm.Action.DENY,
    rules=(
        pm.Rule(
            clauses=(
                pm.Clause(
                    matches=(
                        pm.Match(principals=(pm.StringMatch.exact("cluster.local/ns/x/sa/y"),)),
                    )
                ),
            )
        ),
    ),
)


def test_dump_reads_back_as_istioctl_columns() -> None:
    config = {
        "workloads": [dump.workload_json(SERVER), dump.workload_json(CLIENT)],
        "services": [
            dump.service_json(
                SERVICE,
                [
                    wm.Endpoint(SERVER, (wm.Port(80, 8080),)),
                    wm.Endpoint(CLIENT, (wm.Port(80, 8080),)),
                ],
            )
        ],
        "policies": [dump.policy_json(POLICY)],
    }
    config = json.loads(json.dumps(config))  # everything is plain JSON
    assert views.workload_rows(config) == [
        {
            "namespace": "default",
            "name": "client-1",
            "address": "10.1.0.5",
            "node": "node1",
            "waypoint": "None",
            "protocol": "TCP",
        },
        {
            "namespace": "default",
            "name": "server-1",
            "address": "10.2.0.5",
            "node": "node2",
            "waypoint": "waypoint",
            "protocol": "HBONE",
        },
    ]
    [svc] = views.service_rows(config)
    assert svc["vip"] == "10.96.0.10" and svc["endpoints"] == "1/2"
    assert views.policy_rows(config) == [
        {"namespace": "default", "name": "deny-client", "action": "Deny", "scope": "Namespace"}
    ]


def test_workload_json_has_ztunnel_keys() -> None:
    w = dump.workload_json(SERVER)
    assert w["workloadIps"] == ["10.2.0.5"]
    assert w["serviceAccount"] == "server"
    assert w["waypoint"] == {
        "destination": "default/waypoint.default.svc.cluster.local",
        "hboneMtlsPort": 15008,
    }
    assert w["workloadType"] == "deployment"
    assert w["status"] == "Healthy"
    assert "addresses" not in w and "tunnelProtocol" not in w


def test_policy_rules_render_their_matches() -> None:
    p = dump.policy_json(POLICY)
    assert p["rules"] == [
        {
            "clauses": [
                {
                    "matches": [
                        {"principals": [str(pm.StringMatch.exact("cluster.local/ns/x/sa/y"))]}
                    ]
                }
            ]
        }
    ]
    assert p["dryRun"] is False
