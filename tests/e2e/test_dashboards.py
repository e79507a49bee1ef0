"""Istio's dashboards and Kiali have their data in a real Prometheus (issue 22, items 3-4).

A 2x2 sandbox with `--prometheus` (Debian's Prometheus in the underlay namespace,
scraping each agent every second as Istio's addon job `kubernetes-pods` would) carries:

* direct pod calls: node1-pod1 (frontend) -> node2-pod2 (backend) at 10.10.2.12:8080;
* calls through the backend service's VIP: node2-pod1 (frontend) -> 10.96.0.10:8080
  (another caller than the direct one, so every connection of its edge names the service
  on both sides);
* echo bytes: node1-pod1 -> the echo service's VIP 10.96.0.11:9000, a known number of
  bytes each way.

Then Prometheus's HTTP API (`/api/v1/query`, from inside the underlay namespace) is
asked, with queries written for this test, for what each dashboard family reads: the
Workload and Service dashboards' TCP series per workload and per service for both
reporters, `mutual_tls`, Kiali's frontend -> backend edge through the service with the
same counts from both reporters (and, for echo, exactly the bytes sent: nothing counted
twice), and the ztunnel dashboard's series. The agents' pods are `nodeagent-<node>`, not
the `ztunnel-*` the ztunnel dashboard filters on (docs/observability.md), so its queries
here select them by the pod label `app="ztunnel"` instead.

With a waypoint (second test, its own sandbox), `istio_requests_total` and the duration
histogram of the backend service as the waypoint reports them.

The query logic is plain functions of a `query` callable, so it can be run against any
Prometheus (the failing-before evidence of issue 22 ran it against the code before it).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nodeagent.sandbox.processes import NSENTER

from .e2e_harness import BACKEND_VIP, ECHO_VIP, Mesh, sandbox, wait_until

pytestmark = pytest.mark.timeout(300)

TRAFFIC_CLIENT = str(Path(__file__).with_name("traffic_client.py"))
BACKEND_SERVICE = "backend.demo.svc.cluster.local"
ECHO_SERVICE = "echo.demo.svc.cluster.local"
DIRECT_CALLER, DIRECT_TARGET, DIRECT_IP = "node1-pod1", "node2-pod2", "10.10.2.12"
VIP_CALLER = "node2-pod1"
ECHO_CALLER = "node1-pod1"
# Per round; two rounds with a scrape between, so the counters exist before they grow
# and the dashboards' rate()/increase() see the second round.
ROUNDS = 2
DIRECT_CALLS, VIP_CALLS = 6, 10
ECHO_CONNECTIONS, ECHO_BYTES = 5, 1000  # bytes per connection, each way
AGENTS = 'namespace="istio-system", app="ztunnel"'  # the DaemonSet's pods, as scraped
TCP_METRICS = (
    "istio_tcp_sent_bytes_total",
    "istio_tcp_received_bytes_total",
    "istio_tcp_connections_opened_total",
)
SETTLE = 20.0  # seconds for the last scrapes after the traffic to agree


@dataclass(frozen=True)
class Sample:
    labels: dict[str, str]
    value: float


Query = Callable[[str], list[Sample]]


@dataclass(frozen=True)
class Prometheus:
    """Prometheus's HTTP API, asked from inside the sandbox's underlay namespace."""

    netns: str
    address: str

    def query(self, expr: str) -> list[Sample]:
        result = subprocess.run(
            [NSENTER, f"--net=/var/run/netns/{self.netns}", "--",
             "curl", "-sS", "--max-time", "5", "-G", "--data-urlencode", f"query={expr}",
             f"http://{self.address}/api/v1/query"],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
        assert result.returncode == 0, f"query {expr!r}: {result.stderr.strip()}"
        body = json.loads(result.stdout)
        assert body.get("status") == "success", f"query {expr!r}: {body}"
        return [
            Sample(labels=r["metric"], value=float(r["value"][1])) for r in body["data"]["result"]
        ]


def by(samples: list[Sample], *keys: str) -> dict[tuple[str, ...], float]:
    return {tuple(s.labels.get(k, "") for k in keys): s.value for s in samples}


@dataclass
class Findings:
    """What the queries answered (numbers, for the report) and what was wrong."""

    numbers: dict[str, object] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(what)


# --- traffic ------------------------------------------------------------------------------


def drive_traffic(mesh: Mesh) -> None:
    """Direct pod calls, calls through the backend VIP, echo bytes through the echo VIP;
    every connection closed when this returns."""
    for src, host, count in ((DIRECT_CALLER, DIRECT_IP, DIRECT_CALLS),
                             (VIP_CALLER, BACKEND_VIP, VIP_CALLS)):  # fmt: skip
        result = mesh.run_in(
            src, [sys.executable, TRAFFIC_CLIENT, "calls", host, "8080", str(count), "1"], 60
        )
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        assert answer["failures"] == 0, f"{src} -> {host}: {answer}"
    for i in range(ECHO_CONNECTIONS):
        payload = mesh.tmp / f"echo-{i}"
        payload.write_bytes(bytes([65 + i]) * ECHO_BYTES)
        result = mesh.run_in(
            ECHO_CALLER, [sys.executable, TRAFFIC_CLIENT, "echo", ECHO_VIP, "9000", str(payload)]
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"ok": True, "sent": ECHO_BYTES, "received": ECHO_BYTES}


def await_scrapes(query: Query, targets: int, after: float, timeout: float = 30.0) -> None:
    """Until each of the `targets` pods has been scraped, and was up, after `after` (wall
    clock). Prometheus scrapes a target first a few seconds after it starts, each target
    at its own moment: a target not scraped yet has no `up` at all."""
    deadline = time.monotonic() + timeout
    while True:
        ups = query('up{job="kubernetes-pods"}')
        stamps = query('timestamp(up{job="kubernetes-pods"})')
        scraped = len(ups) == targets and all(s.value == 1 for s in ups)
        if scraped and min(s.value for s in stamps) > after:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"Prometheus did not scrape every target after the traffic: {ups}")
        time.sleep(0.5)


def edge_counts(
    query: Query, metric: str, service: str, source: str
) -> dict[tuple[str, ...], float]:
    """Per (reporter, source_workload, destination_workload): `metric` of the connections
    from workload `source` to `service` over mTLS (Kiali's edge, keyed as its
    de-duplication is). A frontend's calls to a backend pod's own IP are another edge: the
    source side names no service for them (`unknown`, as ztunnel), the destination side
    the one whose port they hit."""
    expr = (
        f"sum by (reporter, source_workload, destination_workload) ({metric}{{"
        f'source_workload="{source}", source_canonical_service="frontend", '
        f'destination_service="{service}", connection_security_policy="mutual_tls"}})'
    )
    return by(query(expr), "reporter", "source_workload", "destination_workload")


def settle_edges(query: Query, timeout: float = SETTLE) -> None:
    """Until both reporters give the same numbers for the edges (each agent is scraped at
    its own moment and records a connection when it closes), or `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        agree = True
        for metric in TCP_METRICS:
            counts = edge_counts(query, metric, BACKEND_SERVICE, VIP_CALLER)
            pairs = {k[1:] for k in counts}
            agree &= bool(pairs) and all(
                counts.get(("source", *p)) == counts.get(("destination", *p)) for p in pairs
            )
        if agree:
            return
        time.sleep(1.0)


# --- what each dashboard family reads ------------------------------------------------------


def check_workload_and_service_dashboards(query: Query, found: Findings) -> None:
    """Workload dashboard (per destination workload) and Service dashboard (per service):
    every TCP series, from both reporters."""
    for metric in TCP_METRICS:
        per_workload = by(
            query(
                f'sum by (reporter) ({metric}{{destination_workload="{DIRECT_TARGET}", '
                'destination_workload_namespace="demo"})'
            ),
            "reporter",
        )
        found.numbers[f"workload {DIRECT_TARGET} {metric}"] = per_workload
        for service in (BACKEND_SERVICE, ECHO_SERVICE):
            per_service = by(
                query(f'sum by (reporter) ({metric}{{destination_service="{service}"}})'),
                "reporter",
            )
            found.numbers[f"service {service} {metric}"] = per_service
            for reporter in ("source", "destination"):
                found.check(
                    per_service.get((reporter,), 0) > 0,
                    f"Service dashboard: no {metric} for {service} reported by {reporter}",
                )
        for reporter in ("source", "destination"):
            found.check(
                per_workload.get((reporter,), 0) > 0,
                f"Workload dashboard: no {metric} for {DIRECT_TARGET} reported by {reporter}",
            )


def check_mutual_tls(query: Query, found: Findings) -> None:
    mtls = by(
        query(
            "sum by (reporter, connection_security_policy) (istio_tcp_connections_opened_total"
            '{destination_workload_namespace="demo"})'
        ),
        "reporter",
        "connection_security_policy",
    )
    found.numbers["connections by reporter and security policy"] = mtls
    for reporter in ("source", "destination"):
        found.check(
            mtls.get((reporter, "mutual_tls"), 0) > 0,
            f"no mutual_tls connection reported by {reporter}",
        )
    found.check(
        {policy for _, policy in mtls} == {"mutual_tls"},
        f"connections not reported as mutual_tls: {mtls}",
    )


def check_destination_names_the_service(query: Query, found: Findings) -> None:
    """The Service dashboard's default (reporter=destination) and Kiali's de-duplication
    need the service on the destination side too."""
    services = by(
        query(
            "sum by (destination_service) (istio_tcp_connections_opened_total"
            '{reporter="destination", destination_workload_namespace="demo"})'
        ),
        "destination_service",
    )
    found.numbers["destination-reported connections by destination_service"] = services
    found.check(("unknown",) not in services, f"destination_service unknown inbound: {services}")
    found.check(
        {s for (s,) in services} == {BACKEND_SERVICE, ECHO_SERVICE},
        f"inbound services {sorted(services)}, expected backend and echo",
    )


def check_edges(query: Query, found: Findings) -> None:
    """Kiali's frontend -> backend edge through the service: both reporters, mTLS, the
    same counts on each side; and the echo bytes exactly as sent, each way."""
    for metric in TCP_METRICS:
        counts = edge_counts(query, metric, BACKEND_SERVICE, VIP_CALLER)
        found.numbers[f"edge frontend->backend {metric}"] = counts
        pairs = {k[1:] for k in counts}
        found.check(
            any(p[0] == VIP_CALLER for p in pairs),
            f"{metric}: no frontend -> backend edge from {VIP_CALLER} with mutual_tls",
        )
        for pair in sorted(pairs):
            src, dst = counts.get(("source", *pair)), counts.get(("destination", *pair))
            found.check(
                src is not None and src == dst,
                f"{metric} edge {pair[0]} -> {pair[1]} via backend: source {src}, "
                f"destination {dst}",
            )
        opened = sum(v for k, v in counts.items() if k[0] == "source" and k[1] == VIP_CALLER)
        if metric == "istio_tcp_connections_opened_total":
            made = ROUNDS * VIP_CALLS
            found.check(opened == made, f"{VIP_CALLER} opened {opened}, made {made}")
    for metric in TCP_METRICS:
        counts = edge_counts(query, metric, ECHO_SERVICE, ECHO_CALLER)
        totals = {
            r: sum(v for k, v in counts.items() if k[0] == r) for r in ("source", "destination")
        }
        found.numbers[f"echo {ECHO_CALLER} {metric}"] = totals
        per_connection = 1 if metric.endswith("opened_total") else ECHO_BYTES
        want = ROUNDS * ECHO_CONNECTIONS * per_connection
        found.check(
            totals == {"source": want, "destination": want},
            f"echo {metric}: {totals}, sent {want} (once per reporter)",
        )


def check_mesh_dashboard(query: Query, found: Findings) -> None:
    """The Mesh dashboard's TCP workloads table."""
    rows = by(
        query(
            "sum by (destination_workload, destination_workload_namespace, destination_service) "
            '(increase(istio_tcp_received_bytes_total{reporter=~"source|waypoint"}[5m]))'
        ),
        "destination_workload",
        "destination_service",
    )
    found.numbers["mesh dashboard TCP rows (increase 5m)"] = rows
    found.check(
        any(svc == BACKEND_SERVICE and v > 0 for (_, svc), v in rows.items()),
        f"Mesh dashboard: no TCP row for {BACKEND_SERVICE}: {rows}",
    )


def check_ztunnel_dashboard(query: Query, found: Findings, agents: set[str]) -> None:
    """The ztunnel dashboard's series, per agent pod (selected by `app="ztunnel"`)."""
    build = by(query('sum by (tag) (istio_build{component="ztunnel"})'), "tag")
    found.numbers['istio_build{component="ztunnel"} by tag'] = build
    found.check(sum(build.values()) == len(agents), f"istio_build ztunnel: {build}")

    def per_pod(expr: str) -> dict[str, float]:
        return {k[0]: v for k, v in by(query(expr), "pod").items()}

    panels = {
        "istio_tcp_sockets_open": f"sum by (pod) (istio_tcp_sockets_open{{{AGENTS}}})",
        "istio_xds_message_total": f"sum by (pod) (istio_xds_message_total{{{AGENTS}}})",
        "workload_manager_active_proxy_count": (
            f"sum by (pod) (workload_manager_active_proxy_count{{{AGENTS}}})"
        ),
        "workload_manager_pending_proxy_count": (
            f"sum by (pod) (workload_manager_pending_proxy_count{{{AGENTS}}})"
        ),
        "process_open_fds": f"sum by (pod) (process_open_fds{{{AGENTS}}})",
        "process_cpu_seconds_total": f"sum by (pod) (process_cpu_seconds_total{{{AGENTS}}})",
        "istio_tcp_connections_opened_total (increase 5m)": (
            f"sum by (pod) (increase(istio_tcp_connections_opened_total{{{AGENTS}}}[5m]))"
        ),
        "istio_tcp_sent_bytes_total (increase 5m)": (
            f"sum by (pod) (increase(istio_tcp_sent_bytes_total{{{AGENTS}}}[5m]))"
        ),
    }
    for name, expr in panels.items():
        values = per_pod(expr)
        found.numbers[name] = values
        found.check(set(values) == agents, f"ztunnel dashboard {name}: {values}")
    for name in ("istio_xds_message_total", "process_open_fds", "process_cpu_seconds_total"):
        found.check(
            all(v > 0 for v in found.numbers[name].values()),  # type: ignore[attr-defined]
            f"{name} is 0",
        )
    active = found.numbers["workload_manager_active_proxy_count"]
    found.check(active == dict.fromkeys(agents, 2.0), f"active proxies {active}, 2 pods per node")
    urls = by(query(f"sum by (url) (istio_xds_message_total{{{AGENTS}}})"), "url")
    found.numbers["istio_xds_message_total by url"] = urls
    found.check(
        any(u.endswith("istio.workload.Address") for (u,) in urls),
        f"no Address xDS messages: {urls}",
    )
    # Only after a stream ended: absent in a sandbox whose agents never lost theirs.
    found.numbers["istio_xds_connection_terminations_total"] = by(
        query(f"sum by (pod, reason) (istio_xds_connection_terminations_total{{{AGENTS}}})"),
        "pod",
        "reason",
    )


def check_all(query: Query, agents: set[str]) -> Findings:
    found = Findings()
    settle_edges(query)
    check_workload_and_service_dashboards(query, found)
    check_mutual_tls(query, found)
    check_destination_names_the_service(query, found)
    check_edges(query, found)
    check_mesh_dashboard(query, found)
    check_ztunnel_dashboard(query, found, agents)
    return found


def report(found: Findings) -> str:
    return "\n".join(f"  {k}: {v}" for k, v in found.numbers.items())


# --- the tests ------------------------------------------------------------------------------


def prometheus_of(mesh: Mesh) -> Prometheus:
    prom = mesh.status.get("prometheus")
    assert prom, "the sandbox was made without --prometheus"
    return Prometheus(mesh.status["underlay"]["netns"], str(prom["address"]))


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with sandbox(tmp_path_factory.mktemp("dashboards"), "iptables", prometheus=True) as running:
        yield running


def test_every_dashboard_family_has_its_data_in_prometheus(mesh: Mesh) -> None:
    prom = prometheus_of(mesh)
    agents = {f"nodeagent-{n['name']}" for n in mesh.status["nodes"]}
    for _ in range(ROUNDS):
        drive_traffic(mesh)
        await_scrapes(prom.query, len(agents), after=time.time() + 1.0)
    found = check_all(prom.query, agents)
    print(report(found))
    assert not found.failures, "\n".join(found.failures) + "\n" + report(found)


def test_prometheus_goes_with_the_sandbox(mesh: Mesh) -> None:
    prom = mesh.status["prometheus"]
    assert prom["pid"] is not None and prom["netns"] == mesh.status["underlay"]["netns"]
    assert Path(prom["config"]).is_file()
    assert prom["config"].startswith(str(Path(prom["log"]).parents[1]))  # the state dir


# --- behind a waypoint --------------------------------------------------------------------


def test_waypoint_requests_and_durations_for_the_backend_service(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    with sandbox(
        tmp_path_factory.mktemp("dashboards-waypoint"), "iptables", waypoint=True, prometheus=True
    ) as running:
        prom = prometheus_of(running)

        # The demo namespace uses the waypoint: HTTP to the backend's VIP goes through it,
        # once the agents know the waypoint (a second or two after `up`: until then the
        # caller's connection is reset). That first answered call is a request too.
        def answered() -> bool:
            result = running.run_in(
                VIP_CALLER, [sys.executable, TRAFFIC_CLIENT, "calls", BACKEND_VIP, "8080", "1"]
            )
            return result.returncode == 0 and json.loads(result.stdout)["failures"] == 0

        wait_until("a call through the waypoint", answered, timeout=30)
        for _ in range(ROUNDS):
            result = running.run_in(
                VIP_CALLER,
                [sys.executable, TRAFFIC_CLIENT, "calls", BACKEND_VIP, "8080", "6", "1"],
            )
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout)["failures"] == 0, result.stdout
            await_scrapes(prom.query, len(running.status["nodes"]) + 1, after=time.time() + 1.0)
        service = f'destination_service="{BACKEND_SERVICE}"'
        requests = by(
            prom.query(f"sum by (reporter, response_code) (istio_requests_total{{{service}}})"),
            "reporter",
            "response_code",
        )
        p50 = prom.query(
            "histogram_quantile(0.5, sum by (le) (rate(istio_request_duration_milliseconds_bucket"
            f'{{reporter=~"source|waypoint", {service}}}[5m])))'
        )
        buckets = prom.query(
            f'sum(istio_request_duration_milliseconds_count{{reporter="waypoint", {service}}})'
        )
        print(f"  istio_requests_total by reporter, code: {requests}")
        print(
            f"  p50 ms: {[s.value for s in p50]}, durations counted: {[s.value for s in buckets]}"
        )
        assert requests.get(("waypoint", "200")) == 1 + ROUNDS * 6, requests
        assert [s.value for s in buckets] == [1 + ROUNDS * 6]
        assert p50 and p50[0].value > 0
