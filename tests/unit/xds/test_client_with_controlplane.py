"""The real delta-xDS client against the real control plane, in one process on loopback.

The client feeds the real StateUpdater/StateStore, so these are scenarios of
the whole control-plane path: snapshot, updates, removals, NACKs, restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import textwrap
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc

from nodeagent.config import Config
from nodeagent.controlplane.resources import config_resources
from nodeagent.controlplane.server import ControlPlaneServer
from nodeagent.model.constants import (
    TYPE_URL_ADDRESS,
    TYPE_URL_AUTHORIZATION,
    TYPE_URL_VIRTUAL_SERVICE,
)
from nodeagent.pb.envoy.service.discovery.v3 import ads_pb2_grpc
from nodeagent.pb.envoy.service.discovery.v3 import discovery_pb2 as discovery_pb
from nodeagent.pb.istio.workload import workload_pb2 as workload_pb
from nodeagent.state.mcp import ConfigEnvelope, encode
from nodeagent.state.store import StateStore
from nodeagent.state.updater import StateUpdater
from nodeagent.xds.client import DEFAULT_TYPES, ExponentialBackoff, XdsClient
from tests.builders import MeshFile, destination_rule, virtual_service, wait_until

MESH = textwrap.dedent(
    """\
    nodes:
    - {name: node1, token: tok-1}
    - {name: node2, token: tok-2}
    workloads:
    - {name: a, namespace: shop, node: node1, ip: 10.1.0.1, serviceAccount: sa-a,
       labels: {app: web}}
    - {name: b, namespace: shop, node: node2, ip: 10.1.0.2, labels: {app: web}}
    services:
    - {name: web, namespace: shop, vip: 10.96.0.1, ports: [{port: 80, targetPort: 8080}],
       selector: {app: web}}
    authorizationPolicies:
    - metadata: {name: allow-web, namespace: shop}
      spec: {selector: {matchLabels: {app: web}}, rules: [{to: [{operation: {ports: ["8080"]}}]}]}
    """
)
WORKLOAD_A = """\
- {name: a, namespace: shop, node: node1, ip: 10.1.0.1, serviceAccount: sa-a,
   labels: {app: web}}
