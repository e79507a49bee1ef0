"""The waypoint routes HTTP per request (issue 18, points 2 and 3), in a 2x2 sandbox with
`--waypoint`: the demo namespace is labelled `istio.io/use-waypoint: waypoint`, so every
connection to a demo service goes from the caller's agent over HBONE to the waypoint pod
(10.10.1.250 on node1), which reads the HTTP and picks an endpoint per request.

backend: v1 is node1-pod2, v2 is node2-pod2 (the demo app answers with its pod's name,
the path and Host it got). The caller is node1-pod1.
"""

from __future__ import annotations

import json
import re
import subprocess
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest

from nodeagent.sandbox.processes import NSENTER

from .e2e_harness import Capture, Mesh, _cli, sandbox, wait_until

pytestmark = pytest.mark.timeout(300)

CALLER = "node1-pod1"
V1, V2 = "node1-pod2", "node2-pod2"
BACKEND = "10.96.0.10:8080"
WAYPOINT_IP = "10.10.1.250"
CALLER_IP = "10.10.1.11"

ROUTES = textwrap.dedent(
    """\
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: backend, namespace: demo}
    spec:
      host: backend
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
      - name: ios
        match: [{headers: {x-user: {exact: ios}}}]
        route: [{destination: {host: backend, subset: v2}}]
      - name: api
        match: [{uri: {prefix: /api/}}]
        rewrite: {uri: /rewritten/, authority: backend.internal}
        route: [{destination: {host: backend, subset: v1}}]
      - name: items
        match: [{uri: {regex: "/items/[0-9]+"}}]
        route: [{destination: {host: backend, subset: v2}}]
      - name: moved
        match: [{uri: {exact: /old}}]
        redirect: {uri: /new}
      - name: split
        match: [{uri: {prefix: /split}}]
        route:
        - {destination: {host: backend, subset: v1}, weight: 80}
        - {destination: {host: backend, subset: v2}, weight: 20}
      - name: default
        match: [{uri: {prefix: /}}]
        route: [{destination: {host: backend, subset: v1}}]
    """
)

# Requests on ONE keep-alive connection; prints each answer's status, pod, path, host and
# Location. argv: host port count path [header=value ...]
KEEPALIVE_CLIENT = textwrap.dedent(
    """\
    import http.client, json, sys
    host, port, count, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    headers = dict(a.split("=", 1) for a in sys.argv[5:])
    conn = http.client.HTTPConnection(host, port, timeout=10)
    out = []
    for _ in range(count):
        conn.request("GET", path, headers=headers)
        r = conn.getresponse()
        body = r.read()
        item = {"status": r.status, "location": r.getheader("location")}
        if r.status == 200:
            answer = json.loads(body)
            item.update(pod=answer["pod"], path=answer["path"], host=answer["host"])
        out.append(item)
    print(json.dumps({"answers": out, "sock": conn.sock.getsockname()[1] if conn.sock else 0}))
    """
)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with sandbox(tmp_path_factory.mktemp("waypoint-http"), "iptables", waypoint=True) as running:
        running.apply(ROUTES)
        yield running


def requests(mesh: Mesh, count: int, path: str, *headers: str) -> list[dict[str, Any]]:
    host, port = BACKEND.split(":")
    done = mesh.python_in(
        CALLER, KEEPALIVE_CLIENT, host, port, str(count), path, *headers, timeout=120
    )
    assert done.returncode == 0, done.stderr
    answers: list[dict[str, Any]] = json.loads(done.stdout)["answers"]
    return answers


