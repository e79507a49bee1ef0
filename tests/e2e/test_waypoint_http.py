"""The waypoint routes HTTP per request (issue 18, points 2 and 3), in a 2x2 sandbox with
`--waypoint`: the demo namespace is labelled `istio.io/use-waypoint: waypoint`, so every
connection to a demo service goes from the caller's agent over HBONE to the waypoint pod
(10.10.1.250 on node1), which reads the HTTP and picks an endpoint per request.

backend: v1 is node1-pod2, v2 is node2-pod2 (the demo app answers with its pod's name,
the path and Host it got). The caller is node1-pod1.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeagent.cli.interpreter import DATA_PATH_ENVIRONMENT
from nodeagent.sandbox.processes import NSENTER

from .e2e_harness import Capture, Mesh, _cli, sandbox, service_routes, wait_until

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


@pytest.fixture(scope="module", params=["iptables", "ebpf"])
def mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mesh]:
    # Both capture backends: the caller's agent must send to the waypoint either way.
    tmp = tmp_path_factory.mktemp(f"waypoint-http-{request.param}")
    with sandbox(tmp, request.param, waypoint=True) as running:
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


def routes_ready(mesh: Mesh) -> bool:
    """The waypoint holds ROUTES (both resources: separate xDS messages) and the caller's
    agent sends the backend's connections to it."""
    at_waypoint = service_routes(mesh, "backend", waypoint=True)
    if at_waypoint is None or (
        at_waypoint["virtualService"],
        at_waypoint["destinationRule"],
        len(at_waypoint["httpRoutes"]),
    ) != ("demo/backend", "demo/backend", 6):
        return False
    at_agent = service_routes(mesh, "backend", node="node1")
    return at_agent is not None and bool(at_agent["waypoint"])


def test_status_shows_the_waypoint(mesh: Mesh) -> None:
    status = _cli("sandbox", "status", mesh.name)
    assert status.returncode == 0, status.stderr
    assert f"waypoint demo/waypoint at {WAYPOINT_IP} on node1 (pid " in status.stdout


def test_the_waypoint_runs_with_the_data_path_interpreter_settings(mesh: Mesh) -> None:
    # Like the agent (nodeagent.cli.interpreter): `waypoint` executes itself again with
    # PYTHONMALLOC=malloc (an operator's value wins), so the trim after a burst gives the
    # freed heap back, keeping the PID the sandbox started; its log names the allocator.
    status = _cli("sandbox", "status", mesh.name, "-o", "json")
    assert status.returncode == 0, status.stderr
    waypoint = json.loads(status.stdout)["waypoint"]
    environ = Path(f"/proc/{waypoint['pid']}/environ").read_bytes().split(b"\0")
    want = {k: os.environ.get(k, v) for k, v in DATA_PATH_ENVIRONMENT.items()}
    for key, value in want.items():
        assert f"{key}={value}".encode() in environ, key
    log = Path(waypoint["log"]).read_text()
    assert f"memory allocator: PYTHONMALLOC={want['PYTHONMALLOC']}" in log