"""
assert WORKLOAD_A in MESH
UID_A = "Kubernetes//Pod/shop/a"
UID_B = "Kubernetes//Pod/shop/b"
SVC = "shop/web.shop.svc.cluster.local"

FAST = ExponentialBackoff(initial=0.05, cap=0.2)


def agent_config(tmp_path: Path, port: int, token: str = "tok-1") -> Config:
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    return Config(
        node_name="node1",
        pod_name="nodeagent-x",
        pod_namespace="istio-system",
        instance_ip="192.0.2.10",
        cluster_id="Kubernetes",
        xds_address=f"http://127.0.0.1:{port}",
        auth_token_path=str(token_file),
        extra={"FOO": "bar"},
    )


@contextlib.asynccontextmanager
async def mesh_and_agent(
    tmp_path: Path,
) -> AsyncIterator[tuple[ControlPlaneServer, XdsClient, StateStore, MeshFile]]:
    mesh = MeshFile(tmp_path / "mesh.yaml", MESH)
    server = ControlPlaneServer(mesh.path, "127.0.0.1:0", poll_interval=0.05)
    await server.start()
    store = StateStore()
    client = XdsClient(agent_config(tmp_path, server.port), StateUpdater(store), backoff=FAST)
    try:
        async with client:
            await asyncio.wait_for(client.wait_ready(), 10)
            yield server, client, store, mesh
    finally:
        await server.stop(grace=None)


async def all_acked(client: XdsClient, *, streams: int) -> None:
    """Wait until the first response of every type on each of `streams` streams is ACKed.

    Readiness waits only for ztunnel's types; an ACK still being written when the test
    stops the server fails as a bare INTERNAL and leaves grpc's status task pending.
    """
    await wait_until(
        lambda: client.stats.acks + client.stats.nacks >= streams * len(DEFAULT_TYPES),
        "every type's first response answered",
    )
    await asyncio.sleep(0.05)  # the last ACK's write, which follows the count


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


async def test_snapshot_arrives_with_node_id_metadata_and_token(tmp_path: Path) -> None:
    async with mesh_and_agent(tmp_path) as (server, client, store, _):
        assert {w.uid for w in store.workloads()} == {UID_A, UID_B}
        assert store.service(SVC) is not None
        assert [e for e in store.endpoints(SVC)]  # both workloads back the service
        assert store.policy("shop/allow-web") is not None
        assert client.stats.connected and client.stats.acks >= 2 and client.stats.nacks == 0
        (info,) = server.servicer.streams
        assert (
            info.node_id
            == "ztunnel~192.0.2.10~nodeagent-x.istio-system~istio-system.svc.cluster.local"
        )
        assert info.node_metadata["NAME"] == "nodeagent-x"
        assert info.node_metadata["INSTANCE_IPS"] == "192.0.2.10"
        assert info.node_metadata["NODE_NAME"] == "node1"
        assert info.node_metadata["FOO"] == "bar"
        assert info.metadata["authorization"] == "Bearer tok-1"
        assert info.metadata["clusterid"] == "Kubernetes"
        assert info.token_node == "node1"
        # Each type's subscription is its own request: the last may still be on its way.
        await wait_until(
            lambda: info.initial_resource_versions == {t: {} for t in DEFAULT_TYPES},
            "every type subscribed",
        )


async def test_mesh_edit_pushes_update_and_removal(tmp_path: Path) -> None:
    async with mesh_and_agent(tmp_path) as (_server, client, store, mesh):
        pushes = client.stats.pushes
        edited = MESH.replace("ip: 10.1.0.2", "ip: 10.1.0.22").replace(
            "- metadata: {name: allow-web", "- metadata: {name: allow-web2"
        )
        # a is node1's only workload and node1's agent is connected: say it is meant.
        edited = edited.replace(WORKLOAD_A, "").replace("tok-1}", "tok-1, allowEmpty: true}")
        mesh.write(edited)
        await wait_until(lambda: store.workload(UID_A) is None, "workload a removed")
        await wait_until(lambda: store.policy("shop/allow-web2") is not None, "policy renamed")
        wb = store.workload(UID_B)
        assert wb is not None and wb.addresses == (ip("10.1.0.22"),)
        assert store.policy("shop/allow-web") is None
        assert client.stats.pushes > pushes and client.stats.nacks == 0
        assert UID_A not in client.protocol.versions(TYPE_URL_ADDRESS)


async def test_malformed_resource_is_nacked_by_name_while_others_apply(tmp_path: Path) -> None:
    async with mesh_and_agent(tmp_path) as (server, client, store, _):
        bad_uid = "Kubernetes//Pod/shop/bad"
        good_uid = "Kubernetes//Pod/shop/good"
        bad = workload_pb.Address(
            workload=workload_pb.Workload(
                uid=bad_uid, name="bad", namespace="shop", addresses=[b"\x01" * 5]
            )
        )
        good = workload_pb.Address(
            workload=workload_pb.Workload(
                uid=good_uid, name="good", namespace="shop", addresses=[bytes([10, 1, 0, 9])]
            )
        )
        server.mesh_store.inject(
            TYPE_URL_ADDRESS, {bad_uid: bad.SerializeToString(), good_uid: good.SerializeToString()}
        )
        await wait_until(lambda: client.stats.nacks == 1, "a NACK")
        assert store.workload(good_uid) is not None
        assert store.workload(bad_uid) is None
        assert client.stats.last_nack.startswith(f"{bad_uid}: ")
        assert client.stats.nacks_by_type == {TYPE_URL_ADDRESS: 1}
        assert good_uid not in client.stats.last_nack
        versions = client.protocol.versions(TYPE_URL_ADDRESS)
        assert good_uid in versions and bad_uid not in versions
        await wait_until(
            lambda: bool(server.servicer.streams[-1].nacks), "the server to log the NACK"
        )
        assert bad_uid in server.servicer.streams[-1].nacks[0]


async def test_server_restart_client_keeps_state_and_resumes_with_versions(tmp_path: Path) -> None:
    async with mesh_and_agent(tmp_path) as (server, client, store, mesh):
        port = server.port
        known = client.protocol.versions(TYPE_URL_ADDRESS)
        await all_acked(client, streams=1)
        await server.stop(grace=None)
        await wait_until(lambda: not client.stats.connected, "the client to see the disconnect")
        # While the control plane is down the agent keeps serving what it had.
        assert {w.uid for w in store.workloads()} == {UID_A, UID_B}
        assert client.stats.last_error
        # The stream that worked ended as an error, not as a failed connect.
        assert (
            client.stats.terminations.get("Error", 0) + client.stats.terminations.get("Complete", 0)
            == 1
        )
        mesh.write(MESH.replace("ip: 10.1.0.2", "ip: 10.1.0.99"))
        # Projected tokens rotate: the client must read the file again.
        (tmp_path / "token").write_text("tok-2")
        restarted = ControlPlaneServer(mesh.path, f"127.0.0.1:{port}", poll_interval=0.05)
        await restarted.start()
        try:
            await wait_until(lambda: bool(restarted.servicer.streams), "the client to reconnect")
            await wait_until(
                lambda: (
                    len(restarted.servicer.streams[-1].initial_resource_versions)
                    == len(DEFAULT_TYPES)
                ),
                "every initial request",
            )
            info = restarted.servicer.streams[-1]
            assert info.initial_resource_versions[TYPE_URL_ADDRESS] == known
            assert info.token_node == "node2"
            assert info.node_id  # node sent again on the new stream
            await wait_until(
                lambda: (
                    (w := store.workload(UID_B)) is not None and w.addresses == (ip("10.1.0.99"),)
                ),
                "the changed workload",
            )
            assert store.workload(UID_A) is not None
            assert client.stats.connected and client.stats.connects == 2
            await all_acked(client, streams=2)
        finally:
            await restarted.stop(grace=None)


async def test_bad_mesh_edit_is_refused_and_client_keeps_previous_config(tmp_path: Path) -> None:
    async with mesh_and_agent(tmp_path) as (server, client, store, mesh):
        mesh.write(MESH.replace("ip: 10.1.0.2", "ip: 10.1.0.300"))
        await wait_until(lambda: server.watcher.last_error is not None, "the edit to be refused")
        error = server.watcher.last_error or ""
        assert error.startswith(f"{mesh.path}:7:")
        assert "workloads[1].ip: '10.1.0.300' is not an IP address" in error
        wb = store.workload(UID_B)
        assert wb is not None and wb.addresses == (ip("10.1.0.2"),)
        # The server still serves the last good mesh, and the next good edit goes through.
        assert server.mesh_store.mesh.workloads[1].ips == ("10.1.0.2",)
        mesh.write(MESH.replace("ip: 10.1.0.2", "ip: 10.1.0.3"))
        await wait_until(
            lambda: (w := store.workload(UID_B)) is not None and w.addresses == (ip("10.1.0.3"),),
            "the good edit",
        )
        assert server.watcher.last_error is None and client.stats.nacks == 0


CANARY = {
    "hosts": ["web"],
    "tcp": [
        {
            "match": [{"port": 80}],
            "route": [
                {"destination": {"host": "web", "subset": "v1"}, "weight": 90},
                {"destination": {"host": "web", "subset": "v2"}, "weight": 10},
            ],
        }
    ],
}


async def test_virtual_service_of_the_mesh_reaches_the_agent_store(tmp_path: Path) -> None:
    async with mesh_and_agent(tmp_path) as (server, client, store, _):
        assert store.virtual_services() == () and client.ready
        canary = virtual_service("web", "shop", spec=CANARY)
        rule = destination_rule("web", "shop")
        mesh = server.mesh_store.mesh
        server.mesh_store.replace(
            replace(mesh, virtual_services=(canary,), destination_rules=(rule,))
        )
        await wait_until(
            lambda: store.virtual_services() == (canary,) and store.destination_rules() == (rule,),
            "the VirtualService and DestinationRule",
        )
        assert client.stats.nacks == 0
        assert client.protocol.versions(TYPE_URL_VIRTUAL_SERVICE).keys() == {"shop/web"}
        # Removing it from the mesh removes it from the agent.
        server.mesh_store.replace(replace(mesh, destination_rules=(rule,)))
        await wait_until(lambda: store.virtual_services() == (), "the removal")
        assert store.destination_rules() == (rule,)


async def test_bad_virtual_service_is_nacked_by_name_over_the_wire(tmp_path: Path) -> None:
    async with mesh_and_agent(tmp_path) as (server, client, store, _):
        good = virtual_service("web", "shop", spec=CANARY)
        served = config_resources(TYPE_URL_VIRTUAL_SERVICE, [good])
        split_70 = {**CANARY, "tcp": [{"route": CANARY["tcp"][0]["route"][:1]}]}
        split_70["tcp"][0]["route"] = [{"destination": {"host": "web"}, "weight": 70}]
        bad = encode(TYPE_URL_VIRTUAL_SERVICE, ConfigEnvelope("shop", "split", split_70))
        server.mesh_store.inject(
            TYPE_URL_VIRTUAL_SERVICE, {"shop/web": served["shop/web"].value, "shop/split": bad}
        )
        await wait_until(lambda: client.stats.nacks == 1, "a NACK")
        assert client.stats.last_nack.startswith("shop/split: virtualservice shop/split: spec.tcp")
        assert store.virtual_services() == (good,)


class ZtunnelTypesOnly(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """A control plane that answers ztunnel's two types and ignores every other."""

    async def DeltaAggregatedResources(self, request_iterator, context):  # type: ignore[no-untyped-def]
        async for req in request_iterator:
            if (
                req.type_url in (TYPE_URL_ADDRESS, TYPE_URL_AUTHORIZATION)
                and not req.response_nonce
            ):
                yield discovery_pb.DeltaDiscoveryResponse(type_url=req.type_url, nonce="1")