def waypoint_metrics(mesh: Mesh) -> str:
    """The waypoint's /metrics, read inside its own namespace."""
    result = subprocess.run(
        [NSENTER, f"--net=/var/run/netns/{mesh.name}-node1-waypoint", "--",
         "curl", "-sS", "--max-time", "5", "http://127.0.0.1:15020/metrics"],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def routes_ready(mesh: Mesh) -> bool:
    answers = requests(mesh, 1, "/", "x-user=ios")
    return answers[0].get("pod") == V2


def test_status_shows_the_waypoint(mesh: Mesh) -> None:
    status = _cli("sandbox", "status", mesh.name)
    assert status.returncode == 0, status.stderr
    assert f"waypoint demo/waypoint at {WAYPOINT_IP} on node1 (pid " in status.stdout


def test_the_callers_agent_tunnels_to_the_waypoint_and_the_waypoint_counts_the_request(
    mesh: Mesh,
) -> None:
    wait_until("the routes at the waypoint", lambda: routes_ready(mesh))
    capture = Capture(mesh.netns("node1"), mesh.tmp / "to-waypoint.pcap", "tcp and port 15008")
    try:
        answers = requests(mesh, 5, "/hello")
        time.sleep(1.0)  # let tcpdump write what it has seen before it is stopped
    finally:
        segments = capture.stop()
    assert [a["status"] for a in answers] == [200] * 5
    assert {a["pod"] for a in answers} == {V1}
    # The caller's HBONE (pooled: maybe opened before the capture) carries the requests:
    # every segment it sends to a 15008 goes to the waypoint, none to a backend pod.
    sent = [s for s in segments if s.src[0] == CALLER_IP and s.dst[1] == 15008 and s.payload]
    assert sent, f"no HBONE bytes from the caller seen ({capture.stats})"
    assert {s.dst[0] for s in sent} == {WAYPOINT_IP}, {s.dst for s in sent}
    # ... and the waypoint tunnels on to v1 itself (its pooled tunnel to v2, from the
    # routes_ready calls, may carry keep-alive pings meanwhile).
    onward = {s.dst for s in segments if s.src[0] == WAYPOINT_IP and s.dst[1] == 15008}
    assert ("10.10.1.12", 15008) in onward, onward
    metrics = waypoint_metrics(mesh)
    line = next(
        (
            ln
            for ln in metrics.splitlines()
            if ln.startswith("istio_requests_total{")
            and 'reporter="waypoint"' in ln
            and 'destination_service_name="backend"' in ln
            and 'response_code="200"' in ln
            and 'destination_version="v1"' in ln
            and 'request_protocol="http"' in ln
            and 'source_workload="node1-pod1"' in ln
        ),
        None,
    )
    assert line is not None, metrics
    assert float(line.rsplit(" ", 1)[1]) >= 5
    assert "istio_request_duration_milliseconds_bucket{" in metrics


def test_header_match_sends_every_ios_request_to_v2_and_no_other(mesh: Mesh) -> None:
    wait_until("the routes at the waypoint", lambda: routes_ready(mesh))
    ios = requests(mesh, 100, "/", "x-user=ios")
    other = requests(mesh, 100, "/", "x-user=android")
    assert {a["pod"] for a in ios} == {V2}
    assert {a["pod"] for a in other} == {V1}


def test_an_80_20_split_is_per_request_on_one_keepalive_connection(mesh: Mesh) -> None:
    wait_until("the routes at the waypoint", lambda: routes_ready(mesh))
    n = 2000
    answers = requests(mesh, n, "/split")
    assert all(a["status"] == 200 for a in answers)
    v2 = sum(a["pod"] == V2 for a in answers)
    # Binomial(2000, 0.2): mean 400, sd 17.9; the 99.9% interval is +-3.29 sd.
    assert abs(v2 - 400) <= 3.29 * 17.9, v2
    assert sum(a["pod"] == V1 for a in answers) == n - v2


def test_prefix_rewrite_regex_and_redirect(mesh: Mesh) -> None:
    wait_until("the routes at the waypoint", lambda: routes_ready(mesh))
    (api,) = requests(mesh, 1, "/api/orders?id=7")
    assert (api["pod"], api["path"], api["host"]) == (
        V1,
        "/rewritten/orders?id=7",
        "backend.internal",
    )
    (item,) = requests(mesh, 1, "/items/42")
    assert item["pod"] == V2
    (not_item,) = requests(mesh, 1, "/items/4x")
    assert not_item["pod"] == V1
    (moved,) = requests(mesh, 1, "/old")
    assert moved["status"] == 301
    assert re.fullmatch(r"http://[^/]+/new", moved["location"] or ""), moved