def test_the_callers_agent_tunnels_to_the_waypoint_and_the_waypoint_counts_the_request(
    mesh: Mesh,
) -> None:
    wait_until("the routes at the waypoint", lambda: routes_ready(mesh))
    capture = Capture(mesh.netns("node1"), mesh.tmp / "to-waypoint.pcap", "tcp and port 15008")
    try:
        answers = requests(mesh, 5, "/hello")
        capture.await_segments(
            lambda seen: (
                any(s.src[0] == CALLER_IP and s.payload for s in seen)
                and any(s.dst == ("10.10.1.12", 15008) for s in seen)
            )
        )
    finally:
        segments = capture.stop()
    assert [a["status"] for a in answers] == [200] * 5
    assert {a["pod"] for a in answers} == {V1}
    # The caller's HBONE (pooled: maybe opened before the capture) carries the requests:
    # every segment it sends to a 15008 goes to the waypoint, none to a backend pod.
    sent = [s for s in segments if s.src[0] == CALLER_IP and s.dst[1] == 15008 and s.payload]
    assert sent, f"no HBONE bytes from the caller seen ({capture.stats})"
    assert {s.dst[0] for s in sent} == {WAYPOINT_IP}, {s.dst for s in sent}
    # ... and the waypoint tunnels on to v1 itself (a pooled tunnel to v2, from earlier
    # tests' calls, may carry keep-alive pings meanwhile).
    onward = {s.dst for s in segments if s.src[0] == WAYPOINT_IP and s.dst[1] == 15008}
    assert ("10.10.1.12", 15008) in onward, onward
    metrics = mesh.waypoint_metrics()
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
    # Binomial(2000, 0.2): mean 400, sd 17.9; the 99.99% interval is +-3.89 sd.
    assert abs(v2 - 400) <= 3.89 * 17.9, v2
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


# --- HTTP/2 and gRPC: independent servers in the backend pods, routed by header ----------

H2_PORT, GRPC_PORT = 8082, 50051
H2_VIP, GRPC_VIP = "10.96.0.12", "10.96.0.13"

H2_SERVER = textwrap.dedent(
    """\
    const http2 = require('http2');
    const pod = process.argv[1];
    const server = http2.createServer();
    server.on('stream', (stream, headers) => {
      stream.respond({':status': 200, 'content-type': 'application/json'});
      stream.end(JSON.stringify({pod: pod, path: headers[':path'], user: headers['x-user'] || ''}));
    });
    server.listen(8082, '0.0.0.0', () => console.log('ready'));
    """
)

GRPC_SERVER = textwrap.dedent(
    """\
    import json, sys
    from concurrent import futures
    import grpc
    pod = sys.argv[1]
    def who(request, context):
        return json.dumps({"pod": pod}).encode()
    handler = grpc.method_handlers_generic_handler(
        "demo.Who", {"Ask": grpc.unary_unary_rpc_method_handler(who)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port("0.0.0.0:50051")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()
    """
)

GRPC_CLIENT = textwrap.dedent(
    """\
    import json, sys
    import grpc
    channel = grpc.insecure_channel(sys.argv[1])
    ask = channel.unary_unary("/demo.Who/Ask")
    pods = []
    for _ in range(int(sys.argv[3])):
        metadata = [("x-user", sys.argv[2])] if sys.argv[2] else []
        pods.append(json.loads(ask(b"", metadata=metadata, timeout=10))["pod"])
    print(json.dumps(pods))
    """
)

SERVICES = textwrap.dedent(
    f"""\
    services:
    - name: h2echo
      namespace: demo
      vip: {H2_VIP}
      ports: [{{port: {H2_PORT}, targetPort: {H2_PORT}}}]
      selector: {{app: backend}}
    - name: who
      namespace: demo
      vip: {GRPC_VIP}
      ports: [{{port: {GRPC_PORT}, targetPort: {GRPC_PORT}}}]
      selector: {{app: backend}}
    """
)

# Only `x-user: ios` has a route on h2echo: anything else is Envoy's 404 NR.
BY_HEADER = "\n---\n".join(
    textwrap.dedent(
        f"""\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {{name: {host}, namespace: demo}}
        spec:
          host: {host}
          subsets:
          - {{name: v1, labels: {{version: v1}}}}
          - {{name: v2, labels: {{version: v2}}}}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: {host}, namespace: demo}}
        spec:
          hosts: [{host}]
          http:
          - match: [{{headers: {{x-user: {{exact: ios}}}}}}]
            route: [{{destination: {{host: {host}, subset: v2}}}}]
        """
    )
    + ("" if host == "h2echo" else "  - route: [{destination: {host: who, subset: v1}}]\n")
    for host in ("h2echo", "who")
)


