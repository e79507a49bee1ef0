"""`nodeagent routes --sandbox NAME --waypoint` (issue 19, item 7): the waypoint's own view of
the http routes it applies (timeout, retry policy, fault, mirrors), its subsets' http pool and
outlier settings, and the endpoints its outlier detection ejected, read from the waypoint's
:15020 inside its pod namespace. backend v2 is node2-pod2; the caller is node1-pod1."""

from __future__ import annotations

import json
import os
import signal
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

from .e2e_harness import Mesh, _cli, sandbox, service_routes, wait_until

pytestmark = pytest.mark.timeout(300)

CALLER, V2 = "node1-pod1", "node2-pod2"
ROUTES = textwrap.dedent(
    """\
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: backend, namespace: demo}
    spec:
      host: backend
      trafficPolicy:
        connectionPool: {http: {http1MaxPendingRequests: 7, maxRetries: 3}}
        outlierDetection: {consecutive5xxErrors: 1, baseEjectionTime: 60s, maxEjectionPercent: 100}
      subsets:
      - {name: v1, labels: {version: v1}}
      - {name: v2, labels: {version: v2}}
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: backend, namespace: demo}
    spec:
      hosts: [backend]
      http:
      - name: v2
        match: [{uri: {prefix: /v2}}]
        route: [{destination: {host: backend, subset: v2}}]
        timeout: 4s
        retries: {attempts: 1, retryOn: "connect-failure,503"}
      - route: [{destination: {host: backend, subset: v1}}]
        fault: {delay: {fixedDelay: 10ms, percentage: {value: 5}}}
        mirrors: [{destination: {host: echo}, percentage: {value: 20}}]
    """
)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with sandbox(tmp_path_factory.mktemp("waypoint-routes"), "iptables", waypoint=True) as running:
        running.apply(ROUTES)
        yield running


def waypoint_routes(mesh: Mesh) -> dict[str, Any]:
    done = _cli("routes", "backend", "--sandbox", mesh.name, "--waypoint", "-o", "json")
    assert done.returncode == 0, done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def applied(mesh: Mesh) -> bool:
    backend = service_routes(mesh, "backend", waypoint=True)
    ports = [p for s in (backend or {}).get("subsets", []) for p in s["ports"]]
    return (
        backend is not None
        and backend["virtualService"] == "demo/backend"
        and len(backend["httpRoutes"]) == 2
        and backend["destinationRule"] == "demo/backend"  # a separate xDS message
        and bool(ports)
        and all((p["httpPool"] or {}).get("http1MaxPendingRequests") == 7 for p in ports)
    )


def test_the_waypoint_shows_its_http_routes_pools_and_ejections(mesh: Mesh) -> None:
    wait_until("the routes at the waypoint", lambda: applied(mesh))
    text = _cli("routes", "--sandbox", mesh.name, "--waypoint", "backend")
    assert text.returncode == 0, text.stderr
    flat = " ".join(text.stdout.split())
    assert "timeout 4s; retries: 1 on connect-failure, 503" in flat
    assert "no timeout; retries default: 2 on connect-failure, refused-stream," in flat
    assert "fault delay 0.01s at 5%; mirror echo at 20%" in flat
    assert "http maxPendingRequests 7, maxRetries 3" in flat
    assert "outlier consecutive5xxErrors 1" in flat and "baseEjectionTime 60s" in flat
    assert "behind waypoint" not in flat  # the waypoint applies them itself

    # v2's app dies: the waypoint's request to it fails (503), and its outlier detection ejects.
    os.kill(mesh.pod(V2)["app_pid"], signal.SIGKILL)
    mesh.curl(CALLER, "http://10.96.0.10:8080/v2")

    def ejected() -> dict[str, Any] | None:
        [backend] = waypoint_routes(mesh)["services"]
        v2 = next(s for s in backend["subsets"] if s["name"] == "v2")
        return next((e for e in v2["endpoints"] if e["ejectedSeconds"] is not None), None)

    def eject_once() -> bool:
        mesh.curl(CALLER, "http://10.96.0.10:8080/v2")
        return ejected() is not None

    wait_until("v2 ejected at the waypoint", eject_once)
    endpoint = ejected()
    assert endpoint is not None
    assert endpoint["address"].startswith("10.10.2.12:") and endpoint["ejections"] >= 1
    assert 0 < endpoint["ejectedSeconds"] <= 60
    text = _cli("routes", "backend", "--sandbox", mesh.name, "--waypoint")
    assert "s left (1x)" in text.stdout or "s left (2x)" in text.stdout, text.stdout
    # The caller's agent sends to the waypoint: it ejects nothing of its own.
    agent = _cli("routes", "backend", "--sandbox", mesh.name, "--node", "node1", "-o", "json")
    assert agent.returncode == 0, agent.stderr
    assert json.loads(agent.stdout)["proxy"] == "agent"