async def test_control_plane_without_config_kinds_leaves_the_agent_ready(tmp_path: Path) -> None:
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ZtunnelTypesOnly(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        store = StateStore()
        cfg = agent_config(tmp_path, port)
        async with XdsClient(cfg, StateUpdater(store), backoff=FAST) as client:
            await asyncio.wait_for(client.wait_ready(), 10)
            assert client.ready and client.stats.nacks == 0
            assert TYPE_URL_VIRTUAL_SERVICE not in client.stats.by_type
            assert store.virtual_services() == ()
    finally:
        await server.stop(None)


ROUTED_MESH = MESH + textwrap.dedent(
    """\
    virtualServices:
    - apiVersion: networking.istio.io/v1
      kind: VirtualService
      metadata: {name: web-canary, namespace: shop, annotations: {owner: team-web}}
      spec:
        hosts: [web]
        tcp:
        - fault: {delay: {fixedDelay: 1.5s, percentage: {value: 10}}}
          route:
          - {destination: {host: web, subset: v1}, weight: 90}
          - {destination: {host: web, subset: v2}, weight: 10}
    destinationRules:
    - apiVersion: networking.istio.io/v1
      kind: DestinationRule
      metadata: {name: web, namespace: shop}
      spec:
        host: web
        trafficPolicy:
          connectionPool: {tcp: {maxConnections: 10, connectTimeout: 250ms}}
        subsets:
        - {name: v1, labels: {version: v1}}
        - {name: v2, labels: {version: v2}}
    """
)


async def test_mesh_files_routing_sections_reach_the_agent_as_the_control_plane_read_them(
    tmp_path: Path,
) -> None:
    async with mesh_and_agent(tmp_path) as (server, client, store, mesh):
        mesh.write(ROUTED_MESH)
        await wait_until(
            lambda: bool(store.virtual_services() and store.destination_rules()),
            "the mesh file's VirtualService and DestinationRule",
        )
        served = server.mesh_store.mesh
        (vs,) = store.virtual_services()
        (dr,) = store.destination_rules()
        (want_vs,) = served.virtual_services
        (want_dr,) = served.destination_rules
        assert (vs.key, vs.hosts, vs.tcp) == (want_vs.key, want_vs.hosts, want_vs.tcp)
        assert vs.tcp[0].fault is not None  # the extension came as an annotation
        assert vs.annotations["owner"] == "team-web"
        assert (dr.key, dr.subsets, dr.traffic_policy) == (
            want_dr.key,
            want_dr.subsets,
            want_dr.traffic_policy,
        )
        assert client.stats.nacks == 0