@pytest.fixture(scope="module")
def h2_servers(mesh: Mesh) -> Iterator[None]:
    started: list[subprocess.Popen[str]] = []
    try:
        for pod in (V1, V2):
            for argv in (
                ["node", "-e", H2_SERVER, pod],
                [sys.executable, "-c", GRPC_SERVER, pod],
            ):
                proc = subprocess.Popen(
                    [NSENTER, f"--net=/var/run/netns/{mesh.netns(pod)}", "--", *argv],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                started.append(proc)
                assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        services = mesh.tmp / "h2-services.yaml"
        services.write_text(SERVICES)
        done = _cli("sandbox", "apply", mesh.name, str(services))
        assert done.returncode == 0, done.stderr
        mesh.apply(BY_HEADER)
        yield
    finally:
        for proc in started:
            proc.terminate()
        for proc in started:
            proc.wait(timeout=10)


def curl_h2(mesh: Mesh, *headers: str) -> subprocess.CompletedProcess[str]:
    argv = [
        "curl",
        "-sS",
        "--max-time",
        "5",
        "--http2-prior-knowledge",
        "-w",
        "\\n%{http_code} %{http_version}",
    ]
    for h in headers:
        argv += ["-H", h]
    return mesh.run_in(CALLER, [*argv, f"http://{H2_VIP}:{H2_PORT}/h2"])


def test_http2_prior_knowledge_from_curl_is_routed_by_header(mesh: Mesh, h2_servers: None) -> None:
    def routes_in_force() -> bool:
        # The service is applied before its VirtualService: until the routes reach the
        # waypoint, every request goes to the whole service; then a request no route
        # matches is answered 404.
        done = curl_h2(mesh, "x-user: android")
        return done.returncode == 0 and done.stdout.endswith("404 2")

    wait_until("h2echo's routes at the waypoint", routes_in_force)
    for _ in range(10):
        done = curl_h2(mesh, "x-user: ios")
        body, status = done.stdout.rsplit("\n", 1)
        assert status == "200 2", done.stdout
        answer = json.loads(body)
        assert (answer["pod"], answer["user"], answer["path"]) == (V2, "ios", "/h2")
    # No route for anyone else: the waypoint answers 404 itself, over HTTP/2 too.
    other = curl_h2(mesh, "x-user: android")
    assert other.stdout.rsplit("\n", 1)[1] == "404 2", other.stdout


def test_grpc_calls_are_routed_by_metadata(mesh: Mesh, h2_servers: None) -> None:
    def call(user: str, count: int, *, check: bool = True) -> list[str]:
        done = mesh.python_in(CALLER, GRPC_CLIENT, f"{GRPC_VIP}:{GRPC_PORT}", user, str(count))
        if not check and done.returncode != 0:
            return []  # not known to the caller's agent yet
        assert done.returncode == 0, done.stderr
        pods: list[str] = json.loads(done.stdout)
        return pods

    # Until the routes arrive the whole service answers: wait for 10 in a row on v2.
    wait_until("who's routes at the waypoint", lambda: call("ios", 10, check=False) == [V2] * 10)
    assert set(call("ios", 20)) == {V2}
    assert set(call("", 20)) == {V1}
    metrics = mesh.waypoint_metrics()
    assert any(
        'request_protocol="grpc"' in ln and 'destination_service_name="who"' in ln
        for ln in metrics.splitlines()
        if ln.startswith("istio_requests_total{")
    ), metrics


# --- bad input ------------------------------------------------------------------------------

# argv: host port rounds. Each round: a malformed request on its own connection, then a good
# one on another; prints the status lines seen.
BURST_CLIENT = textwrap.dedent(
    """\
    import json, socket, sys
    host, port, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    BAD = [
        b"GET / HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: abc\\r\\n\\r\\n",
        b"GET / HTTP/1.1\\r\\nHost: x\\r\\nbad header line\\r\\n\\r\\n",
        b"GET / HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 3\\r\\n"
        b"Transfer-Encoding: chunked\\r\\n\\r\\n",
    ]
    def status(payload):
        s = socket.create_connection((host, port), timeout=10)
        s.sendall(payload)
        data = b""
        while b"\\r\\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        s.close()
        return data.split(b"\\r\\n", 1)[0].decode(errors="replace")
    out = {"bad": [], "good": []}
    for i in range(rounds):
        out["bad"].append(status(BAD[i % len(BAD)]))
        good = b"GET /ok HTTP/1.1\\r\\nHost: backend\\r\\nConnection: close\\r\\n\\r\\n"
        out["good"].append(status(good))
    print(json.dumps(out))
    """
)


def test_malformed_requests_get_400_and_the_good_ones_between_them_200(mesh: Mesh) -> None:
    wait_until("the routes at the waypoint", lambda: routes_ready(mesh))
    host, port = BACKEND.split(":")
    done = mesh.python_in(CALLER, BURST_CLIENT, host, port, "30", timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert set(seen["bad"]) == {"HTTP/1.1 400 Bad Request"}, seen["bad"]
    assert set(seen["good"]) == {"HTTP/1.1 200 OK"}, seen["good"]
    metrics = mesh.waypoint_metrics()
    assert any(
        'response_flags="DPE"' in ln and 'response_code="400"' in ln
        for ln in metrics.splitlines()
        if ln.startswith("istio_requests_total{")
    )


# --- interop: curl and Python's http.server through the waypoint, 100 MiB both ways ----------

BULK_PORT, BULK_VIP = 8090, "10.96.0.14"
BULK = 100 * 1024 * 1024

# http.server: GET /cl and /chunked send BULK bytes of a seeded stream (content-length or
# chunked); PUT/POST answer the sha256 and length of the body (content-length or chunked).
BULK_SERVER = textwrap.dedent(
    """\
    import hashlib, random, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    SIZE = int(sys.argv[1])
    BLOCK = random.Random(7).randbytes(1 << 20)
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def log_message(self, *args):
            pass
        def do_GET(self):
            self.send_response(200)
            if self.path == "/chunked":
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for _ in range(SIZE // len(BLOCK)):
                    self.wfile.write(b"%x\\r\\n" % len(BLOCK) + BLOCK + b"\\r\\n")
                self.wfile.write(b"0\\r\\n\\r\\n")
            else:
                self.send_header("Content-Length", str(SIZE))
                self.end_headers()
                for _ in range(SIZE // len(BLOCK)):
                    self.wfile.write(BLOCK)
        def do_PUT(self):
            digest, total = hashlib.sha256(), 0
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        break
                    chunk = self.rfile.read(size)
                    self.rfile.readline()
                    digest.update(chunk)
                    total += len(chunk)
            else:
                left = int(self.headers["Content-Length"])
                while left:
                    chunk = self.rfile.read(min(left, 1 << 20))
                    digest.update(chunk)
                    total += len(chunk)
                    left -= len(chunk)
            body = f"{digest.hexdigest()} {total}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
    server = ThreadingHTTPServer(("0.0.0.0", 8090), Handler)
    print("ready", flush=True)
    server.serve_forever()
    """
)


@pytest.fixture(scope="module")
def bulk_server(mesh: Mesh) -> Iterator[str]:
    proc = subprocess.Popen(
        [NSENTER, f"--net=/var/run/netns/{mesh.netns(V2)}", "--",
         sys.executable, "-c", BULK_SERVER, str(BULK)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        services = mesh.tmp / "bulk-service.yaml"
        services.write_text(
            textwrap.dedent(
                f"""\
                services:
                - name: bulk
                  namespace: demo
                  vip: {BULK_VIP}
                  ports: [{{port: {BULK_PORT}, targetPort: {BULK_PORT}}}]
                  selector: {{app: backend, version: v2}}
                """
            )
        )
        done = _cli("sandbox", "apply", mesh.name, str(services))
        assert done.returncode == 0, done.stderr
        payload = mesh.tmp / "payload.bin"
        block = random.Random(7).randbytes(1 << 20)
        with payload.open("wb") as f:
            for _ in range(BULK // len(block)):
                f.write(block)
        yield hashlib.sha256(payload.read_bytes()).hexdigest()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_100_mib_both_ways_through_the_waypoint_is_byte_exact(mesh: Mesh, bulk_server: str) -> None:
    url = f"http://{BULK_VIP}:{BULK_PORT}"
    wait_until(
        "the bulk service through the waypoint",
        lambda: mesh.run_in(CALLER, ["curl", "-sS", "-o", "/dev/null", "-r", "0-0",
                                     "--max-time", "5", f"{url}/cl"]).returncode == 0,
    )  # fmt: skip
    for path in ("/cl", "/chunked"):
        done = mesh.run_in(
            CALLER,
            ["sh", "-c", f"curl -sS --max-time 120 {url}{path} | sha256sum"],
            timeout=150,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split()[0] == bulk_server, path
    payload = str(mesh.tmp / "payload.bin")
    for extra in ([], ["-H", "Transfer-Encoding: chunked"]):
        done = mesh.run_in(
            CALLER,
            ["curl", "-sS", "--max-time", "120", "-T", payload, *extra, f"{url}/up"],
            timeout=150,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [bulk_server, str(BULK)], extra


# --- Gateway API: an HTTPRoute attached to a service, as Istio ambient users write it -------

WEB_SERVICES = textwrap.dedent(
    """\
    services:
    - name: web
      namespace: demo
      vip: 10.96.0.15
      ports: [{port: 8080, targetPort: 8080}]
      selector: {app: backend}
    - name: web-v2
      namespace: demo
      vip: 10.96.0.16
      ports: [{port: 8080, targetPort: 8080}]
      selector: {app: backend, version: v2}
    """
)
WEB_ROUTE = textwrap.dedent(
    """\
    apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: {name: web-canary, namespace: demo}
    spec:
      parentRefs: [{kind: Service, group: "", name: web, port: 8080}]
      rules:
      - matches: [{headers: [{name: x-canary, value: "1"}]}]
        filters:
        - type: ResponseHeaderModifier
          responseHeaderModifier: {set: [{name: x-served-by, value: canary}]}
        backendRefs: [{name: web-v2, port: 8080}]
      - backendRefs: [{name: web, port: 8080}]
    """
)

# argv: url count [header=value]; prints each answer's pod and x-served-by.
WEB_CLIENT = textwrap.dedent(
    """\
    import json, sys, urllib.request
    out = []
    headers = dict(a.split("=", 1) for a in sys.argv[3:])
    for _ in range(int(sys.argv[2])):
        req = urllib.request.Request(sys.argv[1], headers=headers)
        with urllib.request.urlopen(req, timeout=10) as r:
            out.append([json.loads(r.read())["pod"], r.headers.get("x-served-by")])
    print(json.dumps(out))
    """
)


def test_an_httproute_on_a_service_routes_by_header_through_the_waypoint(mesh: Mesh) -> None:
    services = mesh.tmp / "web-services.yaml"
    services.write_text(WEB_SERVICES)
    done = _cli("sandbox", "apply", mesh.name, str(services))
    assert done.returncode == 0, done.stderr
    mesh.apply(WEB_ROUTE)

    def answers(count: int, *headers: str) -> list[list[str]]:
        done = mesh.python_in(CALLER, WEB_CLIENT, "http://10.96.0.15:8080/", str(count), *headers)
        if done.returncode != 0:
            return []
        seen: list[list[str]] = json.loads(done.stdout)
        return seen

    wait_until(
        "the HTTPRoute at the waypoint", lambda: answers(1, "x-canary=1") == [[V2, "canary"]]
    )
    assert answers(20, "x-canary=1") == [[V2, "canary"]] * 20
    plain = answers(40)
    assert {pod for pod, _ in plain} == {V1, V2}  # the whole service (both: p = 1 - 2^-39)
    assert {served for _, served in plain} == {None}
