"""Resilience and chaos at the waypoint (issue 19), in a 2x2 sandbox with `--waypoint --shadow`:
faults, retries, timeouts, the automatic fallback from a failing v2 to v1, the HTTP circuit
breaker and mirroring, each configured with Istio's VirtualService and DestinationRule.

backend: v1 is node1-pod2, v2 is node2-pod2, v3 is node2-shadow (the demo apps' switches,
`sandbox behave`, make them fail or stall). The caller is node1-pod1; every request goes
from its agent to the waypoint pod, which applies the routes per request.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from .e2e_harness import Mesh, sandbox, service_routes, wait_until

pytestmark = pytest.mark.timeout(300)

CALLER = "node1-pod1"
V1, V2, V3 = "node1-pod2", "node2-pod2", "node2-shadow"
HOST, PORT = "10.96.0.10", 8080

SUBSETS = textwrap.dedent(
    """\
      subsets:
      - {name: v1, labels: {version: v1}}
      - {name: v2, labels: {version: v2}}
      - {name: v3, labels: {version: v3}}
    """
)

# Sends `count` requests from `concurrency` threads (each its own keep-alive connection, or a
# new one per request with close=1); prints per request: status, pod, x-config, seconds,
# body head. argv: host port count concurrency close path [header=value ...]
CLIENT = textwrap.dedent(
    """\
    import http.client, json, sys, threading, time
    host, port, count, workers, close, path = sys.argv[1], int(sys.argv[2]), \\
        int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1", sys.argv[6]
    headers = dict(a.split("=", 1) for a in sys.argv[7:])
    out, lock, left = [], threading.Lock(), [count]
    start = threading.Barrier(workers)
    def work():
        conn = None
        start.wait()
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=30)
            began = time.monotonic()
            item = {}
            try:
                conn.request("GET", path, headers=headers)
                r = conn.getresponse()
                body = r.read()
                item = {"status": r.status, "config": r.getheader("x-config"),
                        "body": body[:120].decode("latin-1")}
                if r.status == 200 or body.startswith(b"{"):
                    item["pod"] = json.loads(body).get("pod")
            except Exception as e:
                item = {"status": 0, "error": repr(e)}
                conn.close()
                conn = None
            item["seconds"] = time.monotonic() - began
            if close and conn is not None:
                conn.close()
                conn = None
            with lock:
                out.append(item)
    threads = [threading.Thread(target=work) for _ in range(workers)]
    for t in threads: t.start()
    for t in threads: t.join()
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    # One capture backend: what is tested here is the waypoint's, the same for both
    # (test_waypoint_http runs the routing through both).
    tmp = tmp_path_factory.mktemp("waypoint-resilience")
    with sandbox(tmp, "iptables", waypoint=True, shadow=True) as running:
        yield running


@pytest.fixture(autouse=True)
def healthy_apps(mesh: Mesh) -> Iterator[None]:
    for pod in (V1, V2):
        mesh.behave(pod)
    yield
    for pod in (V1, V2):
        mesh.behave(pod)


