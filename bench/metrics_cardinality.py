"""Benchmark: the /metrics endpoint's cost (series, bytes, render time) under traffic.

In-process, no network: a StateStore with N workloads on other nodes (spread over services
and namespaces) and M local pods on this node (some behind services), an AgentMetrics and a
ConnectionTelemetry wired as nodeagent.app.build wires them (telemetry.flush, the routing's
cluster stats, and the scrape-time refreshers of `_refresh_metrics` fed with plausible
counts), then connection traffic through the telemetry's `opened`/`closed` hooks: each
active local pod dials P random remote workloads (half directly, half through their
service's VIP, the endpoint picked by the agent's own ServiceRouting) and P random remote
workloads dial it (both reporters). The registry is rendered as the /metrics route does
(`AgentMetrics.exposition`, prometheus_client's generate_latest).

Scenarios: no traffic, traffic from 5 local pods, traffic from all of them, the same peers
three rounds over, twice the peers; each remote pod its own deployment (worst case: every
pod a distinct `*_workload` label value), then 10 replicas per remote deployment. Fixed
random seed.

    python -m bench.metrics_cardinality [--remote 1000] [--local 50] [--peers 20]

Prints a short report, then one JSON object.
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import re
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

from bench.report import emit
from nodeagent.admin.metrics import TCP_TRAFFIC_LABELS, AgentMetrics
from nodeagent.admin.telemetry import ConnectionTelemetry
from nodeagent.model import constants as c
from nodeagent.model import workload as wm
from nodeagent.model.identity import Identity
from nodeagent.proxy.routing import ServiceRouting
from nodeagent.state.store import StateBatch, StateStore
from nodeagent.traffic.outlier import OutlierDetector

SEED = 22
NODE = "node-0"
SERVICES = 20
NAMESPACES = 10
LOCAL_SERVICES = 6  # 5 local pods behind each; the rest of the local pods behind none
PER_LOCAL_SERVICE = 5
SERVICE_PORT, TARGET_PORT = 80, 8080
RENDERS = 5
XDS_TYPES = (
    c.TYPE_URL_ADDRESS,
    c.TYPE_URL_AUTHORIZATION,
    c.TYPE_URL_VIRTUAL_SERVICE,
    c.TYPE_URL_DESTINATION_RULE,
)
_PORT_OR_IP = re.compile(r"^\d+$|^\d+\.\d+\.\d+\.\d+(:\d+)?$|:\d+$")


@dataclass(eq=False, kw_only=True)
class Conn:
    """A connection as the telemetry reads it (nodeagent.admin.telemetry.LiveConnectionView)."""

    workload: str
    workload_uid: str
    direction: str
    protocol: str
    local: str
    remote: str
    target: str
    source_identity: Identity | None = None
    destination_identity: Identity | None = None
    started: float = field(default_factory=time.time)
    closed_reason: str = ""
    response_flags: str = ""
    bytes_in: int = 0
    bytes_out: int = 0
    forwarded_host: str = ""


@dataclass
class Mesh:
    store: StateStore
    remote: list[wm.Workload]
    local: list[wm.Workload]
    services: dict[str, wm.Service]  # key -> service


def _service(name: str, namespace: str, vip: str) -> wm.Service:
    return wm.Service(
        name=name,
        namespace=namespace,
        hostname=f"{name}.{namespace}.svc.cluster.local",
        addresses=(wm.NetworkAddress("", ipaddress.ip_address(vip)),),
        ports=(wm.Port(SERVICE_PORT, TARGET_PORT),),
    )


def build_mesh(n_remote: int, n_local: int, replicas: int) -> Mesh:
    services = [
        _service(f"svc-{i}", f"ns-{i % NAMESPACES}", f"10.96.0.{i + 1}") for i in range(SERVICES)
    ]
    local_services = [
        _service(f"local-svc-{i}", f"ns-{i % NAMESPACES}", f"10.96.1.{i + 1}")
        for i in range(LOCAL_SERVICES)
    ]
    remote = []
    for i in range(n_remote):
        svc = services[i % SERVICES]
        deployment = (i // SERVICES) // replicas  # `replicas` pods of a service per deployment
        remote.append(
            wm.Workload(
                uid=f"Kubernetes//Pod/{svc.namespace}/remote-{i}",
                name=f"remote-{i}",
                namespace=svc.namespace,
                addresses=(ipaddress.IPv4Address(0x0A010000 + i),),
                tunnel_protocol=wm.TunnelProtocol.HBONE,
                service_account=svc.name,
                node=f"node-{1 + i % 99}",
                canonical_name=svc.name,
                canonical_revision=f"v{1 + i % 2}",
                workload_name=f"{svc.name}-deploy-{deployment}",
                services={svc.key: (wm.Port(SERVICE_PORT, TARGET_PORT),)},
                cluster_id="Kubernetes",
                locality=wm.Locality("region-1", f"zone-{i % 3}"),
            )
        )
    local = []
    for i in range(n_local):
        behind = i // PER_LOCAL_SERVICE
        front = local_services[behind] if behind < LOCAL_SERVICES else None
        namespace = front.namespace if front else f"ns-{i % NAMESPACES}"
        local.append(
            wm.Workload(
                uid=f"Kubernetes//Pod/{namespace}/local-{i}",
                name=f"local-{i}",
                namespace=namespace,
                addresses=(ipaddress.IPv4Address(0x0A020000 + i),),
                tunnel_protocol=wm.TunnelProtocol.HBONE,
                service_account=front.name if front else f"local-{i}",
                node=NODE,
                canonical_name=front.name if front else f"local-{i}",
                canonical_revision="v1",
                workload_name=f"local-{i}",  # worst case: no two local pods share a deployment
                services={front.key: (wm.Port(SERVICE_PORT, TARGET_PORT),)} if front else {},
                cluster_id="Kubernetes",
                locality=wm.Locality("region-1", "zone-0"),
            )
        )
    store = StateStore()
    all_services = [*services, *local_services]
    store.apply(StateBatch(workloads=(*remote, *local), services=tuple(all_services)))
    return Mesh(store, remote, local, {s.key: s for s in all_services})


def _ip(w: wm.Workload) -> str:
    return str(w.addresses[0])


def _vip(s: wm.Service) -> str:
    return str(s.addresses[0].address)


class Agent:
    """AgentMetrics + ConnectionTelemetry + ServiceRouting, wired as nodeagent.app.build."""

    def __init__(self, mesh: Mesh, rng: random.Random) -> None:
        self.mesh = mesh
        self.rng = rng
        self.metrics = m = AgentMetrics()
        self.telemetry = ConnectionTelemetry(mesh.store, m)
        self.routing = ServiceRouting(mesh.store, OutlierDetector(time.monotonic), rng)
        self.pushes = dict.fromkeys(XDS_TYPES, 0)
        self.top_families: dict[str, int] = {}
        certs = {str(w.identity()): time.time() + 86400 for w in mesh.local}
        # The refreshers of app._refresh_metrics and _mesh_handlers, fed as their sources would.
        m.add_refresh(lambda: m.sync_proxy_lifecycle(started=len(mesh.local), stopped=0))
        m.add_refresh(
            lambda: m.sync_xds(
                connected=True,
                pushes_by_type=self.pushes,
                nacks_by_type={},
                terminations_by_reason={"Reconnect": 1},
                bytes_by_type={t: n * 4096 for t, n in self.pushes.items()},
            )
        )
        m.add_refresh(lambda: m.sync_certificates(certs))
        m.add_refresh(lambda: m.set_pod_counts({"ready": len(mesh.local)}))
        m.add_refresh(lambda: m.sync_capture_repairs(0, 0))
        m.add_refresh(
            lambda: m.sync_hbone_inbound(
                open_connections=0, refused_by_reason={}, timeouts_by_reason={}
            )
        )
        m.add_refresh(self.telemetry.flush)
        m.add_refresh(lambda: m.sync_traffic_clusters(self.routing.cluster_stats()))
        for t in XDS_TYPES:
            self.pushes[t] = 3
            m.xds_push(t)
        for _ in range(len(mesh.local)):
            m.observe_capture_setup(rng.uniform(0.01, 0.2))
            m.observe_cni_add("captured", rng.uniform(0.01, 0.3))

    def _run(self, conn: Conn) -> None:
        self.telemetry.opened(conn)
        conn.bytes_in, conn.bytes_out = self.rng.randint(100, 10_000), self.rng.randint(100, 10**6)
        if self.rng.random() < 0.05:  # a few tunnels that never opened
            conn.closed_reason, conn.bytes_in, conn.bytes_out = c.TUNNEL_OPEN_FAILED, 0, 0
        self.telemetry.closed(conn)

    def outbound(self, pod: wm.Workload, peer: wm.Workload, via_service: bool) -> None:
        remote, target, peer_identity = f"{_ip(peer)}:{TARGET_PORT}", "", peer.identity()
        plan = None
        if via_service:
            service = self.mesh.services[next(iter(peer.services))]
            dialled = service.addresses[0].address
            plan = self.routing.plan(pod, service, SERVICE_PORT, dialled, _ip(pod))
            pick = self.routing.next_pick(plan)
            assert pick is not None, plan.note
            self.routing.admit(plan, pick.target)
            remote = f"{_vip(service)}:{SERVICE_PORT}"
            target, peer_identity = f"{_ip(pick.workload)}:{TARGET_PORT}", pick.workload.identity()
        conn = Conn(
            workload=f"{pod.namespace}/{pod.name}",
            workload_uid=pod.uid,
            direction="outbound",
            protocol="HBONE",
            local=f"{_ip(pod)}:{self.rng.randint(32768, 60999)}",
            remote=remote,
            target=target or remote,
            source_identity=pod.identity(),
            destination_identity=peer_identity,
        )
        self._run(conn)
        if plan is not None:
            self.routing.release(plan)

    def inbound(self, pod: wm.Workload, peer: wm.Workload, via_service: bool) -> None:
        forwarded = ""
        if via_service and pod.services:
            forwarded = self.mesh.services[next(iter(pod.services))].hostname
        conn = Conn(
            workload=f"{pod.namespace}/{pod.name}",
            workload_uid=pod.uid,
            direction="inbound",
            protocol="HBONE",
            local=f"{_ip(pod)}:{TARGET_PORT}",
            remote=f"{_ip(peer)}:{self.rng.randint(32768, 60999)}",
            target=f"{_ip(pod)}:{TARGET_PORT}",
            source_identity=peer.identity(),
            destination_identity=pod.identity(),
            forwarded_host=forwarded,
        )
        self._run(conn)

    def traffic(self, active: int, peers: int, rounds: int) -> int:
        """Each of the first `active` local pods dials `peers` random remote workloads (every
        other one through its service's VIP) and is dialled by `peers` others; `rounds` times
        over the same peers (new connections, new ephemeral ports each round)."""
        chosen = [
            (
                pod,
                self.rng.sample(self.mesh.remote, peers),
                self.rng.sample(self.mesh.remote, peers),
            )
            for pod in self.mesh.local[:active]
        ]
        count = 0
        for _ in range(rounds):
            for pod, outs, ins in chosen:
                for k, peer in enumerate(outs):
                    self.outbound(pod, peer, via_service=k % 2 == 1)
                for k, peer in enumerate(ins):
                    self.inbound(pod, peer, via_service=k % 2 == 1)
                count += len(outs) + len(ins)
        return count


def parse(text: str) -> tuple[int, Counter[str]]:
    """(sample lines, sample lines per family as named by the `# TYPE` line before them)."""
    per_family: Counter[str] = Counter()
    family = ""
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            family = line.split()[2]
        elif line and not line.startswith("#"):
            per_family[family] += 1
    return sum(per_family.values()), per_family


def measure(
    name: str, n_remote: int, n_local: int, active: int, peers: int, replicas: int, rounds: int
) -> tuple[dict[str, object], Agent]:
    rng = random.Random(SEED)
    agent = Agent(build_mesh(n_remote, n_local, replicas), rng)
    connections = agent.traffic(active, peers, rounds)
    times, body = [], b""
    for _ in range(RENDERS):
        start = time.perf_counter()
        body = agent.metrics.exposition()
        times.append(time.perf_counter() - start)
    series, per_family = parse(body.decode())
    agent.top_families = dict(per_family.most_common(10))
    return {
        "scenario": name,
        "remote_workloads": n_remote,
        "remote_replicas": replicas,
        "local_pods": n_local,
        "active_local_pods": active,
        "peers_each_way": peers,
        "rounds": rounds,
        "connections": connections,
        "series": series,
        "bytes": len(body),
        "render_ms_median": round(statistics.median(times) * 1000, 2),
        "top_families": agent.top_families,
    }, agent


def edge_kinds(agent: Agent) -> dict[str, int]:
    """istio_tcp_connections_opened_total series by reporter and whether a service is named."""
    reporter = TCP_TRAFFIC_LABELS.index("reporter")
    service = TCP_TRAFFIC_LABELS.index("destination_service")
    kinds: Counter[str] = Counter()
    for family in agent.metrics.registry.collect():
        if family.name == "istio_tcp_connections_opened":
            for sample in family.samples:
                values = [sample.labels[k] for k in TCP_TRAFFIC_LABELS]
                via = "no service" if values[service] == "unknown" else "service"
                kinds[f"{values[reporter]}, {via}"] += 1
    return dict(sorted(kinds.items()))


def label_spread(agent: Agent) -> dict[str, int]:
    """Distinct values per label over every series in the registry."""
    values: dict[str, set[str]] = {}
    for family in agent.metrics.registry.collect():
        for sample in family.samples:
            for label, value in sample.labels.items():
                values.setdefault(label, set()).add(value)
    return {label: len(v) for label, v in sorted(values.items())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--remote", type=int, default=1000, help="workloads on other nodes")
    parser.add_argument("--local", type=int, default=50, help="pods on this node")
    parser.add_argument("--peers", type=int, default=20, help="random peers each way per pod")
    args = parser.parse_args()
    r, n, p = args.remote, args.local, args.peers

    runs = [
        ("idle", r, n, 0, p, 1, 1),
        ("5 local pods active", r, n, 5, p, 1, 1),
        (f"{n} local pods active", r, n, n, p, 1, 1),
        (f"{n} local pods active, same peers x3", r, n, n, p, 1, 3),
        (f"{n} local pods active, 2x peers", r, n, n, 2 * p, 1, 1),
        (f"{n} local pods active, 10 replicas/deploy", r, n, n, p, 10, 1),
        (f"{n} local pods active, 10 replicas/deploy, x3", r, n, n, p, 10, 3),
    ]
    results, tops, full = [], [], None
    for name, *params in runs:
        result, agent = measure(name, *params)
        results.append(result)
        tops.append(agent.top_families)
        if name == f"{n} local pods active":
            full = agent
        print(
            f"{name:44} conns={result['connections']:6} series={result['series']:6} "
            f"bytes={result['bytes']:9} render={result['render_ms_median']} ms"
        )
    assert full is not None
    idle, five, all_ = (int(str(x["series"])) for x in results[:3])
    tcp = "istio_tcp_connections_opened_total"
    tcp_series = {str(x["scenario"]): tops[i].get(tcp, 0) for i, x in enumerate(results)}
    print(f"growth per active local pod (5 -> {n}): {(all_ - five) / (n - 5):.1f} series")
    edges = n * 2 * p
    print(f"series per (local pod, peer, direction) edge: {(all_ - idle) / edges:.2f}")
    print(f"top families ({n} local pods active):")
    for family, count in tops[2].items():
        print(f"  {count:6}  {family}")
    kinds = edge_kinds(full)
    print(f"istio_tcp_connections_opened_total series by kind ({n} pods active): {kinds}")
    spread = label_spread(full)
    grows = {k: v for k, v in spread.items() if v > 10}
    print(f"labels with more than 10 distinct values ({n} pods active): {grows}")
    per_connection = [
        label
        for family in full.metrics.registry.collect()
        for sample in family.samples
        for label, value in sample.labels.items()
        if _PORT_OR_IP.search(value)
    ]
    print(f"labels holding an IP or port value: {sorted(set(per_connection)) or 'none'}")
    emit(
        {
            "runs": results,
            "istio_tcp_connections_opened_series": tcp_series,
            "series_per_active_local_pod": round((all_ - five) / (n - 5), 1),
            "opened_series_by_kind": kinds,
            "label_distinct_values": spread,
            "traffic_labels": list(TCP_TRAFFIC_LABELS),
            "labels_with_ip_or_port": sorted(set(per_connection)),
        },
        indent=2,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