def send(
    mesh: Mesh, count: int, *headers: str, workers: int = 1, close: bool = False, path: str = "/"
) -> list[dict[str, Any]]:
    done = mesh.python_in(
        CALLER, CLIENT, HOST, str(PORT), str(count), str(workers), "1" if close else "0",
        path, *headers, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    answers: list[dict[str, Any]] = json.loads(done.stdout)
    return answers


def configure(mesh: Mesh, name: str, routes: str, policy: str = "") -> None:
    """Apply the backend's VirtualService (its routes tagged x-config: NAME) and
    DestinationRule, and wait until the waypoint serves them."""
    tagged = routes.replace("TAG", f"headers: {{response: {{set: {{x-config: {name}}}}}}}")
    mesh.apply(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        "metadata: {name: backend, namespace: demo}\nspec:\n  host: backend\n"
        + (textwrap.indent(textwrap.dedent(policy), "  ") if policy else "")
        + textwrap.indent(SUBSETS, "  ")
        + "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        "metadata: {name: backend, namespace: demo}\nspec:\n  hosts: [backend]\n  http:\n"
        + textwrap.indent(textwrap.dedent(tagged), "  ")
    )
    wait_until(
        f"config {name} at the waypoint",
        lambda: any(a.get("config") == name for a in send(mesh, 3, "x-probe=1")),
    )
    # The tag proves the VirtualService; the DestinationRule is a separate xDS message and
    # keeps its name, so wait for its pool and outlier settings as the waypoint shows them.
    wanted = (yaml.safe_load(textwrap.dedent(policy)) if policy else None) or {}
    traffic = wanted.get("trafficPolicy") or {}
    max_connections = ((traffic.get("connectionPool") or {}).get("tcp") or {}).get("maxConnections")
    outlier = traffic.get("outlierDetection")

    def rule_applied() -> bool:
        backend = service_routes(mesh, "backend", waypoint=True)
        ports = [p for s in (backend or {}).get("subsets", []) for p in s["ports"]]
        return bool(ports) and all(
            p["maxConnections"] == max_connections
            and (p["outlierDetection"] is None) == (outlier is None)
            and (
                outlier is None
                or p["outlierDetection"]["consecutive5xxErrors"]
                == outlier.get("consecutive5xxErrors", 5)
            )
            for p in ports
        )

    wait_until(f"config {name}'s DestinationRule at the waypoint", rule_applied)


def flag_count(mesh: Mesh, flag: str, code: int) -> float:
    """istio_requests_total of the waypoint for the backend with these response flags."""
    total = 0.0
    for line in mesh.waypoint_metrics().splitlines():
        if (
            line.startswith("istio_requests_total{")
            and f'response_flags="{flag}"' in line
            and f'response_code="{code}"' in line
            and 'destination_service_name="backend"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_an_abort_at_20_percent_hits_its_share_flagged_fi(mesh: Mesh) -> None:
    configure(
        mesh,
        "abort20",
        """\
        - route: [{destination: {host: backend, subset: v1}}]
          fault: {abort: {httpStatus: 503, percentage: {value: 20}}}
          retries: {attempts: 0}
          TAG
        """,
    )
    before = flag_count(mesh, "FI", 503)
    answers = send(mesh, 2000)
    aborted = [a for a in answers if a["status"] == 503]
    assert len(aborted) + sum(a["status"] == 200 for a in answers) == 2000
    # Binomial(2000, 0.2): mean 400, sd 17.9; the 99.99% interval is +-3.89 sd.
    assert abs(len(aborted) - 400) <= 3.89 * 17.9, len(aborted)
    assert {a["body"] for a in aborted} == {"fault filter abort"}
    wait_until(
        "the aborts in the metrics", lambda: flag_count(mesh, "FI", 503) - before >= len(aborted)
    )
    assert flag_count(mesh, "FI", 503) - before == len(aborted)


def test_a_2s_delay_holds_every_request_flagged_di(mesh: Mesh) -> None:
    configure(
        mesh,
        "delay2",
        """\
        - match: [{headers: {x-probe: {exact: "1"}}}]
          route: [{destination: {host: backend, subset: v1}}]
          TAG
        - route: [{destination: {host: backend, subset: v1}}]
          fault: {delay: {fixedDelay: 2s, percentage: {value: 100}}}
          TAG
        """,
    )
    before = flag_count(mesh, "DI", 200)
    answers = send(mesh, 3, workers=3)
    assert [a["status"] for a in answers] == [200] * 3
    assert min(a["seconds"] for a in answers) >= 2.0, answers
    wait_until("the delays in the metrics", lambda: flag_count(mesh, "DI", 200) - before >= 3)


def test_a_fault_scoped_by_a_header_hits_only_matching_requests(mesh: Mesh) -> None:
    configure(
        mesh,
        "scoped",
        """\
        - match: [{headers: {x-chaos: {exact: "yes"}}}]
          route: [{destination: {host: backend, subset: v1}}]
          fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
          TAG
        - route: [{destination: {host: backend, subset: v1}}]
          TAG
        """,
    )
    chaos = send(mesh, 50, "x-chaos=yes")
    calm = send(mesh, 50, "x-chaos=no")
    assert {a["status"] for a in chaos} == {418}
    assert {a["status"] for a in calm} == {200}


def test_retries_hide_a_v2_that_fails_half_its_requests(mesh: Mesh) -> None:
    configure(
        mesh,
        "retries",
        """\
        - route: [{destination: {host: backend, subset: v2}}]
          retries: {attempts: 3, retryOn: 5xx, perTryTimeout: 2s}
          TAG
        """,
    )
    mesh.behave(V2, fail=0.5)
    answers = send(mesh, 1000)
    assert [a for a in answers if a["status"] != 200] == []
    assert {a["pod"] for a in answers} == {V2}
    # Each failed try was answered by v2 and retried: its app saw about 2000 requests.
    served = [r for r in mesh.app_log(V2) if r["path"] == "/"]
    assert sum(r["status"] == 500 for r in served) >= 900
    log = mesh.waypoint_log()
    assert " attempts=2" in log and " 200 URX" not in log


def test_a_try_that_outlives_its_per_try_timeout_is_retried_then_504_ut(mesh: Mesh) -> None:
    configure(
        mesh,
        "pertry",
        """\
        - match: [{headers: {x-probe: {exact: "1"}}}]
          route: [{destination: {host: backend, subset: v1}}]
          TAG
        - route: [{destination: {host: backend, subset: v1}}]
          retries: {attempts: 2, retryOn: "5xx", perTryTimeout: 300ms}
          TAG
        """,
    )
    mesh.behave(V1, delay=3.0)
    (answer,) = send(mesh, 1)
    assert answer["status"] == 504 and answer["body"] == "upstream request timeout"
    # 3 tries of 0.3 s plus backoff; a try left to the backend would take 3 s.
    assert 0.9 <= answer["seconds"] < 2.5, answer
    wait_until("the access log line", lambda: "504 UT,URX" in mesh.waypoint_log())
    line = next(ln for ln in mesh.waypoint_log().splitlines() if "504 UT,URX" in ln)
    assert "attempts=3" in line


def test_a_backend_slower_than_the_route_timeout_is_504_ut(mesh: Mesh) -> None:
    configure(
        mesh,
        "timeout",
        """\
        - match: [{headers: {x-probe: {exact: "1"}}}]
          route: [{destination: {host: backend, subset: v1}}]
          TAG
        - route: [{destination: {host: backend, subset: v1}}]
          timeout: 1s
          TAG
        """,
    )
    before = flag_count(mesh, "UT", 504)
    mesh.behave(V1, delay=3.0)
    answers = send(mesh, 3, workers=3)
    for a in answers:
        assert a["status"] == 504 and a["body"] == "upstream request timeout", a
        assert 1.0 <= a["seconds"] < 2.5, a
    wait_until("the timeouts in the metrics", lambda: flag_count(mesh, "UT", 504) - before >= 3)


# Sends one request on a fresh connection, waits `argv[3]` s for an answer, then closes.
LEAVE = textwrap.dedent(
    """\
    import socket, sys
    sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    sock.sendall(b"GET /leave HTTP/1.1\\r\\nhost: backend\\r\\n\\r\\n")
    sock.settimeout(float(sys.argv[3]))
    try:
        print(len(sock.recv(100)))
    except TimeoutError:
        print(0)
    sock.close()
    """
)


def test_a_client_that_gives_up_on_a_stalled_backend_is_dc_at_once(mesh: Mesh) -> None:
    """No route timeout (Istio's default) and a backend that stalls for 30 s: the caller gives
    up after 1 s and closes; its agent ends the tunnel, the waypoint sees it while it awaits
    the response, resets the upstream request and logs 0 DC, well before the backend answers."""
    configure(
        mesh,
        "stall",
        """\
        - route: [{destination: {host: backend, subset: v1}}]
          TAG
        """,
    )
    before = flag_count(mesh, "DC", 0)
    mesh.behave(V1, delay=30.0)
    began = time.monotonic()
    done = mesh.python_in(CALLER, LEAVE, HOST, str(PORT), "1.0")
    assert done.returncode == 0 and done.stdout.strip() == "0", (done.stdout, done.stderr)
    wait_until(
        "the client's leave in the metrics",
        lambda: flag_count(mesh, "DC", 0) - before >= 1,
        timeout=10.0,
    )
    assert time.monotonic() - began < 15.0  # the backend would have answered at 30 s
    wait_until("the access log line", lambda: "/leave" in mesh.waypoint_log(), timeout=10.0)
    line = next(ln for ln in mesh.waypoint_log().splitlines() if "/leave" in ln)
    assert " 0 DC" in line, line


def test_v2_failing_everything_is_ejected_and_users_are_served_by_v1(mesh: Mesh) -> None:
    configure(
        mesh,
        "fallback",
        """\
        - route:
          - {destination: {host: backend, subset: v1}, weight: 50}
          - {destination: {host: backend, subset: v2}, weight: 50}
          retries: {attempts: 3, retryOn: 5xx}
          TAG
        """,
        policy="""\
        trafficPolicy:
          outlierDetection:
            consecutive5xxErrors: 2
            interval: 1s
            baseEjectionTime: 6s
            maxEjectionPercent: 100
        """,
    )
    mesh.behave(V2, fail=1.0)
    started = time.time()
    answers = send(mesh, 200)
    assert [a for a in answers if a["status"] != 200] == []
    assert {a["pod"] for a in answers} == {V1}
    elapsed = time.time() - started
    failed = [r for r in mesh.app_log(V2) if r["status"] == 500 and r["time"] >= started]
    # Ejected after its second 5xx in a row: v2 saw at most that many of the 200 requests,
    # and two more per ejection that ended during the run (6 s: only a slow machine's run).
    assert 1 <= len(failed) <= 2 * (1 + int(elapsed // 6)), (failed, elapsed)
    # Healthy again, v2 returns once its ejection has ended (the waypoint's route state).
    mesh.behave(V2)
    v2_ip = mesh.pod(V2)["ip"]

    def v2_back() -> bool:
        backend = service_routes(mesh, "backend", waypoint=True) or {}
        ends = [
            e
            for subset in backend.get("subsets", [])
            for e in subset["endpoints"]
            if e["address"].startswith(f"{v2_ip}:")
        ]
        return bool(ends) and all(e["ejectedSeconds"] is None for e in ends)

    wait_until("v2's ejection ends", v2_back, timeout=30.0)
    back = send(mesh, 40)
    assert {a["status"] for a in back} == {200}
    assert V2 in {a["pod"] for a in back}


def test_the_circuit_breaker_answers_the_overflow_503_uo_at_once(mesh: Mesh) -> None:
    configure(
        mesh,
        "breaker",
        """\
        - route: [{destination: {host: backend, subset: v1}}]
          TAG
        """,
        policy="""\
        trafficPolicy:
          connectionPool:
            tcp: {maxConnections: 1}
            http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}
        """,
    )
    # A 3 s answer: all 20 requests reach the waypoint while the first is in flight, even
    # on a loaded machine.
    mesh.behave(V1, delay=3.0)
    answers = send(mesh, 20, workers=20, close=True)
    ok = [a for a in answers if a["status"] == 200]
    overflow = [a for a in answers if a["status"] == 503]
    # One in flight and one queued are served; the other 18 overflow without waiting.
    assert len(ok) == 2 and len(overflow) == 18, answers
    assert all("reset reason: overflow" in a["body"] for a in overflow)
    assert max(a["seconds"] for a in overflow) < 2.5, overflow
    assert flag_count(mesh, "UO", 503) >= 18


def test_mirroring_copies_every_request_to_v3_and_a_dead_v3_changes_nothing(mesh: Mesh) -> None:
    configure(
        mesh,
        "mirror",
        """\
        - route: [{destination: {host: backend, subset: v1}}]
          mirror: {host: backend, subset: v3}
          mirrorPercentage: {value: 100}
          TAG
        """,
    )
    started = time.time()
    answers = send(mesh, 50, "x-mirror=run1")
    assert {a["status"] for a in answers} == {200} and {a["pod"] for a in answers} == {V1}

    def shadowed() -> list[dict[str, Any]]:
        return [r for r in mesh.app_log(V3) if r["time"] >= started and r["path"] == "/"]

    wait_until("the copies at v3", lambda: len(shadowed()) >= 50)
    assert {r["host"] for r in shadowed()} == {f"{HOST}-shadow:{PORT}"}
    baseline = statistics.median(a["seconds"] for a in send(mesh, 100))

    pid = mesh.pod(V3)["app_pid"]
    os.kill(pid, signal.SIGKILL)  # v3's app is gone: its copies fail
    answers = send(mesh, 100)
    assert [a for a in answers if a["status"] != 200] == []
    assert statistics.median(a["seconds"] for a in answers) < 2 * baseline + 0.05
    failed = [
        ln for ln in mesh.waypoint_metrics().splitlines()
        if ln.startswith('nodeagent_waypoint_mirror_requests_total{outcome="failed"}')
    ]  # fmt: skip
    assert failed and float(failed[0].rsplit(" ", 1)[1]) >= 1, failed
